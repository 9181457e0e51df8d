"""Contrastive reward shaping and the combination with verifier rewards (SPEC step 8)."""
from __future__ import annotations

import torch

from clipo_nemo.algorithms.checks import check_finite, check_shape


def contrastive_rewards(
    per_anchor_loss: torch.Tensor,
    valid_anchor_mask: torch.Tensor,
    *,
    scale: float = 0.2,
    offset: float = 0.0,
    floor: float = -0.5,
) -> torch.Tensor:
    """``rc_i = max(c - lambda * L_i, floor)`` on valid anchors, ``max(c, floor)`` elsewhere.

    per_anchor_loss: [B] contrastive loss per response (computed before the head's update).
    valid_anchor_mask: [B] bool.
    Returns [B] rewards, detached: the reward is a signal for the policy, not a path for gradients.
    """
    check_shape("valid_anchor_mask", valid_anchor_mask, (per_anchor_loss.shape[0],))
    check_finite("per_anchor_loss", per_anchor_loss)
    loss = per_anchor_loss.detach()
    shaped = torch.where(valid_anchor_mask.bool(), offset - scale * loss, torch.full_like(loss, offset))
    return shaped.clamp(min=floor)


def token_level_rewards(sequence_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each response's scalar reward on its last response token.

    sequence_rewards: [B]; response_mask: [B, T] (1 on response tokens) -> [B, T].
    A response with no tokens gets an all-zero row: there is no token to credit.
    """
    check_shape("response_mask", response_mask, (sequence_rewards.shape[0], None))
    check_finite("sequence_rewards", sequence_rewards)
    mask = response_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values  # [B]
    rewards = torch.zeros(mask.shape, dtype=sequence_rewards.dtype, device=sequence_rewards.device)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] = sequence_rewards[has_tokens]
    return rewards


def permute_within_groups(
    rewards: torch.Tensor, rewarded_mask: torch.Tensor, group_ids: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The placebo arm's rewards: within each group, the rewards of the rewarded responses shuffled
    among those same responses (uniform random permutation from ``generator``); the others unchanged.

    rewards [B], rewarded_mask [B] bool, group_ids [B] -> [B]. The multiset of rewards in every group
    is kept (same noise, same reward distribution) while their link to the embeddings is broken.
    Groups are visited in ascending id order, so the draws depend only on the batch's contents.
    """
    check_shape("rewarded_mask", rewarded_mask, (rewards.shape[0],))
    check_shape("group_ids", group_ids, (rewards.shape[0],))
    out = rewards.clone()
    for group in torch.unique(group_ids).tolist():
        members = ((group_ids == group) & rewarded_mask.bool()).nonzero().flatten()
        if len(members) > 1:
            order = torch.randperm(len(members), generator=generator).to(members.device)
            out[members] = rewards[members[order]]
    return out
