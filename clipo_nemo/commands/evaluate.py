"""Score benchmarks and write the paper's tables (Markdown, JSON, CSV) plus per-problem results.

Modes:
  --responses FILE.jsonl --data-dir DIR --out OUT
      Score responses from any generator. Each line is {"benchmark": "<file stem>", "index": <row>,
      "response": "..."}; several lines for one problem are its k samples. Writes OUT/results.json
      ({"benchmarks": {name: {"pass@1": %, "n": problems}}, "aggregates": {track: {column: %}}}),
      OUT/results.md, OUT/results.csv and OUT/per_problem.jsonl.
  --per-problem OUT/per_problem.jsonl --out OUT2
      Recompute the report from saved per-problem results, without generating or verifying again.
  --checkpoint RUN_DIR[/checkpoints/step_N] [--benchmarks ...] [--k K] --out OUT
      Generate k samples per problem with a trained policy (the run's config.yaml rebuilds it; the
      latest checkpoint unless a step directory is given) through the rollout engine (--engine megatron|trtllm) at
      temperature 0.6, top-p 0.95 (track I k=1, track II k=16), then score as above. A converted
      checkpoint (tools/convert_hf_to_megatron.py) works too: its description rebuilds the model.
      Benchmarks: --benchmarks in --data-dir; by default, for a run trained on the generated task
      (task.enabled), the run's own held-out splits in RUN_DIR/data, else the run's evaluation.*; each
      a .parquet, .jsonl or datasets save_to_disk directory in the data dir, or hf:NAME[:CONFIG]:SPLIT.
  --hf-model DIR [--benchmarks ...] [--k K] --out OUT
      The same for a Hugging Face model directory (Qwen2/Qwen2.5, Llama 3): converted into a temporary
      checkpoint first (disk for one copy of the weights; convert once and use --checkpoint to reuse it).

Examples:
  python tools/evaluate.py --responses responses.jsonl --data-dir ../shared/data/clipo/test --out outputs/eval
  python tools/evaluate.py --per-problem outputs/eval/per_problem.jsonl --out outputs/eval2
  python tools/evaluate.py --checkpoint outputs/tiny/run --data-dir outputs/tiny/run/data --benchmarks heldout heldout_perturbed --k 4 --out ev
  python tools/evaluate.py --hf-model /models/Qwen2.5-7B-Instruct --benchmarks math amc --k 16 --out ev_base
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from clipo_nemo.config import EvaluationConfig
from clipo_nemo.console import add_log_level_argument, setup_console
from clipo_nemo.trainer.evaluation import (existing_reports, load_benchmarks, markdown_table, read_per_problem,
                                           read_responses, score, write_report)
from clipo_nemo.verifiers import VerifierPool


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--responses", help="JSONL of {benchmark, index, response} lines to score")
    source.add_argument("--per-problem", help="per_problem.jsonl of an earlier run, to recompute its report")
    source.add_argument("--checkpoint", help="run directory (or one of its checkpoints/step_N, or a converted "
                        "checkpoint) to generate with")
    source.add_argument("--hf-model", help="Hugging Face model directory to generate with (converted on the fly)")
    parser.add_argument("--data-dir", default=None, help="folder with <benchmark>.parquet (default: a generated-task "
                        "run's own <run>/data, else the run's evaluation.data_dir, else ../shared/data/clipo/test)")
    parser.add_argument("--benchmarks", nargs="*", help="benchmarks to generate for (generation modes; default: a "
                        "generated-task run's held-out splits, else the run's evaluation.benchmarks)")
    parser.add_argument("--k", type=int, default=1, help="samples per problem (track I: 1, track II: 16)")
    parser.add_argument("--temperature", type=float, default=EvaluationConfig.temperature)
    parser.add_argument("--top-p", type=float, default=EvaluationConfig.top_p)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="hard limit per verification")
    parser.add_argument("--workers", type=int, default=0, help="verifier processes (0 = one per CPU)")
    parser.add_argument("--engine", choices=("megatron", "trtllm"), default=None,
                        help="rollout engine to sample with (default: the run's rollout.engine; megatron for converted "
                             "checkpoints); trtllm needs TensorRT-LLM 1.2.x (the Dockerfile's trtllm image)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the run's evaluation.max_new_tokens (2048 for --hf-model)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="--responses: leave out lines that are not "
                        "UTF-8, not JSON or not a {benchmark, index, response} record (listed on stderr) instead of stopping")
    parser.add_argument("--out", required=True, help="output folder for the reports (not one holding a report)")
    parser.add_argument("--overwrite", action="store_true", help="replace the report already in --out")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an unexpected error")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_console(args.log_level)
    if existing_reports(args.out) and not args.overwrite:  # before any generation, not after it
        raise SystemExit(f"evaluate.py: {args.out} already holds a report ({', '.join(existing_reports(args.out))}): "
                         "choose another --out, or pass --overwrite to replace it")
    try:
        if args.checkpoint or args.hf_model:
            results = generate_and_score(args)
        elif args.per_problem:
            results = read_per_problem(args.per_problem)
        else:
            skipped = [] if args.skip_bad_lines else None
            responses = read_responses(args.responses, skipped)
            for line in skipped or ():
                print(f"evaluate.py: skipped {line}", file=sys.stderr)
            names = list(dict.fromkeys(benchmark for benchmark, _ in responses))
            benchmarks = load_benchmarks(args.data_dir or EvaluationConfig().data_dir, names)
            with VerifierPool(num_workers=args.workers, timeout_s=args.timeout_s) as pool:
                results = score(benchmarks, responses, pool)
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as exc:  # bad input: say what, without a traceback
        raise SystemExit(f"evaluate.py: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure: one line, the traceback on request
        if args.traceback:
            raise
        raise SystemExit(f"evaluate.py: {type(exc).__name__}: {exc} (--traceback shows where)") from None
    if not results:
        given = f"--responses {args.responses}" if args.responses else f"--per-problem {args.per_problem}"
        raise SystemExit(f"evaluate.py: nothing to score: {given} holds no responses, no report written (give a file "
                         "with {benchmark, index, response} lines, or generate them with --checkpoint RUN --benchmarks NAME)")
    summary = write_report(results, args.out, overwrite=args.overwrite)
    print(markdown_table(summary))
    print(f"reports written to {args.out}/ (results.json, results.md, results.csv, per_problem.jsonl)")
    return 0


def generate_and_score(args):
    """Sample with the policy of ``--checkpoint`` (or of ``--hf-model``, converted into a temporary
    checkpoint first) and verify."""
    if not args.hf_model:
        return _generate_and_score(args, Path(args.checkpoint).resolve())
    from clipo_nemo.conversion.convert import convert_hf

    with tempfile.TemporaryDirectory(prefix="clipo_eval_") as tmp:
        print(f"converting {args.hf_model} into a temporary checkpoint", flush=True)
        return _generate_and_score(args, convert_hf(args.hf_model, Path(tmp) / "converted", log=None))


def _run_config(path: Path):
    """The config that rebuilds the policy at ``path``: a converted checkpoint's description and
    tokenizer, or a run's ``config.yaml``. Returns (config, run directory or None)."""
    from clipo_nemo.config import ClipoConfig, load_config
    from clipo_nemo.conversion.weights import is_weights_checkpoint, model_config_of, tokenizer_dir

    if is_weights_checkpoint(path):
        cfg = ClipoConfig(model=model_config_of(path))
        if tokenizer_dir(path) is None:
            raise FileNotFoundError(f"{path} has no tokenizer/ (convert with the model's tokenizer)")
        cfg.trainer.tokenizer = str(tokenizer_dir(path))
        return cfg, None
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}/config.yaml not found: --checkpoint takes a clipo-nemo run directory "
                                "or a converted checkpoint")
    return load_config(run_dir / "config.yaml"), run_dir


