"""Layout planner: per-GPU memory of a run from its config, before anything is built.

``plan_memory(cfg, world_size, gpu_memory_gib)`` gives a :class:`MemoryPlan` (components per phase,
peak, ``fits``); ``check_memory_plan`` is the trainer's start-up refusal; ``recommend_layout`` searches
layouts for the named model presets. CLI: ``tools/plan_layout.py``.
"""
from clipo_nemo.planner.plan import GIB, Layout, MemoryPlan, MemoryPlanError, check_memory_plan, plan_memory
from clipo_nemo.planner.recommend import MODEL_PRESETS, Recommendation, recommend_layout, recommendations

__all__ = ["GIB", "Layout", "MemoryPlan", "MemoryPlanError", "MODEL_PRESETS", "Recommendation",
           "check_memory_plan", "plan_memory", "recommend_layout", "recommendations"]
