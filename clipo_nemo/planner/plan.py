"""The per-GPU memory plan of a run: every component in each phase of a step, the peak, and the fit.

A step has three phases with different residents (:func:`plan_memory`):

- ``rollout``: generation. Weights, head, the KV cache of the rows decoded together (training or
  validation, whichever is larger) and the generation logits; the gradient buffer, the optimizer
  state and the reference (unless offloaded) too, unless ``actor.release_for_rollout`` moves them
  off the GPU while generating.
- ``logprobs``: the no-grad old-policy and reference passes and the contrastive head's step. The same
  static state plus the reference weights (on the GPU during its own pass even when offloaded), one
  layer's transient activations, the fused log-prob pass's chunk buffers (no full logits) and the
  contrastive loss's similarity temporaries over the global batch (quadratic in ``rollout.n``).
- ``update``: the policy update. Static state (reference only if not offloaded), the activations
  kept for backward (recompute mode, micro-batch token budget, 1F1B in-flight micro-batches) with
  the unfused attention's backward transient, and the fused log-prob pass's buffers (chunks, the
  output weight's gradient). The log-prob pass's buffers are freed before the layers' backward
  starts, so with megatron's local attention ``logprob_pass`` counts only what exceeds the
  attention's backward transient (``components.train_step_peak_bytes``).

With megatron's local (unfused) attention every phase also holds ``attention_buffer``: megatron's
global [b n_h / t, s, s] score buffer, allocated at the first training forward and never freed.
(Generation prefills use it too, at [prompts n_h / t, p, p]: smaller than a training micro-batch's
for these configs, and their softmax transients are not modelled.)

With ``rollout.engine=trtllm`` the rollout phase holds the TensorRT-LLM engine's weights and KV
cache instead of the megatron engine's KV cache and logits (:mod:`clipo_nemo.planner.trtllm`).

Each phase gets a framework overhead: :data:`OVERHEAD_FIXED_GIB` (CUDA context, cuBLAS/cuDNN
workspaces, NCCL communicators) plus :data:`OVERHEAD_FRACTION` of the phase's tensors (allocator
fragmentation). Both are estimates (not calibrated on a GPU here). The plan is made for the worst
pipeline stage (first: most in-flight activations, embedding; last: output layer, logits, head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from clipo_nemo.config import ClipoConfig, max_sequence_length
from clipo_nemo.planner import components as c
from clipo_nemo.planner.trtllm import apply_trtllm_engine
from clipo_nemo.rollout.kv_slots import timeline_length

GIB = 1024 ** 3
AUTO = "auto"  # rollout.kv_cache_gb: derived by the plan (derived_kv_cache_gib)
HEADROOM = 0.9  # share of the per-GPU budget that recommended layouts and the auto KV budget plan to fill:
#   the rest is for what the plan does not calibrate (NCCL buffers, optimizer-step transients, fragmentation)
OVERHEAD_FIXED_GIB = 2.5
OVERHEAD_FRACTION = 0.08
PHASES = ("rollout", "logprobs", "update")
COMPONENTS = ("weights", "gradients", "optimizer", "reference", "head", "contrastive", "activations", "attention_buffer",
              "logprob_pass", "kv_cache", "generation_logits", "engine_weights", "engine_kv_cache", "overhead")


class MemoryPlanError(ValueError):
    """The layout does not fit the per-GPU memory budget; the message is the plan's breakdown."""


