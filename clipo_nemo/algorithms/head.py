"""The contrastive head and its update step (SPEC steps 4, 8, 9), single process.

The head maps the policy's pooled last hidden state ``h`` [B, H] to ``z = normalize(W h)`` [B, D].
It has its own AdamW and is trained only by the contrastive loss; the policy never sees the head's
gradient, only the reward computed from the loss *before* the head's update.
The tensor-parallel variant lives in ``clipo_nemo.models.head``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipo_nemo.algorithms.contrastive import contrastive_loss, positive_pair_cosine
from clipo_nemo.algorithms.rewards import contrastive_rewards
from clipo_nemo.config import ContrastiveConfig

HEAD_TYPES = ("linear", "mlp")


class ContrastiveHead(nn.Module):
    """``linear``: Linear(H, D, bias=False); ``mlp``: Linear(H, H) -> ReLU -> Linear(H, D), no biases.

    Weights are initialised like ``nn.Linear`` (Kaiming-uniform), as the paper's code does.
    """

    def __init__(self, hidden_size: int, dim: int, head_type: str = "linear"):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown contrastive head type {head_type!r}; choose one of {HEAD_TYPES}")
        if head_type == "linear":
            self.proj = nn.Linear(hidden_size, dim, bias=False)
        else:
            self.proj = nn.Sequential(nn.Linear(hidden_size, hidden_size, bias=False), nn.ReLU(),
                                      nn.Linear(hidden_size, dim, bias=False))

    def forward(self, pooled_hidden: torch.Tensor) -> torch.Tensor:
        """pooled_hidden [B, H] -> L2-normalised embeddings [B, D] (computed in the head's dtype)."""
        weight_dtype = next(self.parameters()).dtype
        return F.normalize(self.proj(pooled_hidden.to(weight_dtype)), dim=-1)


def build_head_optimizer(head: nn.Module, cfg: ContrastiveConfig) -> Optional[torch.optim.Optimizer]:
    """The head's own AdamW (lr 1e-3, weight decay 0.01 by default); ``None`` for a fixed head."""
    if cfg.head.fixed:
        return None
    return torch.optim.AdamW(head.parameters(), lr=cfg.head.lr, weight_decay=cfg.head.weight_decay)


def contrastive_loss_options(cfg: ContrastiveConfig) -> Dict[str, Any]:
    """The ``contrastive_loss`` keyword arguments ``cfg`` sets (everything but the batch and generator)."""
    return dict(loss_type=cfg.loss, similarity=cfg.similarity, temperature=cfg.temperature, level=cfg.level,
                eps=cfg.eps, anchors=cfg.anchors, skip_trivial=cfg.skip_trivial, row_shift=cfg.row_shift)


def rewarded_anchors(valid_anchor_mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[B] bool: the valid anchors that receive ``c - lambda * L`` (correct responses only, SPEC step 8)."""
    return valid_anchor_mask & correct.bool()


@dataclass
class HeadStepOutput:
    """rewards [B]: contrastive reward per response; per_anchor_loss [B]; valid_anchor_mask [B];
    metrics: detached scalars (contrastive_loss, pos_pair_cos, valid_anchor_frac);
    embeddings: the whole batch's head outputs before the update, detached (for plots)."""

    rewards: torch.Tensor
    per_anchor_loss: torch.Tensor
    valid_anchor_mask: torch.Tensor
    metrics: Dict[str, float]
    embeddings: Optional[torch.Tensor] = None


def contrastive_head_step(
    head: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    pooled_hidden: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    cfg: ContrastiveConfig,
    generator: Optional[torch.Generator] = None,
) -> HeadStepOutput:
    """One CLIPO head step: loss -> rewards (from the loss before the update) -> one AdamW step.

    pooled_hidden [B, H] (detached from the policy here), correct [B] bool, group_ids [B].
    With ``optimizer=None`` (``head.fixed``) the head is evaluated but never updated; with no valid
    anchor in the batch it takes no step either (weight decay would still move it).
    """
    embeddings = head(pooled_hidden.detach())
    out = contrastive_loss(embeddings, correct, group_ids, generator=generator, **contrastive_loss_options(cfg))
    rewards = contrastive_rewards(out.per_anchor_loss, rewarded_anchors(out.valid_anchor_mask, correct),
                                  scale=cfg.reward_scale, offset=cfg.reward_offset, floor=cfg.reward_floor)
    if optimizer is not None and bool(out.valid_anchor_mask.any()):
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    metrics = {
        "contrastive_loss": float(out.loss.detach()),
        "pos_pair_cos": float(positive_pair_cosine(embeddings, correct, group_ids)),
        "valid_anchor_frac": float(out.valid_anchor_mask.float().mean()) if len(correct) else 0.0,
        "contrastive_reward_mean": float(rewards.mean()) if len(correct) else 0.0,
    }
    return HeadStepOutput(rewards, out.per_anchor_loss.detach(), out.valid_anchor_mask, metrics, embeddings.detach())
