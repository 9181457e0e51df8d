"""GRPO vs GRPO + CLIPO (and a placebo) on a tiny task over paired seeds: does the contrastive reward
change held-out Pass@1, beyond what its noise alone does?

    python benchmarks/ablation.py --config-name=tiny_chain --variants grpo clipo placebo --seeds 6
    python benchmarks/ablation.py --config-name=tiny_chain --variants grpo clipo placebo clipo_w0.05 clipo_w0.5 supcon
    python benchmarks/ablation.py --from-runs --out outputs/ablation   # tables and plot again from its runs

Every run is the real training loop (``examples/train_grpo_clipo.py --config-name=<config>``) in its own
process with one torch thread; the variants differ only in their ``contrastive.*`` overrides, and seed
``s`` sets the same initialisation, warm start, sampling and data order for every variant
(``parallel.seed``, ``rollout.seed``, ``data.seed``, ``contrastive.seed``; the task's split stays
fixed), so seeds pair up.

Fixed before any run (printed first): the **primary endpoint** is perturbed held-out Pass@1
(``val/heldout_perturbed/pass@1``; ``evaluation.k`` samples per problem, 16 in tiny_chain) averaged
over the last ``--last-vals`` validations; held-out Pass@1, the training reward, the positive-pair
cosine and (tiny_chain) the mechanism metrics are secondary. A benefit of CLIPO counts only if its
paired difference to GRPO *and* to the placebo (``contrastive.placebo``: the same rewards permuted
among each group's rewarded responses) both exclude 0.

Per variant: every seed's value, mean and 95% t interval. Per comparison (each variant against GRPO,
each CLIPO variant against the placebo): the paired differences' mean with a 95% t interval, the exact
Wilcoxon signed-rank p, the sign count, and the number of seed pairs a paired t-test would need to
detect the observed mean difference with 80% power at alpha 0.05. Writes ``ablation.md``,
``ablation.png`` (curves with 95% bands) and ``ablation.json`` into ``--out``. Last line:
``clipo_minus_grpo_perturbed: <mean> [<lo>, <hi>]`` (percentage points, primary endpoint).
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

# The variants: overrides of the config (which is GRPO + CLIPO). clipo_w*: the dose (contrastive weight).
VARIANTS: Dict[str, List[str]] = {
    "grpo": ["contrastive.enabled=false"],
    "clipo": [],
    "placebo": ["contrastive.placebo=true"],
    "clipo_fixed": ["contrastive.head.fixed=true"],
    "supcon": ["contrastive.loss=supcon_out"],
    "clipo_w0.05": ["contrastive.reward_scale=0.05"],
    "clipo_w0.5": ["contrastive.reward_scale=0.5"],
}
CLEAN, PERTURBED = "val/heldout/pass@1", "val/heldout_perturbed/pass@1"
PRIMARY = PERTURBED
# metric key -> (table column, how a run's final value is taken: the mean of the last validations, or
# of the last TAIL training steps, or of the head-only warm-up steps)
FINAL_METRICS = {PERTURBED: ("perturbed Pass@1 (%, primary)", "last_vals"), CLEAN: ("held-out Pass@1 (%)", "last_vals"),
                 "reward_mean": ("training reward", "tail"), "pos_pair_cos": ("positive-pair cosine", "tail")}
CHAIN_METRICS = {  # tiny_chain's mechanism metrics (clipo_nemo/trainer/chain_task.py)
    "val/heldout_perturbed/chain/derivation_frac": ("perturbed: derivations (%)", "last_vals"),
    "chain/correct_inconsistent_frac": ("correct by a wrong process (share)", "tail"),
    "chain/rc_gap": ("warm-up rc gap, derivation - shortcut", "warmup"),
}
TAIL = 20


def mean_ci(values: Sequence[float]) -> Dict[str, float]:
    """Mean and 95% Student t confidence interval of ``values`` (the interval is the mean itself for one value)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def seeds_for_power(mean: float, sd: float, power: float = 0.8, alpha: float = 0.05, max_n: int = 10_000) -> Optional[int]:
    """The fewest pairs for which a two-sided paired t-test at ``alpha`` detects a true mean difference
    ``mean`` (paired sd ``sd``) with probability ``power`` (noncentral t); None beyond ``max_n`` or
    for a zero effect."""
    from scipy import stats

    if mean == 0 or not sd > 0:
        return None if mean == 0 else 2
    for n in range(2, max_n + 1):
        df, crit = n - 1, float(stats.t.ppf(1 - alpha / 2, n - 1))
        shift = abs(mean) / sd * math.sqrt(n)
        if 1 - stats.nct.cdf(crit, df, shift) + stats.nct.cdf(-crit, df, shift) >= power:
            return n
    return None


