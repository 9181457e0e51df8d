"""One GRPO + CLIPO learning step, reading top to bottom as the data flows.

    experience (this DP rank's responses with verifier scores)
      -> one forward pass: old log-probs + pooled hidden states       (Actor.old_outputs)
      -> reference log-probs, if the KL loss is on                     (Actor.reference_logprobs)
      -> contrastive reward from the head's loss before its update     (parallel_contrastive_step)
      -> total reward -> group-normalised advantages over the global batch
      -> policy update (skipped during the head's warm-up)             (Actor.update)

Rollouts and verification, which produce the experience, come first in ``clipo_nemo.trainer.loop``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from clipo_nemo.algorithms.advantages import compute_advantages
from clipo_nemo.algorithms.policy_losses import truncated_importance_weights
from clipo_nemo.config import ClipoConfig
from clipo_nemo.models.forward import PolicyBatch
from clipo_nemo.models.head import ParallelContrastiveHead, parallel_contrastive_step
from clipo_nemo.parallel.gather import GlobalBatch, all_reduce_values
from clipo_nemo.trainer.actor import Actor, broadcast_from_last_stage


PLACEBO_SEED_OFFSET = 7919  # the placebo permutations' seed is contrastive.seed + this + step


@dataclass
class Experience:
    """This DP rank's responses.

    tokens [b, S] prompt + response (right padded); response_mask [b, S]; scores [b] verifier
    rewards; group_ids [b] the prompt each response answers; batch_index [b] its position in the
    global batch (fixes a layout-independent order); rollout_logprobs [b, S] the rollout engine's
    log-probs of the sampled tokens (NaN where it gave none), None for engines that return none.
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    scores: torch.Tensor
    group_ids: torch.Tensor
    batch_index: torch.Tensor
    rollout_logprobs: Optional[torch.Tensor] = None


@dataclass
class ClipoHead:
    """The contrastive head and its own optimizer (``None`` when the head is fixed)."""

    head: ParallelContrastiveHead
    optimizer: Optional[torch.optim.Optimizer]

    @classmethod
    def build(cls, cfg: ClipoConfig) -> "ClipoHead":
        from clipo_nemo.algorithms.head import build_head_optimizer

        head_cfg = cfg.contrastive.head
        # fp32 whatever the policy's dtype: the head is tiny and its loss has a small temperature.
        head = ParallelContrastiveHead(cfg.model.hidden_size, head_cfg.dim, head_cfg.type, head_cfg.tp_mode,
                                       seed=cfg.contrastive.seed, params_dtype=torch.float32)
        if torch.cuda.is_available():
            head.cuda()
        return cls(head, build_head_optimizer(head, cfg.contrastive))


@dataclass
class StepOutputs:
    """What one step computed for this rank's responses (tensors [b] or [b, S]) and global metrics."""

    old_logprobs: Optional[torch.Tensor]
    pooled_hidden: Optional[torch.Tensor]
    contrastive_loss: torch.Tensor
    contrastive_rewards: torch.Tensor
    advantages: torch.Tensor
    metrics: Dict[str, float] = field(default_factory=dict)
    head_embeddings: Optional[torch.Tensor] = None  # [B, D] global batch, canonical order (last PP stage)
    global_correct: Optional[torch.Tensor] = None  # [B] the verifier's verdicts in the same order


def _any_rank_nonfinite(old, ref_logprobs) -> bool:
    """Whether the old-policy (or reference) pass produced NaN/inf on any rank."""
    bad = old is not None and not (bool(torch.isfinite(old.logprobs).all()) and bool(torch.isfinite(old.pooled_hidden).all()))
    bad = bad or (ref_logprobs is not None and not bool(torch.isfinite(ref_logprobs).all()))
    return all_reduce_values([float(bad)], op=torch.distributed.ReduceOp.MAX)[0] > 0


