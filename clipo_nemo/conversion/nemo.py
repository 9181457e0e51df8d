"""Read NeMo 2 and NeMo 1 GPT checkpoints as conversion sources (Qwen2/Qwen2.5 and Llama 3 shapes).

Both formats keep the weights as a megatron-core ``dist_checkpointing`` (``torch_dist``) checkpoint
of the GPTModel; :mod:`clipo_nemo.conversion.dist_reader` streams them out one layer at a time
(vocabulary padding for the saving TP dropped). What this module reads, exactly:

NeMo 2 checkpoint directory (``nemo.lightning`` ``io_dump`` + ``MegatronCheckpointIO``)::

    CKPT/context/model.yaml        the model's fiddle config dumped with every default:
                                     _target_: nemo.collections.llm.gpt.model.qwen2.Qwen2Model
                                     config:
                                       _target_: nemo.collections.llm.gpt.model.qwen2.Qwen2Config
                                       num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
                                       num_query_groups, kv_channels, seq_length, vocab_size (may be
                                       null), rotary_base, layernorm_epsilon, normalization: RMSNorm,
                                       gated_linear_unit: true, activation_func: {_target_:
                                       torch.nn.functional.silu, _call_: false}, add_bias_linear,
                                       add_qkv_bias, share_embeddings_and_output_weights,
                                       position_embedding_type: rope, rotary_percent, qk_layernorm,
                                       init_method_std, params_dtype / bf16 / fp16, and for Llama 3.1+
                                       (Llama31Config*) scale_factor, low_freq_factor,
                                       high_freq_factor, old_context_len
    CKPT/context/nemo_tokenizer/   the Hugging Face tokenizer files (AutoTokenizer.save_pretrained)
    CKPT/weights/                  torch_dist checkpoint; model keys ``module.<megatron name>``

NeMo 1 ``.nemo`` archive (a tar, optionally gzipped; an extracted directory is accepted too)::

    model_config.yaml              NeMo 1 megatron_gpt keys: mcore_gpt: true, num_layers, hidden_size,
                                   ffn_hidden_size, num_attention_heads, num_query_groups, kv_channels,
                                   encoder_seq_length / max_position_embeddings, normalization: rmsnorm,
                                   layernorm_epsilon, bias: false, qkv_bias, activation: fast-swiglu,
                                   position_embedding_type: rope, rotary_percentage, rotary_base,
                                   share_embeddings_and_output_weights, override_vocab_size,
                                   scale_positional_embedding (Llama 3.1 RoPE scaling, megatron's
                                   factor 8 unless rope_scaling_factor is given), init_method_std,
                                   precision, tokenizer: {library, type, model, ...} ("nemo:<file>"
                                   names a file stored in the archive)
    model_weights/                 torch_dist checkpoint; model keys ``model.<megatron name>``
                                   (``model.module.`` with megatron_amp_O2 is accepted)
    tokenizer files                as the tokenizer block names them

The vocabulary size is the config's (``vocab_size`` / ``override_vocab_size``); when the config has
none (NeMo then pads the tokenizer's size), it is the Hugging Face tokenizer's length. The
architecture is Qwen2ForCausalLM for Qwen2 configs (``_target_`` or QKV bias in NeMo 1) and
LlamaForCausalLM for Llama configs. Anything the project's model cannot compute identically
(LayerNorm, biases beyond Qwen2's QKV bias, QK layernorm, MoE, other activations or position
embeddings) is a :class:`ConversionError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from clipo_nemo.config import ModelConfig
from clipo_nemo.conversion.mapping import MEGATRON_LLAMA3_ROPE, ConversionError

NEMO2, NEMO1 = "nemo2", "nemo1"


@dataclass
class NemoSource:
    """A NeMo checkpoint opened for conversion."""

    format: str  # "nemo2" | "nemo1"
    model: ModelConfig
    architecture: str
    weights_dir: Path  # the torch_dist checkpoint
    prefix: str  # model key prefix inside it ("module.", "model.")
    tokenizer_dir: Optional[Path]  # Hugging Face tokenizer files, or None


def _load_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConversionError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a mapping at the top level")
    return data


def _need(config: Dict[str, Any], key: str, where: str):
    if config.get(key) is None:
        raise ConversionError(f"{where} has no {key!r}")
    return config[key]


def _refuse(where: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConversionError(f"{where}: {key}={value!r} is not supported (supported: {allowed!r})")


def _dtype_name(config: Dict[str, Any], precision_key: str) -> str:
    if config.get("bf16") or str(config.get(precision_key, "")).startswith("bf16"):
        return "bfloat16"
    if config.get("fp16") or str(config.get(precision_key, "")) in ("16", "16-mixed", "fp16"):
        return "float16"
    return "float32"


def _shared_megatron_fields(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """ModelConfig fields that NeMo 1 and NeMo 2 configs both spell with megatron's own key names."""
    heads = int(_need(config, "num_attention_heads", where))
    return dict(
        num_layers=int(_need(config, "num_layers", where)),
        hidden_size=int(_need(config, "hidden_size", where)),
        ffn_hidden_size=int(_need(config, "ffn_hidden_size", where)),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_query_groups") or heads),
        kv_channels=config.get("kv_channels"),
        make_vocab_size_divisible_by=int(config.get("make_vocab_size_divisible_by", 128)),
        rotary_base=float(config.get("rotary_base", 10000.0)),
        tie_word_embeddings=bool(config.get("share_embeddings_and_output_weights", True)),
        norm_epsilon=float(config.get("layernorm_epsilon", 1e-5)),
        params_dtype=_dtype_name(config, "precision"),
        init_method_std=float(config.get("init_method_std", ModelConfig.init_method_std)),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        hidden_dropout=float(config.get("hidden_dropout", 0.0)),
    )


