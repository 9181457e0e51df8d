"""What a step checkpoint holds, shared by :mod:`~clipo_nemo.checkpoint.save` and
:mod:`~clipo_nemo.checkpoint.load`: the format number, the parallel layout, ``meta.json``'s
description of the contents, the sharded state dict to write or to request, and the per-rank RNG
states.

The package works on two small interfaces rather than on the trainer's classes (the trainer imports
this package, not the other way round): :class:`PolicyState` (``clipo_nemo.trainer.actor.Actor``
is one) and :class:`HeadState` (``clipo_nemo.trainer.step.ClipoHead``).
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Dict, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from clipo_nemo.checkpoint.recovery import CheckpointWarning
from clipo_nemo.checkpoint.sharded_state import (
    DP_RESHARDABLE, FULLY_RESHARDABLE, allocate_megatron_optimizer_state, head_sharded_state_dict, is_megatron_optimizer,
    megatron_optimizer_metadata, moment_keys_over_ranks, torch_optimizer_moment_keys, torch_optimizer_sharded_state_dict)
from clipo_nemo.models.head import ParallelContrastiveHead

FORMAT_VERSION = 3  # 3: megatron optimizer format named (dp_reshardable by default); 2: reference pointer (1: inline)
READABLE_FORMATS = (1, 2, 3)


class PolicyState(Protocol):
    """The policy side of a checkpoint: the trained model (a megatron GPTModel piece, DDP-unwrapped),
    the frozen reference (None with the KL loss off), the policy optimizer and the run's config
    (``cfg.model.vocab_size`` sizes a converted reference)."""

    cfg: Any
    reference: Optional[torch.nn.Module]
    optimizer: Any

    @property
    def module(self) -> torch.nn.Module: ...


class HeadState(Protocol):
    """The contrastive head and its optimizer (None when the head is fixed)."""

    head: ParallelContrastiveHead
    optimizer: Optional[torch.optim.Optimizer]


def current_layout() -> Dict[str, int]:
    """This job's world size and TP/PP/DP sizes, as ``meta.json`` records them."""
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def megatron_sharding_to_save(cfg: Any) -> str:
    """The distributed-optimizer format this run saves (``trainer.reshardable_optimizer_checkpoints``)."""
    return FULLY_RESHARDABLE if cfg.trainer.reshardable_optimizer_checkpoints else DP_RESHARDABLE


def megatron_sharding(policy_optimizer: Dict[str, Any]) -> str:
    """The distributed-optimizer format of a checkpoint's ``policy_optimizer`` entry (checkpoints that do
    not name one were saved as fully reshardable, the only format then)."""
    return policy_optimizer.get("sharding", FULLY_RESHARDABLE)


def describe_contents(policy: PolicyState, clipo_head: Optional[HeadState]) -> Dict[str, Any]:
    """meta.json's description of what this job saves (the same on every rank). Collective."""
    head_moments = moment_keys_over_ranks(clipo_head.optimizer if clipo_head is not None else None)
    megatron_opt = is_megatron_optimizer(policy.optimizer)
    return {
        "format": FORMAT_VERSION,
        "layout": current_layout(),
        "reference": policy.reference is not None,
        "head": None if clipo_head is None else {"type": clipo_head.head.head_type, "tp_mode": clipo_head.head.tp_mode},
        "policy_optimizer": {"kind": "megatron" if megatron_opt else type(policy.optimizer).__name__,
                             "moments": [] if megatron_opt else torch_optimizer_moment_keys(policy.optimizer),
                             **({"sharding": megatron_sharding_to_save(policy.cfg)} if megatron_opt else {})},
        "head_optimizer": None if clipo_head is None or clipo_head.optimizer is None else
        {"kind": type(clipo_head.optimizer).__name__, "moments": head_moments},
    }


def checkpoint_sharded_state_dict(policy: PolicyState, clipo_head: Optional[HeadState], contents: Dict[str, Any],
                                  loading: bool) -> Dict[str, Any]:
    """The sharded state dict to save, or (``loading``) to request: only what ``contents`` lists."""
    policy_sharded = policy.module.sharded_state_dict(prefix="policy.")
    sharded: Dict[str, Any] = {"policy": policy_sharded}
    if contents["reference"] is True and policy.reference is not None:  # format 1: stored inline
        sharded["reference"] = policy.reference.sharded_state_dict(prefix="reference.")
    popt = contents["policy_optimizer"]
    if popt is not None:
        if is_megatron_optimizer(policy.optimizer):
            allocate_megatron_optimizer_state(policy.optimizer)
            sharded["policy_optimizer"] = policy.optimizer.sharded_state_dict(
                policy_sharded, is_loading=loading, metadata=megatron_optimizer_metadata(megatron_sharding(popt)))
        else:
            sharded["policy_optimizer"] = torch_optimizer_sharded_state_dict(
                policy.optimizer, policy_sharded, "policy_optimizer", popt["moments"], main_on_last_stage=False,
                loading=loading)
    if contents["head"] is not None and clipo_head is not None:
        head = head_sharded_state_dict(clipo_head.head)
        sharded["head"] = head
        hopt = contents["head_optimizer"]
        if hopt is not None and clipo_head.optimizer is not None:
            sharded["head_optimizer"] = torch_optimizer_sharded_state_dict(
                clipo_head.optimizer, head, "head_optimizer", hopt["moments"], main_on_last_stage=True, loading=loading)
    return sharded


def rng_states() -> Dict[str, Any]:
    """This rank's RNG states: python, numpy, torch, CUDA (on a GPU) and megatron's tracker."""
    from megatron.core import tensor_parallel

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    from megatron.core import tensor_parallel

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(states["tracker"]))


def warn_once(message: str) -> None:
    """A :class:`CheckpointWarning` from rank 0 only (every rank reaches the same conclusion)."""
    if dist.get_rank() == 0:
        warnings.warn(message, CheckpointWarning, stacklevel=3)