def choose_benchmarks(cfg, run_dir: Optional[Path], data_dir: Optional[str], benchmarks: Optional[List[str]]) -> None:
    """Set ``cfg.evaluation``'s data_dir and benchmarks: the flags where given; else, for a run trained on
    the generated task (``task.enabled``), that run's own held-out splits in ``<run>/data``; else the
    run's (or the schema's) evaluation settings."""
    from clipo_nemo.trainer.loop import task_splits

    if run_dir is not None and cfg.task.enabled and not data_dir:
        own_dir, splits = task_splits(cfg, run_dir)
        cfg.evaluation.data_dir, cfg.evaluation.benchmarks = str(own_dir), splits[1:]
    elif data_dir:
        cfg.evaluation.data_dir = data_dir
    if benchmarks:
        cfg.evaluation.benchmarks = list(benchmarks)


def readable_prompt_sets(prompt_sets, cfg):
    """The benchmarks with at least one prompt the model can take; a left-out benchmark is a note on
    stderr, and nothing left is an error naming the flags."""
    kept = {name: prompts for name, prompts in prompt_sets.items() if prompts}
    limit = f"data.max_prompt_length={cfg.data.max_prompt_length} tokens of this model's tokenizer"
    for name in prompt_sets.keys() - kept.keys():
        print(f"evaluate.py: benchmark {name!r} left out: none of its prompts fits {limit}", file=sys.stderr)
    if not kept:
        raise ValueError(f"nothing to evaluate: no prompt of the benchmarks {list(prompt_sets)} in "
                         f"{cfg.evaluation.data_dir} fits {limit}; name benchmarks this model can read with "
                         "--benchmarks NAME ... (and --data-dir DIR, the folder with their <name>.parquet)")
    return kept


