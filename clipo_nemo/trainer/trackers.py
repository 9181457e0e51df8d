"""Experiment trackers (``trainer.loggers``): TensorBoard, Weights & Biases, MLflow, through their own
clients. Only global rank 0 builds them (:class:`clipo_nemo.trainer.metrics.MetricsLogger`'s owner).

Each tracker gets the run's resolved config once (when its run is created), every ``metrics.jsonl``
value of every step under the same name (MLflow: see :func:`mlflow_metric_name`), the run's plots as
images at the end, and a final status. The W&B and MLflow run ids are kept in ``<run dir>/trackers.json``
so that a resumed run continues the same tracker run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional
from urllib.parse import urlparse

from clipo_nemo.config import ClipoConfig

IDS_FILE = "trackers.json"

# logger name -> (module that must be importable, what installs it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'clipo-nemo[trackers]' (or: pip install wandb)"),
    "mlflow": ("mlflow", "pip install 'clipo-nemo[trackers]' (or: pip install mlflow-skinny)"),
}


def tracker_problems(loggers: List[str]) -> List[str]:
    """Why ``trainer.loggers`` cannot work: an unknown name, or a logger whose package is not installed."""
    problems = []
    for name in loggers:
        if name not in TRACKERS:
            problems.append(f"trainer.loggers: {name!r} is not one of {sorted(TRACKERS)}")
            continue
        module, install = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            problems.append(f"trainer.loggers includes {name!r} but the {module} package is not installed: {install}")
    return problems


def resolved_config(cfg: ClipoConfig) -> Dict[str, Any]:
    """The whole config as a plain nested dict (what ``config.yaml`` holds)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(values: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def mlflow_metric_name(name: str) -> str:
    """MLflow allows only letters, digits, ``_ - . / :`` and spaces in metric names
    (``mlflow.utils.validation.validate_param_and_metric_name``): ``@`` becomes ``_at_``
    (``val/heldout/pass@1`` -> ``val/heldout/pass_at_1``), any other character ``_``."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


class TrackerIds:
    """``<run dir>/trackers.json``: the tracker run ids of this run directory, written at once on change."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / IDS_FILE
        self.ids: Dict[str, Dict[str, str]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, tracker: str) -> Optional[Dict[str, str]]:
        return self.ids.get(tracker)

    def set(self, tracker: str, value: Dict[str, str]) -> None:
        self.ids[tracker] = value
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text(json.dumps(self.ids, indent=1) + "\n")
        os.replace(tmp, self.path)


class TensorBoardTracker:
    """Event files under ``<run dir>/tensorboard``; steps from ``start_step`` on are purged on resume.
    Non-finite values are left out (TensorBoard cannot draw them); the config is a text summary."""

    def __init__(self, cfg: ClipoConfig, run_dir: Path, start_step: int, ids: TrackerIds):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        if start_step == 0:
            from omegaconf import OmegaConf

            self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(resolved_config(cfg)) + "```", 0)

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        for key, value in metrics.items():
            if value == value and abs(value) != float("inf"):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_images(self, step: int, images: Dict[str, Path]) -> None:
        import matplotlib.image

        for name, path in images.items():
            self.writer.add_image(f"plots/{name}", matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (``trainer.wandb.*``), its files under ``<run dir>/wandb``. A resumed run directory
    continues its run (``wandb.init(id=..., resume="allow")``); W&B's history only grows, so steps a
    resume redoes that W&B already holds keep their first values there."""

    def __init__(self, cfg: ClipoConfig, run_dir: Path, start_step: int, ids: TrackerIds):
        import wandb

        settings, saved = cfg.trainer.wandb, ids.get("wandb")
        self.wandb = wandb
        self.run = wandb.init(project=settings.project, entity=settings.entity or None,
                              name=settings.name or run_dir.name, group=settings.group or None,
                              tags=list(settings.tags) or None, mode=settings.mode, dir=str(run_dir),
                              id=saved["run_id"] if saved else None, resume="allow" if saved else None,
                              config=None if saved else resolved_config(cfg))
        if not saved:
            ids.set("wandb", {"run_id": self.run.id, "project": settings.project})

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        if step >= self.run.step:  # a step W&B already holds (a resumed online run) is not sent again
            self.run.log(dict(metrics), step=step)

    def log_images(self, step: int, images: Dict[str, Path]) -> None:
        self.run.log({f"plots/{name}": self.wandb.Image(str(path)) for name, path in images.items()},
                     step=max(step, self.run.step))

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status.startswith("stopped:") else 0)
        self.wandb.teardown()  # stops W&B's service process with the run


class MlflowTracker:
    """An MLflow run (``trainer.mlflow.*``) through ``MlflowClient``: the config as flattened params and
    as the artifact ``config.yaml``, metrics with :func:`mlflow_metric_name` names, plots as artifacts
    under ``plots/``. A resumed run directory continues its run (set back to RUNNING); a redone step
    gets a second value at that step."""

    def __init__(self, cfg: ClipoConfig, run_dir: Path, start_step: int, ids: TrackerIds):
        from mlflow import MlflowClient

        settings, saved = cfg.trainer.mlflow, ids.get("mlflow")
        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):  # MLflow >= 3.7 refuses its file store without this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if saved:
            self.run_id = saved["run_id"]
            self.client.get_run(self.run_id)  # a run the store no longer has is an error, not a new run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings.experiment)
        run = self.client.create_run(experiment_id, run_name=settings.run_name or run_dir.name,
                                     tags=dict(settings.tags))
        self.run_id = run.info.run_id
        ids.set("mlflow", {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": uri})
        self._log_config(resolved_config(cfg))

    def _log_config(self, config: Dict[str, Any]) -> None:
        from mlflow.entities import Param
        from omegaconf import OmegaConf

        params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(config), "config.yaml")

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_metric_name(key), value, now, step)
                                                    for key, value in metrics.items()])

    def log_images(self, step: int, images: Dict[str, Path]) -> None:
        for path in images.values():
            self.client.log_artifact(self.run_id, str(path), "plots")

    def close(self, status: str) -> None:
        state = {"completed": "FINISHED", "stopped by signal": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=state)


TRACKERS: Dict[str, Callable[..., Any]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                           "mlflow": MlflowTracker}


def build_trackers(cfg: ClipoConfig, run_dir: Path, start_step: int) -> List[Any]:
    """The trackers of ``trainer.loggers``, in order (call on global rank 0 only)."""
    problems = tracker_problems(list(cfg.trainer.loggers))
    if problems:
        raise ImportError("; ".join(problems))
    ids = TrackerIds(run_dir)
    return [TRACKERS[name](cfg, Path(run_dir), start_step, ids) for name in cfg.trainer.loggers]
