"""What of the policy, head and optimizers goes into a checkpoint, as megatron ``dist_checkpointing``
sharded state: the head's whole-head sharded tensors, a ``torch.optim`` optimizer's moments shaped like
its parameters, megatron's own optimizer (its format, its state allocation and its load), and which
rank's copy of a replicated value is written, and loading a requested state back into modules.
:mod:`clipo_nemo.checkpoint.contents` assembles these into a save or load request.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from clipo_nemo.checkpoint.recovery import CheckpointError
from clipo_nemo.models.head import ParallelContrastiveHead, layer_names

# megatron's distributed-optimizer checkpoint formats (``DistributedOptimizer.sharded_state_dict``):
# "dp_reshardable" (the default here, as in Megatron-LM and NeMo): every rank writes and reads only its
# own shard of the flat optimizer buffers, with no gather; it loads at another DP size but not at another
# TP/PP. "fully_reshardable" (``trainer.reshardable_optimizer_checkpoints``): model-shaped moments that
# load at any TP/PP/DP, gathered over the DP group to DP rank 0 at save (megatron's memory-efficient
# variant) and read whole per TP shard at resume. "fully_sharded_model_space" relies on flattened sharded
# tensors, which megatron-core 0.16 refuses ("flattened_range is not supported", seen on an H100).
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"


def megatron_optimizer_metadata(sharding: str) -> Dict[str, Any]:
    """The ``metadata`` argument of megatron's ``DistributedOptimizer.sharded_state_dict`` for a format."""
    if sharding not in (DP_RESHARDABLE, FULLY_RESHARDABLE):
        raise ValueError(f"unknown distributed-optimizer checkpoint format {sharding!r}")
    return {"distrib_optim_sharding_type": sharding,
            "distrib_optim_fully_reshardable_mem_efficient": sharding == FULLY_RESHARDABLE}


_EXTRA_STATE = "_extra_state"  # state-dict key suffix of a module's extra state (TE: its FP8 metadata)


def replica_id(main_on_last_stage: bool, tp_replicated: bool) -> Tuple[int, int, int]:
    """dist_checkpointing replica id (all zeros = the copy that is written).

    The policy optimizer's scalars are written by the first stage; the head lives (is trained) on the
    last pipeline stage, so its copies on the other stages are never the main replica.
    """
    from megatron.core import parallel_state as ps

    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    pp_id = pp_size - 1 - pp_rank if main_on_last_stage else pp_rank
    tp_id = ps.get_tensor_model_parallel_rank() if tp_replicated else 0
    return pp_id, tp_id, ps.get_data_parallel_rank(with_context_parallel=True)


def head_parameters(head: ParallelContrastiveHead) -> Dict[str, torch.nn.Parameter]:
    """The head's weights by their whole-head name (``proj.weight``, ...), in either TP mode."""
    if head.tp_mode == "replicated":
        return dict(head.head.named_parameters())
    return {name: layer.weight for name, layer in zip(layer_names(head.head_type), head.layers)}


def head_sharded_state_dict(head: ParallelContrastiveHead) -> Dict[str, Any]:
    """ShardedTensors ``head.<name>`` of global shape [out, in]: whole on every rank (``replicated``)
    or split along dim 0 over TP (``column``), so either mode reads the other's checkpoint."""
    from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

    sharded = {}
    for name, param in head_parameters(head).items():
        if head.tp_mode == "column":
            sharded[name] = make_tp_sharded_tensor_for_checkpoint(
                param, f"head.{name}", tp_axis=0, replica_id=replica_id(True, tp_replicated=False))
        else:
            sharded[name] = make_sharded_tensor_for_checkpoint(
                param, f"head.{name}", replica_id=replica_id(True, tp_replicated=True))
    return sharded


