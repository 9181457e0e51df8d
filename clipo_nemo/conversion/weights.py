"""The converted-checkpoint format: a model's canonical weights, its description and its tokenizer.

What ``tools/convert_hf_to_megatron.py`` writes and ``trainer.init_from`` accepts. Layout::

    CKPT/
        clipo_model.json      {"format": "clipo-nemo-weights", "version": 1, "model": {every ModelConfig
                              field}, "architecture": "Qwen2ForCausalLM", "source": {...}, "dtype": ...,
                              "weights_identity": {"sha256", "files"}: weights/'s SHA-256, hashed once here, and
                              each file's [size, mtime_ns], which runs compare instead of hashing again}
                              (written last: its presence means the checkpoint is complete)
        weights/index.json    {"weight_map": {canonical name: shard file}, "total_size": bytes}
        weights/model-00001.safetensors ...   canonical full-state-dict tensors (TP=1/PP=1 names of
                              clipo_nemo.models.sharding, exactly vocab_size rows)
        tokenizer/            the model's tokenizer files (optional)
        hf_config.json, generation_config.json   the source's HF configs (optional, used by export)

The weights are layout-free: :func:`load_weights_into_model` loads each rank's TP/PP shard, reading
only that shard's rows/columns of each tensor (:mod:`clipo_nemo.conversion.sliced_read`), so a
rank reads about ``1/(TP x PP)`` of the model and never holds the whole model in memory. :class:`WeightsWriter` builds
the checkpoint in a temporary sibling directory and renames it into place only when it is complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clipo_nemo.algorithms.checks import nonfinite_count
from clipo_nemo.checkpoint.recovery import directory_sha256, file_identities
from clipo_nemo.config import ModelConfig
from clipo_nemo.conversion.mapping import ConversionError, tensor_groups
from clipo_nemo.conversion.sliced_read import SafetensorsFile
from clipo_nemo.models.policy import TORCH_DTYPES

WEIGHTS_DESCRIPTION = "clipo_model.json"
WEIGHTS_FORMAT = "clipo-nemo-weights"
WEIGHTS_VERSION = 1
WEIGHTS_DIR = "weights"
_INDEX = "index.json"
_TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


def is_weights_checkpoint(path) -> bool:
    """True if ``path`` is a complete converted checkpoint (its description names this format)."""
    description = Path(path) / WEIGHTS_DESCRIPTION
    if not description.is_file():
        return False
    try:
        return json.loads(description.read_text()).get("format") == WEIGHTS_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_description(path) -> dict:
    """The checkpoint's ``clipo_model.json``; ConversionError if absent, malformed or of another version."""
    description = Path(path) / WEIGHTS_DESCRIPTION
    if not description.is_file():
        raise ConversionError(f"{path}: no {WEIGHTS_DESCRIPTION} (not a converted clipo-nemo checkpoint)")
    try:
        data = json.loads(description.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{description}: not valid JSON ({err})") from None
    if data.get("format") != WEIGHTS_FORMAT or data.get("version") != WEIGHTS_VERSION:
        raise ConversionError(
            f"{description}: format {data.get('format')!r} version {data.get('version')!r}, expected "
            f"{WEIGHTS_FORMAT!r} version {WEIGHTS_VERSION}"
        )
    return data


def model_config_of(path) -> ModelConfig:
    """The :class:`ModelConfig` stored in a checkpoint's description."""
    fields = read_description(path)["model"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConversionError(f"{path}/{WEIGHTS_DESCRIPTION}: unknown model fields {unknown}")
    return ModelConfig(**fields)


def has_tokenizer_files(directory: Path) -> bool:
    """True if ``directory`` holds a Hugging Face tokenizer (tokenizer.json or tokenizer_config.json)."""
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def tokenizer_dir(path) -> Optional[Path]:
    """``<ckpt>/tokenizer`` if the checkpoint stores a tokenizer, else None."""
    directory = Path(path) / _TOKENIZER_DIR
    return directory if has_tokenizer_files(directory) else None


class WeightsWriter:
    """Streams canonical tensors into a new checkpoint directory; all or nothing.

    Use as a context manager. ``add`` casts each tensor to ``dtype`` (default: the model's
    ``params_dtype``) and buffers it; a buffered shard is written once adding the next tensor
    would take it past ``shard_size_bytes``, so memory holds at most one shard. On a clean exit
    every tensor of ``model`` must have been added (ConversionError naming missing or unexpected
    ones), then the index and the description are written and the directory is renamed into
    ``out_dir``. On any exception the temporary directory is removed and ``out_dir`` is untouched.
    """

    def __init__(self, out_dir, model: ModelConfig, architecture: str, source: dict,
                 shard_size_bytes: int = 2 * 2**30, dtype: Optional[str] = None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise ConversionError(f"output {self.out_dir} already exists and is not an empty directory")
        self.dtype_name = dtype or model.params_dtype
        if self.dtype_name not in TORCH_DTYPES:
            raise ConversionError(f"dtype {self.dtype_name!r}: expected one of {sorted(TORCH_DTYPES)}")
        self.model, self.architecture, self.source = model, architecture, dict(source)
        self.shard_size_bytes = shard_size_bytes
        self.tmp_dir = self.out_dir.parent / f".tmp-{self.out_dir.name}"
        self._expected = [name for group in tensor_groups(model) for name in group.megatron_names]
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._weight_map: Dict[str, str] = {}
        self._total_bytes = 0
        self._shards = 0

    def __enter__(self) -> "WeightsWriter":
        if self.tmp_dir.exists():  # left by a conversion that was killed: ours to remove
            shutil.rmtree(self.tmp_dir)
        (self.tmp_dir / WEIGHTS_DIR).mkdir(parents=True)
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one canonical tensor (cast to the checkpoint dtype, copied off any shared storage)."""
        if name in self._weight_map or name in self._buffer:
            raise ConversionError(f"tensor {name!r} added twice")
        bad = nonfinite_count(tensor)
        if bad:
            raise ConversionError(f"tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}: "
                                  "a broken model is not converted")
        tensor = tensor.detach().to(device="cpu", dtype=TORCH_DTYPES[self.dtype_name]).contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.shard_size_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes

    def add_tokenizer(self, src_dir) -> None:
        """Copy the Hugging Face tokenizer files found in ``src_dir`` into ``tokenizer/``."""
        src = Path(src_dir)
        if not has_tokenizer_files(src):
            raise ConversionError(f"{src}: no tokenizer files (tokenizer.json or tokenizer_config.json)")
        target = self.tmp_dir / _TOKENIZER_DIR
        target.mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, target / name)

    def add_hf_files(self, src_dir) -> None:
        """Copy ``config.json`` (as ``hf_config.json``) and ``generation_config.json`` if present."""
        src = Path(src_dir)
        for name, target in (("config.json", "hf_config.json"), ("generation_config.json", "generation_config.json")):
            if (src / name).is_file():
                shutil.copy2(src / name, self.tmp_dir / target)

    def _flush(self) -> None:
        if not self._buffer:
            return
        self._shards += 1
        filename = f"model-{self._shards:05d}.safetensors"
        save_file(self._buffer, str(self.tmp_dir / WEIGHTS_DIR / filename), metadata={"format": "pt"})
        self._weight_map.update({name: filename for name in self._buffer})
        self._total_bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    def _finish(self) -> None:
        names = set(self._weight_map) | set(self._buffer)
        missing = [name for name in self._expected if name not in names]
        unexpected = sorted(names - set(self._expected))
        if missing or unexpected:
            raise ConversionError(f"incomplete conversion: missing tensors {missing[:8]}, unexpected {unexpected[:8]}")
        self._flush()
        _write_json(self.tmp_dir / WEIGHTS_DIR / _INDEX,
                    {"total_size": self._total_bytes, "weight_map": self._weight_map})
        weights = self.tmp_dir / WEIGHTS_DIR  # hashed once here: runs identify it by sizes and mtimes
        _write_json(self.tmp_dir / WEIGHTS_DESCRIPTION, {
            "format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "model": dataclasses.asdict(self.model),
            "architecture": self.architecture, "source": self.source, "dtype": self.dtype_name,
            "weights_identity": {"sha256": directory_sha256(weights), "files": file_identities(weights)},
        })
        if self.out_dir.exists():
            self.out_dir.rmdir()  # empty (checked at construction); rename needs the name free
        os.replace(self.tmp_dir, self.out_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._buffer = {}
            if self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)`` whose failure (a truncated or corrupt file) is a ConversionError naming the file."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ConversionError(f"{path}: not a readable safetensors file ({err}); truncated or corrupt? Copy or "
                              "download it again") from None
    with handle:
        yield handle


class LazyWeights(Mapping[str, torch.Tensor]):
    """A checkpoint's canonical tensors by name, each read from its shard when asked for; also a
    :class:`clipo_nemo.models.sharding.TensorSource` (only a rank's rows/columns are read)."""

    def __init__(self, path):
        self.weights_dir = Path(path) / WEIGHTS_DIR
        index = self.weights_dir / _INDEX
        if not index.is_file():
            raise ConversionError(f"{path}: no {WEIGHTS_DIR}/{_INDEX}")
        self.weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        self._files: Dict[str, SafetensorsFile] = {}  # headers of the shard files read so far
        for filename in sorted(set(self.weight_map.values())):
            if not (self.weights_dir / filename).is_file():
                raise ConversionError(f"{path}: shard {WEIGHTS_DIR}/{filename} named in the index is missing")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(name)
        with open_safetensors(self.weights_dir / self.weight_map[name]) as handle:
            return handle.get_tensor(name)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise KeyError(name)
        filename = self.weight_map[name]
        if filename not in self._files:
            self._files[filename] = SafetensorsFile(self.weights_dir / filename)
        return self._files[filename]

    def shape_of(self, name: str) -> Tuple[int, ...]:
        return self._file(name).shape_of(name)

    def read_ranges(self, name: str, dim: int, ranges: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """Only the [start, stop) ranges of ``name`` along ``dim`` (:mod:`clipo_nemo.conversion.sliced_read`)."""
        return self._file(name).read_ranges(name, dim, ranges)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the whole tensor
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


def _model_names(model: torch.nn.Module) -> List[str]:
    """Canonical names of every tensor of the whole model (all PP stages) that ``model`` is a piece of."""
    from megatron.core.utils import unwrap_model

    unwrapped = unwrap_model(model)
    config = unwrapped.config
    described = ModelConfig(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels, add_qkv_bias=config.add_qkv_bias,
        tie_word_embeddings=unwrapped.share_embeddings_and_output_weights,
    )
    return [name for group in tensor_groups(described) for name in group.megatron_names]


def load_weights_into_model(model: torch.nn.Module, path, vocab_size: int) -> None:
    """Load this rank's TP/PP shard of the checkpoint at ``path`` into ``model`` (a GPTModel piece).

    Raises ConversionError naming missing or unexpected tensors (relative to the whole model that
    ``model`` is a stage of) or a tensor whose shape does not fit.
    """
    from clipo_nemo.models.sharding import load_full_state_dict

    read_description(path)
    weights = LazyWeights(path)
    expected = _model_names(model)
    missing = [name for name in expected if name not in weights.weight_map]
    unexpected = sorted(set(weights.weight_map) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{path} does not fit the model: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}"
        )
    try:
        load_full_state_dict(model, weights, vocab_size)
    except (KeyError, ValueError) as err:
        raise ConversionError(f"{path}: {err}") from None
