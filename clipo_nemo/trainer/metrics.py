"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard event files, a progress bar, a summary.

Only global rank 0 writes; the other ranks get a logger that does nothing.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
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

        notes = [repair_torn_last_line(self.path)]
        logged = read_metrics(self.path)
        # A resumed run drops rows past its checkpoint: those steps are about to be redone.
        self.history = [row for row in logged if row["step"] < start_step]
        if len(logged) > len(self.history):
            notes.append(f"{self.path}: {len(logged) - len(self.history)} rows from step {start_step} on dropped "
                         "(those steps are redone from the checkpoint)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}")  # replaced at once: a crash here keeps the old rows
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        os.replace(tmp, self.path)
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step)
        self.bar = None  # opened by start(), after the start-up lines
        self.redirect = ExitStack()  # console logging through the bar while it is open
        self.bar_range = (start_step, total_steps)
        for note in filter(None, notes):
            self.note(note)

    def start(self) -> None:
        """Open the progress bar. Until :meth:`close`, our lines (:meth:`note`) and the console's log
        records (library messages and warnings, clipo_nemo.console) are written above it."""
        if self.enabled and self.bar is None:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            start_step, total_steps = self.bar_range
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            self.redirect.enter_context(logging_redirect_tqdm())

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
        self.start()
        self.bar.set_postfix({k.replace("_mean", ""): f"{row[k]:.3f}" for k in HEADLINE if k in row})
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A line of output: printed before the progress bar opens, written above it after."""
        if self.enabled:
            if self.bar is None:
                print(text, flush=True)
            else:
                self.bar.write(text)

    def close(self) -> Optional[str]:
        """Close files; return the summary text (rank 0) or None."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
            self.redirect.close()
        self.writer.close()
        return summarize(self.history)


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """The rows of a ``metrics.jsonl``; a line that is not a JSON row is an error naming it."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line.strip():
            row = _parse_row(line)
            if row is None:
                raise ValueError(f"{path}, line {number}: not a JSON row with a step ({line[:80]!r}); only a torn "
                                 "last line (a crash mid-write) is repaired on resume: fix or remove this one")
            rows.append(row)
    return rows


def _parse_row(line: bytes) -> Optional[Dict[str, float]]:
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) and "step" in row else None


def repair_torn_last_line(path: Path) -> Optional[str]:
    """If the last line of ``path`` is not a whole JSON row (what a crash in the middle of
    :meth:`MetricsLogger.log` leaves), cut it off (in place, fsynced) and return a note saying so;
    None when there is nothing to repair."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    body = data.rstrip(b"\n")
    start = body.rfind(b"\n") + 1
    last = body[start:]
    if not last.strip() or _parse_row(last) is not None:
        return None
    with open(path, "r+b") as handle:
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
    return (f"{path}: its last line was cut off mid-write ({len(data) - start} bytes: {last[:40]!r}...); "
            "truncated it, the complete rows before it are kept")


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
