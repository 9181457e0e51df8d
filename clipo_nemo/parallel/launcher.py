"""Run a function on N real processes (gloo on CPU) and collect what each rank returns; run torchrun so
that a stop request ends the job with the workers' exit status.

``run_distributed`` is used by the multi-process tests and by the parallel-equivalence tool.

    results = run_distributed(my_fn, world_size=2, args=(cfg,), timeout_s=120)

``my_fn(rank, world_size, *args)`` must be importable (module level) because ranks are started with
the ``spawn`` method. Each rank gets the launcher environment torchrun would give it (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port), so the code under
test initialises torch.distributed exactly as in production. What a rank returns is saved with
``torch.save`` and handed back in rank order. If a rank raises, every other rank is killed and the
failing rank's traceback is raised here; if the ranks do not finish in ``timeout_s`` all are killed
and the unfinished ranks are named.

``python -m clipo_nemo.parallel.launcher <torchrun arguments>`` (what ``examples/slurm/launch.sh`` runs
on every node) is torchrun, except for stop requests. torchrun answers SIGTERM by stopping its workers
and exiting 1 even when they saved and exited 0, so a scheduler records a failure; SIGUSR1 (SLURM's
warning before the time limit) would kill it outright. Here SIGTERM and SIGUSR1 go to the workers
only (the trainer saves after the current step and exits 0) and torchrun ignores them, so the exit
status is torchrun's verdict on its workers: 0 when every worker exited 0, non-zero (1) when any
failed, in which case torchrun stops the others (``--max-restarts=0``).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Sequence, Set


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


# --------------------------------------------------------------------------------------------------
# torchrun with stop requests forwarded to its workers
# --------------------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Signals torchrun itself still handles (stop its workers, exit non-zero): the interactive ones.
TORCHRUN_HANDLED = "SIGINT,SIGHUP,SIGQUIT"


def _prepare_torchrun() -> None:
    """In torchrun's process before it starts: a stop request delivered to every process of the job
    step must neither kill torchrun (SIGUSR1's default) nor make it stop its workers (SIGTERM). Should
    this launcher die, torchrun gets SIGINT and stops its workers as on Ctrl-C (Linux)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG


def catches_signal(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` now (Linux ``/proc``)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration):  # gone
        return False
    return bool(caught >> (signum - 1) & 1)


def forward_to_workers(torchrun_pid: int, signum: int, delivered: Set[int]) -> None:
    """Send ``signum`` once to each of torchrun's workers (its children) that handles it by now.

    A worker that does not handle it yet (still importing: it inherited torchrun's "ignore") is
    skipped and tried again on the next call; ``delivered`` holds the pids already signalled, so a
    worker never gets a second copy (Python restores the default action, death, at interpreter exit).
    """
    import psutil

    try:
        workers = psutil.Process(torchrun_pid).children()
    except psutil.NoSuchProcess:
        return
    for worker in workers:
        if worker.pid not in delivered and catches_signal(worker.pid, signum):
            try:
                worker.send_signal(signum)
                delivered.add(worker.pid)
            except psutil.NoSuchProcess:
                pass


def run_torchrun(torchrun_args: Sequence[str]) -> int:
    """Run ``torchrun <torchrun_args>`` and return its exit status (128 + N if it died from signal N).

    The first SIGTERM or SIGUSR1 sent to this process is forwarded to every worker, once each, as soon
    as the worker handles it (the trainer installs its handler first thing). Later ones add nothing:
    the request stands. SIGINT is left to torchrun (same process group).
    """
    requested: List[int] = []

    def on_stop(signum, frame):
        requested.append(signum)

    env = {**os.environ, "TORCHELASTIC_SIGNALS_TO_HANDLE": TORCHRUN_HANDLED, "PET_SIGNALS_TO_HANDLE": TORCHRUN_HANDLED}
    previous = {sig: signal.signal(sig, on_stop) for sig in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    delivered: Set[int] = set()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args], env=env,
                                preexec_fn=_prepare_torchrun)
        while proc.poll() is None:
            if requested:
                forward_to_workers(proc.pid, requested[0], delivered)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
