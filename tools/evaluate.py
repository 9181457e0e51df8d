"""Score benchmarks and write the paper's tables (Markdown, JSON, CSV) plus per-problem results.

Modes:
  --responses FILE.jsonl --data-dir DIR --out OUT
      Score responses from any generator. Each line is {"benchmark": "<file stem>", "index": <row>,
      "response": "..."}; several lines for one problem are its k samples. Writes OUT/results.json
      ({"benchmarks": {name: {"pass@1": %, "n": problems}}, "aggregates": {track: {column: %}}}),
      OUT/results.md, OUT/results.csv and OUT/per_problem.jsonl.
  --per-problem OUT/per_problem.jsonl --out OUT2
      Recompute the report from saved per-problem results, without generating or verifying again.
  --checkpoint PATH | --hf-model DIR
      Generate k samples per problem with the policy (temperature 0.6, top-p 0.95; track I k=1,
      track II k=16). Needs the rollout engine, which is not in the package yet: use --responses.

Examples:
  python tools/evaluate.py --responses responses.jsonl --data-dir ../shared/data/clipo/test --out outputs/eval
  python tools/evaluate.py --per-problem outputs/eval/per_problem.jsonl --out outputs/eval2
"""
from __future__ import annotations

import argparse
import sys

from clipo_nemo.trainer.evaluation import load_benchmarks, markdown_table, read_per_problem, read_responses, score, write_report
from clipo_nemo.verifiers import VerifierPool


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--responses", help="JSONL of {benchmark, index, response} lines to score")
    source.add_argument("--per-problem", help="per_problem.jsonl of an earlier run, to recompute its report")
    source.add_argument("--checkpoint", help="policy checkpoint to generate with (needs the rollout engine)")
    source.add_argument("--hf-model", help="Hugging Face model directory to generate with (needs the rollout engine)")
    parser.add_argument("--data-dir", default="../shared/data/clipo/test", help="folder with <benchmark>.parquet")
    parser.add_argument("--benchmarks", nargs="*", help="benchmarks to generate for (generation modes)")
    parser.add_argument("--k", type=int, default=1, help="samples per problem (track I: 1, track II: 16)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="hard limit per verification")
    parser.add_argument("--workers", type=int, default=0, help="verifier processes (0 = one per CPU)")
    parser.add_argument("--out", required=True, help="output folder for the reports")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.checkpoint or args.hf_model:
        raise SystemExit(
            "evaluate.py: generating from a checkpoint or HF model needs the rollout engine "
            "(clipo_nemo.rollout), which is not available yet. Generate the responses with any engine and "
            "score them with --responses FILE.jsonl --data-dir DIR --out DIR."
        )
    try:
        if args.per_problem:
            results = read_per_problem(args.per_problem)
        else:
            responses = read_responses(args.responses)
            names = list(dict.fromkeys(benchmark for benchmark, _ in responses))
            benchmarks = load_benchmarks(args.data_dir, names)
            with VerifierPool(num_workers=args.workers, timeout_s=args.timeout_s) as pool:
                results = score(benchmarks, responses, pool)
    except (ValueError, KeyError, FileNotFoundError) as exc:  # bad input: say what, without a traceback
        raise SystemExit(f"evaluate.py: {exc}") from None
    summary = write_report(results, args.out)
    print(markdown_table(summary))
    print(f"reports written to {args.out}/ (results.json, results.md, results.csv, per_problem.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
