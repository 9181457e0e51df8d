"""Writing the sharded part of a checkpoint: megatron's ``torch_dist`` format, every data-parallel
rank writing its share, optionally in the background while training goes on.

:class:`ShardedCheckpointWriter` drives megatron-core's own machinery:

- ``FullyParallelSaveStrategyWrapper`` around ``TorchDistSaveShardedStrategy``: a tensor replicated
  over the data-parallel group (all weights and, with torch optimizers, all moments) is written by
  one of its replicas, chosen so that every DP rank writes about ``1/DP`` of the bytes. Only
  metadata is exchanged; nothing is gathered. The files are the ordinary reshardable ``torch_dist``
  format (global sharded tensors: loadable at any TP/PP/DP).
- ``dist_checkpointing.save(..., async_sharded_save=True)`` returns megatron's ``AsyncRequest`` and
  ``AsyncCallsQueue`` runs it: the tensors to write are snapshotted (a ``fork``: copy-on-write
  pages; on a GPU megatron copies them to host memory first) and written by a writer process while
  the trainer continues. Its finalize functions (the ``.metadata`` of ``torch_dist``, megatron's
  ``metadata.json``, then the caller's) run on every rank once every rank's write is complete.
  A synchronous save is the same request, waited for at once.
- After writing, each writer process checksums the files its rank wrote
  (:func:`record_own_checksums`); the save's finalize merges these small records into the
  manifest (:func:`collect_checksums`), so no rank reads another rank's files.

Helper processes die with the trainer. The writer process (forked by megatron's
``TemporalAsyncCaller``) and the per-file workers it forks get ``PR_SET_PDEATHSIG`` = SIGKILL and
ignore SIGTERM/SIGINT (a terminal's Ctrl-C reaches the whole process group, and the trainer itself
answers it by finishing the step and saving: the pending write must complete, not die). megatron's
write-results channel is a queue of a spawned ``multiprocessing`` *Manager* (a second Python
interpreter of several hundred MB plus a resource-tracker process, which stay alive forever when
the trainer is SIGKILLed); here each save's results travel through a small file in the checkpoint's
temporary directory instead (:class:`_WriteResultsFile`), so no long-lived process exists at all.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import pickle
import queue
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch.distributed as dist

from clipo_nemo.checkpoint.recovery import file_checksums

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_CHECKSUMS_PREFIX = ".checksums.rank_"  # a writer's checksums of its own files, merged into the manifest


def die_with_parent(parent_pid: int) -> None:
    """Make the calling (just forked) process receive SIGKILL when its parent exits, and ignore
    SIGTERM/SIGINT; exit at once if the parent is already gone (it died before this call).

    Linux only (``prctl``); elsewhere only the signal dispositions change.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def _write_as_child_of(parent_pid: int, checkpoint_dir: Path, rank: int, write: Callable[..., None], *args: Any,
                       **kwargs: Any) -> None:
    """The writer process's body: die with the trainer, make every process it forks die with it,
    run megatron's write function, then checksum the files it wrote (:func:`record_own_checksums`)."""
    die_with_parent(parent_pid)
    os.register_at_fork(after_in_child=functools.partial(die_with_parent, os.getpid()))
    write(*args, **kwargs)
    record_own_checksums(checkpoint_dir, rank)


def record_own_checksums(checkpoint_dir: Path, rank: int) -> None:
    """Checksum the shard files rank ``rank`` wrote to ``checkpoint_dir`` (torch ``FileSystemWriter``
    names them ``__<rank>_<n>.distcp``; megatron's writer with a separation hint puts a group name
    before that) into ``.checksums.rank_<rank>.json`` beside them, for :func:`collect_checksums`. Runs in the writer process, so an asynchronous save checksums in the
    background and every rank reads only what it wrote."""
    names = sorted(p.name for p in checkpoint_dir.glob(f"*__{rank}_*.distcp"))
    entries = {name: {**entry, "rank": rank} for name, entry in file_checksums(checkpoint_dir, names).items()}
    path = checkpoint_dir / f"{_CHECKSUMS_PREFIX}{rank:05d}.json"
    path.with_name(path.name + ".tmp").write_text(json.dumps(entries))
    os.replace(path.with_name(path.name + ".tmp"), path)


