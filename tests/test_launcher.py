"""The multi-process harness: results in rank order, a failing rank's traceback, no leftover processes."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from clipo_nemo.parallel.launcher import DistributedRunError, run_distributed


def _rank_times_ten(rank: int, world_size: int) -> int:
    return rank * 10 + world_size


def _rank1_fails_rank0_hangs(rank: int, world_size: int, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        raise ValueError("boom from rank 1")
    time.sleep(600)


def _hang(rank: int, world_size: int, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def _assert_all_gone(pid_dir: Path, world_size: int) -> None:
    for rank in range(world_size):
        pid = int((pid_dir / f"{rank}.pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_times_ten, 2, timeout_s=60) == [2, 12]


def test_failing_rank_traceback_is_raised_and_others_are_killed(tmp_path):
    with pytest.raises(DistributedRunError) as err:
        run_distributed(_rank1_fails_rank0_hangs, 2, args=(str(tmp_path),), timeout_s=120)
    assert "rank 1 failed" in str(err.value)
    assert "ValueError: boom from rank 1" in str(err.value)
    _assert_all_gone(tmp_path, 2)


def test_hanging_ranks_time_out_and_are_killed(tmp_path):
    with pytest.raises(DistributedRunError, match=r"ranks \[0, 1\] did not finish within 8s"):
        run_distributed(_hang, 2, args=(str(tmp_path),), timeout_s=8)
    _assert_all_gone(tmp_path, 2)


def test_a_single_process_group_leaves_no_rendezvous_in_the_environment(monkeypatch):
    """Processes started after an in-process run (the trainer from a test, a tool) must not inherit a
    RANK/MASTER_PORT that points at this process's port: they would all try to listen on it."""
    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    init_parallel_state(ParallelConfig())
    try:
        import torch.distributed as dist

        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        assert not {"RANK", "MASTER_PORT"} & set(os.environ)
    finally:
        destroy_parallel_state()
