"""Saving a step checkpoint: every rank writes its share under ``.tmp-step_<N>``, then rank 0 writes
the manifest and ``meta.json``, renames the directory, points ``latest`` at it and prunes old ones
(the sequence is described in :mod:`clipo_nemo.checkpoint`)."""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional

import torch
import torch.distributed as dist

from clipo_nemo.checkpoint.contents import (HeadState, PolicyState, checkpoint_sharded_state_dict, describe_contents,
                                            rng_states)
from clipo_nemo.checkpoint.recovery import (STEP_PREFIX, TMP_PREFIX, checkpoints_dir, complete_checkpoints,
                                            file_checksums, write_manifest)
from clipo_nemo.checkpoint.reference import REFERENCE_DIR, Pointer, save_own_reference, stored_form
from clipo_nemo.checkpoint.writer import checkpoint_writer, collect_checksums


def save_checkpoint(run_dir: str | os.PathLike, step: int, actor: PolicyState, clipo_head: Optional[HeadState],
                    trainer_state: Dict[str, Any], keep_last: int, keep: Collection[Path] = (), *,
                    reference: Optional[Pointer] = None, parallel: bool = True, asynchronous: bool = False) -> Path:
    """Save everything needed to resume after ``step`` to ``run_dir/checkpoints/step_<step>``.

    Collective: every rank calls it with the same arguments (``trainer_state`` is taken from rank
    0). Written under ``.tmp-step_<step>`` and renamed when every rank has finished; then ``latest``
    is replaced atomically and all but the newest ``keep_last`` complete checkpoints (and those in
    ``keep``: the old checkpoints of a run that fell back at resume) are deleted. A
    leftover ``.tmp-*`` from a killed save is removed first. Saving a step that already exists
    replaces it. Returns the checkpoint directory.

    ``reference``: where the frozen reference policy lives
    (:func:`clipo_nemo.checkpoint.reference.pointer_for_run`); None: this run's own copy in
    ``checkpoints/reference``, written by the first save that needs it. ``parallel``: every
    data-parallel rank writes its share of the sharded tensors. ``asynchronous``: return once the
    sharded write has started in the background; the manifest, meta.json, the rename, ``latest``
    and pruning follow when every rank's write is complete, at :func:`finish_saves` or
    :func:`wait_for_pending_save` (the next save waits for a pending one first).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    writer = checkpoint_writer()
    writer.wait()
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"{STEP_PREFIX}{step}", root / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if not complete_checkpoints(root):  # a reference/ of a run killed before its first checkpoint
            shutil.rmtree(root / REFERENCE_DIR, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()
    contents = describe_contents(actor, clipo_head)
    contents["reference"] = None if actor.reference is None else stored_form(
        reference if reference is not None else save_own_reference(root, actor.reference, parallel), root)
    torch.save(rng_states(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    publish = functools.partial(_publish, root, tmp, final, {"step": step, **contents}, keep_last, keep)
    writer.save(checkpoint_sharded_state_dict(actor, clipo_head, contents, loading=False), tmp / "dist", publish,
                parallel=parallel, asynchronous=asynchronous)
    return final


def _publish(root: Path, tmp: Path, final: Path, meta: Dict[str, Any], keep_last: int, keep: Collection[Path]) -> None:
    """A save's last part, once every rank's files are complete (collective): every rank checksums its
    own small files (RNG states; rank 0 the trainer state) and sends them to rank 0, which merges them
    with the writers' checksums of the shard files into the manifest (reading only the few small
    files written at finalize), writes meta.json, renames ``tmp`` to ``final``, points ``latest`` at
    it and prunes."""
    rank = dist.get_rank()
    own = [f"rng/rank_{rank:05d}.pt"] + (["trainer_state.pt"] if rank == 0 else [])
    recorded = {name: {**entry, "rank": rank} for name, entry in file_checksums(tmp, own).items()}
    gathered: List[Optional[Dict[str, Any]]] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(recorded, gathered, dst=0)
    if rank == 0:
        for part in gathered:
            recorded.update(part)
        write_manifest(tmp, {**recorded, **collect_checksums(tmp / "dist", "dist/")})
        _write_atomically(tmp / "meta.json", json.dumps(meta, indent=1))
        if final.exists():  # re-saving a step: move the old copy aside first (rename cannot overwrite)
            replaced = root / f"{TMP_PREFIX}replaced-{final.name}"
            os.replace(final, replaced)
            os.replace(tmp, final)
            shutil.rmtree(replaced)
        else:
            os.replace(tmp, final)
        _write_atomically(root / "latest", final.name)
        _prune(root, keep_last, final, keep)
    dist.barrier()


def wait_for_pending_save() -> None:
    """Block until a pending asynchronous save is written on every rank, then publish it. Collective."""
    checkpoint_writer().wait()


def finish_saves() -> bool:
    """Publish a pending asynchronous save if every rank has finished writing it (does not block).
    True when no save is pending any more. Collective (one all-reduce while a save is pending)."""
    return checkpoint_writer().poll()


def _bytes_under(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def _reports_no_space(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def out_of_space(error: BaseException, run_dir: str | os.PathLike, step: int) -> Optional[OSError]:
    """For ``error``, a failed save of ``step``: an ``OSError(ENOSPC)`` saying "No space left on
    device", naming the path and the space needed, when the checkpoint's file system is full; None
    when it is not (the error has another cause).

    A full disk during a synchronous save surfaces under other names (torch.save's "[enforce fail at
    inline_container.cc] unexpected pos", or megatron's "results_queue should not be empty" when its
    writer process could not even report the failure), so the file system itself is asked: full means
    ENOSPC in the error's chain, or less free space than the save needs (the newest complete
    checkpoint's size; without one, what the failed save had written, a lower bound)."""
    root = checkpoints_dir(run_dir)
    partial = root / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
    complete = complete_checkpoints(root) if root.is_dir() else []
    needed = _bytes_under(complete[-1]) if complete else _bytes_under(partial)
    basis = f"the size of {complete[-1].name}" if complete else "at least what it had written"
    free = shutil.disk_usage(root if root.is_dir() else Path(run_dir)).free
    if not (_reports_no_space(error) or free < needed):
        return None
    gib = 2 ** 30
    last = f"the last complete checkpoint ({complete[-1].name}) is intact" if complete else "no checkpoint is complete"
    return OSError(errno.ENOSPC, f"No space left on device: saving step {step} to {partial} needs about "
                                 f"{needed / gib:.3f} GiB ({basis}) and {free / gib:.3f} GiB is free on that file "
                                 f"system; {last}. Free space there (or lower trainer.keep_last) and run again: the "
                                 f"run resumes from its last checkpoint (save failed with {type(error).__name__}: "
                                 f"{str(error)[:200]})", str(partial))


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int, just_saved: Path, keep: Collection[Path] = ()) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` ones (never ``just_saved``,
    which ``latest`` names, even when a higher-numbered checkpoint exists, nor those in ``keep``)."""
    for old in complete_checkpoints(root)[:-keep_last]:
        if old != just_saved and old not in keep:
            shutil.rmtree(old)
