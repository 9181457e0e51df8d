"""Export a trainer checkpoint (any TP/PP layout) or a converted checkpoint as a Hugging Face model
directory, plus the head.

What :func:`export_to_hf` writes into ``out``::

    config.json                        the architecture (Qwen2ForCausalLM / LlamaForCausalLM) and every
                                       model field; other fields from the original HF config when the
                                       run started from a converted checkpoint (``trainer.init_from``)
    generation_config.json             carried over from that checkpoint; without one (a run from
                                       scratch, a NeMo source) the tokenizer's bos/eos/pad ids, which
                                       then also go into config.json
    model-00001-of-0000N.safetensors   HF tensors, shards of at most ``shard_size_bytes`` (one bigger
                                       tensor gets a shard of its own)
    model.safetensors.index.json       {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}
    tokenizer files                    the run's tokenizer (``trainer.tokenizer`` or init_from's)
    clipo_head.safetensors             the contrastive head's whole weights (``proj.weight``, or
                                       ``proj.0.weight`` / ``proj.2.weight`` for the MLP head), TP-free
    clipo_head.json                    what the head is and how to load it (:func:`load_head_file`)

A converted checkpoint (``tools/convert_hf_to_megatron.py``, also from NeMo) is described by its own
``clipo_model.json``, HF configs and tokenizer, has no head, and gives back a converted HF model's
tensors bit-identical (in the stored dtype). Tensors stream from the checkpoint one layer at a time (:mod:`clipo_nemo.conversion.dist_reader`)
through the mapping's ``to_hf``; memory holds about one layer plus one output shard. Everything is
written into a temporary sibling directory that is renamed to ``out`` when complete; problems with
the input are reported before anything is written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from clipo_nemo.checkpoint.contents import READABLE_FORMATS
from clipo_nemo.checkpoint.recovery import CheckpointError, latest_checkpoint, verify_checkpoint
from clipo_nemo.config import ClipoConfig, ModelConfig, load_config
from clipo_nemo.conversion.dist_reader import (
    DistCheckpointReader, check_checkpoint_matches, iter_canonical_tensors, single_process_group)
from clipo_nemo.conversion.mapping import (
    SUPPORTED_ARCHITECTURES, ConversionError, hf_config_from_model, infer_architecture, tensor_groups)
from clipo_nemo.conversion.weights import (
    TOKENIZER_FILES, LazyWeights, has_tokenizer_files, is_weights_checkpoint, read_description)
from clipo_nemo.models.head import layer_names
from clipo_nemo.models.policy import TORCH_DTYPES

HEAD_WEIGHTS, HEAD_DESCRIPTION = "clipo_head.safetensors", "clipo_head.json"
HEAD_FORMAT, HEAD_VERSION = "clipo-head", 1
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size like ``5GB``, ``500MB``, ``2GiB`` or ``1048576``."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ConversionError(f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, GiB, ...)")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if size < 1:
        raise ConversionError(f"size {text!r} must be at least one byte")
    return size


# ------------------------------------------------------------------------------------------------
# Output shards
# ------------------------------------------------------------------------------------------------
class HFShardWriter:
    """Buffers HF tensors and writes ``model-XXXXX-of-YYYYY.safetensors`` shards and their index."""

    def __init__(self, directory: Path, shard_size_bytes: int):
        self.directory, self.shard_size_bytes = directory, shard_size_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes, self._total_bytes = 0, 0
        self._shards: List[List[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into a bigger tensor: safetensors refuses shared storage
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.shard_size_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes

    def _flush(self) -> None:
        if self._buffer:
            save_file(self._buffer, str(self.directory / f".part-{len(self._shards)}.safetensors"),
                      metadata={"format": "pt"})
            self._shards.append(list(self._buffer))
            self._total_bytes += self._buffer_bytes
            self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> Dict[str, Any]:
        """Write the last shard, give every shard its final name and write the index (returned)."""
        self._flush()
        count, weight_map = len(self._shards), {}
        for index, names in enumerate(self._shards):
            filename = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f".part-{index}.safetensors", self.directory / filename)
            weight_map.update({name: filename for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        return index


# ------------------------------------------------------------------------------------------------
# What to export
# ------------------------------------------------------------------------------------------------
@dataclass
class ExportSource:
    """A trainer or converted checkpoint and everything the HF directory is described from."""

    checkpoint: Path  # run_dir/checkpoints/step_N, or the converted checkpoint
    cfg: ClipoConfig  # the run's config.yaml (a converted checkpoint: its model description)
    meta: Dict[str, Any]  # the checkpoint's meta.json ({} for a converted checkpoint)
    architecture: str
    hf_base: Optional[Dict[str, Any]]  # the original HF config.json (converted init_from), else None
    generation_config: Optional[Dict[str, Any]]
    tokenizer: str  # a tokenizer directory, or "tiny"
    converted: bool = False  # a converted checkpoint (canonical safetensors), not a trainer checkpoint


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def resolve_checkpoint(path: str | os.PathLike) -> Tuple[Path, Path]:
    """(step directory, run directory) of a run directory (its ``latest``) or a ``step_N`` directory."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"checkpoint {path} is not a directory")
    if (path / "meta.json").is_file() and (path / "dist").is_dir():
        problem = verify_checkpoint(path)  # as init_from and tools/evaluate.py do (clipo_nemo.checkpoint.load)
        if problem is not None:
            raise ConversionError(f"{path} cannot be exported: {problem}")
        return path, path.parent.parent
    if (path / "checkpoints").is_dir():
        try:
            step = latest_checkpoint(path)  # the newest checkpoint that verifies
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
        if step is None:
            raise ConversionError(f"run {path} has no complete checkpoint (checkpoints/latest is missing)")
        return step, path
    raise ConversionError(f"{path} is neither a trainer run directory (with checkpoints/), a checkpoint "
                          "directory (with meta.json and dist/), nor a converted checkpoint (clipo_model.json)")