def torch_optimizer_params(optimizer: torch.optim.Optimizer) -> List[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def torch_optimizer_moment_keys(optimizer: torch.optim.Optimizer) -> List[str]:
    """The per-parameter state tensors (e.g. AdamW's exp_avg, exp_avg_sq); [] before the first step.

    Raises CheckpointError if only some parameters have state (it would not reshard)."""
    states = [optimizer.state.get(p, {}) for p in torch_optimizer_params(optimizer)]
    keys = {tuple(sorted(k for k in s if k != "step")) for s in states}
    if len(keys) > 1:
        raise CheckpointError(f"{type(optimizer).__name__} has different state keys per parameter: {sorted(keys)}")
    return list(keys.pop()) if keys else []


def torch_optimizer_sharded_state_dict(optimizer: torch.optim.Optimizer, params_sharded: Dict[str, Any],
                                       name: str, moment_keys: List[str], main_on_last_stage: bool,
                                       loading: bool) -> Dict[str, Any]:
    """A ``torch.optim`` optimizer's state as sharded tensors shaped like the parameters it updates.

    ``params_sharded`` is the sharded state dict holding those parameters (matched by identity, as
    megatron's own optimizers do). Each moment becomes ``optimizer.state.<moment>.<param key>``; the
    step (shared by all parameters) and the param-group hyperparameters become one ShardedObject
    ``<name>.scalars``. With ``loading`` the moments are zero placeholders to be filled by ``load``.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map, make_sharded_optimizer_tensor)

    from megatron.core import parallel_state

    params = torch_optimizer_params(optimizer)
    param_map = get_param_id_to_sharded_param_map(params_sharded, params)
    # The head trains on the last stage only: elsewhere its optimizer has no moments, and its copies
    # there are replicas that are never written (zeros stand in).
    never_written = main_on_last_stage and not parallel_state.is_pipeline_last_stage()
    moments, steps = {}, []
    for index, param in enumerate(params):
        if index not in param_map:
            raise CheckpointError(f"{name}: optimizer parameter #{index} {tuple(param.shape)} is not in the "
                                  "model's sharded state dict")
        state = optimizer.state.get(param, {})
        for key in moment_keys:
            if not (loading or key in state or never_written):
                raise CheckpointError(f"{name}: optimizer parameter #{index} {tuple(param.shape)} has no "
                                      f"{key!r} state while other parameters or ranks have it")
            value = state[key] if key in state and not loading else torch.zeros_like(param)
            moments[f"{index}.{key}"] = make_sharded_optimizer_tensor(param_map[index], value, f"optimizer.state.{key}")
        if not loading and "step" in state:
            steps.append(state["step"])
    if any(not torch.equal(torch.as_tensor(s), torch.as_tensor(steps[0])) for s in steps):
        raise CheckpointError(f"{name}: the optimizer step differs between parameters")
    scalars = {"step": steps[0].clone() if steps and torch.is_tensor(steps[0]) else (steps[0] if steps else None),
               "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}
    return {"moments": moments,
            "scalars": ShardedObject(f"{name}.scalars", scalars, (1,), (0,),
                                     replica_id=replica_id(main_on_last_stage, tp_replicated=True))}


def load_torch_optimizer(optimizer: torch.optim.Optimizer, loaded: Dict[str, Any], moment_keys: List[str], name: str):
    """Put loaded moments, step and hyperparameters into ``optimizer`` (torch's own load_state_dict)."""
    scalars = loaded["scalars"]
    current = optimizer.state_dict()["param_groups"]
    if len(scalars["param_groups"]) != len(current):
        raise CheckpointError(f"{name}: checkpoint has {len(scalars['param_groups'])} parameter groups, "
                              f"the optimizer {len(current)}")
    state = {}
    for index in range(len(torch_optimizer_params(optimizer))):
        state[index] = {key: loaded["moments"][f"{index}.{key}"] for key in moment_keys}
        if scalars["step"] is not None:
            state[index]["step"] = scalars["step"].clone() if torch.is_tensor(scalars["step"]) else scalars["step"]
    groups = [{**saved, "params": group["params"]} for saved, group in zip(scalars["param_groups"], current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def is_megatron_optimizer(optimizer: Any) -> bool:
    return not isinstance(optimizer, torch.optim.Optimizer)


def moment_keys_over_ranks(optimizer: Optional[torch.optim.Optimizer]) -> List[str]:
    """Moment keys of an optimizer that may have state on some ranks only (the head trains on the
    last pipeline stage only). Collective."""
    gathered: List[Optional[List[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, torch_optimizer_moment_keys(optimizer) if optimizer is not None else [])
    return max(gathered, key=len)


def allocate_megatron_optimizer_state(optimizer: Any) -> None:
    """Give a megatron optimizer that has not stepped yet the per-parameter state a step would create.

    Without Apex/Transformer Engine, megatron's optimizers wrap ``torch.optim.Adam``, and their
    ``state_dict()`` (called to build both the save and the load request) reads each parameter's
    ``step``, which torch only creates at the first step; megatron's own ``init_state_fn`` allocates
    the moments but not ``step``. Found on an H100: a checkpoint saved after the contrastive warm-up
    (head-only steps, no policy step yet) and the resume of a fresh run both failed in
    ``DistributedOptimizer.state_dict``. Zero moments at step 0 are exactly Adam's fresh state (the
    next step counts as the first), and when loading they are placeholders that ``load_state_dict``
    replaces. Parameters that already have state are left alone.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        init_state_fn = getattr(sub, "init_state_fn", None)
        if init_state_fn is not None:
            init_state_fn(inner, getattr(sub, "config", None))
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def load_megatron_optimizer(optimizer: Any, state_dict: Dict[str, Any]) -> None:
    """megatron's own ``load_state_dict``, working around its torch-Adam path (no Apex/TE).

    There, megatron-core 0.16's ``DistributedOptimizer.load_state_dict`` first gives every
    parameter's state the checkpoint's ``step`` and then loads the sharded parameter state, whose
    ``_set_main_param_and_optimizer_states`` copies *every* state key from the loaded tensors,
    which never include ``step`` (it is skipped on purpose): ``KeyError: 'step'`` (seen on an H100
    resuming the tiny run). So the non-parameter part is loaded by megatron, ``step`` is held aside
    while megatron loads the parameter state with its own method for the saved sharding type, and
    then put back. With Apex/TE (NGC containers) megatron's call is used unchanged.
    """
    from megatron.core.optimizer import distrib_optimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if (distrib_optimizer.HAVE_APEX_OR_TE or len(subs) != 1 or "param_state" not in state_dict
            or not isinstance(subs[0], distrib_optimizer.DistributedOptimizer)):
        optimizer.load_state_dict(state_dict)
        return
    sub = subs[0]
    rest = {k: v for k, v in state_dict.items() if k not in ("param_state", "param_state_sharding_type")}
    sharding = state_dict["param_state_sharding_type"]
    load_parameter_state = getattr(sub, f"load_parameter_state_from_{_PARAM_STATE_LOADERS[sharding]}")
    sub.load_state_dict(rest)
    steps = {param: state.pop("step") for param, state in sub.optimizer.state.items() if "step" in state}
    try:
        load_parameter_state(state_dict["param_state"])
    finally:
        for param, step in steps.items():
            sub.optimizer.state[param]["step"] = step


# megatron's parameter-state sharding types and the suffix of their ``load_parameter_state_from_*``
_PARAM_STATE_LOADERS = {"fully_reshardable": "fully_reshardable", "dp_reshardable": "dp_reshardable",
                        "fully_sharded_model_space": "fs_model_space", "dp_zero_gather_scatter": "dp_zero"}


def drop_extra_state_missing_from(request: Dict[str, Any], checkpoint_dir: str | os.PathLike) -> List[str]:
    """Remove (in place, at any depth) the ``_extra_state`` entries of a requested sharded state dict
    that the checkpoint at ``checkpoint_dir`` does not hold; return their state-dict keys.

    Transformer Engine layers add one ``_extra_state`` ShardedObject per module (their FP8
    metadata); a checkpoint written with megatron's local layers has none, and requesting them would
    fail the load. The modules keep their freshly built extra state (see :func:`load_module_state`).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved: Optional[set] = None  # the checkpoint's keys, read only once an _extra_state entry is requested
    dropped: List[str] = []

    def visit(node: Dict[str, Any]) -> None:
        nonlocal saved
        for key, value in list(node.items()):
            if isinstance(value, dict):
                visit(value)
            elif isinstance(value, ShardedBase) and value.key.endswith(_EXTRA_STATE):
                if saved is None:
                    saved = {entry.key for entry in load_sharded_metadata(str(checkpoint_dir)).values()}
                if value.key not in saved:
                    dropped.append(key)
                    del node[key]

    visit(request)
    return dropped


def load_module_state(module: torch.nn.Module, state_dict: Dict[str, Any]) -> None:
    """``module.load_state_dict`` that accepts missing ``_extra_state`` entries (a checkpoint of
    megatron's local layers loaded into Transformer Engine layers) and nothing else missing or extra."""
    result = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(_EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{type(module).__name__}: checkpoint lacks {missing[:5]} and has unexpected "
                              f"{result.unexpected_keys[:5]} (of {len(missing)} / {len(result.unexpected_keys)})")


def without_prefix(state_dict: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """A module's state dict from its sharded state dict's keys (which carry the save prefix)."""
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}
