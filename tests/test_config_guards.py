"""Config mistakes caught before any model is built: keys added past the schema, tracks without
starting weights, CLIPO settings under which no anchor can ever be valid, and values that used to
fail only after the model was built or after the first step."""
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipo_nemo.config import ClipoConfig, ConfigError, load_config
from clipo_nemo.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "examples" / "conf"


def _problems(cfg, world_size=1) -> str:
    """validate_config's message ("" when the config is valid)."""
    try:
        validate_config(cfg, world_size)
    except ConfigError as err:
        return str(err)
    return ""


# --------------------------------------------------------------------------------------------------
# 6. '+key=value' adds keys past the structured schema; they must be refused, not dropped
# --------------------------------------------------------------------------------------------------
def _compose(*overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="clipo_schema", node=ClipoConfig)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose("tiny", overrides=list(overrides)), resolve=False)


def test_keys_added_with_plus_are_refused_naming_them():
    from clipo_nemo.config import check_known_keys

    check_known_keys(_compose("trainer.max_steps=3"))  # a known key passes
    with pytest.raises(ConfigError) as err:
        check_known_keys(_compose("+trainer.max_step=3", "+contrastive.head.widht=8", "+newsection.x=1"))
    for key in ("trainer.max_step", "contrastive.head.widht", "newsection"):
        assert key in str(err.value)
    assert "trainer.max_steps'" not in str(err.value)


