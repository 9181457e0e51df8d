"""Benchmark evaluation: Pass@1 per benchmark and the paper's aggregate columns (SPEC, Evaluation).

Pass@1 of a problem is the mean correctness of its ``k`` samples; a benchmark's Pass@1 is the mean
over its problems, in percent. The paper's columns:

- Track I: GSM8K, SYM, P1, P2 (M-Avg = their mean), cQA, tQA, thrmQA, MMLU (G-Avg), Avg = mean of 8.
- Track II: Math, Math_S, Math_H (M-Avg), AMC, AIME, AIME25 (C-Avg), Avg = mean of 6.

An aggregate is reported only when every benchmark it averages was scored. Per-problem results are
written as JSONL, so a report can be recomputed from them without generating again. The trainer's
periodic validation calls :func:`evaluate` with its own ``generate_fn``; ``tools/evaluate.py`` calls
the same functions.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from clipo_nemo.data import Problem, Prompt, RowSchema, build_prompts, load_problems
from clipo_nemo.data.hf_datasets import is_hub_spec, is_saved_dataset
from clipo_nemo.verifiers import VerifierPool, VerifyRequest

# generate_fn(prompts, k, temperature, top_p) -> k responses for each prompt, in prompt order.
GenerateFn = Callable[[List[str], int, float, float], List[List[str]]]

# Per track: the paper's column name of each benchmark (file stem), in the paper's order, and the
# aggregates as (name, benchmarks averaged).
TRACK_COLUMNS: Dict[str, List[Tuple[str, str]]] = {
    "track_I": [
        ("gsm8k", "GSM8K"), ("gsm_symbolic", "SYM"), ("gsm_p1", "P1"), ("gsm_p2", "P2"),
        ("commonsense_qa", "cQA"), ("truthfulqa", "tQA"), ("theoremqa", "thrmQA"), ("mmlu2k", "MMLU"),
    ],
    "track_II": [
        ("math", "Math"), ("math_perturb_simple", "Math_S"), ("math_perturb_hard", "Math_H"),
        ("amc", "AMC"), ("aime", "AIME"), ("aime2025", "AIME25"),
    ],
}
TRACK_AGGREGATES: Dict[str, List[Tuple[str, List[str]]]] = {
    "track_I": [
        ("M-Avg", ["gsm8k", "gsm_symbolic", "gsm_p1", "gsm_p2"]),
        ("G-Avg", ["commonsense_qa", "truthfulqa", "theoremqa", "mmlu2k"]),
        ("Avg", [name for name, _ in TRACK_COLUMNS["track_I"]]),
    ],
    "track_II": [
        ("M-Avg", ["math", "math_perturb_simple", "math_perturb_hard"]),
        ("C-Avg", ["amc", "aime", "aime2025"]),
        ("Avg", [name for name, _ in TRACK_COLUMNS["track_II"]]),
    ],
}


@dataclass
class ProblemResult:
    """The verdicts on one problem's samples."""

    benchmark: str  # the file stem, e.g. "gsm8k"
    index: int  # the problem's row in that file
    reference: str
    correct: List[bool]  # one per sample
    reasons: List[str]  # the verifier's reason code per sample
    extracted: List[Optional[str]]  # the boxed answer per sample

    @property
    def pass_at_1(self) -> float:
        return sum(self.correct) / len(self.correct)


def load_benchmarks(data_dir: str | Path, names: Sequence[str], schema: RowSchema = RowSchema()) -> Dict[str, List[Problem]]:
    """The problems of ``data_dir/<name>.parquet`` (or ``.jsonl``, or ``data_dir/<name>``, a ``save_to_disk``
    dataset directory) for each benchmark name; a name ``hf:NAME[:CONFIG]:SPLIT`` is that hub dataset."""
    benchmarks = {}
    for name in names:
        candidates = [Path(data_dir) / f"{name}{suffix}" for suffix in (".parquet", ".jsonl")]
        path = name if is_hub_spec(name) else next(
            (candidate for candidate in candidates + [Path(data_dir) / name]
             if candidate.is_file() or is_saved_dataset(candidate)), None)
        if path is None:
            raise FileNotFoundError(f"benchmark {name!r}: neither {candidates[0]} nor {candidates[1]} nor a saved dataset "
                                    f"{Path(data_dir) / name} exists (tools/evaluate.py: --data-dir names the folder, "
                                    "--benchmarks the file stems)")
        benchmarks[name] = load_problems([path], schema).problems
    return benchmarks


