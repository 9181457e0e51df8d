"""Per-GPU memory of each part of a CLIPO run, as pure arithmetic on the model shape and layout.

Every function returns bytes for ONE rank (one tensor-parallel shard of one pipeline stage).
Notation: ``h`` hidden size, ``f`` FFN size, ``n_h`` query heads, ``n_g`` key/value groups, ``d`` head
size, ``q = n_h d`` (query width), ``kv = n_g d``, ``t`` tensor-parallel size, ``V_p`` the padded
vocabulary, ``s`` the sequence length, ``T`` tokens in one micro-batch, ``B`` bytes per element of
the compute dtype (``model.params_dtype``).

What was checked against measured memory (``tests/test_planner.py``, CPU, fp32, local layer spec):
parameters, the DDP gradient buffer, AdamW state, activations per token (none / selective / full
recompute), the log-prob chunk buffers and the KV cache per row. The flash-attention (Transformer
Engine) activation variant and everything GPU-specific are estimates.
"""
from __future__ import annotations

from clipo_nemo.config import ModelConfig
from clipo_nemo.models.policy import RECOMPUTE_MODES, padded_vocab_size
from clipo_nemo.rollout.megatron_engine import kv_cache_bytes_per_row  # noqa: F401  (the engine's own count)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# fp32 [chunk, V/t] buffers alive at the peak of one chunk of the fused log-prob pass: one (forward:
# the logits, exponentiated in place; backward: two half-chunk blocks, the logit gradient and the
# probabilities). Measured on CPU: 1.00 forward, 1.00-1.37 backward (tests/test_planner.py).
LOGPROB_CHUNK_FP32_BUFFERS = 1


def dtype_bytes(model: ModelConfig) -> int:
    """Bytes per element of the parameter/compute dtype."""
    if model.params_dtype not in DTYPE_BYTES:
        raise ValueError(f"model.params_dtype={model.params_dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[model.params_dtype]


def head_dim(model: ModelConfig) -> int:
    """``d``: kv_channels, or hidden / heads."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads


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
    vocab_rows = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp) // tp
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


def activation_elements_per_token(model: ModelConfig, tp: int, seq_len: int, *, recompute: str,
                                  flash_attention: bool, sequence_parallel: bool = False) -> float:
    """Elements (of the compute dtype) one transformer layer keeps for backward, per token.

    The Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models")
    accounting, redone for megatron-core's Qwen2/Llama layer (RMSNorm, GQA, SwiGLU, no biases but QKV,
    dropout 0 so no masks) and counted tensor by tensor on CPU with ``saved_tensors_hooks``:

    - each RMSNorm: its input, the normalised value and the weighted output (``3h``; the output is
      what the next linear saves), two norms: ``6h`` (``6h / t`` with sequence parallel);
    - SwiGLU MLP: ``fc1``'s output ``2f``, the SiLU output ``f``, a gate copy ``f`` and the product
      that ``fc2`` saves ``f``: ``5f / t``;
    - attention, unfused (megatron's local ``DotProductAttention``): the query, the key and value
      repeated to ``n_h`` heads, the context (``4q / t``) and the softmax probabilities
      ``n_h s / t`` per token -- the quadratic term;
    - attention with flash attention (Transformer Engine) or selective recompute (megatron's
      ``core_attn``): only its inputs ``q, k, v`` and its output: ``(2q + 2kv) / t``.

    ``recompute="full"`` is not handled here (see :func:`stage_activation_bytes`).
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"model.recompute={recompute!r}: expected one of {list(RECOMPUTE_MODES)}")
    h, f, d = model.hidden_size, model.ffn_hidden_size, head_dim(model)
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    norms = 6 * h / (tp if sequence_parallel else 1)
    mlp = 5 * f / tp
    if flash_attention or recompute == "selective":
        attention = (2 * q + 2 * kv) / tp
    else:
        attention = 4 * q / tp + model.num_attention_heads * seq_len / tp
    return norms + mlp + attention


def stage_activation_bytes(model: ModelConfig, tp: int, pp: int, stage: int, tokens: int, seq_len: int, *,
                           recompute: str, recompute_num_layers: int, flash_attention: bool,
                           sequence_parallel: bool = False) -> int:
    """Activations one rank of ``stage`` holds at the peak of the backward pass.

    ``tokens`` per micro-batch (``T``, padding included), rows of ``seq_len``. In 1F1B the stage holds
    ``pp - stage`` micro-batches in flight. ``recompute="full"`` (megatron's uniform method, blocks of
    ``recompute_num_layers``) keeps each block's input ``h`` per token and rebuilds one block at a
    time in backward. The last stage adds the final norm (``3h``). Sequence parallel splits the
    tensors between layers (and the norms') over TP.
    """
    b = DTYPE_BYTES[model.params_dtype]
    layers = model.num_layers // pp
    in_flight = pp - stage
    per_layer = activation_elements_per_token(model, tp, seq_len, recompute="none" if recompute == "full" else recompute,
                                              flash_attention=flash_attention, sequence_parallel=sequence_parallel)
    hidden = model.hidden_size / (tp if sequence_parallel else 1)  # [s(/t), b, h] tensors between layers
    if recompute == "full":
        block = max(1, min(recompute_num_layers, layers))
        elements = in_flight * -(-layers // block) * hidden * tokens + block * per_layer * tokens
    else:
        elements = in_flight * layers * per_layer * tokens
    if stage == pp - 1:
        elements += 3 * hidden * tokens
    return int(elements * b)


def forward_only_activation_bytes(model: ModelConfig, tp: int, tokens: int, seq_len: int, *,
                                  flash_attention: bool) -> int:
    """Transient memory of a no-grad forward (old / reference log-probs): at most one layer's
    intermediates at a time, bounded by what that layer would keep for backward."""
    per_layer = activation_elements_per_token(model, tp, seq_len, recompute="none", flash_attention=flash_attention)
    return int(per_layer * tokens * DTYPE_BYTES[model.params_dtype])


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
    b = DTYPE_BYTES[model.params_dtype]
    low = b if b != 4 else 0
    logits = min(chunk, tokens) * vocab
    scored = tokens * model.hidden_size * b
    forward = logits * (LOGPROB_CHUNK_FP32_BUFFERS * 4 + low) + scored
    if not with_grad:
        return forward
    backward = (logits * (LOGPROB_CHUNK_FP32_BUFFERS * 4 + low / 2) + vocab * model.hidden_size * b
                + tokens * model.hidden_size * 4 + scored)
    return int(max(forward, backward))


def head_parameters(hidden_size: int, dim: int, head_type: str, tp: int, tp_mode: str) -> int:
    """Parameters of the contrastive head on one rank (``linear``: H x D; ``mlp``: H x H + H x D;
    ``column`` splits the output dimensions over TP)."""
    split = tp if tp_mode == "column" else 1
    if head_type == "mlp":
        return hidden_size * hidden_size // split + hidden_size * dim // split
    return hidden_size * dim // split
