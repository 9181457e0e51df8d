"""Per-GPU memory of each part of a CLIPO run, as pure arithmetic on the model shape and layout.

Every function returns bytes for ONE rank (one tensor-parallel shard of one pipeline stage).
Notation: ``h`` hidden size, ``f`` FFN size, ``n_h`` query heads, ``n_g`` key/value groups, ``d`` head
size, ``q = n_h d`` (query width), ``kv = n_g d``, ``t`` tensor-parallel size, ``V_p`` the padded
vocabulary, ``s`` the sequence length, ``T`` tokens in one micro-batch, ``B`` bytes per element of
the compute dtype (``model.params_dtype``).

What was checked against measured memory (``tests/test_planner.py``, CPU, fp32, local layer spec):
parameters, the DDP gradient buffer, AdamW state, activations per token (none / selective / full
recompute), the log-prob chunk buffers and the KV cache per row; for megatron's local attention also
the fp32 backward peak of one layer's core attention (none / selective) and, in bf16, the bytes core
attention saves (6 per score) and the peak of a no-grad forward (12 per score).

Calibrated on an NVIDIA H100 80GB (torch 2.11, megatron-core 0.16.1, no Transformer Engine, so the
local unfused attention), ``python tools/gpu_checks.py plan``: 2 layers at Qwen2.5-7B width, bf16,
TP 1, one row of 4,608 tokens, response positions 256..4607, log-prob chunk 1,024; peak
``torch.cuda.max_memory_allocated()`` of ``forward_backward_policy`` above the memory before it.
Weights, gradient buffer and optimizer state: ratio 1.000. Train step (GiB):

============================  ========  ==============================  ===========================
run (in this order)           measured  before (saved 2 B/score, no     :func:`train_step_peak_bytes`
                                        buffer, no transient)
============================  ========  ==============================  ===========================
none (allocates the buffer)   14.652    6.376 (0.435)                   14.687 (1.002)
selective (buffer reused)     10.225    4.055 (0.397)                   10.151 (0.993)
none again (buffer reused)    13.479    --                              13.579 (1.007)
============================  ========  ==============================  ===========================

CUDA memory history of that probe (the h8 diagnostic run) showed the missing terms: each layer's
saved fp32 probabilities (2.21 GiB) and bf16 copy (1.11 GiB), megatron's 1.11 GiB score buffer,
and at the peak -- the last layer's core-attention backward, also when recomputed (selective) --
three more fp32 2.21 GiB temporaries beside its saved fp32 probabilities
(:func:`local_attention_score_bytes`). ``tests/test_planner.py::test_h100_probe_prediction``
prints these predictions. Re-run after this change on the same H100, ``gpu_checks.py plan`` with
:func:`train_step_peak_bytes` gave 14.687 vs 14.646 GiB (1.003) and 10.151 vs 10.220 GiB (0.993). The flash-attention (Transformer Engine) variant, the framework overhead
and everything else GPU-specific are estimates.
"""
from __future__ import annotations

from typing import Dict

from clipo_nemo.config import ModelConfig, head_dim
from clipo_nemo.models.policy import RECOMPUTE_MODES, padded_vocab_size, params_dtype
from clipo_nemo.rollout.megatron_engine import kv_cache_bytes_per_row  # noqa: F401  (the engine's own count)

# fp32 [chunk, V/t] buffers alive at the peak of one chunk of the fused log-prob pass: one (forward:
# the logits, exponentiated in place; backward: two half-chunk blocks, the logit gradient and the
# probabilities). Measured on CPU: 1.00 forward, 1.00-1.37 backward (tests/test_planner.py).
LOGPROB_CHUNK_FP32_BUFFERS = 1


