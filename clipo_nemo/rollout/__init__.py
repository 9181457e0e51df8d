"""Rollout engines (a registry): ``megatron`` generates with the policy's own megatron-core model,
``trtllm`` with TensorRT-LLM refitted in place (``tensorrt_llm`` is imported only when it is built)."""
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
from clipo_nemo.rollout import trtllm_engine  # noqa: F401  (registers "trtllm")

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP", "ROLLOUT_ENGINES", "GenerationParams", "MegatronRolloutEngine",
    "RolloutEngine", "RolloutOutput", "build_rollout_engine", "register_rollout_engine",
]
