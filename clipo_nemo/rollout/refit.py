"""The live policy's weights as a stream of Hugging Face tensors, for refitting a generation engine.

Every rank of a model-parallel group (TP x PP) iterates :class:`HFWeightStream` together and gets
the same sequence of ``(HF name, whole tensor)``: the tensor groups of
:func:`clipo_nemo.conversion.mapping.tensor_groups` in their order (embedding, layers, final norm,
LM head unless tied), each megatron tensor made whole first and then turned into HF tensors by the
group's ``to_hf`` (the same mapping :mod:`clipo_nemo.conversion.hf_writer` exports with).

Resharding on the way (training TP x PP -> one whole tensor per name, which the engine's loader
shards for its own generation TP):

- TP: the owning stage all-gathers the shards over megatron's TP group (``torch.distributed
  .all_gather``) and concatenates them along the parameter's ``partition_dim``; SwiGLU's fused
  ``linear_fc1`` is gathered per half ([gate; up]); vocabulary padding rows are cut off;
- PP: the stage that holds the tensor broadcasts it to the other stages of its PP group.

Memory: one tensor group (at most one layer's largest group, or the embedding) is whole at a time;
:func:`buckets` groups the stream into pieces of a byte budget for the engine's update calls.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist

from clipo_nemo.config import ModelConfig
from clipo_nemo.conversion.mapping import expected_hf_shapes, tensor_groups
from clipo_nemo.models.sharding import PADDED_VOCAB, canonical_name, gather_tensor_parallel, named_parameters, unwrap

Named = Tuple[str, torch.Tensor]


class RefitError(RuntimeError):
    """The policy cannot be streamed as the model description says; the message names the tensor."""


def canonical_shapes(model_cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Whole (TP=1, exactly ``vocab_size`` rows) shape of every megatron tensor of ``model_cfg``,
    derived from the HF shapes through the mapping itself (meta tensors, no memory)."""
    hf_shapes = expected_hf_shapes(model_cfg)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for group in tensor_groups(model_cfg):
        metas = group.to_megatron([torch.empty(hf_shapes[name], device="meta") for name in group.hf_names])
        shapes.update({name: tuple(t.shape) for name, t in zip(group.megatron_names, metas)})
    return shapes


class HFWeightStream:
    """Iterate ``(HF name, whole tensor)`` over the current weights of ``model`` (see the module docstring).

    Build and iterate it on every rank of the model-parallel group together (collectives over its TP
    and PP groups). The tensors live on the model's device in its dtype and are only valid until the
    next item is drawn when the caller does not keep them.
    """

    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig):
        from megatron.core import parallel_state

        self.unwrapped = unwrap(model)
        self.model_cfg = model_cfg
        self.groups = tensor_groups(model_cfg)
        self.shapes = canonical_shapes(model_cfg)
        self.local = {canonical_name(self.unwrapped, name): (name, param)
                      for name, param in named_parameters(self.unwrapped).items()}
        if model_cfg.tie_word_embeddings:
            self.local.pop("output_layer.weight", None)  # tied: the embedding is the one source
        first = next(iter(self.unwrapped.parameters()))
        self.dtype, self.device = first.dtype, first.device
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.owner = self._owners()

    def _owners(self) -> Dict[str, int]:
        """PP rank of the stage that holds each megatron tensor; RefitError for one nobody or two hold."""
        mine = sorted(self.local)
        stages: List[List[str]] = [mine]
        if self.pp_size > 1:
            stages = [None] * self.pp_size  # type: ignore[list-item]
            dist.all_gather_object(stages, mine, group=self.pp_group)
        owner: Dict[str, int] = {}
        for stage, names in enumerate(stages):
            for name in names:
                if name in owner:
                    raise RefitError(f"{name} is held by pipeline stages {owner[name]} and {stage}")
                owner[name] = stage
        missing = sorted(set(self.shapes) - set(owner))
        extra = sorted(set(owner) - set(self.shapes))
        if missing or extra:
            raise RefitError(f"the policy's parameters do not match model.* (missing {missing[:5]}, unexpected {extra[:5]})")
        return owner

    def _whole(self, name: str) -> torch.Tensor:
        from megatron.core import parallel_state

        owner = self.owner[name]
        if owner == parallel_state.get_pipeline_model_parallel_rank():
            local_name, param = self.local[name]
            tensor = gather_tensor_parallel(param, local_name, self.unwrapped, self.tp_group, self.tp_size)
            if name in PADDED_VOCAB:
                tensor = tensor[: self.model_cfg.vocab_size]
            if tuple(tensor.shape) != self.shapes[name]:
                raise RefitError(f"{name}: gathered shape {tuple(tensor.shape)}, the model description says "
                                 f"{self.shapes[name]}")
            tensor = tensor.contiguous()
        else:
            tensor = torch.empty(self.shapes[name], dtype=self.dtype, device=self.device)
        if self.pp_size > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.pp_group, owner), group=self.pp_group)
        return tensor

    def __iter__(self) -> Iterator[Named]:
        for group in self.groups:
            whole = [self._whole(name) for name in group.megatron_names]
            yield from zip(group.hf_names, group.to_hf(whole))


def buckets(stream: Iterator[Named], bucket_bytes: int) -> Iterator[List[Named]]:
    """Consecutive pieces of ``stream`` of at most ``bucket_bytes`` each (a bigger tensor alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1")
    bucket: List[Named] = []
    size = 0
    for name, tensor in stream:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _tensor_by_value(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def share_tensor(tensor: torch.Tensor) -> Tuple:
    """``(rebuild, args)`` from which a process on the same GPU gets this tensor without a copy.

    CUDA tensors: torch's CUDA IPC reduction (``torch.multiprocessing.reductions.reduce_tensor``), the
    format TensorRT-LLM's ``WorkerExtension.update_weights`` rebuilds (it sets ``args[6]``, the
    device index, to its own). CPU tensors (CPU tests only): carried by value.
    """
    if tensor.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(tensor)
    return _tensor_by_value, (tensor,)
