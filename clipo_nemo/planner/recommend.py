"""Named model shapes and a search over layouts that fit a per-GPU memory budget.

Shapes are those of the public Hugging Face ``config.json`` files of each model.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional

from clipo_nemo.config import ClipoConfig, ModelConfig, max_sequence_length
from clipo_nemo.planner.plan import HEADROOM, MemoryPlan, plan_memory

_QWEN = dict(add_qkv_bias=True, rotary_base=1_000_000.0, norm_epsilon=1e-6, max_position_embeddings=32768,
             params_dtype="bfloat16")
MODEL_PRESETS: Dict[str, ModelConfig] = {
    "qwen2.5-3b": ModelConfig(num_layers=36, hidden_size=2048, ffn_hidden_size=11008, num_attention_heads=16,
                              num_query_groups=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN),
    "qwen2.5-7b": ModelConfig(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                              num_query_groups=4, vocab_size=152064, **_QWEN),
    "qwen2.5-32b": ModelConfig(num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40,
                               num_query_groups=8, vocab_size=152064, **_QWEN),
    "llama3-70b": ModelConfig(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                              num_query_groups=8, vocab_size=128256, rotary_base=500_000.0, rope_scaling=True,
                              rope_scaling_factor=8.0, norm_epsilon=1e-5, max_position_embeddings=131072,
                              params_dtype="bfloat16"),
}
# (model preset, GPU counts) the CLI recommends layouts for
RECOMMENDATION_TARGETS = (("qwen2.5-3b", (8,)), ("qwen2.5-7b", (8,)), ("qwen2.5-32b", (16, 32)),
                          ("llama3-70b", (32, 64)))
GPUS_PER_NODE = 8  # TP stays inside a node (NVLink)
KV_BUDGETS_GIB = (32.0, 24.0, 16.0, 8.0, 4.0)
MICRO_BATCH_ROWS = (8, 4, 2, 1)  # token budgets searched: this many longest rows
# Relative step-time factors used only to rank layouts that fit (a heuristic, not a measurement):
# full recompute re-runs the forward (~1/3 more compute), selective re-runs core attention only.
RECOMPUTE_COST = {"none": 1.0, "selective": 1.03, "full": 1.33}
TP_COST_PER_DOUBLING = 0.06  # TP all-reduces on NVLink
OFFLOAD_COST = 0.02  # reference weights copied host <-> GPU each step


@dataclass
class Recommendation:
    """The best layout found for one model on one GPU count (or None when nothing fits)."""

    model: str
    world_size: int
    plan: Optional[MemoryPlan]
    relative_cost: float = 0.0

    @property
    def needs_pipeline_rollout(self) -> bool:
        """PP > 1: the rollout engine generates pipelined (``clipo_nemo.rollout.pipeline``), whose stages
        take turns on every decode step (a bubble of 1 - 1/PP; 52-56% at PP = 2 in ``benchmarks/rollout_pp.py``)."""
        return self.plan is not None and self.plan.layout.pp > 1


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(base: ClipoConfig, model: ModelConfig, world_size: int) -> Iterator[ClipoConfig]:
    """``base``'s run settings with ``model``, over TP (1, 2, 4, 8), PP, recompute, reference
    offload, sequence parallel, micro-batch token budgets and KV budgets (every combination megatron
    can build)."""
    seq_len = max_sequence_length(base)
    for tp in (1, 2, 4, 8):
        if tp > min(GPUS_PER_NODE, world_size) or model.num_query_groups % tp or model.num_attention_heads % tp:
            continue
        for pp in _divisors(model.num_layers):
            if world_size % (tp * pp) or (base.trainer.prompts_per_step % (world_size // (tp * pp))):
                continue
            for recompute, offload, sequence_parallel, rows, kv in itertools.product(
                    ("none", "selective", "full"), (False, True), (False, True) if tp > 1 else (False,),
                    MICRO_BATCH_ROWS, KV_BUDGETS_GIB):
                yield replace(
                    base, model=replace(model, recompute=recompute, recompute_num_layers=1),
                    parallel=replace(base.parallel, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                     context_parallel_size=1, sequence_parallel=sequence_parallel,
                                     max_tokens_per_micro_batch=rows * seq_len),
                    actor=replace(base.actor, reference_offload=offload),
                    rollout=replace(base.rollout, kv_cache_gb=kv, max_batch_size=None))


def relative_cost(plan: MemoryPlan, rows_per_micro_batch: int) -> float:
    """Heuristic step time relative to TP1/PP1/no recompute: recompute, TP communication, the 1F1B
    bubble (PP-1 micro-batches idle), reference offload; larger micro-batches and KV chunks a little
    cheaper (GEMM efficiency, fewer decode passes)."""
    layout = plan.layout
    cost = RECOMPUTE_COST[layout.recompute] * (1 + TP_COST_PER_DOUBLING * (layout.tp.bit_length() - 1))
    cost *= 1 + (layout.pp - 1) / 8
    cost += OFFLOAD_COST if layout.reference == "offloaded" else 0.0
    cost *= 1 + 0.01 * (8 - rows_per_micro_batch) + 2.0 / max(layout.generation_rows, 1)
    return cost


def recommend_layout(base: ClipoConfig, model_name: str, world_size: int, gpu_memory_gib: float, *,
                     flash_attention: bool = True) -> Recommendation:
    """The cheapest layout (by :func:`relative_cost`) whose plan fits :data:`HEADROOM` of
    ``gpu_memory_gib``; layouts without pipeline stages (PP = 1: no generation bubble) rank first.
    ``flash_attention=False`` plans megatron's local attention (GPUs without Transformer Engine)."""
    model = MODEL_PRESETS[model_name]
    seq_len = max_sequence_length(base)
    best, best_key = Recommendation(model_name, world_size, None), None
    for cfg in candidate_configs(base, model, world_size):
        plan = plan_memory(cfg, world_size, gpu_memory_gib, flash_attention=flash_attention)
        if plan.total_bytes > HEADROOM * plan.budget_bytes:
            continue
        cost = relative_cost(plan, cfg.parallel.max_tokens_per_micro_batch // seq_len)
        key = (plan.layout.pp > 1, cost)
        if best_key is None or key < best_key:
            best, best_key = Recommendation(model_name, world_size, plan, cost), key
    return best


def recommendations(base: ClipoConfig, gpu_memory_gib: float, *, flash_attention: bool = True) -> List[Recommendation]:
    """:func:`recommend_layout` for every (model, GPU count) of :data:`RECOMMENDATION_TARGETS`."""
    return [recommend_layout(base, name, world, gpu_memory_gib, flash_attention=flash_attention)
            for name, worlds in RECOMMENDATION_TARGETS for world in worlds]
