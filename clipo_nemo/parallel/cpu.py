"""The few patches that let megatron-core 0.16 run on a CPU-only machine with gloo.

megatron-core assumes CUDA in a handful of places (measured facts: ``shared/docs/megatron-cpu.md``).
:func:`apply_cpu_patches` neutralises exactly those, and only when ``torch.cuda.is_available()`` is
false, so the GPU path always runs megatron-core unmodified. It is idempotent: call it as often as
you like (``clipo_nemo.parallel.state.init_parallel_state`` calls it).

What is patched, and why:

1. ``torch.cuda.current_device`` answers ``"cpu"``. megatron allocates with
   ``device=torch.cuda.current_device()`` in ``GlobalMemoryBuffer.get_tensor`` (TP/SP scratch
   buffers), ``RotaryEmbedding.get_emb`` (moves ``inv_freq``) and the pipeline p2p shape exchange.
   A CPU build raises there; with this patch those tensors land on CPU.
2. ``torch.cuda.synchronize`` is a no-op: there is nothing to wait for on CPU. Called by the
   pipeline p2p communication and unconditionally by ``dist_checkpointing.save``.
3. ``CudaRNGStatesTracker.add`` / ``.fork`` keep named *CPU* generator states: ``fork`` swaps the
   CPU RNG state in and out, as the original does for the CUDA state. This keeps megatron's
   contract (dropout inside TP regions uses a per-TP-rank stream) instead of silently ignoring it.
4. The pipeline schedules (``forward_backward_no_pipelining`` and the two pipelined ones) create
   tensors with ``device="cuda"`` (e.g. the token counter). While a schedule runs, a
   ``TorchFunctionMode`` rewrites a CUDA ``device=`` keyword of any torch call to CPU. That also
   covers megatron's default causal mask (``device="cuda"`` in ``transformer/utils.py``) when a
   model is called through a schedule.
5. ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied output weight of the last
   pipeline stage with ``.cuda()`` before all-reducing it with the first stage's embedding; while it
   runs, ``Tensor.cuda`` returns the tensor itself (only then: tied embeddings with PP > 1).
6. Activation recomputation (``tensor_parallel.checkpoint``) saves and restores "all RNG states"
   around the recomputed forward: the CPU state (``torch.get_rng_state``, unpatched), the tracker's
   states (CPU ones, by 3.) and the CUDA generator's. Without CUDA there is no CUDA generator:
   its getter returns an empty state and its setter does nothing.
7. ``FullyParallelLoadStrategyWrapper.load`` (megatron's fully parallel load, each data-parallel rank
   reading a share of the replicated tensors) exchanges the shards through buffers made with
   ``init_data("cuda")``, ``torch.empty_like(..., device="cuda")`` and ``Tensor.cuda()``
   (``dist_checkpointing/exchange_utils.py``: ``_get_empty_tensor_for_exchange``,
   ``exchange_loaded_tensors_broadcast``); while it runs, both 4.'s device rewrite and 5.'s
   ``Tensor.cuda`` identity apply, so the exchange runs on CPU tensors over gloo.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator

import torch
from torch.overrides import TorchFunctionMode

_PATCH_MARK = "_clipo_cpu_patched"
_SCHEDULE_NAMES = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
)


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (string, ``torch.device`` or index-less) keywords to CPU."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Dict | None = None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _cpu_rng_add(self, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` for CPU: remember a CPU generator state seeded with ``seed``."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self._is_initialized = True
    self.seeds_.add(seed)
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


@contextlib.contextmanager
def _cpu_rng_fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
    """``CudaRNGStatesTracker.fork`` for CPU: run the block on the named CPU RNG stream."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added (call the parallel-state seeding first)")
    outer_state = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer_state)


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``_get_cuda_rng_state`` without CUDA: there is no CUDA generator, so its state is empty."""
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    """``_set_cuda_rng_state`` without CUDA: nothing to restore."""


def _with_cpu_device_mode(schedule: Callable) -> Callable:
    @functools.wraps(schedule)
    def run_schedule(*args: Any, **kwargs: Any) -> Any:
        with _CudaDeviceToCpu():
            return schedule(*args, **kwargs)

    return run_schedule


def _with_tensor_cuda_as_identity(method: Callable) -> Callable:
    @functools.wraps(method)
    def run_on_cpu(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return run_on_cpu


def apply_cpu_patches() -> bool:
    """Patch megatron-core/torch for CPU execution; a no-op when CUDA is available.

    Returns True when the patches are (now or already) in place, False on a GPU machine.
    """
    if torch.cuda.is_available():
        return False
    if getattr(torch.cuda, _PATCH_MARK, False):
        return True

    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    mcore_random.CudaRNGStatesTracker.add = _cpu_rng_add
    mcore_random.CudaRNGStatesTracker.fork = _cpu_rng_fork
    mcore_random._get_cuda_rng_state = _no_cuda_rng_state
    mcore_random._set_cuda_rng_state = _set_no_cuda_rng_state
    LanguageModule.setup_embeddings_and_output_layer = _with_tensor_cuda_as_identity(
        LanguageModule.setup_embeddings_and_output_layer
    )
    for name in _SCHEDULE_NAMES:
        setattr(schedules, name, _with_cpu_device_mode(getattr(schedules, name)))
    FullyParallelLoadStrategyWrapper.load = _with_tensor_cuda_as_identity(
        _with_cpu_device_mode(FullyParallelLoadStrategyWrapper.load))
    setattr(torch.cuda, _PATCH_MARK, True)
    return True
