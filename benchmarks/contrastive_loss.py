"""Grouped vs dense group-level InfoNCE at the paper's batch (512 prompts x 16 rollouts, D = 2048).

Both compute the same per-anchor losses (checked below); the dense one builds the B x B similarity
matrix over the whole batch, as the authors' code does. Both use the authors' numerics (row shift by
the self-similarity, ``log(sum + eps)``, eps = 1e-8) unless ``--eps 0``. Prints the time ratio; last line
``speedup: <number>x``. Usage: python benchmarks/contrastive_loss.py [--groups 512 --n 16 --dim 2048]
"""
import argparse
import statistics
import time

import torch

from clipo_nemo.algorithms.contrastive import AUTHORS_EPS, contrastive_loss


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eps", type=float, default=AUTHORS_EPS, help="contrastive.eps (0 = exact log-sum-exp)")
    parser.add_argument("--interleave", action="store_true",
                        help="shuffle responses across groups (as after re-sharding) instead of n adjacent per prompt")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    batch = args.groups * args.n
    embeddings = torch.randn(batch, args.dim, generator=gen)
    correct = torch.rand(batch, generator=gen) < 0.5
    group_ids = torch.arange(args.groups).repeat_interleave(args.n)
    if args.interleave:
        perm = torch.randperm(batch, generator=gen)
        embeddings, correct, group_ids = embeddings[perm], correct[perm], group_ids[perm]

    def run(dense):
        return contrastive_loss(embeddings, correct, group_ids, generator=torch.Generator().manual_seed(1), dense=dense,
                                eps=args.eps)

    run(False)  # warm-up
    grouped_s, grouped = timed(lambda: run(False), args.repeats)
    dense_s, dense = timed(lambda: run(True), args.repeats)
    max_diff = (grouped.per_anchor_loss - dense.per_anchor_loss).abs().max().item()
    same_valid = torch.equal(grouped.valid_anchor_mask, dense.valid_anchor_mask)
    layout = "interleaved" if args.interleave else "contiguous"
    print(f"batch {batch} = {args.groups} groups x {args.n} ({layout}), D = {args.dim}, eps {args.eps:g}, threads {torch.get_num_threads()}")
    print(f"dense B x B : {dense_s * 1e3:9.1f} ms (median of {args.repeats})")
    print(f"grouped     : {grouped_s * 1e3:9.1f} ms (median of {args.repeats})")
    print(f"same outputs: max |diff| per-anchor loss {max_diff:.2e}, same valid anchors {same_valid}")
    if not max_diff <= 1e-4 or not same_valid:  # NaN-safe: a NaN difference fails
        raise SystemExit("grouped and dense outputs differ")
    print(f"speedup: {dense_s / grouped_s:.1f}x")


if __name__ == "__main__":
    main()