def paired_stats(differences: Sequence[float]) -> Dict[str, object]:
    """Mean and 95% t interval of paired differences, the exact Wilcoxon signed-rank p (two-sided;
    None when every difference is 0), the sign count (+, -, 0) and the seeds needed for 80% power."""
    from scipy import stats

    out: Dict[str, object] = dict(mean_ci(differences))
    nonzero = [d for d in differences if d != 0]
    out["wilcoxon_p"] = float(stats.wilcoxon(nonzero, method="exact").pvalue) if nonzero else None
    out["signs"] = [sum(d > 0 for d in differences), sum(d < 0 for d in differences), sum(d == 0 for d in differences)]
    sd = math.sqrt(sum((d - out["mean"]) ** 2 for d in differences) / (len(differences) - 1)) if len(differences) > 1 else 0.0
    out["seeds_for_80pct_power"] = seeds_for_power(out["mean"], sd)
    return out


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


def train_one(config: str, variant: str, seed: int, out: Path, steps: Optional[int], last_vals: int) -> List[Dict]:
    """One training run in its own process (one torch thread); returns its metrics rows."""
    run_dir = out / "runs" / f"{variant}_seed{seed}"
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir} already holds a run: give a fresh --out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "train_grpo_clipo.py"), f"--config-name={config}",
           *run_overrides(variant, seed, run_dir, steps)]
    clock = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = read_run(variant, seed, out)
    print(f"  {variant:<12} seed {seed}: {time.perf_counter() - clock:6.1f} s, perturbed "
          f"{rows_final(rows, PERTURBED, last_vals):5.1f}%, held-out {rows_final(rows, CLEAN, last_vals):5.1f}%",
          flush=True)
    return rows


def rows_final(rows: List[Dict[str, float]], key: str, last_vals: int, how: Optional[str] = None) -> float:
    """A run's final value of ``key`` (nan when the run never logged it, e.g. the positive-pair cosine
    without a head): the mean of its last ``last_vals`` validations, of its last TAIL steps, or, for
    ``chain/rc_gap``, the mean over the head-only warm-up steps of the reward gap between correct
    derivations and correct answers by another path."""
    how = how or {**FINAL_METRICS, **CHAIN_METRICS}[key][1]
    if key == "chain/rc_gap":
        if not any("contrastive_loss" in row for row in rows):
            return float("nan")  # no head (GRPO): no contrastive reward to compare
        gaps = [row["chain/rc_correct_derivation"] - row["chain/rc_correct_shortcut"] for row in rows
                if row.get("policy_updated") == 0.0 and "chain/rc_correct_derivation" in row
                and "chain/rc_correct_shortcut" in row]
        return sum(gaps) / len(gaps) if gaps else float("nan")
    values = [row[key] for row in rows if key in row]
    if not values:
        return float("nan")
    window = values[-last_vals:] if how == "last_vals" else values[-TAIL:]
    return sum(window) / len(window)


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


def _digits(key: str) -> int:
    return 1 if key.startswith("val/") else 3


def _comparisons(variants: Sequence[str]) -> List[tuple]:
    """(variant, baseline) pairs: every variant against GRPO, every CLIPO variant against the placebo."""
    pairs = [(v, "grpo") for v in variants if v != "grpo" and "grpo" in variants]
    pairs += [(v, "placebo") for v in variants if v not in ("grpo", "placebo") and "placebo" in variants]
    return pairs