def learn_from_experience(actor: Actor, clipo: Optional[ClipoHead], exp: Experience, cfg: ClipoConfig,
                          step: int) -> StepOutputs:
    """Run one learning step on this rank's ``exp`` (every rank of the job calls it together)."""
    from megatron.core import parallel_state

    batch = PolicyBatch(exp.tokens, exp.response_mask)
    dp_group = parallel_state.get_data_parallel_group()
    metrics: Dict[str, float] = {}
    clock = time.perf_counter()

    # 1. One forward pass for old log-probs and pooled hidden states (on the last PP stage).
    old = actor.old_outputs(batch)
    ref_logprobs = actor.reference_logprobs(batch)
    metrics["time/old_forward_s"], clock = time.perf_counter() - clock, time.perf_counter()
    if _any_rank_nonfinite(old, ref_logprobs):
        # A diverged policy: nothing learnable this step. Skip the head and the update; the loop
        # counts such steps and stops after trainer.max_consecutive_nonfinite in a row.
        zeros = torch.zeros(len(exp.scores))
        metrics.update(update_skipped=1.0, nonfinite_outputs=1.0, policy_updated=0.0,
                       reward_mean=float(GlobalBatch(exp.batch_index, dp_group).gather(exp.scores.float()).mean()))
        return StepOutputs(None, None, zeros, zeros, zeros, metrics)

    # 2. Contrastive reward from the head's loss before its update (the head lives on the last stage).
    contrastive_loss = torch.zeros(len(exp.scores))
    contrastive_rewards = torch.zeros(len(exp.scores))
    head_embeddings = None
    if clipo is not None and old is not None:
        generator = torch.Generator().manual_seed(cfg.contrastive.seed + step)  # same draws on every rank
        # The placebo's own stream, so that its InfoNCE draws (and hence losses) equal the CLIPO arm's.
        placebo = torch.Generator().manual_seed(cfg.contrastive.seed + PLACEBO_SEED_OFFSET + step) \
            if cfg.contrastive.placebo else None
        device = old.pooled_hidden.device
        head_out = parallel_contrastive_step(clipo.head, clipo.optimizer, old.pooled_hidden, (exp.scores > 0).to(device),
                                             exp.group_ids.to(device), exp.batch_index.to(device), cfg.contrastive,
                                             generator, dp_group, placebo_generator=placebo)
        contrastive_loss, contrastive_rewards = head_out.per_anchor_loss.cpu(), head_out.rewards.cpu()
        head_embeddings = head_out.embeddings
        metrics.update(head_out.metrics)
    if clipo is not None:
        contrastive_loss, contrastive_rewards, head_metrics = broadcast_from_last_stage(
            (contrastive_loss, contrastive_rewards, metrics))
        metrics.update(head_metrics)
    metrics["time/contrastive_s"], clock = time.perf_counter() - clock, time.perf_counter()

    # 3. Total reward and group-normalised advantages over the global batch.
    view = GlobalBatch(exp.batch_index, dp_group)
    scores = view.gather(exp.scores.float())
    totals = scores + view.gather(contrastive_rewards.float())
    advantages = view.local(compute_advantages(totals, view.gather(exp.group_ids), cfg.algorithm.adv_estimator,
                                               cfg.algorithm.adv_eps))
    metrics.update(reward_mean=float(scores.mean()), total_reward_mean=float(totals.mean()),
                   advantage_abs_mean=float(advantages.abs().mean()) if len(advantages) else 0.0)

    # 4. Policy update, unless the head is still warming up.
    metrics["policy_updated"] = float(step >= cfg.contrastive.warmup_steps)
    if step >= cfg.contrastive.warmup_steps:
        zeros = torch.zeros_like(exp.tokens, dtype=torch.float32)  # stand-ins on stages without outputs
        extras = {"old_logprobs": old.logprobs if old is not None else zeros, "advantages": advantages}
        if actor.reference is not None:
            extras["ref_logprobs"] = ref_logprobs if ref_logprobs is not None else zeros
        if cfg.actor.tis_cap is not None and exp.rollout_logprobs is not None:
            # The engine sampled from its own numerics: re-weight each token towards the trainer's.
            extras["tis_weights"] = (zeros + 1 if old is None else truncated_importance_weights(
                old.logprobs, exp.rollout_logprobs.to(old.logprobs.device), cfg.actor.tis_cap))
        metrics.update(actor.update(PolicyBatch(exp.tokens, exp.response_mask, extras)))
    metrics["time/update_s"] = time.perf_counter() - clock
    return StepOutputs(old.logprobs if old is not None else None, old.pooled_hidden if old is not None else None,
                       contrastive_loss, contrastive_rewards, advantages, metrics, head_embeddings, scores > 0)
