"""Configuration errors stop a run before any model is built, naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clipo_nemo.config import ClipoConfig, ConfigError, load_config
from clipo_nemo.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]


def _tiny():
    return load_config(ROOT / "examples/conf/tiny.yaml")


@pytest.mark.parametrize("name", ["tiny", "track1", "track2"])
def test_shipped_configs_match_the_schema(name):
    yaml = OmegaConf.load(ROOT / f"examples/conf/{name}.yaml")
    yaml.pop("defaults"), yaml.pop("hydra")
    merged = OmegaConf.merge(OmegaConf.structured(ClipoConfig), yaml)
    assert merged.rollout.n >= 1


def test_tiny_config_is_valid():
    validate_config(_tiny(), world_size=1)


@pytest.mark.parametrize("key,value,message", [
    ("algorithm.policy_loss", "ppo2", "algorithm.policy_loss='ppo2'"),
    ("contrastive.level", "global", "contrastive.level='global'"),
    ("contrastive.temperature", 0.0, "contrastive.temperature=0.0 must be > 0"),
    ("rollout.top_p", 1.5, "rollout.top_p=1.5"),
    ("rollout.engine", "vllm", "rollout.engine='vllm'"),
    ("trainer.prompts_per_step", 3, "trainer.prompts_per_step=3 must divide by the data-parallel size 2"),
    ("actor.num_mini_batches", 7, "actor.num_mini_batches=7"),
    ("actor.num_mini_batches", 0, "actor.num_mini_batches=0 must be > 0"),  # not a ZeroDivisionError
    ("trainer.prompts_per_step", 0, "trainer.prompts_per_step=0 must be > 0"),
])
def test_bad_values_name_the_key(key, value, message):
    cfg = _tiny()
    section, _, attr = key.rpartition(".")
    target = cfg
    for part in section.split("."):
        target = getattr(target, part)
    setattr(target, attr, value)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, world_size=2)
    assert message in str(err.value)


def _entry(*overrides, timeout=120):
    return subprocess.run([sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_entry_point_rejects_unknown_and_mistyped_keys_before_building(tmp_path):
    proc = _entry(f"trainer.output_dir={tmp_path}/run", "contrastive.temprature=0.1")
    assert proc.returncode != 0 and "temprature" in proc.stderr
    proc = _entry(f"trainer.output_dir={tmp_path}/run", "rollout.n=many")
    assert proc.returncode != 0 and "rollout.n" in proc.stderr
    proc = _entry(f"trainer.output_dir={tmp_path}/run", "algorithm.policy_loss=ppo2")
    assert proc.returncode != 0 and "algorithm.policy_loss='ppo2'" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was built or written
