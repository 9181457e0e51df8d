"""Autograd all-gather over the data-parallel group and the TP reduction of partial dot products.

Thin wrappers over ``torch.distributed`` and megatron-core's mappings; no math lives here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def comm_device() -> torch.device:
    """Where collective inputs must live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_values(values: Sequence[float], group=None, op=None) -> List[float]:
    """All-reduce a few Python numbers (counts, metrics) in float64; identity without a process group."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor.tolist()


def broadcast_object(obj, src: int, group=None):
    """``obj`` (picklable) from global rank ``src`` to every rank of ``group``; identity alone."""
    if _world(group) == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def gathered_sizes(local_size: int, group) -> List[int]:
    """First-dimension size of every rank's tensor in ``group`` (ranks may hold different counts)."""
    if _world(group) == 1:
        return [local_size]
    mine = torch.tensor([local_size], dtype=torch.long, device=comm_device())
    sizes = [torch.zeros_like(mine) for _ in range(_world(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(local: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenate every rank's ``local`` [b_r, ...] along dim 0, padding to the largest b_r for the wire."""
    longest = max(sizes)
    padded = local.new_zeros(longest, *local.shape[1:], device=comm_device())
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(local.device)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: sum the gradients of every rank (each rank's loss
    may use every rank's rows) and keep this rank's slice, i.e. a reduce-scatter (emulated with an
    all-reduce because gloo has no reduce-scatter; the tensors here are [B, D] embeddings)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, sizes: Tuple[int, ...]):
        ctx.group, ctx.sizes, ctx.device = group, sizes, local.device
        return _all_gather_padded(local, list(sizes), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.to(comm_device()).contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: dist.get_rank(ctx.group)])
        return grad[start: start + ctx.sizes[dist.get_rank(ctx.group)]].to(ctx.device), None, None


def all_gather_rows(local: torch.Tensor, group, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """All-gather ``local`` [b_r, ...] over ``group`` into [sum_r b_r, ...], rank order.

    Differentiable for floating tensors: gradients flow back to the rank that owns each row, summed
    over every rank's use of it. Returns ``local`` itself when the group has one rank.
    """
    if _world(group) == 1:
        return local
    sizes = sizes if sizes is not None else gathered_sizes(local.shape[0], group)
    if local.requires_grad:
        return _AllGatherWithGrad.apply(local, group, tuple(sizes))
    return _all_gather_padded(local, sizes, group)


class GlobalBatch:
    """This DP rank's view of the global batch: gathers per-response tensors from every rank into
    canonical order (sorted by each response's global batch position) and takes this rank's rows
    back out. Ranks may hold different numbers of responses and pieces of the same group.

    batch_index: [b] long, the global position of each of this rank's responses.
    """

    def __init__(self, batch_index: torch.Tensor, group):
        self.group = group
        self.sizes = gathered_sizes(batch_index.shape[0], group)
        self.canonical = torch.argsort(all_gather_rows(batch_index, group, self.sizes))
        rank = dist.get_rank(group) if _world(group) > 1 else 0
        self.local_rows = slice(sum(self.sizes[:rank]), sum(self.sizes[: rank + 1]))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """[b, ...] on each rank -> [B, ...] in canonical order (differentiable for float tensors)."""
        return all_gather_rows(local, self.group, self.sizes)[self.canonical]

    def local(self, canonical: torch.Tensor) -> torch.Tensor:
        """[B, ...] in canonical order -> this rank's [b, ...] rows, in its own order."""
        gathered = torch.empty_like(canonical)
        gathered[self.canonical] = canonical
        return gathered[self.local_rows]


def tensor_parallel_partial_sum(partial: torch.Tensor) -> torch.Tensor:
    """Sum a partial result (e.g. dot products of feature shards) over the tensor-parallel group.

    megatron's reduce_from_tensor_model_parallel_region: all-reduce forward, identity backward —
    right when every TP rank then computes the same loss from the sum.
    """
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return partial
    return tensor_parallel.reduce_from_tensor_model_parallel_region(partial)


def all_reduce_grads(params, group) -> None:
    """Sum ``.grad`` of ``params`` over ``group`` in place (one flat buffer, one collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    if _world(group) == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
