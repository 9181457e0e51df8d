"""Policy losses, KL estimators and aggregation against hand-derived values and dense references."""
import math
import warnings
from pathlib import Path

import pytest
import torch

from clipo_nemo.algorithms.policy_losses import (
    AGG_MODES, POLICY_LOSSES, LossNormalizer, PolicyLossConfig, aggregate_loss, compute_policy_loss, kl_penalty)
from clipo_nemo.config import AlgorithmConfig, load_config
from clipo_nemo.validation import validate_config

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
    # As verl: the total over all sequences' token sums / max response length (10 / 3), no mean over sequences.
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm")) == pytest.approx(10 / 3)
    norm = LossNormalizer(max_response_length=8)
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", norm)) == pytest.approx(10 / 8)
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


# --------------------------------------------------------------------------------------------------
# The authors' defaults (issue 14): GSPO's own aggregation, dual clip at c = 3, seq-mean-token-sum-norm.
# Dense references written out per row and token, independent of the module's code.
# --------------------------------------------------------------------------------------------------
def dense_aggregate(loss_mat, mask, mode, max_len):
    """Reference aggregation over a whole mini-batch [B, T], one row at a time."""
    rows = [(loss_mat[i][mask[i] > 0]) for i in range(loss_mat.shape[0])]
    rows = [r for r in rows if r.numel() > 0]
    if mode == "token-mean":
        return sum(float(r.sum()) for r in rows) / max(sum(r.numel() for r in rows), 1)
    if mode == "seq-mean-token-sum":
        return sum(float(r.sum()) for r in rows) / max(len(rows), 1)
    if mode == "seq-mean-token-mean":
        return sum(float(r.mean()) for r in rows) / max(len(rows), 1)
    assert mode == "seq-mean-token-sum-norm"
    return sum(float(r.sum()) for r in rows) / max_len


def dense_vanilla(logp, old, adv, mask, el, eh, c, mode, max_len):
    """verl-style vanilla PPO: per token max(-A r, -A clip(r)); for A < 0 also min(., -A c)."""
    loss = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r, a = math.exp(float(logp[i, t] - old[i, t])), float(adv[i, t])
            value = max(-a * r, -a * min(max(r, 1 - el), 1 + eh))
            if c is not None and a < 0:
                value = min(value, -a * c)
            loss[i, t] = value
    return dense_aggregate(loss, mask, mode, max_len)