def load_prompt_sets(evaluation_config: Any, data_config: Any, tokenizer: Any,
                     keep_unreadable: bool = False) -> Dict[str, List[Prompt]]:
    """The rendered prompts of every benchmark in ``evaluation_config`` (an ``EvaluationConfig``),
    with the row schema and prompt-length rule of ``data_config`` (a ``DataConfig``). A benchmark none
    of whose prompts fits ``data.max_prompt_length`` is a ValueError naming it, or, with
    ``keep_unreadable``, an empty list the caller reports (``tools/evaluate.py`` leaves it out)."""
    schema = RowSchema(
        prompt_key=data_config.prompt_key,
        answer_key=data_config.answer_key,
        data_source_key=data_config.data_source_key,
        multiple_choice_sources=tuple(data_config.multiple_choice_sources),
    )
    benchmarks = load_benchmarks(evaluation_config.data_dir, evaluation_config.benchmarks, schema)
    prompt_sets = {}
    for name, problems in benchmarks.items():
        prompt_sets[name] = build_prompts(problems, tokenizer, data_config.max_prompt_length, data_config.truncation).prompts
        if problems and not prompt_sets[name] and not keep_unreadable:
            raise ValueError(f"benchmark {name!r}: all {len(problems)} prompts are longer than data.max_prompt_length="
                             f"{data_config.max_prompt_length} tokens, so none could be scored; raise "
                             "data.max_prompt_length (within model.max_position_embeddings) or leave the benchmark out")
    return prompt_sets


def score(
    benchmarks: Dict[str, List[Problem]], responses: Dict[Tuple[str, int], List[str]], pool: VerifierPool
) -> List[ProblemResult]:
    """Verify every problem's responses (``responses[(benchmark, row)]`` = its samples) in one batch."""
    problems_by_key = {(name, problem.row): problem for name, problems in benchmarks.items() for problem in problems}
    keys = sorted(responses, key=lambda key: (list(benchmarks).index(key[0]), key[1]))
    requests = []
    for key in keys:
        if key not in problems_by_key:
            raise KeyError(f"responses for {key[0]!r} row {key[1]}, which is not a loaded problem")
        problem = problems_by_key[key]
        requests += [VerifyRequest(problem.verifier, text, problem.reference, problem.choices) for text in responses[key]]
    verdicts = iter(pool.verify(requests))
    results = []
    for benchmark, row in keys:
        samples = [next(verdicts) for _ in responses[(benchmark, row)]]
        results.append(
            ProblemResult(
                benchmark,
                row,
                problems_by_key[(benchmark, row)].reference,
                [verdict.correct for verdict in samples],
                [verdict.reason for verdict in samples],
                [verdict.extracted for verdict in samples],
            )
        )
    return results


def evaluate(
    generate_fn: GenerateFn,
    prompt_sets: Dict[str, List[Prompt]],
    pool: VerifierPool,
    k: int,
    temperature: float = 0.6,
    top_p: float = 0.95,
) -> List[ProblemResult]:
    """Generate ``k`` samples for every prompt of every benchmark, then verify them."""
    responses: Dict[Tuple[str, int], List[str]] = {}
    for name, prompts in prompt_sets.items():
        generated = generate_fn([prompt.text for prompt in prompts], k, temperature, top_p)
        if len(generated) != len(prompts) or any(len(samples) != k for samples in generated):
            raise ValueError(
                f"generate_fn returned {len(generated)} lists for {len(prompts)} prompts of {name!r}, "
                f"expected {k} samples each"
            )
        for prompt, samples in zip(prompts, generated):
            responses[(name, prompt.problem.row)] = list(samples)
    benchmarks = {name: [prompt.problem for prompt in prompts] for name, prompts in prompt_sets.items()}
    return score(benchmarks, responses, pool)


def summarize(results: Sequence[ProblemResult]) -> Dict[str, Dict]:
    """``{"benchmarks": {name: {"pass@1": %, "n": problems, "samples": responses}},
    "aggregates": {track: {column: %}}}``; a track appears once one of its aggregates is complete."""
    per_benchmark: Dict[str, List[ProblemResult]] = {}
    for result in results:
        per_benchmark.setdefault(result.benchmark, []).append(result)
    benchmarks = {
        name: {
            "pass@1": 100.0 * sum(result.pass_at_1 for result in problems) / len(problems),
            "n": len(problems),
            "samples": sum(len(result.correct) for result in problems),
        }
        for name, problems in per_benchmark.items()
    }
    aggregates: Dict[str, Dict[str, float]] = {}
    for track, columns in TRACK_AGGREGATES.items():
        for column, members in columns:
            if all(member in benchmarks for member in members):
                aggregates.setdefault(track, {})[column] = sum(benchmarks[m]["pass@1"] for m in members) / len(members)
    return {"benchmarks": benchmarks, "aggregates": aggregates}


def metrics(summary: Dict[str, Dict], prefix: str = "val") -> Dict[str, float]:
    """Flat scalars for the trainer's logger: ``val/<benchmark>/pass@1``, ``val/<track>/<column>`` and
    ``val/pass@1_mean`` over the benchmarks (left out when no benchmark was scored, rather than 0)."""
    flat = {f"{prefix}/{name}/pass@1": entry["pass@1"] for name, entry in summary["benchmarks"].items()}
    if flat:
        flat[f"{prefix}/pass@1_mean"] = sum(flat.values()) / len(flat)
    for track, columns in summary["aggregates"].items():
        flat.update({f"{prefix}/{track}/{column}": value for column, value in columns.items()})
    return flat


