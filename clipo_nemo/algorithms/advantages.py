"""Group-relative advantages and the dynamic-sampling filter (SPEC step 10, DAPO).

All functions take per-response scalars [B] and ``group_ids`` [B] (any integers, groups need not be
contiguous or equally sized) and work with scatter reductions, without Python loops over groups.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from clipo_nemo.algorithms.checks import check_finite, check_shape

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
ADVANTAGE_ESTIMATORS: Dict[str, AdvantageFn] = {}


def register_advantage_estimator(name: str):
    def decorator(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def _group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response group size, group sum and unbiased group variance, each [B]."""
    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max().item()) + 1
    size = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, group_index, torch.ones_like(values))
    total = torch.zeros_like(size).index_add_(0, group_index, values)
    mean = total / size
    sq_dev = torch.zeros_like(size).index_add_(0, group_index, (values - mean[group_index]) ** 2)
    var = sq_dev / (size - 1).clamp(min=1)
    return size[group_index], total[group_index], var[group_index]


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``A_i = (R_i - mean_g R) / (std_g R + eps)``; std is unbiased (torch.std), as in verl.

    A group of one has no baseline: like verl, its mean is taken as 0 and its std as 1.
    """
    size, total, var = _group_stats(rewards, group_ids)
    single = size == 1
    mean = torch.where(single, torch.zeros_like(total), total / size)
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    return (rewards - mean) / (std + eps)


@register_advantage_estimator("grpo_no_std")
def grpo_no_std_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: ``A_i = R_i - mean_g R`` (no division by the group std; a group of one gets A = R)."""
    size, total, _ = _group_stats(rewards, group_ids)
    mean = torch.where(size == 1, torch.zeros_like(total), total / size)
    return rewards - mean


@register_advantage_estimator("loo")
def leave_one_out_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``A_i = R_i - mean_{j != i in g} R_j`` (RLOO); a group of one has no baseline and gets 0."""
    size, total, _ = _group_stats(rewards, group_ids)
    baseline = (total - rewards) / (size - 1).clamp(min=1)
    return torch.where(size > 1, rewards - baseline, torch.zeros_like(rewards))


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo",
                       eps: float = 1e-6) -> torch.Tensor:
    """Dispatch to a registered estimator. rewards [B] (total reward per response) -> advantages [B]."""
    check_shape("group_ids", group_ids, (rewards.shape[0],))
    check_finite("rewards", rewards)
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    if rewards.numel() == 0:
        return rewards.clone()
    return ADVANTAGE_ESTIMATORS[estimator](rewards, group_ids, eps)


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: [B] bool, True for members of groups whose rewards are all equal.

    Such groups have zero advantage everywhere and only dilute the batch. Groups of one count as
    zero-variance. Reward equality is exact, as the verifier rewards are 0/1.
    """
    check_shape("group_ids", group_ids, (rewards.shape[0],))
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max().item()) + 1
    group_max = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=rewards.device)
    group_min = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=rewards.device)
    r = rewards.double()
    group_max = group_max.scatter_reduce(0, group_index, r, reduce="amax")
    group_min = group_min.scatter_reduce(0, group_index, r, reduce="amin")
    return (group_max == group_min)[group_index]
