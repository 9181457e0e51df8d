"""Reward shaping, advantages and the contrastive head step against plain references."""
import copy

import pytest
import torch

from clipo_nemo.algorithms.advantages import compute_advantages, zero_variance_groups
from clipo_nemo.algorithms.head import ContrastiveHead, build_head_optimizer, contrastive_head_step
from clipo_nemo.algorithms.rewards import contrastive_rewards, token_level_rewards
from clipo_nemo.config import ContrastiveConfig, HeadConfig


def test_contrastive_reward_shaping():
    loss = torch.tensor([0.5, 4.0, 1.0, 0.0])
    valid = torch.tensor([True, True, False, False])
    rc = contrastive_rewards(loss, valid, scale=0.2, offset=0.0, floor=-0.5)
    assert rc.tolist() == pytest.approx([-0.1, -0.5, 0.0, 0.0])  # -0.8 clamped to the floor
    rc = contrastive_rewards(loss, valid, scale=0.1, offset=0.3, floor=-1.0)
    assert rc.tolist() == pytest.approx([0.25, -0.1, 0.3, 0.3])
    with pytest.raises(ValueError, match="per_anchor_loss"):
        contrastive_rewards(torch.tensor([float("inf")]), torch.tensor([True]))


def test_token_level_rewards_on_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    out = token_level_rewards(torch.tensor([1.5, -0.2, 7.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0, 0, 1.5, 0], [0, 0, 0, -0.2], [0, 0, 0, 0]]))


def reference_advantages(rewards, groups, estimator, eps=1e-6):
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        t = torch.tensor(members, dtype=torch.float64)
        if estimator == "grpo":
            out.append(r / (1 + eps) if len(t) == 1 else (r - t.mean().item()) / (t.std().item() + eps))
        elif estimator == "grpo_no_std":
            out.append(r if len(t) == 1 else r - t.mean().item())
        else:
            out.append(0.0 if len(t) == 1 else r - (t.sum().item() - r) / (len(t) - 1))
    return out


@pytest.mark.parametrize("estimator", ["grpo", "grpo_no_std", "loo"])
def test_advantages_match_per_group_reference(estimator):
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([5, 5, 5, 5, 9, 9, 9, 2, 5, 1])  # interleaved, uneven, a singleton
    rewards = torch.rand(10, generator=g, dtype=torch.float64)
    out = compute_advantages(rewards, groups, estimator)
    assert out.tolist() == pytest.approx(reference_advantages(rewards.tolist(), groups.tolist(), estimator), abs=1e-9)


def test_equal_rewards_give_zero_advantage_and_are_filtered():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 3.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert compute_advantages(rewards, groups)[[0, 1, 4, 5]].abs().max() == 0
    assert zero_variance_groups(rewards, groups).tolist() == [True, True, False, False, True, True, True]
    with pytest.raises(ValueError, match="rewards contains"):
        compute_advantages(torch.tensor([float("nan")]), torch.tensor([0]))


def _cfg(**head):
    return ContrastiveConfig(temperature=0.1, head=HeadConfig(dim=6, **head))


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_head_step_rewards_come_from_the_loss_before_the_update(head_type):
    torch.manual_seed(0)
    head = ContrastiveHead(10, 6, head_type)
    assert all(p.dim() == 2 for p in head.parameters())  # no biases
    cfg = _cfg(type=head_type)
    before = copy.deepcopy(head)
    pooled = torch.randn(8, 10)
    correct = torch.tensor([True, True, False, True, True, True, False, False])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = contrastive_head_step(head, build_head_optimizer(head, cfg), pooled, correct, groups, cfg,
                                torch.Generator().manual_seed(3))
    # Reference: the same rewards from the untouched copy, computed by hand from SPEC step 8.
    z = before(pooled)
    assert torch.allclose(z.norm(dim=-1), torch.ones(8), atol=1e-6)
    from clipo_nemo.algorithms.contrastive import contrastive_loss
    ref = contrastive_loss(z, correct, groups, temperature=0.1, generator=torch.Generator().manual_seed(3))
    expected = torch.where(ref.valid_anchor_mask, -0.2 * ref.per_anchor_loss, torch.zeros(8)).clamp(min=-0.5)
    torch.testing.assert_close(out.rewards, expected.detach())
    assert out.metrics["contrastive_loss"] == pytest.approx(float(ref.loss.detach()))
    # One AdamW step moved every weight by about lr (Adam's first step is lr * sign(grad)).
    for p0, p1 in zip(before.parameters(), head.parameters()):
        step = (p1 - p0 * (1 - 1e-3 * 0.01)).abs()
        assert step.max() <= 1e-3 + 1e-6 and step.max() > 5e-4


