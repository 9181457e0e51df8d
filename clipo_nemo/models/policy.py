"""Build the policy: a megatron-core ``GPTModel`` shaped like Qwen2/Qwen2.5 or Llama 3.

RMSNorm, SwiGLU MLP without biases, grouped-query attention with optional QKV bias, RoPE (optional
Llama 3.1 frequency scaling), tied or untied embeddings, and a vocabulary padded so that it splits
evenly over TP. Transformer Engine layers when TE is importable and a GPU is present, megatron's
local layers otherwise (the only choice on CPU). Activation recomputation (``model.recompute``) is
megatron's own: ``selective`` recomputes core attention, ``full`` whole layers in blocks of
``model.recompute_num_layers`` ("uniform" method). Call after
:func:`clipo_nemo.parallel.state.init_parallel_state`: the model holds this rank's TP shard of this
rank's PP stage.
"""
from __future__ import annotations

import importlib.util
import itertools
from typing import Optional

import torch
import torch.nn.functional as F

from clipo_nemo.config import ModelConfig, ParallelConfig

# model.params_dtype names -> torch dtypes (also the conversion tools' --dtype choices)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def params_dtype(model: ModelConfig) -> torch.dtype:
    """The torch dtype named by ``model.params_dtype``."""
    if model.params_dtype not in TORCH_DTYPES:
        raise ValueError(f"model.params_dtype={model.params_dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[model.params_dtype]


def padded_vocab_size(vocab_size: int, make_divisible_by: int, tensor_parallel_size: int) -> int:
    """Vocabulary rows of the embedding/output layer: ``vocab_size`` rounded up to a multiple of
    ``make_divisible_by * tensor_parallel_size`` so every TP rank holds the same number of rows."""
    multiple = make_divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


RECOMPUTE_MODES = ("none", "selective", "full")


def transformer_engine_available() -> bool:
    """True when Transformer Engine can be imported and a GPU is present (then its layer spec is used):
    TE's layers need CUDA, so an importable TE on a CPU-only machine must not pick them."""
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def recompute_settings(model: ModelConfig) -> dict:
    """``TransformerConfig`` keys for ``model.recompute`` (megatron's ``recompute_granularity``,
    ``recompute_method`` and ``recompute_num_layers``)."""
    if model.recompute not in RECOMPUTE_MODES:
        raise ValueError(f"model.recompute={model.recompute!r}: expected one of {list(RECOMPUTE_MODES)}")
    if model.recompute == "none":
        return {}
    if model.recompute == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": "uniform",
            "recompute_num_layers": model.recompute_num_layers}


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """megatron-core ``TransformerConfig`` for this model and layout (fusions off without TE)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype(model)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # The fused kernels below exist only with CUDA (and some only with TE/Apex).
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # no CUDA graphs; megatron's default "full" is deprecated (a warning per build)
        **recompute_settings(model),
    )


def build_policy_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
):
    """Build this rank's piece of the policy as a megatron-core ``GPTModel``.

    ``pre_process`` (embedding) and ``post_process`` (final norm + output layer) default to whether
    this rank is the first / last pipeline stage. Logits stay split over TP (``parallel_output``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    config = build_transformer_config(model, parallel)
    if transformer_engine_available():
        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    policy = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(
            model.vocab_size, model.make_vocab_size_divisible_by, parallel.tensor_parallel_size
        ),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
    )
    if policy.config.bf16:
        # What megatron's Float16Module does to the model it wraps: every floating parameter in bf16.
        # The local spec's norms (torch.nn.RMSNorm) are otherwise created in fp32.
        policy.bfloat16()
    if torch.cuda.is_available():
        policy.cuda(torch.cuda.current_device())
    return policy


def compute_device() -> torch.device:
    """Where models compute: this process's GPU, or the CPU on a machine without one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def move_module(module: torch.nn.Module, device: torch.device, *, pin: bool = False) -> None:
    """Move ``module``'s parameters and buffers to ``device`` in place.

    The ``Parameter`` objects stay the same (only their ``.data`` changes), so ``load_state_dict``
    and sharded state dicts keep pointing at them wherever they live. ``pin``: with ``device`` =
    CPU, page-locked memory (needs CUDA), so the copy back to the GPU is asynchronous. A tensor
    already where it should be is left as it is (on a CPU-only machine CPU -> CPU is a no-op).
    """
    device = torch.device(device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device == device and (not pin or tensor.is_pinned()):
            continue
        if device.type == "cpu":
            host = torch.empty_like(tensor.data, device="cpu", pin_memory=pin)
            host.copy_(tensor.data)
            tensor.data = host
        else:
            tensor.data = tensor.data.to(device, non_blocking=True)
