"""Stand-in for ``tensorrt_llm.llmapi`` (tests only): the one class the engine uses from it."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: Optional[float] = None
    enable_block_reuse: bool = True
