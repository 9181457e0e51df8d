"""Generation speed of the megatron rollout engine against baselines measured in the same run.

Prints tokens/s of (1) ``MegatronRolloutEngine`` (KV cache), (2) a no-cache loop that re-forwards the
whole sequence every step, and, on a GPU, (3) megatron-core's own ``StaticInferenceEngine``
(legacy static path; on CPU it needs CUDA patches the project does not carry), plus ratios to (1).
Every response runs the full ``--new`` tokens (no EOS) so all engines do the same work.

    .venv/bin/python benchmarks/rollout_engines.py [--batch 64] [--new 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch


def _setup(args):
    from clipo_nemo.config import ModelConfig, ParallelConfig
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import init_parallel_state

    model_cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                            num_attention_heads=4, num_query_groups=2, vocab_size=args.vocab,
                            make_vocab_size_divisible_by=16, max_position_embeddings=args.prompt + args.new)
    init_parallel_state(ParallelConfig())
    model = build_policy_model(model_cfg, ParallelConfig()).eval()
    return model, model_cfg


class _NoEosTokenizer:
    eos_token_id, pad_token_id = 0, 0
    eod, bos = -1, None  # megatron's controller: -1 never matches, so no early stop

    def detokenize(self, ids, **_):
        return " ".join(map(str, ids))

    def tokenize(self, text):
        return [int(t) for t in text.split()]


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("batch", 64), ("prompt", 12), ("new", 32), ("layers", 2), ("hidden", 64),
                          ("vocab", 32), ("repeats", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from clipo_nemo.rollout import GenerationParams, MegatronRolloutEngine

    model, model_cfg = _setup(args)
    device = next(model.parameters()).device
    prompts = [[1 + (7 * i + j) % (args.vocab - 1) for j in range(args.prompt)] for i in range(args.batch)]
    def never_eos(module, inputs, output):  # every engine runs all --new steps
        output[0][..., 0] = float("-inf")
        return output

    model.output_layer.register_forward_hook(never_eos)
    engine = MegatronRolloutEngine(model, _NoEosTokenizer(), vocab_size=args.vocab, eos_token_ids=[0])
    params = GenerationParams(n=1, max_new_tokens=args.new, temperature=1.0)

    def run_engine():
        out = engine.generate(prompts, params, list(range(args.batch)))
        return int(out.lengths.sum())

    @torch.inference_mode()
    def run_no_cache():
        seq = torch.tensor(prompts, device=device)
        for _ in range(args.new):
            s = seq.shape[1]
            causal = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).triu(1)
            logits = model(seq, torch.arange(s, device=device)[None].expand_as(seq), causal)[:, -1, : args.vocab]
            seq = torch.cat([seq, torch.multinomial(logits.float().softmax(-1), 1)], dim=1)
        return args.batch * args.new

    runners = {"megatron engine (KV cache)": run_engine, "no-cache re-forward": run_no_cache}
    if torch.cuda.is_available():
        runners["megatron-core StaticInferenceEngine"] = _mcore_static_runner(model, model_cfg, args, prompts)
    times = {name: [] for name in runners}
    tokens = {}
    for _ in range(args.repeats):  # interleaved, so machine load affects all alike
        for name, run in runners.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens[name] = run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    print(f"device={device} batch={args.batch} prompt={args.prompt} new={args.new} layers={args.layers} "
          f"hidden={args.hidden} (median of {args.repeats}, interleaved)")
    base = None
    for name in runners:
        rate = tokens[name] / sorted(times[name])[len(times[name]) // 2]
        base = base or rate
        print(f"  {name:38s} {rate:10.0f} tokens/s   ratio to engine {rate / base:6.2f}")
    if not torch.cuda.is_available():
        print("  megatron-core StaticInferenceEngine: not run on CPU (needs Tensor.cuda/torch.cuda.Event patches)")


def _mcore_static_runner(model, model_cfg, args, prompts):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    from clipo_nemo.models.policy import padded_vocab_size

    config = InferenceWrapperConfig(
        hidden_size=args.hidden, params_dtype=torch.float32, inference_batch_times_seqlen_threshold=10**9,
        padded_vocab_size=padded_vocab_size(args.vocab, 16, 1), inference_max_requests=args.batch,
        inference_max_seq_length=args.prompt + args.new,
    )
    wrapped = GPTInferenceWrapper(model, config, StaticInferenceContext.from_config(config))
    engine = StaticInferenceEngine(TextGenerationController(wrapped, _NoEosTokenizer()), args.batch,
                                   random_seed=1, legacy=True)
    sampling = SamplingParams(temperature=1.0, num_tokens_to_generate=args.new)
    texts = [" ".join(map(str, p)) for p in prompts]

    def run():
        engine.generate(prompts=texts, sampling_params=sampling)
        return args.batch * args.new

    return run


if __name__ == "__main__":
    main()
