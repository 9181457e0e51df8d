"""The one Hugging Face <-> megatron-core mapping: configs, tensor names and tensor layouts.

Covers ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen) and ``LlamaForCausalLM``
(Llama 3, 3.1, 3.2 with "llama3" RoPE scaling). Megatron names are the canonical full-state-dict
names of :mod:`clipo_nemo.models.sharding` (TP=1/PP=1, global layer index, exactly ``vocab_size``
vocabulary rows, no ``output_layer.weight`` when the embeddings are tied), which
``sharding.load_full_state_dict`` loads at any TP/PP layout.

Tensor layouts (megatron-core's, as NVIDIA's own converters write them):

- fused QKV ``linear_qkv.weight`` [(nh + 2 ng) d, H]: for each of the ng key/value groups, that
  group's nh/ng query heads, then its key head, then its value head (d rows each); the QKV bias
  (Qwen2) [(nh + 2 ng) d] is interleaved the same way;
- SwiGLU ``linear_fc1.weight`` [2 F, H] = [gate_proj; up_proj];
- ``input_layernorm`` -> ``self_attention.linear_qkv.layer_norm_weight``,
  ``post_attention_layernorm`` -> ``mlp.linear_fc1.layer_norm_weight``.

Every ``to_hf`` is the exact inverse of its ``to_megatron`` (pure reshapes and concatenations, so a
round trip is bit-identical). Used by the HF importer, the HF exporter and (later) weight refit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from clipo_nemo.config import ModelConfig, head_dim


class ConversionError(ValueError):
    """A model, config, checkpoint or tensor that cannot be converted; the message names it."""


SUPPORTED_ARCHITECTURES: Dict[str, str] = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

# megatron-core's RotaryEmbedding applies Llama 3 scaling with these fixed values; only the factor varies
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_HF_DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def _architecture(hf_config: dict) -> str:
    architectures = hf_config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"config.json architectures={architectures!r}: expected exactly one of {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = hf_config.get("model_type")
    expected = SUPPORTED_ARCHITECTURES[architectures[0]]
    if model_type is not None and model_type != expected:
        raise ConversionError(f"config.json model_type={model_type!r} does not match {architectures[0]} ({expected!r})")
    return architectures[0]


def _require(hf_config: dict, key: str):
    if key not in hf_config or hf_config[key] is None:
        raise ConversionError(f"config.json has no {key!r}")
    return hf_config[key]


def _rope(hf_config: dict) -> Tuple[float, bool, float]:
    """(rotary_base, rope_scaling, rope_scaling_factor) read as transformers reads them
    (``PreTrainedConfig.convert_rope_params_to_dict`` in ``modeling_rope_utils.py``, transformers 5):
    a non-empty ``rope_scaling`` replaces ``rope_parameters`` as a whole, and a ``rope_theta`` missing
    from the dict used comes from the top-level ``rope_theta``, else 10000. When both dicts are given
    and ``rope_parameters`` names another ``rope_theta`` than the one transformers ends up using, the
    file is contradictory and refused."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    scaling = dict(hf_config.get("rope_scaling") or {})
    params = scaling or parameters
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    if scaling and "rope_theta" in parameters and float(parameters["rope_theta"]) != float(params["rope_theta"]):
        raise ConversionError(
            f"config.json has rope_parameters with rope_theta={parameters['rope_theta']} and rope_scaling, which "
            f"transformers reads instead of rope_parameters, with rope_theta={params['rope_theta']}: contradictory; "
            "keep one of them (rope_parameters, with rope_type and rope_theta)")
    base = params["rope_theta"]
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise ConversionError(f"config.json partial_rotary_factor={partial}: only full-width RoPE (1.0) is supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(base), False, ModelConfig.rope_scaling_factor
    if rope_type != "llama3":
        raise ConversionError(f"config.json rope_type={rope_type!r}: only 'default' and 'llama3' RoPE are supported")
    for key, value in MEGATRON_LLAMA3_ROPE.items():
        if key not in params or float(params[key]) != value:
            raise ConversionError(
                f"config.json llama3 RoPE scaling {key}={params.get(key)!r}: megatron-core's RotaryEmbedding "
                f"supports only {key}={value}"
            )
    if "factor" not in params:
        raise ConversionError("config.json llama3 RoPE scaling has no 'factor'")
    return float(base), True, float(params["factor"])


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (every architecture field).

    Raises :class:`ConversionError` for anything megatron-core's layers would compute differently:
    an unsupported architecture or activation, heads that do not divide, unsupported RoPE scaling,
    sliding-window attention, biases other than Qwen2's QKV bias.
    """
    architecture = _architecture(hf_config)
    hidden = int(_require(hf_config, "hidden_size"))
    heads = int(_require(hf_config, "num_attention_heads"))
    groups = int(hf_config.get("num_key_value_heads") or heads)
    if heads % groups:
        raise ConversionError(f"config.json num_attention_heads={heads} is not divisible by num_key_value_heads={groups}")
    hf_head_dim = hf_config.get("head_dim")
    if hf_head_dim is None:
        if hidden % heads:
            raise ConversionError(f"config.json hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        hf_head_dim = hidden // heads
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    if hf_config.get("mlp_bias"):
        raise ConversionError("config.json mlp_bias=true: MLP biases are not supported")
    if architecture == "LlamaForCausalLM" and hf_config.get("attention_bias"):
        raise ConversionError("config.json attention_bias=true: Llama attention biases are not supported")
    if hf_config.get("use_sliding_window"):
        raise ConversionError("config.json use_sliding_window=true: sliding-window attention is not supported")
    layer_types = hf_config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ConversionError(f"config.json layer_types={sorted(set(layer_types))!r}: only full_attention is supported")
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    if dtype not in _HF_DTYPES:
        raise ConversionError(f"config.json torch_dtype={dtype!r}: expected one of {_HF_DTYPES}")
    rotary_base, rope_scaling, rope_factor = _rope(hf_config)
    return ModelConfig(
        num_layers=int(_require(hf_config, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(hf_config, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=None if hf_head_dim * heads == hidden else int(hf_head_dim),
        vocab_size=int(_require(hf_config, "vocab_size")),
        max_position_embeddings=int(_require(hf_config, "max_position_embeddings")),
        rotary_base=rotary_base,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        add_qkv_bias=architecture == "Qwen2ForCausalLM",
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        params_dtype=dtype,
        init_method_std=float(hf_config.get("initializer_range", ModelConfig.init_method_std)),
        attention_dropout=float(hf_config.get("attention_dropout", 0.0)),
    )


def hf_config_from_model(model: ModelConfig, architecture: str, base: Optional[dict] = None) -> dict:
    """A Hugging Face ``config.json`` dict for ``model`` as ``architecture``.

    ``base`` (the original HF config) supplies every other field (token ids, ``use_cache``...); the
    architecture fields are always taken from ``model``.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"architecture {architecture!r}: expected one of {sorted(SUPPORTED_ARCHITECTURES)}")
    if model.add_qkv_bias != (architecture == "Qwen2ForCausalLM"):
        raise ConversionError(f"model.add_qkv_bias={model.add_qkv_bias} cannot be written as {architecture}")
    config = dict(base or {})
    for stale in ("rope_scaling", "rope_theta", "rope_parameters", "dtype", "torch_dtype"):
        config.pop(stale, None)
    d = head_dim(model)
    config.update(
        architectures=[architecture],
        model_type=SUPPORTED_ARCHITECTURES[architecture],
        hidden_act="silu",
        num_hidden_layers=model.num_layers,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        head_dim=d,
        vocab_size=model.vocab_size,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=model.tie_word_embeddings,
        attention_dropout=model.attention_dropout,
        initializer_range=model.init_method_std,
        torch_dtype=model.params_dtype,
        rope_theta=model.rotary_base,
        rope_scaling=(
            dict(rope_type="llama3", factor=model.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE)
            if model.rope_scaling else None
        ),
    )
    if architecture == "LlamaForCausalLM":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False)
        config.pop("layer_types", None)  # transformers recomputes it from num_hidden_layers
    return config


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorGroup:
    """HF tensors that map onto megatron tensors together (e.g. q, k, v -> linear_qkv).

    ``to_megatron`` takes the HF tensors in ``hf_names`` order and returns the megatron tensors in
    ``megatron_names`` order; ``to_hf`` is its exact inverse.
    """

    hf_names: Tuple[str, ...]
    megatron_names: Tuple[str, ...]
    to_megatron: Callable[[List[Tensor]], List[Tensor]]
    to_hf: Callable[[List[Tensor]], List[Tensor]]


