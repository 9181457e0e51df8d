"""The placebo arm: CLIPO's contrastive rewards shuffled among each group's rewarded responses."""
from __future__ import annotations

import collections

import torch

from clipo_nemo.algorithms.rewards import permute_within_groups
from clipo_nemo.config import ContrastiveConfig, HeadConfig


def test_permutation_keeps_each_groups_rewards_and_moves_only_rewarded_ones():
    rewards = torch.tensor([-0.1, -0.2, -0.3, 0.0, -0.4, -0.5, 0.0, -0.05])
    rewarded = torch.tensor([True, True, True, False, True, True, False, False])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    seen = set()
    for seed in range(30):
        out = permute_within_groups(rewards, rewarded, groups, torch.Generator().manual_seed(seed))
        assert out[~rewarded].tolist() == rewards[~rewarded].tolist()  # the rest untouched
        for g in (0, 1):
            members = (groups == g) & rewarded
            assert collections.Counter(out[members].tolist()) == collections.Counter(rewards[members].tolist())
        seen.add(tuple(out.tolist()))
    # 3! x 2! = 12 arrangements; 30 draws must show more than the identity (a real permutation).
    assert len(seen) > 4


def _placebo_rank(rank, world):
    from megatron.core import parallel_state

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.models.head import ParallelContrastiveHead, parallel_contrastive_step
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    try:
        init_parallel_state(ParallelConfig())
        torch.manual_seed(0)
        pooled = torch.randn(16, 10)
        correct = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1] * 2, dtype=torch.bool)
        groups = torch.arange(2).repeat_interleave(8)
        mine = torch.arange(16).chunk(world)[parallel_state.get_data_parallel_rank()]
        cfg = ContrastiveConfig(temperature=0.1, head=HeadConfig(dim=6))
        outs = []
        for placebo in (None, torch.Generator().manual_seed(11)):
            head = ParallelContrastiveHead(10, 6, seed=5)
            outs.append(parallel_contrastive_step(head, None, pooled[mine], correct[mine], groups[mine], mine, cfg,
                                                  torch.Generator().manual_seed(3), placebo_generator=placebo))
        return [(o.rewards.tolist(), o.per_anchor_loss.tolist()) for o in outs], mine.tolist()
    finally:
        destroy_parallel_state()


def test_placebo_head_step_shuffles_the_clipo_rewards_across_data_parallel_ranks():
    """At DP=2 (each rank half of every group): the placebo's losses equal CLIPO's exactly (same InfoNCE
    draws), and its rewards are the same per-group multisets in another order; the oracle is the same
    permutation applied to the CLIPO rewards of the whole batch in one process."""
    from clipo_nemo.parallel.launcher import run_distributed

    results = run_distributed(_placebo_rank, 2)
    clipo_rewards, placebo_rewards, clipo_loss, placebo_loss = [0.0] * 16, [0.0] * 16, [0.0] * 16, [0.0] * 16
    for (clipo, placebo), mine in results:
        for local, index in enumerate(mine):
            clipo_rewards[index], clipo_loss[index] = clipo[0][local], clipo[1][local]
            placebo_rewards[index], placebo_loss[index] = placebo[0][local], placebo[1][local]
    assert placebo_loss == clipo_loss
    correct = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1] * 2, dtype=torch.bool)
    valid = torch.tensor(clipo_loss) != 0
    expected = permute_within_groups(torch.tensor(clipo_rewards), correct & valid, torch.arange(2).repeat_interleave(8),
                                     torch.Generator().manual_seed(11))
    assert torch.allclose(torch.tensor(placebo_rewards), expected, atol=0)
    assert placebo_rewards != clipo_rewards
