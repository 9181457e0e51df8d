#!/usr/bin/env python
"""The checks behind ``tools/gpu_check.sh`` (one CUDA GPU). Each prints ``RESULT <name> PASS|FAIL|SKIP
<detail>`` lines and exits 1 if any FAILed.

    python tools/gpu_checks.py env | guard | memprobe | plan | trtllm
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from clipo_nemo.algorithms.checks import nan_max  # noqa: E402

GIB = 2 ** 30
_FAILED = []


def result(name: str, status: str, detail: str) -> None:
    print(f"RESULT {name} {status} {detail}", flush=True)
    if status == "FAIL":
        _FAILED.append(name)


def tiny_config(overrides=()):
    from clipo_nemo.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(os.path.join(root, "examples", "conf", "tiny.yaml"), overrides)


# ------------------------------------------------------------------------------------------------
def cmd_env(args) -> None:
    import megatron.core

    from clipo_nemo.models.policy import transformer_engine_available

    if not torch.cuda.is_available():
        result("env", "FAIL", "torch.cuda.is_available() is False")
        return
    props = torch.cuda.get_device_properties(0)
    result("env", "PASS", f"{props.name}, {props.total_memory / GIB:.1f} GiB, sm_{props.major}{props.minor}, "
                          f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
                          f"Transformer Engine {'yes' if transformer_engine_available() else 'no'}")
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None:  # rollout.engine=trtllm needs it
        result("trtllm", "SKIP", "tensorrt_llm is not installed here: rollout.engine=trtllm cannot run")
    else:
        import tensorrt_llm

        result("trtllm", "PASS", f"tensorrt_llm {tensorrt_llm.__version__} imports")


# ------------------------------------------------------------------------------------------------
def cmd_guard(args) -> None:
    """Weights loaded after megatron's bf16 optimizer was built survive its first step only through the guard."""
    from clipo_nemo.models.sharding import gather_full_state_dict, load_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.checkpoint.load_guard import StaleOptimizerError, check_optimizer_matches_model, sync_optimizer_with_model

    cfg = tiny_config(["model.params_dtype=bfloat16", "algorithm.kl_loss_coef=0"])
    init_parallel_state(cfg.parallel)
    try:
        actor = Actor.build(cfg)
        vocab = cfg.model.vocab_size
        initial = gather_full_state_dict(actor.module, vocab)
        gen = torch.Generator().manual_seed(0)
        loaded = {k: v.float() + 0.5 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}
        load_full_state_dict(actor.module, loaded, vocab)
        loaded = gather_full_state_dict(actor.module, vocab)  # as stored in bf16
        try:
            check_optimizer_matches_model(actor.optimizer, actor.model)
            result("guard-detects-stale", "FAIL", f"{type(actor.optimizer).__name__}: no mismatch found after a load")
        except StaleOptimizerError as exc:
            result("guard-detects-stale", "PASS", f"{type(actor.optimizer).__name__}: {str(exc)[:160]}")
        report = sync_optimizer_with_model(actor.optimizer, actor.model)
        actor.model.zero_grad_buffer()
        actor.optimizer.zero_grad()
        actor.optimizer.step()  # zero gradients: Adam moves nothing but weight decay (lr * wd)
        after = gather_full_state_dict(actor.module, vocab)
        to_loaded = nan_max((after[k].float() - loaded[k].float()).abs().max().item() for k in after)
        to_initial = nan_max((after[k].float() - initial[k].float()).abs().max().item() for k in after)
        ok = report.reloaded and to_loaded < 1e-2 and to_initial > 0.1
        result("guard-weights-survive-step", "PASS" if ok else "FAIL",
               f"reloaded={report.reloaded}, {report.tensors_checked} tensors checked; after one step "
               f"max|after-loaded|={to_loaded:.3g}, max|after-initial|={to_initial:.3g}")
    finally:
        destroy_parallel_state()


