"""Contrastive losses against a plain per-anchor reference written from SPEC step 7."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipo_nemo.algorithms.contrastive import ANCHORS, CONTRASTIVE_LOSSES, LEVELS, SIMILARITIES, contrastive_loss

LOSSES = sorted(CONTRASTIVE_LOSSES)
AUTHORS_EPS = 1e-8


def reference_losses(z, correct, groups, loss_type, similarity, tau, level, uniform, eps=AUTHORS_EPS,
                     anchors="correct", skip_trivial=True, row_shift="candidates"):
    """Per-anchor losses by the definition, one anchor at a time over the whole batch (B x B).

    The authors' numerics: each anchor's logits are shifted by the maximum over the anchor itself and
    its candidates (``row_shift="batch"``: over its whole batch row, as their code does), and every
    log of a sum of exponentials is log(sum + eps) (eps = 0: exact).
    """
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    B = len(z)
    out, valid = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.bool)
    for i in range(B):
        def sim(j):
            s = float(z[i] @ z[j])
            return {"cosine": s, "neg_cosine": -s, "l2": 1 - math.sqrt(max(2 - 2 * s, 1e-8))}[similarity]

        others = [j for j in range(B) if j != i]
        same = [j for j in others if groups[j] == groups[i]]
        cands = same if level == "group" else others
        pos = [j for j in (others if level == "batch" else same) if correct[j] == correct[i]]
        negs = [j for j in cands if j not in pos]
        selected = {"correct": correct[i], "incorrect": not correct[i], "all": True}[anchors]
        if not (selected and ((pos and negs) if skip_trivial else cands)):
            continue
        valid[i] = True
        if not pos:
            continue  # a kept trivial anchor without positives: loss 0
        shift = max(sim(j) / tau for j in ([i] + cands if row_shift == "candidates" else range(B)))

        def logit(j):
            return sim(j) / tau - shift

        def log_sum_exp(js):
            return math.log(sum(math.exp(logit(j)) for j in js) + eps)

        lse = log_sum_exp(cands)
        if loss_type == "infonce":
            p = pos[min(int(uniform[i] * len(pos)), len(pos) - 1)]
            out[i] = -(logit(p) - lse)
        elif loss_type == "supcon_out":
            out[i] = -sum(logit(p) - lse for p in pos) / len(pos)
        elif loss_type == "supcon_in":
            out[i] = -(log_sum_exp(pos) - math.log(len(pos)) - lse)
        else:
            out[i] = -(log_sum_exp(pos) - lse)
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


def _check_against_reference(z, correct, groups, tau, level, loss_type, similarity, dtype, eps, atol, **options):
    out = contrastive_loss(z.to(dtype), correct, groups, loss_type=loss_type, similarity=similarity, temperature=tau,
                           level=level, generator=torch.Generator().manual_seed(5), eps=eps, **options)
    uniform = torch.rand(len(z), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref, ref_valid = reference_losses(z.to(dtype), correct.tolist(), groups.tolist(), loss_type, similarity, tau, level,
                                      uniform, eps, **options)
    assert out.per_anchor_loss.dtype == dtype
    assert out.valid_anchor_mask.tolist() == ref_valid.tolist()
    torch.testing.assert_close(out.per_anchor_loss.double(), ref, atol=atol, rtol=0)
    expected_mean = ref.sum() / max(int(ref_valid.sum()), 1)
    assert abs(float(out.loss) - float(expected_mean)) < atol
    if level == "group":  # the O(B n D) path against the dense one too
        dense = contrastive_loss(z.to(dtype), correct, groups, loss_type=loss_type, similarity=similarity,
                                 temperature=tau, level=level, generator=torch.Generator().manual_seed(5), eps=eps,
                                 dense=True, **options)
        torch.testing.assert_close(out.per_anchor_loss, dense.per_anchor_loss, atol=atol, rtol=0)
    return out, ref_valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [AUTHORS_EPS, 0.0])
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_matches_dense_reference(batch, level, loss_type, similarity, eps, dtype):
    sizes, p = BATCHES[batch]
    z, correct, groups = random_batch(11, sizes, p_correct=p)
    if batch == "mixed":
        correct[:2] = True  # make sure the first group has a valid anchor
        correct[2] = False
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    out, ref_valid = _check_against_reference(z, correct, groups, 0.1, level, loss_type, similarity, dtype, eps, atol)
    if batch == "mixed":
        assert ref_valid.any()
    if batch == "all_wrong" or (batch == "all_correct" and level == "group"):
        assert not out.valid_anchor_mask.any() and float(out.loss) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [AUTHORS_EPS, 0.0])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_matches_dense_reference_where_eps_dominates(level, loss_type, similarity, eps, dtype):
    # 64-dimensional random embeddings at tau = 0.02: every cosine is far below 1 - 18.4 tau, so the
    # authors' eps dominates the candidate sums (the issue's differences of up to 26.6 per anchor).
    z, correct, groups = random_batch(12, [8, 8, 6], dim=64)
    correct[[0, 1, 8, 9]] = True
    correct[[2, 10]] = False
    atol = 2e-4 if dtype == torch.float32 else 1e-9
    out, _ = _check_against_reference(z, correct, groups, 0.02, level, loss_type, similarity, dtype, eps, atol)
    if eps and similarity != "neg_cosine" and loss_type in ("infonce", "supcon_out"):
        assert float(out.loss) > 15  # the eps-dominated regime, not the exact log-sum-exp's moderate loss


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_authors_batch_row_shift_matches_dense_reference(level, loss_type, similarity):
    """row_shift=batch (the authors' code: each anchor's whole batch row) against the per-anchor
    reference; with neg_cosine and the eps-dominated regime it really differs from the default."""
    z, correct, groups = random_batch(12, [8, 8, 6], dim=64)
    # Group 0 clusters around v, group 1 around -v: under neg_cosine the largest logit of a group-0 row
    # (about 1/tau) lies in group 1, far above any of its own candidates' (about -1/tau).
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    z[:8] = v + 0.3 * z[:8]
    z[8:16] = -v + 0.3 * z[8:16]
    correct[[0, 1, 8, 9]] = True
    correct[[2, 10]] = False
    out, _ = _check_against_reference(z, correct, groups, 0.02, level, loss_type, similarity, torch.float64,
                                      AUTHORS_EPS, 1e-9, row_shift="batch")
    default = contrastive_loss(z.double(), correct, groups, loss_type=loss_type, similarity=similarity,
                               temperature=0.02, level=level, generator=torch.Generator().manual_seed(5))
    gap = float((out.per_anchor_loss - default.per_anchor_loss).abs().max())
    if similarity == "neg_cosine" and level == "group":
        assert gap > 1.0  # other groups' rows hold larger logits: the eps term moves
    elif similarity != "neg_cosine":
        assert gap < 1e-9  # cosine and l2: the row maximum is the self-similarity either way


@pytest.mark.parametrize("skip_trivial", [True, False])
@pytest.mark.parametrize("anchors", ANCHORS)
@pytest.mark.parametrize("batch", ["mixed", "single_member", "all_correct"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_anchor_options_match_dense_reference(batch, level, loss_type, anchors, skip_trivial):
    sizes, p = BATCHES[batch]
    z, correct, groups = random_batch(13, sizes, p_correct=p)
    if batch == "mixed":
        correct[[0, 1, 4]] = True
        correct[[2, 3, 5, 6]] = False  # group 0: 2 correct + 2 wrong; group 1: a lone correct response
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        out, valid = _check_against_reference(z, correct, groups, 0.1, level, loss_type, "cosine", dtype, AUTHORS_EPS,
                                              atol, anchors=anchors, skip_trivial=skip_trivial)
    if batch == "mixed":
        anchor_of = {"correct": correct, "incorrect": ~correct, "all": torch.ones_like(correct)}[anchors]
        assert valid[:4].tolist() == anchor_of[:4].tolist()  # group 0: each anchor has a positive and a negative
        if level == "group":  # the lone correct member of group 1 has no positive there
            assert bool(valid[4]) == (anchors != "incorrect" and not skip_trivial)
    if batch == "all_correct" and level == "group" and anchors != "incorrect":
        assert bool(valid.all()) != skip_trivial  # no negatives anywhere: kept only without skip_trivial


@pytest.mark.parametrize("loss_type", LOSSES)
def test_authors_numerics_on_orthogonal_embeddings(loss_type):
    # The example: z = eye(3), correct = [T, T, F], one group, cosine; anchors 0 and 1 each
    # have one positive (cos 0) and one negative (cos 0); the self-similarity 1/tau sets the shift.
    z, correct, groups = torch.eye(3), torch.tensor([True, True, False]), torch.zeros(3, dtype=torch.long)
    for tau in (0.02, 0.05):
        lse = math.log(2 * math.exp(-1 / tau) + AUTHORS_EPS)
        pos = math.log(math.exp(-1 / tau) + AUTHORS_EPS)
        expected = {"infonce": lse + 1 / tau, "supcon_out": lse + 1 / tau, "supcon_in": lse - pos,
                    "soft_nn": lse - pos}[loss_type]
        for dense in (False, True):
            for dtype in (torch.float32, torch.float64):
                out = contrastive_loss(z.to(dtype), correct, groups, loss_type=loss_type, temperature=tau, dense=dense)
                assert float(out.per_anchor_loss[0]) == pytest.approx(expected, abs=1e-4)
                exact = contrastive_loss(z.to(dtype), correct, groups, loss_type=loss_type, temperature=tau,
                                         dense=dense, eps=0.0)
                assert float(exact.per_anchor_loss[0]) == pytest.approx(math.log(2), abs=1e-5)
    if loss_type == "infonce":  # the numbers
        assert contrastive_loss(z, correct, groups, temperature=0.02).per_anchor_loss[0].item() == pytest.approx(31.58, abs=5e-3)
        assert contrastive_loss(z, correct, groups, temperature=0.05).per_anchor_loss[0].item() == pytest.approx(1.92, abs=5e-3)
    if loss_type == "soft_nn":
        assert abs(contrastive_loss(z, correct, groups, loss_type="soft_nn", temperature=0.02).loss.item()) < 1e-6


def test_neg_cosine_is_minus_the_cosine():
    # Two members, anchor 0 correct with positive 1 and negative 2: s01 = 0, s02 = -1 -> -s = 0, 1.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    out = contrastive_loss(z, torch.tensor([True, True, False]), torch.zeros(3, dtype=torch.long), temperature=1.0,
                           similarity="neg_cosine", eps=0.0)
    assert float(out.per_anchor_loss[0]) == pytest.approx(-(0 - math.log(math.exp(0) + math.exp(1))), abs=1e-12)


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


@pytest.mark.parametrize("eps", [AUTHORS_EPS, 1e-3, 0.0])
def test_gradients_match_reference_autograd(eps):
    z, correct, groups = random_batch(2, [4, 4, 4])
    correct[[0, 1, 4, 5, 8]] = True
    correct[[2, 6, 9]] = False
    for level in LEVELS:
        zz = z.clone().double().requires_grad_(True)
        contrastive_loss(zz, correct, groups, loss_type="supcon_out", level=level, eps=eps).loss.backward()
        zd = z.clone().double().requires_grad_(True)
        zn = torch.nn.functional.normalize(zd, dim=-1)
        logits = zn @ zn.T / 0.05
        n = len(z)
        eye = torch.eye(n, dtype=torch.bool)
        same = groups[:, None] == groups[None, :]
        cand = ~eye & (same if level == "group" else torch.ones_like(same))
        pos = cand & correct[None, :] & (torch.ones_like(same) if level == "batch" else same)
        valid = correct & pos.any(1) & (cand & ~pos).any(1)
        # The authors' shift is a constant (no gradient through the row maximum).
        shifted = logits - logits.masked_fill(~(cand | eye), -1e30).amax(1, keepdim=True).detach()
        lse = torch.log((shifted.exp() * cand).sum(1) + eps)
        per = -((shifted * pos).sum(1) / pos.sum(1).clamp(min=1) - lse)
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
    with pytest.raises(ValueError, match="unknown contrastive anchors"):
        contrastive_loss(z, correct, groups, anchors="wrong")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        contrastive_loss(z, correct, groups, eps=-1e-8)
    with pytest.raises(ValueError, match="unknown similarity"):
        contrastive_loss(z, correct, groups, similarity="dot")