# ------------------------------------------------------------------------------------------------
# NeMo 2
# ------------------------------------------------------------------------------------------------
def model_config_from_nemo2(config: Dict[str, Any], where: str = "model.yaml config") -> ModelConfig:
    """The :class:`ModelConfig` of a NeMo 2 GPT config block (``model.yaml``'s ``config:``)."""
    _refuse(where, "normalization", config.get("normalization", "LayerNorm"), ["RMSNorm"])
    _refuse(where, "gated_linear_unit", config.get("gated_linear_unit", False), [True])
    activation = config.get("activation_func")
    target = activation.get("_target_") if isinstance(activation, dict) else activation
    _refuse(where, "activation_func", target, ["torch.nn.functional.silu"])
    _refuse(where, "add_bias_linear", config.get("add_bias_linear", True), [False])
    _refuse(where, "position_embedding_type", config.get("position_embedding_type", "learned_absolute"), ["rope"])
    _refuse(where, "rotary_percent", float(config.get("rotary_percent", 1.0)), [1.0])
    _refuse(where, "qk_layernorm", bool(config.get("qk_layernorm", False)), [False])
    _refuse(where, "num_moe_experts", config.get("num_moe_experts"), [None])
    rope_scaling, factor = False, ModelConfig.rope_scaling_factor
    if config.get("scale_factor") is not None:  # Llama31Config and its subclasses
        theirs = {"low_freq_factor": config.get("low_freq_factor"), "high_freq_factor": config.get("high_freq_factor"),
                  "original_max_position_embeddings": config.get("old_context_len")}
        for key, value in MEGATRON_LLAMA3_ROPE.items():
            if theirs[key] is None or float(theirs[key]) != value:
                raise ConversionError(f"{where}: Llama 3.1 RoPE scaling with {key}={theirs[key]!r}; megatron-core's "
                                      f"RotaryEmbedding supports only {value}")
        rope_scaling, factor = True, float(config["scale_factor"])
    return ModelConfig(
        **_shared_megatron_fields(config, where),
        vocab_size=int(config.get("vocab_size") or 0),  # 0: unknown, filled in from the tokenizer
        max_position_embeddings=int(_need(config, "seq_length", where)),
        rope_scaling=rope_scaling,
        rope_scaling_factor=factor,
        add_qkv_bias=bool(config.get("add_qkv_bias", False)),
    )


