"""Read a Hugging Face model directory tensor group by tensor group, checked before anything is read.

A directory holds ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
with its shards (PyTorch ``.bin`` files are not read: they cannot be streamed safely).
:meth:`HFCheckpoint.validate` checks names, shapes and dtypes from the safetensors headers alone;
:meth:`HFCheckpoint.stream` then yields the megatron tensors of one :class:`TensorGroup` at a time,
each HF tensor read from its shard on demand, so memory holds about one layer.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from clipo_nemo.algorithms.checks import nonfinite_count
from clipo_nemo.config import ModelConfig
from clipo_nemo.conversion.mapping import (
    ConversionError,
    TensorGroup,
    expected_hf_shapes,
    model_config_from_hf,
    tensor_groups,
)
from clipo_nemo.conversion.weights import open_safetensors

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed by the model
_TIED_HEAD = "lm_head.weight"
_COMPARE_ROWS = 4096  # rows per slice when checking that a stored tied lm_head equals the embedding


def read_hf_config(hf_dir) -> dict:
    """``config.json`` of an HF model directory."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def _weight_map(hf_dir: Path) -> Dict[str, str]:
    """HF tensor name -> safetensors file name (relative to ``hf_dir``)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ConversionError(f"{index}: not a JSON index of the shards ({err})") from None
        if not weight_map:
            raise ConversionError(f"{index}: no weight_map")
        missing = sorted(f for f in set(weight_map.values()) if not (hf_dir / f).is_file())
        if missing:
            raise ConversionError(f"{hf_dir}: shard files named in model.safetensors.index.json are missing: {missing}")
        return dict(weight_map)
    single = hf_dir / "model.safetensors"
    if single.is_file():
        with open_safetensors(single) as handle:
            return {name: single.name for name in handle.keys()}
    found = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
    hint = f" (found {found}: PyTorch pickles are not read; save the model with safetensors)" if found else ""
    raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")


class HFCheckpoint:
    """A Hugging Face Qwen2/Llama directory: its config, model description and tensors."""

    def __init__(self, hf_dir):
        self.hf_dir = Path(hf_dir)
        if not self.hf_dir.is_dir():
            raise ConversionError(f"{hf_dir} is not a directory")
        self.hf_config = read_hf_config(self.hf_dir)
        self.model: ModelConfig = model_config_from_hf(self.hf_config)
        self.architecture: str = self.hf_config["architectures"][0]
        self.weight_map = _weight_map(self.hf_dir)

    def _headers(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """name -> (shape, safetensors dtype) of every stored tensor, from the file headers only."""
        headers: Dict[str, Tuple[Tuple[int, ...], str]] = {}
        by_file: Dict[str, List[str]] = {}
        for name, filename in self.weight_map.items():
            by_file.setdefault(filename, []).append(name)
        for filename, names in sorted(by_file.items()):
            with open_safetensors(self.hf_dir / filename) as handle:
                stored = set(handle.keys())
                for name in names:
                    if name not in stored:
                        raise ConversionError(f"{filename}: tensor {name!r} named in the index is not in the file")
                    view = handle.get_slice(name)
                    headers[name] = (tuple(view.get_shape()), view.get_dtype())
        return headers

    def validate(self) -> str:
        """Check every tensor's presence, shape and dtype against the config; return the dtype name.

        Raises ConversionError naming missing, unexpected, misshapen or wrongly typed tensors. The
        tensors must share one floating dtype, the config's ``torch_dtype`` when it gives one.
        """
        expected = expected_hf_shapes(self.model)
        headers = {n: h for n, h in self._headers().items() if not n.endswith(_IGNORED_SUFFIXES)}
        if self.model.tie_word_embeddings and _TIED_HEAD in headers:
            headers.pop(_TIED_HEAD)
            self._check_tied_head_copy()
        missing = sorted(set(expected) - set(headers))
        unexpected = sorted(set(headers) - set(expected))
        if missing or unexpected:
            raise ConversionError(
                f"{self.hf_dir}: tensors do not match config.json: missing {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
            )
        for name, (shape, _) in headers.items():
            if shape != expected[name]:
                raise ConversionError(f"{self.hf_dir}: tensor {name!r} has shape {shape}, config.json implies {expected[name]}")
        dtypes = {name: _SAFETENSORS_DTYPES.get(dtype, dtype) for name, (_, dtype) in headers.items()}
        counts = Counter(dtypes.values())
        stated = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype")
        wanted = stated or counts.most_common(1)[0][0]
        odd = [name for name, dtype in dtypes.items() if dtype != wanted or dtype not in _SAFETENSORS_DTYPES.values()]
        if odd:
            raise ConversionError(
                f"{self.hf_dir}: tensor dtypes {dict(counts)} (tensors per dtype), expected all one "
                f"floating dtype {wanted!r}{' (config.json torch_dtype)' if stated else ''}; e.g. {odd[:3]} differ"
            )
        return wanted

    def _check_tied_head_copy(self) -> None:
        """A tied model may store ``lm_head.weight`` too; accept it only as an exact copy of the embedding."""
        embed, head = "model.embed_tokens.weight", _TIED_HEAD
        if embed not in self.weight_map:
            return  # reported as missing by validate
        with open_safetensors(self.hf_dir / self.weight_map[embed]) as embed_file, \
                open_safetensors(self.hf_dir / self.weight_map[head]) as head_file:
            embed_view, head_view = embed_file.get_slice(embed), head_file.get_slice(head)
            if embed_view.get_shape() != head_view.get_shape():
                raise ConversionError(f"{self.hf_dir}: tie_word_embeddings=true but {head!r} has another shape than {embed!r}")
            rows = embed_view.get_shape()[0]
            for start in range(0, rows, _COMPARE_ROWS):
                if not torch.equal(embed_view[start : start + _COMPARE_ROWS], head_view[start : start + _COMPARE_ROWS]):
                    raise ConversionError(
                        f"{self.hf_dir}: tie_word_embeddings=true but the stored {head!r} differs from {embed!r}"
                    )

    def read(self, names: List[str]) -> List[torch.Tensor]:
        """The HF tensors ``names``, each file opened once."""
        tensors: Dict[str, torch.Tensor] = {}
        by_file: Dict[str, List[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for filename, file_names in by_file.items():
            with open_safetensors(self.hf_dir / filename) as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
                    bad = nonfinite_count(tensors[name])
                    if bad:
                        raise ConversionError(
                            f"{self.hf_dir / filename}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) "
                            f"of {tensors[name].numel()}: a broken model is not converted")
        return [tensors[name] for name in names]

    def stream(self) -> Iterator[Tuple[TensorGroup, List[torch.Tensor]]]:
        """Each tensor group of the model with its megatron tensors, in streaming order."""
        for group in tensor_groups(self.model):
            yield group, group.to_megatron(self.read(list(group.hf_names)))
