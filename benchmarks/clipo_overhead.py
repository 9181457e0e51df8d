"""Wall time of a GRPO step vs a GRPO+CLIPO step on the same model and batch (issue 3).

Both variants call :func:`clipo_nemo.trainer.step.learn_from_experience` on one shared ``Actor`` with
the same batch: one old-log-prob forward pass, the same PPO mini-/micro-batches and optimizer steps.
The CLIPO variant's only extra work is the contrastive head (forward, InfoNCE, head AdamW step) and its
metrics: the pooled hidden states come out of the old-log-prob forward pass that GRPO runs anyway.

Steps are measured back to back rather than resetting weights between repetitions: the cost of a
step does not depend on the weights' values (dense kernels, fixed shapes), AdamW's state is created
in the untimed warm-up steps, and sharing one actor guarantees that both variants do identical policy
work. Repetitions are interleaved in pairs whose order alternates (G C, C G, G C, ...) so a slow
phase of a shared machine hits both variants alike; the reported overhead is the median over pairs
of ``(clipo - grpo) / grpo``. The head phase is also timed inside the CLIPO step, which gives its
cost without the pair-to-pair noise of two whole steps.

    .venv/bin/python benchmarks/clipo_overhead.py --threads 1            # CPU, ~4M-param model
    .venv/bin/python benchmarks/clipo_overhead.py --device cuda --model 1b --peak-tflops 989

On a shared CPU machine use ``--threads 1``: with as many torch threads as cores, a descheduled
thread stalls the others at every parallel region and steps became several times slower and erratic.
Last line: ``overhead: <percent>%``. On CUDA it also prints tokens/s and an MFU estimate.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

import clipo_nemo.trainer.step as step_module
from clipo_nemo.config import ClipoConfig
from clipo_nemo.trainer.actor import Actor
from clipo_nemo.trainer.step import ClipoHead, Experience, learn_from_experience

# Model shapes. "small": the CPU model of the issue. "1b": Llama-3.2-1B shapes (tied embeddings).
MODELS = {
    "small": dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_query_groups=2,
                  vocab_size=2048, tie_word_embeddings=False, params_dtype="float32"),
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
               vocab_size=128256, tie_word_embeddings=True, rotary_base=500000.0, norm_epsilon=1e-5,
               params_dtype="bfloat16"),
}
# Batch shapes per model: responses, tokens per response row (prompt + response), micro-batch size.
BATCHES = {"small": dict(responses=64, seq_len=256, micro_batch=8),
           "1b": dict(responses=256, seq_len=1024, micro_batch=8)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: small on cpu, 1b on cuda")
    parser.add_argument("--layers", type=int, help="override the model's num_layers")
    parser.add_argument("--hidden", type=int, help="override hidden_size (ffn scales with it)")
    parser.add_argument("--responses", type=int, help="responses in the batch (a multiple of --group-size)")
    parser.add_argument("--seq-len", type=int, help="tokens per row, prompt + response")
    parser.add_argument("--micro-batch", type=int, help="responses per micro-batch")
    parser.add_argument("--group-size", type=int, default=16, help="responses per prompt (rollout.n)")
    parser.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per step (paper: 512/128)")
    parser.add_argument("--head-dim", type=int, default=512, help="contrastive.head.dim (track I: 512)")
    parser.add_argument("--kl-coef", type=float, default=0.0,
                        help="KL loss coefficient; > 0 adds a reference forward to both variants (a larger "
                             "baseline, so 0 gives the conservative overhead)")
    parser.add_argument("--repeats", type=int, default=5, help="timed (GRPO, CLIPO) pairs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense TFLOP/s of the device for the MFU estimate (H100 bf16: 989)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and torch.cuda.is_available():
        # The project picks CPU or GPU code paths from torch.cuda.is_available(); hide the GPU.
        parser.error("--device cpu on a machine with a GPU: run with CUDA_VISIBLE_DEVICES= to hide it")
    args.model = args.model or ("1b" if args.device == "cuda" else "small")
    for key, value in BATCHES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.responses % args.group_size:
        parser.error(f"--responses {args.responses} is not a multiple of --group-size {args.group_size}")
    return args


def build_config(args: argparse.Namespace) -> ClipoConfig:
    cfg = ClipoConfig()
    for key, value in MODELS[args.model].items():
        setattr(cfg.model, key, value)
    if args.layers:
        cfg.model.num_layers = args.layers
    if args.hidden:
        ratio = cfg.model.ffn_hidden_size / cfg.model.hidden_size
        cfg.model.hidden_size, cfg.model.ffn_hidden_size = args.hidden, int(round(args.hidden * ratio / 64)) * 64
    cfg.model.max_position_embeddings = max(args.seq_len, 128)
    cfg.parallel.micro_batch_size = args.micro_batch
    cfg.actor.num_mini_batches, cfg.actor.ppo_epochs = args.mini_batches, 1
    cfg.rollout.n, cfg.rollout.max_new_tokens = args.group_size, args.seq_len
    cfg.algorithm.kl_loss_coef = args.kl_coef
    cfg.contrastive.head.dim = args.head_dim
    cfg.contrastive.warmup_steps = 0  # every step updates the policy
    return cfg


def make_experience(cfg: ClipoConfig, args: argparse.Namespace) -> Experience:
    """A fixed batch: a quarter of each row is prompt, responses end at varied lengths, about half right."""
    g = torch.Generator().manual_seed(0)
    batch, seq_len = args.responses, args.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), generator=g)
    prompt_len = seq_len // 4
    response_end = torch.randint(prompt_len + seq_len // 4, seq_len + 1, (batch,), generator=g)
    positions = torch.arange(seq_len)
    response_mask = (positions >= prompt_len) & (positions < response_end[:, None])
    scores = (torch.rand(batch, generator=g) < 0.5).float()
    scores[:: args.group_size] = 1.0  # every group has a positive pair: the contrastive loss has work to do
    scores[1:: args.group_size] = 1.0
    group_ids = torch.arange(batch // args.group_size).repeat_interleave(args.group_size)
    return Experience(tokens, response_mask, scores, group_ids, torch.arange(batch))


@dataclass
class PhaseTimer:
    """Wall time of named phases inside one step (synchronising the GPU around each)."""

    sync: Callable[[], None]
    totals: Dict[str, float]

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
        return timed


def instrument(actor: Actor, timer: PhaseTimer) -> None:
    """Time the step's phases where learn_from_experience looks them up (instance/module attributes)."""
    actor.old_outputs = timer.wrap("old_forward", actor.old_outputs)
    if actor.reference is not None:
        actor.reference_logprobs = timer.wrap("ref_forward", actor.reference_logprobs)
    actor.update = timer.wrap("update", actor.update)
    step_module.parallel_contrastive_step = timer.wrap("head", step_module.parallel_contrastive_step)


