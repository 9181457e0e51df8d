"""The layout planner with ``rollout.engine=trtllm``: the engine's weights and KV cache next to the
trainer's memory (issue 18, point 4). Oracle: the Hugging Face tensor shapes of the model (the
conversion mapping) for the engine's weights, the config's GiB for its KV cache, and the megatron
engine's own plan for the trainer's components."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from clipo_nemo.config import load_config
from clipo_nemo.conversion.mapping import expected_hf_shapes
from clipo_nemo.planner import GIB, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def _plan(*overrides: str, world: int = 8):
    cfg = load_config(ROOT / "examples" / "conf" / "track2.yaml", list(overrides))
    return cfg, plan_memory(cfg, world, 80.0, on_gpu=True, flash_attention=True)


@pytest.mark.parametrize("sleep_weights", [True, False])
def test_the_plan_counts_the_engine_next_to_the_trainer(sleep_weights):
    cfg, native = _plan()
    _, engine = _plan("rollout.engine=trtllm", f"rollout.trtllm_sleep_weights={str(sleep_weights).lower()}")
    mp = cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size
    hf_parameters = sum(math.prod(shape) for shape in expected_hf_shapes(cfg.model).values())
    rollout = engine.phases["rollout"]
    assert rollout["engine_weights"] == pytest.approx(hf_parameters * 2 / mp, rel=0.01)  # bf16, sharded over TP x PP
    assert rollout["engine_kv_cache"] == cfg.rollout.trtllm_kv_cache_gb * GIB
    assert rollout["kv_cache"] == rollout["generation_logits"] == 0
    for name in ("weights", "gradients", "optimizer", "reference", "head"):  # the trainer's static state stays
        assert rollout[name] == native.phases["rollout"][name]
    for phase in ("logprobs", "update"):
        assert engine.phases[phase]["engine_kv_cache"] == 0
        assert engine.phases[phase]["engine_weights"] == (0 if sleep_weights else rollout["engine_weights"])
    assert any("rollout.engine=trtllm" in note for note in engine.notes)


def test_plan_layout_says_when_training_and_the_engine_do_not_fit():
    _, fits = _plan("rollout.engine=trtllm")
    _, too_big = _plan("rollout.engine=trtllm", "rollout.trtllm_kv_cache_gb=40")
    assert fits.fits and not too_big.fits and too_big.peak_phase == "rollout"
    assert "fits: no" in too_big.verdict()
