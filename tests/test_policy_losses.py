"""Policy losses, KL estimators and aggregation against hand-derived values."""
import math

import pytest
import torch

from clipo_nemo.algorithms.policy_losses import (
    POLICY_LOSSES, LossNormalizer, PolicyLossConfig, aggregate_loss, compute_policy_loss, kl_penalty)

LN = math.log


def one_row(ratios, advs):
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    logp = torch.tensor([[LN(r) for r in ratios]], dtype=torch.float64)
    adv = torch.tensor([advs], dtype=torch.float64)
    return logp, old, adv, torch.ones_like(old)


def test_grpo_clipped_and_unclipped_both_signs():
    # ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5, A=+1: max(-0.5, -0.8) = -0.5;
    # ratio 1.5, A=-1: max(1.5, 1.2) = 1.5; ratio 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped).
    logp, old, adv, mask = one_row([1.5, 0.5, 1.5, 0.5], [1, 1, -1, -1])
    loss, m = compute_policy_loss("grpo", logp, old, adv, mask, PolicyLossConfig())
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert float(m["pg_clipfrac"]) == pytest.approx(0.5)
    assert float(m["ppo_kl"]) == pytest.approx(-(LN(1.5) * 2 + LN(0.5) * 2) / 4)
    # Gradient: zero on clipped tokens, -A * ratio / 4 on the others (d ratio / d logp = ratio).
    logp.requires_grad_(True)
    compute_policy_loss("grpo", logp, old, adv, mask, PolicyLossConfig())[0].backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 4, 1.5 / 4, 0.0])


def test_dapo_asymmetric_clip_and_dual_clip():
    logp, old, adv, mask = one_row([1.5, 0.5], [1, -1])
    cfg = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28)
    loss, _ = compute_policy_loss("dapo", logp, old, adv, mask, cfg)
    assert float(loss) == pytest.approx((-1.28 + 0.8) / 2)
    # Dual clip: ratio 4, A=-1 -> PPO gives max(4, 1.2) = 4, capped at c * |A| = 3.
    logp, old, adv, mask = one_row([4.0, 4.0], [-1, 1])
    loss, m = compute_policy_loss("grpo", logp, old, adv, mask, PolicyLossConfig(dual_clip_c=3.0))
    assert float(loss) == pytest.approx((3.0 - 1.2) / 2)
    assert float(m["pg_clipfrac_lower"]) == pytest.approx(0.5)


def test_gspo_sequence_ratio_and_gradient():
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.tensor([[0.1, 0.3], [0.1, 0.3]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    cfg = PolicyLossConfig(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="seq-mean-token-mean")
    loss, _ = compute_policy_loss("gspo", logp, old, adv, torch.ones_like(old), cfg)
    s = math.exp(0.2)  # exp(mean(0.1, 0.3))
    # Row 0 (A=+1): max(-s, -1.0004) = -1.0004, clipped; row 1 (A=-1): max(s, 1.0004) = s.
    assert loss.item() == pytest.approx((-1.0004 + s) / 2)
    loss.backward()
    # Row 1 tokens: d/dlogp_t of (s * exp(lp_t - sg(lp_t))) averaged over 2 tokens and 2 sequences.
    assert logp.grad.tolist() == [pytest.approx([0.0, 0.0]), pytest.approx([s / 4, s / 4])]


def test_gmpo_geometric_mean_with_log_ratio_clip():
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.tensor([[0.1, 0.5], [0.1, 0.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    cfg = PolicyLossConfig(clip_ratio_low=0.4, clip_ratio_high=0.4)
    loss, _ = compute_policy_loss("gmpo", logp, old, adv, torch.ones_like(old), cfg)
    # A=+1: min(d, clip(d)) = [0.1, 0.4] -> -exp(0.25); A=-1: max(d, clip(d)) = [0.1, 0.5] -> +exp(0.3).
    assert float(loss) == pytest.approx((-math.exp(0.25) + math.exp(0.3)) / 2)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(1.0)
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "low_var_kl")) == pytest.approx(math.exp(-1) + 1 - 1)
    assert float(kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3")) == 10.0  # clamped
    with pytest.raises(ValueError, match="kl_loss_type"):
        kl_penalty(logp, ref, "k4")


def test_aggregation_modes():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the third sequence is empty
    assert float(aggregate_loss(loss_mat, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-sum")) == pytest.approx(5.0)
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-mean")) == pytest.approx(3.0)
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm")) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(loss_mat, mask, "sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_normalizer_sum_to_the_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    loss_mat = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[2] = 0
    norm = LossNormalizer(num_tokens=float(mask.sum()), num_seqs=float((mask.sum(1) > 0).sum()), max_response_length=5)
    parts = sum(aggregate_loss(loss_mat[i:i + 2], mask[i:i + 2], mode, norm) for i in range(0, 6, 2))
    assert float(parts) == pytest.approx(float(aggregate_loss(loss_mat, mask, mode)), abs=1e-6)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_gradcheck_float64(name):
    g = torch.Generator().manual_seed(3)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.1
    # Stay away from the clip boundaries, where the loss is not differentiable.
    logp = (old + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.05).requires_grad_(True)
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, 4).contiguous()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    cfg = PolicyLossConfig(clip_ratio_low=0.5, clip_ratio_high=0.5, loss_agg_mode="seq-mean-token-mean")
    assert torch.autograd.gradcheck(lambda lp: compute_policy_loss(name, lp, old, adv, mask, cfg)[0], (logp,))


def test_non_finite_inputs_raise():
    logp, old, adv, mask = one_row([1.0, 1.0], [1, 1])
    adv[0, 1] = float("nan")
    with pytest.raises(ValueError, match="advantages contains 1 non-finite"):
        compute_policy_loss("grpo", logp, old, adv, mask, PolicyLossConfig())
    with pytest.raises(ValueError, match="unknown policy_loss"):
        compute_policy_loss("ppo2", logp, old, adv, mask, PolicyLossConfig())
