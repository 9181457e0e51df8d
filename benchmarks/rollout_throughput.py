"""Generated tokens/s of the megatron rollout engine beside the memory-bandwidth bound of its decode.

At the layer shapes of Qwen2.5-1.5B and Qwen2.5-7B (random bf16 weights; ``--layers`` of them, as
many as fit one GPU), every response runs exactly ``--new`` tokens (EOS is never drawn). The bound:
one decode step must read the weights once and each row's KV cache so far, so at ``--hbm-gbps``
(H100 SXM: 3,350 GB/s) a step takes at least (weight bytes + KV bytes read) / bandwidth; averaged over
the decode, tokens/s <= rows / that time. On the CPU (no GPU) it runs a tiny shape so the script keeps
working; its bound uses the same bandwidth figure and means nothing there.

    PYTHONPATH=. .venv/bin/python benchmarks/rollout_throughput.py [--shapes qwen2.5-1.5b,qwen2.5-7b]
        [--layers 4] [--rows 256] [--prompt 512] [--new 512] [--hbm-gbps 3350]

Prints one line per shape; last line ``fraction_of_bound: <x>`` for the last shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import torch


def shapes():
    from clipo_nemo.planner.recommend import MODEL_PRESETS

    qwen7b = MODEL_PRESETS["qwen2.5-7b"]
    return {
        "qwen2.5-7b": qwen7b,
        "qwen2.5-1.5b": dataclasses.replace(qwen7b, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                                            num_query_groups=2, vocab_size=151936, tie_word_embeddings=True),
        "tiny": dataclasses.replace(qwen7b, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                    num_query_groups=2, vocab_size=256),
    }


class _Tokenizer:
    eos_token_id, pad_token_id = 0, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def measure(model_cfg, args, device):
    """(tokens/s, bound tokens/s) of one shape."""
    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.rollout.base import GenerationParams
    from clipo_nemo.rollout.megatron_engine import MegatronRolloutEngine, kv_cache_bytes_per_row

    model = build_policy_model(model_cfg, ParallelConfig()).eval()
    if device.type == "cuda":
        model = model.cuda()
    model.output_layer.register_forward_hook(  # EOS (id 0) is never drawn: fixed lengths
        lambda module, inputs, output: (output[0].index_fill(-1, torch.tensor([0], device=output[0].device),
                                                             float("-inf")), output[1]))
    n = 8
    prompts = [[1 + (7 * i + j) % (model_cfg.vocab_size - 1) for j in range(args.prompt)] for i in range(args.rows // n)]
    engine = MegatronRolloutEngine(model, _Tokenizer(), vocab_size=model_cfg.vocab_size, eos_token_ids=[0],
                                   batching=args.batching, finish_check_every=args.finish_check_every)
    params = GenerationParams(n=n, max_new_tokens=args.new, temperature=1.0)
    engine.generate(prompts[:1], GenerationParams(n=n, max_new_tokens=4), [0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompts, params, list(range(len(prompts))))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = int(out.lengths.sum())
    dtype_bytes = torch.empty((), dtype=model.config.params_dtype).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_position = kv_cache_bytes_per_row(model_cfg, 1, 1, 1, dtype_bytes)
    mean_kv_positions = args.prompt + args.new / 2
    step_seconds = (weight_bytes + len(out.lengths) * mean_kv_positions * per_position) / (args.hbm_gbps * 1e9)
    del engine, model
    return tokens / seconds, len(out.lengths) / step_seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b" if on_gpu else "tiny")
    for name, default in (("layers", 4 if on_gpu else 2), ("rows", 256 if on_gpu else 16),
                          ("prompt", 512 if on_gpu else 8), ("new", 512 if on_gpu else 16), ("finish_check_every", 8)):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default)
    parser.add_argument("--hbm-gbps", type=float, default=3350.0)
    parser.add_argument("--batching", default="continuous", choices=("continuous", "static"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    device = torch.device("cuda" if on_gpu else "cpu")
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu'}; {args.rows} rows x {args.new} new tokens "
          f"after {args.prompt}-token prompts, {args.layers} layers, batching={args.batching}")
    init_parallel_state(ParallelConfig())
    try:
        fraction = 0.0
        for name in args.shapes.split(","):
            dtype = "bfloat16" if on_gpu else "float32"
            model_cfg = dataclasses.replace(shapes()[name], num_layers=args.layers, params_dtype=dtype,
                                            max_position_embeddings=args.prompt + args.new)
            tokens_per_s, bound, seconds = measure(model_cfg, args, device)
            fraction = tokens_per_s / bound
            print(f"{name}: {tokens_per_s:.0f} tokens/s in {seconds:.1f} s; bandwidth bound {bound:.0f} tokens/s "
                  f"at {args.hbm_gbps:g} GB/s; fraction {fraction:.3f}")
        print(f"fraction_of_bound: {fraction:.3f}")
    finally:
        destroy_parallel_state()


if __name__ == "__main__":
    main()
