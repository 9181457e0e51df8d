"""The embedded default's synthetic verifiable task: small arithmetic, answers in ``\\boxed{}``.

Rows have exactly the schema of the paper's Parquet files (``data_source``, ``prompt``, ``ability``,
``reward_model``, ``extra_info``), so the same loader, verifier and trainer run on them.

Why the task looks like this (it must be learnable *from scratch by RL* in minutes on a CPU):
a randomly initialised model samples nearly uniformly over its vocabulary, and the verifier pays only
for a correct answer inside ``\\boxed{}``. If the answer took several tokens (``\\boxed{``, digits,
``}``), the chance of a random hit would be about ``V**-3`` and RL would never see a reward. So the
task is paired with :mod:`clipo_nemo.data.tiny_tokenizer`, whose vocabulary holds every possible
answer as one word (``\\boxed{12}``): correctness is decided by a single sampled token out of
``2 * max_operand + 1`` answers, a random policy is right about ``1 / vocab`` of the time per sampled
token (a few percent of responses in total), and every correct sample is a clean policy-gradient
signal. ``max_operand`` sets the difficulty (answers lie in ``0 .. 2 * max_operand``); subtraction
keeps ``a >= b`` so answers are never negative.

Train and validation hold disjoint problems: all distinct problems are enumerated, shuffled with the
seed, and a fraction goes to validation. The same arguments always give the same rows.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

TINY_DATA_SOURCE = "tiny/arith"
# Short on purpose: every prompt token costs a tiny model attention capacity and CPU time.
TINY_INSTRUCTION = "Answer in \\boxed{}."
TINY_OPERATORS = ("+", "-")

Row = Dict[str, object]


def tiny_answer_range(max_operand: int) -> range:
    """All answers the task can have: ``a + b`` and ``a - b`` (``a >= b``) with operands in ``0..max_operand``."""
    return range(0, 2 * max_operand + 1)


def _check_args(max_operand: int, operators: Sequence[str], val_fraction: float) -> None:
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    unknown = [op for op in operators if op not in TINY_OPERATORS]
    if not operators or unknown:
        raise ValueError(f"operators must be a non-empty subset of {TINY_OPERATORS}, got {tuple(operators)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")


def _all_problems(max_operand: int, operators: Sequence[str]) -> List[Tuple[int, str, int, int]]:
    """Every distinct problem as ``(a, op, b, answer)``, in a fixed order."""
    problems = []
    for op in operators:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "+":
                    problems.append((a, op, b, a + b))
                elif a >= b:
                    problems.append((a, op, b, a - b))
    return problems


def _row(a: int, op: str, b: int, answer: int, index: int, split: str) -> Row:
    return {
        "data_source": TINY_DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"What is {a} {op} {b}? {TINY_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"ground_truth": str(answer), "style": "rule"},
        "extra_info": {"index": index, "split": split},
    }


def make_tiny_arith_splits(
    max_operand: int = 4,
    operators: Sequence[str] = TINY_OPERATORS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dict[str, List[Row]]:
    """Generate the task's ``{"train": rows, "val": rows}`` (disjoint problems, deterministic in the seed).

    Each row is one problem in the paper's Parquet schema; ``extra_info.index`` counts rows within
    their split. At least one problem lands in each split.
    """
    _check_args(max_operand, operators, val_fraction)
    problems = _all_problems(max_operand, operators)
    random.Random(seed).shuffle(problems)
    n_val = min(max(1, round(len(problems) * val_fraction)), len(problems) - 1)
    chunks = {"val": problems[:n_val], "train": problems[n_val:]}
    return {
        split: [_row(a, op, b, ans, i, split) for i, (a, op, b, ans) in enumerate(chunk)]
        for split, chunk in (("train", chunks["train"]), ("val", chunks["val"]))
    }


def _paper_parquet_schema():
    """The Arrow schema of the paper's files (column order and struct field order included)."""
    import pyarrow as pa

    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ])


def write_tiny_arith_parquet(out_dir: str | Path, **task_args) -> Dict[str, Path]:
    """Write :func:`make_tiny_arith_splits` rows to ``out_dir/{train,val}.parquet``; returns the paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in make_tiny_arith_splits(**task_args).items():
        paths[split] = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=_paper_parquet_schema()), paths[split])
    return paths