def test_fixed_head_is_never_updated():
    torch.manual_seed(0)
    head = ContrastiveHead(10, 6)
    cfg = _cfg(fixed=True)
    assert build_head_optimizer(head, cfg) is None
    before = copy.deepcopy(head.state_dict())
    out = contrastive_head_step(head, None, torch.randn(4, 10), torch.tensor([True, True, False, True]),
                                torch.zeros(4, dtype=torch.long), cfg)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert (out.rewards[out.valid_anchor_mask] < 0).all()


def test_head_does_not_backpropagate_into_the_policy():
    pooled = torch.randn(4, 10, requires_grad=True)
    head = ContrastiveHead(10, 6)
    cfg = _cfg()
    contrastive_head_step(head, build_head_optimizer(head, cfg), pooled, torch.tensor([True, True, False, True]),
                          torch.zeros(4, dtype=torch.long), cfg)
    assert pooled.grad is None


def test_unknown_head_type():
    with pytest.raises(ValueError, match="unknown contrastive head type"):
        ContrastiveHead(4, 2, "transformer")


def _no_valid_anchor_batch():
    """Two groups, every response correct: no negatives at the group level, so no valid anchor."""
    return torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), torch.ones(8, dtype=torch.bool), \
        torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_no_valid_anchor_takes_no_optimizer_step():
    torch.manual_seed(0)
    head = ContrastiveHead(10, 6)
    cfg = _cfg()
    optimizer = build_head_optimizer(head, cfg)
    before = copy.deepcopy(head.state_dict())
    pooled, correct, groups = _no_valid_anchor_batch()
    out = contrastive_head_step(head, optimizer, pooled, correct, groups, cfg)
    assert not out.valid_anchor_mask.any() and out.rewards.tolist() == [0.0] * 8
    # AdamW's decoupled weight decay alone would move every weight by lr * wd * w (up to ~3e-6 here).
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert len(optimizer.state) == 0  # no step counted either
    # Control: one wrong answer per group makes valid anchors, and the same call moves the head.
    correct[[3, 7]] = False
    contrastive_head_step(head, optimizer, pooled, correct, groups, cfg)
    assert not all(torch.equal(before[k], v) for k, v in head.state_dict().items())


def _parallel_no_valid_anchor_rank(rank, world):
    from megatron.core import parallel_state

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.models.head import ParallelContrastiveHead, parallel_contrastive_step
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    try:
        init_parallel_state(ParallelConfig())
        pooled, correct, groups = _no_valid_anchor_batch()
        mine = torch.arange(8).chunk(world)[parallel_state.get_data_parallel_rank()]
        cfg = _cfg()
        moved = []
        for all_correct in (True, False):
            if not all_correct:
                correct[[3, 7]] = False
            head = ParallelContrastiveHead(10, 6, seed=5)
            optimizer = build_head_optimizer(head, cfg)
            before = head.full_state_dict()
            parallel_contrastive_step(head, optimizer, pooled[mine], correct[mine], groups[mine], mine, cfg,
                                      torch.Generator().manual_seed(0))
            moved.append(any(not torch.equal(before[k], v) for k, v in head.full_state_dict().items()))
        return moved
    finally:
        destroy_parallel_state()


def test_parallel_head_no_valid_anchor_takes_no_step_on_any_rank():
    from clipo_nemo.parallel.launcher import run_distributed

    # Each DP rank holds half of every group; the global batch decides, so both ranks skip alike.
    assert run_distributed(_parallel_no_valid_anchor_rank, 2) == [[False, True], [False, True]]


def test_only_correct_anchors_are_rewarded_whatever_the_anchors():
    torch.manual_seed(0)
    head = ContrastiveHead(10, 6)
    pooled = torch.randn(8, 10)
    correct = torch.tensor([True, True, False, False, True, False, False, False])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    from clipo_nemo.algorithms.contrastive import contrastive_loss
    ref = contrastive_loss(head(pooled), correct, groups, temperature=0.1, anchors="all",
                           generator=torch.Generator().manual_seed(3))
    assert ref.valid_anchor_mask.tolist() == [True, True, True, True, False, True, True, True]
    cfg = ContrastiveConfig(temperature=0.1, anchors="all", reward_offset=0.05, head=HeadConfig(dim=6))
    out = contrastive_head_step(head, None, pooled, correct, groups, cfg, torch.Generator().manual_seed(3))
    loss = ref.per_anchor_loss.detach()
    expected = [max(0.05 - 0.2 * float(loss[i]), -0.5) if i in (0, 1) else 0.05 for i in range(8)]
    assert out.rewards.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["contrastive_loss"] == pytest.approx(float(loss.sum() / 7), abs=1e-6)
