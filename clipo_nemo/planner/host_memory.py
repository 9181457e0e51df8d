"""Checkpoint cost of a run: bytes each rank writes at a save and reads at a resume, and the host RAM
a node needs for them, from the config alone (the GPU side is :mod:`clipo_nemo.planner.plan`).

What is modelled (GPU runs, megatron's optimizer; the formats are described in
:mod:`clipo_nemo.checkpoint.sharded_state`):

- A step checkpoint holds one copy of the weights (parameter dtype) and of the optimizer state
  (``components.optimizer_bytes_per_parameter``: 12 bytes per bf16 parameter with Adam).
- Weights are replicated over DP; megatron's fully parallel save and load spread each TP/PP shard
  over its DP replicas, so a rank writes and reads ``1/DP`` of its shard.
- Distributed optimizer, ``dp_reshardable`` (the default): each rank writes and reads only its own
  ``1/DP`` optimizer shard. ``fully_reshardable`` (``trainer.reshardable_optimizer_checkpoints``):
  at save the whole TP/PP shard's optimizer state is gathered in the host memory of its DP-rank-0,
  which writes it; at resume every rank allocates and reads its whole TP/PP shard's state.
  Without the distributed optimizer the optimizer state is replicated like the weights.
- Host RAM at save: what a rank writes is staged in host memory first (megatron copies the tensors
  to the host, also for an asynchronous save); at resume what a rank reads. Per node: the sum over
  the ``trainer.gpus_per_node`` consecutive ranks on it (megatron's rank order: TP fastest, then CP,
  DP, PP), the worst node reported.

Not modelled: the trainer process's own host memory (Python, CUDA context, data), the page cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from clipo_nemo.config import ClipoConfig
from clipo_nemo.planner import components as c

GB = 1000 ** 3


@dataclass(frozen=True)
class CheckpointCost:
    """Bytes of one step checkpoint and its per-rank / per-node costs (worst rank, worst node)."""

    checkpoint_bytes: int
    write_bytes_per_rank: int
    read_bytes_per_rank: int
    save_host_bytes_per_node: int
    resume_host_bytes_per_node: int
    gpus_per_node: int
    sharding: str  # "dp_reshardable", "fully_reshardable" or "replicated" (no distributed optimizer)

    def table(self) -> str:
        return "\n".join([
            f"checkpoint cost ({self.sharding} optimizer state, {self.gpus_per_node} GPUs per node):",
            f"  step checkpoint                  {self.checkpoint_bytes / GB:10.1f} GB",
            f"  save: written per rank           {self.write_bytes_per_rank / GB:10.1f} GB",
            f"  save: host RAM per node          {self.save_host_bytes_per_node / GB:10.1f} GB",
            f"  resume: read per rank            {self.read_bytes_per_rank / GB:10.1f} GB",
            f"  resume: host RAM per node        {self.resume_host_bytes_per_node / GB:10.1f} GB"])

    def ram_problem(self, node_ram_gib: float) -> str:
        """'' when both fit ``node_ram_gib`` (0: no check), else what does not."""
        limit = node_ram_gib * 1024 ** 3
        if node_ram_gib <= 0:
            return ""
        worst = max(self.save_host_bytes_per_node, self.resume_host_bytes_per_node)
        if worst <= limit:
            return ""
        return (f"checkpoint save/resume needs {worst / GB:.1f} GB of host RAM per node, more than "
                f"trainer.node_ram_gib={node_ram_gib:g} GiB ({limit / GB:.1f} GB)")


def check_host_memory(cfg: ClipoConfig, world_size: int, *, on_gpu: bool) -> CheckpointCost:
    """The trainer's start-up check: the checkpoint cost, raising ValueError (naming
    ``trainer.node_ram_gib``) when a node's host RAM is too small for a save or a resume."""
    cost = checkpoint_cost(cfg, world_size, on_gpu=on_gpu)
    problem = cost.ram_problem(cfg.trainer.node_ram_gib)
    if problem:
        raise ValueError(f"{problem}. Use the distributed optimizer with dp_reshardable checkpoints "
                         "(trainer.reshardable_optimizer_checkpoints=false), more data-parallel ranks, or set "
                         f"trainer.node_ram_gib to the nodes' real RAM (0 skips the check):\n{cost.table()}")
    return cost


def checkpoint_cost(cfg: ClipoConfig, world_size: int, *, on_gpu: bool = True) -> CheckpointCost:
    """The checkpoint cost of ``cfg`` on ``world_size`` ranks (GPU accounting unless ``on_gpu`` is false)."""
    par, model = cfg.parallel, cfg.model
    tp, pp, cp = par.tensor_parallel_size, par.pipeline_parallel_size, par.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not a multiple of TP*PP*CP = {tp * pp * cp}")
    dp = world_size // (tp * pp)  # CP ranks hold the same shard: they replicate like DP ranks
    gpus = max(1, min(cfg.trainer.gpus_per_node, world_size))
    dtype = c.dtype_bytes(model)
    opt_per_param = c.optimizer_bytes_per_parameter(model, cfg.actor.optimizer, on_gpu)
    distributed = on_gpu and cfg.actor.use_distributed_optimizer
    sharding = ("replicated" if not distributed else
                "fully_reshardable" if cfg.trainer.reshardable_optimizer_checkpoints else "dp_reshardable")
    total_params = c.stage_parameters(model, 1, 1, 0)
    shard = max(c.stage_parameters(model, tp, pp, stage) for stage in range(pp))  # one TP/PP shard
    weights_share, optimizer_shard = shard * dtype // dp, shard * opt_per_param
    own_optimizer = optimizer_shard // dp
    write, read = weights_share + own_optimizer, weights_share + own_optimizer
    save_per_rank: List[int] = [write] * world_size
    resume_per_rank: List[int] = [read] * world_size
    if sharding == "fully_reshardable":
        read = weights_share + optimizer_shard
        resume_per_rank = [read] * world_size
        for rank in range(world_size):  # the DP-rank-0 of each TP/PP group gathers and writes it all
            dp_rank = (rank // (tp * cp)) % (world_size // (tp * cp * pp))
            save_per_rank[rank] = weights_share + (optimizer_shard if dp_rank == 0 else 0)
        write = max(save_per_rank)
    per_node = lambda per_rank: max(sum(per_rank[start:start + gpus]) for start in range(0, world_size, gpus))
    return CheckpointCost(total_params * (dtype + opt_per_param), write, read, per_node(save_per_rank),
                          per_node(resume_per_rank), gpus, sharding)
