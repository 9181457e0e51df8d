"""Training state released from the accelerator while the rollout engine generates (``actor.release_for_rollout``).

During generation only the policy's weights and the KV cache are needed. Released:
- the optimizer's own tensors (megatron's fp32 main copies and Adam moments, or ``torch.optim``'s
  moments; never the model's parameters) go to host memory, page-locked on CUDA machines so the copy
  back is fast; the tensor objects stay (their ``.data`` changes, as in megatron's own
  ``MegatronOptimizer.offload_to_cpu``, which copies to pageable memory and only from CUDA), so the
  optimizer's state keys and ``param_groups`` keep pointing at them;
- the DDP gradient buffers, with megatron's ``DistributedDataParallel.offload_grad_buffers`` (the
  storage is resized to 0, every ``main_grad`` view stays valid); ``restore_grad_buffers`` brings
  them back zeroed, as every update starts from zeroed buffers anyway (``Actor._optimizer_step``);
- the reference policy's weights, when they live on the accelerator (``models.policy.move_module``);
- then the allocator's cache is emptied.
Everything is brought back before the log-prob passes and the update, bit for bit
(``tests/test_memory_release.py``, with megatron's own optimizer classes).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch

from clipo_nemo.models.policy import move_module


def optimizer_tensors(optimizer, model_params) -> List[torch.Tensor]:
    """The tensors ``optimizer`` owns: its parameters that are not the model's (megatron's fp32 main
    copies) and its state (moments, step counters). ``optimizer`` is megatron's (chained, mixed
    precision, distributed) or a ``torch.optim`` optimizer; ``model_params`` the model's parameters."""
    own = {id(p) for p in model_params}
    tensors: List[torch.Tensor] = []
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            tensors += [p for p in group["params"] if id(p) not in own]
        for state in inner.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _torch_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for opt in chained for inner in _torch_optimizers(opt)]
    if getattr(optimizer, "is_stub_optimizer", False) or getattr(optimizer, "optimizer", None) is None:
        return []
    return [optimizer.optimizer]


def offload_tensors(tensors: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.device]]:
    """Replace each tensor's data by a host copy (page-locked with CUDA; a fresh copy even on a
    CPU-only machine, so the round trip is the same code everywhere); returns what :func:`restore_tensors` needs."""
    pin = torch.cuda.is_available()
    moved = []
    for tensor in tensors:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        host.copy_(tensor.data)
        moved.append((tensor, tensor.device))
        tensor.data = host
    return moved


def restore_tensors(moved: List[Tuple[torch.Tensor, torch.device]]) -> None:
    """Copy each tensor back to the device it came from."""
    for tensor, device in moved:
        tensor.data = tensor.data.to(device, copy=True, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def training_state_released(actor, enabled: bool = True) -> Iterator[None]:
    """While the block runs (generation), ``actor``'s optimizer state, gradient buffers and
    on-device reference weights are off the accelerator (module docstring); back afterwards."""
    if not enabled:
        yield
        return
    cuda = torch.cuda.is_available()
    moved = offload_tensors(optimizer_tensors(actor.optimizer, list(actor.model.parameters())))
    actor.model.offload_grad_buffers(synchronize=cuda, empty_cache=False)
    reference_device = None
    if actor.reference is not None and not actor.cfg.actor.reference_offload:
        reference_device = next(actor.reference.parameters()).device
        move_module(actor.reference, torch.device("cpu"), pin=cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if reference_device is not None:
            move_module(actor.reference, reference_device)
        actor.model.restore_grad_buffers(synchronize=False)
        restore_tensors(moved)