def dtype_bytes(model: ModelConfig) -> int:
    """Bytes per element of the parameter/compute dtype (ValueError for an unknown one)."""
    return params_dtype(model).itemsize


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank.

    Fused QKV ``h x (q + 2 kv)`` (+ its bias with ``add_qkv_bias``), output projection ``q x h``,
    SwiGLU ``fc1`` ``h x 2f`` and ``fc2`` ``f x h`` are split over TP; the two RMSNorm weights
    (``2h``) are replicated.
    """
    h, d = model.hidden_size, head_dim(model)
    qkv_width = (model.num_attention_heads + 2 * model.num_query_groups) * d
    sharded = h * qkv_width + model.num_attention_heads * d * h + 3 * h * model.ffn_hidden_size
    if model.add_qkv_bias:
        sharded += qkv_width
    return sharded // tp + 2 * h


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one TP rank of pipeline stage ``stage`` (0-based).

    The first stage holds the word embedding ``V_p x h / t``; the last stage the final norm ``h`` and
    the output layer ``V_p x h / t`` (untied, or tied with PP > 1: megatron keeps a copy there).
    """
    vocab_rows = vocab_rows_per_rank(model, tp)
    count = (model.num_layers // pp) * layer_parameters(model, tp)
    first, last = stage == 0, stage == pp - 1
    if first:
        count += vocab_rows * model.hidden_size
    if last:
        count += model.hidden_size
        if not model.tie_word_embeddings or not first:
            count += vocab_rows * model.hidden_size
    return count


def optimizer_bytes_per_parameter(model: ModelConfig, optimizer: str, on_gpu: bool) -> int:
    """Optimizer state per parameter before any distributed-optimizer split.

    GPU (megatron's optimizer): Adam moments ``m, v`` in fp32 (8 bytes) plus an fp32 master copy
    (4 bytes) when the parameters are bf16/fp16 -- 12 bytes/param in bf16. SGD keeps only the master
    copy. CPU (``torch.optim``, parameters updated in place): AdamW's two moments in the parameter
    dtype, SGD nothing.
    """
    low_precision = model.params_dtype != "float32"
    if on_gpu:
        return (8 if optimizer == "adamw" else 0) + (4 if low_precision else 0)
    return 2 * dtype_bytes(model) if optimizer == "adamw" else 0


def local_attention_scores(model: ModelConfig, tp: int, tokens: int, seq_len: int) -> int:
    """Attention scores of one layer on one TP rank for ``tokens`` tokens in rows of ``seq_len``:
    ``(T / s) * (n_h / t) * s^2 = T n_h s / t`` (megatron's unfused [b * n_h / t, s, s] matrices)."""
    return tokens * (model.num_attention_heads // tp) * seq_len


def local_attention_score_bytes(model: ModelConfig) -> Dict[str, int]:
    """Bytes per attention score of megatron's local ``DotProductAttention`` (no Transformer Engine).

    The scores are computed by ``baddbmm`` into a new [b n_h / t, s, s] tensor in the compute dtype
    (``B`` bytes). ``FusedScaleMaskSoftmax`` without fusion (``masked_softmax_fusion=False``; its
    CUDA kernel would also stop at s > 4,096) upcasts them to fp32 when ``B < 4``
    (``attention_softmax_in_fp32``), masks in place, softmaxes in fp32 and casts the probabilities
    back to ``B``:

    - ``saved``: kept for backward per layer: the fp32 probabilities (softmax) and their cast-back
      (the context ``bmm``): ``4 + B`` in 16-bit (6 bytes), 4 in fp32;
    - ``buffer``: megatron's global memory buffer that ``baddbmm`` reads (``beta=0``): ``B``, allocated
      once at the largest size used and never freed (resident in every phase after the first step);
    - ``forward``: a no-grad forward's transient in one layer: scores, their fp32 copy, the fp32 and
      the cast-back probabilities (``B + 4 + 4 + B``: 12 bytes in 16-bit; fp32: scores masked in
      place and probabilities, 8 bytes);
    - ``backward``: the peak of one layer's core-attention backward: the saved fp32 probabilities
      next to three fp32 score-sized temporaries (incoming gradient, the softmax backward's result
      and one more), the cast-back copy already freed: 16 bytes in both dtypes.

    Measured on an NVIDIA H100 (bf16, torch 2.11, CUDA memory history: three 2.21 GiB fp32
    allocations next to the saved fp32 probabilities at the peak) and on CPU (fp32 and bf16 saved
    tensors; fp32 backward peak). See the module docstring.
    """
    b = dtype_bytes(model)
    upcast = b < 4
    return {"saved": 4 + (b if upcast else 0), "buffer": b,
            "forward": 2 * b + 8 if upcast else b + 4, "backward": 16}


def layer_activation_bytes(model: ModelConfig, tp: int, seq_len: int, *, recompute: str, flash_attention: bool,
                           sequence_parallel: bool = False) -> Dict[str, float]:
    """Bytes one transformer layer keeps for backward, per token, by part.

    The Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models")
    accounting, redone for megatron-core's Qwen2/Llama layer (RMSNorm, GQA, SwiGLU, no biases but QKV,
    dropout 0 so no masks) and counted tensor by tensor with ``saved_tensors_hooks`` (elements of
    the compute dtype, ``B`` bytes each, unless said otherwise):

    - ``norms``: each RMSNorm's input, normalised value and weighted output (``3h``; the output is
      what the next linear saves), two norms: ``6h`` (``6h / t`` with sequence parallel);
    - ``mlp``: SwiGLU: ``fc1``'s output ``2f``, the SiLU output ``f``, a gate copy ``f`` and the
      product that ``fc2`` saves ``f``: ``5f / t``;
    - ``attention_inputs``: what core attention keeps of its inputs: unfused, the query and the key
      and value repeated to ``n_h`` heads (``3q / t``); flash attention (Transformer Engine) or
      selective recompute (megatron's checkpointed ``core_attn``): ``q, k, v`` (``(q + 2kv) / t``);
    - ``attention_output``: the context that the output projection saves (``q / t``);
    - ``scores``: unfused attention without selective recompute only: the probabilities,
      :func:`local_attention_score_bytes` ``["saved"]`` bytes per score, ``n_h s / t`` scores per
      token -- the quadratic term.

    ``recompute="full"`` is not handled here (see :func:`stage_saved_activation_bytes`).
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"model.recompute={recompute!r}: expected one of {list(RECOMPUTE_MODES)}")
    b = dtype_bytes(model)
    h, f, d = model.hidden_size, model.ffn_hidden_size, head_dim(model)
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    stores_scores = not flash_attention and recompute != "selective"
    return {
        "norms": 6 * h / (tp if sequence_parallel else 1) * b,
        "mlp": 5 * f / tp * b,
        "attention_inputs": (3 * q if stores_scores else q + 2 * kv) / tp * b,
        "attention_output": q / tp * b,
        "scores": (local_attention_scores(model, tp, 1, seq_len) * local_attention_score_bytes(model)["saved"]
                   if stores_scores else 0),
    }


def activation_bytes_per_token(model: ModelConfig, tp: int, seq_len: int, *, recompute: str, flash_attention: bool,
                               sequence_parallel: bool = False) -> float:
    """Bytes one transformer layer keeps for backward per token (:func:`layer_activation_bytes`)."""
    return sum(layer_activation_bytes(model, tp, seq_len, recompute=recompute, flash_attention=flash_attention,
                                      sequence_parallel=sequence_parallel).values())


def stage_saved_activation_bytes(model: ModelConfig, tp: int, pp: int, stage: int, tokens: int, seq_len: int, *,
                                 recompute: str, recompute_num_layers: int, flash_attention: bool,
                                 sequence_parallel: bool = False) -> int:
    """Activations one rank of ``stage`` keeps for backward when the backward pass starts.

    ``tokens`` per micro-batch (``T``, padding included), rows of ``seq_len``. In 1F1B the stage holds
    ``pp - stage`` micro-batches in flight. ``recompute="full"`` (megatron's uniform method, blocks of
    ``recompute_num_layers``) keeps each block's input ``h`` per token, and one block is rebuilt at a
    time in backward (counted here: the block's layers without recompute). The last stage adds the
    final norm (``3h``). Sequence parallel splits the tensors between layers (and the norms') over TP.
    """
    b = dtype_bytes(model)
    layers = model.num_layers // pp
    in_flight = pp - stage
    per_layer = activation_bytes_per_token(model, tp, seq_len, recompute="none" if recompute == "full" else recompute,
                                           flash_attention=flash_attention, sequence_parallel=sequence_parallel)
    hidden = model.hidden_size / (tp if sequence_parallel else 1) * b  # [s(/t), b, h] tensors between layers
    if recompute == "full":
        block = max(1, min(recompute_num_layers, layers))
        total = in_flight * -(-layers // block) * hidden * tokens + block * per_layer * tokens
    else:
        total = in_flight * layers * per_layer * tokens
    if stage == pp - 1:
        total += 3 * hidden * tokens
    return int(total)


def attention_backward_extra_bytes(model: ModelConfig, tp: int, tokens: int, seq_len: int, *, recompute: str,
                                   flash_attention: bool, sequence_parallel: bool = False) -> int:
    """Unfused attention: what the backward of the first layer it reaches (the last one, or the
    rebuilt block's last) adds above :func:`stage_saved_activation_bytes`, at its peak.

    That layer's core-attention backward holds ``local_attention_score_bytes["backward"]`` bytes per
    score; what it keeps of them is already counted (none with selective recompute), and its
    post-attention tensors are freed by then (second norm, MLP, the context: ``3h + 5f + q``). Zero
    with flash attention (no [s, s] tensors); never negative.
    """
    if flash_attention:
        return 0
    per_score = local_attention_score_bytes(model)
    parts = layer_activation_bytes(model, tp, seq_len, recompute="none" if recompute == "full" else recompute,
                                   flash_attention=False, sequence_parallel=sequence_parallel)
    scores = local_attention_scores(model, tp, tokens, seq_len)
    kept = parts["scores"] * tokens
    freed = (parts["norms"] / 2 + parts["mlp"] + parts["attention_output"]) * tokens
    return int(max(0, scores * per_score["backward"] - kept - freed))


def attention_score_buffer_bytes(model: ModelConfig, tp: int, tokens: int, seq_len: int, *,
                                 flash_attention: bool) -> int:
    """Megatron's global memory buffer for the unfused attention's ``baddbmm`` input: [b n_h / t, s, s]
    in the compute dtype for the largest micro-batch, allocated once and never freed. 0 with flash
    attention."""
    if flash_attention:
        return 0
    return local_attention_scores(model, tp, tokens, seq_len) * local_attention_score_bytes(model)["buffer"]


def forward_only_activation_bytes(model: ModelConfig, tp: int, tokens: int, seq_len: int, *,
                                  flash_attention: bool) -> int:
    """Transient memory of a no-grad forward (old / reference log-probs): one layer's intermediates at
    a time, bounded by what that layer would keep for backward, with the unfused attention's
    scores, their fp32 copy and both probabilities (``local_attention_score_bytes["forward"]`` per
    score) instead of the saved probabilities."""
    parts = layer_activation_bytes(model, tp, seq_len, recompute="none", flash_attention=flash_attention)
    parts["scores"] = 0 if flash_attention else local_attention_scores(model, tp, 1, seq_len) * \
        local_attention_score_bytes(model)["forward"]
    return int(sum(parts.values()) * tokens)


def train_step_peak_bytes(model: ModelConfig, tp: int, pp: int, stage: int, tokens: int, seq_len: int, *,
                          recompute: str, recompute_num_layers: int, flash_attention: bool, scored_tokens: int,
                          logprob_chunk: int, sequence_parallel: bool = False,
                          score_buffer_allocated: bool = False) -> int:
    """Peak memory of one forward + backward of the policy above the static state, on one rank.

    Everything kept for backward, megatron's score buffer (unless ``score_buffer_allocated``: an
    earlier step made it), and the larger of two moments that do not overlap: the fused log-prob
    pass's backward (last stage; its buffers are freed before the layers' backward starts) and the
    unfused attention's backward transient of the first layer it reaches.
    """
    saved = stage_saved_activation_bytes(model, tp, pp, stage, tokens, seq_len, recompute=recompute,
                                         recompute_num_layers=recompute_num_layers, flash_attention=flash_attention,
                                         sequence_parallel=sequence_parallel)
    attention = attention_backward_extra_bytes(model, tp, tokens, seq_len, recompute=recompute,
                                               flash_attention=flash_attention, sequence_parallel=sequence_parallel)
    logprob = logprob_pass_bytes(model, tp, scored_tokens, logprob_chunk, with_grad=True) if stage == pp - 1 else 0
    buffer = 0 if score_buffer_allocated else attention_score_buffer_bytes(model, tp, tokens, seq_len,
                                                                           flash_attention=flash_attention)
    return saved + buffer + max(attention, logprob)


def vocab_rows_per_rank(model: ModelConfig, tp: int) -> int:
    """``V_p / t``: output-layer rows (vocabulary entries, padding included) on one TP rank."""
    return padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp) // tp


def logprob_pass_bytes(model: ModelConfig, tp: int, tokens: int, chunk: int, *, with_grad: bool) -> int:
    """Peak temporaries of the fused output-layer + log-prob/entropy pass (``models/logprobs.py``) on
    the last stage, which never materialises [T, V] logits.

    Forward: :data:`LOGPROB_CHUNK_FP32_BUFFERS` fp32 [c, V_p / t] buffers for ``c = min(chunk, T)``
    positions (plus the matmul's output in the compute dtype before its upcast when that is not
    fp32) and the gathered scored hidden states [T, h]. Backward (``with_grad``; the forward's
    buffers are gone by then): as many logits in blocks (plus half a chunk in the compute dtype: the
    block's matmul output and the cast gradient), the output weight's gradient [V_p / t, h] in the
    compute dtype, the fp32 gradient of the scored hidden states [T, h] and the saved [T, h].
    """
    vocab = vocab_rows_per_rank(model, tp)
    b = dtype_bytes(model)
    low = b if b != 4 else 0
    logits = min(chunk, tokens) * vocab
    scored = tokens * model.hidden_size * b
    forward = logits * (LOGPROB_CHUNK_FP32_BUFFERS * 4 + low) + scored
    if not with_grad:
        return forward
    backward = (logits * (LOGPROB_CHUNK_FP32_BUFFERS * 4 + low / 2) + vocab * model.hidden_size * b
                + tokens * model.hidden_size * 4 + scored)
    return int(max(forward, backward))


# Bytes per [rows, V] element that sampling one token takes beyond the logits (the engine's
# filtered_probs works in float64): peak memory growth on CPU at 64 rows x V=152,064 and in
# tests/test_planner.py (32 x 32,768).
SAMPLING_BYTES_TOP_P = 56  # top_p < 1 (sorting, cumulative sums)
SAMPLING_BYTES_PLAIN = 22  # temperature > 0 with top_p = 1 (or top-k)


def generation_logits_bytes(model: ModelConfig, prompts: int, rows: int, *, temperature: float, top_p: float) -> int:
    """Peak logits memory of one generation chunk on the last stage (logits gathered over TP).

    megatron's static inference context keeps only the last position's logits, so prefill holds
    [prompts, V_p] in the compute dtype (the output, its transposed copy and one more). A decode step
    holds [rows, V_p] twice in the compute dtype, once in fp32, plus the sampling temporaries
    (:data:`SAMPLING_BYTES_TOP_P` / :data:`SAMPLING_BYTES_PLAIN` per element; greedy: none).
    """
    vocab, b = vocab_rows_per_rank(model, 1), dtype_bytes(model)
    sampling = 0 if temperature == 0 else SAMPLING_BYTES_TOP_P if top_p < 1 else SAMPLING_BYTES_PLAIN
    return max(3 * prompts * vocab * b, rows * vocab * (2 * b + 4 + sampling))


def head_parameters(hidden_size: int, dim: int, head_type: str, tp: int, tp_mode: str) -> int:
    """Parameters of the contrastive head on one rank (``linear``: H x D; ``mlp``: H x H + H x D;
    ``column`` splits the output dimensions over TP)."""
    split = tp if tp_mode == "column" else 1
    if head_type == "mlp":
        return hidden_size * hidden_size // split + hidden_size * dim // split
    return hidden_size * dim // split


CONTRASTIVE_TEMPORARIES = 10  # [.., n, n]-sized fp32 tensors alive at once in the contrastive loss and its backward
#   (similarities, logits, shifted logits, exp, log-probabilities, selections and their gradients) plus 3 bool
#   masks: 43 bytes per element; tests/test_planner.py measures 41-42 (peak RSS growth of the loss and backward on CPU)


def contrastive_bytes(prompts: int, n: int, level: str) -> int:
    """The contrastive loss's similarity temporaries over the global batch (every rank of the last stage
    gathers all embeddings; clipo_nemo.models.head): at ``level="group"`` ``prompts`` blocks of
    [n, n] (contrastive._group_level), otherwise one [B, B] matrix over the B = prompts x n responses
    (contrastive._dense). Quadratic in the group (or batch) size: this bounds ``rollout.n``."""
    elements = prompts * n * n if level == "group" else (prompts * n) ** 2
    return elements * (4 * CONTRASTIVE_TEMPORARIES + 3)
