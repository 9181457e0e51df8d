"""The tiny GRPO+CLIPO run end to end on CPU: single process, TP=2, DP=2, resume, signals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Small enough for CI: 8 prompts x 4 responses per step.
FAST = ["trainer.prompts_per_step=8", "rollout.n=4", "evaluation.every_steps=2", "evaluation.k=1",
        "parallel.micro_batch_size=8", "actor.num_mini_batches=2", "contrastive.warmup_steps=1"]
REQUIRED = {"step", "reward_mean", "contrastive_loss", "pos_pair_cos", "step_time_s"}


def _train(run_dir, *overrides, nproc=1, timeout=600, wait=True):
    args = ["examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={run_dir}", *FAST, *overrides]
    if nproc > 1:
        from clipo_nemo.parallel.launcher import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_metrics_events_plots_and_summary(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "trainer.max_steps=3", "trainer.save_every_steps=2")
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(REQUIRED <= set(r) for r in rows)
    assert rows[0]["policy_updated"] == 0.0 and rows[1]["policy_updated"] == 1.0  # one warm-up step
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    # Validation metrics are named once per benchmark (file stem): the clean and the perturbed held-out split.
    val_keys = {"val/heldout/pass@1", "val/heldout_perturbed/pass@1", "val/pass@1_mean"}
    assert val_keys <= set(rows[0]) and val_keys <= set(rows[1]) and not any(k.startswith("val/val") for k in rows[0])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "training_curves.png").stat().st_size > 0 and (run / "embeddings.png").stat().st_size > 0
    assert "clipo-nemo run completed" in proc.stdout and "reward_mean" in proc.stdout
    assert "val/heldout/pass@1" in proc.stdout and "val/heldout_perturbed/pass@1" in proc.stdout  # the summary

    # The trained policy scored by tools/evaluate.py from its checkpoint: by default on the run's own
    # held-out splits (the generated task in <run>/data), with no --data-dir or --benchmarks.
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(run), "--k", "2", "--workers", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 3" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    # tiny.yaml's task: max and min of 0..9 (2 x 100 problems), 20% held out, also reworded (perturbed)
    assert set(report["benchmarks"]) == {"heldout", "heldout_perturbed"}
    assert report["benchmarks"]["heldout"]["n"] == 40 and 0.0 <= report["benchmarks"]["heldout"]["pass@1"] <= 100.0
    assert report["benchmarks"]["heldout_perturbed"]["n"] == 3 * 40  # three rewordings of each held-out problem

    # A benchmark none of whose prompts fits data.max_prompt_length (as gsm8k for the tiny tokenizer): said
    # so, naming the flag, with no traceback.
    long = pd.read_parquet(run / "data" / "heldout.parquet")
    long["prompt"] = [[{**m, "content": " ".join([m["content"]] * 20)} for m in chat] for chat in long["prompt"]]
    long.to_parquet(tmp_path / "long.parquet")
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(run), "--workers", "1",
                           "--data-dir", str(tmp_path), "--benchmarks", "long", "--out", str(tmp_path / "e2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "nothing to evaluate" in proc.stderr and "--benchmarks NAME" in proc.stderr


@pytest.mark.parametrize("layout", [["parallel.tensor_parallel_size=2"], ["trainer.prompts_per_step=8"]],
                         ids=["tp2", "dp2"])
def test_tiny_run_on_two_processes(tmp_path, layout):
    run = tmp_path / "run"
    _train(run, "trainer.max_steps=2", "evaluation.every_steps=0", *layout, nproc=2)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1] and all(REQUIRED <= set(r) for r in rows)


def test_resume_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["evaluation.every_steps=0", "trainer.save_every_steps=2"]
    _train(straight, "trainer.max_steps=4", *common)
    _train(resumed, "trainer.max_steps=2", *common)
    proc = _train(resumed, "trainer.max_steps=4", *common)
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    # Each process logs its data counts (data/<split>/...) in its first row: step 0, and 2 after the resume.
    assert "data/train/prompts" in a[0] and "data/train/prompts" in b[2] and "data/train/prompts" not in a[2]
    skip = lambda key: key.startswith(("time/", "data/")) or key == "step_time_s"  # noqa: E731
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if not skip(k)} == {k: v for k, v in rb.items() if not skip(k)}
    (step_a, policy_a, head_a), (step_b, policy_b, head_b) = _final_weights(straight), _final_weights(resumed)
    assert step_a == step_b == 4
    for name in policy_a:
        assert torch.equal(policy_a[name], policy_b[name]), name
    for name in head_a:
        assert torch.equal(head_a[name], head_b[name]), name


def _load_weights(rank, world_size, run_dir):
    """Build the tiny actor and head, load the run's latest checkpoint, return full weights."""
    from clipo_nemo.config import load_config
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.trainer.step import ClipoHead

    cfg = load_config(Path(run_dir) / "config.yaml")  # what the run itself used
    init_parallel_state(cfg.parallel)
    try:
        actor, head = Actor.build(cfg), ClipoHead.build(cfg)
        state = load_checkpoint(str(run_dir), actor, head)
        return state["step"], gather_full_state_dict(actor.module, cfg.model.vocab_size), head.head.full_state_dict()
    finally:
        destroy_parallel_state()


def _final_weights(run_dir):
    from clipo_nemo.parallel.launcher import run_distributed

    return run_distributed(_load_weights, 1, args=(str(run_dir),), timeout_s=300)[0]


def test_sigterm_saves_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "trainer.max_steps=1000", "evaluation.every_steps=0", "trainer.save_every_steps=0", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and _metrics(run)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal" in out
    steps = len(_metrics(run))
    from clipo_nemo.checkpoint.recovery import latest_checkpoint

    assert latest_checkpoint(str(run)).name == f"step_{steps}"


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    run = tmp_path / "run"
    # An absurd learning rate makes the first update blow the weights up; every later step is non-finite.
    args = ["examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={run}", *FAST,
            "actor.lr=1e12", "trainer.max_consecutive_nonfinite=2", "trainer.max_steps=50", "evaluation.every_steps=0",
            "contrastive.warmup_steps=0", "trainer.save_every_steps=0"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "steps in a row with a non-finite loss or gradient" in proc.stdout
    rows = _metrics(run)
    assert 2 <= len(rows) < 50 and rows[-1]["nonfinite_steps_in_a_row"] == 2.0
    assert rows[-1]["update_skipped"] == 1.0
    assert not (run / "checkpoints" / "latest").exists()  # the diverged weights were not saved


def test_dapo_with_dynamic_sampling_and_without_clipo(tmp_path):
    run = tmp_path / "run"
    _train(run, "trainer.max_steps=2", "evaluation.every_steps=0", "algorithm.policy_loss=dapo",
           "algorithm.clip_ratio_high=0.28", "algorithm.kl_loss_coef=0", "algorithm.dynamic_sampling=true",
           "algorithm.dynamic_sampling_max_batches=3", "contrastive.enabled=false")
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1]
    # A fresh policy is nearly always wrong, so most groups have equal rewards: more prompts are drawn.
    assert rows[0]["dynamic_sampling/rollout_batches"] > 1 and rows[0]["dynamic_sampling/zero_variance_groups"] > 0
    assert "contrastive_loss" not in rows[0] and "kl_loss" not in rows[1] and "pg_loss" in rows[1]
