"""Convert a Hugging Face (or NeMo) Qwen2/Qwen2.5 or Llama 3 model into a clipo-nemo checkpoint.

The checkpoint (``trainer.init_from=CKPT``) loads at any TP/PP layout and stores the model
description and the tokenizer beside the weights. Everything is checked before anything is written;
an interrupted conversion leaves no output directory. Tensors stream one group at a time, so peak
memory is about one HF shard's pages plus one layer plus one output shard (``--shard-size-mb``).

  python tools/convert_hf_to_megatron.py --hf /models/Qwen2.5-7B-Instruct --out /ckpt/qwen2.5-7b --tp 4 --verify
  python tools/convert_hf_to_megatron.py --nemo /nemo/sft_run/checkpoints/step_1000 --out /ckpt/sft   # NeMo 2
  python tools/convert_hf_to_megatron.py --nemo /nemo/llama3_sft.nemo --out /ckpt/sft                 # NeMo 1

``--nemo`` reads a NeMo 2 checkpoint directory or a NeMo 1 ``.nemo`` archive (see
``clipo_nemo/conversion/nemo.py`` for the layouts); the tokenizer comes from the checkpoint
(``context/nemo_tokenizer``, or a NeMo 1 Hugging Face tokenizer path) unless ``--tokenizer`` is given.

``--verify`` then loads the new checkpoint into megatron-core and the original into ``transformers``
(fp32, CPU, one process, one model in memory at a time), compares logits and 16 greedy tokens on a
few prompts, and prints as its last two lines ``max_abs_logit_diff: <x>`` and ``greedy_match: <k>/<n>``;
the exit status is non-zero above 1e-3 or on any greedy mismatch.
"""
from __future__ import annotations

import argparse
import sys

from clipo_nemo.console import add_log_level_argument, setup_console
from clipo_nemo.conversion.convert import DTYPE_CHOICES, convert_hf, exit_on_stop_signals
from clipo_nemo.conversion.mapping import ConversionError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    source.add_argument("--nemo", help="NeMo 2 checkpoint directory (context/, weights/) or NeMo 1 .nemo archive")
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="source",
                        help="stored dtype and the description's params_dtype (source = the HF tensors' dtype)")
    parser.add_argument("--tp", type=int, default=1, help="check that the model can run at this TP size")
    parser.add_argument("--pp", type=int, default=1, help="check that the model can run at this PP size")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --hf, or the NeMo checkpoint's)")
    parser.add_argument("--shard-size-mb", type=float, default=2048, help="largest output safetensors shard")
    parser.add_argument("--verify", action="store_true", help="compare the result with transformers afterwards")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_stop_signals()  # a SIGTERM mid-conversion leaves no hidden .tmp-<out> folder
    setup_console(args.log_level)
    if args.nemo and args.verify:
        print("convert_hf_to_megatron.py: --verify compares against transformers and needs --hf", file=sys.stderr)
        return 2
    convert = convert_hf
    if args.nemo:
        from clipo_nemo.conversion.nemo import convert_nemo as convert
    try:
        convert(args.hf or args.nemo, args.out, dtype=args.dtype, tensor_parallel_size=args.tp,
                pipeline_parallel_size=args.pp, tokenizer_src=args.tokenizer,
                shard_size_bytes=int(args.shard_size_mb * 2**20))
    except ConversionError as err:
        print(f"convert_hf_to_megatron.py: {err}", file=sys.stderr)
        return 2
    if not args.verify:
        return 0
    from clipo_nemo.conversion.verify import verify_conversion

    result = verify_conversion(args.out, args.hf)
    print(f"max_abs_logit_diff: {result.max_abs_logit_diff:.3g}")
    print(f"greedy_match: {result.greedy_matches}/{result.prompts}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
