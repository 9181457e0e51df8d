"""The whole configuration check, run before anything is built: the schema's own checks
(:func:`clipo_nemo.config.schema_problems`) plus those that need what sits above the schema: the
registries (policy losses, advantage estimators, contrastive losses, heads, rollout engines), the
model tables (dtypes, recompute modes), the file system (``trainer.init_from``) and the installed
packages (``trainer.loggers``).

It lives above :mod:`clipo_nemo.config` so that the schema imports nothing of the package: every
module may import the schema, and only the trainer's start-up (and tests) import this one.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

from clipo_nemo.algorithms.advantages import ADVANTAGE_ESTIMATORS
from clipo_nemo.algorithms.contrastive import ANCHORS, CONTRASTIVE_LOSSES, LEVELS, ROW_SHIFTS, SIMILARITIES
from clipo_nemo.algorithms.head import HEAD_TYPES
from clipo_nemo.algorithms.policy_losses import AGG_MODES, OWN_AGG_MODES, POLICY_LOSSES
from clipo_nemo.checkpoint.recovery import checkpoints_dir, complete_checkpoints
from clipo_nemo.config import ClipoConfig, ConfigError, architecture_differences, schema_problems
from clipo_nemo.conversion.weights import is_weights_checkpoint, tokenizer_dir
from clipo_nemo.models.forward import POOLING_MODES
from clipo_nemo.models.policy import RECOMPUTE_MODES, TORCH_DTYPES
from clipo_nemo.rollout import ROLLOUT_ENGINES
from clipo_nemo.trainer.trackers import tracker_problems


def registry_problems(cfg: ClipoConfig) -> List[str]:
    """Every key naming a registered variant that is not registered (one message each)."""
    choices = (("algorithm.policy_loss", cfg.algorithm.policy_loss, POLICY_LOSSES),
               ("algorithm.loss_agg_mode", cfg.algorithm.loss_agg_mode, AGG_MODES),
               ("algorithm.adv_estimator", cfg.algorithm.adv_estimator, ADVANTAGE_ESTIMATORS),
               ("contrastive.loss", cfg.contrastive.loss, CONTRASTIVE_LOSSES),
               ("contrastive.level", cfg.contrastive.level, LEVELS),
               ("contrastive.similarity", cfg.contrastive.similarity, SIMILARITIES),
               ("contrastive.anchors", cfg.contrastive.anchors, ANCHORS),
               ("contrastive.pooling", cfg.contrastive.pooling, POOLING_MODES),
               ("contrastive.row_shift", cfg.contrastive.row_shift, ROW_SHIFTS),
               ("contrastive.head.type", cfg.contrastive.head.type, HEAD_TYPES),
               ("rollout.engine", cfg.rollout.engine, ROLLOUT_ENGINES),
               ("model.params_dtype", cfg.model.params_dtype, TORCH_DTYPES),
               ("model.recompute", cfg.model.recompute, RECOMPUTE_MODES))
    return [f"{key}={value!r} is not one of {sorted(options)}" for key, value, options in choices if value not in options]


def init_from_problems(cfg: ClipoConfig) -> List[str]:
    """Why ``trainer.init_from`` cannot be a starting point (empty when it can, or is not set)."""
    init_from = cfg.trainer.init_from
    if not init_from:
        return []
    source = Path(init_from)
    if is_weights_checkpoint(source) or (source / "checkpoints").is_dir() or (source / "meta.json").is_file():
        return []
    return [f"trainer.init_from={init_from!r} is not a clipo-nemo run, one of its checkpoints/step_N, or a converted "
            "checkpoint (a Hugging Face model directory must be converted first: tools/convert_hf_to_megatron.py "
            "--hf DIR --out CKPT)"]


def _vocabulary(tokenizer: str, cfg: ClipoConfig) -> dict:
    """token -> id of the tokenizer ``tokenizer`` (a directory, or "tiny" for the task's own)."""
    if tokenizer == "tiny":
        from clipo_nemo.data.tiny_tokenizer import build_task_tokenizer

        return build_task_tokenizer(cfg.task).get_vocab()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer).get_vocab()