def _check_architecture(architecture: str) -> str:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"architecture {architecture!r}: expected one of {sorted(SUPPORTED_ARCHITECTURES)}")
    return architecture


def _hf_files(converted: Path) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(config.json, generation_config.json) of the HF model a converted checkpoint came from, each
    None where it stores none."""
    return tuple(_read_json(converted / name) if (converted / name).is_file() else None
                 for name in ("hf_config.json", "generation_config.json"))


def _converted_source(path: Path, architecture: Optional[str]) -> ExportSource:
    """A converted checkpoint described by itself: its model description, HF configs and tokenizer."""
    from clipo_nemo.conversion.weights import model_config_of, tokenizer_dir

    description = read_description(path)
    tokenizer = tokenizer_dir(path)
    if tokenizer is None:
        raise ConversionError(f"{path} stores no tokenizer/ (convert with --tokenizer): the HF directory could "
                              "not carry one")
    hf_base, generation = _hf_files(path)
    return ExportSource(path, ClipoConfig(model=model_config_of(path)), {},
                        _check_architecture(architecture or description["architecture"]), hf_base, generation,
                        str(tokenizer), converted=True)


def resolve_export_source(path: str | os.PathLike, architecture: Optional[str] = None) -> ExportSource:
    """Find the checkpoint, its run's config, architecture, HF configs and tokenizer; check them."""
    if is_weights_checkpoint(path):
        return _converted_source(Path(path), architecture)
    step, run_dir = resolve_checkpoint(path)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConversionError(f"{run_dir} has no config.yaml: the model description of {step} is unknown")
    cfg = load_config(config_path)
    meta = _read_json(step / "meta.json")
    if meta.get("format") not in READABLE_FORMATS:  # the policy's tensors are stored alike in all of them
        raise ConversionError(f"{step}/meta.json: format {meta.get('format')!r}, this code reads {READABLE_FORMATS}")
    init_from = cfg.trainer.init_from
    converted = bool(init_from) and is_weights_checkpoint(init_from)
    description = read_description(init_from) if converted else {}
    architecture = _check_architecture(architecture or description.get("architecture") or infer_architecture(cfg.model))
    hf_base, generation = _hf_files(Path(init_from)) if converted else (None, None)
    return ExportSource(step, cfg, meta, architecture, hf_base, generation, _tokenizer_source(cfg, converted))


