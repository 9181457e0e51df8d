"""Peak memory of the log-prob + entropy pass (forward and backward): fused chunked vs the previous one.

The pass takes the output layer's input (hidden [N, H]) and weight [V, H] and returns per-position
log-probs and entropy, then backpropagates an upstream gradient into hidden and weight:
- new: ``clipo_nemo.models.logprobs.fused_logprobs_and_entropy`` (chunks of ``--chunk-size``
  positions, default ``actor.logprob_chunk_size``);
- previous: logits = hidden @ W.T, then the implementation this replaced (kept as the test oracle
  ``previous_sharded_logprobs_and_entropy`` in tests/test_logprobs_chunked.py).
bf16 hidden and weight like the real run (logits computed in bf16, then float32), one TP shard
holding the whole vocabulary, every position a response position (micro-batch 1).

Each variant runs in a fresh child process; it allocates its inputs, resets the kernel's peak-RSS
mark (/proc/self/clear_refs), runs forward + backward and reports peak RSS minus the RSS right after
the inputs were allocated. Both variants include the weight gradient (one [V, H] bf16 tensor). The
children also report checksums of the outputs and gradients, compared here.

The previous pass peaks at about 5 float32 [N, V] copies plus the weight gradient (~14 GiB at the
default 4,608 tokens). When that does not fit in the available memory (with a margin), it is
measured at two smaller token counts and extrapolated linearly in N (its memory is an
N-independent part plus a per-token part); the output then says so. The children volunteer to the
kernel's out-of-memory killer first (oom_score_adj). Default sizes are the issue's (V = 152,064,
H = 3,584, 4,608 tokens): about 7 minutes on 2 cores, mostly the [N, H] x [H, V] matmuls;
``--tokens 1152`` runs in about 2.
Last line: ``logprob_peak_ratio: <previous/new>x``.
Usage: python benchmarks/logprob_memory.py [--tokens 4608 --vocab 152064 --hidden 3584 --chunk-size 1024]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
PREVIOUS_FLOAT32_COPIES = 5  # the previous pass's peak in [N, V] float32 copies (measured: 4.9)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _previous_function():
    spec = importlib.util.spec_from_file_location("oracle", REPO / "tests" / "test_logprobs_chunked.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.previous_sharded_logprobs_and_entropy


def run_child(variant: str, tokens: int, vocab: int, hidden_size: int, chunk_size: int) -> dict:
    """One variant in this (fresh) process: peak RSS growth of forward + backward, and checksums."""
    import gc

    import torch

    from clipo_nemo.models.logprobs import VocabShard, fused_logprobs_and_entropy

    Path("/proc/self/oom_score_adj").write_text("1000")  # if memory runs out, this process goes first
    previous = _previous_function()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(torch.bfloat16).requires_grad_(True)
    weight = (0.02 * torch.randn(vocab, hidden_size, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    grad_logprobs, grad_entropy = torch.randn(tokens, generator=gen), torch.randn(tokens, generator=gen)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base_kib = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    if variant == "new":
        logprobs, entropy = fused_logprobs_and_entropy(
            hidden, weight, labels, VocabShard(vocab_start=0, vocab_size=vocab), chunk_size=chunk_size
        )
    else:
        logprobs, entropy = previous(hidden @ weight.T, labels, vocab_start=0, vocab_size=vocab)
    (grad_logprobs @ logprobs + grad_entropy @ entropy).backward()
    seconds = time.perf_counter() - start
    peak_kib = _proc_status_kib("VmHWM")
    return {
        "extra_bytes": (peak_kib - base_kib) * 1024, "seconds": seconds,
        "checksums": [logprobs.sum().item(), entropy.sum().item(),
                      hidden.grad.float().norm().item(), weight.grad.float().norm().item()],
    }


def measure(variant: str, tokens: int, args) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {variant:8s} tokens={tokens:5d}  peak extra {result['extra_bytes'] / GIB:7.3f} GiB  "
          f"({result['seconds']:.0f} s)", flush=True)
    return result


def _check_same(a: dict, b: dict, tokens: int) -> None:
    names = ("sum of log-probs", "sum of entropy", "|d hidden|", "|d weight|")
    for name, x, y in zip(names, a["checksums"], b["checksums"]):
        if abs(x - y) > 2e-3 * max(abs(x), abs(y), 1.0):
            raise SystemExit(f"at {tokens} tokens the two passes disagree on {name}: {x} vs {y}")


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def main() -> None:
    from clipo_nemo.config import ActorConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--chunk-size", type=int, default=ActorConfig().logprob_chunk_size)
    parser.add_argument("--child", choices=("new", "previous"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.tokens, args.vocab, args.hidden, args.chunk_size)))
        return

    print(f"vocabulary {args.vocab}, hidden {args.hidden}, {args.tokens} tokens, chunk {args.chunk_size}, "
          "bf16 weight and hidden, CPU peak RSS growth per fresh process")
    new = measure("new", args.tokens, args)
    previous_need = PREVIOUS_FLOAT32_COPIES * 4 * args.tokens * args.vocab + 2 * args.vocab * args.hidden
    if previous_need < 0.8 * _available_bytes():
        previous = measure("previous", args.tokens, args)
        _check_same(new, previous, args.tokens)
        previous_bytes = previous["extra_bytes"]
        how = "measured"
    else:
        # The largest token counts n and n/2 at which the previous pass fits, then a line in N.
        small = args.tokens
        while PREVIOUS_FLOAT32_COPIES * 4 * small * args.vocab + 2 * args.vocab * args.hidden >= 0.8 * _available_bytes():
            small //= 2
        (n1, m1), (n2, m2) = [(tokens, measure("previous", tokens, args)["extra_bytes"]) for tokens in (small // 2, small)]
        per_token = (m2 - m1) / (n2 - n1)
        previous_bytes = m2 + per_token * (args.tokens - n2)
        how = (f"extrapolated: not enough free memory to run it at {args.tokens} tokens; measured at {n1} and "
               f"{n2} tokens, {per_token / 1024**2:.1f} MiB per token")
    print(f"previous pass at {args.tokens} tokens: {previous_bytes / GIB:.2f} GiB ({how})")
    print(f"fused chunked pass at {args.tokens} tokens: {new['extra_bytes'] / GIB:.2f} GiB (measured)")
    print(f"logprob_peak_ratio: {previous_bytes / new['extra_bytes']:.1f}x")


if __name__ == "__main__":
    main()
