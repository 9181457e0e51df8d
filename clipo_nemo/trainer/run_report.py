"""The lines a training run prints about itself: what runs and on what, before the first step; where
its results are and the commands that evaluate and export it, after the last."""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from clipo_nemo.config import ClipoConfig, EvaluationConfig
from clipo_nemo.planner import GIB, MemoryPlan

ROOT = Path(__file__).resolve().parents[2]


def describe_run(cfg: ClipoConfig, world_size: int, device: str) -> str:
    """``policy: ... ; layout TP x PP x CP x DP over <world_size> <device>``, one line."""
    m, p = cfg.model, cfg.parallel
    dp = max(world_size // max(p.tensor_parallel_size * p.pipeline_parallel_size * p.context_parallel_size, 1), 1)
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    return (f"policy: {m.num_layers} layers, hidden {m.hidden_size}, vocabulary {m.vocab_size}, {m.params_dtype}; "
            f"layout TP {p.tensor_parallel_size} x PP {p.pipeline_parallel_size} x CP {p.context_parallel_size} "
            f"x DP {dp}; {processes} on {device}")


def host_memory_bytes() -> Optional[int]:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.1f} MiB"


def memory_line(plan: MemoryPlan, world_size: int, on_gpu: bool) -> str:
    """The memory plan in the device's terms: per GPU against ``trainer.gpu_memory_gib`` on GPUs; on a
    CPU, per process against the host's memory (the GPU budget means nothing there)."""
    head = f"memory plan ({plan.peak_phase} phase peak): "
    if on_gpu:
        return head + plan.verdict()
    processes = f" x {world_size} processes" if world_size > 1 else ""
    host = host_memory_bytes()
    of_host = f" of {_size(host)} host memory" if host else ""
    return head + f"{_size(plan.total_bytes)} per process{processes}{of_host}"


def python_command() -> str:
    """How to start this Python again from the current directory: ``python`` when that is the one on
    PATH, else its path (relative when under the current directory, e.g. ``.venv/bin/python``)."""
    return "python" if shutil.which("python") == sys.executable else _from_here(Path(sys.executable))


def _from_here(path: Path) -> str:
    path = path.absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _command(*words) -> str:
    return " ".join(shlex.quote(str(word)) for word in words)


def next_steps(cfg: ClipoConfig, run_dir: Path) -> List[str]:
    """What a finished run tells its user: where the plots and metrics are, and (when it saved a
    checkpoint) the commands that evaluate it (``tools/evaluate.py`` on the run's held-out data with
    its evaluation settings) and export it (``tools/export_to_hf.py``), runnable as printed from the
    directory the run was started in."""
    lines = []
    plots = [str(p) for p in (run_dir / "training_curves.png", run_dir / "embeddings.png") if p.is_file()]
    if plots:
        lines.append("plots: " + ", ".join(plots))
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}, TensorBoard: {run_dir / 'tensorboard'}")
    if not any((run_dir / "checkpoints").glob("step_*")):
        return lines
    ev, defaults = cfg.evaluation, EvaluationConfig()
    if cfg.task.enabled:  # the generated task's held-out splits, as the run validated on them
        data_dir, benchmarks = run_dir / "data", [Path(f).stem for f in cfg.data.val_files]
    else:
        data_dir, benchmarks = ev.data_dir, ev.benchmarks
    sampling = [] if (ev.temperature, ev.top_p) == (defaults.temperature, defaults.top_p) else [
        "--temperature", ev.temperature, "--top-p", ev.top_p]
    python = python_command()
    lines.append("evaluate: " + _command(python, _from_here(ROOT / "tools" / "evaluate.py"), "--checkpoint", run_dir,
                                         "--data-dir", data_dir, "--benchmarks", *benchmarks, "--k", ev.k, *sampling,
                                         "--out", run_dir / "eval"))
    lines.append("export:   " + _command(python, _from_here(ROOT / "tools" / "export_to_hf.py"), run_dir,
                                         "--out", run_dir / "hf"))
    return lines