def _tokenizer_source(cfg: ClipoConfig, converted: bool) -> str:
    from clipo_nemo.conversion.weights import tokenizer_dir

    name = cfg.trainer.tokenizer
    if name == "tiny":
        return name
    if name:
        if not has_tokenizer_files(Path(name)):
            raise ConversionError(f"trainer.tokenizer={name!r} of the run is not a directory with tokenizer files")
        return name
    found = tokenizer_dir(cfg.trainer.init_from) if converted else None
    if found is None:
        raise ConversionError("the run names no tokenizer (trainer.tokenizer is empty and trainer.init_from "
                              "stores none): the HF directory could not carry one")
    return str(found)


def _load_tokenizer(source: ExportSource):
    """The run's tokenizer; ConversionError if it has more tokens than the model's vocabulary."""
    if source.tokenizer == "tiny":
        from clipo_nemo.data.tiny_tokenizer import build_task_tokenizer

        tokenizer = build_task_tokenizer(source.cfg.task)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer)
    if len(tokenizer) > source.cfg.model.vocab_size:
        raise ConversionError(f"the tokenizer ({source.tokenizer}) has {len(tokenizer)} tokens, more than "
                              f"model.vocab_size={source.cfg.model.vocab_size}")
    return tokenizer


def _write_tokenizer(source: ExportSource, tokenizer, directory: Path) -> None:
    """The tokenizer files into ``directory`` (copied as they are; the tiny one saved)."""
    if source.tokenizer == "tiny":
        tokenizer.save_pretrained(str(directory))
        return
    for name in TOKENIZER_FILES:
        if (Path(source.tokenizer) / name).is_file():
            shutil.copy2(Path(source.tokenizer) / name, directory / name)


def iter_hf_tensors(stream: Iterator[Tuple[str, torch.Tensor]], model: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the whole model, converted group by group from ``stream``, the canonical
    (name, tensor) pairs in :func:`tensor_groups` order."""
    for group in tensor_groups(model):
        canonical = [next(stream) for _ in group.megatron_names]
        assert [name for name, _ in canonical] == list(group.megatron_names)
        yield from zip(group.hf_names, group.to_hf([tensor for _, tensor in canonical]))


# ------------------------------------------------------------------------------------------------
# The contrastive head
# ------------------------------------------------------------------------------------------------
def _read_head(source: ExportSource) -> Optional[Tuple[Dict[str, Any], Dict[str, torch.Tensor]]]:
    """(description, whole weights) of the checkpoint's contrastive head, or None without one."""
    head = source.meta.get("head")
    if head is None:
        return None
    reader = DistCheckpointReader(source.checkpoint / "dist", "head.", vocab_size=0)
    names = layer_names(head["type"])
    weights = reader.read(names)
    first, last = weights[names[0]], weights[names[-1]]
    con = source.cfg.contrastive
    description = {
        "format": HEAD_FORMAT, "version": HEAD_VERSION, "type": head["type"],
        "hidden_size": int(first.shape[1]), "dim": int(last.shape[0]), "dtype": str(first.dtype).removeprefix("torch."),
        "tensors": {name: list(t.shape) for name, t in weights.items()},
        "input": "mean over the response tokens of the policy's final-norm hidden state [B, hidden_size]",
        "output": "L2-normalised embeddings [B, dim] = normalize(head(pooled))",
        "module": "clipo_nemo.algorithms.head.ContrastiveHead(hidden_size, dim, type) (nn.Linear layers, no bias)",
        "load": "clipo_nemo.conversion.hf_writer.load_head_file(dir) -> (this dict, state dict for the module)",
        "trained_with": {"loss": con.loss, "similarity": con.similarity, "temperature": con.temperature,
                         "level": con.level, "step": source.meta.get("step")},
    }
    if description["hidden_size"] != source.cfg.model.hidden_size:
        raise ConversionError(f"{source.checkpoint}: head input size {description['hidden_size']} is not the "
                              f"model's hidden_size={source.cfg.model.hidden_size}")
    return description, weights


def load_head_file(directory: str | os.PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read ``clipo_head.json`` and ``clipo_head.safetensors`` from an exported directory.

    Returns (description, state dict); ``ContrastiveHead(d["hidden_size"], d["dim"], d["type"])
    .load_state_dict(state)`` or ``ParallelContrastiveHead.load_full_state_dict(state)`` puts it back.
    """
    directory = Path(directory)
    for name in (HEAD_DESCRIPTION, HEAD_WEIGHTS):
        if not (directory / name).is_file():
            raise ConversionError(f"{directory} has no {name} (not an export with a contrastive head)")
    description = _read_json(directory / HEAD_DESCRIPTION)
    if description.get("format") != HEAD_FORMAT or description.get("version") != HEAD_VERSION:
        raise ConversionError(f"{directory / HEAD_DESCRIPTION}: format {description.get('format')!r} version "
                              f"{description.get('version')!r}, expected {HEAD_FORMAT!r} version {HEAD_VERSION}")
    state = load_file(str(directory / HEAD_WEIGHTS))
    expected = {name: tuple(shape) for name, shape in description["tensors"].items()}
    if set(state) != set(layer_names(description["type"])) or {k: tuple(v.shape) for k, v in state.items()} != expected:
        found = sorted((k, tuple(v.shape)) for k, v in state.items())
        raise ConversionError(f"{directory / HEAD_WEIGHTS}: tensors {found} "
                              f"do not match the {description['type']!r} head described as {sorted(expected.items())}")
    return description, state


# ------------------------------------------------------------------------------------------------
# The export
# ------------------------------------------------------------------------------------------------
# model.* keys that are choices of the run, not properties of the weights: the original HF value stands
_RUN_CHOICE_KEYS = ("max_position_embeddings", "initializer_range", "attention_dropout")


def _token_ids(tokenizer) -> Dict[str, int]:
    """The tokenizer's special token ids HF configs carry (those it has)."""
    ids = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "pad")}
    return {key: value for key, value in ids.items() if value is not None}