@dataclass(frozen=True)
class Layout:
    """What the plan was made for (read from the config)."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    tokens_per_micro_batch: int  # T: padded tokens of one micro-batch (token budget or rows x longest)
    recompute: str
    kv_cache_gib: float
    generation_rows: int  # rows decoded together (the largest generation: training or validation)
    reference: str  # "none" (no KL term), "offloaded" (CPU between its passes) or "on GPU"

    def describe(self) -> str:
        return (f"world {self.world_size} = TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp}"
                f"{' (sequence parallel)' if self.sequence_parallel else ''}, "
                f"{self.tokens_per_micro_batch} tokens/micro-batch, recompute={self.recompute}, "
                f"{self.generation_rows} generation rows (KV budget {self.kv_cache_gib:g} GiB), "
                f"reference {self.reference}")


@dataclass
class MemoryPlan:
    """Bytes per component and phase for one GPU of the worst pipeline stage."""

    layout: Layout
    stage: int
    phases: Dict[str, Dict[str, int]]  # phase -> component -> bytes
    budget_bytes: int
    notes: List[str] = field(default_factory=list)

    @property
    def totals(self) -> Dict[str, int]:
        return {phase: sum(parts.values()) for phase, parts in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.totals
        return max(totals, key=totals.get)

    @property
    def total_bytes(self) -> int:
        return self.totals[self.peak_phase]

    @property
    def components(self) -> Dict[str, int]:
        """The peak phase's components."""
        return self.phases[self.peak_phase]

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def verdict(self) -> str:
        """``fits: yes (<total> GiB of <budget> GiB per GPU)`` or ``fits: no (...)``."""
        word = "yes" if self.fits else "no"
        return f"fits: {word} ({self.total_bytes / GIB:.1f} GiB of {self.budget_bytes / GIB:g} GiB per GPU)"

    def table(self) -> str:
        """The breakdown: components (rows) x phases (columns), GiB per GPU, peak phase marked."""
        peak = self.peak_phase
        heads = [f"{p}{' (peak)' if p == peak else ''}" for p in PHASES]
        lines = [f"memory plan per GPU, pipeline stage {self.stage}: {self.layout.describe()}",
                 f"{'component':<16}" + "".join(f"{h:>18}" for h in heads)]
        for name in COMPONENTS:
            lines.append(f"{name:<16}" + "".join(f"{self.phases[p][name] / GIB:>18.2f}" for p in PHASES))
        lines.append(f"{'total GiB':<16}" + "".join(f"{self.totals[p] / GIB:>18.2f}" for p in PHASES))
        lines.append(f"budget: {self.budget_bytes / GIB:g} GiB per GPU")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def micro_batch_tokens(cfg: ClipoConfig) -> int:
    """Padded tokens of the largest micro-batch: the token budget (at least one longest row) or
    ``micro_batch_size`` rows of the longest prompt + response."""
    seq_len = max_sequence_length(cfg)
    budget = cfg.parallel.max_tokens_per_micro_batch
    return max(budget, seq_len) if budget > 0 else cfg.parallel.micro_batch_size * seq_len


