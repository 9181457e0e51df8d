"""Checkpoint save/load time and peak memory per rank at 1, 2 and 4 data-parallel processes.

The model is fixed (``--layers`` x ``--hidden``, fp32, AdamW with moments after one step); only the
number of data-parallel ranks changes. Every rank holds a full replica, so with megatron's fully
parallel save strategy (``trainer.parallel_save``, on by default) each of N ranks writes about 1/N
of the checkpoint; the baseline of the last line is the single process writing all of it.

Measured per rank through the project's own ``save_checkpoint`` / ``load_checkpoint`` (the run's
first save, which also writes the reference policy once, is not timed; the second save is):
``save_s`` (synchronous save: sharded write, RNG, manifest, meta.json, rename, ``latest``),
``async_block_s`` (the time ``save_checkpoint(asynchronous=True)`` keeps the trainer from training)
and ``async_total_s`` (until that save is published), ``load_s``, ``peak_rss_mb`` (the rank's peak
resident memory over the whole run), ``writer_peak_rss_mb`` (the largest writer process it forked).

Last line: ``save_time_4_over_1: <x>`` (slowest rank's ``save_s`` at 4 ranks / at 1 rank).
Usage: ``python benchmarks/checkpoint_scaling.py [--layers 6 --hidden 512 --dir /tmp]``.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

WORLD_SIZES = (1, 2, 4)


def _config(layers: int, hidden: int):
    from clipo_nemo.trainer.equivalence import tiny_check_config

    cfg = tiny_check_config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size = layers, hidden, 4 * hidden
    cfg.model.num_attention_heads, cfg.model.num_query_groups = 8, 8
    cfg.actor.optimizer, cfg.actor.lr, cfg.actor.weight_decay = "adamw", 1e-4, 0.0
    return cfg


def _rank(rank: int, world: int, cfg, run_dir: str):
    import torch

    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.checkpoint.save import save_checkpoint, wait_for_pending_save
    from clipo_nemo.trainer.step import ClipoHead

    torch.set_num_threads(1)
    init_parallel_state(cfg.parallel)
    try:
        actor, clipo = Actor.build(cfg), ClipoHead.build(cfg)
        actor.sync_reference()
        params = [p for p in actor.module.parameters() if p.requires_grad]
        for p in params:  # one AdamW step: the moments exist, as in any checkpoint after step 1
            p.grad = torch.full_like(p, 1e-3)
        actor.optimizer.step()
        state = {"step": 1}
        save_checkpoint(run_dir, 1, actor, clipo, state, keep_last=1)  # writes reference/ once
        start = time.perf_counter()
        save_checkpoint(run_dir, 2, actor, clipo, state, keep_last=1)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        save_checkpoint(run_dir, 3, actor, clipo, state, keep_last=1, asynchronous=True)
        async_block_s = time.perf_counter() - start
        wait_for_pending_save()
        async_total_s = time.perf_counter() - start
        start = time.perf_counter()
        load_checkpoint(run_dir, actor, clipo)
        load_s = time.perf_counter() - start
        checkpoint_mb = sum(f.stat().st_size for f in (Path(run_dir) / "checkpoints" / "step_3").rglob("*")
                            if f.is_file()) / 2**20
        return {"save_s": save_s, "async_block_s": async_block_s, "async_total_s": async_total_s, "load_s": load_s,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "writer_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "checkpoint_mb": checkpoint_mb, "params_m": sum(p.numel() for p in params) / 1e6}
    finally:
        destroy_parallel_state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from clipo_nemo.parallel.launcher import run_distributed

    slowest = {}
    for world in WORLD_SIZES:
        cfg = _config(args.layers, args.hidden)
        run_dir = tempfile.mkdtemp(prefix=f"ckpt_scaling_{world}_", dir=args.dir)  # DP = world (TP = PP = 1)
        try:
            ranks = run_distributed(_rank, world, args=(cfg, run_dir), timeout_s=600)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        if world == 1:
            print(f"model: {ranks[0]['params_m']:.1f}M parameters; checkpoint {ranks[0]['checkpoint_mb']:.0f} MB "
                  "(policy + AdamW moments + head; the reference is written once per run)")
            print(f"{'ranks':>5} {'rank':>4} {'save_s':>7} {'async_block_s':>13} {'async_total_s':>13} "
                  f"{'load_s':>7} {'peak_rss_mb':>11} {'writer_peak_rss_mb':>18}")
        for rank, r in enumerate(ranks):
            print(f"{world:>5} {rank:>4} {r['save_s']:>7.2f} {r['async_block_s']:>13.2f} {r['async_total_s']:>13.2f} "
                  f"{r['load_s']:>7.2f} {r['peak_rss_mb']:>11.0f} {r['writer_peak_rss_mb']:>18.0f}")
        slowest[world] = max(r["save_s"] for r in ranks)
    print(f"save_time_4_over_1: {slowest[4] / slowest[1]:.2f}")


if __name__ == "__main__":
    main()