def report(results: Dict[str, List[List[Dict[str, float]]]], seeds: int, wall_s: float, last_vals: int = 1,
           config: str = "tiny") -> (str, Dict):
    """The Markdown tables and the numbers behind them."""
    metrics = dict(FINAL_METRICS)
    if any(any("chain/derivation_frac" in row for row in rows) for runs in results.values() for rows in runs):
        metrics.update(CHAIN_METRICS)
    summary: Dict[str, Dict] = {"final": {}, "per_seed": {}, "paired": {}}
    wall = "n/a" if math.isnan(wall_s) else f"{wall_s / 60:.1f} min"
    lines = [f"### `{config}`, {seeds} seeds per variant (mean [95% CI]; wall time {wall})\n",
             f"Primary endpoint (fixed in advance): perturbed held-out Pass@1, mean of the last {last_vals} "
             "validations.\n",
             "| variant | " + " | ".join(column for column, _ in metrics.values()) + " |",
             "|---|" + "---|" * len(metrics)]
    for variant, runs in results.items():
        stats = {}
        for key in metrics:
            values = [rows_final(rows, key, last_vals) for rows in runs]
            stats[key] = mean_ci(values) if not any(math.isnan(v) for v in values) else {"mean": float("nan")}
        summary["final"][variant] = stats
        summary["per_seed"][variant] = [rows_final(rows, PRIMARY, last_vals) for rows in runs]
        lines.append(f"| {variant} | " + " | ".join(fmt(stats[key], _digits(key)) for key in metrics) + " |")
    lines += ["", "Primary endpoint per seed (%):", "",
              "| variant | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |", "|---|" + "---|" * seeds]
    lines += [f"| {variant} | " + " | ".join(f"{v:.1f}" for v in values) + " |"
              for variant, values in summary["per_seed"].items()]
    pairs = _comparisons(list(results))
    if pairs:
        lines += ["", "Paired differences (same seed; percentage points): mean [95% t CI], exact Wilcoxon "
                  "signed-rank p, signs (+/-/0), seed pairs for 80% power at the observed effect:", "",
                  "| comparison | perturbed Pass@1 (primary) | held-out Pass@1 |", "|---|---|---|"]
        for variant, base in pairs:
            diffs = {key: paired_stats([rows_final(mine, key, last_vals) - rows_final(theirs, key, last_vals)
                                        for mine, theirs in zip(results[variant], results[base])])
                     for key in (PERTURBED, CLEAN)}
            summary["paired"][f"{variant} - {base}"] = diffs
            cells = []
            for key in (PERTURBED, CLEAN):
                d = diffs[key]
                p = "n/a" if d["wilcoxon_p"] is None else f"{d['wilcoxon_p']:.3f}"
                power = d["seeds_for_80pct_power"] or "n/a"
                cells.append(f"{fmt(d, 1)}, p {p}, {'/'.join(map(str, d['signs']))}, n80 {power}")
            lines.append(f"| {variant} - {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="tiny", help="examples/conf config to train (tiny, tiny_chain)")
    parser.add_argument("--variants", nargs="+", default=["grpo", "clipo"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, default=5, help="seeds per variant (>= 2 for an interval)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--last-vals", type=int, default=2, help="validations averaged into a run's final Pass@1")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablation")
    parser.add_argument("--from-runs", action="store_true", help="no training: report the runs already in --out")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="train only the (variant, seed) runs that --out does not hold yet, e.g. a dose sweep "
                             "added to an earlier ablation with the same config and seeds")
    args = parser.parse_args(argv)
    if args.seeds < 2 or args.jobs < 1 or args.last_vals < 1 or not {"grpo", "clipo"} <= set(args.variants):
        parser.error("need --seeds >= 2, --jobs >= 1, --last-vals >= 1 and at least the variants grpo and clipo")

    from clipo_nemo.trainer.plots import plot_bands

    args.out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    jobs = [(variant, seed) for seed in range(args.seeds) for variant in args.variants]
    print(f"primary endpoint: {PRIMARY}, mean of the last {args.last_vals} validations; "
          f"config {args.config_name}; seeds 0..{args.seeds - 1}", flush=True)
    if args.from_runs:
        finished, wall_s = {job: read_run(*job, args.out) for job in jobs}, float("nan")
    else:
        print(f"{len(jobs)} runs ({', '.join(args.variants)} x {args.seeds} seeds), {args.jobs} at a time", flush=True)
        done = {job for job in jobs if args.reuse_runs
                and (args.out / "runs" / f"{job[0]}_seed{job[1]}" / "metrics.jsonl").is_file()}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {job: pool.submit(train_one, args.config_name, *job, args.out, args.steps, args.last_vals)
                       for job in jobs if job not in done}
            finished = {job: future.result() for job, future in futures.items()}
        finished.update({job: read_run(*job, args.out) for job in done})
        wall_s = time.perf_counter() - clock
    results = {variant: [finished[(variant, seed)] for seed in range(args.seeds)] for variant in args.variants}

    table, summary = report(results, args.seeds, wall_s, args.last_vals, args.config_name)
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
    diff = summary["paired"]["clipo - grpo"][PRIMARY]
    print(f"total_wall_s: {wall_s:.0f}")
    print(f"clipo_minus_grpo_perturbed: {diff['mean']:.2f} [{diff['lo']:.2f}, {diff['hi']:.2f}]")


if __name__ == "__main__":
    main()
