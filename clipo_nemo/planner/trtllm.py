"""The TensorRT-LLM engine's share of a GPU when ``rollout.engine=trtllm`` (colocated with training).

Per GPU, the engine holds (``clipo_nemo.rollout.trtllm_engine``):

- ``engine_weights``: the whole model sharded over tensor parallel ``TP x PP`` (the engine has no
  pipeline stages), in ``rollout.trtllm_dtype`` (2 bytes): :func:`components.stage_parameters` at
  ``(TP x PP, PP=1)``; on the GPU while generating, and while training too with
  ``rollout.trtllm_sleep_weights=false``;
- ``engine_kv_cache``: ``rollout.trtllm_kv_cache_gb`` (the engine's ``KvCacheConfig.max_tokens``),
  only while generating (released for training).

During generation the trainer keeps its static state (weights, gradient buffer, optimizer, head,
reference, score buffer) but returns its cached activations (``torch.cuda.empty_cache`` before the
wake-up), and the megatron engine's KV cache and generation logits do not exist.
"""
from __future__ import annotations

from typing import Dict, List

from clipo_nemo.config import ClipoConfig
from clipo_nemo.planner import components as c

GIB = 1024 ** 3
ENGINE_DTYPE_BYTES = 2  # rollout.trtllm_dtype is bfloat16 or float16


def engine_bytes(cfg: ClipoConfig) -> Dict[str, int]:
    """``engine_weights`` and ``engine_kv_cache`` bytes per GPU (see the module docstring)."""
    mp = cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size
    return {"engine_weights": c.stage_parameters(cfg.model, mp, 1, 0) * ENGINE_DTYPE_BYTES,
            "engine_kv_cache": int(cfg.rollout.trtllm_kv_cache_gb * GIB)}


def apply_trtllm_engine(cfg: ClipoConfig, phases: Dict[str, Dict[str, int]], notes: List[str]) -> None:
    """Replace the megatron engine's generation memory by the TensorRT-LLM engine's, in place."""
    engine = engine_bytes(cfg)
    phases["rollout"].update(kv_cache=0, generation_logits=0, **engine)
    resident = engine["engine_weights"] if not cfg.rollout.trtllm_sleep_weights else 0
    for phase in ("logprobs", "update"):
        phases[phase].update(engine_weights=resident, engine_kv_cache=0)
    note = (f"rollout.engine=trtllm: the engine's weights ({engine['engine_weights'] / GIB:.2f} GiB, bf16 at "
                 f"TP x PP) and KV cache ({engine['engine_kv_cache'] / GIB:g} GiB, rollout.trtllm_kv_cache_gb) share "
                 "the GPU with the trainer's static state while generating"
                 + ("; its weights stay on the GPU while training (rollout.trtllm_sleep_weights=false)" if resident
                    else "; released while training (TensorRT-LLM 1.2 keeps a pinned host copy of the weights)"))
    if note not in notes:
        notes.append(note)