def generation_rows(cfg: ClipoConfig, per_row_bytes: int, rows_needed: Optional[int]) -> int:
    """Rows the rollout engine decodes together: what ``rollout.kv_cache_gb`` holds at
    ``per_row_bytes`` each, capped by ``rollout.max_batch_size`` and by ``rows_needed`` (None =
    unknown, e.g. validation: the cap)."""
    rows = int(cfg.rollout.kv_cache_gb * GIB // per_row_bytes)
    if rows < 1:
        raise ValueError(f"rollout.kv_cache_gb={cfg.rollout.kv_cache_gb:g} holds no response: one row's KV cache "
                         f"is {per_row_bytes / GIB:.3g} GiB per GPU")
    if cfg.rollout.max_batch_size is not None:
        rows = min(rows, cfg.rollout.max_batch_size)
    return rows if rows_needed is None else min(rows, rows_needed)


def plan_memory(cfg: ClipoConfig, world_size: int, gpu_memory_gib: float, *, on_gpu: bool = True,
                flash_attention: Optional[bool] = None) -> MemoryPlan:
    """The per-GPU plan for ``cfg`` on ``world_size`` ranks (worst pipeline stage).

    ``on_gpu`` picks the optimizer accounting (megatron's optimizer with its fp32 master copy and
    the distributed optimizer, or ``torch.optim`` on CPU); ``flash_attention`` (default: ``on_gpu``)
    the attention activations (Transformer Engine's fused attention, or megatron's local unfused
    attention with its [heads, s, s] probabilities). ``rollout.kv_cache_gb=auto`` is planned at
    :func:`derived_kv_cache_gib`.
    """
    if cfg.rollout.kv_cache_gb == AUTO and cfg.rollout.engine != "megatron":
        # Only the megatron engine decodes in rollout.kv_cache_gb (another engine sizes its own cache):
        # plan it at one row, which that engine's phase replaces anyway.
        one_row = _one_row_gib(cfg)
        plans = _stage_plans(_with_kv_budget(cfg, one_row), world_size, gpu_memory_gib, on_gpu, flash_attention)
    elif cfg.rollout.kv_cache_gb == AUTO:
        kv, one_row = _remaining_kv_gib(cfg, world_size, gpu_memory_gib, on_gpu, flash_attention)
        note = (f"rollout.kv_cache_gb=auto: {kv:g} GiB, what the rollout phase leaves of {HEADROOM:.0%} of "
                f"{gpu_memory_gib:g} GiB"
                if kv >= one_row else f"rollout.kv_cache_gb=auto: the rollout phase leaves no room for one "
                f"response's KV cache ({one_row:.3g} GiB); planned with one")
        plans = _stage_plans(_with_kv_budget(cfg, max(kv, one_row)), world_size, gpu_memory_gib, on_gpu,
                             flash_attention)
        for plan in plans:
            plan.notes.append(note)
    else:
        plans = _stage_plans(cfg, world_size, gpu_memory_gib, on_gpu, flash_attention)
    return max(plans, key=lambda plan: plan.total_bytes)


def derived_kv_cache_gib(cfg: ClipoConfig, world_size: int, gpu_memory_gib: float, *, on_gpu: bool = True,
                         flash_attention: Optional[bool] = None) -> float:
    """``rollout.kv_cache_gb=auto``: the KV budget (GiB, rounded down to 1 MiB) that fills the rollout
    phase of every pipeline stage up to :data:`HEADROOM` of ``gpu_memory_gib``: what remains after the weights, the
    training state that stays during generation, the reference (unless offloaded), the generation
    logits and sampling temporaries, and the overhead (which grows with the tensors it holds).

    The logits grow with the rows decoded together; they are counted at the rows of the budget
    before they are subtracted (more rows than the result holds), so the plan at the result fits.
    Raises ``ValueError`` when not even one response's KV cache remains.
    """
    kv, one_row = _remaining_kv_gib(cfg, world_size, gpu_memory_gib, on_gpu, flash_attention)
    if kv < one_row:
        raise ValueError(f"rollout.kv_cache_gb=auto: the rollout phase leaves {max(kv, 0):.3g} GiB of "
                         f"trainer.gpu_memory_gib={gpu_memory_gib:g} for the KV cache, less than one response "
                         f"({one_row:.3g} GiB); free memory (actor.reference_offload, a larger TP/PP) or raise the budget")
    return kv


def _remaining_kv_gib(cfg: ClipoConfig, world_size: int, gpu_memory_gib: float, on_gpu: bool,
                      flash_attention: Optional[bool]):
    """(the KV budget :func:`derived_kv_cache_gib` derives, maybe below one row; one row's GiB)."""
    one_row = _one_row_gib(cfg)

    def remaining(kv: float) -> float:  # GiB left for KV on the tightest stage, logits at kv's rows
        left = []
        for plan in _stage_plans(_with_kv_budget(cfg, kv), world_size, gpu_memory_gib, on_gpu, flash_attention):
            parts = plan.phases["rollout"]
            others = sum(parts.values()) - parts["overhead"] - parts["kv_cache"]
            target = HEADROOM * gpu_memory_gib * GIB
            usable = (target - OVERHEAD_FIXED_GIB * GIB) / (1 + OVERHEAD_FRACTION) if on_gpu else target
            left.append((usable - others) / GIB)
        return min(left)

    first = remaining(one_row)  # logits of one row: an upper bound of the budget
    kv = remaining(first) if first >= one_row else first
    return math.floor(kv * 1024) / 1024, one_row


def _with_kv_budget(cfg: ClipoConfig, kv_gib: float) -> ClipoConfig:
    return replace(cfg, rollout=replace(cfg.rollout, kv_cache_gb=kv_gib))


def _mp(cfg: ClipoConfig):
    return cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size


def _max_new_tokens(cfg: ClipoConfig) -> List[int]:
    validating = cfg.data.val_files and cfg.evaluation.every_steps
    return [cfg.rollout.max_new_tokens] + ([cfg.evaluation.max_new_tokens] if validating else [])


def _one_row_gib(cfg: ClipoConfig) -> float:
    """GiB of one response row's KV cache at the longer of the training and validation lengths."""
    return max(_per_row_bytes(cfg, *_mp(cfg), max_new) for max_new in _max_new_tokens(cfg)) / GIB


def _per_row_bytes(cfg: ClipoConfig, tp: int, pp: int, max_new_tokens: int) -> int:
    """KV bytes of one response row on one rank, as the rollout engine sizes its rows: the longest
    prompt + ``max_new_tokens`` (continuous batching: its timeline, with slack)."""
    longest = cfg.data.max_prompt_length + max_new_tokens
    if cfg.rollout.engine == "megatron" and cfg.rollout.batching == "continuous":
        longest = timeline_length(longest)
    return c.kv_cache_bytes_per_row(cfg.model, tp, pp, longest, c.dtype_bytes(cfg.model))


def _stage_plans(cfg: ClipoConfig, world_size: int, gpu_memory_gib: float, on_gpu: bool,
                 flash_attention: Optional[bool]) -> List[MemoryPlan]:
    """The plan of each pipeline stage that can be the worst (first, last) at a numeric KV budget."""
    par, model = cfg.parallel, cfg.model
    tp, pp, cp = par.tensor_parallel_size, par.pipeline_parallel_size, par.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not a multiple of TP*PP*CP = {tp * pp * cp}")
    flash = on_gpu if flash_attention is None else flash_attention
    dp = world_size // (tp * pp * cp)
    seq_len = max_sequence_length(cfg)
    tokens = micro_batch_tokens(cfg)
    notes: List[str] = []

    ev = cfg.evaluation
    roll = cfg.rollout
    generations = [_generation(cfg, tp, pp, "training", roll.max_new_tokens, roll.n,
                               max(cfg.trainer.prompts_per_step // dp, 1) * roll.n, roll.temperature, roll.top_p)]
    if cfg.data.val_files and ev.every_steps:
        generations.append(_generation(cfg, tp, pp, "validation", ev.max_new_tokens, ev.k, None, ev.temperature,
                                       ev.top_p))
    generation = max(generations, key=lambda g: g.kv_bytes + g.logits_bytes)
    notes.append(f"the largest generation is {generation.label}'s ({generation.rows} rows decoded together)")
    if par.max_tokens_per_micro_batch and par.max_tokens_per_micro_batch < seq_len:
        notes.append(f"parallel.max_tokens_per_micro_batch={par.max_tokens_per_micro_batch} is below the "
                     f"longest row ({seq_len} tokens): such a row is a micro-batch of its own")
    reference = "none" if cfg.algorithm.kl_loss_coef == 0 else "offloaded" if cfg.actor.reference_offload else "on GPU"
    layout = Layout(world_size, tp, pp, cp, dp, par.sequence_parallel, tokens, model.recompute,
                    cfg.rollout.kv_cache_gb, generation.rows, reference)
    return [_stage_plan(cfg, layout, stage, seq_len, generation, on_gpu, flash, gpu_memory_gib, notes)
            for stage in sorted({0, pp - 1})]


@dataclass(frozen=True)
class Generation:
    """One generation chunk of the rollout engine (training rollouts or validation)."""

    label: str
    rows: int
    kv_bytes: int
    logits_bytes: int  # on the last stage: components.generation_logits_bytes


def _generation(cfg: ClipoConfig, tp: int, pp: int, label: str, max_new_tokens: int, n: int,
                rows_needed: Optional[int], temperature: float, top_p: float) -> Generation:
    model = cfg.model
    per_row = _per_row_bytes(cfg, tp, pp, max_new_tokens)
    rows = generation_rows(cfg, per_row, rows_needed)
    prompts = min(-(-rows // n) + 1, rows)  # a chunk may start and end inside a prompt's n rows
    logits = c.generation_logits_bytes(model, prompts, rows, temperature=temperature, top_p=top_p)
    return Generation(label, rows, rows * per_row, logits)


def _stage_plan(cfg: ClipoConfig, layout: Layout, stage: int, seq_len: int, generation: Generation, on_gpu: bool,
                flash: bool, gpu_memory_gib: float, notes: List[str]) -> MemoryPlan:
    model, tp, pp, tokens = cfg.model, layout.tp, layout.pp, layout.tokens_per_micro_batch
    b = c.dtype_bytes(model)
    last = stage == pp - 1
    params = c.stage_parameters(model, tp, pp, stage)
    weights = params * b
    gradients = params * 4  # megatron DDP's fp32 main-grad buffer (grad_reduce_in_fp32)
    distributed = on_gpu and cfg.actor.use_distributed_optimizer
    optimizer = params * c.optimizer_bytes_per_parameter(model, cfg.actor.optimizer, on_gpu)
    if distributed:
        optimizer = -(-optimizer // layout.dp)
    reference = weights if cfg.algorithm.kl_loss_coef > 0 else 0
    head = 0
    if cfg.contrastive.enabled and last:  # fp32 weights, gradients and AdamW moments
        head_cfg = cfg.contrastive.head
        head = 16 * c.head_parameters(model.hidden_size, head_cfg.dim, head_cfg.type, tp, head_cfg.tp_mode)
    chunk = min(cfg.actor.logprob_chunk_size or tokens, tokens)
    static = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "head": head,
              "attention_buffer": c.attention_score_buffer_bytes(model, tp, tokens, seq_len, flash_attention=flash)}
    resident_reference = 0 if cfg.actor.reference_offload else reference
    sequence_parallel = cfg.parallel.sequence_parallel
    saved = c.stage_saved_activation_bytes(model, tp, pp, stage, tokens, seq_len, recompute=model.recompute,
                                           recompute_num_layers=model.recompute_num_layers, flash_attention=flash,
                                           sequence_parallel=sequence_parallel)
    attention = c.attention_backward_extra_bytes(model, tp, tokens, seq_len, recompute=model.recompute,
                                                 flash_attention=flash, sequence_parallel=sequence_parallel)
    # The update's peak by the rule the GPU check measures; the score buffer is already in `static`.
    update_peak = c.train_step_peak_bytes(model, tp, pp, stage, tokens, seq_len, recompute=model.recompute,
                                          recompute_num_layers=model.recompute_num_layers, flash_attention=flash,
                                          scored_tokens=tokens, logprob_chunk=chunk,
                                          sequence_parallel=sequence_parallel, score_buffer_allocated=True)

    rollout_static = static
    if cfg.actor.release_for_rollout:  # trainer/memory_release.py: off the GPU while generating
        rollout_static = {**static, "gradients": 0, "optimizer": 0}
    phases = {
        "rollout": {**rollout_static, "reference": 0 if cfg.actor.release_for_rollout else resident_reference,
                    "generation_logits": generation.logits_bytes if last else 0, "kv_cache": generation.kv_bytes},
        "logprobs": {**static, "reference": reference,
                     "activations": c.forward_only_activation_bytes(model, tp, tokens, seq_len, flash_attention=flash),
                     "logprob_pass": c.logprob_pass_bytes(model, tp, tokens, chunk, with_grad=False) if last else 0,
                     "contrastive": c.contrastive_bytes(cfg.trainer.prompts_per_step, cfg.rollout.n,
                                                        cfg.contrastive.level) if last and cfg.contrastive.enabled else 0},
        "update": {**static, "reference": resident_reference, "activations": saved + attention,
                   # freed before the layers' backward: only what exceeds the attention's transient
                   "logprob_pass": update_peak - saved - attention},
    }
    if cfg.rollout.engine == "trtllm":
        apply_trtllm_engine(cfg, phases, notes)
    for parts in phases.values():
        for name in COMPONENTS:
            parts.setdefault(name, 0)
        tensors = sum(parts.values())
        parts["overhead"] = int(OVERHEAD_FIXED_GIB * GIB + OVERHEAD_FRACTION * tensors) if on_gpu else 0
    return MemoryPlan(layout, stage, phases, int(gpu_memory_gib * GIB), list(notes))


def rollout_breakdown(plan: MemoryPlan) -> str:
    """The rollout phase of ``plan`` (GiB per GPU, non-zero parts), its KV budget, and a last line
    ``rollout_rows: <n>``: the responses decoded at once per model-parallel group (the megatron engine;
    TensorRT-LLM sizes its batches itself, from ``rollout.trtllm_kv_cache_gb``)."""
    parts = plan.phases["rollout"]
    native = not parts.get("engine_kv_cache")  # rollout.engine=trtllm: the engine batches in its own KV cache
    budget = f"KV budget {plan.layout.kv_cache_gib:g} GiB" if native else "TensorRT-LLM batches in engine_kv_cache"
    lines = [f"rollout phase, GiB per GPU ({budget}): " + ", ".join(
        f"{name} {parts[name] / GIB:.2f}" for name in COMPONENTS if parts[name]) +
        f"; total {plan.totals['rollout'] / GIB:.2f}"]
    if native:
        lines.append(f"rollout_rows: {plan.layout.generation_rows}")
    return "\n".join(lines)


def check_memory_plan(cfg: ClipoConfig, world_size: int, *, on_gpu: bool) -> Optional[MemoryPlan]:
    """The trainer's start-up check: None when ``trainer.gpu_memory_gib`` is 0 (no check); else the
    plan, raising :class:`MemoryPlanError` with the breakdown when the layout does not fit.

    It runs on every device: on a CPU-only machine it plans with the CPU accounting (``torch.optim``
    state, no CUDA overhead, unfused attention) against the same budget, which the small CPU
    configs meet by orders of magnitude and the real models do not.
    """
    from clipo_nemo.models.policy import transformer_engine_available

    budget = cfg.trainer.gpu_memory_gib
    if budget <= 0:
        return None
    # The attention the run will use: Transformer Engine's fused attention, else megatron's local one.
    plan = plan_memory(cfg, world_size, budget, on_gpu=on_gpu,
                       flash_attention=on_gpu and transformer_engine_available())
    if not plan.fits:
        raise MemoryPlanError(
            f"this layout does not fit trainer.gpu_memory_gib={budget:g} per GPU (set it to 0 to skip the "
            f"check; `python tools/plan_layout.py` recommends layouts):\n{plan.table()}\n{plan.verdict()}")
    return plan
