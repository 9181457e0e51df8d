"""Padding computed by fixed-row micro-batches vs token-budget micro-batches, for real response lengths.

Lengths: the reference solutions of ``train/math75.parquet`` (the track-II training set) stand in for
responses and the problems for prompts. No tokenizer is available offline, so tokens are a proxy:
ceil(characters / 4) (about right for Qwen2.5's BPE on English + LaTeX), plus ``--template-tokens``
for the chat template around a prompt; responses are capped at ``--max-new-tokens``.
A step: ``--prompts`` problems drawn at random, ``--n`` responses each, every response the length of
a solution drawn at random (2,048 responses by default), dealt to ``--dp`` ranks in arrival order
(groups adjacent, as the rollout produces them).

Per rank, in ``PolicyBatch.micro_batch_plan``'s two modes:
- fixed: ``--micro-batch-size`` rows in arrival order. Today's code pads them to the batch width
  (printed for context); "fixed" below pads each to its own longest row.
- budget: length-sorted rows packed so that rows x longest <= ``--max-tokens``, each trimmed to its
  longest row.
Waste = padding share of the computed token positions (the ``actor/padding_frac`` metric).
Last line: ``padding_waste: <fixed>% -> <budget>%``.
Usage: python benchmarks/padding.py [--max-tokens 16384 --micro-batch-size 16 --dp 8]
"""
import argparse
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch

from clipo_nemo.models.forward import PolicyBatch

DATA = Path(__file__).resolve().parents[2] / "shared/data/clipo/train/math75.parquet"


def proxy_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def step_lengths(args) -> tuple:
    """[R] prompt and response lengths (proxy tokens) of one step, in arrival order."""
    table = pq.read_table(args.data, columns=["prompt", "reward_model"]).to_pylist()
    prompts = [args.template_tokens + sum(proxy_tokens(m["content"]) for m in row["prompt"]) for row in table]
    solutions = [min(proxy_tokens(row["reward_model"]["ground_truth"]), args.max_new_tokens) for row in table]
    gen = torch.Generator().manual_seed(args.seed)
    chosen = torch.randint(len(table), (args.prompts,), generator=gen)
    prompt_len = torch.tensor(prompts)[chosen].repeat_interleave(args.n)
    response_len = torch.tensor(solutions)[torch.randint(len(table), (args.prompts * args.n,), generator=gen)]
    return prompt_len, response_len


def rank_batch(prompt_len: torch.Tensor, response_len: torch.Tensor) -> PolicyBatch:
    """Right-padded [r, S] batch with these prompt/response lengths (token ids do not matter)."""
    width = int((prompt_len + response_len).max())
    positions = torch.arange(width)
    mask = (positions >= prompt_len[:, None]) & (positions < (prompt_len + response_len)[:, None])
    return PolicyBatch(torch.zeros(mask.shape, dtype=torch.long), mask)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--template-tokens", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prompt_len, response_len = step_lengths(args)
    lengths = prompt_len + response_len
    print(f"{len(lengths)} responses over {args.dp} DP ranks; real length (prompt + response, proxy tokens): "
          f"min {int(lengths.min())}, median {int(lengths.median())}, max {int(lengths.max())}")
    needed = int(lengths.sum())
    width = int(lengths.max())  # the step's batch width (the rollout pads to its longest response)
    totals = {"today (batch width)": [0, 0, 0], "fixed": [0, 0, 0], "budget": [0, 0, 0]}  # computed, micro, peak
    budgets = sorted({args.max_tokens // 2, args.max_tokens, args.max_tokens * 2})
    budget_totals = {b: 0 for b in budgets}
    for rows in torch.arange(len(lengths)).chunk(args.dp):
        batch = rank_batch(prompt_len[rows], response_len[rows])
        fixed = batch.micro_batch_plan(args.micro_batch_size)
        for name, sizes in (("today (batch width)", [(len(r), width) for r in fixed.rows]),
                            ("fixed", [(len(r), int(lengths[rows][r].max())) for r in fixed.rows])):
            totals[name][0] += sum(b * s for b, s in sizes)
            totals[name][1] += len(sizes)
            totals[name][2] = max(totals[name][2], max(b * s for b, s in sizes))
        budget = batch.micro_batch_plan(args.micro_batch_size, args.max_tokens)
        assert budget.real_tokens == int(lengths[rows].sum())
        totals["budget"][0] += budget.computed_tokens
        totals["budget"][1] += len(budget.rows)
        totals["budget"][2] = max(totals["budget"][2], max(len(r) * w for r, w in zip(budget.rows, budget.widths)))
        for b in budgets:
            budget_totals[b] += batch.micro_batch_plan(args.micro_batch_size, b).computed_tokens

    waste = {name: 100 * (1 - needed / computed) for name, (computed, _, _) in totals.items()}
    for name, (computed, micro, peak) in totals.items():
        print(f"{name:>20}: computed/needed {computed / needed:.3f}, waste {waste[name]:.1f}%, "
              f"{micro} micro-batches, largest {peak} tokens")
    print("budget sweep (waste): " + ", ".join(f"{b} tokens {100 * (1 - needed / c):.1f}%"
                                               for b, c in budget_totals.items()))
    print(f"fixed: {args.micro_batch_size} rows per micro-batch; budget: {args.max_tokens} tokens per micro-batch")
    print(f"padding_waste: {waste['fixed']:.1f}% -> {waste['budget']:.1f}%")


if __name__ == "__main__":
    main()
