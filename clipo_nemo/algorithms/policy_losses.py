"""Policy losses (a registry), KL estimators and loss aggregation (SPEC policy-loss table).

Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``response_mask`` are [B, T] over the response
tokens of a (micro-)batch. Every loss returns ``(loss, metrics)`` where ``loss`` is a scalar tensor
and ``metrics`` a dict of detached scalar tensors.

Aggregation over a micro-batch that is part of a larger mini-batch (or spread over data-parallel
ranks) must divide by the *mini-batch's* token/sequence counts to be exact: pass them as
``LossNormalizer`` so that summing the micro-batch losses gives the mini-batch loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from clipo_nemo.algorithms.checks import check_finite

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0  # |logp - old_logp| cap before exp, against overflow on wildly off-policy tokens
GSPO_LOG_RATIO_CAP = 10.0  # SPEC: GSPO's token log-ratio is clamped at 10
# Losses whose aggregation is part of the loss (SPEC policy-loss table): ``loss_agg_mode`` does not
# apply to their policy term (it still aggregates the KL and entropy terms).
OWN_AGG_MODES = {"gspo": "seq-mean-token-mean"}


@dataclass
class LossNormalizer:
    """Counts to divide by, taken from the whole mini-batch; ``None`` = use the tensor's own.

    num_tokens: response tokens (token-mean).
    num_seqs: sequences with >= 1 response token (seq-mean-token-sum, seq-mean-token-mean, gmpo).
    max_response_length: divisor of seq-mean-token-sum-norm (default: T of the tensor; give the same
        constant to every micro-batch, e.g. ``rollout.max_new_tokens``, so their losses add up).
    """

    num_tokens: Optional[float] = None
    num_seqs: Optional[float] = None
    max_response_length: Optional[float] = None


@dataclass
class PolicyLossConfig:
    """Hyperparameters the registered losses read (a view of ``AlgorithmConfig``)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip_c: Optional[float] = 3.0  # grpo/dapo only (the authors' vanilla loss); None = off
    loss_agg_mode: str = "token-mean"


def _num_seqs(mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    if norm.num_seqs is not None:
        return torch.as_tensor(norm.num_seqs, dtype=mask.dtype)
    return (mask.sum(-1) > 0).sum().clamp(min=1).to(mask.dtype)


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str,
                   norm: Optional[LossNormalizer] = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] over ``mask`` [B, T] to a scalar.

    token-mean:              sum(L m) / #tokens
    seq-mean-token-sum:      mean over sequences of sum_t L m
    seq-mean-token-mean:     mean over sequences of (sum_t L m / #tokens of the sequence)
    seq-mean-token-sum-norm: sum over sequences of (sum_t L m) / max_response_length  (Dr. GRPO, as verl:
                             a total over the mini-batch, not a mean over sequences)
    Sequences without response tokens do not count in the seq-mean-token-sum/-mean modes.
    """
    norm = norm or LossNormalizer()
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    if mode == "token-mean":
        denom = norm.num_tokens if norm.num_tokens is not None else mask.sum().clamp(min=1)
        return masked.sum() / denom
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).sum() / _num_seqs(mask, norm)
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / _num_seqs(mask, norm)
    if mode == "seq-mean-token-sum-norm":
        max_len = norm.max_response_length if norm.max_response_length is not None else loss_mat.shape[-1]
        return masked.sum() / max_len
    raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {AGG_MODES}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return ((values * mask).sum() / mask.sum().clamp(min=1)).detach()


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate [B, T] from sampled-token log-probs [B, T].

    k1: logp - ref;  k2: (logp - ref)^2 / 2;
    k3 / low_var_kl: exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10] (Schulman's k3).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind in ("k3", "low_var_kl"):
        ref_minus = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (ref_minus.exp() - ref_minus - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown kl_loss_type {kind!r}; choose one of k1, k2, k3, low_var_kl")


# --------------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------------
PolicyLossFn = Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
POLICY_LOSSES: Dict[str, PolicyLossFn] = {}


def register_policy_loss(*names: str):
    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        for name in names:
            POLICY_LOSSES[name] = fn
        return fn

    return decorator


def _clipped_surrogate(ratio, advantages, mask, cfg: PolicyLossConfig, dual_clip_c: Optional[float]):
    """PPO clipped per-token loss ``max(-A r, -A clip(r, 1-el, 1+eh))`` [B, T]; with ``dual_clip_c = c``
    the loss of negative-advantage tokens is capped at ``-A c`` (``min(that, -A c)`` where A < 0)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"pg_clipfrac": _masked_mean((clipped > unclipped).to(ratio.dtype), mask)}
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        lower_cap = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > lower_cap)
        loss = torch.where(dual, lower_cap, loss)
        metrics["pg_clipfrac_lower"] = _masked_mean(dual.to(ratio.dtype), mask)
    return loss, metrics


@register_policy_loss("grpo", "dapo")
def vanilla_ppo_loss(logprobs, old_logprobs, advantages, response_mask, cfg: PolicyLossConfig,
                     norm: Optional[LossNormalizer] = None):
    """GRPO / DAPO: token ratio ``exp(logp - old)``, clip ``[1 - el, 1 + eh]`` (DAPO: el != eh),
    dual clip at ``cfg.dual_clip_c`` for negative advantages (the authors' default: 3)."""
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss_mat, metrics = _clipped_surrogate(log_ratio.exp(), advantages, response_mask, cfg, cfg.dual_clip_c)
    metrics["ppo_kl"] = _masked_mean(-log_ratio, response_mask)
    return aggregate_loss(loss_mat, response_mask, cfg.loss_agg_mode, norm), metrics


