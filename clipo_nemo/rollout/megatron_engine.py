"""The ``megatron`` rollout engine: generation with the policy's own megatron-core ``GPTModel``.

Why a lean loop and not megatron-core's ``StaticInferenceEngine``/``TextGenerationController``
(measured with ``benchmarks/rollout_engines.py``): in megatron-core 0.16 the static engine is a
deprecated shim that first tries the CUDA-only ``DynamicInferenceEngine`` and its legacy path needs
three more CPU patches (``Tensor.cuda``, ``torch.cuda.Event``, a CUDA default causal mask). With
those (applied in a throw-away experiment, not in the project) it ran on this 2-core CPU at
0.9x-4.7x *lower* tokens/s than this loop (64 prompts x 32 new tokens, 2-layer H=64 model, four
interleaved runs on a loaded machine; ``benchmarks/rollout_engines.py`` measures this loop against
a no-cache loop everywhere and against the static engine on GPU). More decisive: it draws every
token of the batch from one shared generator (a response depends on its batch-mates), has no
per-request seeds, no ``n`` samples sharing one prefill, and no stop strings or finish reasons in
the static path.
This loop uses the same megatron-core pieces underneath: ``StaticInferenceContext`` (the KV cache
that ``GPTModel.forward`` fills and reads), the model's TP logit gather
(``runtime_gather_output=True``) and megatron's static-batching schedule for prompts of different
lengths (prefill up to the shortest prompt, then one token per step, feeding the remaining prompt
tokens of longer prompts instead of samples) — no padding ever enters attention.

Steps per chunk of prompts: prefill each prompt once, copy its KV cache to its ``n`` responses,
then decode one token per step for all rows; rows that finished are dropped from the cache once
they are at least half of it.

Determinism: response ``j`` of a prompt with seed ``s`` consumes its own uniforms
(:func:`clipo_nemo.rollout.sampling.response_uniforms`), so its tokens depend only on its prompt,
``(s, j)``, the parameters and the weights, not on its batch-mates, their order or chunking, as long
as its logits are the same. Identical inputs on the same machine give bit-identical outputs; a
different batch composition or TP size can change logits by floating-point rounding (other GEMM
shapes and reduction orders), which changes a token only when a uniform lands within that rounding
of a CDF boundary (or on a greedy near-tie). All TP ranks sample identical tokens: they hold the
same gathered logits and the same uniforms.

Limits: pipeline parallel > 1 is not supported (raises); a stop string is found when it lies within
the last ``len(stop) + 4`` response tokens.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch

from clipo_nemo.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationParams,
    RolloutOutput,
    register_rollout_engine,
    validate_prompts,
)
from clipo_nemo.rollout.sampling import response_uniforms, sample_next_tokens

_STOP_WINDOW_SLACK = 4  # tokens decoded beyond a stop string's length when looking for it


@register_rollout_engine("megatron")
def build_megatron_engine(model: torch.nn.Module, tokenizer, cfg) -> "MegatronRolloutEngine":
    """The registry's factory: the engine for a :class:`clipo_nemo.config.ClipoConfig`."""
    return MegatronRolloutEngine(
        model, tokenizer, vocab_size=cfg.model.vocab_size, max_batch_size=cfg.rollout.max_batch_size
    )


def _keep_cache_rows(context, rows: torch.Tensor) -> None:
    """Keep (and reorder/duplicate) batch rows of a ``StaticInferenceContext``'s KV cache.

    megatron's own ``swap_key_value_dict`` only permutes; growing (n samples) and shrinking
    (finished rows) need a new batch size. Cache tensors are [max_seq, batch, heads, dim].
    """
    for layer, (keys, values) in context.key_value_memory_dict.items():
        context.key_value_memory_dict[layer] = (keys[:, rows], values[:, rows])


