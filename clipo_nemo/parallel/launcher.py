"""Run a function on N real processes (gloo on CPU) and collect what each rank returns.

Used by the multi-process tests and by the parallel-equivalence tool.

    results = run_distributed(my_fn, world_size=2, args=(cfg,), timeout_s=120)

``my_fn(rank, world_size, *args)`` must be importable (module level) because ranks are started with
the ``spawn`` method. Each rank gets the launcher environment torchrun would give it (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port), so the code under
test initialises torch.distributed exactly as in production. What a rank returns is saved with
``torch.save`` and handed back in rank order. If a rank raises, every other rank is killed and the
failing rank's traceback is raised here; if the ranks do not finish in ``timeout_s`` all are killed
and the unfinished ranks are named.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Sequence


class DistributedRunError(RuntimeError):
    """A rank failed, or the ranks did not finish in time."""


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: Sequence[Any]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)


def run_distributed(
    fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), timeout_s: float = 120.0
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="clipo_dist_") as out_dir:
        # Not daemonic, like torchrun's ranks: dist_checkpointing.save starts helper processes, which a
        # daemonic process may not. Cleanup does not rely on it: the ``finally`` below kills the ranks.
        procs = [
            ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, out_dir, tuple(args)))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait(procs, out_dir, timeout_s)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=10)
        import torch

        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _wait(procs: List[mp.Process], out_dir: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        failed = [rank for rank, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
        if failed:
            raise DistributedRunError(_failure_report(failed, procs, out_dir))
        if all(proc.exitcode == 0 for proc in procs):
            return
        time.sleep(0.05)
    unfinished = [rank for rank, proc in enumerate(procs) if proc.exitcode is None]
    raise DistributedRunError(f"ranks {unfinished} did not finish within {timeout_s:.0f}s (all ranks killed)")


def _failure_report(failed: List[int], procs: List[mp.Process], out_dir: str) -> str:
    lines = []
    for rank in failed:
        err = Path(out_dir) / f"rank{rank}.err"
        detail = err.read_text() if err.exists() else "(no traceback: the process died)"
        lines.append(f"rank {rank} failed with exit code {procs[rank].exitcode}:\n{detail}")
    return "\n".join(lines)
