"""Contrastive losses against a plain per-anchor reference written from SPEC step 7."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipo_nemo.algorithms.contrastive import CONTRASTIVE_LOSSES, LEVELS, contrastive_loss

LOSSES = sorted(CONTRASTIVE_LOSSES)


def reference_losses(z, correct, groups, loss_type, similarity, tau, level, uniform):
    """Per-anchor losses by the definition, one anchor at a time over the whole batch (B x B)."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    B = len(z)
    out, valid = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.bool)
    for i in range(B):
        def sim(j):
            s = float(z[i] @ z[j])
            return s if similarity == "cosine" else 1 - math.sqrt(max(2 - 2 * s, 1e-8))

        others = [j for j in range(B) if j != i]
        same = [j for j in others if groups[j] == groups[i]]
        cands = same if level == "group" else others
        pos = [j for j in (others if level == "batch" else same) if correct[j]]
        negs = [j for j in cands if j not in pos]
        if not (correct[i] and pos and negs):
            continue
        valid[i] = True
        lse = math.log(sum(math.exp(sim(a) / tau) for a in cands))
        if loss_type == "infonce":
            p = pos[min(int(uniform[i] * len(pos)), len(pos) - 1)]
            out[i] = -(sim(p) / tau - lse)
        elif loss_type == "supcon_out":
            out[i] = -sum(sim(p) / tau - lse for p in pos) / len(pos)
        elif loss_type == "supcon_in":
            out[i] = -(math.log(sum(math.exp(sim(p) / tau) for p in pos) / len(pos)) - lse)
        else:
            out[i] = -(math.log(sum(math.exp(sim(p) / tau) for p in pos)) - lse)
    return out, valid


def random_batch(seed, group_sizes, dim=8, p_correct=0.5):
    g = torch.Generator().manual_seed(seed)
    groups = torch.cat([torch.full((n,), 7 * k + 3) for k, n in enumerate(group_sizes)])  # non-contiguous ids
    z = torch.randn(len(groups), dim, generator=g)
    correct = torch.rand(len(groups), generator=g) < p_correct
    return z, correct, groups


BATCHES = {
    "mixed": ([4, 4, 3, 5], 0.5),
    "all_correct": ([4, 4], 1.0),
    "all_wrong": ([4, 4], 0.0),
    "single_member": ([1, 4, 1, 3], 0.6),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_matches_dense_reference(batch, level, loss_type, similarity):
    sizes, p = BATCHES[batch]
    z, correct, groups = random_batch(11, sizes, p_correct=p)
    if batch == "mixed":
        correct[:2] = True  # make sure the first group has a valid anchor
        correct[2] = False
    tau = 0.1
    out = contrastive_loss(z, correct, groups, loss_type=loss_type, similarity=similarity, temperature=tau,
                           level=level, generator=torch.Generator().manual_seed(5))
    uniform = torch.rand(len(z), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref, ref_valid = reference_losses(z, correct.tolist(), groups.tolist(), loss_type, similarity, tau, level, uniform)
    assert out.valid_anchor_mask.tolist() == ref_valid.tolist()
    torch.testing.assert_close(out.per_anchor_loss.double(), ref, atol=1e-5, rtol=0)
    expected_mean = ref.sum() / max(int(ref_valid.sum()), 1)
    assert abs(float(out.loss) - float(expected_mean)) < 1e-5
    if batch == "mixed":
        assert ref_valid.any()
    if batch == "all_wrong" or (batch == "all_correct" and level == "group"):
        assert not out.valid_anchor_mask.any() and float(out.loss) == 0.0


def test_hand_computed_four_samples():
    # One group: two correct (0, 1), two wrong. Cosines: s01 = 0, s02 = -1, s03 = 0, s12 = 0, s13 = -1.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    correct = torch.tensor([True, True, False, False])
    groups = torch.zeros(4, dtype=torch.long)
    expected = math.log(2 + math.exp(-1))  # -(0 - log(e^0 + e^-1 + e^0)) for both valid anchors
    for loss_type in LOSSES:
        out = contrastive_loss(z, correct, groups, loss_type=loss_type, temperature=1.0)
        assert out.valid_anchor_mask.tolist() == [True, True, False, False]
        assert out.per_anchor_loss.tolist() == pytest.approx([expected, expected, 0, 0], abs=1e-6)
        assert float(out.loss) == pytest.approx(expected, abs=1e-6)
    # Three correct: anchor 0 has positives {1 (s=0), 2 (s=-1)}, candidates {1, 2, 3}.
    correct = torch.tensor([True, True, True, False])
    lse = math.log(2 + math.exp(-1))
    anchor0 = {
        "supcon_out": 0.5 + lse,
        "supcon_in": lse - math.log((1 + math.exp(-1)) / 2),
        "soft_nn": lse - math.log(1 + math.exp(-1)),
    }
    for loss_type, value in anchor0.items():
        out = contrastive_loss(z, correct, groups, loss_type=loss_type, temperature=1.0)
        assert float(out.per_anchor_loss[0]) == pytest.approx(value, abs=1e-6)
    # InfoNCE draws one of the two positives: the loss is one of the two single-positive values.
    out = contrastive_loss(z, correct, groups, loss_type="infonce", temperature=1.0)
    assert float(out.per_anchor_loss[0]) == pytest.approx(lse, abs=1e-6) or \
        float(out.per_anchor_loss[0]) == pytest.approx(lse + 1, abs=1e-6)


def test_infonce_draw_is_uniform_and_reproducible():
    z, _, groups = random_batch(3, [4])
    correct = torch.tensor([True, True, True, False])
    losses = torch.stack([contrastive_loss(z, correct, groups, generator=torch.Generator().manual_seed(s)).per_anchor_loss
                          for s in range(400)])
    again = contrastive_loss(z, correct, groups, generator=torch.Generator().manual_seed(7)).per_anchor_loss
    assert torch.equal(again, losses[7])
    values, counts = torch.unique(losses[:, 0].round(decimals=5), return_counts=True)
    assert len(values) == 2 and abs(counts[0].item() / 400 - 0.5) < 0.1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       loss_type=st.sampled_from(["supcon_out", "supcon_in", "soft_nn"]), level=st.sampled_from(LEVELS))
def test_invariant_to_permutations(seed, sizes, loss_type, level):
    z, correct, groups = random_batch(seed, sizes)
    base = contrastive_loss(z, correct, groups, loss_type=loss_type, level=level, temperature=0.2)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))  # mixes groups and members
    relabel = groups * 13 + 1  # group ids are labels only
    out = contrastive_loss(z[perm], correct[perm], relabel[perm], loss_type=loss_type, level=level, temperature=0.2)
    torch.testing.assert_close(out.per_anchor_loss, base.per_anchor_loss[perm], atol=1e-5, rtol=0)
    assert torch.equal(out.valid_anchor_mask, base.valid_anchor_mask[perm])
    assert abs(float(out.loss) - float(base.loss)) < 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), num_groups=st.integers(1, 5))
