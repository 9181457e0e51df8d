"""HF -> clipo-nemo conversion: wall time and peak memory against the model's size.

Builds a random Llama (or Qwen2) of a few hundred MB with ``transformers`` in a child process (bf16,
saved in several safetensors shards), then measures three child processes with ``os.wait4``; this
parent process never imports torch, so no child inherits a large RSS high-water mark through fork:

- ``imports``: importing what the converter imports (the fixed cost of Python, torch, transformers);
- ``streaming``: ``tools/convert_hf_to_megatron.py`` with output shards as large as the input's;
- ``whole-model``: the non-streaming way, every HF tensor loaded, mapped and saved at once.

Prints the model size, time, peak RSS of each, and as last line ``peak_rss_over_model: <x>`` (the
streaming converter's peak RSS divided by the model's size in bytes).

    python benchmarks/conversion.py [--arch llama|qwen2] [--layers 16] [--hidden 1024] [--shard-mb 100]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPORTS = (
    "import clipo_nemo.conversion.convert, clipo_nemo.parallel.state; from transformers import AutoTokenizer"
)
WHOLE_MODEL = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from clipo_nemo.conversion.mapping import model_config_from_hf, tensor_groups
hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
model = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
state = {}
for shard in sorted(hf_dir.glob("*.safetensors")):
    state.update(load_file(shard))
converted = {}
for group in tensor_groups(model):
    tensors = group.to_megatron([state.pop(name) for name in group.hf_names])
    converted.update({n: t.contiguous() for n, t in zip(group.megatron_names, tensors)})
save_file(converted, str(out))
"""


def build_hf_model(directory: Path, arch: str, layers: int, hidden: int, shard_mb: int) -> None:
    """A random bf16 model saved by ``transformers`` in shards of at most ``shard_mb`` MB, plus a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer

    common = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, vocab_size=32000,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(architectures=["LlamaForCausalLM"], **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(architectures=["Qwen2ForCausalLM"], **common))
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size=f"{shard_mb}MB")
    build_tiny_tokenizer().save_pretrained(directory)


def measure(command) -> tuple:
    """(wall seconds, peak RSS bytes) of one child process."""
    start = time.monotonic()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{command[:3]}... exited with {child.returncode}")
    return time.monotonic() - start, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-mb", type=int, default=100, help="HF input and converted output shard size")
    parser.add_argument("--build-only", help=argparse.SUPPRESS)  # the builder child: write the HF model here
    args = parser.parse_args()
    if args.build_only:
        build_hf_model(Path(args.build_only), args.arch, args.layers, args.hidden, args.shard_mb)
        return
    with tempfile.TemporaryDirectory(prefix="clipo_conv_bench_") as tmp:
        hf_dir = Path(tmp) / "hf"
        subprocess.run([sys.executable, __file__, "--build-only", str(hf_dir), "--arch", args.arch, "--layers",
                        str(args.layers), "--hidden", str(args.hidden), "--shard-mb", str(args.shard_mb)],
                       check=True, stderr=subprocess.DEVNULL)
        shards = sorted(hf_dir.glob("*.safetensors"))
        model_bytes = sum(p.stat().st_size for p in shards)
        python = sys.executable
        _, imports_rss = measure([python, "-c", IMPORTS])
        stream_s, stream_rss = measure([python, "tools/convert_hf_to_megatron.py", "--hf", str(hf_dir),
                                        "--out", str(Path(tmp) / "ckpt"), "--shard-size-mb", str(args.shard_mb)])
        whole_s, whole_rss = measure([python, "-c", WHOLE_MODEL, str(hf_dir), str(Path(tmp) / "whole.safetensors")])
    mb = 2**20
    print(f"model: {args.arch}, {args.layers} layers, hidden {args.hidden}, bf16, {model_bytes / mb:.0f} MB "
          f"in {len(shards)} HF shards of <= {args.shard_mb} MB")
    print(f"imports only:          peak RSS {imports_rss / mb:7.0f} MB")
    print(f"streaming converter:   peak RSS {stream_rss / mb:7.0f} MB, {stream_s:6.1f} s "
          f"({model_bytes / mb / stream_s:.0f} MB/s), above imports {(stream_rss - imports_rss) / model_bytes:.2f}x model")
    print(f"whole-model baseline:  peak RSS {whole_rss / mb:7.0f} MB, {whole_s:6.1f} s, "
          f"above imports {(whole_rss - imports_rss) / model_bytes:.2f}x model")
    print(f"streaming / whole-model peak RSS: {stream_rss / whole_rss:.2f}")
    print(f"peak_rss_over_model: {stream_rss / model_bytes:.2f}")


if __name__ == "__main__":
    main()