# ------------------------------------------------------------------------------------------------
def cmd_memprobe(args) -> None:
    """Peak CUDA memory of log-prob + entropy forward and backward at Qwen2.5-7B width: fused chunked
    pass vs the previous full-vocabulary pass, same inputs, in one process."""
    from clipo_nemo.config import ActorConfig
    from clipo_nemo.models.logprobs import VocabShard, fused_logprobs_and_entropy
    from benchmarks.logprob_memory import _previous_function

    tokens, vocab, hidden_size, chunk = args.tokens, 152064, 3584, ActorConfig().logprob_chunk_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    weight = (0.02 * torch.randn(vocab, hidden_size, device="cuda", generator=gen)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    upstream = torch.randn(2, tokens, device="cuda", generator=gen)
    previous = _previous_function()  # the benchmark's baseline: the pass before the fused one
    peaks, sums = {}, {}
    for variant in ("fused", "previous"):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        clock = time.perf_counter()
        if variant == "fused":
            logprobs, entropy = fused_logprobs_and_entropy(hidden, weight, labels, VocabShard(0, vocab), chunk_size=chunk)
        else:
            logprobs, entropy = previous(hidden @ weight.T, labels, vocab_start=0, vocab_size=vocab)
        (upstream[0] @ logprobs + upstream[1] @ entropy).backward()
        torch.cuda.synchronize()
        peaks[variant] = torch.cuda.max_memory_allocated() - base
        sums[variant] = (logprobs.sum().item(), entropy.sum().item(), hidden.grad.float().norm().item(),
                         weight.grad.float().norm().item())
        print(f"{variant}: peak above inputs {peaks[variant] / GIB:.2f} GiB, {time.perf_counter() - clock:.2f} s, "
              f"checksums {sums[variant]}")
        del logprobs, entropy
    agree = all(abs(a - b) <= 2e-3 * max(abs(a), abs(b), 1.0) for a, b in zip(sums["fused"], sums["previous"]))
    ratio = peaks["previous"] / peaks["fused"]
    result("memprobe-logprob-pass", "PASS" if agree and ratio >= 8 else "FAIL",
           f"V={vocab}, H={hidden_size}, {tokens} tokens, chunk {chunk}, bf16, forward+backward: previous "
           f"{peaks['previous'] / GIB:.2f} GiB, fused {peaks['fused'] / GIB:.2f} GiB -> logprob_peak_ratio "
           f"{ratio:.1f}x; results agree: {agree}")


# ------------------------------------------------------------------------------------------------
def cmd_plan(args) -> None:
    """The planner's per-component estimates against torch.cuda memory on a few-layer model at
    Qwen2.5-7B width (bf16, TP1, megatron DDP + distributed optimizer, local attention: no TE)."""
    from clipo_nemo.models.forward import PolicyBatch, forward_backward_policy
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.planner import components as pc
    from clipo_nemo.trainer.actor import build_optimizer, wrap_ddp

    layers, tokens, chunk = args.layers, args.tokens, 1024
    cfg = tiny_config([f"model.num_layers={layers}", "model.hidden_size=3584", "model.ffn_hidden_size=18944",
                       "model.num_attention_heads=28", "model.num_query_groups=4", "model.vocab_size=152064",
                       f"model.max_position_embeddings={tokens + 64}", "model.add_qkv_bias=true",
                       "model.rotary_base=1000000.0", "model.params_dtype=bfloat16", "algorithm.kl_loss_coef=0"])
    init_parallel_state(cfg.parallel)

    def allocated():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def compare(name, estimate, measured):
        ratio = estimate / measured if measured else float("inf")
        result(f"plan-{name}", "PASS" if 0.8 <= ratio <= 1.2 else "FAIL",
               f"estimate {estimate / GIB:.3f} GiB, measured {measured / GIB:.3f} GiB, ratio {ratio:.3f}")

    try:
        model_cfg, params = cfg.model, pc.stage_parameters(cfg.model, 1, 1, 0)
        start = allocated()
        policy = build_policy_model(model_cfg, cfg.parallel)
        weights = allocated() - start
        compare("weights", params * pc.dtype_bytes(model_cfg), weights)
        start = allocated()
        ddp = wrap_ddp(policy, use_distributed_optimizer=True)
        from megatron.core.distributed import finalize_model_grads

        ddp.config.finalize_model_grads_func = finalize_model_grads
        ddp.config.no_sync_func = ddp.no_sync
        compare("grad-buffer", params * 4, allocated() - start)
        start = allocated()
        optimizer = build_optimizer(ddp, cfg)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        optimizer.step()  # Adam allocates its moments at the first step
        compare("optimizer", params * pc.optimizer_bytes_per_parameter(model_cfg, "adamw", on_gpu=True),
                allocated() - start)
        gen = torch.Generator().manual_seed(0)
        batch_tokens = torch.randint(0, model_cfg.vocab_size, (1, tokens), generator=gen)
        mask = torch.zeros(1, tokens, dtype=torch.bool)
        mask[:, 256:] = True
        scored = int(mask.sum())
        for recompute in ("none", "selective"):
            for layer in policy.decoder.layers:  # megatron reads recompute_granularity at build time
                layer.self_attention.checkpoint_core_attention = recompute == "selective"
            ddp.zero_grad_buffer()
            static = allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward_policy(ddp, PolicyBatch(batch_tokens, mask), micro_batch_size=1, temperature=1.0,
                                    vocab_size=model_cfg.vocab_size, logprob_chunk_size=chunk,
                                    loss_func=lambda out, mb: (out.logprobs.sum() / 1e4, {}))
            measured = torch.cuda.max_memory_allocated() - static
            # The first pass allocates megatron's attention-score buffer; the second reuses it.
            estimate = pc.train_step_peak_bytes(model_cfg, 1, 1, 0, tokens, tokens, recompute=recompute,
                                                recompute_num_layers=1, flash_attention=False, scored_tokens=scored,
                                                logprob_chunk=chunk, score_buffer_allocated=recompute != "none")
            compare(f"train-step-{recompute}", estimate, measured)
    finally:
        destroy_parallel_state()


# ------------------------------------------------------------------------------------------------
def _mean_abs(a, b) -> float:
    known = ~torch.isnan(a.double()) & ~torch.isnan(b)
    return float((a.double()[known] - b[known]).abs().mean())


def cmd_trtllm(args) -> None:
    """rollout.engine=trtllm at TP1 on one GPU (random weights, a small Qwen2 shape, nothing converted):
    placement, the sampled tokens' log-probs vs the trainer's, a refit, memory after wake-up."""
    from clipo_nemo.conversion.verify import response_logprobs
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.planner import GIB, plan_memory
    from clipo_nemo.rollout import GenerationParams, build_rollout_engine
    from clipo_nemo.rollout.trtllm_placement import local_gpu
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.trainer.loop import load_tokenizer

    cfg = tiny_config(["rollout.engine=trtllm", "model.params_dtype=bfloat16", "model.hidden_size=256",
                       "model.ffn_hidden_size=768", "model.num_attention_heads=4", "model.num_query_groups=2",
                       "model.add_qkv_bias=true", "model.max_position_embeddings=256", "rollout.trtllm_kv_cache_gb=2",
                       "rollout.max_batch_size=64", "rollout.max_new_tokens=24", "data.max_prompt_length=16",
                       "algorithm.kl_loss_coef=0", "contrastive.enabled=false",
                       f"trainer.output_dir=/tmp/clipo_trtllm_check_{os.getpid()}"])
    init_parallel_state(cfg.parallel)
    try:
        actor = Actor.build(cfg)
        with torch.no_grad():  # peaked distributions: a log-prob of the wrong token or temperature shows
            for param in actor.module.parameters():
                param.mul_(2.0)
        engine = build_rollout_engine(cfg.rollout, model=actor.module, tokenizer=load_tokenizer(cfg), cfg=cfg)
        prompts = [[(5 * i + j) % cfg.model.vocab_size for j in range(6 + i)] for i in range(8)]
        seeds = list(range(100, 108))
        outs = {}
        for temperature in (1.0, 0.6):
            params = GenerationParams(n=4, max_new_tokens=24, temperature=temperature)
            outs[temperature] = out = engine.generate(prompts, params, seeds)
            diff = _mean_abs(out.logprobs, response_logprobs(actor.module, prompts, out, temperature,
                                                             cfg.model.vocab_size))
            ends = sum(int(r == "stop") for r in out.finish_reasons)
            # the same check against the untempered distribution must fail, or it proves nothing
            raw = _mean_abs(out.logprobs, response_logprobs(actor.module, prompts, out, 1.0, cfg.model.vocab_size))
            telling = temperature == 1.0 or raw > 0.1
            result(f"trtllm-logprobs-T{temperature:g}", "PASS" if diff < 0.05 and telling else "FAIL",
                   f"mean|logp_engine - logp_trainer| = {diff:.4f} over {int((~out.logprobs.isnan()).sum())} sampled "
                   f"tokens (limit 0.05; vs the T=1 distribution: {raw:.4f}); {ends} of {len(out.finish_reasons)} "
                   "responses ended with the end token")
        workers, mine = engine.llm._executor.report_device_ids(), local_gpu()[2]
        result("trtllm-placement", "PASS" if workers == [mine] else "FAIL", f"workers {workers}, trainer GPU {mine}")
        again = engine.generate(prompts, GenerationParams(n=4, max_new_tokens=24, temperature=0.6), seeds)
        same = torch.equal(again.tokens, outs[0.6].tokens)
        result("trtllm-seeds", "PASS" if same else "FAIL", "same seeds, same weights: same tokens" if same else
               "same seeds and weights gave other tokens")

        engine.release()
        free_asleep = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
        with torch.no_grad():
            for param in actor.module.parameters():
                param.mul_(1.25)
        params = GenerationParams(n=4, max_new_tokens=24, temperature=1.0)
        changed = engine.generate(prompts, params, seeds)
        trainer_after = response_logprobs(actor.module, prompts, changed, 1.0, cfg.model.vocab_size)
        with torch.no_grad():
            for param in actor.module.parameters():
                param.div_(1.25)
        trainer_before = response_logprobs(actor.module, prompts, changed, 1.0, cfg.model.vocab_size)
        follows, stale = _mean_abs(changed.logprobs, trainer_after), _mean_abs(changed.logprobs, trainer_before)
        result("trtllm-refit", "PASS" if follows < 0.05 and stale > 4 * max(follows, 0.01) else "FAIL",
               f"after the trainer's weights changed: mean|engine - trainer(new)| = {follows:.4f}, "
               f"mean|engine - trainer(old)| = {stale:.4f}; probe {engine.probe_mismatch:.4f}; "
               f"sleep/wake seconds {', '.join(f'{k}={v:.2f}' for k, v in engine.timings.items())}")
        if not torch.cuda.is_available():
            result("trtllm-memory", "SKIP", "no CUDA device")
            return
        free, total = torch.cuda.mem_get_info()
        used, planned = total - free, plan_memory(cfg, 1, total / GIB).totals["rollout"]
        result("trtllm-memory", "PASS" if free > 0.05 * total else "FAIL",
               f"after wake-up {used / GIB:.2f} GiB of {total / GIB:.1f} GiB in use (asleep: "
               f"{(total - free_asleep) / GIB:.2f} GiB); the planner's rollout phase: {planned / GIB:.2f} GiB")
    finally:
        destroy_parallel_state()


# ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("env", "guard", "memprobe", "plan", "trtllm"))
    parser.add_argument("--tokens", type=int, default=4608, help="memprobe, plan: tokens per sequence")
    parser.add_argument("--layers", type=int, default=2, help="plan: transformer layers of the probe model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    clock = time.perf_counter()
    try:
        {"env": cmd_env, "guard": cmd_guard, "memprobe": cmd_memprobe, "plan": cmd_plan,
         "trtllm": cmd_trtllm}[args.check](args)
    except Exception as exc:  # a crash is a FAIL line too, with the traceback in the log
        traceback.print_exc()
        result(args.check, "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}")
    print(f"({args.check}: {time.perf_counter() - clock:.1f}s)")
    return 1 if _FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
