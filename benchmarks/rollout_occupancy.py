"""Decode passes of the megatron rollout engine against the ideal, static chunks vs continuous batching.

Hardware-independent (counts forward passes, not seconds; runs on the CPU in about a minute). The
real engine generates with a small random megatron-core model whose response lengths are forced to
follow a math run's: the solution lengths of the shared math75 set (characters / 4 as tokens, a
proxy for response lengths), scaled from a 4,096-token cap down to ``--cap`` and drawn in a fixed
shuffled order. A response is ended by turning its token at its target length into the EOS token
(``_ForcedLengths``); everything else is the engine's own path. Responses to slots at the track2
ratio: 512 responses of a DP rank, 130 rows in its 16 GiB KV budget (``examples/conf/track2.yaml``).

Ideal: ``max(longest response, ceil(total response tokens / slots))`` with ``slots`` = the rows the
KV budget holds for static chunks (continuous batching holds slightly fewer in the same budget: its
shared timeline has 1/16 of slack). ``--finish-check-every`` defaults to 1: the configured 8 steps
of a 4,096-token run scaled down with the cap like the lengths (at a 256 cap, 8 steps would be as
much of a response as 128 steps at full scale). Prints both engines' passes; the last two lines are
``static_decode_passes_over_ideal: <x>`` and ``decode_passes_over_ideal: <x>`` (continuous).

    PYTHONPATH=. .venv/bin/python benchmarks/rollout_occupancy.py [--responses 512] [--slots 130] [--cap 256]
"""
from __future__ import annotations

import argparse
import ast
import math
import warnings

import torch

MATH75 = "/work/shared/data/clipo/train/math75.parquet"
TRACK_CAP = 4096  # track2's max_new_tokens, which the solution lengths are scaled against


def response_lengths(path: str, count: int, cap: int, seed: int = 0) -> list:
    """``count`` lengths in [1, cap]: math75 solution lengths (characters / 4), scaled by cap / 4,096."""
    import pandas as pd

    solutions = [ast.literal_eval(r)["ground_truth"] if isinstance(r, str) else r["ground_truth"]
                 for r in pd.read_parquet(path, columns=["reward_model"])["reward_model"]]
    order = torch.randperm(len(solutions), generator=torch.Generator().manual_seed(seed))[:count]
    return [min(cap, max(1, math.ceil(len(solutions[i]) / 4 * cap / TRACK_CAP))) for i in order.tolist()]


def _forced_lengths_engine(base, targets: torch.Tensor, eos: int):
    class _ForcedLengths(base):
        """The engine, with each response's token at its target length replaced by EOS."""

        def _sample_and_record(self, logits, rows, uniforms, out, params):
            sampled = super()._sample_and_record(logits, rows, uniforms, out, params)
            ends = out.lengths[rows] == targets.to(rows.device)[rows]
            sampled = torch.where(ends, torch.full_like(sampled, eos), sampled)
            out.tokens[rows, out.lengths[rows] - 1] = sampled
            return sampled

    return _ForcedLengths


class _Tokenizer:
    eos_token_id, pad_token_id = 0, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("responses", 512), ("slots", 130), ("cap", 256), ("n", 16), ("prompt", 16),
                          ("layers", 2), ("hidden", 64), ("vocab", 64), ("finish_check_every", 1)):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default)
    parser.add_argument("--data", default=MATH75)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from clipo_nemo.config import ModelConfig, ParallelConfig
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.rollout.base import GenerationParams
    from clipo_nemo.rollout.megatron_engine import MegatronRolloutEngine, kv_cache_bytes_per_row

    torch.manual_seed(0)
    longest = args.prompt + args.cap
    model_cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden,
                            num_attention_heads=4, num_query_groups=2, vocab_size=args.vocab,
                            make_vocab_size_divisible_by=16, max_position_embeddings=2 * longest)
    init_parallel_state(ParallelConfig())
    try:
        model = build_policy_model(model_cfg, ParallelConfig()).eval()
        model.output_layer.register_forward_hook(  # EOS (id 0) only where a length is forced
            lambda module, inputs, output: (output[0].index_fill(-1, torch.tensor([0]), float("-inf")), output[1]))
        targets = torch.tensor(response_lengths(args.data, args.responses, args.cap))
        prompts = [[1 + (7 * i + j) % (args.vocab - 1) for j in range(args.prompt)]
                   for i in range(args.responses // args.n)]
        params = GenerationParams(n=args.n, max_new_tokens=args.cap, temperature=1.0)
        budget = args.slots * kv_cache_bytes_per_row(model_cfg, 1, 1, longest, 4)
        engine_class = _forced_lengths_engine(MegatronRolloutEngine, targets, eos=0)
        ideal = max(int(targets.max()), math.ceil(int(targets.sum()) / args.slots))
        print(f"responses {args.responses}, KV budget of {args.slots} static rows, lengths: mean "
              f"{targets.float().mean():.1f}, median {int(targets.median())}, max {int(targets.max())} (cap {args.cap})")
        print(f"ideal decode passes: {ideal}")
        figures = {}
        for batching in ("static", "continuous"):
            engine = engine_class(model, _Tokenizer(), vocab_size=args.vocab, eos_token_ids=[0], kv_cache_bytes=budget,
                                  batching=batching, finish_check_every=args.finish_check_every)
            out = engine.generate(prompts, params, list(range(len(prompts))))
            if not torch.equal(out.lengths, targets):
                raise RuntimeError(f"{batching}: the forced response lengths were not kept")
            figures[batching] = engine.decode_passes / ideal
            print(f"{batching}: {engine.decode_passes} decode passes")
        print(f"static_decode_passes_over_ideal: {figures['static']:.3f}")
        print(f"decode_passes_over_ideal: {figures['continuous']:.3f}")
    finally:
        destroy_parallel_state()


if __name__ == "__main__":
    main()