def _nemo2_architecture(target: str, model: ModelConfig, where: str) -> str:
    name = target.rsplit(".", 1)[-1].lower()
    if "qwen2" in target or name.startswith("qwen2"):
        return "Qwen2ForCausalLM"
    if ".llama." in target or name.startswith("llama"):
        return "LlamaForCausalLM"
    if name == "gptconfig":  # the generic config: Qwen2 and Llama differ by the QKV bias alone
        return "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"
    raise ConversionError(f"{where}: config _target_ {target!r} is not a Qwen2 or Llama GPT config")


def open_nemo2(path: Path) -> NemoSource:
    """A NeMo 2 checkpoint directory (``context/model.yaml``, ``weights/``)."""
    model_yaml = path / "context" / "model.yaml"
    if not model_yaml.is_file():
        raise ConversionError(f"{path} has no context/model.yaml (not a NeMo 2 checkpoint directory)")
    config = _load_yaml(model_yaml).get("config")
    if not isinstance(config, dict):
        raise ConversionError(f"{model_yaml} has no 'config:' block with the GPT config")
    model = model_config_from_nemo2(config, f"{model_yaml} config")
    architecture = _nemo2_architecture(str(config.get("_target_", "")), model, f"{model_yaml} config")
    if model.add_qkv_bias != (architecture == "Qwen2ForCausalLM"):
        raise ConversionError(f"{model_yaml} config: add_qkv_bias={model.add_qkv_bias} does not fit {architecture} "
                              f"(_target_ {config.get('_target_')!r})")
    tokenizer = path / "context" / "nemo_tokenizer"
    return NemoSource(NEMO2, model, architecture, path / "weights", "module.",
                      tokenizer if tokenizer.is_dir() else None)


# ------------------------------------------------------------------------------------------------
# NeMo 1
# ------------------------------------------------------------------------------------------------
def model_config_from_nemo1(config: Dict[str, Any], where: str = "model_config.yaml") -> ModelConfig:
    """The :class:`ModelConfig` of a NeMo 1 ``megatron_gpt`` model config (``model_config.yaml``)."""
    _refuse(where, "mcore_gpt", bool(config.get("mcore_gpt", False)), [True])
    _refuse(where, "normalization", str(config.get("normalization", "layernorm")).lower(), ["rmsnorm"])
    _refuse(where, "activation", config.get("activation", "gelu"), ["fast-swiglu", "swiglu"])
    _refuse(where, "bias", bool(config.get("bias", True)), [False])
    _refuse(where, "position_embedding_type", config.get("position_embedding_type", "learned_absolute"), ["rope"])
    _refuse(where, "rotary_percentage", float(config.get("rotary_percentage", 1.0)), [1.0])
    _refuse(where, "qk_layernorm", bool(config.get("qk_layernorm", False)), [False])
    _refuse(where, "num_moe_experts", config.get("num_moe_experts", 1) or 1, [1])
    seq = config.get("max_position_embeddings") or config.get("encoder_seq_length")
    if seq is None:
        raise ConversionError(f"{where} has neither 'max_position_embeddings' nor 'encoder_seq_length'")
    return ModelConfig(
        **_shared_megatron_fields(config, where),
        vocab_size=int(config.get("override_vocab_size") or 0),
        max_position_embeddings=int(seq),
        rope_scaling=bool(config.get("scale_positional_embedding", False)),
        rope_scaling_factor=float(config.get("rope_scaling_factor", ModelConfig.rope_scaling_factor)),
        add_qkv_bias=bool(config.get("qkv_bias", False)),
    )


