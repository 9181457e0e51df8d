"""Pipeline-parallel generation: tokens/s at PP=2 against PP=1 on the same model, and the bubble.

Runs the megatron rollout engine on one tiny-but-not-trivial model with the same weights under
(1) PP=1 (one process), (2) PP=2 (two processes: pipelined decoding, each stage runs its own layers
on every KV-cached step) and (3) TP=2 on the same two processes: the layout a resharding design
(PP-split weights regathered into a TP-only layout for generation, as NeMo-Aligner did) generates
with, plus the time of that regather (every rank collecting the full weights, paid after every
weight update). All on the same two processes, one CPU thread each (``run_distributed``; at PP=1 the
second process waits), the layouts taking turns in ``--rounds`` rounds, the fastest round of each
counted (the machine's other load hits every layout alike). Every response runs all ``--new``
tokens (no EOS), so every layout does the same work; PP=2 must give PP=1's tokens exactly.

Bubble: the share of a stage's generation wall time spent outside its own model forward (waiting
for the other stage, p2p, sampling), averaged over stages; at PP=1 the same share is the host-side
work (sampling, bookkeeping) that PP=2 also pays.

    .venv/bin/python benchmarks/rollout_pp.py [--batch 32] [--new 32] [--layers 4] [--hidden 256]

Last line: ``pp2_over_pp1: <tokens/s at PP=2 / tokens/s at PP=1>``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _NoEosTokenizer:
    eos_token_id, pad_token_id = 0, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def _model_config(args):
    from clipo_nemo.config import ModelConfig

    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                       num_attention_heads=8, num_query_groups=4, vocab_size=args.vocab,
                       make_vocab_size_divisible_by=16, max_position_embeddings=args.prompt + args.new)


LAYOUTS = (("pp1", 1, 1), ("pp2", 1, 2), ("tp2", 2, 1))  # name, TP, PP


def _measure(layout, args, full_state):
    """This rank's share of one layout on an initialised default group: build it, load
    ``full_state``, generate once to warm up, then time ``--repeats`` generate calls. At PP=1 only
    rank 0 generates (one process); the other rank waits at the closing barrier."""
    from megatron.core import parallel_state

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.models.sharding import gather_full_state_dict, load_full_state_dict
    from clipo_nemo.parallel.state import init_parallel_state
    from clipo_nemo.rollout import GenerationParams, MegatronRolloutEngine

    name, tp, pp = layout
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    init_parallel_state(parallel)  # megatron's groups for this layout on the existing default group
    try:
        result = {}
        if name == "pp1" and torch.distributed.get_rank() != 0:
            return result
        model = build_policy_model(_model_config(args), parallel).eval()
        load_full_state_dict(model, full_state, args.vocab)
        if model.post_process:
            def never_eos(module, inputs, output):  # every response runs all --new steps
                output[0][..., 0] = float("-inf")
                return output

            model.output_layer.register_forward_hook(never_eos)
        busy = [0.0]
        model.register_forward_pre_hook(lambda module, inputs: busy.__setitem__(0, busy[0] - time.perf_counter()))
        model.register_forward_hook(lambda module, inputs, output: busy.__setitem__(0, busy[0] + time.perf_counter()))
        engine = MegatronRolloutEngine(model, _NoEosTokenizer(), vocab_size=args.vocab, eos_token_ids=[0])
        prompts = [[1 + (7 * i + j) % (args.vocab - 1) for j in range(args.prompt)] for i in range(args.batch)]
        params = GenerationParams(n=1, max_new_tokens=args.new, temperature=1.0, top_k=50)
        seeds = list(range(args.batch))
        engine.generate(prompts, params, seeds)  # warm-up
        busy[0], wall = 0.0, 0.0
        for _ in range(args.repeats):
            clock = time.perf_counter()
            out = engine.generate(prompts, params, seeds)
            wall += time.perf_counter() - clock
        result = {"tokens": out.tokens, "wall_s": wall, "busy_s": busy[0], "generated": int(out.lengths.sum()) * args.repeats}
        if pp > 1:  # what a resharding design pays after every weight update: every rank gathers the weights
            clock = time.perf_counter()
            full = gather_full_state_dict(model, args.vocab)
            result["regather_s"] = time.perf_counter() - clock
            result["full_weights_mib"] = sum(t.numel() * t.element_size() for t in full.values()) / 2**20
            result["stage_weights_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        return result
    finally:
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()


def _rank(rank, world_size, args):
    """Rounds of every layout in turn on the same two processes (the machine's load hits all alike)."""
    from megatron.core import parallel_state

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    warnings.filterwarnings("ignore")
    init_parallel_state(ParallelConfig(tensor_parallel_size=2))  # seeded init, gathered: the same weights everywhere
    full_state = gather_full_state_dict(build_policy_model(_model_config(args), ParallelConfig(tensor_parallel_size=2)),
                                        args.vocab)
    parallel_state.destroy_model_parallel()
    try:
        return [{layout[0]: _measure(layout, args, full_state) for layout in LAYOUTS} for _ in range(args.rounds)]
    finally:
        destroy_parallel_state()


def _best(rounds, name):
    """(tokens/s, idle share averaged over the layout's ranks, seconds per call, the ranks' results)
    of the round whose slowest rank was fastest."""
    runs = [[r[name] for r in ranks if r[name]] for ranks in rounds]
    ranks = min(runs, key=lambda rs: max(r["wall_s"] for r in rs))
    wall = max(r["wall_s"] for r in ranks)
    idle = sum(1 - r["busy_s"] / r["wall_s"] for r in ranks) / len(ranks)
    return ranks[0]["generated"] / wall, idle, wall, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("batch", 32), ("prompt", 16), ("new", 32), ("layers", 4), ("hidden", 256),
                          ("vocab", 512), ("repeats", 1), ("rounds", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    from clipo_nemo.parallel.launcher import run_distributed

    ranks = run_distributed(_rank, 2, args=(args,), timeout_s=600)
    rounds = [[ranks[0][i], ranks[1][i]] for i in range(args.rounds)]
    pp1_rate, pp1_idle, pp1_s, pp1 = _best(rounds, "pp1")
    pp2_rate, pp2_idle, pp2_s, pp2 = _best(rounds, "pp2")
    tp2_rate, _, tp2_s, _ = _best(rounds, "tp2")
    same = all(torch.equal(r[name]["tokens"], ranks[0][0]["pp1"]["tokens"])
               for rank in ranks for r in rank for name in ("pp1", "pp2") if r[name])
    regather = max(r["regather_s"] for r in pp2)
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.batch} prompts x "
          f"{args.prompt} tokens -> {args.new} new tokens each; best of {args.rounds} interleaved rounds of "
          f"{args.repeats} call(s); 1 thread per process")
    print(f"PP=1 (1 process):    {pp1_rate:9.1f} tokens/s  {pp1_s / args.repeats:.3f} s/call  "
          f"outside the forward: {pp1_idle:.1%}")
    print(f"PP=2 (2 processes):  {pp2_rate:9.1f} tokens/s  {pp2_s / args.repeats:.3f} s/call  "
          f"bubble (stage idle): {pp2_idle:.1%}  weights per stage: {pp2[0]['stage_weights_mib']:.1f} MiB")
    print(f"TP=2 (2 processes):  {tp2_rate:9.1f} tokens/s  {tp2_s / args.repeats:.3f} s/call  (the resharded layout)")
    print(f"resharding PP=2 -> TP=2 after each weight update: regather {regather:.3f} s and "
          f"{pp2[0]['full_weights_mib']:.1f} MiB of full weights per rank (PP=2 keeps {pp2[0]['stage_weights_mib']:.1f}); "
          f"resharded call {regather + tp2_s / args.repeats:.3f} s vs pipelined {pp2_s / args.repeats:.3f} s")
    print(f"pp2_tokens_equal_pp1: {same}")
    print(f"pp2_over_pp1: {pp2_rate / pp1_rate:.3f}")


if __name__ == "__main__":
    main()
