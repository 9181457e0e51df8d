"""Starting a run from converted weights, and the guard that makes loaded weights survive the optimizer.

The guard tests drive megatron's own mixed-precision optimizer classes on CPU: their constructors
insist on CUDA tensors, so the objects are assembled here with exactly the attributes megatron's
constructors set (bf16 model parameters, fp32 main copies made *before* the load), and megatron's own
``reload_model_params`` / ``_copy_main_params_to_model_params`` run on them.
"""
import pytest
import torch

from clipo_nemo.trainer.load_guard import (
    StaleOptimizerError, check_optimizer_matches_model, sync_optimizer_with_model)


def _bf16_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.Linear(8, 3)).to(torch.bfloat16)


def _load(model: torch.nn.Module, seed: int) -> dict:
    """Overwrite every weight in place (what a checkpoint load does); returns the loaded values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _float16_optimizer(model):
    """megatron's Float16OptimizerWithFloat16Params as its constructor leaves it (minus the CUDA checks)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    opt = object.__new__(Float16OptimizerWithFloat16Params)
    params = list(model.parameters())
    mains = [p.detach().clone().float() for p in params]
    opt.optimizer = torch.optim.SGD(mains, lr=0.0)
    opt.is_stub_optimizer, opt._dummy_overflow_buf = False, None
    opt.float16_groups, opt.fp32_from_float16_groups, opt.fp32_from_fp32_groups = [params], [mains], [[]]
    return opt


def _distributed_optimizer(model, rank: int, dp_size: int):
    """megatron's DistributedOptimizer for DP rank ``rank`` of ``dp_size``: fp32 main copies of this
    rank's contiguous share of each flat parameter (megatron's ``Range`` objects)."""
    from types import SimpleNamespace

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range

    opt = object.__new__(DistributedOptimizer)
    params, shards, ranges = list(model.parameters()), [], {}
    for p in params:
        per_rank = -(-p.numel() // dp_size)
        span = Range(min(rank * per_rank, p.numel()), min((rank + 1) * per_rank, p.numel()))
        ranges[p] = {"param": span}
        shards.append(p.detach().view(-1)[span.start:span.end].clone().float())
    opt.optimizer = torch.optim.SGD(shards, lr=0.0)
    opt.is_stub_optimizer = False
    opt.config = SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
    opt.ddp_config = SimpleNamespace(use_megatron_fsdp=False)
    opt.model_param_gbuf_map = {p: (0, p.dtype, 0) for p in params}
    opt.gbuf_ranges = [{params[0].dtype: [{"param_map": ranges}]}]
    opt.model_float16_groups, opt.shard_fp32_from_float16_groups = [params], [shards]
    opt.model_fp32_groups, opt.shard_fp32_groups, opt.shard_float16_groups = [[]], [[]], [[]]
    return opt


def test_guard_fires_on_megatron_main_copies_made_before_the_load_and_reload_fixes_them():
    model = _bf16_model(0)
    opt = _float16_optimizer(model)
    assert check_optimizer_matches_model(opt, model) == 3  # fresh: the main copies are the model's
    loaded = _load(model, seed=1)
    with pytest.raises(StaleOptimizerError, match=r"0\.weight: the optimizer's copy differs from the model's weights"):
        check_optimizer_matches_model(opt, model)
    # Without the guard, megatron's write-back after a step restores the pre-load weights:
    stale = _bf16_model(0)
    stale_opt = _float16_optimizer(stale)
    _load(stale, seed=1)
    stale_opt._copy_main_params_to_model_params()
    assert torch.equal(stale[0].weight, _bf16_model(0)[0].weight)

    report = sync_optimizer_with_model(opt, model)  # megatron's reload_model_params, then the check
    assert report.reloaded and report.tensors_checked == 3
    opt._copy_main_params_to_model_params()  # what a (zero-lr) step writes back
    assert all(torch.equal(p, loaded[name]) for name, p in model.named_parameters())


def test_guard_fails_when_reload_does_not_refresh_the_copy(monkeypatch):
    model = _bf16_model(0)
    opt = _float16_optimizer(model)
    _load(model, seed=1)
    monkeypatch.setattr(opt, "reload_model_params", lambda state_dict=None: None)
    with pytest.raises(StaleOptimizerError, match="first step would overwrite the loaded weights: 0.weight"):
        sync_optimizer_with_model(opt, model)


def test_guard_keeps_main_copies_that_already_agree():
    """A resume restores fp32 main copies finer than bf16: they agree with the model after the cast
    and must not be replaced by the bf16 values."""
    model = _bf16_model(0)
    opt = _float16_optimizer(model)
    with torch.no_grad():
        opt.fp32_from_float16_groups[0][0].mul_(1 + 2 ** -12)  # well below bf16's 2**-8 relative step
    finer = opt.fp32_from_float16_groups[0][0].clone()
    assert not torch.equal(finer, model[0].weight.float())
    assert torch.equal(finer.to(torch.bfloat16), model[0].weight)
    report = sync_optimizer_with_model(opt, model)
    assert not report.reloaded and torch.equal(opt.fp32_from_float16_groups[0][0], finer)


@pytest.mark.parametrize("rank", [0, 1])
def test_guard_reads_the_distributed_optimizers_shards(rank):
    model = _bf16_model(0)
    opt = _distributed_optimizer(model, rank, dp_size=2)
    assert check_optimizer_matches_model(opt, model) == 3
    # A change outside this rank's shard is not this rank's copy; inside it is stale.
    other = 1 - rank
    with torch.no_grad():
        model[0].weight.view(-1)[other * 24] += 1.0
    check_optimizer_matches_model(opt, model)
    with torch.no_grad():
        model[0].weight.view(-1)[rank * 24] += 1.0
    with pytest.raises(StaleOptimizerError, match=rf"0\.weight \(elements {rank * 24}\.\.{rank * 24 + 24} of the flat"):
        check_optimizer_matches_model(opt, model)
    _load(model, seed=3)
    assert sync_optimizer_with_model(opt, model).reloaded  # megatron's shard-aware reload
    span = opt._get_model_param_range_map(model[1].weight)["param"]
    assert torch.equal(opt.shard_fp32_from_float16_groups[0][1], model[1].weight.view(-1)[span.start:span.end].float())


def test_guard_on_torch_optim_needs_the_models_own_parameters():
    model = _bf16_model(0).float()
    check_optimizer_matches_model(torch.optim.AdamW(model.parameters()), model)
    built_before = _bf16_model(0).float()  # e.g. the optimizer was built over a model later replaced
    opt = torch.optim.AdamW(built_before.parameters())
    check_optimizer_matches_model(opt, model)  # equal copies pass ...
    _load(model, seed=2)
    with pytest.raises(StaleOptimizerError, match="0.weight"):  # ... stale ones do not
        check_optimizer_matches_model(opt, model)
    with pytest.raises(StaleOptimizerError, match="cannot be matched"):
        check_optimizer_matches_model(torch.optim.AdamW(list(built_before.parameters())[:2]), model)