def markdown_table(summary: Dict[str, Dict]) -> str:
    """The paper's tables: one per track with its columns and aggregates; other benchmarks apart."""
    scores = {name: entry["pass@1"] for name, entry in summary["benchmarks"].items()}
    sections = []
    for track, columns in TRACK_COLUMNS.items():
        if not any(name in scores for name, _ in columns):
            continue
        aggregates = summary["aggregates"].get(track, {})
        names = [label for _, label in columns] + [column for column, _ in TRACK_AGGREGATES[track]]
        values = [scores.get(name) for name, _ in columns] + [aggregates.get(c) for c, _ in TRACK_AGGREGATES[track]]
        sections.append(_table(f"{track.replace('_', ' ').title()} (Pass@1, %)", names, values))
    tracked = {name for columns in TRACK_COLUMNS.values() for name, _ in columns}
    others = [name for name in scores if name not in tracked]
    if others:
        sections.append(_table("Other benchmarks (Pass@1, %)", others, [scores[name] for name in others]))
    return "\n".join(sections)


def _table(title: str, names: List[str], values: List[Optional[float]]) -> str:
    cells = ["-" if value is None else f"{value:.2f}" for value in values]
    return f"### {title}\n\n| {' | '.join(names)} |\n|{'---|' * len(names)}\n| {' | '.join(cells)} |\n"


REPORT_FILES = ("per_problem.jsonl", "results.json", "results.md", "results.csv")


def existing_reports(out_dir: str | Path) -> List[str]:
    """The report files :func:`write_report` would replace in ``out_dir``."""
    return [name for name in REPORT_FILES if (Path(out_dir) / name).exists()]


def write_report(results: Sequence[ProblemResult], out_dir: str | Path, overwrite: bool = False) -> Dict[str, Dict]:
    """Write ``per_problem.jsonl``, ``results.json``, ``results.md`` and ``results.csv``; return the summary.
    An earlier report in ``out_dir`` is a FileExistsError unless ``overwrite``."""
    out_dir = Path(out_dir)
    if existing_reports(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a report ({', '.join(existing_reports(out_dir))}): choose "
                              "another output folder, or overwrite it explicitly")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "per_problem.jsonl", "w", encoding="utf-8") as per_problem:
        for result in results:
            per_problem.write(json.dumps(asdict(result)) + "\n")
    summary = summarize(results)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(summary))
    with open(out_dir / "results.csv", "w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(["kind", "track", "name", "pass@1", "n"])
        for name, entry in summary["benchmarks"].items():
            writer.writerow(["benchmark", "", name, f"{entry['pass@1']:.4f}", entry["n"]])
        for track, columns in summary["aggregates"].items():
            for column, value in columns.items():
                writer.writerow(["aggregate", track, column, f"{value:.4f}", ""])
    return summary


def read_per_problem(path: str | Path) -> List[ProblemResult]:
    """Per-problem results written by :func:`write_report`, to recompute a report."""
    results = []
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                result = ProblemResult(**json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
                raise ValueError(f"{path} line {number}: not a per-problem result ({exc})") from None
            if not result.correct or len(result.correct) != len(result.reasons):
                raise ValueError(f"{path} line {number}: needs one verdict per sample and at least one sample")
            results.append(result)
    return results


def _response_record(line: bytes) -> Dict[str, Any]:
    """One responses-file line as its record; ValueError says what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc})") from None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("benchmark"), str)
        and isinstance(record.get("index"), int)
        and not isinstance(record.get("index"), bool)
        and isinstance(record.get("response"), str)
    ):
        raise ValueError("needs string 'benchmark', integer 'index', string 'response'")
    return record


def read_responses(path: str | Path, skipped: Optional[List[str]] = None) -> Dict[Tuple[str, int], List[str]]:
    """``{"benchmark": str, "index": int, "response": str}`` lines grouped per problem, in file order
    (several lines for one problem are its samples). A bad line (not UTF-8, not JSON, another shape)
    is a ValueError naming the file and line, or, when a ``skipped`` list is given, appended to it
    (``"FILE line N: why"``) and left out. A file without a single response is a ValueError."""
    responses: Dict[Tuple[str, int], List[str]] = {}
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = _response_record(line)
            except ValueError as exc:
                if skipped is None:
                    raise ValueError(f"{path} line {number}: {exc}") from None
                skipped.append(f"{path} line {number}: {exc}")
                continue
            responses.setdefault((record["benchmark"], record["index"]), []).append(record["response"])
    if not responses:
        raise ValueError(f"{path} holds no responses to score" + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return responses