@register_policy_loss("gspo")
def gspo_loss(logprobs, old_logprobs, advantages, response_mask, cfg: PolicyLossConfig,
              norm: Optional[LossNormalizer] = None):
    """GSPO: sequence ratio ``s_i = exp(mean_t(logp - old))`` carried by every token as
    ``sg(s_i) * exp(logp_t - sg(logp_t))`` so each token's gradient is scaled by ``s_i``.

    As in the reference: no dual clip, and always aggregated with ``seq-mean-token-mean``
    (``OWN_AGG_MODES``) whatever ``cfg.loss_agg_mode`` says."""
    mask = response_mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()
    ratio = token_log_ratio.clamp(max=GSPO_LOG_RATIO_CAP).exp()
    loss_mat, metrics = _clipped_surrogate(ratio, advantages, response_mask, cfg, dual_clip_c=None)
    metrics["ppo_kl"] = _masked_mean(-log_ratio, response_mask)
    return aggregate_loss(loss_mat, response_mask, OWN_AGG_MODES["gspo"], norm), metrics


@register_policy_loss("gmpo")
def gmpo_loss(logprobs, old_logprobs, advantages, response_mask, cfg: PolicyLossConfig,
              norm: Optional[LossNormalizer] = None):
    """GMPO: geometric mean of token ratios with the clip applied to the log-ratio.

    ``d'_t = sgn(A) min(sgn(A) d_t, sgn(A) clip(d_t, -el, eh))``, ``ratio_i = exp(mean_t d'_t)``,
    loss ``-A_i ratio_i`` averaged over sequences (GMPO is sequence-level; ``loss_agg_mode`` is unused).
    The sequence advantage is the mean of ``advantages`` over its response tokens.
    """
    mask = response_mask.to(logprobs.dtype)
    tokens = mask.sum(-1).clamp(min=1)
    seq_adv = (advantages * mask).sum(-1) / tokens  # [B]
    sign = torch.sign(seq_adv).unsqueeze(-1)
    log_ratio = logprobs - old_logprobs
    clipped = log_ratio.clamp(-cfg.clip_ratio_low, cfg.clip_ratio_high)
    bounded = sign * torch.minimum(sign * log_ratio, sign * clipped)
    seq_ratio = ((bounded * mask).sum(-1) / tokens).exp()
    seq_loss = -seq_adv * seq_ratio
    has_tokens = (mask.sum(-1) > 0).to(logprobs.dtype)
    loss = (seq_loss * has_tokens).sum() / _num_seqs(mask, norm or LossNormalizer())
    metrics = {
        "pg_clipfrac": _masked_mean((bounded != log_ratio).to(logprobs.dtype), response_mask),
        "ppo_kl": _masked_mean(-log_ratio, response_mask),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Rollout-engine mismatch: the engine's log-probs against the training pass's
# --------------------------------------------------------------------------------------------------
def truncated_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights [B, T] ``min(exp(old - rollout), cap)``, detached.

    ``old_logprobs`` [B, T] are the training pass's log-probs of the sampled tokens under the weights
    that generated them, ``rollout_logprobs`` [B, T] the generation engine's for the same tokens; a
    token the engine scored as less likely than the trainer does is up-weighted, at most by ``cap``
    (>= 1). Positions where ``rollout_logprobs`` is NaN (not scored by the engine) get weight 1.
    Multiply each token's policy loss by it (for the token-level losses this equals scaling the
    advantage, since their per-token loss is linear in it with a positive factor).
    """
    if cap < 1:
        raise ValueError(f"tis cap must be >= 1, got {cap}")
    if old_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} and rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} differ in shape")
    log_ratio = (old_logprobs.detach() - rollout_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    weights = log_ratio.exp().clamp(max=cap)
    return torch.where(torch.isnan(rollout_logprobs), torch.ones_like(weights), weights)


def logprob_mismatch(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> Tuple[float, float, float]:
    """``(sum, count, max)`` of ``|train - rollout|`` [B, T] over ``mask`` [B, T] positions where the
    rollout log-prob is known (not NaN): sums and counts add over ranks, the mean is sum / count."""
    known = mask.bool() & ~torch.isnan(rollout_logprobs)
    diff = (train_logprobs.double() - rollout_logprobs.double()).abs()[known]
    return float(diff.sum()), float(diff.numel()), float(diff.max()) if diff.numel() else 0.0


def compute_policy_loss(name: str, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, response_mask: torch.Tensor, cfg: PolicyLossConfig,
                        norm: Optional[LossNormalizer] = None):
    """Look up ``name`` in the registry and apply it; checks inputs for NaN/inf first."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy_loss {name!r}; choose one of {sorted(POLICY_LOSSES)}")
    for tensor_name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        if tensor.shape != response_mask.shape:
            raise ValueError(f"{tensor_name} has shape {tuple(tensor.shape)}, response_mask {tuple(response_mask.shape)}")
        check_finite(tensor_name, tensor)
    return POLICY_LOSSES[name](logprobs, old_logprobs, advantages, response_mask, cfg, norm)
