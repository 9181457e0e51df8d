"""Time limits (issue 20): saves on elapsed time, and a stop request during a step's rollouts abandons
the step (nothing trained on it) and saves the last completed one.

Oracles: the checkpoints on disk and their ``trainer_state.pt`` (step, sampler position) against the
steps the run logged; the sampler's position after one step, from a fresh ``EpochSampler``.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from clipo_nemo.parallel.launcher import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path, *overrides):
    from clipo_nemo.config import load_config

    return load_config(ROOT / "examples" / "conf" / "tiny.yaml", [
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.prompts_per_step=8", "rollout.n=4",
        "parallel.micro_batch_size=8", "actor.num_mini_batches=2", "evaluation.every_steps=0",
        "trainer.plot_embeddings=false", "trainer.keep_last=5", *overrides])


def _train_signalled_in_rollouts_of(rank, world, cfg, signalled_step):
    """train(cfg), with SIGUSR1 delivered while step ``signalled_step`` generates its rollouts."""
    from clipo_nemo.trainer import loop

    original, calls = loop.generate, []

    def generate_then_signal(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == signalled_step + 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    loop.generate = generate_then_signal
    result = loop.train(cfg)
    return {"status": result["status"], "step": result["step"], "logged": len(result["history"])}


def test_a_stop_during_rollouts_abandons_the_step_and_saves_the_last_completed_one(tmp_path):
    from clipo_nemo.data.sampler import EpochSampler

    cfg = _tiny(tmp_path, "trainer.max_steps=5", "trainer.save_every_steps=0")
    [result] = run_distributed(_train_signalled_in_rollouts_of, 1, args=(cfg, 2), timeout_s=300)
    assert result["status"] == "stopped by signal (step 2 abandoned during its rollouts)", result
    assert result["step"] == 2 and result["logged"] == 2  # steps 0 and 1 trained and logged, step 2 not
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_2"
    state = torch.load(checkpoints / "step_2" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert [line["step"] for line in lines] == [0, 1]
    # the abandoned step's prompts are drawn again after a resume: the sampler stands after two batches
    sampler = EpochSampler(state["sampler"]["num_items"], cfg.trainer.prompts_per_step, cfg.data.seed,
                           cfg.data.shuffle)
    sampler.next_batch()
    sampler.next_batch()
    assert state["sampler"] == sampler.state_dict()


def _train_noting(rank, world, cfg):
    """train(cfg) under a 1 ms stop warning, recording the run's notes."""
    from clipo_nemo.trainer import loop, metrics

    notes, original = [], metrics.MetricsLogger.note
    metrics.MetricsLogger.note = lambda logger, text: (notes.append(text), original(logger, text))[1]
    os.environ[loop.STOP_WARNING_ENV] = "0.001"
    result = loop.train(cfg)
    return {"status": result["status"], "step": result["step"]}, notes


def test_save_every_minutes_saves_on_elapsed_time_and_a_short_warning_is_noted(tmp_path):
    cfg = _tiny(tmp_path, "trainer.max_steps=3", "trainer.save_every_steps=0", "trainer.save_every_minutes=1e-9")
    [(result, notes)] = run_distributed(_train_noting, 1, args=(cfg,), timeout_s=300)
    assert result == {"status": "completed", "step": 3}
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_1", "step_2", "step_3"]
    assert any(n.startswith("CLIPO_STOP_WARNING_S=0.001 s") and "raise --signal" in n for n in notes), notes


def test_the_slurm_scripts_tell_the_trainer_their_warning_time():
    import re

    for script in sorted((ROOT / "examples" / "slurm").glob("*.sbatch")):
        text = script.read_text()
        signal_s = re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1)
        assert re.search(rf"^export CLIPO_STOP_WARNING_S={signal_s}\b", text, re.M), script.name
