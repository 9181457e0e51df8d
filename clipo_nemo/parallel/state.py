"""Process groups for the policy: layout validation, initialisation, seeding and teardown.

Thin wrappers over ``torch.distributed`` and ``megatron.core.parallel_state``. Order of use::

    dp = validate_layout(world_size, cfg.model, cfg.parallel, batch_size=..., group_size=...)
    init_parallel_state(cfg.parallel)        # before any model is built
    ...
    destroy_parallel_state()

Data parallel is what is left: ``DP = world / (TP * PP * CP)``.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

from clipo_nemo.config import ModelConfig, ParallelConfig
from clipo_nemo.parallel.cpu import apply_cpu_patches


class LayoutError(ValueError):
    """The requested parallel layout cannot work for this model, batch or machine."""


def validate_layout(
    world_size: int,
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    batch_size: Optional[int] = None,
    group_size: Optional[int] = None,
    cuda_available: Optional[bool] = None,
) -> int:
    """Check a layout before anything is built; return the data-parallel size.

    Args:
        world_size: number of processes.
        batch_size: responses per training batch over all DP ranks (prompts * group_size), if known.
        group_size: responses sampled per prompt (n), if known.
        cuda_available: defaults to ``torch.cuda.is_available()``; sequence and context parallel
            need GPU kernels.

    Raises:
        LayoutError: listing every problem found, each naming the offending keys and values.
    """
    tp, pp, cp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.context_parallel_size
    on_gpu = torch.cuda.is_available() if cuda_available is None else cuda_available
    problems: List[str] = []
    for name, size in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp),
                       ("context_parallel_size", cp), ("micro_batch_size", parallel.micro_batch_size)):
        if size < 1:
            problems.append(f"parallel.{name}={size} must be >= 1")
    if problems:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(problems))

    model_parallel = tp * pp * cp
    dp = world_size // model_parallel
    if world_size % model_parallel != 0:
        problems.append(
            f"world size {world_size} is not a multiple of TP*PP*CP = {tp}*{pp}*{cp} = {model_parallel}"
        )
    if model.num_attention_heads % tp != 0:
        problems.append(f"model.num_attention_heads={model.num_attention_heads} is not divisible by TP={tp}")
    if model.num_query_groups % tp != 0:
        problems.append(f"model.num_query_groups={model.num_query_groups} is not divisible by TP={tp}")
    if model.num_attention_heads % model.num_query_groups != 0:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={model.num_query_groups}"
        )
    if model.ffn_hidden_size % tp != 0:
        problems.append(f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by TP={tp}")
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads != 0:
        problems.append(
            f"model.hidden_size={model.hidden_size} is not divisible by "
            f"model.num_attention_heads={model.num_attention_heads} (or set model.kv_channels)"
        )
    if model.num_layers % pp != 0:
        problems.append(f"model.num_layers={model.num_layers} is not divisible by PP={pp}")
    if parallel.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs tensor_parallel_size > 1")
    if parallel.sequence_parallel and not on_gpu:
        problems.append(
            "parallel.sequence_parallel=true needs a GPU: megatron-core's sequence-parallel norms come "
            "from Transformer Engine or Apex, which do not run on CPU"
        )
    if cp > 1 and not on_gpu:
        problems.append(
            f"parallel.context_parallel_size={cp} needs a GPU: context-parallel attention is "
            "Transformer Engine's, which does not run on CPU"
        )
    if group_size is not None and group_size < 1:
        problems.append(f"group size {group_size} must be >= 1")
    if batch_size is not None and dp >= 1:
        if group_size is not None and group_size >= 1 and batch_size % group_size != 0:
            problems.append(f"batch size {batch_size} is not a whole number of groups of {group_size}")
        if batch_size % dp != 0:
            problems.append(f"batch size {batch_size} is not divisible by data-parallel size {dp}")
        elif parallel.max_tokens_per_micro_batch == 0 and (batch_size // dp) % parallel.micro_batch_size != 0:
            # With a token budget (> 0) micro-batches are packed by tokens and micro_batch_size is unused.
            problems.append(
                f"per-rank batch {batch_size // dp} (batch {batch_size} / DP {dp}) is not divisible by "
                f"parallel.micro_batch_size={parallel.micro_batch_size} (fixed micro-batches: "
                "parallel.max_tokens_per_micro_batch=0)"
            )
    if problems:
        raise LayoutError(
            f"invalid parallel layout (world={world_size}, TP={tp}, PP={pp}, CP={cp}):\n  - "
            + "\n  - ".join(problems)
        )
    return dp


def init_parallel_state(parallel: ParallelConfig) -> None:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU), megatron's groups and RNG seeds.

    Reads the usual launcher environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
    ``LOCAL_RANK``) unless torch.distributed is already initialised; without a launcher (no
    ``RANK``), it is a single process on a free local port. On CPU the megatron CPU patches are
    applied first. ``parallel.timeout_s`` is the timeout of the default group and of every megatron
    group: a collective still waiting for a peer after that long raises on the ranks that wait.
    """
    from megatron.core import parallel_state

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        apply_cpu_patches()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend, timeout = ("nccl" if on_gpu else "gloo"), timedelta(seconds=parallel.timeout_s)
        if "RANK" in os.environ:  # a launcher (torchrun, SLURM script, run_distributed) set the rendezvous
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A single process. The rendezvous goes in init_method, not os.environ: environment
            # variables would outlive this group and be inherited by every process started later
            # (they would all try to listen on this one port).
            from clipo_nemo.parallel.launcher import free_port

            dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=parallel.timeout_s / 60,  # timedelta(minutes=...) takes fractions
    )
    seed_parallel_rngs(parallel.seed)


def seed_parallel_rngs(seed: int) -> None:
    """Seed torch's default generator (same on every rank) and megatron's per-TP-rank streams.

    On GPU this is megatron's ``model_parallel_cuda_manual_seed``; on CPU the same call keeps CPU
    generator states thanks to :func:`clipo_nemo.parallel.cpu.apply_cpu_patches`.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel_state() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