def _generate_and_score(args, path: Path):
    """Rebuild the policy at ``path`` in this process, load its weights, sample, verify."""
    from clipo_nemo.conversion.weights import load_weights_into_model
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.rollout import GenerationParams, build_rollout_engine
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.trainer.evaluation import evaluate, load_prompt_sets
    from clipo_nemo.trainer.experience import engine_generate_fn
    from clipo_nemo.trainer.loop import load_tokenizer

    cfg, run_dir = _run_config(path)
    cfg.parallel.tensor_parallel_size = cfg.parallel.pipeline_parallel_size = cfg.parallel.context_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    choose_benchmarks(cfg, run_dir, args.data_dir, args.benchmarks)
    cfg.rollout.engine = args.engine or cfg.rollout.engine
    max_new = args.max_new_tokens or cfg.evaluation.max_new_tokens
    if cfg.rollout.engine == "trtllm":  # its max_seq_len is data.max_prompt_length + rollout.max_new_tokens
        cfg.rollout.max_new_tokens = max(cfg.rollout.max_new_tokens, max_new)
    init_parallel_state(cfg.parallel)  # a single process
    try:
        if run_dir is None:  # converted weights: the policy alone
            model = build_policy_model(cfg.model, cfg.parallel)
            load_weights_into_model(model, path, cfg.model.vocab_size)
            print(f"evaluating {args.hf_model or path}", flush=True)
        else:
            actor = Actor.build(cfg)
            state = load_checkpoint(str(run_dir), actor, None, path=None if path == run_dir else path)
            if state is None:
                raise FileNotFoundError(f"{run_dir} has no checkpoint")
            model = actor.module
            print(f"evaluating {run_dir} at step {state['step']}", flush=True)
        tokenizer = load_tokenizer(cfg)
        prompt_sets = readable_prompt_sets(load_prompt_sets(cfg.evaluation, cfg.data, tokenizer, keep_unreadable=True), cfg)
        engine = build_rollout_engine(cfg.rollout, model=model, tokenizer=tokenizer, cfg=cfg)
        prompts = [p for ps in prompt_sets.values() for p in ps]
        generate_fn = engine_generate_fn(engine, tokenizer, prompts, GenerationParams.from_config(cfg.rollout), max_new,
                                         cfg.rollout.seed)
        with VerifierPool(num_workers=args.workers, timeout_s=args.timeout_s) as pool:
            return evaluate(generate_fn, prompt_sets, pool, args.k, args.temperature, args.top_p)
    finally:
        destroy_parallel_state()


if __name__ == "__main__":
    sys.exit(main())