def _hf_config(source: ExportSource, dtype: str) -> Dict[str, Any]:
    """config.json: the architecture from the run's model description; the run-choice keys and every
    other field from the original HF config when there is one."""
    config = hf_config_from_model(source.cfg.model, source.architecture, base=source.hf_base)
    for key in _RUN_CHOICE_KEYS:
        if source.hf_base is not None and key in source.hf_base:
            config[key] = source.hf_base[key]
    config["torch_dtype"] = dtype
    return config


def export_to_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, shard_size_bytes: int = 5 * 10**9,
                 architecture: Optional[str] = None, dtype: Optional[str] = None) -> Dict[str, Any]:
    """Write the HF directory ``out`` for a trainer run, one of its ``checkpoints/step_N`` or a converted
    checkpoint (see the module docstring).

    ``dtype`` (default: the run's ``model.params_dtype``) is the dtype of the written weights.
    Runs in one process (it starts a 1-rank gloo group if none exists). Returns the shard index.
    """
    out = Path(out)
    if out.exists():
        raise ConversionError(f"output {out} already exists")
    source = resolve_export_source(checkpoint, architecture)
    model = source.cfg.model
    dtype = dtype or model.params_dtype
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    config = _hf_config(source, dtype)
    generation = source.generation_config
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():  # left by an export that was killed: ours to remove
        shutil.rmtree(tmp)
    with single_process_group():
        if source.converted:
            weights = LazyWeights(source.checkpoint)  # complete: clipo_model.json is written last
            stream = ((name, weights[name]) for group in tensor_groups(model) for name in group.megatron_names)
        else:
            reader = DistCheckpointReader(source.checkpoint / "dist", "policy.", model.vocab_size)
            check_checkpoint_matches(reader, model)
            stream = iter_canonical_tensors(reader, model)
        head = _read_head(source)
        tokenizer = _load_tokenizer(source)
        if source.hf_base is None:
            config.update(_token_ids(tokenizer))
        if generation is None:
            generation = _token_ids(tokenizer)
        tmp.mkdir(parents=True)
        try:
            _write_tokenizer(source, tokenizer, tmp)
            shards = HFShardWriter(tmp, shard_size_bytes)
            for name, tensor in iter_hf_tensors(stream, model):
                shards.add(name, tensor.to(TORCH_DTYPES[dtype]))
            index = shards.close()
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
            if head is not None:
                save_file(head[1], str(tmp / HEAD_WEIGHTS), metadata={"format": "pt"})
                (tmp / HEAD_DESCRIPTION).write_text(json.dumps(head[0], indent=2))
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return index