def dense_gspo(logp, old, adv, mask, el, eh):
    """GSPO's value: s_i = exp(masked mean of logp - old); per token max(-A s, -A clip(s)); the
    mean over tokens of each sequence, then over sequences (seq-mean-token-mean), no dual clip."""
    per_seq = []
    for i in range(logp.shape[0]):
        sel = mask[i] > 0
        if not sel.any():
            continue
        s = math.exp(float((logp[i] - old[i])[sel].mean()))
        per_seq.append(sum(max(-a * s, -a * min(max(s, 1 - el), 1 + eh)) for a in adv[i][sel].tolist()) / int(sel.sum()))
    return sum(per_seq) / max(len(per_seq), 1)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gspo_uses_seq_mean_token_mean_whatever_loss_agg_mode_says(mode):
    # Issue 14's example: the reference gives -0.0002; token-mean would give (-1.0004 + 4) / 5 = 0.5999.
    logp = torch.tensor([[0.1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    cfg = PolicyLossConfig(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode=mode)
    loss, _ = compute_policy_loss("gspo", logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(-0.0002, abs=1e-12)
    assert loss.item() == pytest.approx(dense_gspo(logp, old, adv, mask, 3e-4, 4e-4), abs=1e-12)


def _random_batch(seed, rows=6, width=7, spread=0.8):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(rows, width, generator=g, dtype=torch.float64) * 0.3
    logp = old + torch.randn(rows, width, generator=g, dtype=torch.float64) * spread  # ratios up to ~10
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, width).contiguous()
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    lengths[0] = width
    lengths[1] = 0  # one empty response
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    return logp, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_vanilla_and_gspo_match_dense_references_on_random_batches(seed, mode):
    logp, old, adv, mask = _random_batch(seed)
    assert (logp - old).exp().max() > 3 and (adv < 0).any()  # the dual clip has work to do
    for el, eh, c in ((0.2, 0.2, 3.0), (0.2, 0.28, None), (0.2, 0.28, 1.5)):
        cfg = PolicyLossConfig(el, eh, c, mode)
        norm = LossNormalizer(max_response_length=11)
        loss, _ = compute_policy_loss("grpo", logp, old, adv, mask, cfg, norm)
        assert loss.item() == pytest.approx(dense_vanilla(logp, old, adv, mask, el, eh, c, mode, 11), abs=1e-12)
    cfg = PolicyLossConfig(3e-4, 4e-4, 3.0, mode)  # the dual clip does not apply to gspo
    loss, _ = compute_policy_loss("gspo", logp, old, adv, mask, cfg)
    assert loss.item() == pytest.approx(dense_gspo(logp, old, adv, mask, 3e-4, 4e-4), abs=1e-12)


@pytest.mark.parametrize("name,mode", [("grpo", m) for m in AGG_MODES] + [("gspo", "token-mean")])
def test_ragged_micro_batches_add_up_to_the_dense_mini_batch_loss(name, mode):
    """Micro-batches cut to their own widths (as packing does), one normalizer from the whole batch:
    the sum of their losses is the dense reference's mini-batch loss."""
    logp, old, adv, mask = _random_batch(7, rows=8, width=9)
    max_len = 9.0
    norm = LossNormalizer(num_tokens=float(mask.sum()), num_seqs=float((mask.sum(-1) > 0).sum()),
                          max_response_length=max_len)
    cfg = PolicyLossConfig(0.2, 0.28, 3.0, mode) if name == "grpo" else PolicyLossConfig(3e-4, 4e-4, 3.0, mode)
    total = 0.0
    for rows in ([0, 1, 2], [3, 4], [5, 6, 7]):
        width = max(int(mask[rows].sum(-1).max()), 1)
        part = [x[rows, :width] for x in (logp, old, adv, mask)]
        total += compute_policy_loss(name, *part, cfg, norm)[0].item()
    if name == "grpo":
        expected = dense_vanilla(logp, old, adv, mask, 0.2, 0.28, 3.0, mode, max_len)
    else:
        expected = dense_gspo(logp, old, adv, mask, 3e-4, 4e-4)
    assert total == pytest.approx(expected, abs=1e-12)


def test_dual_clip_is_on_at_three_by_default():
    assert AlgorithmConfig().dual_clip_c == 3.0 and PolicyLossConfig().dual_clip_c == 3.0
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples/conf/tiny.yaml")
    assert cfg.algorithm.dual_clip_c == 3.0
    off = load_config(Path(__file__).resolve().parents[1] / "examples/conf/tiny.yaml", ["algorithm.dual_clip_c=null"])
    assert off.algorithm.dual_clip_c is None
    # A = -1: ratio 4 -> capped at 3; ratio 2.5 -> unchanged (max(2.5, 1.2)); A = +1, ratio 4 -> -1.2.
    logp, old, adv, mask = one_row([4.0, 2.5, 4.0], [-1, -1, 1])
    loss, m = compute_policy_loss("grpo", logp, old, adv, mask, PolicyLossConfig())
    assert loss.item() == pytest.approx((3.0 + 2.5 - 1.2) / 3)
    assert float(m["pg_clipfrac_lower"]) == pytest.approx(1 / 3)
    loss, m = compute_policy_loss("grpo", logp, old, adv, mask, PolicyLossConfig(dual_clip_c=None))
    assert loss.item() == pytest.approx((4.0 + 2.5 - 1.2) / 3) and "pg_clipfrac_lower" not in m
    # gspo: sequence ratio 4 with A = -1 is not dual-clipped (as in the reference).
    logp, old, adv, mask = one_row([4.0, 4.0], [-1, -1])
    loss, _ = compute_policy_loss("gspo", logp, old, adv, mask, PolicyLossConfig(3e-4, 4e-4))
    assert loss.item() == pytest.approx(4.0)


def test_gspo_with_another_loss_agg_mode_warns():
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples/conf/tiny.yaml",
                      ["algorithm.policy_loss=gspo", "algorithm.loss_agg_mode=token-mean"])
    with pytest.warns(UserWarning, match="gspo aggregates its policy loss with seq-mean-token-mean"):
        validate_config(cfg)
    cfg.algorithm.loss_agg_mode = "seq-mean-token-mean"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(cfg)