def test_infonce_invariant_to_group_order_with_one_positive(seed, num_groups):
    # With exactly two correct members per group the positive is forced, so InfoNCE is deterministic.
    z, _, groups = random_batch(seed, [4] * num_groups)
    correct = torch.tensor([True, True, False, False] * num_groups)
    base = contrastive_loss(z, correct, groups, loss_type="infonce")
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    out = contrastive_loss(z[perm], correct[perm], groups[perm], loss_type="infonce")
    torch.testing.assert_close(out.per_anchor_loss, base.per_anchor_loss[perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_degenerate_groups_finite_loss_and_gradients(level, loss_type):
    # All-correct, all-wrong, singleton groups and identical embeddings: no valid anchor anywhere
    # at group level, and nothing may become NaN in either direction.
    z = torch.ones(7, 4, requires_grad=True)
    correct = torch.tensor([True, True, False, False, True, True, True])
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    out = contrastive_loss(z, correct, groups, loss_type=loss_type, level=level, similarity="l2")
    out.loss.backward()
    assert torch.isfinite(out.per_anchor_loss).all() and torch.isfinite(z.grad).all()
    if level == "group":
        assert not out.valid_anchor_mask.any() and float(out.loss.detach()) == 0.0


def test_gradients_match_reference_autograd():
    z, correct, groups = random_batch(2, [4, 4, 4])
    correct[[0, 1, 4, 5, 8]] = True
    correct[[2, 6, 9]] = False
    for level in LEVELS:
        zz = z.clone().double().requires_grad_(True)
        contrastive_loss(zz, correct, groups, loss_type="supcon_out", level=level).loss.backward()
        zd = z.clone().double().requires_grad_(True)
        zn = torch.nn.functional.normalize(zd, dim=-1)
        logits = zn @ zn.T / 0.05
        n = len(z)
        eye = torch.eye(n, dtype=torch.bool)
        same = groups[:, None] == groups[None, :]
        cand = ~eye & (same if level == "group" else torch.ones_like(same))
        pos = cand & correct[None, :] & (torch.ones_like(same) if level == "batch" else same)
        valid = correct & pos.any(1) & (cand & ~pos).any(1)
        lse = torch.logsumexp(logits.masked_fill(~cand, -1e30), 1)
        per = -((logits * pos).sum(1) / pos.sum(1).clamp(min=1) - lse)
        (per[valid].sum() / valid.sum()).backward()
        torch.testing.assert_close(zz.grad, zd.grad, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype(dtype):
    z, correct, groups = random_batch(4, [4, 4])
    correct[:2] = True
    correct[2] = False
    out = contrastive_loss(z.to(dtype), correct, groups, temperature=0.5, generator=torch.Generator().manual_seed(0))
    ref = contrastive_loss(z, correct, groups, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert out.loss.dtype == dtype
    assert abs(float(out.loss) - float(ref.loss)) < (1e-2 if dtype != torch.float64 else 1e-6)


def test_non_finite_and_bad_arguments_raise_clear_errors():
    z, correct, groups = random_batch(0, [4])
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains 1 non-finite"):
        contrastive_loss(bad, correct, groups)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="embeddings"):
        contrastive_loss(bad, correct, groups)
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        contrastive_loss(z, correct, groups, loss_type="triplet")
    with pytest.raises(ValueError, match="unknown contrastive level"):
        contrastive_loss(z, correct, groups, level="global")
    with pytest.raises(ValueError, match="correct has shape"):
        contrastive_loss(z, correct[:2], groups)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(z, correct, groups, temperature=0.0)
