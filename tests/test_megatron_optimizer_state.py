"""Checkpoints of megatron's distributed optimizer before its first step (CPU, megatron's own class).

On an H100 both a save right after the contrastive warm-up (no policy step yet) and the resume of a
fresh run failed inside ``DistributedOptimizer.state_dict`` (``assert len(steps) == 1``): without
Apex/Transformer Engine it reads each parameter's torch-Adam ``step``, which exists only after a step.
``checkpoint._allocate_megatron_optimizer_state`` creates that state; it must be exactly Adam's fresh
state, so the next step equals the first step of an untouched Adam (the oracle).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clipo_nemo.trainer.checkpoint import _allocate_megatron_optimizer_state


def _distributed_optimizer(mains, init_state_fn):
    """megatron's DistributedOptimizer around torch Adam over fp32 main shards, as its constructor
    leaves it for ``state_dict`` (the CUDA-only constructor itself cannot run here)."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        pytest.skip("with Apex/TE megatron keeps the step in the param groups; this path is torch Adam's")
    opt = object.__new__(DistributedOptimizer)
    opt.optimizer = torch.optim.Adam(mains, lr=0.1)
    opt.init_state_fn, opt.config, opt.grad_scaler = init_state_fn, SimpleNamespace(), None
    return opt


def _megatron_like_init_state(opt, config=None):
    """What megatron's ``init_state_fn`` for torch Adam does (moments only, no ``step``)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _mains(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]


def test_a_never_stepped_optimizer_cannot_build_its_state_dict_without_the_allocation():
    opt = _distributed_optimizer(_mains(0), _megatron_like_init_state)
    with pytest.raises(AssertionError):
        opt.state_dict()
    _megatron_like_init_state(opt.optimizer)  # megatron's own init: moments but still no step
    with pytest.raises(KeyError, match="step"):
        opt.state_dict()


@pytest.mark.parametrize("chained", [False, True])
def test_the_allocated_state_is_adams_fresh_state(chained):
    mains, fresh = _mains(0), _mains(0)
    opt = _distributed_optimizer(mains, _megatron_like_init_state)
    _allocate_megatron_optimizer_state(SimpleNamespace(chained_optimizers=[opt]) if chained else opt)
    state = opt.state_dict()
    assert state["optimizer"]["param_groups"][0]["step"] == 0
    oracle = torch.optim.Adam(fresh, lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in mains]
        for p, q, g in zip(mains, fresh, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.optimizer.step()
        oracle.step()
        for p, q in zip(mains, fresh):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_existing_state_is_left_alone():
    mains = _mains(0)
    opt = _distributed_optimizer(mains, _megatron_like_init_state)
    for p in mains:
        p.grad = torch.ones_like(p)
    opt.optimizer.step()
    before = {id(p): {k: v.clone() for k, v in opt.optimizer.state[p].items()} for p in mains}
    _allocate_megatron_optimizer_state(opt)
    for p in mains:
        for key, value in before[id(p)].items():
            assert torch.equal(opt.optimizer.state[p][key], value), key
    assert opt.state_dict()["optimizer"]["param_groups"][0]["step"] == 1
