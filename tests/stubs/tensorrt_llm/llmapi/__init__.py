"""Stand-in for ``tensorrt_llm.llmapi`` (tests only): ``KvCacheConfig`` and the ``LLM`` class.

``KvCacheConfig`` (``llmapi/llm_args.py``): ``free_gpu_memory_fraction`` (of the memory free when the
engine starts) and ``max_tokens`` both bound the cache; the smaller wins.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: Optional[float] = None
    max_tokens: Optional[int] = None
    enable_block_reuse: bool = True


from tensorrt_llm.llmapi.llm import LLM  # noqa: E402
