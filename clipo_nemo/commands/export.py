"""Export a clipo-nemo checkpoint as a Hugging Face model directory (plus the contrastive head).

    python tools/export_to_hf.py RUN_DIR --out DIR
    python tools/export_to_hf.py RUN_DIR/checkpoints/step_200 --out DIR --shard-size 2GB --dtype bfloat16
    python tools/export_to_hf.py /ckpt/sft --out DIR      # a converted checkpoint (e.g. from NeMo)

CKPT is a run directory (its latest checkpoint) or one of its checkpoints/step_N directories, saved at
any TP/PP layout: the model description comes from the run's config.yaml; the architecture, the
original config.json fields and generation_config.json from the run's trainer.init_from when it is a
converted checkpoint (else QKV bias means Qwen2ForCausalLM and no bias LlamaForCausalLM, or give
--architecture). CKPT may also be a checkpoint written by tools/convert_hf_to_megatron.py (from HF or
NeMo): described by itself (clipo_model.json, its HF configs and tokenizer), no head; a converted HF
model comes back bit-identical. Writes safetensors shards with model.safetensors.index.json, config.json,
generation_config.json, the tokenizer, and clipo_head.safetensors + clipo_head.json (load the head back
with clipo_nemo.conversion.hf_writer.load_head_file). Streams one layer at a time; the output appears
only when complete. Runs in one process on CPU.
"""
from __future__ import annotations

import argparse
import sys

from clipo_nemo.console import add_log_level_argument, setup_console
from clipo_nemo.conversion.convert import exit_on_stop_signals
from clipo_nemo.conversion.hf_writer import export_to_hf, parse_size
from clipo_nemo.conversion.mapping import SUPPORTED_ARCHITECTURES, ConversionError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="trainer run directory, one of its checkpoints/step_N, or a converted checkpoint")
    parser.add_argument("--out", required=True, help="new Hugging Face directory (must not exist)")
    parser.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--architecture", choices=sorted(SUPPORTED_ARCHITECTURES),
                        help="HF architecture (default: recorded by the converted init_from checkpoint, else inferred)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: the run's model.params_dtype)")
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    exit_on_stop_signals()  # a SIGTERM mid-export leaves no hidden .tmp-<out> folder
    setup_console(args.log_level)
    try:
        index = export_to_hf(args.checkpoint, args.out, parse_size(args.shard_size), args.architecture, args.dtype)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shards = len(set(index["weight_map"].values()))
    print(f"wrote {args.out}: {len(index['weight_map'])} tensors, {index['metadata']['total_size'] / 1e6:.1f} MB "
          f"in {shards} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