def _nemo1_tokenizer(root: Path, config: Dict[str, Any]) -> Optional[Path]:
    """A directory with Hugging Face tokenizer files named by the NeMo 1 ``tokenizer`` block, if any."""
    from clipo_nemo.conversion.weights import has_tokenizer_files

    block = config.get("tokenizer") or {}
    if block.get("library") != "huggingface":
        return None
    for value in (block.get("type"), block.get("model"), block.get("vocab_file")):
        if not isinstance(value, str):
            continue
        candidate = root / value[len("nemo:"):] if value.startswith("nemo:") else Path(value)
        for directory in (candidate, candidate.parent):
            if directory.is_dir() and has_tokenizer_files(directory):
                return directory
    return None


def _safe_extract(archive: Path, target: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(target, filter="data")  # no absolute paths, links out of target, devices
    except (tarfile.TarError, OSError) as err:
        raise ConversionError(f"{archive}: cannot read the .nemo archive ({err})") from None


def open_nemo1(root: Path, archive: Path) -> NemoSource:
    """An extracted NeMo 1 archive at ``root`` (``model_config.yaml``, ``model_weights/``)."""
    config_path = root / "model_config.yaml"
    if not config_path.is_file():
        raise ConversionError(f"{archive} has no model_config.yaml (not a NeMo 1 .nemo archive)")
    config = _load_yaml(config_path)
    model = model_config_from_nemo1(config, f"{archive}:model_config.yaml")
    weights = root / "model_weights"
    if not weights.is_dir():
        legacy = sorted(p.name for p in root.glob("mp_rank_*"))
        hint = f" (found legacy {legacy}: re-save it with NeMo's dist_ckpt_format=torch_dist)" if legacy else ""
        raise ConversionError(f"{archive} has no model_weights/ directory{hint}")
    architecture = "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"
    return NemoSource(NEMO1, model, architecture, weights, "model.", _nemo1_tokenizer(root, config))


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------
def _check_torch_dist(weights: Path) -> None:
    metadata = weights / "metadata.json"
    if not metadata.is_file():
        raise ConversionError(f"{weights} is not a megatron dist_checkpointing checkpoint (no metadata.json)")
    backend = json.loads(metadata.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(f"{weights}: sharded_backend {backend!r}; only 'torch_dist' can be read (NeMo's "
                              "scripts/checkpoint_converters/convert_zarr_to_torch_dist.py converts zarr)")


def _detect_prefix(source: NemoSource) -> NemoSource:
    """The source with the prefix its weights really use (``model.module.`` under NeMo 1's O2)."""
    from megatron.core import dist_checkpointing

    keys = list(dist_checkpointing.load_tensors_metadata(str(source.weights_dir)))
    for prefix in (source.prefix, source.prefix + "module."):
        if f"{prefix}embedding.word_embeddings.weight" in keys:
            return dataclasses.replace(source, prefix=prefix)
    raise ConversionError(f"{source.weights_dir}: no '{source.prefix}embedding.word_embeddings.weight' "
                          f"(keys start with {sorted({k.split('.')[0] for k in keys})})")


def _complete_vocab(source: NemoSource) -> NemoSource:
    """Fill in an unknown vocabulary size from the tokenizer (as NeMo does before padding it)."""
    if source.model.vocab_size > 0:
        return source
    if source.tokenizer_dir is None:
        raise ConversionError(f"{source.weights_dir.parent}: the config gives no vocabulary size and there is no "
                              "Hugging Face tokenizer to take it from")
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(source.tokenizer_dir)))
    return dataclasses.replace(source, model=dataclasses.replace(source.model, vocab_size=size))


def _open(path: Path, scratch: Optional[Path]) -> NemoSource:
    if scratch is not None:
        _safe_extract(path, scratch)
        return open_nemo1(scratch, path)
    if (path / "context").is_dir():
        return open_nemo2(path)
    if (path / "model_config.yaml").is_file():
        return open_nemo1(path, path)
    raise ConversionError(f"{path} is neither a NeMo 2 checkpoint directory (context/, weights/) nor a NeMo 1 "
                          ".nemo archive or extracted directory (model_config.yaml, model_weights/)")


