"""After weights are loaded into a model whose optimizer already exists: make the optimizer's copy of
the weights the model's, and prove it.

megatron's mixed-precision optimizers (``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``;
GPU only) keep an fp32 *main* copy of every bf16/fp16 parameter, made when the optimizer is built.
Each step updates that copy and writes it back over the model. Weights loaded into the model later
(``trainer.init_from``, a resume whose optimizer state was not restored) are therefore overwritten by
the random initialisation at the first step unless the main copy is refreshed
(``optimizer.reload_model_params()``). ``torch.optim`` (the CPU path) and megatron's
``FP32Optimizer`` update the model's own parameters, so they have no copy to refresh; the check still
proves the optimizer holds the model's parameters (and not, say, those of a model built earlier).

:func:`sync_optimizer_with_model` checks every (model parameter, optimizer copy) pair: the copy cast
to the parameter's dtype must equal the parameter, over the part of the flat parameter the copy
covers (the distributed optimizer holds one data-parallel shard per rank). Where that fails and the
optimizer has main copies, it reloads them from the model (megatron's own method) and checks again.
A main copy that already agrees (a resume that restored the fp32 main copy from the checkpoint) is
kept as it is: reloading it from the bf16 model would throw away its low bits. Any remaining
mismatch, on any rank, is a :class:`StaleOptimizerError` naming the first mismatching parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from clipo_nemo.algorithms.checks import nonfinite_count
from clipo_nemo.parallel.gather import all_reduce_values


class StaleOptimizerError(RuntimeError):
    """The optimizer's copy of the weights is not the model's: its first step would undo a load."""


class NonFiniteWeightsError(RuntimeError):
    """The loaded weights hold NaN or inf (a diverged run's checkpoint, a broken conversion)."""


@dataclass
class WeightCopy:
    """One model parameter and the optimizer's copy of (a flat span of) it."""

    name: str  # the parameter's name in the model
    param: torch.Tensor  # the model's parameter
    copy: torch.Tensor  # what the optimizer updates: the parameter itself, an fp32 main copy, or a flat shard
    span: Optional[Tuple[int, int]] = None  # [start, end) of the flattened parameter that ``copy`` holds; None = all


@dataclass
class SyncReport:
    """What :func:`sync_optimizer_with_model` did on this rank."""

    tensors_checked: int  # (parameter, copy) pairs compared
    reloaded: bool  # the main copies were stale and were reloaded from the model


def _names(model: torch.nn.Module) -> Dict[int, str]:
    return {id(p): name.removeprefix("module.") for name, p in model.named_parameters()}


def _trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _name(names: Dict[int, str], param: torch.Tensor) -> str:
    if id(param) not in names:
        raise StaleOptimizerError(f"the optimizer updates a {tuple(param.shape)} {param.dtype} tensor that is not a "
                                  "parameter of the model it is checked against")
    return names[id(param)]


def weight_copies(optimizer, model: torch.nn.Module) -> List[WeightCopy]:
    """Every (model parameter, optimizer copy) pair of ``optimizer``, read from megatron's attributes.

    ``ChainedOptimizer``: its ``chained_optimizers``. ``DistributedOptimizer``:
    ``model_float16_groups`` / ``shard_fp32_from_float16_groups`` and ``model_fp32_groups`` /
    ``shard_fp32_groups``, each shard's span from ``_get_model_param_range_map``.
    ``Float16OptimizerWithFloat16Params``: ``float16_groups`` / ``fp32_from_float16_groups`` and the
    model's own ``fp32_from_fp32_groups``. Anything else (``torch.optim``, ``FP32Optimizer``): the
    tensors of ``param_groups``, which must be the model's trainable parameters, or as many copies
    of them in the same order.
    """
    names = _names(model)
    if hasattr(optimizer, "chained_optimizers"):
        return [c for inner in optimizer.chained_optimizers for c in weight_copies(inner, model)]
    if hasattr(optimizer, "shard_fp32_from_float16_groups"):
        copies = []
        for model_groups, shard_groups in ((optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups),
                                           (optimizer.model_fp32_groups, optimizer.shard_fp32_groups)):
            for params, shards in zip(model_groups, shard_groups):
                for param, shard in zip(params, shards):
                    if shard is None:
                        raise StaleOptimizerError(
                            f"{_name(names, param)}: the distributed optimizer keeps no main copy of it here "
                            "(precision-aware optimizer), so it cannot be checked against the model")
                    span = optimizer._get_model_param_range_map(param)["param"]
                    copies.append(WeightCopy(_name(names, param), param, shard, (span.start, span.end)))
        return copies
    if hasattr(optimizer, "fp32_from_float16_groups"):
        copies = [WeightCopy(_name(names, param), param, main)
                  for params, mains in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups)
                  for param, main in zip(params, mains)]
        return copies + [WeightCopy(_name(names, p), p, p) for group in optimizer.fp32_from_fp32_groups for p in group]
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if all(id(p) in names for p in held):
        return [WeightCopy(names[id(p)], p, p) for p in held]
    trainable = _trainable(model)
    if len(held) != len(trainable):
        raise StaleOptimizerError(f"the optimizer holds {len(held)} tensors that are not all the model's parameters, "
                                  f"and the model has {len(trainable)} trainable parameters: they cannot be matched")
    return [WeightCopy(names[id(param)], param, copy) for param, copy in zip(trainable, held)]


