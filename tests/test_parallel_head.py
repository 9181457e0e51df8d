"""The TP-aware head and all-gather group InfoNCE on real gloo processes vs a single process."""
import pytest
import torch

from clipo_nemo.algorithms.head import contrastive_head_step
from clipo_nemo.config import ContrastiveConfig, HeadConfig, ParallelConfig
from clipo_nemo.models.head import reference_head
from clipo_nemo.parallel.launcher import run_distributed

H, D, B = 16, 8, 16  # 4 groups of 4 responses


def _batch():
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(B, H, generator=g)
    correct = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    groups = torch.arange(4).repeat_interleave(4) * 10 + 3
    return pooled, correct, groups


def _cfg(level, head_type, mode):
    return ContrastiveConfig(temperature=0.1, level=level, head=HeadConfig(type=head_type, dim=D, tp_mode=mode))


def _owned(dp_rank, dp_size, split):
    """Global batch positions held by a DP rank: contiguous halves, or an uneven interleaved split."""
    if dp_size == 1:
        return torch.arange(B)
    if not split:
        return torch.arange(B).chunk(dp_size)[dp_rank]
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    return perm[:5] if dp_rank == 0 else perm[5:]  # 5 vs 11 responses, groups cut across ranks


def _rank(rank, world, cases):
    """Run every case on this rank inside one process group (re-initialising megatron's groups per
    TP size), so the expensive process start-up is paid once per world size."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from clipo_nemo.models.head import ParallelContrastiveHead, parallel_contrastive_step
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    results = []
    try:
        for tp, level, head_type, mode, split in cases:
            init_parallel_state(ParallelConfig(tensor_parallel_size=tp))
            pooled, correct, groups = _batch()
            mine = _owned(parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), split)
            cfg = _cfg(level, head_type, mode)
            head = ParallelContrastiveHead(H, D, head_type, mode, seed=5)
            opt = torch.optim.SGD(head.parameters(), lr=0.5)
            out = parallel_contrastive_step(head, opt, pooled[mine], correct[mine], groups[mine], mine, cfg,
                                            torch.Generator().manual_seed(7))
            results.append({"index": mine, "rewards": out.rewards, "loss": out.per_anchor_loss,
                            "valid": out.valid_anchor_mask, "metrics": out.metrics, "weights": head.full_state_dict()})
            parallel_state.destroy_model_parallel()
            dist.barrier()
    finally:
        destroy_parallel_state()
    return results


def _single(level, head_type):
    pooled, correct, groups = _batch()
    head = reference_head(H, D, head_type, seed=5)
    out = contrastive_head_step(head, torch.optim.SGD(head.parameters(), lr=0.5), pooled, correct, groups,
                                _cfg(level, head_type, "replicated"), torch.Generator().manual_seed(7))
    return out, head.state_dict()


CASES = {  # world size -> [(tp, level, head_type, mode, split)]
    2: [
        (1, "group", "linear", "replicated", False),  # DP=2
        (1, "group", "mlp", "replicated", True),  # DP=2, groups split unevenly across ranks
        (1, "cross", "linear", "replicated", True),
        (2, "group", "linear", "column", False),  # TP=2, D split over ranks
        (2, "batch", "mlp", "column", False),
        (2, "group", "mlp", "replicated", False),
    ],
    4: [(2, "group", "linear", "column", True), (2, "cross", "mlp", "replicated", True)],  # TP=2 x DP=2
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_parallel_head_step_matches_single_process(world):
    all_results = run_distributed(_rank, world, args=(CASES[world],), timeout_s=300)
    for case_index, (tp, level, head_type, mode, split) in enumerate(CASES[world]):
        _check_case([ranks[case_index] for ranks in all_results], level, head_type)


def _check_case(results, level, head_type):
    expected, expected_weights = _single(level, head_type)
    assert expected.valid_anchor_mask.any()
    seen = torch.zeros(B, dtype=torch.bool)
    for res in results:
        idx = res["index"]
        seen[idx] = True
        torch.testing.assert_close(res["rewards"], expected.rewards[idx], atol=1e-5, rtol=0)
        torch.testing.assert_close(res["loss"], expected.per_anchor_loss[idx], atol=1e-5, rtol=0)
        assert torch.equal(res["valid"], expected.valid_anchor_mask[idx])
        assert res["metrics"]["contrastive_loss"] == pytest.approx(expected.metrics["contrastive_loss"], abs=1e-5)
        assert res["metrics"]["pos_pair_cos"] == pytest.approx(expected.metrics["pos_pair_cos"], abs=1e-5)
        for name, weight in expected_weights.items():
            torch.testing.assert_close(res["weights"][name], weight, atol=1e-5, rtol=0)
    assert seen.all()
    # The update did something, so equal weights are not equal by accident.
    before = reference_head(H, D, head_type, seed=5).state_dict()
    assert any((before[k] - v).abs().max() > 1e-3 for k, v in expected_weights.items())