@contextlib.contextmanager
def open_nemo(path: str | Path, tokenizer_src: Optional[str | Path] = None) -> Iterator[NemoSource]:
    """Open a NeMo 2 directory, a NeMo 1 ``.nemo`` archive or an extracted NeMo 1 directory.

    ``tokenizer_src`` replaces the checkpoint's own tokenizer. A ``.nemo`` archive is extracted into a
    temporary sibling directory (removed on exit): the weights are read from files, so this needs the
    archive's size in free disk space. Run inside :func:`dist_reader.single_process_group`.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"NeMo checkpoint {path} does not exist")
    with contextlib.ExitStack() as stack:
        scratch = None
        if path.is_file():
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".nemo-extract-", dir=path.parent)))
        source = _open(path, scratch)
        if tokenizer_src is not None:
            source = dataclasses.replace(source, tokenizer_dir=Path(tokenizer_src))
        _check_torch_dist(source.weights_dir)
        yield _complete_vocab(_detect_prefix(source))


def convert_nemo(nemo_path, out_dir, *, dtype: str = "source", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, tokenizer_src=None, shard_size_bytes: int = 2 * 2**30,
                 log: Optional[Callable[[str], None]] = print) -> Path:
    """Convert a NeMo 2 / NeMo 1 checkpoint into a new clipo-nemo weights checkpoint ``out_dir``.

    The same contract as :func:`clipo_nemo.conversion.convert.convert_hf`: every check (config,
    layout, tokenizer size, every stored tensor's presence and shape, no unexpected tensors) runs
    before anything is written; tensors then stream one layer at a time into the writer. ``dtype``
    "source" keeps the stored dtype. Without a Hugging Face tokenizer (in the checkpoint or
    ``tokenizer_src``) the checkpoint stores none, and a line says so.
    """
    from clipo_nemo.conversion.convert import DTYPE_CHOICES, check_layout, check_tokenizer
    from clipo_nemo.conversion.dist_reader import (
        DistCheckpointReader, check_checkpoint_matches, iter_canonical_tensors, single_process_group)
    from clipo_nemo.conversion.weights import WeightsWriter

    log = log or (lambda line: None)
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype={dtype!r}: expected one of {DTYPE_CHOICES}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"output {out_dir} already exists and is not an empty directory")
    with single_process_group(), open_nemo(nemo_path, tokenizer_src) as source:
        reader = DistCheckpointReader(source.weights_dir, source.prefix, source.model.vocab_size)
        stored_dtype = reader.dtype("embedding.word_embeddings.weight")
        model = dataclasses.replace(source.model, params_dtype=stored_dtype if dtype == "source" else dtype)
        check_layout(model, tensor_parallel_size, pipeline_parallel_size)
        if source.tokenizer_dir is not None:
            check_tokenizer(source.tokenizer_dir, model.vocab_size)
        check_checkpoint_matches(reader, model)
        described = {"format": source.format, "path": str(Path(nemo_path).resolve()), "dtype": stored_dtype}
        log(f"{source.format} {source.architecture}: {model.num_layers} layers, hidden {model.hidden_size}, "
            f"vocab {model.vocab_size}, {stored_dtype} -> {model.params_dtype}")
        with WeightsWriter(out_dir, model, source.architecture, described, shard_size_bytes) as writer:
            if source.tokenizer_dir is not None:
                writer.add_tokenizer(source.tokenizer_dir)
            for name, tensor in iter_canonical_tensors(reader, model):
                writer.add(name, tensor)
    if source.tokenizer_dir is None:
        log(f"note: {nemo_path} has no Hugging Face tokenizer; {out_dir} stores none (set trainer.tokenizer, "
            "or convert again with --tokenizer DIR)")
    log(f"wrote {out_dir}")
    return out_dir