def test_entry_point_refuses_a_plus_typo_before_writing_anything(tmp_path):
    proc = subprocess.run([sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny",
                           f"trainer.output_dir={tmp_path}/run", "+trainer.max_step=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "trainer.max_step" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# 7. The tracks refuse to train from random weights; tiny still may
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["track1", "track2", "llama3_70b"])
def test_tracks_without_init_from_are_refused_naming_the_key(name, tmp_path):
    # A tokenizer given, so nothing else stops the run: before, this config validated and trained from random init.
    cfg = load_config(CONF / f"{name}.yaml", [f"trainer.tokenizer={tmp_path}"])
    message = _problems(cfg, world_size=8)
    assert "trainer.init_from is empty" in message and "trainer.require_init_from=true" in message
    run = tmp_path / "other_run"
    (run / "checkpoints").mkdir(parents=True)  # what init_from accepts as another clipo-nemo run
    cfg.trainer.init_from = str(run)
    assert "init_from" not in _problems(cfg, world_size=8)


def test_tiny_still_starts_from_random_init():
    cfg = load_config(CONF / "tiny.yaml")
    assert not cfg.trainer.init_from and not cfg.trainer.require_init_from
    validate_config(cfg)


# --------------------------------------------------------------------------------------------------
# 8. CLIPO on, but no anchor can ever be valid: the contrastive reward would be constant
# --------------------------------------------------------------------------------------------------
def _contrastive_reward_can_vary(level, n, prompts, skip_trivial):
    """The oracle: the real contrastive loss and reward over every correctness pattern of a step's
    responses; True when some response's reward differs from the offset (here 0)."""
    from clipo_nemo.algorithms.contrastive import contrastive_loss
    from clipo_nemo.algorithms.rewards import contrastive_rewards

    size = prompts * n
    z = torch.nn.functional.normalize(torch.randn(size, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    groups = torch.arange(size) // n
    for pattern in itertools.product([False, True], repeat=size):
        out = contrastive_loss(z, torch.tensor(pattern), groups, level=level, skip_trivial=skip_trivial,
                               generator=torch.Generator().manual_seed(0))
        rewards = contrastive_rewards(out.per_anchor_loss, out.valid_anchor_mask, scale=1.0, offset=0.0, floor=-1e9)
        if bool((rewards != 0).any()):
            return True
    return False


@pytest.mark.parametrize("level", ["group", "cross", "batch"])
@pytest.mark.parametrize("n, prompts", [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("skip_trivial", [True, False])
def test_config_refuses_exactly_when_no_anchor_can_be_valid(level, n, prompts, skip_trivial):
    cfg = load_config(CONF / "tiny.yaml", [f"contrastive.level={level}", f"rollout.n={n}",
                                           f"trainer.prompts_per_step={prompts}", f"contrastive.skip_trivial={skip_trivial}",
                                           "parallel.micro_batch_size=1", "actor.num_mini_batches=1"])
    refused = "no anchor is ever valid" in _problems(cfg)
    assert refused == (not _contrastive_reward_can_vary(level, n, prompts, skip_trivial))
    if refused:  # plain RLVR has no anchors to worry about
        cfg.contrastive.enabled = False
        validate_config(cfg)


def _contrastive_reward_varies(scale, offset, floor) -> bool:
    """The oracle: the real loss and reward on random embeddings and correctness patterns; True when
    two responses' contrastive rewards differ."""
    from clipo_nemo.algorithms.contrastive import contrastive_loss
    from clipo_nemo.algorithms.rewards import contrastive_rewards

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        z = torch.nn.functional.normalize(torch.randn(16, 4, generator=generator), dim=-1)
        correct = torch.rand(16, generator=generator) < 0.5
        out = contrastive_loss(z, correct, torch.arange(16) // 4, temperature=0.05, generator=generator)
        rewards = contrastive_rewards(out.per_anchor_loss, out.valid_anchor_mask, scale=scale, offset=offset, floor=floor)
        if bool((rewards != rewards[0]).any()):
            return True
    return False


@pytest.mark.parametrize("scale, offset, floor, message", [
    (0.2, 0.0, 0.5, "contrastive.reward_floor=0.5 must be below contrastive.reward_offset=0.0"),
    (0.2, 0.3, 0.3, "contrastive.reward_floor=0.3 must be below contrastive.reward_offset=0.3"),
    (0.0, 0.0, -0.5, "contrastive.reward_scale=0.0 must be > 0"),
    (-0.2, 0.0, -0.5, "contrastive.reward_scale=-0.2 must be > 0"),
    (0.2, 0.0, -0.5, None),
    (0.2, 1.0, 0.99, None),
])
def test_settings_that_make_the_contrastive_reward_constant_are_refused(scale, offset, floor, message):
    cfg = load_config(CONF / "tiny.yaml", [f"contrastive.reward_scale={scale}", f"contrastive.reward_offset={offset}",
                                           f"contrastive.reward_floor={floor}"])
    problems = _problems(cfg)
    if message is None:
        assert problems == "" and _contrastive_reward_varies(scale, offset, floor)
    else:
        assert message in problems
        if scale >= 0:  # refused because constant (a negative scale varies, the wrong way round)
            assert not _contrastive_reward_varies(scale, offset, floor)


def test_group_level_with_one_response_per_prompt_names_the_keys():
    cfg = load_config(CONF / "tiny.yaml", ["rollout.n=1", "parallel.micro_batch_size=8"])
    message = _problems(cfg)
    assert "rollout.n=1 with contrastive.level=group" in message and message.count("\n  - ") == 1


# --------------------------------------------------------------------------------------------------
# 9. Values that failed only after the model was built or after the first step
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("verifier.timeout_s=0", "verifier.timeout_s=0.0 must be > 0"),
    ("evaluation.k=0", "evaluation.k=0 must be > 0"),
    ("rollout.max_new_tokens=33", "data.max_prompt_length=32 + rollout.max_new_tokens=33 = 65 tokens exceeds "
                                  "model.max_position_embeddings=64"),
    ("evaluation.max_new_tokens=40", "data.max_prompt_length=32 + evaluation.max_new_tokens=40 = 72 tokens exceeds "
                                     "model.max_position_embeddings=64"),
    ("data.max_prompt_length=61", "data.max_prompt_length=61 + rollout.max_new_tokens=4 = 65 tokens"),
    ("verifier.chunk_size=0", "verifier.chunk_size=0 must be > 0"),
    ("evaluation.top_p=0", "evaluation.top_p=0.0 must be in (0, 1]"),
    ("rollout.temperature=0", "rollout.temperature=0.0 must be > 0"),
])
def test_late_failures_are_config_errors(override, message):
    assert message in _problems(load_config(CONF / "tiny.yaml", [override]))


def test_a_row_exactly_at_the_position_limit_is_fine():
    cfg = load_config(CONF / "tiny.yaml", ["rollout.max_new_tokens=32", "evaluation.max_new_tokens=32"])
    assert cfg.data.max_prompt_length + 32 == cfg.model.max_position_embeddings
    validate_config(cfg)
