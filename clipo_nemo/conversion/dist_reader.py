"""Stream canonical (TP=1/PP=1) tensors out of a megatron-core ``dist_checkpointing`` checkpoint.

Reads a ``torch_dist`` checkpoint saved at any TP/PP layout (our trainer's ``step_N/dist``, a NeMo 2
``weights/`` folder, a NeMo 1 ``model_weights/`` folder) one transformer layer at a time, in one
process, without building the model: peak memory is about one layer's tensors.

How megatron-core stores a GPTModel (``sharded_state_dict(prefix=P)``), as this reader expects it:

- ``P embedding.word_embeddings.weight`` [V_pad, H] and ``P output_layer.weight`` [V_pad, H] (absent
  with tied embeddings): the vocabulary padded for the TP the checkpoint was *saved* at; rows past
  the model's ``vocab_size`` are padding and are dropped here.
- Layer tensors are stacked global tensors ``P decoder.layers.<suffix>`` of shape [L, ...] (the
  TransformerBlock prepends the global layer axis), e.g. ``self_attention.linear_qkv.weight``
  [L, (nh + 2 ng) d, H]. SwiGLU ``mlp.linear_fc1.weight`` [L, 2 F, H] holds [gate_all; up_all] along
  its row axis (``apply_swiglu_sharded_factory``: every TP rank's gate rows first, then the up rows),
  which is the canonical TP=1 layout; with megatron's ``singleton_local_shards`` the halves are two
  keys ``<suffix>_w`` (gate) and ``<suffix>_v`` (up), concatenated here.
- Norm weights use the Transformer Engine names (``self_attention.linear_qkv.layer_norm_weight``,
  ``mlp.linear_fc1.layer_norm_weight``); the local spec maps onto them, but checkpoints with the
  local names (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``) are read too.
- Per-layer keys ``P decoder.layers.<i>.<suffix>`` (no stacking) are accepted as well.

Canonical names are those of :mod:`clipo_nemo.models.sharding` (no prefix, global layer index).
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from clipo_nemo.config import ModelConfig
from clipo_nemo.conversion.mapping import ConversionError, expected_hf_shapes, tensor_groups
from clipo_nemo.models.sharding import LOCAL_TO_CANONICAL, PADDED_VOCAB

_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_PREFIX = "decoder.layers."
_CANONICAL_TO_LOCAL = {canonical: local for local, canonical in LOCAL_TO_CANONICAL.items()}


@contextmanager
def single_process_group() -> Iterator[None]:
    """A 1-rank gloo process group for ``dist_checkpointing.load`` (which is collective) when none
    exists; destroyed on exit. Refuses to run inside a multi-rank job (the load would be collective)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("the checkpoint reader runs in a single process; torch.distributed has "
                                  f"{dist.get_world_size()} ranks")
        yield
        return
    from clipo_nemo.parallel.launcher import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


