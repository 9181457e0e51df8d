"""Stand-in for ``tensorrt_llm.executor`` (tests only): the Ray executor's placement."""
