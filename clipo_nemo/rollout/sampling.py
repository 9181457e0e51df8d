"""Token sampling math: temperature/top-k/top-p filtering and per-request seeded draws.

Pure functions, no distributed code. Sampling uses the *inverse CDF* with one uniform per
(response, step) drawn up front from that response's own generator, so a response's tokens do not
depend on which other responses share its batch (see :func:`response_uniforms`).
"""
from __future__ import annotations

import numpy as np
import torch


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution after temperature, top-k and top-p (nucleus) filtering.

    Args:
        logits: [B, V] float, next-token logits over the real vocabulary.
        temperature: > 0; logits are divided by it.
        top_k: keep the ``top_k`` largest logits (ties at the boundary are kept); 0 = off.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (the token that crosses it included); 1.0 = off.

    Returns:
        [B, V] float64 probabilities, zero outside the kept set, each row summing to 1.
    """
    scaled = logits.double() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth_largest = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row: the first index whose cumulative probability exceeds ``u * total``.

    Args:
        probs: [B, V] non-negative float64 (need not be normalised).
        uniforms: [B] float64 in [0, 1).

    Returns:
        [B] long token ids; never a zero-probability token.
    """
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    drawn = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    # u * total can round up to total itself: fall back to the last token that has probability.
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(drawn, last_positive)


def response_uniforms(seed: int, sample_index: int, steps: int) -> torch.Tensor:
    """The ``steps`` uniforms (float64, [steps]) that response ``sample_index`` of a request seeded
    ``seed`` consumes, one per generated token.

    The generator is seeded by mixing ``(seed, sample_index)`` with numpy's ``SeedSequence``, so
    every response has its own stream whatever the batch, its order or the number of samples.
    """
    if seed < 0 or sample_index < 0:
        raise ValueError(f"seeds must be non-negative, got seed={seed}, sample_index={sample_index}")
    state = np.random.SeedSequence([seed, sample_index]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.rand(steps, generator=generator, dtype=torch.float64)


def sample_next_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Next tokens [B] (long) from logits [B, V]: greedy (first maximum) when ``temperature == 0``
    or ``top_k == 1``, otherwise :func:`filtered_probs` then :func:`inverse_cdf_sample` with
    ``uniforms`` [B]."""
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    return inverse_cdf_sample(filtered_probs(logits, temperature, top_k, top_p), uniforms)
