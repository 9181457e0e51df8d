"""Training state released while generating, and brought back bit for bit.

Oracle: the same training without the release. megatron's mixed-precision and distributed optimizer
classes are assembled on CPU as in ``tests/test_init_from.py`` (their constructors insist on CUDA),
with Adam over their fp32 main copies, and stepped through megatron's own write-back; the whole
actor (megatron DDP with its gradient buffers, torch AdamW, a reference policy) runs real updates in
a gloo process with a generation in between.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from clipo_nemo.parallel.launcher import run_distributed
from clipo_nemo.trainer.memory_release import offload_tensors, optimizer_tensors, restore_tensors
from test_init_from import _bf16_model, _distributed_optimizer, _float16_optimizer  # tests/ is on sys.path


def _with_adam(opt):
    """megatron's optimizer object with Adam over the same fp32 main copies (the real pairing)."""
    params = [p for group in opt.optimizer.param_groups for p in group["params"]]
    opt.optimizer = torch.optim.Adam(params, lr=1e-2)
    return opt


def _train(opt, model, steps: int, release: bool):
    """``steps`` Adam steps on fixed gradients of the main copies, megatron's write-back to the bf16
    model after each (mixed-precision optimizer); with ``release``, the optimizer's tensors go to host copies and back between
    steps (a generation). Returns the model's weights, the main copies and the moments."""
    mains = [p for group in opt.optimizer.param_groups for p in group["params"]]
    seen = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for p in mains:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.optimizer.step()
        if hasattr(opt, "fp32_from_float16_groups"):  # the distributed one writes back through DDP's buffers
            opt._copy_main_params_to_model_params()
        if release:
            tensors = optimizer_tensors(opt, model.parameters())
            before = [t.data_ptr() for t in tensors]
            moved = offload_tensors(tensors)
            seen.append((len(tensors), sum(a != t.data_ptr() for a, t in zip(before, tensors))))
            restore_tensors(moved)
    state = [v.clone() for s in opt.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in mains], state, seen


@pytest.mark.parametrize("kind", ["float16", "distributed"])
def test_megatron_optimizers_train_bit_identically_after_a_round_trip(kind):
    runs = {}
    for release in (False, True):
        model = _bf16_model(0)
        opt = _with_adam(_float16_optimizer(model) if kind == "float16" else _distributed_optimizer(model, 1, 2))
        runs[release] = _train(opt, model, steps=3, release=release)
    for got, expected in zip(runs[True][:3], runs[False][:3]):
        assert len(got) == len(expected) > 0 and all(torch.equal(a, b) for a, b in zip(got, expected))
    # 3 main copies + Adam's step, exp_avg and exp_avg_sq of each: every one moved, never a model weight
    assert runs[True][3] == [(12, 12)] * 3
    assert runs[False][0][0].dtype == torch.bfloat16


def test_a_torch_optimizer_releases_its_moments_but_never_the_models_parameters():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    tensors = optimizer_tensors(opt, model.parameters())
    assert len(tensors) == 6 and not any(t is p for t in tensors for p in model.parameters())


def _actor_rank(rank, world_size):
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.trainer.equivalence import make_global_batch, tiny_check_config
    from clipo_nemo.trainer.memory_release import training_state_released
    from clipo_nemo.trainer.step import ClipoHead, Experience, learn_from_experience

    warnings.filterwarnings("ignore")
    cfg = tiny_check_config()  # KL on: a reference policy exists
    cfg.actor.optimizer, cfg.actor.lr = "adamw", 1e-2
    init_parallel_state(cfg.parallel)
    try:
        tokens, mask, scores, groups = make_global_batch(cfg)
        exp = Experience(tokens, mask, scores, groups, torch.arange(len(scores)))
        results = {}
        for release in (False, True):
            torch.manual_seed(0)
            actor = Actor.build(cfg)
            actor.sync_reference()
            clipo = ClipoHead.build(cfg)
            sizes = []
            for step in range(2):
                with training_state_released(actor, release):
                    buffers = actor.model.buffers
                    sizes.append(sum(b.grad_data.untyped_storage().size() for b in buffers))
                    actor.module.eval()
                    with torch.no_grad():  # what generation does: the policy's own weights still work
                        length = tokens.shape[1]
                        actor.module(tokens[:1], torch.arange(length)[None],
                                     torch.ones(1, 1, length, length, dtype=torch.bool).triu(1))
                    actor.module.train()
                learn_from_experience(actor, clipo, exp, cfg, step)
            results[release] = ({n: p.detach().clone() for n, p in actor.module.named_parameters()},
                                [v.clone() for s in actor.optimizer.state.values() for v in s.values()], sizes,
                                sum(b.grad_data.untyped_storage().size() for b in actor.model.buffers))
        return results
    finally:
        destroy_parallel_state()


def test_actor_training_is_bit_identical_with_the_release_around_generation():
    results = run_distributed(_actor_rank, 1, timeout_s=240)[0]
    (kept, kept_state, kept_sizes, _), (released, released_state, released_sizes, restored) = results[False], results[True]
    assert kept.keys() == released.keys() and all(torch.equal(kept[n], released[n]) for n in kept)
    assert len(kept_state) == len(released_state) > 0
    assert all(torch.equal(a, b) for a, b in zip(kept_state, released_state))
    assert released_sizes == [0, 0] and min(kept_sizes) > 0 and restored == kept_sizes[0]  # megatron freed, then back
