"""Reading the sharded part of a checkpoint: megatron's fully parallel load, every data-parallel rank
reading a share of the tensors its replicas all need.

``dist_checkpointing.load`` alone makes every rank read every tensor it needs, so the ``DP``
replicas of a tensor-parallel shard read the same bytes ``DP`` times (at 70B: each node reads the
whole checkpoint). megatron's ``FullyParallelLoadStrategyWrapper`` (``dist_checkpointing/strategies/
fully_parallel.py``; Megatron-LM ``--ckpt-fully-parallel-load``, NeMo ``ckpt_parallel_load``) plans
the load over the data-parallel group with the same greedy distribution as the fully parallel save
(``distribute_shards_to_ranks``), lets each rank read its planned shards through the ordinary
``torch_dist`` strategy and then broadcasts them to the replicas that need them. The result is the
state dict a plain load would return; the files are read about once in total.
"""
from __future__ import annotations

import os
from typing import Any, Dict


def load_sharded(request: Dict[str, Any], checkpoint_dir: str | os.PathLike) -> Dict[str, Any]:
    """``dist_checkpointing.load(request, checkpoint_dir)`` with the load spread over the
    data-parallel group (a group of one loads directly). Collective over the job."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    strategy = FullyParallelLoadStrategyWrapper(
        TorchDistLoadShardedStrategy(), parallel_state.get_data_parallel_group(with_context_parallel=True))
    return dist_checkpointing.load(request, str(checkpoint_dir), sharded_strategy=strategy)
