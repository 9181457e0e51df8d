"""Per-token log-probs and entropy from vocabulary-sharded logits; masked mean pooling.

Pure PyTorch math: no process groups here. The sums and the max over the vocabulary are done by the
``reduce_sum`` / ``reduce_max`` callables the caller passes, so one function serves the dense case
(identity reductions) and tensor parallel (all-reduces over the TP group, supplied by
``clipo_nemo.models.forward``).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def sharded_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    temperature: float = 1.0,
    reduce_sum: Reduce = _identity,
    reduce_max: Reduce = _identity,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy of ``softmax(logits / temperature)`` over the full vocabulary.

    Args:
        logits: [..., V_shard] this shard's vocabulary columns, ids ``vocab_start .. vocab_start+V_shard-1``.
        labels: [...] global token ids, each < ``vocab_size``.
        vocab_size: the real vocabulary size; columns with ids >= it are padding and carry no mass.
        reduce_sum: sums a [...] tensor over all shards (autograd: gradient passes straight through,
            the megatron convention for a loss that every shard computes identically; correct
            because only shard-local terms are reduced and all later math is replicated).
        reduce_max: max of a [...] tensor over all shards (applied to detached values).

    Returns:
        (logprobs, entropy), each [...] in float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shard_size = logits.shape[-1]
    column_ids = torch.arange(vocab_start, vocab_start + shard_size, device=logits.device)
    z = (logits.float() / temperature).masked_fill(column_ids >= vocab_size, torch.finfo(torch.float32).min)
    # The max only stabilises exp(); log-softmax and entropy do not depend on it, so it is detached.
    z_max = reduce_max(z.detach().amax(dim=-1))
    shifted = z - z_max.unsqueeze(-1)
    exp_shifted = shifted.exp()
    partition = reduce_sum(exp_shifted.sum(dim=-1))
    log_partition = partition.log()

    in_shard = (labels >= vocab_start) & (labels < vocab_start + shard_size)
    local_index = (labels - vocab_start).clamp(0, shard_size - 1)
    label_logit = shifted.gather(-1, local_index.unsqueeze(-1)).squeeze(-1) * in_shard
    logprobs = reduce_sum(label_logit) - log_partition

    # entropy = log Z - sum_v e_v s_v / Z. Every shard-local term is reduced *before* it meets the
    # reduced Z, so the pass-through gradient of reduce_sum stays exact (sum(p * s) with p = e / Z
    # would send each shard only its own part of dEntropy/dZ).
    entropy = log_partition - reduce_sum((exp_shifted * shifted).sum(dim=-1)) / partition
    return logprobs, entropy


def masked_sum_over_sequence(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``hidden`` over the positions where ``mask`` is set.

    Args:
        hidden: [S, B, H] (megatron's sequence-first layout).
        mask: [B, S] bool or 0/1.

    Returns:
        [B, H]
    """
    return torch.einsum("sbh,bs->bh", hidden, mask.to(hidden.dtype))
