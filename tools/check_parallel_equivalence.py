#!/usr/bin/env python
"""Check that parallel layouts compute the same CLIPO step as a single process.

Samples 4 responses to each of 3 fixed prompts with the rollout engine (same seeds), then runs one
GRPO+CLIPO learning step (old log-probs + pooled hidden states, head embeddings, contrastive losses
and rewards, advantages, policy loss, gradients, updated policy and head weights) on a tiny fp32
model under a single process and under each layout (by default TP2, PP2, TP2 x PP2, DP2, DP2 with
groups split, TP2 x DP2, TP2 with the column-parallel head), and prints the max absolute difference
per quantity and layout; for ``generated_tokens`` the number of token positions that differ (the
generated tokens must be identical). Last line: ``max_abs_diff: <number> over <k> layouts``; the exit
status is 1 when it is above ``--tol``.

    python tools/check_parallel_equivalence.py                       # every default layout that fits
    python tools/check_parallel_equivalence.py --layouts tp2,pp2
    python tools/check_parallel_equivalence.py --layouts "tp=2,pp=2,dp=2" --config my_model.yaml

``--config`` takes a YAML file with ``model:`` / ``parallel:`` / ``contrastive:`` keys (the schema in
``clipo_nemo/config.py``) to check your own model's shapes; the optimizer is always set to one plain
SGD step so that gradients can be compared. On a GPU machine layouts use NCCL, one GPU per process.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from clipo_nemo.algorithms.checks import nan_max  # noqa: E402
from clipo_nemo.trainer.equivalence import (  # noqa: E402
    DEFAULT_LAYOUTS, compare, parse_layout, run, tiny_check_config)


def load_config(path):
    from omegaconf import OmegaConf

    cfg = tiny_check_config()
    if path:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.load(path))
        cfg = OmegaConf.to_object(merged)
        cfg.actor.optimizer, cfg.actor.weight_decay, cfg.actor.ppo_epochs, cfg.actor.num_mini_batches = "sgd", 0.0, 1, 1
        cfg.actor.use_distributed_optimizer = False  # megatron's distributed optimizer is Adam-only
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=None,
                        help="semicolon-separated layouts: names (" + ", ".join(l.name for l in DEFAULT_LAYOUTS)
                        + ") or tp=N,pp=N,dp=N[,split][,column]; default: every default layout that fits")
    parser.add_argument("--config", default=None, help="YAML overriding the tiny model/parallel/contrastive config")
    parser.add_argument("--tol", type=float, default=1e-5, help="max absolute difference allowed (fp32: 1e-5)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per layout before its ranks are killed")
    args = parser.parse_args()

    cfg = load_config(args.config)
    if args.layouts:
        specs = args.layouts.split(";") if ";" in args.layouts or "=" in args.layouts else args.layouts.split(",")
        layouts = [parse_layout(s) for s in specs]
    else:
        capacity = torch.cuda.device_count() if torch.cuda.is_available() else max(os.cpu_count() or 1, 4)
        layouts = [l for l in DEFAULT_LAYOUTS if l.world_size <= capacity]
    with tempfile.TemporaryDirectory(prefix="clipo_equiv_") as work_dir:
        single, results = run(cfg, layouts, work_dir, timeout_s=args.timeout)
    worst = 0.0
    quantities = list(compare(single, single))
    print(f"\n{'quantity':<22}" + "".join(f"{name:>18}" for name in results))
    table = {name: compare(single, values) for name, values in results.items()}
    for quantity in quantities:
        print(f"{quantity:<22}" + "".join(f"{table[name][quantity]:>18.3e}" for name in results))
    for diffs in table.values():
        worst = nan_max(diffs.values(), worst)
    print(f"max_abs_diff: {worst:.3e} over {len(results)} layouts")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