class DistCheckpointReader:
    """Reads canonical tensors from the ``torch_dist`` checkpoint in ``checkpoint_dir`` whose model
    keys start with ``prefix`` (``policy.``, ``module.``, ``model.``).

    Use inside :func:`single_process_group`. ``vocab_size`` rows are kept of the padded vocabulary
    tensors. Tensors come back in the dtype they were stored in.
    """

    def __init__(self, checkpoint_dir: str | Path, prefix: str, vocab_size: int):
        from megatron.core import dist_checkpointing

        self.checkpoint_dir, self.prefix, self.vocab_size = str(checkpoint_dir), prefix, vocab_size
        if not (Path(checkpoint_dir) / "metadata.json").is_file():
            raise ConversionError(f"{checkpoint_dir} is not a megatron dist_checkpointing checkpoint "
                                  "(no metadata.json)")
        self._metadata = dist_checkpointing.load_tensors_metadata(self.checkpoint_dir)
        self._model_keys = {key[len(prefix):]: value for key, value in self._metadata.items() if key.startswith(prefix)}
        if not self._model_keys:
            raise ConversionError(f"{checkpoint_dir} holds no tensor whose key starts with {prefix!r}")
        stacked = {v.global_shape[0] for k, v in self._model_keys.items()
                   if k.startswith(_STACKED_PREFIX) and not k[len(_STACKED_PREFIX)].isdigit()}
        if len(stacked) > 1:
            raise ConversionError(f"{checkpoint_dir}: stacked layer tensors disagree on the layer count "
                                  f"{sorted(stacked)}")
        self.num_stacked_layers: Optional[int] = stacked.pop() if stacked else None

    # ----------------------------------------------------------------------------------------------
    def _locate(self, name: str) -> List[Tuple[str, Optional[int]]]:
        """Stored (key without prefix, layer index or None) pieces whose row-concatenation is ``name``."""
        match = _LAYER_NAME.match(name)
        if match is None:
            return [(name, None)] if name in self._model_keys else []
        layer, suffix = int(match.group(1)), match.group(2)
        for candidate in (suffix, _CANONICAL_TO_LOCAL.get(suffix)):
            if candidate is None:
                continue
            stacked = f"{_STACKED_PREFIX}{candidate}"
            halves = [f"{stacked}_{half}" for half in "wv"]
            if stacked in self._model_keys or all(h in self._model_keys for h in halves):
                if layer >= self.num_stacked_layers:
                    return []
                return [(stacked, layer)] if stacked in self._model_keys else [(h, layer) for h in halves]
            if f"{_STACKED_PREFIX}{layer}.{candidate}" in self._model_keys:
                return [(f"{_STACKED_PREFIX}{layer}.{candidate}", None)]
        return []

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds canonical tensor ``name``."""
        return bool(self._locate(name))

    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        """Shape ``read`` returns for ``name`` (vocabulary rows cut to ``vocab_size``), None if absent."""
        located = self._locate(name)
        if not located:
            return None
        shapes = [self._metadata[self.prefix + key].global_shape[0 if layer is None else 1:] for key, layer in located]
        rows = sum(shape[0] for shape in shapes)
        if name in PADDED_VOCAB and rows >= self.vocab_size:
            rows = self.vocab_size
        return (rows, *shapes[0][1:])

    def dtype(self, name: str) -> str:
        """Stored dtype of ``name`` ("bfloat16", "float32", ...)."""
        located = self._locate(name)
        if not located:
            raise ConversionError(f"{self.checkpoint_dir}: no tensor for {name!r} under prefix {self.prefix!r}")
        return str(self._metadata[self.prefix + located[0][0]].dtype).removeprefix("torch.")

    def unused_keys(self, names: Sequence[str]) -> List[str]:
        """Stored model keys (with prefix) that none of the canonical ``names`` reads."""
        used = {key for name in names for key, _ in self._locate(name)}
        return sorted(self.prefix + key for key in self._model_keys if key not in used)

    def read(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Load the canonical tensors ``names`` in one ``dist_checkpointing.load`` (only those bytes)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request, pieces = {}, {}
        for name in names:
            located = self._locate(name)
            if not located:
                raise ConversionError(f"{self.checkpoint_dir}: no tensor for {name!r} under prefix {self.prefix!r}")
            pieces[name] = []
            for key, layer in located:
                meta = self._metadata[self.prefix + key]
                request_key = f"{key}@{layer}"
                if layer is None:
                    request[request_key] = ShardedTensor.from_rank_offsets(
                        self.prefix + key, torch.empty(meta.global_shape, dtype=meta.dtype), replica_id=0)
                else:
                    # a [1, ...] buffer at offset ``layer`` of the layer axis (not prepend_axis_num,
                    # whose torch conversion assumes the other layers live on other ranks)
                    request[request_key] = ShardedTensor.from_rank_offsets(
                        self.prefix + key, torch.empty((1, *meta.global_shape[1:]), dtype=meta.dtype),
                        (0, layer, meta.global_shape[0]), replica_id=0)
                pieces[name].append((request_key, layer is not None))
        with warnings.catch_warnings():  # megatron 0.16 calls torch's deprecated DCP entry point
            warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
            loaded = dist_checkpointing.load(request, self.checkpoint_dir, validate_access_integrity=False)
        out = {}
        for name, keys in pieces.items():
            parts = [loaded[key][0] if stacked else loaded[key] for key, stacked in keys]
            tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
            if name in PADDED_VOCAB:
                if tensor.shape[0] < self.vocab_size:
                    raise ConversionError(f"{self.checkpoint_dir}: {name!r} has {tensor.shape[0]} vocabulary rows, "
                                          f"fewer than vocab_size={self.vocab_size}")
                tensor = tensor[: self.vocab_size]  # a view: writers copy what they keep
            out[name] = tensor
        return out


def layer_batches(names: Sequence[str]) -> List[List[str]]:
    """``names`` cut into consecutive runs that belong to the same layer (or to no layer), in order."""
    batches: List[List[str]] = []
    previous = object()
    for name in names:
        match = _LAYER_NAME.match(name)
        layer = match.group(1) if match else name
        if batches and layer == previous:
            batches[-1].append(name)
        else:
            batches.append([name])
        previous = layer
    return batches


def canonical_names(model: ModelConfig) -> List[str]:
    """Every canonical tensor name of ``model`` in streaming order (the mapping's groups)."""
    return [name for group in tensor_groups(model) for name in group.megatron_names]


def check_checkpoint_matches(reader: DistCheckpointReader, model: ModelConfig) -> None:
    """ConversionError unless the checkpoint holds exactly ``model``'s tensors (no missing, no other
    model tensor, the same layer count) with the shapes its description implies. Reads metadata only."""
    names = canonical_names(model)
    missing = [name for name in names if not reader.has(name)]
    if missing:
        raise ConversionError(f"{reader.checkpoint_dir}: no tensor for {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} under prefix "
                              f"{reader.prefix!r}: the checkpoint does not match the model description")
    extra = reader.unused_keys(names)
    if extra:
        more = " ..." if len(extra) > 8 else ""
        raise ConversionError(f"{reader.checkpoint_dir}: unexpected tensors {extra[:8]}{more}: the checkpoint does "
                              "not match the model description")
    if reader.num_stacked_layers is not None and reader.num_stacked_layers != model.num_layers:
        raise ConversionError(f"{reader.checkpoint_dir}: the checkpoint has {reader.num_stacked_layers} layers, "
                              f"the model description {model.num_layers}")
    hf_shapes = expected_hf_shapes(model)
    for group in tensor_groups(model):
        expected = group.to_megatron([torch.empty(hf_shapes[n], device="meta") for n in group.hf_names])
        for name, tensor in zip(group.megatron_names, expected):
            stored = reader.shape(name)
            if stored != tuple(tensor.shape):
                raise ConversionError(f"{reader.checkpoint_dir}: {name!r} is stored with shape {stored}, the "
                                      f"model description implies {tuple(tensor.shape)}")


def iter_canonical_tensors(reader: DistCheckpointReader, model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (canonical name, tensor) of ``model`` in streaming order, one layer's tensors loaded at a
    time. Call :func:`check_checkpoint_matches` first (before writing anything)."""
    for batch in layer_batches(canonical_names(model)):
        loaded = reader.read(batch)
        for name in batch:
            yield name, loaded.pop(name)
