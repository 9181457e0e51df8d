"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard event files, a progress bar, a summary.

Only global rank 0 writes; the other ranks get a logger that does nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

# The columns of the progress bar and of the final summary.
HEADLINE = ("reward_mean", "contrastive_loss", "pos_pair_cos", "step_time_s")


class MetricsLogger:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.history: List[Dict[str, float]] = []
        self.path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.history = read_metrics(self.path)
        # A resumed run drops rows past its checkpoint: those steps are about to be redone.
        self.history = [row for row in self.history if row["step"] < start_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.bar.set_postfix({k.replace("_mean", ""): f"{row[k]:.3f}" for k in HEADLINE if k in row})
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A line of output that does not break the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def close(self) -> Optional[str]:
        """Close files; return the summary text (rank 0) or None."""
        if not self.enabled:
            return None
        self.bar.close()
        self.writer.close()
        return summarize(self.history)


def read_metrics(path: Path) -> List[Dict[str, float]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(rows: List[Dict[str, float]], key: str) -> float:
    values = [row[key] for row in rows if key in row]
    return sum(values) / len(values) if values else float("nan")


def summarize(history: List[Dict[str, float]], window: int = 20) -> str:
    """First vs last ``window`` steps of the headline metrics."""
    if not history:
        return "no steps were run"
    first, last = history[:window], history[-window:]
    # Every benchmark's validation Pass@1 (val/<benchmark>/pass@1), in the order they were first logged.
    benchmarks = dict.fromkeys(k for row in history for k in row if k.startswith("val/") and k.endswith("/pass@1"))
    keys = [k for k in HEADLINE + tuple(benchmarks) + ("val/pass@1_mean", "total_reward_mean")
            if any(k in row for row in history)]
    width = max([20] + [len(k) + 2 for k in keys])
    lines = [f"steps {history[0]['step']}..{history[-1]['step']} ({len(history)} logged)",
             f"{'metric':<{width}}{'first ' + str(len(first)):>12}{'last ' + str(len(last)):>12}"]
    lines += [f"{key:<{width}}{_mean(first, key):>12.4f}{_mean(last, key):>12.4f}" for key in keys]
    return "\n".join(lines)
