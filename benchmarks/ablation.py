"""GRPO vs GRPO + CLIPO on the tiny task over several seeds, same compute: does the contrastive reward
change held-out (clean and perturbed) Pass@1?

    python benchmarks/ablation.py                                  # grpo, clipo; 5 seeds; 2 runs at a time
    python benchmarks/ablation.py --variants grpo clipo clipo_fixed supcon --seeds 5 --jobs 2 --out outputs/ablation
    python benchmarks/ablation.py --from-runs --out outputs/ablation   # tables and plot again from its runs

Every run is the real training loop (``examples/train_grpo_clipo.py --config-name=tiny``) in its own
process with one torch thread; the variants differ only in their ``contrastive.*`` overrides, and seed
``s`` sets the same initialisation, sampling and data order for every variant (``parallel.seed``,
``rollout.seed``, ``data.seed``, ``contrastive.seed``; the task's split stays fixed), so seeds pair up.

Per variant: mean and 95% confidence interval (Student t over seeds) of the final clean and perturbed
held-out Pass@1 (the last validation), the training reward and the positive-pair cosine (both averaged
over the last 20 steps); per variant other than GRPO: the paired difference to GRPO. Writes
``ablation.md`` (the tables), ``ablation.png`` (curves with 95% bands) and ``ablation.json`` into
``--out``. Last line: ``clipo_minus_grpo_perturbed: <mean> [<lo>, <hi>]`` (percentage points).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The variants: overrides of examples/conf/tiny.yaml (which is GRPO + CLIPO).
VARIANTS: Dict[str, List[str]] = {
    "grpo": ["contrastive.enabled=false"],
    "clipo": [],
    "clipo_fixed": ["contrastive.head.fixed=true"],
    "supcon": ["contrastive.loss=supcon_out"],
}
CLEAN, PERTURBED = "val/heldout/pass@1", "val/heldout_perturbed/pass@1"
# metric key -> (table column, from the last validation row or averaged over the last TAIL steps)
FINAL_METRICS = {CLEAN: ("held-out Pass@1 (%)", "last_val"), PERTURBED: ("perturbed Pass@1 (%)", "last_val"),
                 "reward_mean": ("training reward", "tail"), "pos_pair_cos": ("positive-pair cosine", "tail")}
TAIL = 20
# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: Sequence[float]) -> Dict[str, float]:
    """Mean and 95% t confidence interval of ``values`` (the interval is the mean itself for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def run_overrides(variant: str, seed: int, run_dir: Path, steps: Optional[int]) -> List[str]:
    seeds = [f"{key}={1234 + 1000 * seed}" for key in ("parallel.seed", "rollout.seed", "data.seed", "contrastive.seed")]
    extra = [f"trainer.max_steps={steps}"] if steps else []
    return [f"trainer.output_dir={run_dir}", "trainer.save_every_steps=0", "trainer.plot_embeddings=false",
            "verifier.num_workers=1", *seeds, *extra, *VARIANTS[variant]]


def read_run(variant: str, seed: int, out: Path) -> List[Dict[str, float]]:
    """The metrics rows of a finished run under ``out/runs``."""
    path = out / "runs" / f"{variant}_seed{seed}" / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the ablation (without --from-runs) first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_one(variant: str, seed: int, out: Path, steps: Optional[int]) -> List[Dict[str, float]]:
    """One training run in its own process (one torch thread); returns its metrics rows."""
    run_dir = out / "runs" / f"{variant}_seed{seed}"
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run: give a fresh --out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "train_grpo_clipo.py"), "--config-name=tiny",
           *run_overrides(variant, seed, run_dir, steps)]
    clock = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = read_run(variant, seed, out)
    print(f"  {variant:<12} seed {seed}: {time.perf_counter() - clock:6.1f} s, final held-out "
          f"{rows_final(rows, CLEAN):5.1f}%, perturbed {rows_final(rows, PERTURBED):5.1f}%", flush=True)
    return rows


def rows_final(rows: List[Dict[str, float]], key: str) -> float:
    """A run's final value of ``key``: the last validation's for Pass@1, else the mean of the last TAIL steps
    (nan when the run never logged it, e.g. the positive-pair cosine without a head)."""
    how = FINAL_METRICS[key][1]
    values = [row[key] for row in rows if key in row]
    if not values:
        return float("nan")
    return values[-1] if how == "last_val" else sum(values[-TAIL:]) / len(values[-TAIL:])


def curves(runs: List[List[Dict[str, float]]], key: str, smooth: int) -> Dict[str, List[float]]:
    """Mean and 95% band over runs of ``key`` per logged step (a trailing ``smooth``-step mean first)."""
    per_run = []
    for rows in runs:
        logged = [(row["step"], row[key]) for row in rows if key in row]
        per_run.append({step: sum(v for _, v in logged[max(0, i - smooth + 1):i + 1]) / len(logged[max(0, i - smooth + 1):i + 1])
                        for i, (step, _) in enumerate(logged)})
    steps = sorted(set.intersection(*(set(run) for run in per_run))) if per_run else []
    stats = [mean_ci([run[step] for run in per_run]) for step in steps]
    return {"step": steps, "mean": [s["mean"] for s in stats], "lo": [s["lo"] for s in stats],
            "hi": [s["hi"] for s in stats]}


