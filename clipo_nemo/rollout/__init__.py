"""Rollout engines (a registry): ``megatron`` generates with the policy's own megatron-core model."""
from clipo_nemo.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    ROLLOUT_ENGINES,
    GenerationParams,
    RolloutEngine,
    RolloutOutput,
    build_rollout_engine,
    register_rollout_engine,
)
from clipo_nemo.rollout import megatron_engine  # noqa: F401  (registers "megatron")
from clipo_nemo.rollout.megatron_engine import MegatronRolloutEngine

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP", "ROLLOUT_ENGINES", "GenerationParams", "MegatronRolloutEngine",
    "RolloutEngine", "RolloutOutput", "build_rollout_engine", "register_rollout_engine",
]