def _identity(tensors: List[Tensor]) -> List[Tensor]:
    return list(tensors)


def _fuse_qkv(groups: int, head_dim: int) -> Callable[[List[Tensor]], List[Tensor]]:
    def fuse(tensors: List[Tensor]) -> List[Tensor]:
        """q [nh d, *], k [ng d, *], v [ng d, *] -> [(nh + 2 ng) d, *] grouped per KV head."""
        q, k, v = tensors
        rest = q.shape[1:]
        q = q.reshape(groups, -1, *rest)
        k = k.reshape(groups, head_dim, *rest)
        v = v.reshape(groups, head_dim, *rest)
        return [torch.cat([q, k, v], dim=1).reshape(-1, *rest)]

    return fuse


def _split_qkv(groups: int, heads: int, head_dim: int) -> Callable[[List[Tensor]], List[Tensor]]:
    per_group = heads // groups * head_dim

    def split(tensors: List[Tensor]) -> List[Tensor]:
        """[(nh + 2 ng) d, *] grouped per KV head -> q [nh d, *], k [ng d, *], v [ng d, *]."""
        (qkv,) = tensors
        rest = qkv.shape[1:]
        q, k, v = qkv.reshape(groups, per_group + 2 * head_dim, *rest).split([per_group, head_dim, head_dim], dim=1)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]

    return split