class MegatronRolloutEngine:
    """Batched, KV-cached sampling from a (TP-sharded) megatron-core ``GPTModel``.

    Args:
        model: the policy (``GPTModel``, possibly wrapped in megatron's DDP / Float16Module); its
            weights are used as they are at each ``generate`` call.
        tokenizer: Hugging Face style; ``decode`` is used for stop strings, ``pad_token_id`` /
            ``eos_token_id`` as defaults below.
        vocab_size: the real vocabulary size; logits of the padding rows beyond it are never sampled.
        eos_token_ids: ids that end a response (default: the tokenizer's EOS).
        max_batch_size: most responses decoded together (prompts are chunked); None = all at once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        vocab_size: int,
        eos_token_ids: Optional[Sequence[int]] = None,
        max_batch_size: Optional[int] = None,
    ) -> None:
        from megatron.core.utils import get_model_config, unwrap_model

        self.model = model
        self.gpt = unwrap_model(model)
        self.config = get_model_config(self.gpt)
        if self.config.pipeline_model_parallel_size > 1:
            raise ValueError(
                f"the megatron rollout engine needs pipeline_parallel_size=1, got "
                f"{self.config.pipeline_model_parallel_size}"
            )
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        ids = [tokenizer.eos_token_id] if eos_token_ids is None else list(eos_token_ids)
        if not ids or any(i is None or not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"eos_token_ids={ids} must be non-empty ids in [0, {vocab_size})")
        self.eos_token_ids = torch.tensor(ids)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.max_batch_size = max_batch_size

    def generate(
        self, prompts: Sequence[Sequence[int]], params: GenerationParams, seeds: Sequence[int]
    ) -> RolloutOutput:
        """Sample ``params.n`` responses per prompt; rows ``i*n .. i*n+n-1`` answer ``prompts[i]``."""
        validate_prompts(prompts, seeds, self.vocab_size)
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if longest > self.gpt.max_sequence_length:
            raise ValueError(
                f"longest prompt + max_new_tokens = {longest} exceeds the model's max_sequence_length "
                f"{self.gpt.max_sequence_length}"
            )
        uniforms = torch.stack(
            [response_uniforms(int(s), j, params.max_new_tokens) for s in seeds for j in range(params.n)]
        )
        per_chunk = len(prompts) if self.max_batch_size is None else max(1, self.max_batch_size // params.n)
        responses: List[List[int]] = []
        reasons: List[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), _sequence_parallel_off(self.gpt, self.config):
                for start in range(0, len(prompts), per_chunk):
                    chunk = prompts[start : start + per_chunk]
                    rows = slice(start * params.n, (start + len(chunk)) * params.n)
                    chunk_responses, chunk_reasons = self._generate_chunk(chunk, params, uniforms[rows])
                    responses += chunk_responses
                    reasons += chunk_reasons
        finally:
            self.model.train(was_training)
        lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
        tokens = torch.full((len(responses), int(lengths.max())), self.pad_token_id, dtype=torch.long)
        for row, response in enumerate(responses):
            tokens[row, : len(response)] = torch.tensor(response, dtype=torch.long)
        prompt_index = torch.arange(len(prompts)).repeat_interleave(params.n)
        return RolloutOutput(tokens, lengths, reasons, prompt_index, self.pad_token_id)

    def _forward_last_logits(self, tokens: torch.Tensor, start: int, context, mask) -> torch.Tensor:
        """Logits [rows, vocab_size] (float32, gathered over TP) after feeding ``tokens`` [rows, s] at
        positions ``start .. start+s-1``; the KV cache in ``context`` grows by ``s``."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        logits = self.model(tokens, positions, mask, inference_context=context, runtime_gather_output=True)
        context.sequence_len_offset += tokens.shape[1]
        return logits[:, -1, : self.vocab_size].float()

    def _generate_chunk(
        self, prompts: Sequence[Sequence[int]], params: GenerationParams, uniforms: torch.Tensor
    ):
        from megatron.core.inference.contexts import StaticInferenceContext

        device = next(self.gpt.parameters()).device
        n, max_new = params.n, params.max_new_tokens
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
        shortest, longest = int(prompt_lengths.min()), int(prompt_lengths.max())
        prompt_tokens = torch.full((len(prompts), longest + 1), self.pad_token_id, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            prompt_tokens[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)

        context = StaticInferenceContext(len(prompts), longest + max_new)
        causal = torch.ones(1, 1, shortest, shortest, dtype=torch.bool, device=device).triu(1)
        logits = self._forward_last_logits(prompt_tokens[:, :shortest], 0, context, causal)
        context.enable_decode_mode()

        # Each prompt's cache and last logits serve its n responses; `rows` maps cache rows to outputs.
        rows = torch.arange(len(prompts) * n, device=device)
        row_prompt = rows // n
        _keep_cache_rows(context, row_prompt)
        logits = logits[row_prompt]
        uniforms = uniforms.to(device)
        out_tokens = torch.full((len(rows), max_new), self.pad_token_id, dtype=torch.long, device=device)
        out_lengths = torch.zeros(len(rows), dtype=torch.long, device=device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        reasons: List[Optional[str]] = [None] * len(rows)
        eos = self.eos_token_ids.to(device)

        position = shortest  # the position whose token is chosen this step
        while True:
            in_prompt = position < prompt_lengths[row_prompt[rows]]
            step = out_lengths[rows].clamp(max=max_new - 1)
            sampled = sample_next_tokens(
                logits, uniforms[rows, step], params.temperature, params.top_k, params.top_p
            )
            next_tokens = torch.where(in_prompt, prompt_tokens[row_prompt[rows], min(position, longest)], sampled)
            generating = ~in_prompt & ~finished[rows]
            gen_rows = rows[generating]
            out_tokens[gen_rows, out_lengths[gen_rows]] = sampled[generating]
            out_lengths[gen_rows] += 1
            self._mark_finished(gen_rows, out_tokens, out_lengths, finished, reasons, eos, params)
            if bool(finished.all()):
                break
            live = ~finished[rows]
            if int((~live).sum()) * 2 >= len(rows):
                _keep_cache_rows(context, live.nonzero().squeeze(-1))
                rows, next_tokens = rows[live], next_tokens[live]
            logits = self._forward_last_logits(next_tokens.unsqueeze(-1), position, context, None)
            position += 1

        responses = [out_tokens[r, : int(out_lengths[r])].tolist() for r in range(len(reasons))]
        return responses, reasons

    def _mark_finished(self, gen_rows, out_tokens, out_lengths, finished, reasons, eos, params) -> None:
        """Finish rows that just produced an EOS token, completed a stop string, or hit the length cap."""
        last = out_tokens[gen_rows, out_lengths[gen_rows] - 1]
        hit_eos = torch.isin(last, eos)
        at_cap = out_lengths[gen_rows] >= params.max_new_tokens
        window = max((len(s) for s in params.stop), default=0) + _STOP_WINDOW_SLACK
        for row, is_eos, capped in zip(gen_rows.tolist(), hit_eos.tolist(), at_cap.tolist()):
            if is_eos or (params.stop and self._ends_with_stop(out_tokens[row, : int(out_lengths[row])], params.stop, window)):
                reasons[row] = FINISH_STOP
            elif capped:
                reasons[row] = FINISH_LENGTH
            finished[row] = reasons[row] is not None

    def _ends_with_stop(self, response: torch.Tensor, stop: Sequence[str], window: int) -> bool:
        text = self.tokenizer.decode(response[-window:].tolist())
        return any(s in text for s in stop)


@contextlib.contextmanager
def _sequence_parallel_off(gpt: torch.nn.Module, config) -> Iterator[None]:
    """Generation feeds one token per step, which cannot be split over TP along the sequence:
    switch megatron's sequence parallel off while generating (with its own helper), then back on."""
    if not config.sequence_parallel:
        yield
        return
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    set_model_to_sequence_parallel(gpt, False)
    try:
        yield
    finally:
        set_model_to_sequence_parallel(gpt, True)
