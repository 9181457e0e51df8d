"""Convert a Hugging Face model directory into a clipo-nemo weights checkpoint.

Everything is checked before the first byte is written (architecture, tensors, shapes, dtypes, the
tokenizer's size, that the intended TP/PP layout can split the model); then tensors stream group
by group from the HF shards through the mapping into :class:`WeightsWriter`, which renames the
finished checkpoint into place. Used by ``tools/convert_hf_to_megatron.py`` and ``tools/evaluate.py``.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Callable, Optional

from clipo_nemo.config import ModelConfig, ParallelConfig
from clipo_nemo.conversion.hf_checkpoint import HFCheckpoint
from clipo_nemo.conversion.mapping import ConversionError, layer_tensor_groups
from clipo_nemo.conversion.weights import WeightsWriter, has_tokenizer_files

DTYPE_CHOICES = ("source", "bfloat16", "float32", "float16")


def exit_on_stop_signals() -> None:
    """Make SIGTERM (and SIGHUP) raise ``SystemExit(128 + signal)`` in the main thread, as Ctrl-C raises
    KeyboardInterrupt, so the all-or-nothing writers' cleanup runs (by default SIGTERM ends the process
    at once, leaving the hidden ``.tmp-<out>`` folder behind). For the command-line tools."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, stop)


def check_layout(model: ModelConfig, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """ConversionError if ``model`` cannot be split over TP x PP (heads, query groups, FFN, layers)."""
    from clipo_nemo.parallel.state import LayoutError, validate_layout

    parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    try:
        validate_layout(tensor_parallel_size * pipeline_parallel_size, model, parallel, cuda_available=True)
    except LayoutError as err:
        raise ConversionError(f"the model cannot run at TP={tensor_parallel_size} x PP={pipeline_parallel_size}: {err}") from None


def check_tokenizer(tokenizer_src: Path, vocab_size: int) -> int:
    """Load the tokenizer in ``tokenizer_src``; ConversionError if absent or larger than ``vocab_size``.
    Returns its number of tokens."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(tokenizer_src):
        raise ConversionError(
            f"{tokenizer_src}: no tokenizer files (tokenizer.json or tokenizer_config.json); pass the tokenizer's directory"
        )
    try:
        size = len(AutoTokenizer.from_pretrained(str(tokenizer_src)))
    except Exception as err:  # noqa: BLE001 -- tokenizers/transformers raise many types for one verdict
        files = sorted(p.name for p in Path(tokenizer_src).glob("*token*"))
        raise ConversionError(f"{tokenizer_src}: the tokenizer cannot be loaded from {files} ({type(err).__name__}: "
                              f"{str(err)[:300]}); a truncated or corrupt file? Copy it again, or pass --tokenizer DIR") from None
    if size > vocab_size:
        raise ConversionError(
            f"the tokenizer in {tokenizer_src} has {size} tokens, more than the model's vocab_size={vocab_size}"
        )
    return size


def convert_hf(
    hf_dir,
    out_dir,
    *,
    dtype: str = "source",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    tokenizer_src=None,
    shard_size_bytes: int = 2 * 2**30,
    log: Optional[Callable[[str], None]] = print,
) -> Path:
    """Convert the HF model in ``hf_dir`` into a new checkpoint ``out_dir``; return ``out_dir``.

    Args:
        dtype: the stored and described ``params_dtype``; "source" keeps the HF tensors' dtype.
        tensor_parallel_size, pipeline_parallel_size: a layout the model must be able to run at
            (checked only: the checkpoint itself loads at any layout).
        tokenizer_src: directory of the tokenizer to store (default ``hf_dir``).
        shard_size_bytes: largest safetensors shard written (bounds the writer's buffer).
        log: progress lines (one per transformer layer); None = silent.
    """
    log = log or (lambda line: None)
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype={dtype!r}: expected one of {DTYPE_CHOICES}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"output {out_dir} already exists and is not an empty directory")
    checkpoint = HFCheckpoint(hf_dir)
    source_dtype = checkpoint.validate()
    model = dataclasses.replace(checkpoint.model, params_dtype=source_dtype if dtype == "source" else dtype)
    check_layout(model, tensor_parallel_size, pipeline_parallel_size)
    tokenizer_src = Path(tokenizer_src or hf_dir)
    tokens = check_tokenizer(tokenizer_src, model.vocab_size)
    log(f"{checkpoint.architecture}: {model.num_layers} layers, hidden {model.hidden_size}, vocab {model.vocab_size} "
        f"(tokenizer {tokens}), {source_dtype} -> {model.params_dtype}")
    layer_ends = {layer_tensor_groups(model, i)[-1].megatron_names[-1]: i for i in range(model.num_layers)}
    source = {"format": "huggingface", "path": str(hf_dir.resolve()), "dtype": source_dtype}
    start = time.monotonic()
    with WeightsWriter(out_dir, model, checkpoint.architecture, source, shard_size_bytes) as writer:
        writer.add_hf_files(hf_dir)
        writer.add_tokenizer(tokenizer_src)
        for group, tensors in checkpoint.stream():
            for name, tensor in zip(group.megatron_names, tensors):
                writer.add(name, tensor)
            if group.megatron_names[-1] in layer_ends:
                layer = layer_ends[group.megatron_names[-1]]
                log(f"layer {layer + 1}/{model.num_layers} converted ({time.monotonic() - start:.1f} s)")
    log(f"wrote {out_dir} in {time.monotonic() - start:.1f} s")
    return out_dir
