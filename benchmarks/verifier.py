"""Verifier throughput: 16,000 GSM8K-style responses (a few hundred words each, half right).

Builds 1,000 problems x 16 samples from the GSM8K test references (synthetic integers when the
shared data are absent), each a ~300-word worked solution ending in a boxed answer written in one
of the forms models use (plain, thousands separators, dollars, units); every wrong answer differs
from the problem's other answers. Times the worker pool on the whole batch, and one in-process
serial pass over a slice as the same-run baseline.

Run: .venv/bin/python benchmarks/verifier.py [--workers N] [--responses N]
Last line: ``responses/s: <number>``.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from clipo_nemo.verifiers import VerifierPool, VerifyRequest, reason_counts, run_verifier

GSM8K_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clipo" / "test" / "gsm8k.parquet"
WORDS = "then we add the remaining apples to the total so each friend gets the same share of the cost".split()


def reference_answers(count: int, rng: random.Random) -> list[str]:
    if GSM8K_TEST.exists():
        import pandas as pd

        golds = [row["ground_truth"] for row in pd.read_parquet(GSM8K_TEST)["reward_model"]]
        return [golds[i % len(golds)] for i in range(count)]
    return [str(rng.randint(1, 5000)) for _ in range(count)]


def written_answer(value: int, rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return str(value)
    if form == 1:
        return f"{value:,}".replace(",", "{,}")
    if form == 2:
        return f"\\${value}"
    return f"{value} \\text{{ dollars}}"


def response(gold: str, sample: int, rng: random.Random) -> str:
    """Even samples are right; odd ones are wrong, each with its own value, so no two wrong answers
    to one problem are the same string (the verifier caches repeated answers)."""
    exact = int(float(gold.replace(",", "")))
    value = exact if sample % 2 == 0 else exact + sample
    steps = []
    for _ in range(12):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        steps.append(" ".join(rng.choices(WORDS, k=20)) + f": ${a} \\times {b} = {a * b}$.")
    return "Let's think step by step. " + " ".join(steps) + f" So the answer is $\\boxed{{{written_answer(value, rng)}}}$."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0, help="0 = one per CPU")
    parser.add_argument("--responses", type=int, default=16000)
    parser.add_argument("--baseline", type=int, default=1000, help="responses in the serial baseline")
    args = parser.parse_args()
    rng = random.Random(0)
    golds = reference_answers(args.responses // 16 + 1, rng)
    requests = [
        VerifyRequest("math", response(golds[i // 16], i % 16, rng), golds[i // 16]) for i in range(args.responses)
    ]
    words = sum(len(request.response.split()) for request in requests) / len(requests)
    print(f"responses: {len(requests)}, mean words: {words:.0f}")

    start = time.perf_counter()
    serial = [run_verifier(request) for request in requests[: args.baseline]]
    serial_rate = len(serial) / (time.perf_counter() - start)
    print(f"serial in-process baseline: {serial_rate:.0f} responses/s over {len(serial)}")

    with VerifierPool(num_workers=args.workers) as pool:
        pool.verify(requests[:64])  # workers up and warm: startup is paid once per training run
        start = time.perf_counter()
        results = pool.verify(requests)
        elapsed = time.perf_counter() - start
    counts = reason_counts(results)
    correct = sum(result.correct for result in results)
    print(f"pool ({pool.num_workers} workers): {elapsed:.2f} s, reasons {counts}, correct {correct}/{len(results)}")
    expected = sum(i % 2 == 0 for i in range(len(requests)))
    if correct != expected or results[: len(serial)] != serial:
        raise SystemExit(f"verification disagrees: {correct} correct, expected {expected} (or serial mismatch)")
    rate = len(results) / elapsed
    print(f"pool / serial: {rate / serial_rate:.2f}x")
    print(f"responses/s: {rate:.0f}")


if __name__ == "__main__":
    main()
