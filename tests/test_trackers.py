"""Experiment trackers (trainer.loggers): a tiny run logging to W&B (offline) and MLflow (local file
store) at once, read back with the libraries' own APIs; resume continues the same tracker runs."""
import json
import struct
from pathlib import Path

import pytest

from clipo_nemo.config import ClipoConfig, ConfigError
from clipo_nemo.trainer import trackers
from clipo_nemo.validation import validate_config
from test_train_e2e import _metrics, _train  # tests/ is on sys.path under pytest


def _tiny_config(**trainer) -> ClipoConfig:
    cfg = ClipoConfig()
    cfg.task.enabled, cfg.trainer.tokenizer = True, "tiny"
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


def test_unknown_or_uninstalled_logger_is_a_config_error_naming_the_install(monkeypatch):
    real_find_spec = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        validate_config(_tiny_config(loggers=["tensorboard", "wandb", "neptune"], prompts_per_step=8))
    message = str(err.value)
    assert "'wandb' but the wandb package is not installed: pip install 'clipo-nemo[trackers]'" in message
    assert "trainer.loggers: 'neptune' is not one of ['mlflow', 'tensorboard', 'wandb']" in message
    validate_config(_tiny_config(loggers=["tensorboard", "mlflow"], prompts_per_step=8))  # both installed


def test_mlflow_metric_names_pass_mlflows_own_check():
    from mlflow.utils.validation import validate_param_and_metric_name

    for name in ("val/heldout/pass@1", "verifier/no_box", "time/rollout_s", "a#b"):
        mapped = trackers.mlflow_metric_name(name)
        assert validate_param_and_metric_name(mapped), mapped
    assert trackers.mlflow_metric_name("val/heldout/pass@1") == "val/heldout/pass_at_1"
    assert trackers.mlflow_metric_name("verifier/no_box") == "verifier/no_box"


def _wandb_records(run_file: Path):
    """The protobuf records of a W&B ``.wandb`` transaction log (LevelDB log format: a 7-byte ``:W&B``
    header, 32 KiB blocks of chunks with 7-byte headers: crc32 u32, length u16, type u8), parsed with
    W&B's own ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(run_dir: Path):
    """(run ids, config of the first run, {step: {key: value}}) of every offline W&B run in ``run_dir``."""
    ids, config, history = [], None, {}
    for run_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                if config is None:
                    config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                history.setdefault(row["_step"], {}).update(row)
    return ids, config, history


def test_tiny_run_logs_to_wandb_offline_and_mlflow_and_resume_continues_them(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    run, store = tmp_path / "run", (tmp_path / "mlruns").as_uri()
    common = ["trainer.loggers=[tensorboard,wandb,mlflow]", "trainer.wandb.mode=offline",
              "trainer.wandb.tags=[tiny,test]", f"trainer.mlflow.tracking_uri={store}",
              "trainer.mlflow.experiment=tiny-test", "evaluation.every_steps=2", "trainer.save_every_steps=0"]
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's MlflowClient (the trainer sets it)
    _train(run, "trainer.max_steps=2", *common)
    _train(run, "trainer.max_steps=3", *common, nproc=2)  # resumes from step 2 on two data-parallel ranks
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    ids = json.loads((run / "trackers.json").read_text())

    # W&B: both starts wrote the same run id, from rank 0 only; every metrics.jsonl value under its own name.
    wandb_ids, config, history = _wandb_history(run)
    assert wandb_ids == [ids["wandb"]["run_id"]] * 2
    assert config["trainer"]["max_steps"] == 2 and config["trainer"]["wandb"]["tags"] == ["tiny", "test"]  # once
    for row in rows:
        logged = history[row["step"]]
        assert {k: logged[k] for k in row if k != "step"} == pytest.approx({k: v for k, v in row.items() if k != "step"})
    assert "val/heldout/pass@1" in history[0] and "val/heldout/pass@1" in history[1]
    images = sorted((step, key) for step, logged in history.items() for key, value in logged.items()
                    if key.startswith("plots/") and key.endswith("/_type") and value == "image-file")
    assert images == [(step, f"plots/{name}/_type") for step in (1, 2) for name in ("embeddings", "training_curves")]

    # MLflow: one run, continued; the config logged once as params and config.yaml; plots as artifacts.
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("tiny-test")
    found = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in found] == [ids["mlflow"]["run_id"]]
    mlrun = found[0]
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["trainer.max_steps"] == "2" and mlrun.data.params["model.vocab_size"] == "49"
    for key in ("reward_mean", "contrastive_loss", "verifier/ok"):  # one value per step: rank 0 alone logs
        logged = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert [step for step, _ in logged] == [0, 1, 2]
        assert [value for _, value in logged] == pytest.approx([r[key] for r in rows])
    pass_at_1 = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "val/heldout/pass_at_1")}
    assert pass_at_1 == pytest.approx({r["step"]: r["val/heldout/pass@1"] for r in rows if "val/heldout/pass@1" in r})
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "plots"} <= artifacts
    assert {Path(a.path).name for a in client.list_artifacts(mlrun.info.run_id, "plots")} == {
        "training_curves.png", "embeddings.png"}
