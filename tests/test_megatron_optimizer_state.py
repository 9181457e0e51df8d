"""Checkpoints of megatron's distributed optimizer before its first step (CPU, megatron's own class).

On an H100 both a save right after the contrastive warm-up (no policy step yet) and the resume of a
fresh run failed inside ``DistributedOptimizer.state_dict`` (``assert len(steps) == 1``): without
Apex/Transformer Engine it reads each parameter's torch-Adam ``step``, which exists only after a step.
``sharded_state.allocate_megatron_optimizer_state`` creates that state; it must be exactly Adam's fresh
state, so the next step equals the first step of an untouched Adam (the oracle).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clipo_nemo.checkpoint.sharded_state import allocate_megatron_optimizer_state


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
    allocate_megatron_optimizer_state(SimpleNamespace(chained_optimizers=[opt]) if chained else opt)
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
    allocate_megatron_optimizer_state(opt)
    for p in mains:
        for key, value in before[id(p)].items():
            assert torch.equal(opt.optimizer.state[p][key], value), key
    assert opt.state_dict()["optimizer"]["param_groups"][0]["step"] == 1


def _loading_optimizer(mains, model_params):
    """A DistributedOptimizer whose parameter-state loader is megatron's own
    ``_set_main_param_and_optimizer_states`` per parameter (what every ``load_parameter_state_from_*``
    ends in, with ``step`` left out of the loaded tensors), and whose non-parameter
    ``load_state_dict`` gives every parameter the checkpoint's ``step`` as megatron's does."""
    opt = _distributed_optimizer(mains, _megatron_like_init_state)
    allocate_megatron_optimizer_state(opt)
    opt.config = SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
    opt.model_param_group_index_map = {p: (0, i) for i, p in enumerate(model_params)}

    def load_state_dict(state_dict):
        step = torch.tensor(float(state_dict["optimizer"]["param_groups"][0]["step"]))
        for state in opt.optimizer.state.values():
            state["step"] = step
        if "param_state" in state_dict:  # megatron goes on to the parameter state
            opt.load_parameter_state_from_fully_reshardable(state_dict["param_state"])

    def load_parameter_state(param_state):
        for model_param, tensors in zip(model_params, param_state):
            opt._set_main_param_and_optimizer_states(model_param, tensors)

    opt.load_state_dict = load_state_dict
    opt.load_parameter_state_from_fully_reshardable = load_parameter_state
    return opt


def test_loading_keeps_step_aside_while_megatron_loads_the_parameter_state():
    from clipo_nemo.checkpoint.sharded_state import load_megatron_optimizer

    model_params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
    saved = [{"param": torch.full(p.shape, 1.5), "exp_avg": torch.full(p.shape, 0.25),
              "exp_avg_sq": torch.full(p.shape, 0.5)} for p in model_params]
    state_dict = {"optimizer": {"param_groups": [{"step": 7}]}, "param_state": saved,
                  "param_state_sharding_type": "fully_reshardable"}
    with pytest.raises(KeyError, match="step"):  # megatron's own call on this path
        _loading_optimizer(_mains(0), model_params).load_state_dict(state_dict)
    mains = _mains(0)
    opt = _loading_optimizer(mains, model_params)
    load_megatron_optimizer(opt, state_dict)
    for main, tensors in zip(mains, saved):
        assert torch.equal(main, tensors["param"])
        state = opt.optimizer.state[main]
        assert torch.equal(state["exp_avg"], tensors["exp_avg"]) and torch.equal(state["exp_avg_sq"], tensors["exp_avg_sq"])
        assert float(state["step"]) == 7