def policy_matmul_params(actor: Actor, cfg: ClipoConfig) -> int:
    """Parameters that take part in matmuls: all but an untied input embedding (a table lookup)."""
    total = sum(p.numel() for p in actor.module.parameters())
    if not cfg.model.tie_word_embeddings:
        total -= actor.module.embedding.word_embeddings.weight.numel()
    return total


def describe(times: Dict[str, float]) -> str:
    """``7.71 s [old_forward 2.030, head 3.4 ms, update 5.680]``: the step and its timed phases."""
    phases = [f"{name} {value * 1e3:.1f} ms" if name == "head" else f"{name} {value:.3f}"
              for name, value in times.items() if name != "total"]
    return f"{times['total']:.3f} s [{', '.join(phases)}]"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state, validate_layout

    cfg = build_config(args)
    exp = make_experience(cfg, args)
    validate_layout(1, cfg.model, cfg.parallel, batch_size=args.responses, group_size=args.group_size)
    init_parallel_state(cfg.parallel)
    try:
        run(args, cfg, exp)
    finally:
        destroy_parallel_state()


def run(args: argparse.Namespace, cfg: ClipoConfig, exp: Experience) -> None:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    actor = Actor.build(cfg)
    actor.sync_reference()
    clipo = ClipoHead.build(cfg)
    timer = PhaseTimer(sync, {})
    instrument(actor, timer)
    params = policy_matmul_params(actor, cfg)
    head_params = sum(p.numel() for p in clipo.head.parameters())
    rows = args.responses * args.seq_len
    print(f"device {args.device}, model {args.model}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"ffn {cfg.model.ffn_hidden_size}, vocab {cfg.model.vocab_size}, {cfg.model.params_dtype}, "
          f"{params / 1e6:.1f}M matmul params; head {cfg.contrastive.head.type} {cfg.model.hidden_size}->"
          f"{cfg.contrastive.head.dim} ({head_params / 1e3:.0f}k params)")
    print(f"batch: {args.responses} responses x {args.seq_len} tokens ({exp.response_mask.sum().item()} response "
          f"tokens), groups of {args.group_size}, {args.mini_batches} optimizer steps x "
          f"{args.responses // args.mini_batches // args.micro_batch} micro-batches of {args.micro_batch}, "
          f"KL coef {args.kl_coef}, threads {torch.get_num_threads()}")

    step_index = 0

    def one_step(variant: str) -> Dict[str, float]:
        nonlocal step_index
        timer.totals.clear()
        sync()
        start = time.perf_counter()
        out = learn_from_experience(actor, clipo if variant == "clipo" else None, exp, cfg, step_index)
        sync()
        elapsed = time.perf_counter() - start
        step_index += 1
        if out.metrics.get("update_skipped"):
            raise SystemExit(f"{variant} step {step_index}: the policy update was skipped (non-finite grad norm)")
        return {"total": elapsed, **timer.totals}

    for _ in range(args.warmup):  # AdamW state, allocator and kernel warm-up, untimed
        one_step("grpo")
        one_step("clipo")

    pairs: List[Dict[str, Dict[str, float]]] = []
    for rep in range(args.repeats):
        order = ("grpo", "clipo") if rep % 2 == 0 else ("clipo", "grpo")
        pair = {variant: one_step(variant) for variant in order}
        pairs.append(pair)
        print(f"pair {rep + 1}/{args.repeats} ({order[0]} first): grpo {describe(pair['grpo'])} | "
              f"clipo {describe(pair['clipo'])} | {100 * (pair['clipo']['total'] / pair['grpo']['total'] - 1):+.2f}%",
              flush=True)

    grpo_s = statistics.median(p["grpo"]["total"] for p in pairs)
    clipo_s = statistics.median(p["clipo"]["total"] for p in pairs)
    head_s = statistics.median(p["clipo"]["head"] for p in pairs)
    overheads = [100 * (p["clipo"]["total"] - p["grpo"]["total"]) / p["grpo"]["total"] for p in pairs]
    print(f"median step: grpo {grpo_s:.3f} s, clipo {clipo_s:.3f} s; per-pair overhead min "
          f"{min(overheads):+.2f}% max {max(overheads):+.2f}% (machine noise)")
    print(f"head phase inside the clipo step (head forward, InfoNCE, rewards, AdamW, metrics): "
          f"{head_s * 1e3:.2f} ms median = {100 * head_s / grpo_s:.3f}% of a grpo step")
    forward_passes = 1 + (1 if cfg.algorithm.kl_loss_coef > 0 else 0)
    flops = (2 * forward_passes + 6 * cfg.actor.ppo_epochs) * params * rows  # 2N per token forward, 6N train
    print(f"tokens/s (all {rows} rows' positions per grpo step): {rows / grpo_s:,.0f}; "
          f"model FLOPs per step {flops:.3e} ((2*{forward_passes} forward + 6) * params * tokens)")
    if args.peak_tflops:
        print(f"MFU: {100 * flops / grpo_s / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops} TFLOP/s "
              f"(grpo), {100 * flops / clipo_s / (args.peak_tflops * 1e12):.1f}% (clipo)")
    print(f"overhead: {statistics.median(overheads):.2f}%")


if __name__ == "__main__":
    main()
