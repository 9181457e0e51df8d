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

Memory: responses are generated in chunks of rows whose KV cache fits ``rollout.kv_cache_gb``
(:func:`kv_cache_bytes_per_row` per response at the call's longest prompt + ``max_new_tokens``),
capped by ``rollout.max_batch_size``; a chunk may hold part of a prompt's ``n`` responses. The cache
is reallocated one layer at a time when rows are added or dropped, so the peak stays within the
budget plus one layer's share.

Steps per chunk: prefill each of its prompts once, copy its KV cache to its responses in the chunk,
then decode one token per step for all rows; rows that finished are dropped from the cache once
they are at least half of it.

Logits exist only where a token is sampled: megatron's ``StaticInferenceContext`` sets
``materialize_only_last_token_logits``, so ``GPTModel.forward`` (in eval mode, with that context)
feeds only the last position of its input to the output layer. Prefill over ``p`` prompts up to the
shortest prompt's length therefore makes [p, 1, V] logits (V = the padded vocabulary, gathered over
TP: every TP rank holds all of it), never [p, prompt_len, V]; each decode step makes [rows, 1, V].
Per step the engine then holds, on every TP rank: those logits in the model's dtype (fp32 behind
megatron's Float16Module), one float32 [rows, V] copy of the real vocabulary, and the sampling
temporaries of :func:`clipo_nemo.rollout.sampling.filtered_probs` (float64 [rows, V] tensors).

Determinism: response ``j`` of a prompt with seed ``s`` consumes its own uniforms
(:func:`clipo_nemo.rollout.sampling.response_uniforms`), so its tokens depend only on its prompt,
``(s, j)``, the parameters and the weights, not on its batch-mates, their order or chunking, as long
as its logits are the same. Identical inputs on the same machine give bit-identical outputs; a
different batch composition or TP size can change logits by floating-point rounding (other GEMM
shapes and reduction orders), which changes a token only when a uniform lands within that rounding
of a CDF boundary (or on a greedy near-tie). All TP ranks sample identical tokens: they hold the
same gathered logits and the same uniforms.

Pipeline parallel (``clipo_nemo.rollout.pipeline``): every stage runs its own layers on each
KV-cached step (its own ``StaticInferenceContext`` holds its layers' cache), hidden states go stage to
stage with megatron-core's inference p2p, the last stage samples and broadcasts the chosen tokens to
the pipeline group, and every stage then makes the same row, position and finish decisions. The
last stage's logits and uniforms are PP=1's, so the tokens are PP=1's exactly (``tests/test_rollout_pp.py``).
Chosen over resharding the PP-split weights into a TP-only layout for generation (NeMo-Aligner's
way) by ``benchmarks/rollout_pp.py`` (one thread per process): PP=2 ran at 0.73-0.94x PP=1's
tokens/s with a 52-56% bubble (the stages take turns); the resharded alternative (TP=2 on the same
two processes plus a regather of the full weights after every update) took 0.94x-1.9x the pipelined
time per call depending on model size and machine load: no clear speed winner, while resharding
holds PP times the weights per GPU, the memory that PP was chosen to save.

Limits: context parallel > 1 is not supported (raises); no micro-batch interleaving across pipeline
stages (the bubble is ``1 - 1/PP`` of the decode time); a stop string is found when it lies within
the last ``len(stop) + 4`` response tokens.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

from clipo_nemo.config import ModelConfig

import torch

from clipo_nemo.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationParams,
    RolloutOutput,
    register_rollout_engine,
    validate_prompts,
)
from clipo_nemo.rollout import pipeline
from clipo_nemo.rollout.sampling import response_uniforms, sample_next_tokens

_STOP_WINDOW_SLACK = 4  # tokens decoded beyond a stop string's length when looking for it


_GIB = 2**30


