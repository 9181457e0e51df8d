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

Then ``save_time_4_over_1: <x>`` (slowest rank's ``save_s`` at 4 ranks / at 1 rank).

Bytes per rank (``--io-layers`` x ``--io-hidden``, KL off, a few hundred MB; every figure a ratio):

- ``resume_read_per_rank_over_checkpoint``: DP=4 ranks save, the checkpoint is evicted from the page
  cache (``posix_fadvise(DONTNEED)`` after ``fsync``), then all four resume together
  (``load_checkpoint``: verification of each rank's share, then the fully parallel load); the
  largest ``read_bytes`` of ``/proc/self/io`` over the ranks / the checkpoint's bytes. The sum over
  ranks is printed too: about 1 means the ranks read disjoint parts (a page two ranks need is read
  from disk once, by whichever asks first, so a max far below 1/DP with a sum of 1 would mean shared
  reads; the sum shows there are none to hide).
- ``checksum_bytes_rank0_over_checkpoint``: what rank 0 reads during that (synchronous) save / the
  checkpoint's bytes: the ``rchar`` of rank 0's trainer process (``/proc/self/io``), which includes
  its writer processes once they have been waited for (the kernel adds a reaped child's counts to
  its parent's): the checksums of its own shard files, of its small files at finalize, and the
  small metadata exchanges. The bytes of the manifest entries checksummed by rank 0 are printed as
  a cross-check.
- ``init_read_per_rank_over_model``: a converted checkpoint (``trainer.init_from`` format) of the
  same model is loaded at TP=2 x DP=2, one rank after another, each from a cold page cache; the
  largest ``read_bytes`` / the checkpoint's weight bytes.

These three are the last three lines. Usage: ``python benchmarks/checkpoint_scaling.py [--layers 6
--hidden 512 --io-layers 3 --io-hidden 1024 --dir /tmp] [--io-only]``.
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


def _stepped_actor(cfg):
    """The actor (its reference synced), the head, and the trained parameters after one AdamW step:
    the moments exist, as in any checkpoint after step 1."""
    import torch

    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.trainer.step import ClipoHead

    torch.set_num_threads(1)
    actor, clipo = Actor.build(cfg), ClipoHead.build(cfg)
    actor.sync_reference()
    params = [p for p in actor.module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    actor.optimizer.step()
    return actor, clipo, params


def _rank(rank: int, world: int, cfg, run_dir: str):
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.checkpoint.save import save_checkpoint, wait_for_pending_save
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    init_parallel_state(cfg.parallel)
    try:
        actor, clipo, params = _stepped_actor(cfg)
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


def timings(layers: int, hidden: int, base_dir) -> None:
    """Save/load times and peak memory at 1, 2 and 4 ranks (see the module docstring)."""
    from clipo_nemo.parallel.launcher import run_distributed

    slowest = {}
    for world in WORLD_SIZES:
        cfg = _config(layers, hidden)
        run_dir = tempfile.mkdtemp(prefix=f"ckpt_scaling_{world}_", dir=base_dir)  # DP = world (TP = PP = 1)
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


def _io_counters() -> dict:
    with open("/proc/self/io") as handle:
        return {line.split(":")[0]: int(line.split(":")[1]) for line in handle}


def evict_from_page_cache(directory: Path) -> int:
    """Drop ``directory``'s files from the page cache (so reads go to disk); returns their bytes."""
    total = 0
    for path in (p for p in directory.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        total += path.stat().st_size
    return total


def _io_config(layers: int, hidden: int, tp: int):
    cfg = _config(layers, hidden)
    cfg.algorithm.kl_loss_coef = 0.0  # no reference: the checkpoint is the policy, its moments and the head
    cfg.parallel.tensor_parallel_size = tp
    return cfg


def _io_save_resume_rank(rank: int, world: int, cfg, run_dir: str):
    import json

    import torch.distributed as dist

    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.checkpoint.save import save_checkpoint
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    init_parallel_state(cfg.parallel)
    try:
        actor, clipo, _ = _stepped_actor(cfg)
        before = _io_counters()
        final = save_checkpoint(run_dir, 1, actor, clipo, {"step": 1}, keep_last=1)
        save_rchar = _io_counters()["rchar"] - before["rchar"]
        manifest = json.loads((final / "manifest.json").read_text())["files"]
        own_entries = sum(e["size"] for e in manifest.values() if e["rank"] == rank)
        dist.barrier()
        checkpoint_bytes = evict_from_page_cache(final) if rank == 0 else 0
        dist.barrier()
        before = _io_counters()
        load_checkpoint(run_dir, actor, clipo)
        resume_read = _io_counters()["read_bytes"] - before["read_bytes"]
        return {"save_rchar": save_rchar, "own_entries": own_entries, "resume_read": resume_read,
                "checkpoint_bytes": checkpoint_bytes}
    finally:
        destroy_parallel_state()


def _io_convert_rank(rank: int, world: int, cfg, out_dir: str) -> int:
    """Write the model (TP=1) as a converted checkpoint; returns its weight bytes."""
    import torch

    from clipo_nemo.conversion.weights import WeightsWriter
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor

    torch.set_num_threads(1)
    init_parallel_state(cfg.parallel)
    try:
        full = gather_full_state_dict(Actor.build(cfg).module, cfg.model.vocab_size)
        with WeightsWriter(out_dir, cfg.model, "LlamaForCausalLM", {"benchmark": True},
                           shard_size_bytes=256 * 2**20) as writer:
            for name, tensor in full.items():
                writer.add(name, tensor)
        return sum(p.stat().st_size for p in (Path(out_dir) / "weights").glob("*.safetensors"))
    finally:
        destroy_parallel_state()


def _io_init_rank(rank: int, world: int, cfg, weights_dir: str) -> int:
    """Load the converted checkpoint at this layout, one rank at a time from a cold cache; bytes read."""
    import torch
    import torch.distributed as dist

    from clipo_nemo.conversion.weights import load_weights_into_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor

    torch.set_num_threads(1)
    init_parallel_state(cfg.parallel)
    try:
        actor = Actor.build(cfg)
        read = 0
        for turn in range(world):
            dist.barrier()
            if rank == turn:
                evict_from_page_cache(Path(weights_dir))
                before = _io_counters()["read_bytes"]
                load_weights_into_model(actor.module, weights_dir, cfg.model.vocab_size)
                read = _io_counters()["read_bytes"] - before
        dist.barrier()
        return read
    finally:
        destroy_parallel_state()


def io_figures(layers: int, hidden: int, base_dir) -> None:
    """Per-rank bytes read and checksummed (see the module docstring); prints the last three lines."""
    from clipo_nemo.parallel.launcher import run_distributed

    run_dir = tempfile.mkdtemp(prefix="ckpt_io_", dir=base_dir)
    try:
        ranks = run_distributed(_io_save_resume_rank, 4, args=(_io_config(layers, hidden, 1), run_dir), timeout_s=1200)
        total = ranks[0]["checkpoint_bytes"]
        converted = str(Path(run_dir) / "converted")
        model_bytes = run_distributed(_io_convert_rank, 1, args=(_io_config(layers, hidden, 1), converted),
                                      timeout_s=1200)[0]
        init_reads = run_distributed(_io_init_rank, 4, args=(_io_config(layers, hidden, 2), converted), timeout_s=1200)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"io model: {layers} layers x hidden {hidden}; checkpoint {total / 2**20:.0f} MB at DP=4, converted weights "
          f"{model_bytes / 2**20:.0f} MB")
    for rank, r in enumerate(ranks):
        print(f"rank {rank}: resume read_bytes {r['resume_read'] / 2**20:.1f} MB; save: rchar "
              f"{r['save_rchar'] / 2**20:.1f} MB (its manifest entries: {r['own_entries'] / 2**20:.1f} MB); "
              f"init_from (TP=2 x DP=2) read_bytes {init_reads[rank] / 2**20:.1f} MB")
    print(f"resume read_bytes summed over ranks / checkpoint: {sum(r['resume_read'] for r in ranks) / total:.2f}")
    print(f"resume_read_per_rank_over_checkpoint: {max(r['resume_read'] for r in ranks) / total:.3f}")
    print(f"checksum_bytes_rank0_over_checkpoint: {ranks[0]['save_rchar'] / total:.3f}")
    print(f"init_read_per_rank_over_model: {max(init_reads) / model_bytes:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--io-layers", type=int, default=3)
    parser.add_argument("--io-hidden", type=int, default=1024)
    parser.add_argument("--io-only", action="store_true", help="only the bytes-per-rank figures")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.io_only:
        timings(args.layers, args.hidden, args.dir)
    io_figures(args.io_layers, args.io_hidden, args.dir)


if __name__ == "__main__":
    main()