def fmt(stat: Dict[str, float], digits: int) -> str:
    if math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


def report(results: Dict[str, List[List[Dict[str, float]]]], seeds: int, wall_s: float) -> (str, Dict):
    """The Markdown tables and the numbers behind them."""
    summary: Dict[str, Dict] = {"final": {}, "paired_minus_grpo": {}}
    wall = "n/a" if math.isnan(wall_s) else f"{wall_s / 60:.1f} min"
    lines = [f"### Tiny task, {seeds} seeds per variant (mean [95% CI]; wall time {wall})\n",
             "| variant | " + " | ".join(column for column, _ in FINAL_METRICS.values()) + " |",
             "|---|" + "---|" * len(FINAL_METRICS)]
    for variant, runs in results.items():
        stats = {}
        for key in FINAL_METRICS:
            values = [rows_final(rows, key) for rows in runs]
            stats[key] = mean_ci(values) if not any(math.isnan(v) for v in values) else {"mean": float("nan")}
        summary["final"][variant] = stats
        lines.append(f"| {variant} | " + " | ".join(fmt(stats[key], 1 if "pass@1" in key else 3)
                                                    for key in FINAL_METRICS) + " |")
    if "grpo" in results:
        lines += ["", "Paired difference to GRPO (same seed; percentage points):", "",
                  "| variant | held-out Pass@1 | perturbed Pass@1 |", "|---|---|---|"]
        for variant, runs in results.items():
            if variant == "grpo":
                continue
            diffs = {key: mean_ci([rows_final(mine, key) - rows_final(base, key)
                                   for mine, base in zip(runs, results["grpo"])]) for key in (CLEAN, PERTURBED)}
            summary["paired_minus_grpo"][variant] = diffs
            lines.append(f"| {variant} - grpo | {fmt(diffs[CLEAN], 1)} | {fmt(diffs[PERTURBED], 1)} |")
    return "\n".join(lines) + "\n", summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["grpo", "clipo"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds per variant (>= 2 for an interval)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: tiny.yaml's)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablation")
    parser.add_argument("--from-runs", action="store_true", help="no training: report the runs already in --out")
    args = parser.parse_args(argv)
    if args.seeds < 2 or args.jobs < 1 or not {"grpo", "clipo"} <= set(args.variants):
        parser.error("need --seeds >= 2, --jobs >= 1 and at least the variants grpo and clipo")

    from clipo_nemo.trainer.plots import plot_bands

    args.out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    jobs = [(variant, seed) for seed in range(args.seeds) for variant in args.variants]
    if not args.from_runs:
        print(f"{len(jobs)} runs ({', '.join(args.variants)} x {args.seeds} seeds), {args.jobs} at a time", flush=True)
    if args.from_runs:
        finished, wall_s = {job: read_run(*job, args.out) for job in jobs}, float("nan")
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {job: pool.submit(train_one, *job, args.out, args.steps) for job in jobs}
            finished = {job: future.result() for job, future in futures.items()}
        wall_s = time.perf_counter() - clock
    results = {variant: [finished[(variant, seed)] for seed in range(args.seeds)] for variant in args.variants}

    table, summary = report(results, args.seeds, wall_s)
    (args.out / "ablation.md").write_text(table)
    (args.out / "ablation.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "wall_s": wall_s, **summary}, indent=2) + "\n")
    titles = {CLEAN: "held-out Pass@1 (%)", PERTURBED: "perturbed held-out Pass@1 (%)",
              "reward_mean": "training reward (10-step mean)", "pos_pair_cos": "positive-pair cosine (10-step mean)"}
    bands = {variant: {key: curves(runs, key, 1 if "pass@1" in key else 10) for key in titles
                       if all(any(key in row for row in rows) for rows in runs)} for variant, runs in results.items()}
    for variant in bands:  # a variant without a metric (GRPO has no head) leaves that panel out
        for key in titles:
            bands[variant].setdefault(key, {"step": [], "mean": [], "lo": [], "hi": []})
    plot_bands(bands, titles, args.out / "ablation.png")

    print(table)
    print(f"wrote {args.out / 'ablation.md'}, {args.out / 'ablation.png'}, {args.out / 'ablation.json'}")
    diff = summary["paired_minus_grpo"]["clipo"][PERTURBED]
    print(f"total_wall_s: {wall_s:.0f}")
    print(f"clipo_minus_grpo_perturbed: {diff['mean']:.2f} [{diff['lo']:.2f}, {diff['hi']:.2f}]")


if __name__ == "__main__":
    main()