def kv_cache_bytes_per_row(model_cfg: ModelConfig, tp: int, pp: int, seq_len: int, dtype_bytes: int) -> int:
    """Bytes of KV cache one response row holds on one rank for ``seq_len`` positions.

    Keys and values (2) of this rank's layers (``num_layers / pp``) and key/value heads
    (``num_query_groups / tp``), each ``kv_channels`` wide (default ``hidden_size /
    num_attention_heads``), ``dtype_bytes`` per element (the model's compute dtype: 2 for bf16).
    ``model_cfg`` is a :class:`clipo_nemo.config.ModelConfig` (megatron's ``TransformerConfig`` has
    the same fields). Uneven splits round up (an upper bound).
    """
    if min(tp, pp, seq_len, dtype_bytes) < 1:
        raise ValueError(f"tp={tp}, pp={pp}, seq_len={seq_len}, dtype_bytes={dtype_bytes} must all be >= 1")
    kv_channels = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    layers = -(-model_cfg.num_layers // pp)
    kv_heads = -(-model_cfg.num_query_groups // tp)
    return 2 * layers * kv_heads * kv_channels * seq_len * dtype_bytes


@register_rollout_engine("megatron")
def build_megatron_engine(model: torch.nn.Module, tokenizer, cfg) -> "MegatronRolloutEngine":
    """The registry's factory: the engine for a :class:`clipo_nemo.config.ClipoConfig`."""
    return MegatronRolloutEngine(
        model, tokenizer, vocab_size=cfg.model.vocab_size, max_batch_size=cfg.rollout.max_batch_size,
        kv_cache_bytes=int(cfg.rollout.kv_cache_gb * _GIB),
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
        max_batch_size: most responses decoded together (rows are chunked); None = no row cap.
        kv_cache_bytes: KV-cache budget of one chunk on this rank (rows per chunk =
            budget // :func:`kv_cache_bytes_per_row`); None = unbounded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        vocab_size: int,
        eos_token_ids: Optional[Sequence[int]] = None,
        max_batch_size: Optional[int] = None,
        kv_cache_bytes: Optional[int] = None,
    ) -> None:
        from megatron.core.utils import get_model_config, unwrap_model

        self.model = model
        self.gpt = unwrap_model(model)
        self.config = get_model_config(self.gpt)
        if self.config.context_parallel_size > 1:
            raise ValueError(
                f"the megatron rollout engine needs context_parallel_size=1, got {self.config.context_parallel_size}: "
                "its KV-cached decoding has no context-parallel split"
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
        if kv_cache_bytes is not None and kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} must be > 0 (or None: unbounded)")
        self.kv_cache_bytes = kv_cache_bytes

    def rows_per_chunk(self, seq_len: int) -> Optional[int]:
        """Responses decoded together when each holds ``seq_len`` positions of KV cache: what the
        budget fits, capped by ``max_batch_size``; None = no bound at all."""
        from megatron.core import parallel_state

        rows = self.max_batch_size
        if self.kv_cache_bytes is not None:
            dtype_bytes = torch.empty((), dtype=self.config.params_dtype).element_size()
            per_row = kv_cache_bytes_per_row(
                self.config, parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(), seq_len, dtype_bytes)
            fits = self.kv_cache_bytes // per_row
            if fits < 1:
                raise ValueError(
                    f"the KV-cache budget (rollout.kv_cache_gb = {self.kv_cache_bytes / _GIB:.4g} GiB) holds no "
                    f"response of {seq_len} tokens (longest prompt + max_new_tokens): one needs "
                    f"{per_row / _GIB:.4g} GiB on this rank; raise rollout.kv_cache_gb or shorten the sequences")
            rows = fits if rows is None else min(rows, fits)
        return rows

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
        n, total = params.n, len(prompts) * params.n
        per_chunk = self.rows_per_chunk(longest) or total
        responses: List[List[int]] = []
        reasons: List[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), _sequence_parallel_off(self.gpt, self.config):
                for start in range(0, total, per_chunk):
                    stop = min(start + per_chunk, total)
                    first, last = start // n, (stop - 1) // n  # the prompts these rows answer
                    row_prompt = torch.arange(start, stop) // n - first
                    chunk_responses, chunk_reasons = self._generate_chunk(
                        prompts[first : last + 1], row_prompt, params, uniforms[start:stop])
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

    def _forward_last_logits(self, tokens: torch.Tensor, start: int, context, mask) -> Optional[torch.Tensor]:
        """Logits [rows, vocab_size] (float32, gathered over TP) at the last of ``tokens`` [rows, s]
        fed at positions ``start .. start+s-1``; the KV cache in ``context`` grows by ``s``. With
        pipeline parallel only the last stage gets logits; earlier stages run their layers and get None.

        Only that position reaches the output layer: ``GPTModel.forward`` in inference mode with a
        ``StaticInferenceContext`` (``materialize_only_last_token_logits``) slices the final-norm
        output to its last position first, so a prefill of ``s`` tokens makes [rows, 1, V] logits,
        never [rows, s, V]; a megatron that stopped doing so is an error, not a silent memory blow-up.
        """
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        logits = pipeline.stage_forward(self.model, self.gpt, tokens, positions, mask, context, self.config)
        context.sequence_len_offset += tokens.shape[1]
        if logits is None:  # a pipeline stage before the last: its layers ran, the next stage has their output
            return None
        if logits.shape[1] != 1:
            raise RuntimeError(
                f"megatron returned logits for {logits.shape[1]} positions of a {tokens.shape[1]}-token forward: "
                "this engine needs GPTModel to slice to the last position under a StaticInferenceContext "
                "(materialize_only_last_token_logits), as megatron-core 0.16 does")
        return logits[:, 0, : self.vocab_size].float()

    def _generate_chunk(
        self, prompts: Sequence[Sequence[int]], row_prompt: torch.Tensor, params: GenerationParams,
        uniforms: torch.Tensor,
    ):
        """Responses for rows whose prompts are ``prompts[row_prompt]`` (``row_prompt`` [rows] long,
        non-decreasing); ``uniforms`` [rows, max_new_tokens] are the rows' sampling uniforms."""
        from megatron.core.inference.contexts import StaticInferenceContext

        device = next(self.gpt.parameters()).device
        max_new = params.max_new_tokens
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
        shortest, longest = int(prompt_lengths.min()), int(prompt_lengths.max())
        prompt_tokens = torch.full((len(prompts), longest + 1), self.pad_token_id, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            prompt_tokens[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)

        context = StaticInferenceContext(len(prompts), longest + max_new)
        causal = torch.ones(1, 1, shortest, shortest, dtype=torch.bool, device=device).triu(1)
        logits = self._forward_last_logits(prompt_tokens[:, :shortest], 0, context, causal)
        context.enable_decode_mode()

        # Each prompt's cache and last logits serve its responses; `rows` maps cache rows to outputs.
        row_prompt = row_prompt.to(device)
        rows = torch.arange(len(row_prompt), device=device)
        _keep_cache_rows(context, row_prompt)
        logits = None if logits is None else logits[row_prompt]
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
            sampled = None if logits is None else sample_next_tokens(
                logits, uniforms[rows, step], params.temperature, params.top_k, params.top_p
            )
            sampled = pipeline.broadcast_from_last_stage(sampled, [len(rows)], torch.long, device)
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