def tokenizer_problems(cfg: ClipoConfig) -> List[str]:
    """A ``trainer.tokenizer`` whose vocabulary is not that of the converted ``trainer.init_from``'s own
    tokenizer (unless ``trainer.allow_tokenizer_mismatch``): its ids would decode to other words."""
    source, chosen = cfg.trainer.init_from, cfg.trainer.tokenizer
    if not source or not chosen or cfg.trainer.allow_tokenizer_mismatch or not is_weights_checkpoint(source):
        return []
    own = tokenizer_dir(source)
    if own is None or (chosen != "tiny" and Path(chosen).resolve() == own.resolve()):
        return []
    if chosen != "tiny" and not Path(chosen).is_dir():
        return []  # reported when the tokenizer is loaded
    theirs, ours = _vocabulary(str(own), cfg), _vocabulary(chosen, cfg)
    if theirs == ours:
        return []
    differing = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda item: item[1])[:3]
    return [f"trainer.tokenizer={chosen!r} has another vocabulary ({len(ours)} tokens) than the tokenizer of the "
            f"converted trainer.init_from={source} ({own}, {len(theirs)} tokens; e.g. token/id pairs in only one "
            f"of them: {differing}): the same ids would decode to other words. Leave trainer.tokenizer empty to use "
            "the checkpoint's, or set trainer.allow_tokenizer_mismatch=true if this tokenizer is known to fit"]


def _changed_architecture(cfg: ClipoConfig, run: Path, role: str) -> List[str]:
    """The architecture keys on which ``cfg`` differs from the run ``run`` (its ``config.yaml``)."""
    from omegaconf import OmegaConf

    saved = run / "config.yaml"
    if not saved.is_file():
        return []
    theirs = OmegaConf.to_container(OmegaConf.load(saved)).get("model") or {}
    return [f"{line} (in {saved}, {role})" for line in architecture_differences(cfg.model, theirs)]


def architecture_change_problems(cfg: ClipoConfig, run_dir: Optional[Path] = None) -> List[str]:
    """Every architecture key (``model.*`` of :data:`~clipo_nemo.config.ARCHITECTURE_KEYS`) that differs
    from the run ``trainer.init_from`` names, and, given ``run_dir``, from the run being resumed there
    (one that holds a complete checkpoint): a checkpoint loads only into the architecture it came from."""
    problems = []
    source = Path(cfg.trainer.init_from) if cfg.trainer.init_from else None
    if source is not None and not is_weights_checkpoint(source):
        run = source.parent.parent if source.parent.name == "checkpoints" else source
        problems += _changed_architecture(cfg, run, f"the run trainer.init_from={cfg.trainer.init_from} names")
    if run_dir is not None and complete_checkpoints(checkpoints_dir(run_dir)):
        problems += _changed_architecture(cfg, Path(run_dir), "the run this one resumes")
    return problems


def validate_config(cfg: ClipoConfig, world_size: int = 1) -> None:
    """Raise :class:`~clipo_nemo.config.ConfigError` listing every key whose value cannot work."""
    algo = cfg.algorithm
    own_mode = OWN_AGG_MODES.get(algo.policy_loss)
    if own_mode is not None and algo.loss_agg_mode != own_mode:
        warnings.warn(f"algorithm.policy_loss={algo.policy_loss} aggregates its policy loss with {own_mode} (SPEC); "
                      f"algorithm.loss_agg_mode={algo.loss_agg_mode} applies to the KL and entropy terms only",
                      stacklevel=2)
    problems = (registry_problems(cfg) + schema_problems(cfg, world_size) + init_from_problems(cfg)
                + tracker_problems(list(cfg.trainer.loggers)))
    problems += (architecture_change_problems(cfg) + tokenizer_problems(cfg)) if not init_from_problems(cfg) else []
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
