"""Worker processes that verify a batch in parallel, each check under a hard time limit, in order.

sympy can hang (or eat memory) on adversarial answers, and a signal-based timeout inside the same
process is not reliable against C-level loops. So every check runs in a worker process; the parent
watches each worker's progress and, when one check exceeds ``timeout_s``, kills that worker, marks
the check ``timeout``, starts a replacement and hands the rest of its chunk to the queue again.
A worker that dies (segfault, out of memory) gives its current check the ``error`` reason the same
way. Results come back in request order whatever the workers' finishing order.

Workers are fresh interpreters (``python -c``), not ``multiprocessing`` children: they never inherit
the trainer's CUDA or thread state, and starting one never re-imports the caller's main script (which
``spawn``/``forkserver`` do). A worker announces itself once math-verify is imported, and only then
gets work, so its import time never counts against a check's time limit.
"""
from __future__ import annotations

import math
import os
import resource
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Deque, List, Optional, Sequence

from clipo_nemo.verifiers.registry import VerifyRequest, VerifyResult, check_request_valid, run_verifier

_READY = "ready"
# Stop requests are the trainer's: a scheduler may signal every process of the job, a terminal's Ctrl-C
# reaches the whole process group, and a worker killed mid-check would give a response reward 0 (the
# trainer finishes and saves the step it is in). So a worker runs in its own session (a Ctrl-C to the
# trainer's process group does not reach it), ignores stop signals from its first statement (before
# the slow imports: one sent to every process of a job during start-up does not kill it either), and
# ends when the trainer closes the pool or goes away (EOF in worker_main).
_WORKER_COMMAND = ("import signal, sys; [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT, "
                   "signal.SIGUSR1)]; from clipo_nemo.verifiers.pool import worker_main; "
                   "worker_main(int(sys.argv[1]), int(sys.argv[2]))")


def worker_main(fd: int, max_memory_mb: int) -> None:
    """A worker's whole life (started by :data:`_WORKER_COMMAND`, stop signals already ignored): announce
    readiness, then judge chunks of ``(position, request)`` until ``None`` arrives, sending one
    ``(position, result)`` per check as soon as it is known."""
    conn = Connection(fd)
    if max_memory_mb > 0:
        limit = max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(_READY)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent is gone
            return
        if chunk is None:
            return
        for position, request in chunk:
            try:
                result = run_verifier(request)
            except BaseException as exc:  # noqa: BLE001 - a bad response must never stop the batch
                result = VerifyResult(0.0, "error", None, f"{type(exc).__name__}: {exc}"[:200])
            conn.send((position, result))


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    ready: bool = False  # math-verify imported; may take work
    pending: Deque[int] = field(default_factory=deque)  # positions sent and not yet answered
    progress_at: float = 0.0  # when the check now running started (last answer or chunk sent)

def default_num_workers() -> int:
    """This process's share of the CPUs it may run on: the CPUs divided by the processes a launcher
    started on this machine (``LOCAL_WORLD_SIZE``, set by torchrun; 1 without one), at least 1. Eight
    ranks on a 64-CPU node get 8 workers each, not 64 each."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={local_ranks} must be >= 1")
    return max(1, len(os.sched_getaffinity(0)) // local_ranks)


class VerifierPool:
    """A reusable pool; ``verify`` may be called once per training step. Close it (or use ``with``).

    Args:
        num_workers: worker processes; 0 means :func:`default_num_workers` (this rank's share of the CPUs).
        timeout_s: hard limit for one check, in seconds.
        max_memory_mb: address-space limit per worker (0 = none), so a runaway sympy expression
            fails that one check instead of exhausting the machine.
        chunk_size: most checks sent to a worker at once (fewer near the end of a batch).
    """

    def __init__(self, num_workers: int = 0, timeout_s: float = 5.0, max_memory_mb: int = 4096, chunk_size: int = 32):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if num_workers < 0 or chunk_size < 1:
            raise ValueError(f"num_workers must be >= 0 and chunk_size >= 1, got {num_workers}, {chunk_size}")
        self.num_workers = num_workers or default_num_workers()
        self.timeout_s = timeout_s
        self.max_memory_mb = max_memory_mb
        self.chunk_size = chunk_size
        self._workers: List[_Worker] = [self._start_worker() for _ in range(self.num_workers)]

    def _start_worker(self) -> _Worker:
        parent_socket, child_socket = socket.socketpair()
        child_fd = child_socket.fileno()
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND, str(child_fd), str(self.max_memory_mb)],
            pass_fds=(child_fd,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outside the trainer's process group: a terminal's Ctrl-C never reaches it
        )
        child_socket.close()  # the parent keeps only its end, so it sees EOF when the worker dies
        return _Worker(process, Connection(parent_socket.detach()))

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.wait()
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def verify(self, requests: Sequence[VerifyRequest]) -> List[VerifyResult]:
        """Judge every request; ``result[i]`` belongs to ``requests[i]``. Never raises for a bad response."""
        if not self._workers:
            raise RuntimeError("VerifierPool is closed")
        for position, request in enumerate(requests):
            check_request_valid(request, position)
        results: List[Optional[VerifyResult]] = [None] * len(requests)
        queue: Deque[int] = deque(range(len(requests)))
        remaining = len(requests)
        while remaining:
            self._dispatch(queue, requests)
            watched = [worker for worker in self._workers if worker.pending or not worker.ready]
            deadlines = [worker.progress_at + self.timeout_s for worker in watched if worker.pending]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = wait([worker.conn for worker in watched], timeout=wait_s)
            for worker in [worker for worker in watched if worker.conn in ready]:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    if not worker.ready:
                        raise RuntimeError(
                            f"a verifier worker exited while starting (exit code {worker.process.wait()}); "
                            "its stderr above says why"
                        ) from None
                    remaining -= self._fail_current(worker, results, queue, "error")
                    continue
                if message == _READY:
                    worker.ready = True
                    continue
                position, result = message
                results[position] = result
                worker.pending.popleft()
                worker.progress_at = time.monotonic()
                remaining -= 1
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.pending and now - worker.progress_at > self.timeout_s:
                    remaining -= self._fail_current(worker, results, queue, "timeout")
        return results  # type: ignore[return-value]  # every slot is filled once remaining == 0

    def _dispatch(self, queue: Deque[int], requests: Sequence[VerifyRequest]) -> None:
        """Send a chunk to every ready, idle worker; chunks shrink near the end so workers finish together."""
        for worker in list(self._workers):
            if worker.pending or not worker.ready or not queue:
                continue
            size = max(1, min(self.chunk_size, math.ceil(len(queue) / (2 * len(self._workers)))))
            chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
            try:
                worker.conn.send([(position, requests[position]) for position in chunk])
            except OSError:  # the worker died while idle: retry the chunk elsewhere
                queue.extendleft(reversed(chunk))
                self._replace(worker)
                continue
            worker.pending.extend(chunk)
            worker.progress_at = time.monotonic()

    def _fail_current(self, worker: _Worker, results: List[Optional[VerifyResult]], queue: Deque[int], reason: str) -> int:
        """Give the worker's current check ``reason``, requeue the rest of its chunk, replace it.

        Returns how many checks this finished (1).
        """
        position = worker.pending.popleft()
        results[position] = VerifyResult(0.0, reason, None)
        queue.extendleft(reversed(worker.pending))
        worker.pending.clear()
        self._replace(worker)
        return 1

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            self.close()
