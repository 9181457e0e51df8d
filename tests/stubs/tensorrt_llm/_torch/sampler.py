"""Stand-in for the two samplers of ``tensorrt_llm/_torch/pyexecutor/sampler.py`` (one decoding step).

``TorchSampler`` (1.2's default, ``sampler_type="auto"``): one ``torch.Generator`` for the whole
executor, seeded once with ``_global_seed = 42`` (``TorchSampler.get_generator``) -- per-request
seeds are ignored. Its log-probs are computed apart from sampling because they "are specified to not
reflect temperature scaling, top-k/top-p masking": ``log_softmax`` of the raw logits, the top
``logprobs`` tokens of that distribution (``torch.topk``), as ``{token: Logprob(logprob, rank)}``
(``handle_logprobs``) -- with ``logprobs=1`` that is the argmax token, not the sampled one.

``TRTLLMSampler`` (``sampler_type="TRTLLMSampler"``, the C++ decoder ``GptDecoderBatched``): each
request seeded by its own ``SamplingParams.seed`` (None -> the runtime default 0); the decoder
applies the temperature to the logits before sampling, and the returned log-prob is that of the
sampled token under ``log_softmax(logits / T)`` over the full vocabulary (top-k / top-p log-probs are
not renormalised: "NOT normalized (same way as OpenAI does)"), as
``{sampled token: Logprob(logprob, rank=1)}`` (``update_requests_single_beam_single_step``).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

TORCH_SAMPLER_SEED = 42


class Logprob(NamedTuple):
    logprob: float
    rank: Optional[int] = None


def sample_token(logits: torch.Tensor, sp, generator: torch.Generator) -> int:
    """One token from ``logits`` [V] under ``sp``'s greedy / temperature / top-k / top-p settings."""
    if sp.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / (sp.temperature or 1.0), -1)
    if sp.top_k:
        probs[probs < probs.topk(sp.top_k).values[-1]] = 0
    if sp.top_p is not None and sp.top_p < 1:
        ordered, order = probs.sort(descending=True)
        ordered[(ordered.cumsum(0) - ordered) >= sp.top_p * ordered.sum()] = 0
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def torch_sampler_step(logits: torch.Tensor, sp, generator: torch.Generator) -> Tuple[int, Dict[int, Logprob]]:
    raw = torch.log_softmax(logits, -1)
    top = raw.topk(sp.logprobs or 1)
    entry = {int(t): Logprob(float(v), rank + 1) for rank, (v, t) in enumerate(zip(top.values, top.indices))}
    return sample_token(logits, sp, generator), entry


def trtllm_sampler_step(logits: torch.Tensor, sp, generator: torch.Generator) -> Tuple[int, Dict[int, Logprob]]:
    token = sample_token(logits, sp, generator)
    temperature = 1.0 if sp.greedy or sp.temperature is None else sp.temperature
    return token, {token: Logprob(float(torch.log_softmax(logits / temperature, -1)[token]), 1)}