def collect_checksums(checkpoint_dir: Path, prefix: str) -> Dict[str, Dict[str, Any]]:
    """The entries every rank's writer recorded in ``checkpoint_dir`` (names prefixed with ``prefix``,
    their path inside the checkpoint); the per-rank files are removed. Once every write is complete."""
    merged: Dict[str, Dict[str, Any]] = {}
    for path in sorted(checkpoint_dir.glob(f"{_CHECKSUMS_PREFIX}*.json")):
        merged.update({prefix + name: entry for name, entry in json.loads(path.read_text()).items()})
        path.unlink()
    return merged


class _WriteResultsFile:
    """The ``put`` / ``get_nowait`` of a queue that carries one save's write results (or the
    exception of a failed write) from megatron's writer process to the trainer, through a file.

    Stands in for megatron's default channel, a spawned Manager's queue (see the module docstring).
    ``put`` replaces the file atomically; ``get_nowait`` raises ``queue.Empty`` when it is absent.
    """

    def __init__(self, path: Path):
        self.path = path

    def put(self, item: Any) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as handle:
            pickle.dump(item, handle)
        os.replace(tmp, self.path)

    def get_nowait(self) -> Any:
        try:
            with open(self.path, "rb") as handle:
                item = pickle.load(handle)
        except FileNotFoundError:
            raise queue.Empty from None
        self.path.unlink()
        return item


class ShardedCheckpointWriter:
    """One per process: saves sharded state dicts, at most one save in flight.

    Every method is collective (all ranks call it in the same order).
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._calls = AsyncCallsQueue(persistent=False)

    @property
    def pending(self) -> bool:
        """True while a save is scheduled and not yet finalized."""
        return self._calls.get_num_unfinalized_calls() > 0

    def save(self, sharded_state_dict: Dict[str, Any], checkpoint_dir: Path, finalize: Callable[[], None],
             parallel: bool, asynchronous: bool) -> None:
        """Write ``sharded_state_dict`` to ``checkpoint_dir`` (megatron ``torch_dist``), then call
        ``finalize`` on every rank once every rank's files are complete.

        ``parallel``: every DP rank writes a share of the replicated tensors (else the DP rank 0
        copy writes them). ``asynchronous``: return once the write has started (call :meth:`wait`
        or :meth:`poll` later); otherwise return after ``finalize``. A save still pending from an
        earlier call is finalized first.
        """
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        self.wait()
        # megatron's writer takes its results channel from this module-level cache while it plans the
        # save (and keeps it); restored afterwards, so other dist_checkpointing.save calls get megatron's own.
        default_channel = filesystem_async._results_queue
        filesystem_async._results_queue = _WriteResultsFile(
            Path(checkpoint_dir) / f".write_results.rank_{dist.get_rank():05d}.pkl")
        try:
            request = dist_checkpointing.save(sharded_state_dict, str(checkpoint_dir),
                                              sharded_strategy=self._strategy(parallel), async_sharded_save=True)
        finally:
            filesystem_async._results_queue = default_channel
        if request.async_fn is not None:
            request = request._replace(async_fn=functools.partial(
                _write_as_child_of, os.getpid(), Path(checkpoint_dir), dist.get_rank(), request.async_fn))
        request.add_finalize_fn(finalize)
        self._calls.schedule_async_request(request)
        if not asynchronous:
            self.wait()

    def wait(self) -> None:
        """Block until the pending save (if any) is written on every rank, and finalize it."""
        self._calls.maybe_finalize_async_calls(blocking=True)

    def poll(self) -> bool:
        """Finalize the pending save if every rank has finished writing it; True if none is pending now."""
        self._calls.maybe_finalize_async_calls(blocking=False)
        return not self.pending

    @staticmethod
    def _strategy(parallel: bool):
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        base = get_default_save_sharded_strategy()  # torch_dist
        if not parallel:
            return base
        return FullyParallelSaveStrategyWrapper(
            base, parallel_state.get_data_parallel_group(with_context_parallel=True))


_WRITER: Optional[ShardedCheckpointWriter] = None


def checkpoint_writer() -> ShardedCheckpointWriter:
    """This process's writer (created on first use)."""
    global _WRITER
    if _WRITER is None:
        _WRITER = ShardedCheckpointWriter()
    return _WRITER
