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
from typing import Dict, List, Mapping, Protocol, Sequence, Tuple

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


class TensorSource(Protocol):
    """Full-state-dict tensors that can be read in row/column ranges
    (:class:`clipo_nemo.conversion.weights.LazyWeights` reads only those ranges from its files)."""

    def __contains__(self, name: object) -> bool: ...

    def shape_of(self, name: str) -> Tuple[int, ...]: ...

    def read_ranges(self, name: str, dim: int, ranges: Sequence[Tuple[int, int]]) -> torch.Tensor: ...


class InMemoryTensors:
    """A full state dict held in memory, as a :class:`TensorSource`."""

    def __init__(self, full: Mapping[str, torch.Tensor]):
        self.full = full

    def __contains__(self, name: object) -> bool:
        return name in self.full

    def shape_of(self, name: str) -> Tuple[int, ...]:
        return tuple(self.full[name].shape)

    def read_ranges(self, name: str, dim: int, ranges: Sequence[Tuple[int, int]]) -> torch.Tensor:
        tensor = self.full[name]
        if not ranges:  # e.g. a TP shard of the vocabulary that lies wholly in the padding
            return tensor.narrow(dim, 0, 0).clone()
        return torch.cat([tensor.narrow(dim, start, stop - start) for start, stop in ranges], dim=dim)


def tp_ranges(length: int, gated: bool, tp_rank: int, tp_size: int) -> List[Tuple[int, int]]:
    """This TP rank's [start, stop) ranges of a dimension of ``length`` split over ``tp_size`` ranks:
    one block, or for SwiGLU's fused [gate; up] one block of each half (megatron's split)."""
    if gated:
        half = length // 2
        per = half // tp_size
        return [(tp_rank * per, (tp_rank + 1) * per), (half + tp_rank * per, half + (tp_rank + 1) * per)]
    per = length // tp_size
    return [(tp_rank * per, (tp_rank + 1) * per)]


def _read_shard(full: TensorSource, source_name: str, param: torch.nn.Parameter, gated: bool, padded: bool,
                vocab_size: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of ``full[source_name]`` for ``param``, reading only that part."""
    split = getattr(param, "tensor_model_parallel", False) and tp_size > 1
    dim = param.partition_dim if split else 0
    if padded:  # vocabulary rows padded with zeros to the model's padded vocabulary (split along dim 0)
        rows = full.shape_of(source_name)[0]
        if rows < vocab_size:
            raise ValueError(f"{source_name!r} has {rows} rows, fewer than vocab_size={vocab_size}")
        start = tp_rank * param.shape[0] if split else 0
        stop = min(start + param.shape[0], vocab_size)
        real = full.read_ranges(source_name, 0, [(start, stop)] if stop > start else [])
        shard = real.new_zeros((param.shape[0], *real.shape[1:]))
        shard[:real.shape[0]] = real
        return shard
    length = full.shape_of(source_name)[dim]
    ranges = tp_ranges(length, gated, tp_rank, tp_size) if split else [(0, length)]
    return full.read_ranges(source_name, dim, ranges)


def load_full_state_dict(model: torch.nn.Module, full: Mapping[str, torch.Tensor] | TensorSource,
                         vocab_size: int) -> None:
    """Copy this rank's TP/PP shard of ``full`` into ``model`` (a megatron GPTModel, maybe wrapped).

    ``full``: a full state dict, or a :class:`TensorSource` (then only this rank's rows/columns of
    each tensor are read). Raises KeyError naming any parameter the full state dict lacks,
    ValueError on a shape mismatch.
    """
    from megatron.core import parallel_state

    source = full if hasattr(full, "read_ranges") else InMemoryTensors(full)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    unwrapped = unwrap(model)
    for local_name, param in named_parameters(unwrapped).items():
        name = canonical_name(unwrapped, local_name)
        source_name = name
        if name == "output_layer.weight" and name not in source and unwrapped.share_embeddings_and_output_weights:
            source_name = "embedding.word_embeddings.weight"  # tied: last PP stage's copy
        if source_name not in source:
            raise KeyError(f"full state dict has no {source_name!r} (needed for parameter {local_name!r})")
        shard = _read_shard(source, source_name, param, _is_gated_fc1(local_name, unwrapped), name in PADDED_VOCAB,
                            vocab_size, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(
                f"{source_name!r}: shard shape {tuple(shard.shape)} does not match parameter "
                f"{local_name!r} of shape {tuple(param.shape)} (TP rank {tp_rank}/{tp_size})"
            )
        with torch.no_grad():
            param.copy_(shard.to(dtype=param.dtype))


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