def _fuse_gate_up(tensors: List[Tensor]) -> List[Tensor]:
    """gate [F, H], up [F, H] -> fc1 [2 F, H]."""
    return [torch.cat(tensors, dim=0)]


def _split_gate_up(tensors: List[Tensor]) -> List[Tensor]:
    """fc1 [2 F, H] -> gate [F, H], up [F, H]."""
    (fc1,) = tensors
    return list(fc1.chunk(2, dim=0))


def _one(hf: str, megatron: str) -> TensorGroup:
    return TensorGroup((hf,), (megatron,), _identity, _identity)


def layer_tensor_groups(model: ModelConfig, layer: int) -> List[TensorGroup]:
    """The groups of transformer layer ``layer`` (global index)."""
    hf, mg = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    d = head_dim(model)
    fuse = _fuse_qkv(model.num_query_groups, d)
    split = _split_qkv(model.num_query_groups, model.num_attention_heads, d)
    qkv = lambda suffix: TensorGroup(  # noqa: E731
        tuple(f"{hf}self_attn.{p}_proj.{suffix}" for p in "qkv"),
        (f"{mg}self_attention.linear_qkv.{suffix}",), fuse, split,
    )
    groups = [
        _one(f"{hf}input_layernorm.weight", f"{mg}self_attention.linear_qkv.layer_norm_weight"),
        qkv("weight"),
    ]
    if model.add_qkv_bias:
        groups.append(qkv("bias"))
    groups += [
        _one(f"{hf}self_attn.o_proj.weight", f"{mg}self_attention.linear_proj.weight"),
        _one(f"{hf}post_attention_layernorm.weight", f"{mg}mlp.linear_fc1.layer_norm_weight"),
        TensorGroup(
            (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), (f"{mg}mlp.linear_fc1.weight",),
            _fuse_gate_up, _split_gate_up,
        ),
        _one(f"{hf}mlp.down_proj.weight", f"{mg}mlp.linear_fc2.weight"),
    ]
    return groups


def tensor_groups(model: ModelConfig) -> List[TensorGroup]:
    """Every tensor group of ``model`` in streaming order: embedding, layers 0..L-1, final norm,
    LM head (absent when the embeddings are tied)."""
    groups = [_one("model.embed_tokens.weight", "embedding.word_embeddings.weight")]
    for layer in range(model.num_layers):
        groups += layer_tensor_groups(model, layer)
    groups.append(_one("model.norm.weight", "decoder.final_layernorm.weight"))
    if not model.tie_word_embeddings:
        groups.append(_one("lm_head.weight", "output_layer.weight"))
    return groups


def expected_hf_shapes(model: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of every HF tensor of ``model`` (to reject a checkpoint before anything is written)."""
    d = head_dim(model)
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not model.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(model.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,),
            f"{p}self_attn.q_proj.weight": (q, h), f"{p}self_attn.k_proj.weight": (kv, h),
            f"{p}self_attn.v_proj.weight": (kv, h), f"{p}self_attn.o_proj.weight": (h, q),
            f"{p}mlp.gate_proj.weight": (f, h), f"{p}mlp.up_proj.weight": (f, h), f"{p}mlp.down_proj.weight": (h, f),
        })
        if model.add_qkv_bias:
            shapes.update({f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,),
                           f"{p}self_attn.v_proj.bias": (kv,)})
    return shapes


def infer_architecture(model: ModelConfig) -> str:
    """The HF architecture a model without a recorded one is written as: QKV bias = Qwen2, else Llama."""
    return "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"
