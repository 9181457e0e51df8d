"""Move weights between one *full* state dict and a model sharded over TP and PP.

The full state dict is what a single process (TP=1, PP=1) holds, in megatron's checkpoint names
(``decoder.layers.{global i}.self_attention.linear_qkv.layer_norm_weight`` for the attention's
input RMSNorm, ``...mlp.linear_fc1.layer_norm_weight`` for the MLP's; the local and the Transformer
Engine layer specs both map onto these), with exactly ``vocab_size`` vocabulary rows (no TP
padding) and no ``_extra_state`` entries. Tied embeddings have no ``output_layer.weight``.

How each tensor splits over TP is read from the attributes megatron puts on its parameters
(``tensor_model_parallel``, ``partition_dim``); SwiGLU's fused ``linear_fc1`` ([gate; up]) is split
per half, as megatron does. Used by the layout-equivalence tests and tool and by checkpoint tests.
"""
from __future__ import annotations

import re
from typing import Dict

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# local-spec parameter name -> megatron checkpoint name (same mapping as the spec's keys map); the
# converted-checkpoint reader maps back with it.
LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# The vocabulary-sized parameters: megatron pads their rows to a multiple of
# make_vocab_size_divisible_by x TP, the full state dict holds exactly vocab_size rows.
PADDED_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def named_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """``model``'s parameters by local name, without the ``module.`` prefix that DDP wrappers add."""
    return {name.removeprefix("module."): p for name, p in model.named_parameters()}


def canonical_name(model: torch.nn.Module, local_name: str) -> str:
    """Full-state-dict name of one of ``model``'s parameters (global layer index, checkpoint name)."""
    match = _LAYER.match(local_name)
    if match is None:
        return local_name
    layer = unwrap(model).decoder.layers[int(match.group(1))]
    suffix = LOCAL_TO_CANONICAL.get(match.group(2), match.group(2))
    return f"decoder.layers.{layer.layer_number - 1}.{suffix}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (megatron's ``unwrap_model``)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def _is_gated_fc1(name: str, model: torch.nn.Module) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and unwrap(model).config.gated_linear_unit


def _tp_split(full: torch.Tensor, param: torch.nn.Parameter, gated: bool, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of ``full`` for ``param`` (a copy of ``full`` if not TP-split)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_full_state_dict(model: torch.nn.Module, full: Dict[str, torch.Tensor], vocab_size: int) -> None:
    """Copy this rank's TP/PP shard of ``full`` into ``model`` (a megatron GPTModel, maybe wrapped).

    Raises KeyError naming any parameter the full state dict lacks, ValueError on a shape mismatch.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    unwrapped = unwrap(model)
    for local_name, param in named_parameters(unwrapped).items():
        name = canonical_name(unwrapped, local_name)
        source_name = name
        if name == "output_layer.weight" and name not in full and unwrapped.share_embeddings_and_output_weights:
            source_name = "embedding.word_embeddings.weight"  # tied: last PP stage's copy
        if source_name not in full:
            raise KeyError(f"full state dict has no {source_name!r} (needed for parameter {local_name!r})")
        source = full[source_name].detach().to(dtype=param.dtype, device="cpu")
        if name in PADDED_VOCAB:
            padded_rows = param.shape[0] * (tp_size if getattr(param, "tensor_model_parallel", False) else 1)
            source = _pad_vocab(source, vocab_size, padded_rows, source_name)
        shard = _tp_split(source, param, _is_gated_fc1(local_name, unwrapped), tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(
                f"{source_name!r}: shard shape {tuple(shard.shape)} does not match parameter "
                f"{local_name!r} of shape {tuple(param.shape)} (TP rank {tp_rank}/{tp_size})"
            )
        with torch.no_grad():
            param.copy_(shard)


def _pad_vocab(weight: torch.Tensor, vocab_size: int, padded_rows: int, name: str) -> torch.Tensor:
    if weight.shape[0] < vocab_size:
        raise ValueError(f"{name!r} has {weight.shape[0]} rows, fewer than vocab_size={vocab_size}")
    padded = weight.new_zeros((padded_rows, *weight.shape[1:]))
    padded[:vocab_size] = weight[:vocab_size]
    return padded


def gather_tensor_parallel(param: torch.nn.Parameter, local_name: str, unwrapped: torch.nn.Module,
                           tp_group, tp_size: int) -> torch.Tensor:
    """The whole tensor of one TP-split parameter, all-gathered over ``tp_group`` and concatenated
    along its ``partition_dim`` (SwiGLU's fused fc1 per half: [gate; up]); a parameter that is not
    TP-split, or TP = 1, as it is. Every TP rank calls it for the same parameter."""
    tensor = param.detach()
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    dim = param.partition_dim
    if _is_gated_fc1(local_name, unwrapped):
        halves = [part.chunk(2, dim=dim) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def gather_full_state_dict(model: torch.nn.Module, vocab_size: int) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`load_full_state_dict`: every rank gets the full state dict (CPU tensors).

    Collective over the TP group (all-gather of split tensors) and the PP group (object all-gather
    of each stage's tensors); call it on every rank of the model-parallel group.
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    unwrapped = unwrap(model)
    stage: Dict[str, torch.Tensor] = {}
    for local_name, param in named_parameters(unwrapped).items():
        name = canonical_name(unwrapped, local_name)
        tensor = gather_tensor_parallel(param, local_name, unwrapped, tp_group, tp_size)
        if name in PADDED_VOCAB:
            tensor = tensor[:vocab_size]
        stage[name] = tensor.cpu().clone()
    if unwrapped.share_embeddings_and_output_weights:
        stage.pop("output_layer.weight", None)  # tied: the embedding is the single source
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return stage
    stages = [None] * pp_size
    dist.all_gather_object(stages, stage, group=parallel_state.get_pipeline_model_parallel_group())
    full: Dict[str, torch.Tensor] = {}
    for part in stages:
        full.update(part)
    return full
