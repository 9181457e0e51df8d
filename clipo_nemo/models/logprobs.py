"""Per-token log-probs and entropy fused with the vocabulary-sharded output layer; masked pooling.

Pure PyTorch math: no process groups here. The sums and the max over the vocabulary are done by the
``reduce_sum`` / ``reduce_max`` callables the caller passes, so one function serves the dense case
(identity reductions) and tensor parallel (all-reduces over the TP group, supplied by
``clipo_nemo.models.forward``).

Memory: the logits are never materialised for all positions. The forward pass computes them for
``chunk_size`` positions at a time (one [chunk, V_shard] float32 buffer) and keeps only
per-position statistics; the backward pass recomputes them for all N positions in blocks of
vocabulary columns ([N, block] float32, two buffers of a quarter of a chunk's logits each) and
forms d(hidden) and d(weight) block by block. Autograd saves only the hidden states, the weight (a
reference) and three [N] vectors. Peak extra memory: forward about one float32 [chunk, V_shard]
buffer; backward the weight gradient plus half of that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
_UPCAST_BLOCKS = 8


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class VocabShard:
    """Which vocabulary columns this weight shard holds and how its logits are scaled.

    ``vocab_start``: id of the shard's first row; ``vocab_size``: the real vocabulary size (rows with
    ids >= it are padding and carry no probability mass); logits are divided by ``temperature``.
    """

    vocab_start: int
    vocab_size: int
    temperature: float = 1.0


def fused_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shard: VocabShard,
    *,
    chunk_size: int,
    reduce_sum: Reduce = _identity,
    reduce_max: Reduce = _identity,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy of ``softmax(hidden @ weight.T / temperature)`` over the
    full vocabulary, ``chunk_size`` positions at a time, forward and backward.

    Args:
        hidden: [N, H] output-layer inputs of the N positions to score (any float dtype; the logits
            are computed in that dtype, as the output layer does, then upcast to float32).
        weight: [V_shard, H] this shard's output-layer rows, ids ``vocab_start .. vocab_start+V_shard-1``.
        labels: [N] global token ids, each < ``vocab_size``.
        chunk_size: positions per forward chunk; the backward's vocabulary blocks hold a quarter as
            many logits (``chunk_size * V_shard / 4``).
        reduce_sum: sums an [n] or [k, n] tensor over all shards. Called only in the forward pass
            (under autograd's custom function, so its own backward is irrelevant); the backward pass
            needs no communication: every shard's gradient follows from the reduced statistics, and
            d(hidden) is summed over shards by the caller (megatron's copy-to-TP-region).
        reduce_max: max of an [n] tensor over all shards.

    Returns:
        (logprobs, entropy), each [N] in float32.
    """
    if shard.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {shard.temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V_shard, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != [N] = [{hidden.shape[0]}]")
    return _FusedLogprobEntropy.apply(hidden, weight, labels, shard, chunk_size, reduce_sum, reduce_max)


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, first_column: int, shard: VocabShard) -> torch.Tensor:
    """[n, H] x [v, H] (columns ``first_column ..`` of the shard) -> float32 [n, v] logits / temperature,
    padding columns set to the float32 minimum (exp() of them is 0).

    The product is taken in the inputs' dtype, as the output layer does; a lower-precision one is
    upcast in column blocks, so only 1/_UPCAST_BLOCKS of it exists next to the float32 result."""
    if weight.dtype == torch.float32:
        z = hidden @ weight.t()
    else:
        z = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
        step = -(-weight.shape[0] // _UPCAST_BLOCKS)
        for first in range(0, weight.shape[0], step):
            z[:, first : first + step] = hidden @ weight[first : first + step].t()
    z.div_(shard.temperature)
    first_padding = shard.vocab_size - shard.vocab_start - first_column
    if first_padding < z.shape[1]:
        z[:, max(first_padding, 0) :].fill_(torch.finfo(torch.float32).min)
    return z


def _label_columns(labels: torch.Tensor, first_column: int, width: int, shard: VocabShard) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows whose label is one of the ``width`` columns from ``first_column``, the label's column there)."""
    local = labels - (shard.vocab_start + first_column)
    rows = ((local >= 0) & (local < width)).nonzero().flatten()
    return rows, local[rows]


class _FusedLogprobEntropy(torch.autograd.Function):
    """See ``fused_logprobs_and_entropy``. Saved for backward: hidden, weight, labels and the [N]
    log-partition and entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, shard: VocabShard, chunk_size: int, reduce_sum: Reduce, reduce_max: Reduce):
        positions = hidden.shape[0]
        logprobs = hidden.new_empty(positions, dtype=torch.float32)
        entropy = torch.empty_like(logprobs)
        log_partition = torch.empty_like(logprobs)
        for start in range(0, positions, chunk_size):
            stop = min(start + chunk_size, positions)
            z = _scaled_logits(hidden[start:stop], weight, 0, shard)  # [c, V_shard]
            # The max only stabilises exp(); the results do not depend on it.
            z_max = reduce_max(z.amax(dim=-1))
            z.sub_(z_max.unsqueeze(-1))  # shifted logits s
            label_shifted = torch.zeros_like(z_max)
            rows, columns = _label_columns(labels[start:stop], 0, z.shape[1], shard)
            label_shifted[rows] = z[rows, columns]
            exp_shifted = z.exp_()  # in place: one [c, V_shard] float32 buffer
            sum_exp = exp_shifted.sum(dim=-1)
            # e * s = e * log(e) (xlogy: 0 where e underflowed to 0, where e * s is below 1e-36 anyway)
            sum_exp_times_shifted = exp_shifted.xlogy_(exp_shifted).sum(dim=-1)
            del z, exp_shifted
            partition, exp_dot_shifted, label_logit = reduce_sum(
                torch.stack([sum_exp, sum_exp_times_shifted, label_shifted])
            )
            log_z = partition.log()
            logprobs[start:stop] = label_logit - log_z
            # entropy = log Z - sum_v p_v s_v, with p = e / Z
            entropy[start:stop] = log_z - exp_dot_shifted / partition
            log_partition[start:stop] = z_max + log_z
        ctx.shard, ctx.chunk_size = shard, chunk_size
        ctx.save_for_backward(hidden, weight, labels, log_partition, entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        hidden, weight, labels, log_partition, entropy = ctx.saved_tensors
        shard: VocabShard = ctx.shard
        positions, shard_size = hidden.shape[0], weight.shape[0]
        grad_logprobs = torch.zeros_like(entropy) if grad_logprobs is None else grad_logprobs.float()
        grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy.float()
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None  # every row block is written below
        # d logprob / dz_v = [v = label] - p_v ; d entropy / dz_v = -p_v (log p_v + entropy).
        # Two float32 [N, block] buffers are live next to the [V_shard, H] weight gradient being
        # written; each holds a quarter of a forward chunk's logits, so together they take half of
        # the forward's buffer (the matmuls stay large: N rows by thousands of columns).
        block = max(1, min(shard_size, -(-ctx.chunk_size * shard_size // max(4 * positions, 1))))
        for first in range(0, shard_size, block):
            last = min(first + block, shard_size)
            grad_z = _scaled_logits(hidden, weight[first:last], first, shard)  # [N, v]
            grad_z.sub_(log_partition.unsqueeze(-1))  # log p
            probs = grad_z.exp()
            grad_z.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(grad_logprobs.unsqueeze(-1))
            grad_z.mul_(probs).neg_()
            del probs
            first_padding = shard.vocab_size - shard.vocab_start - first
            if first_padding < grad_z.shape[1]:  # exact zeros (0 * huge may have been inf * 0 there)
                grad_z[:, max(first_padding, 0) :].zero_()
            rows, columns = _label_columns(labels, first, last - first, shard)
            grad_z[rows, columns] += grad_logprobs[rows]
            grad_logits = grad_z.div_(shard.temperature).to(weight.dtype)  # d loss / d (hidden @ weight.T)
            del grad_z
            if want_hidden:
                grad_hidden.add_(grad_logits @ weight[first:last])
            if want_weight:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[first:last])
        if want_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def masked_sum_over_sequence(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``hidden`` over the positions where ``mask`` is set.

    Args:
        hidden: [S, B, H] (megatron's sequence-first layout).
        mask: [B, S] bool or 0/1.

    Returns:
        [B, H]
    """
    return torch.einsum("sbh,bs->bh", hidden, mask.to(hidden.dtype))
