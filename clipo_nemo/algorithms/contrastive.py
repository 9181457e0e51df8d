"""Contrastive losses over one batch of response embeddings (SPEC steps 5-7).

Every response ``i`` has an embedding ``z_i``, a correctness flag and a group id (the prompt it
answers). For an anchor ``i`` the *positives* ``P(i)`` and the *candidates* ``A(i)`` (the
log-sum-exp denominator) depend on the level:

- ``group``: P = other correct members of i's group, A = all other members of i's group.
- ``cross``: P as in ``group``, A = every other response of the batch.
- ``batch``: P = every other correct response of the batch, A = every other response.

``anchors`` picks which responses act as anchors (the reference's ``masked_label``): ``correct``
(default), ``incorrect`` or ``all``; an anchor's positives are the candidates (of its group, or of
the batch at ``batch`` level) with the same correctness as the anchor, so a correct anchor's are the
correct ones above. With ``skip_trivial`` (default) an anchor is valid when it has >= 1 positive and
>= 1 negative (a candidate that is not a positive); without it every selected anchor that has a
candidate is valid and counts in the mean, an anchor without positives with loss 0.
Invalid anchors get loss 0.

Numerics (SPEC step 7): the logits of anchor ``i``'s row (itself and its candidates) are shifted by
their maximum, which includes the self-similarity (``1/tau`` for cosine), and every log of a sum of
exponentials is ``log(sum + eps)``, as in the authors' code (``eps = 1e-8``); ``eps = 0`` gives the
exact log-sum-exp. ``row_shift="batch"`` shifts by the maximum of the anchor's whole row of the
batch instead (other groups included), as the authors' code does; the two differ only where that
maximum is not the self-similarity (``neg_cosine``) and only through eps. The group level is computed per group on a padded
``[G, n, n]`` similarity tensor: O(B * n * D) work instead of a dense ``B x B`` matrix (the paper's
batch is 512 prompts x 16 rollouts). ``cross``/``batch`` need every pair by definition.

The InfoNCE positive is drawn uniformly from ``P(i)``: one uniform number ``u_i`` per response,
drawn in batch order from an explicit ``torch.Generator``, picks the ``floor(u_i * |P(i)|)``-th
positive in batch order. The draw depends only on the batch, never on how it is laid out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from clipo_nemo.algorithms.checks import check_finite, check_shape

LEVELS = ("group", "cross", "batch")
SIMILARITIES = ("cosine", "l2", "neg_cosine")
ANCHORS = ("correct", "incorrect", "all")  # which responses are anchors (the reference's masked_label 0 / 1 / -1)
# What each anchor's logits are shifted by before the eps-logs: the maximum over the anchor itself and its
# candidates ("candidates"), or over its whole row of the batch, other groups included ("batch", the authors').
ROW_SHIFTS = ("candidates", "batch")
AUTHORS_EPS = 1e-8  # the authors' eps inside every log of a sum of exponentials
L2_EPS = 1e-8  # floor under 2 - 2s before the square root of the l2 similarity


@dataclass
class ContrastiveLossOutput:
    """Result of :func:`contrastive_loss`.

    per_anchor_loss:   [B] loss of each anchor, 0 where the anchor is not valid.
    valid_anchor_mask: [B] bool, the anchors that count.
    loss:              scalar, mean of ``per_anchor_loss`` over valid anchors (0 if there are none).
    """

    per_anchor_loss: torch.Tensor
    valid_anchor_mask: torch.Tensor
    loss: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Per-anchor losses: a registry, one function per loss type.
# Each takes the row-shifted logits [..., M], pos_mask [..., M], the index of the drawn positive [...],
# the candidate log-sum-exp [...] and eps, and returns the per-anchor loss [...] (garbage where invalid).
# --------------------------------------------------------------------------------------------------
AnchorLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
CONTRASTIVE_LOSSES: Dict[str, AnchorLossFn] = {}


def register_contrastive_loss(name: str) -> Callable[[AnchorLossFn], AnchorLossFn]:
    def decorator(fn: AnchorLossFn) -> AnchorLossFn:
        CONTRASTIVE_LOSSES[name] = fn
        return fn

    return decorator


def log_sum_exp(logits: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """``log(sum_{mask} exp(logits) + eps)`` over the last dim: [..., M] -> [...].

    ``eps = 0``: the exact log-sum-exp (finite, meaningless, for empty rows). ``eps > 0``: the
    authors' form; the logits must already be shifted so that none is positive (no overflow).
    """
    if eps == 0:
        # The dtype's most negative finite number instead of -inf keeps gradients of empty rows finite.
        return torch.logsumexp(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)
    return torch.log(logits.masked_fill(~mask, float("-inf")).exp().sum(-1) + eps)


@register_contrastive_loss("infonce")
def _infonce(logits, pos_mask, drawn_positive, candidate_lse, eps):
    drawn = logits.gather(-1, drawn_positive.unsqueeze(-1)).squeeze(-1)
    return -(drawn - candidate_lse)


@register_contrastive_loss("supcon_out")
def _supcon_out(logits, pos_mask, drawn_positive, candidate_lse, eps):
    num_pos = pos_mask.sum(-1).clamp(min=1)
    pos_logit_mean = (logits * pos_mask).sum(-1) / num_pos
    return -(pos_logit_mean - candidate_lse)


@register_contrastive_loss("supcon_in")
def _supcon_in(logits, pos_mask, drawn_positive, candidate_lse, eps):
    num_pos = pos_mask.sum(-1).clamp(min=1)
    log_mean_exp_pos = log_sum_exp(logits, pos_mask, eps) - num_pos.to(logits.dtype).log()
    return -(log_mean_exp_pos - candidate_lse)


@register_contrastive_loss("soft_nn")
def _soft_nn(logits, pos_mask, drawn_positive, candidate_lse, eps):
    return -(log_sum_exp(logits, pos_mask, eps) - candidate_lse)


@dataclass(frozen=True)
class AnchorRule:
    """Which anchors count and how their losses are computed (see module doc).

    loss_type: a CONTRASTIVE_LOSSES name; anchors: one of ANCHORS; skip_trivial: drop anchors
    without a positive or without a negative; eps: inside every log of a sum of exponentials;
    row_shift: one of ROW_SHIFTS.
    """

    loss_type: str = "infonce"
    anchors: str = "correct"
    skip_trivial: bool = True
    eps: float = AUTHORS_EPS
    row_shift: str = "candidates"


def _anchor_losses(
    logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    pos_mask: torch.Tensor,
    anchor_selected: torch.Tensor,
    uniform: torch.Tensor,
    rule: AnchorRule,
    batch_row_max: Optional[torch.Tensor] = None,
):
    """Per-anchor losses for anchors laid out along ``[...]`` against candidates ``[..., M]``.

    logits [..., M] with the anchor's own (self-similarity) logit on the diagonal of the last two
    dims; candidate_mask, pos_mask: [..., M]; anchor_selected, uniform: [...]; batch_row_max [...]:
    the maximum logit of each anchor's whole batch row (``row_shift="batch"`` only).
    Returns (loss [...], valid [...]).
    """
    num_pos = pos_mask.sum(-1)
    num_neg = (candidate_mask & ~pos_mask).sum(-1)
    if rule.skip_trivial:
        valid = anchor_selected & (num_pos > 0) & (num_neg > 0)
    else:
        valid = anchor_selected & candidate_mask.any(-1)
    # Shift each row by its maximum over the anchor itself and its candidates (a constant per row:
    # it cancels exactly when eps = 0, and places eps relative to it otherwise).
    if batch_row_max is None:
        self_logit = torch.diagonal(logits, dim1=-2, dim2=-1)
        shift = torch.maximum(logits.masked_fill(~candidate_mask, float("-inf")).amax(-1), self_logit)
    else:
        shift = batch_row_max
    shifted = logits - shift.detach().unsqueeze(-1)
    # The k-th positive in batch order, k = floor(u * |P|).
    k = (uniform * num_pos.to(uniform.dtype)).floor().long().clamp(max=(num_pos - 1).clamp(min=0))
    pos_rank = pos_mask.long().cumsum(-1) - 1
    drawn_positive = (pos_mask & (pos_rank == k.unsqueeze(-1))).long().argmax(-1)
    candidate_lse = log_sum_exp(shifted, candidate_mask, rule.eps)
    loss = CONTRASTIVE_LOSSES[rule.loss_type](shifted, pos_mask, drawn_positive, candidate_lse, rule.eps)
    return torch.where(valid & (num_pos > 0), loss, torch.zeros_like(loss)), valid


PartialSum = Callable[[torch.Tensor], torch.Tensor]


def similarity_matrix(x: torch.Tensor, similarity: str, partial_sum: Optional[PartialSum] = None) -> torch.Tensor:
    """Pairwise similarity of the embeddings x [..., N, D] with each other -> [..., N, N].

    The cosine is the Gram matrix divided by the norms taken from its diagonal (floored at 1e-12,
    as ``F.normalize`` does), so no normalised copy of the [B, D] embeddings is materialised.
    ``partial_sum``: when x holds only a slice of the feature dimension (a column-parallel head),
    it completes the partial Gram matrix, e.g. an all-reduce over the tensor-parallel group.
    """
    gram = x @ x.transpose(-1, -2)
    if partial_sum is not None:
        gram = partial_sum(gram)
    norm = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=1e-24).sqrt()
    cos = gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))
    # Self-similarity exactly 1 (it sets the authors' row shift; rounded, l2's sqrt would amplify the error).
    cos = torch.where(torch.eye(cos.shape[-1], dtype=torch.bool, device=cos.device), torch.ones_like(cos), cos)
    if similarity == "cosine":
        return cos
    if similarity == "neg_cosine":
        return -cos
    return 1.0 - torch.sqrt(torch.clamp(2.0 - 2.0 * cos, min=L2_EPS))


@dataclass
class GroupLayout:
    """Where each response of a batch sits in a padded [G, n_max] block layout of its groups.

    order: [B] batch indices sorted by group (stable, so batch order is kept inside a group);
    group: [B] block row of ``order[k]``; slot: [B] its column; member: [G, n_max] bool.
    """

    order: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    member: torch.Tensor

    @classmethod
    def from_group_ids(cls, group_ids: torch.Tensor) -> "GroupLayout":
        batch = group_ids.shape[0]
        _, group_index = torch.unique(group_ids, return_inverse=True)
        order = torch.argsort(group_index, stable=True)
        group = group_index[order]
        sizes = torch.bincount(group)
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(batch, device=group_ids.device) - starts[group]
        member = torch.zeros(len(sizes), int(sizes.max().item()), dtype=torch.bool, device=group_ids.device)
        member[group, slot] = True
        return cls(order, group, slot, member)

    def to_blocks(self, values: torch.Tensor) -> torch.Tensor:
        """values [B, ...] -> [G, n_max, ...], zero in padding slots."""
        if bool(self.member.all()):  # equal group sizes: a view (groups contiguous) or one gather
            in_order = torch.equal(self.order, torch.arange(len(self.order), device=self.order.device))
            return (values if in_order else values[self.order]).view(*self.member.shape, *values.shape[1:])
        blocks = values.new_zeros(*self.member.shape, *values.shape[1:])
        blocks[self.group, self.slot] = values[self.order]
        return blocks

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """[G, n_max, ...] -> values [B, ...] in batch order (the inverse of ``to_blocks``)."""
        out = blocks.new_empty(len(self.order), *blocks.shape[2:])
        out[self.order] = blocks[self.group, self.slot]
        return out


def draw_positive_uniforms(batch_size: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """[B] float64 uniforms in batch order from ``generator``, one per response (see module doc)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(batch_size, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def _validate(embeddings, correct, group_ids, rule, similarity, temperature, level):
    check_shape("embeddings", embeddings, (None, None))
    batch = embeddings.shape[0]
    check_shape("correct", correct, (batch,))
    check_shape("group_ids", group_ids, (batch,))
    check_finite("embeddings", embeddings)
    if rule.loss_type not in CONTRASTIVE_LOSSES:
        raise ValueError(f"unknown contrastive loss {rule.loss_type!r}; choose one of {sorted(CONTRASTIVE_LOSSES)}")
    if rule.anchors not in ANCHORS:
        raise ValueError(f"unknown contrastive anchors {rule.anchors!r}; choose one of {ANCHORS}")
    if not rule.eps >= 0:
        raise ValueError(f"contrastive eps must be >= 0, got {rule.eps}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")
    if level not in LEVELS:
        raise ValueError(f"unknown contrastive level {level!r}; choose one of {LEVELS}")
    if rule.row_shift not in ROW_SHIFTS:
        raise ValueError(f"unknown contrastive row_shift {rule.row_shift!r}; choose one of {ROW_SHIFTS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _selected_anchors(correct: torch.Tensor, anchors: str) -> torch.Tensor:
    """[...] bool: the responses that act as anchors under ``anchors``."""
    if anchors == "correct":
        return correct
    return ~correct if anchors == "incorrect" else torch.ones_like(correct)


def _group_level(z, correct, group_ids, uniform, rule, similarity, temperature, partial_sum, batch_row_max):
    """Group level on padded per-group blocks: z [B, D] -> (loss [B], valid [B])."""
    layout = GroupLayout.from_group_ids(group_ids)
    member = layout.member
    logits = similarity_matrix(layout.to_blocks(z), similarity, partial_sum) / temperature  # [G, n, n]
    not_self = ~torch.eye(member.shape[1], dtype=torch.bool, device=z.device)
    candidate_mask = member.unsqueeze(-1) & member.unsqueeze(-2) & not_self
    block_correct = layout.to_blocks(correct)
    pos_mask = candidate_mask & (block_correct.unsqueeze(-2) == block_correct.unsqueeze(-1))
    loss, valid = _anchor_losses(logits, candidate_mask, pos_mask, _selected_anchors(block_correct, rule.anchors) & member,
                                 layout.to_blocks(uniform), rule,
                                 None if batch_row_max is None else layout.to_blocks(batch_row_max))
    return layout.from_blocks(loss), layout.from_blocks(valid)


def _dense(z, correct, group_ids, uniform, rule, similarity, temperature, level, partial_sum, batch_row_max):
    """Any level over the dense [B, B] similarity matrix: z [B, D] -> (loss [B], valid [B])."""
    batch = z.shape[0]
    logits = similarity_matrix(z, similarity, partial_sum) / temperature
    not_self = ~torch.eye(batch, dtype=torch.bool, device=z.device)
    same_group = group_ids.unsqueeze(0) == group_ids.unsqueeze(1)
    candidate_mask = not_self & same_group if level == "group" else not_self
    pos_mask = candidate_mask & (correct.unsqueeze(0) == correct.unsqueeze(1))
    if level != "batch":
        pos_mask = pos_mask & same_group
    return _anchor_losses(logits, candidate_mask, pos_mask, _selected_anchors(correct, rule.anchors), uniform, rule,
                          batch_row_max)


def contrastive_loss(
    embeddings: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    loss_type: str = "infonce",
    similarity: str = "cosine",
    temperature: float = 0.05,
    level: str = "group",
    generator: Optional[torch.Generator] = None,
    dense: bool = False,
    partial_sum: Optional[PartialSum] = None,
    eps: float = AUTHORS_EPS,
    anchors: str = "correct",
    skip_trivial: bool = True,
    row_shift: str = "candidates",
) -> ContrastiveLossOutput:
    """Contrastive loss of one batch.

    Args:
        embeddings: [B, D] response embeddings (cosine similarity normalises them; the head's output is unit-norm).
        correct:    [B] bool, the verifier's verdict per response.
        group_ids:  [B] int, the prompt (group) each response belongs to; any integers.
        loss_type:  "infonce" | "supcon_out" | "supcon_in" | "soft_nn".
        similarity: "cosine", "l2" or "neg_cosine" (minus the cosine).
        temperature: tau > 0; logits are similarity / tau.
        level:      "group" | "cross" | "batch".
        generator:  draws the InfoNCE positives (see module doc); ``None`` uses the global RNG.
        dense:      compute the group level on the dense [B, B] matrix (the reference formulation;
                    the padded per-group one is the default because it is O(B n D)).
        eps:        inside every log of a sum of exponentials (authors: 1e-8; 0 = exact log-sum-exp).
        anchors:    "correct" | "incorrect" | "all", the responses that act as anchors.
        skip_trivial: drop anchors without a positive or without a negative (see module doc).
        row_shift:  "candidates" | "batch" (the authors': each anchor's whole batch row; see module doc).
    """
    rule = AnchorRule(loss_type, anchors, skip_trivial, eps, row_shift)
    _validate(embeddings, correct, group_ids, rule, similarity, temperature, level)
    correct = correct.bool()
    z = embeddings
    uniform = draw_positive_uniforms(z.shape[0], generator, z.device)
    if z.shape[0] == 0:
        return ContrastiveLossOutput(z.new_zeros(0), correct.clone(), embeddings.sum() * 0.0)
    # The authors' shift needs every pair of the batch: O(B^2 D), an exactness option.
    batch_row_max = (similarity_matrix(z, similarity, partial_sum) / temperature).amax(-1) \
        if row_shift == "batch" else None
    if level == "group" and not dense:
        per_anchor, valid = _group_level(z, correct, group_ids, uniform, rule, similarity, temperature, partial_sum,
                                         batch_row_max)
    else:
        per_anchor, valid = _dense(z, correct, group_ids, uniform, rule, similarity, temperature, level, partial_sum,
                                   batch_row_max)
    loss = per_anchor.sum() / valid.sum().clamp(min=1)
    return ContrastiveLossOutput(per_anchor, valid, loss)


def positive_pair_cosine(embeddings: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor,
                         partial_sum: Optional[PartialSum] = None) -> torch.Tensor:
    """Mean cosine similarity over pairs of distinct correct responses of the same group (paper Fig. 5).

    embeddings [B, D], correct [B], group_ids [B] -> scalar (0 when there is no such pair).
    """
    correct = correct.bool()
    if not bool(correct.any()):
        return embeddings.new_zeros(())
    layout = GroupLayout.from_group_ids(group_ids[correct])
    blocks = layout.to_blocks(embeddings.detach()[correct])
    cos = similarity_matrix(blocks, "cosine", partial_sum)
    not_self = ~torch.eye(cos.shape[-1], dtype=torch.bool, device=cos.device)
    pair = layout.member.unsqueeze(-1) & layout.member.unsqueeze(-2) & not_self
    return cos[pair].mean() if bool(pair.any()) else embeddings.new_zeros(())