def first_mismatch(copies: List[WeightCopy]) -> Optional[str]:
    """A description of the first pair whose copy, cast to the parameter's dtype, differs from the
    parameter (over the copy's span); None when every pair is equal."""
    for pair in copies:
        model_part = pair.param.detach()
        if pair.span is not None:
            model_part = model_part.reshape(-1)[pair.span[0]:pair.span[1]]
        copy = pair.copy.detach()
        where = "" if pair.span is None else f" (elements {pair.span[0]}..{pair.span[1]} of the flat parameter)"
        if copy.numel() != model_part.numel():
            return f"{pair.name}{where}: the optimizer's copy has {copy.numel()} elements, the model {model_part.numel()}"
        copy = copy.to(model_part.dtype).reshape(model_part.shape)
        if not torch.equal(copy, model_part):
            diff = (copy.float() - model_part.float()).abs().max().item()
            return f"{pair.name}{where}: the optimizer's copy differs from the model's weights by up to {diff:.3g}"
    return None


def first_nonfinite(copies: List[WeightCopy]) -> Optional[str]:
    """The first model parameter holding NaN or inf, with how many such values; None when all are finite."""
    for pair in copies:
        bad = nonfinite_count(pair.param.detach())
        if bad:
            return f"{pair.name} holds {bad} non-finite value(s) (NaN or inf) of {pair.param.numel()}"
    return None


def _mismatch_on_any_rank(mismatch: Optional[str]) -> bool:
    return all_reduce_values([float(mismatch is not None)], op=dist.ReduceOp.MAX)[0] > 0


def check_optimizer_matches_model(optimizer, model: torch.nn.Module) -> int:
    """Raise :class:`StaleOptimizerError` (on every rank) unless the optimizer's copy of each weight
    equals the model's. Collective when a process group exists. Returns the pairs compared here."""
    copies = weight_copies(optimizer, model)
    mismatch = first_mismatch(copies)
    if _mismatch_on_any_rank(mismatch):
        rank = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
        raise StaleOptimizerError(
            f"{rank}the optimizer's copy of the weights is not the model's, so its first step would overwrite the "
            f"loaded weights: {mismatch or 'a mismatch on another rank (see its error)'}")
    return len(copies)


def sync_optimizer_with_model(optimizer, model: torch.nn.Module) -> SyncReport:
    """Call after loading weights into ``model``: reload stale main copies, then verify every copy.

    ``model`` is the module the optimizer was built over (the DDP wrapper is fine). Collective when a
    process group exists (every rank calls it). Raises :class:`StaleOptimizerError` naming the first
    parameter whose optimizer copy still differs from the model.
    """
    copies = weight_copies(optimizer, model)
    nonfinite = first_nonfinite(copies)  # NaN != NaN: without this check it read as a stale copy "by up to nan"
    if _mismatch_on_any_rank(nonfinite):
        rank = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
        raise NonFiniteWeightsError(f"{rank}the loaded weights are not finite: "
                                    f"{nonfinite or 'a non-finite parameter on another rank (see its error)'}; "
                                    "a run does not train from them (a diverged checkpoint or a broken conversion?)")
    if not _mismatch_on_any_rank(first_mismatch(copies)):
        return SyncReport(len(copies), reloaded=False)  # every copy already equals the model's
    if hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()  # megatron: main copies <- model params (in place, local to the rank)
    return SyncReport(check_optimizer_matches_model(optimizer, model), reloaded=True)
