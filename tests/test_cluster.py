"""Cluster behaviour on CPU: stop requests through the launcher, a dead rank, a hung rank, verifier sizing.

The multi-process runs are the tiny config on 2 gloo ranks under ``python -m clipo_nemo.parallel.launcher``
(torchrun plus stop-request forwarding), the command ``examples/slurm/launch.sh`` runs on every node.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.prompts_per_step=8", "rollout.n=4", "parallel.micro_batch_size=8", "actor.num_mini_batches=2",
        "contrastive.warmup_steps=1", "evaluation.every_steps=0", "trainer.save_every_steps=0",
        "trainer.max_steps=1000", "parallel.timeout_s=60"]


def _launch(run_dir, log_dir):
    from clipo_nemo.parallel.launcher import free_port

    cmd = [sys.executable, "-m", "clipo_nemo.parallel.launcher", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=test", "--max-restarts=0",
           f"--log-dir={log_dir}", "--tee=3",
           "examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={run_dir}", *FAST]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_a_step(proc, run_dir, timeout_s=300):
    deadline = time.time() + timeout_s
    while not _metrics(run_dir):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run did not finish a step (exit {proc.poll()}):\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)


def _workers(launcher_pid):
    """The trainer processes: children of torchrun, the launcher's child."""
    (torchrun,) = psutil.Process(launcher_pid).children()
    return torchrun.children()


def test_sigterm_to_the_launcher_saves_and_the_job_exits_zero(tmp_path):
    """Item 13: torchrun alone answers SIGTERM with exit 1 although its workers saved and exited 0;
    through the launcher the job's status is the workers' (0) and the checkpoint is written."""
    run = tmp_path / "run"
    proc = _launch(run, tmp_path / "logs")
    _wait_for_a_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by signal" in out
    from clipo_nemo.checkpoint.recovery import latest_checkpoint

    assert latest_checkpoint(str(run)).name == f"step_{len(_metrics(run))}"


def test_a_dead_rank_ends_every_process_with_a_non_zero_status_and_per_rank_logs(tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = _launch(run, logs)
    _wait_for_a_step(proc, run)
    workers = _workers(proc.pid)
    assert sorted(w.environ()["RANK"] for w in workers) == ["0", "1"]
    victim = next(w for w in workers if w.environ()["RANK"] == "1")
    killed_at = time.monotonic()
    victim.kill()
    try:
        out, _ = proc.communicate(timeout=90)  # torchrun stops the survivor within its 30 s shutdown grace
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the launcher did not exit within 90 s of a rank's death")
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0, out[-3000:]
    survivors = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, f"still running {elapsed:.0f} s after rank 1 died: {survivors}"
    # Per-rank logs: torchrun's --log-dir holds one stdout/stderr pair per process.
    for local_rank in ("0", "1"):
        (rank_dir,) = logs.glob(f"*/attempt_0/{local_rank}")
        assert (rank_dir / "stdout.log").exists() and (rank_dir / "stderr.log").exists()
    assert "== clipo-nemo run" not in out  # rank 0 did not carry on to a summary


def _hung_peer(rank, world_size, timeout_s, meeting_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.parallel.state import init_parallel_state

    # The timeout bounds the rendezvous too: meet first, so a slow start on a loaded machine is not a hang.
    Path(meeting_dir, f"rank{rank}").touch()
    while len(list(Path(meeting_dir).iterdir())) < world_size:
        time.sleep(0.05)
    init_parallel_state(ParallelConfig(timeout_s=timeout_s))
    if rank == 1:  # alive but never joins: a hung rank
        time.sleep(5 * timeout_s)  # outlasts rank 0's two timed-out collectives
        return None
    waits = {}
    for name, group in (("data_parallel", parallel_state.get_data_parallel_group()), ("default", None)):
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            waits[name] = (time.monotonic() - start, None)
        except RuntimeError as exc:
            waits[name] = (time.monotonic() - start, str(exc)[:200])
    return waits


def test_parallel_timeout_s_bounds_the_wait_on_a_hung_rank(tmp_path):
    """Item 14: a collective waiting on a hung peer raises after parallel.timeout_s, on megatron's
    groups and on the default group (before, 600 s and megatron's 30 minutes)."""
    from clipo_nemo.parallel.launcher import run_distributed

    timeout_s = 3.0
    waits = run_distributed(_hung_peer, 2, args=(timeout_s, str(tmp_path)), timeout_s=180)[0]
    for name, (elapsed, error) in waits.items():
        assert error is not None, f"{name}: the all-reduce with a hung peer returned"
        assert 0.5 * timeout_s <= elapsed <= 4 * timeout_s, f"{name}: raised after {elapsed:.1f} s"


def test_parallel_timeout_s_must_be_positive():
    from clipo_nemo.config import ClipoConfig, ConfigError
    from clipo_nemo.validation import validate_config

    cfg = ClipoConfig()
    cfg.parallel.timeout_s = 0
    with pytest.raises(ConfigError, match="parallel.timeout_s=0"):
        validate_config(cfg)


def test_default_verifier_workers_are_this_ranks_share_of_the_cpus(monkeypatch):
    """Eight ranks on a 64-CPU node start 8 verifier workers each (before: 64 each)."""
    from clipo_nemo.verifiers import pool

    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert pool.default_num_workers() == 64
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert pool.default_num_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "128")
    assert pool.default_num_workers() == 1
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pool.VerifierPool(num_workers=0) as verifiers:
        assert len(verifiers._workers) == 2


def test_verifier_workers_ignore_stop_signals():
    """A stop request delivered to every process of the job must not kill a check in flight."""
    from clipo_nemo.verifiers.pool import VerifierPool
    from clipo_nemo.verifiers.registry import VerifyRequest

    with VerifierPool(num_workers=1, timeout_s=30) as verifiers:
        assert verifiers.verify([VerifyRequest("math", r"\boxed{2}", "2")])[0].reward == 1.0  # worker is up
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            os.kill(verifiers._workers[0].process.pid, sig)
        time.sleep(0.5)
        assert verifiers._workers[0].process.poll() is None
        assert verifiers.verify([VerifyRequest("math", r"\boxed{3}", "3")])[0].reason == "ok"


def test_the_package_refuses_an_old_megatron_core():
    """The import-time check (NGC NeMo 25.09 carries megatron-core 0.14)."""
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda name: '0.14.0' if name == 'megatron-core' else real(name); import clipo_nemo")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "needs megatron-core >= 0.16, found 0.14.0" in proc.stderr
    from clipo_nemo import check_megatron_core

    check_megatron_core("0.16.0rc0+nv25.12")  # an NGC-style build of 0.16 passes
    with pytest.raises(ImportError, match="not installed"):
        check_megatron_core(None)
