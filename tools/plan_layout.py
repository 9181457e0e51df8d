#!/usr/bin/env python
"""Per-GPU memory plan of a config, and recommended layouts for Qwen2.5-3B/7B/32B and Llama-3-70B.

    python tools/plan_layout.py --config-name=track2 [key=value ...] [--gpu-mem-gib 80] [--world-size N]

Loads ``examples/conf/<name>.yaml`` (overrides as for the trainer), prints the breakdown per
component and phase (rollout, log-prob passes, update) for the worst pipeline stage, then a table
of recommended layouts, each planned with the config's run settings (batch, lengths, group size).
Last line: ``fits: yes (<total> GiB of <budget> GiB per GPU)`` or ``fits: no (...)``; exit status
0 or 1. ``--world-size`` defaults to max(8, TP x PP x CP); ``--gpu-mem-gib`` to
``trainer.gpu_memory_gib`` (80 if that is 0). Attention is planned as Transformer Engine's fused
attention (the NGC container) unless ``--local-attention``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipo_nemo.config import load_config  # noqa: E402
from clipo_nemo.console import add_log_level_argument, setup_console  # noqa: E402
from clipo_nemo.planner import GIB, plan_memory, recommendations  # noqa: E402


def _recommendation_table(cfg, budget_gib: float, flash_attention: bool) -> str:
    lines = [f"recommended layouts (run settings of this config, plans within 90% of {budget_gib:g} GiB):",
             f"{'model':<13}{'GPUs':>5}{'TP':>4}{'SP':>4}{'PP':>4}{'DP':>4}{'tokens/mb':>11}{'recompute':>11}"
             f"{'KV GiB':>8}{'ref':>11}{'GiB/GPU':>9}  note"]
    for rec in recommendations(cfg, budget_gib, flash_attention=flash_attention):
        if rec.plan is None:
            lines.append(f"{rec.model:<13}{rec.world_size:>5}  no layout fits")
            continue
        lay = rec.plan.layout
        note = "PP > 1: generation pipelined (decode bubble 1 - 1/PP)" if rec.needs_pipeline_rollout else ""
        lines.append(f"{rec.model:<13}{rec.world_size:>5}{lay.tp:>4}{'yes' if lay.sequence_parallel else 'no':>4}"
                     f"{lay.pp:>4}{lay.dp:>4}"
                     f"{lay.tokens_per_micro_batch:>11}{lay.recompute:>11}{lay.kv_cache_gib:>8g}"
                     f"{lay.reference:>11}{rec.plan.total_bytes / GIB:>9.1f}  {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-name", required=True, help="a YAML of examples/conf (without .yaml)")
    parser.add_argument("--gpu-mem-gib", type=float, default=None, help="per-GPU memory budget (GiB)")
    parser.add_argument("--world-size", type=int, default=None, help="GPUs of the run")
    parser.add_argument("--no-recommendations", action="store_true", help="only the config's own plan")
    parser.add_argument("--local-attention", action="store_true",
                        help="plan for megatron's local (unfused) attention: GPUs without Transformer Engine")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    setup_console(args.log_level)

    cfg = load_config(ROOT / "examples" / "conf" / f"{args.config_name}.yaml", args.overrides)
    par = cfg.parallel
    world = args.world_size or max(8, par.tensor_parallel_size * par.pipeline_parallel_size * par.context_parallel_size)
    budget = args.gpu_mem_gib or cfg.trainer.gpu_memory_gib or 80.0
    try:
        plan = plan_memory(cfg, world, budget, flash_attention=not args.local_attention)
    except ValueError as error:  # a layout that cannot be planned at all (world size, KV budget)
        print(f"fits: no ({error})")
        return 1
    print(plan.table())
    if not args.no_recommendations:
        print()
        print(_recommendation_table(cfg, budget, flash_attention=not args.local_attention))
    print(plan.verdict())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
