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

Batching (``rollout.batching``): "continuous" (default) keeps a fixed set of KV slots, as many as
``rollout.kv_cache_gb`` holds (:func:`kv_cache_bytes_per_row` at ``kv_slots.timeline_length`` of
the longest prompt + ``max_new_tokens``), capped by ``rollout.max_batch_size``; a finished
response's slot takes the next waiting response (its prompt prefilled alone, once, its KV copied to
each of its ``n`` responses); every decode step feeds every slot, each at its own positions
(``clipo_nemo.rollout.kv_slots``); once nothing waits, free slots are dropped when they are half.
"static" decodes chunks of rows one after another: prefill each prompt of the chunk up to the
shortest one, copy its KV cache to its responses, then one token per step for all rows until the
chunk's longest response ends; finished rows are dropped once they are at least half of the cache.

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
from clipo_nemo.rollout.kv_slots import SlotCache, keep_cache_rows, slot_forward_hooks, timeline_length
from clipo_nemo.rollout.sampling import response_uniforms, sample_next_tokens

_STOP_WINDOW_SLACK = 4  # tokens decoded beyond a stop string's length when looking for it


_GIB = 2**30
BATCHING = ("continuous", "static")  # rollout.batching values


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
    if isinstance(cfg.rollout.kv_cache_gb, str):
        raise ValueError(f"rollout.kv_cache_gb={cfg.rollout.kv_cache_gb!r} reached the rollout engine: the trainer "
                         "resolves 'auto' from the memory plan at start; elsewhere set a number of GiB")
    return MegatronRolloutEngine(
        model, tokenizer, vocab_size=cfg.model.vocab_size, max_batch_size=cfg.rollout.max_batch_size,
        kv_cache_bytes=int(cfg.rollout.kv_cache_gb * _GIB), batching=cfg.rollout.batching,
        finish_check_every=cfg.rollout.finish_check_every,
    )


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
        kv_cache_bytes: KV-cache budget on this rank (rows decoded together = budget //
            :func:`kv_cache_bytes_per_row`); None = unbounded.
        batching: "continuous" (a finished response's slot takes the next waiting one) or "static"
            (chunks decoded one after another, each until its longest response ends).
        finish_check_every: continuous batching looks for finished responses every this many decode
            steps (one host synchronisation each time); the tokens do not depend on it.
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
        batching: str = "continuous",
        finish_check_every: int = 1,
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
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r}: expected one of {BATCHING}")
        self.batching = batching
        if finish_check_every < 1:
            raise ValueError(f"finish_check_every={finish_check_every} must be >= 1")
        self.finish_check_every = finish_check_every if batching == "continuous" else 1
        self.decode_passes = 0  # decode forward passes of the last generate call (benchmarks read it)

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
        device = next(self.gpt.parameters()).device
        uniforms = torch.stack(
            [response_uniforms(int(s), j, params.max_new_tokens) for s in seeds for j in range(params.n)]
        ).to(device)
        total = len(prompts) * params.n
        out = _Responses(total, params.max_new_tokens, self.pad_token_id, device)
        self.decode_passes = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), _sequence_parallel_off(self.gpt, self.config):
                if self.batching == "continuous":
                    buffer_len = timeline_length(longest)
                    self._generate_continuous(prompts, params, uniforms, out,
                                              min(self.rows_per_chunk(buffer_len) or total, total), buffer_len)
                else:
                    self._generate_static(prompts, params, uniforms, out, self.rows_per_chunk(longest) or total)
        finally:
            self.model.train(was_training)
        lengths = out.lengths.cpu()
        tokens = out.tokens[:, : int(lengths.max())].cpu()
        for row, length in enumerate(lengths.tolist()):  # what ran on past an end is not returned
            tokens[row, length:] = self.pad_token_id
        prompt_index = torch.arange(len(prompts)).repeat_interleave(params.n)
        return RolloutOutput(tokens, lengths, list(out.reasons), prompt_index, self.pad_token_id)

    def _forward_last_logits(self, tokens: torch.Tensor, start: int, context, mask,
                             positions: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Logits [rows, vocab_size] (float32, gathered over TP) at the last of ``tokens`` [rows, s]
        fed at cache positions ``start .. start+s-1`` (their own positions: ``positions`` [rows, s],
        default the cache positions); the KV cache in ``context`` grows by ``s``. With pipeline
        parallel only the last stage gets logits; earlier stages run their layers and get None.

        Only that position reaches the output layer: ``GPTModel.forward`` in inference mode with a
        ``StaticInferenceContext`` (``materialize_only_last_token_logits``) slices the final-norm
        output to its last position first, so a prefill of ``s`` tokens makes [rows, 1, V] logits,
        never [rows, s, V]; a megatron that stopped doing so is an error, not a silent memory blow-up.
        """
        if positions is None:
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

    def _sample_and_record(self, logits, rows: torch.Tensor, uniforms, out: "_Responses", params) -> torch.Tensor:
        """Sample the next token of ``rows`` (global row ids, long [k]) from ``logits`` [k, V] (None
        before the last pipeline stage) and append it to their responses (no finish check: see
        :meth:`_mark_finished`); returns the tokens [k] on every stage."""
        device = rows.device
        sampled = None if logits is None else sample_next_tokens(
            logits, uniforms[rows, out.lengths[rows]], params.temperature, params.top_k, params.top_p)
        sampled = pipeline.broadcast_from_last_stage(sampled, [len(rows)], torch.long, device)
        out.tokens[rows, out.lengths[rows]] = sampled
        out.lengths[rows] += 1
        return sampled

    def _prefill(self, prompt: Sequence[int], device):
        """One prompt alone through the model: its KV cache (layer -> keys, values [L, 1, heads, dim])
        and the logits [1, V] at its last token (None before the last pipeline stage)."""
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(1, len(prompt))
        causal = torch.ones(1, 1, len(prompt), len(prompt), dtype=torch.bool, device=device).triu(1)
        tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        logits = self._forward_last_logits(tokens, 0, context, causal)
        return context.key_value_memory_dict, logits

    def _generate_continuous(self, prompts, params: GenerationParams, uniforms, out: "_Responses", slots: int,
                             buffer_len: int) -> None:
        """Continuous batching (``clipo_nemo.rollout.kv_slots``): ``slots`` responses decode together;
        a finished response's slot takes the next waiting one (its prompt prefilled once and its KV
        cache copied to each of its ``n`` responses). Every decode step feeds every slot.

        Finished responses are looked for every ``finish_check_every`` decode steps, and at once when
        a response reaches ``max_new_tokens`` (counted on the host): the only host synchronisation of
        the loop besides admissions; a response that ended in between has run on for a few throw-away
        steps, cut off by the check at exactly the token that ended it."""
        device, n = uniforms.device, params.n
        cache = SlotCache(slots, buffer_len, device)
        waiting = list(range(out.rows))[::-1]  # pop() gives rows in order
        slot_row = [-1] * slots  # the row each slot decodes (-1: free)
        prompt_caches: dict = {}  # prompt -> (KV cache, last logits) while some of its responses wait
        logits = None  # [slots, V]: each live slot's next-token logits (last pipeline stage)
        fresh: List[int] = []  # slots whose logits are not sampled yet
        next_tokens = torch.full((slots,), self.pad_token_id, dtype=torch.long, device=device)
        steps = 0
        made = [0] * out.rows  # tokens sampled for each response, counted on the host (no synchronisation)
        last: list = [None, None]  # (slots, rows) and their device copies, made again only when they change

        def on_device(fresh_slots, rows):  # a host -> device copy waits for the device: not on every step
            key = (tuple(fresh_slots), tuple(rows))
            if last[0] != key:
                last[:] = [key, (torch.tensor(key[0], device=device), torch.tensor(key[1], device=device))]
            return last[1]

        while True:
            while True:  # admit into free slots, sample, check, until no slot is free or no response waits
                free = [s for s in range(cache.slots) if slot_row[s] < 0]
                if free and waiting:
                    admitted = [(s, waiting.pop()) for s in free[: len(waiting)]]
                    logits = self._admit(admitted, prompts, n, cache, prompt_caches, logits, device)
                    for s, row in admitted:
                        slot_row[s] = row
                    fresh += [s for s, _ in admitted]
                if fresh:
                    fresh_t, rows = on_device(fresh, [slot_row[s] for s in fresh])
                    next_tokens[fresh_t] = self._sample_and_record(
                        None if logits is None else logits[fresh_t], rows, uniforms, out, params)
                    for s in fresh:
                        made[slot_row[s]] += 1
                    fresh = []
                live = [s for s in range(cache.slots) if slot_row[s] >= 0]
                capped = any(made[slot_row[s]] >= params.max_new_tokens for s in live)
                if steps % self.finish_check_every and live and not capped:
                    break
                self._mark_finished(torch.tensor([slot_row[s] for s in live], device=device), out, params)
                slot_row = [-1 if row >= 0 and out.reasons[row] is not None else row for row in slot_row]
                if not (waiting and any(row < 0 for row in slot_row)):
                    break
            live = [s for s in range(cache.slots) if slot_row[s] >= 0]
            if not live:
                break
            if not waiting and 2 * (cache.slots - len(live)) >= cache.slots:  # the tail: drop free slots
                keep = torch.tensor(live, device=device)
                cache.keep(keep)
                next_tokens = next_tokens[keep]
                slot_row = [slot_row[s] for s in live]
                live = list(range(len(live)))
            if cache.end >= buffer_len:
                cache.shift_to(int(cache.lengths()[live].max()))
            positions = cache.lengths()[:, None]
            self.decode_passes += 1
            with slot_forward_hooks(self.gpt, cache):
                logits = self._forward_last_logits(next_tokens[:, None], cache.end, cache.context,
                                                   cache.attention_mask(), positions)
            fresh, steps = live, steps + 1

    def _admit(self, admitted, prompts, n: int, cache: SlotCache, prompt_caches: dict, logits, device):
        """Put waiting rows into free slots (``admitted``: (slot, row) pairs): prefill each new prompt
        once, make room before the timeline's end, copy its KV cache into the slots; returns the
        slots' logits with the admitted slots' rows set to their prompts' last logits."""
        for _, row in admitted:
            if row // n not in prompt_caches:
                prompt_caches[row // n] = self._prefill(prompts[row // n], device)
        need = max(len(prompts[row // n]) for _, row in admitted)
        if cache.end < need:
            cache.shift_to(need)
        for s, row in admitted:
            kv, prompt_logits = prompt_caches[row // n]
            cache.place(s, kv)
            if prompt_logits is not None:
                if logits is None:
                    logits = prompt_logits.new_zeros(cache.slots, prompt_logits.shape[-1])
                logits[s] = prompt_logits[0]
            if row % n == n - 1:  # the prompt's last response: its prefill is no longer needed
                del prompt_caches[row // n]
        return logits

    def _generate_static(self, prompts, params: GenerationParams, uniforms, out: "_Responses", per_chunk: int) -> None:
        """Static chunks of ``per_chunk`` rows, one after another (``rollout.batching=static``)."""
        n = params.n
        for start in range(0, out.rows, per_chunk):
            stop = min(start + per_chunk, out.rows)
            first, last = start // n, (stop - 1) // n  # the prompts these rows answer
            row_prompt = torch.arange(start, stop) // n - first
            self._generate_chunk(prompts[first : last + 1], row_prompt, params, uniforms,
                                 torch.arange(start, stop, device=uniforms.device), out)

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], row_prompt: torch.Tensor, params: GenerationParams,
                        uniforms: torch.Tensor, row_ids: torch.Tensor, out: "_Responses") -> None:
        """Responses for rows ``row_ids`` (global, [rows]) whose prompts are ``prompts[row_prompt]``
        (``row_prompt`` [rows], non-decreasing), written into ``out``."""
        from megatron.core.inference.contexts import StaticInferenceContext

        device = uniforms.device
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
        shortest, longest = int(prompt_lengths.min()), int(prompt_lengths.max())
        prompt_tokens = torch.full((len(prompts), longest + 1), self.pad_token_id, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            prompt_tokens[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)

        context = StaticInferenceContext(len(prompts), longest + params.max_new_tokens)
        causal = torch.ones(1, 1, shortest, shortest, dtype=torch.bool, device=device).triu(1)
        logits = self._forward_last_logits(prompt_tokens[:, :shortest], 0, context, causal)
        context.enable_decode_mode()

        # Each prompt's cache and last logits serve its responses; `rows` maps cache rows to chunk rows.
        row_prompt = row_prompt.to(device)
        rows = torch.arange(len(row_prompt), device=device)
        keep_cache_rows(context, row_prompt)
        logits = None if logits is None else logits[row_prompt]
        position = shortest  # the position whose token is chosen this step
        while True:
            in_prompt = position < prompt_lengths[row_prompt[rows]]
            generating = ~in_prompt & ~out.finished[row_ids[rows]]
            sampled = torch.zeros(len(rows), dtype=torch.long, device=device)
            if bool(generating.any()):
                gen_logits = None if logits is None else logits[generating]
                gen_rows = row_ids[rows[generating]]
                sampled[generating] = self._sample_and_record(gen_logits, gen_rows, uniforms, out, params)
                self._mark_finished(gen_rows, out, params)
            next_tokens = torch.where(in_prompt, prompt_tokens[row_prompt[rows], min(position, longest)], sampled)
            if bool(out.finished[row_ids].all()):
                break
            live = ~out.finished[row_ids[rows]]
            if int((~live).sum()) * 2 >= len(rows):
                keep_cache_rows(context, live.nonzero().squeeze(-1))
                rows, next_tokens = rows[live], next_tokens[live]
            logits = self._forward_last_logits(next_tokens.unsqueeze(-1), position, context, None)
            self.decode_passes += 1
            position += 1

    def _mark_finished(self, rows: torch.Tensor, out: "_Responses", params) -> None:
        """Finish rows (global ids) whose tokens since their last check hold an EOS token, complete a
        stop string, or reach the length cap: the response is cut right after the first such token.
        One host synchronisation for all ``rows``."""
        if len(rows) == 0:
            return
        window = max((len(s) for s in params.stop), default=0) + _STOP_WINDOW_SLACK
        row_list, lengths = rows.tolist(), out.lengths[rows].tolist()
        first = min(out.checked[row] for row in row_list)
        low = max(0, first - window)
        tokens = out.tokens[rows, low : max(lengths)].tolist()  # the part any check below reads
        eos = set(self.eos_token_ids.tolist())
        for row, length, row_tokens in zip(row_list, lengths, tokens):
            for end in range(out.checked[row] + 1, length + 1):  # the response cut after `end` tokens
                if row_tokens[end - 1 - low] in eos or (params.stop and self._ends_with_stop(
                        row_tokens[max(0, end - window) - low : end - low], params.stop)):
                    out.reasons[row] = FINISH_STOP
                elif end >= params.max_new_tokens:
                    out.reasons[row] = FINISH_LENGTH
                if out.reasons[row] is not None:
                    out.lengths[row] = end
                    out.finished[row] = True
                    break
            out.checked[row] = length

    def _ends_with_stop(self, tail: List[int], stop: Sequence[str]) -> bool:
        text = self.tokenizer.decode(tail)
        return any(s in text for s in stop)


class _Responses:
    """The responses of one ``generate`` call, filled row by row (global row ids): ``tokens`` [rows,
    max_new] long (pad after each response; a response that ran on past its end between finish
    checks has junk there until it is cut), ``lengths`` and ``finished`` [rows], ``reasons``."""

    def __init__(self, rows: int, max_new: int, pad: int, device: torch.device) -> None:
        self.rows = rows
        self.tokens = torch.full((rows, max_new), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.reasons: List[Optional[str]] = [None] * rows
        self.checked = [0] * rows  # tokens of each response already looked at for an end (host)


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
