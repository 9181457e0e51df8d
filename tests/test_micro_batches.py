"""Micro-batches by token budget (``parallel.max_tokens_per_micro_batch``).

(a) The packer against brute force: every row exactly once, the budget respected (a row longer than
    the budget alone), as few micro-batches as any partition of the rows allows; micro-batches
    trimmed to their longest row put back in batch order give the batch again.
(b) The tiny policy: old log-probs, entropy and pooled states (batch order) and the PPO update
    (gradients and weights after SGD) with token-budget micro-batches equal one big micro-batch,
    single process (two loss-aggregation modes, two mini-batches) and under DP=2 (ranks with
    different micro-batch counts) and PP=2 (real gloo processes). The padding metric equals the
    token positions the embedding actually saw.
"""
from __future__ import annotations

import copy
import random
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from clipo_nemo.config import ClipoConfig, ConfigError, load_config
from clipo_nemo.validation import validate_config
from clipo_nemo.models.forward import PolicyBatch, pack_by_token_budget, sequence_lengths
from clipo_nemo.parallel.launcher import run_distributed
from clipo_nemo.trainer.equivalence import tiny_check_config

# Real lengths (prompt + response) vary 7x. A budget of 40 tokens leaves rows 0 and 4 over budget;
# under DP=2, rank 0 (rows 0-3) packs 3 micro-batches and rank 1 (rows 4-7) packs 2.
LENGTHS = [48, 6, 30, 9, 45, 12, 10, 7]
WIDTH = 52
MAX_TOKENS = 40
ADVANTAGES = torch.tensor([1.0, -0.5, 0.8, -1.0, -0.7, 1.2, 0.3, -0.9])
TOL = 2e-5


# --------------------------------------------------------------------------------------------------
# (a) the packer
# --------------------------------------------------------------------------------------------------
def _partitions(items: List[int]):
    """Every set partition of ``items`` (brute force; Bell(7) = 877)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def _fits(group: List[int], lengths: List[int], budget: int) -> bool:
    return len(group) == 1 or len(group) * max(lengths[row] for row in group) <= budget


def test_packer_against_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 7))]
        budget = rng.randint(1, 60)
        groups = pack_by_token_budget(lengths, budget)
        assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
        for group in groups:
            assert _fits(group, lengths, budget), (lengths, budget, groups)
        fewest = min(len(p) for p in _partitions(list(range(len(lengths))))
                     if all(_fits(g, lengths, budget) for g in p))
        assert len(groups) == fewest, (lengths, budget, groups)


def _batch(lengths=LENGTHS, width=WIDTH, seed=0) -> PolicyBatch:
    """Prompts of 2-4 tokens, responses up to each row's length, non-zero padding after it."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 128, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, 2 + row % 3 : length] = True
    return PolicyBatch(tokens, mask, {"per_token": torch.randn(len(lengths), width, generator=gen),
                                      "per_row": torch.arange(len(lengths), dtype=torch.float32)})


def test_plan_trims_and_restores_order():
    batch = _batch()
    assert sequence_lengths(batch.response_mask).tolist() == LENGTHS
    plan = batch.micro_batch_plan(1, MAX_TOKENS)
    assert plan.rows_over_budget == 2
    assert plan.real_tokens == sum(LENGTHS)
    restored_tokens = torch.zeros_like(batch.tokens)
    restored_extra = torch.zeros_like(batch.extras["per_token"])
    computed = 0
    for rows, micro in zip(plan.rows, batch.micro_batches(plan)):
        width = micro.tokens.shape[1]
        assert width == max(LENGTHS[r] for r in rows.tolist())  # trimmed to its longest row
        assert len(rows) == 1 or len(rows) * width <= MAX_TOKENS
        assert torch.equal(micro.extras["per_row"], rows.float())
        restored_tokens[rows, :width] = micro.tokens
        restored_extra[rows, :width] = micro.extras["per_token"]
        computed += micro.tokens.numel()
    real = torch.arange(WIDTH) < torch.tensor(LENGTHS)[:, None]
    assert torch.equal(restored_tokens * real, batch.tokens * real)
    assert torch.equal(restored_extra * real, batch.extras["per_token"] * real)
    assert plan.computed_tokens == computed
    assert plan.padding_fraction == pytest.approx(1 - sum(LENGTHS) / computed)
    fixed = batch.micro_batch_plan(2)  # today's: consecutive rows, full width
    assert [r.tolist() for r in fixed.rows] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert fixed.computed_tokens == len(LENGTHS) * WIDTH
    with pytest.raises(ValueError, match="does not split"):
        batch.micro_batch_plan(3)
    with pytest.raises(ValueError, match="max_tokens=-1"):
        batch.micro_batch_plan(1, -1)


def test_validate_config_checks_the_budget():
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples/conf/tiny.yaml")
    cfg.trainer.prompts_per_step, cfg.rollout.n, cfg.actor.num_mini_batches = 2, 3, 2
    cfg.parallel.micro_batch_size = 4  # 6 responses: not whole micro-batches of 4 ...
    with pytest.raises(ConfigError, match="micro_batch_size=4"):
        validate_config(cfg)
    cfg.parallel.max_tokens_per_micro_batch = 4096  # ... irrelevant once micro-batches are packed by tokens
    validate_config(cfg)
    cfg.actor.num_mini_batches = 4
    with pytest.raises(ConfigError, match="actor.num_mini_batches=4 mini-batches"):
        validate_config(cfg)
    cfg.actor.num_mini_batches, cfg.parallel.max_tokens_per_micro_batch = 2, -1
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch=-1 must be >= 0"):
        validate_config(cfg)


# --------------------------------------------------------------------------------------------------
# (b) the tiny policy: token budget vs one big micro-batch
# --------------------------------------------------------------------------------------------------
def _cfg(micro: int, max_tokens: int, agg_mode: str = "token-mean", num_mini: int = 1) -> ClipoConfig:
    cfg = tiny_check_config()
    cfg.algorithm.kl_loss_coef, cfg.algorithm.entropy_coef, cfg.algorithm.loss_agg_mode = 0.0, 0.01, agg_mode
    cfg.actor.num_mini_batches = num_mini
    cfg.parallel.micro_batch_size, cfg.parallel.max_tokens_per_micro_batch = micro, max_tokens
    return cfg


def _run_cases(rank: int, world_size: int, pp: int, cases: List[ClipoConfig], initial: Optional[Dict]):
    """One rank: for each case build the actor, load the shared initial weights, run the old pass
    and one PPO update on this DP rank's rows; return outputs (by batch row), metrics, weights."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from clipo_nemo.models.sharding import gather_full_state_dict, load_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor

    cfg0 = copy.deepcopy(cases[0])
    cfg0.parallel.pipeline_parallel_size = pp
    init_parallel_state(cfg0.parallel)
    results = []
    try:
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        rows = torch.arange(len(LENGTHS)).chunk(dp)[dp_rank]
        full = _batch()
        batch = PolicyBatch(full.tokens[rows], full.response_mask[rows])
        for case in cases:
            cfg = copy.deepcopy(case)
            cfg.parallel.pipeline_parallel_size = pp
            actor = Actor.build(cfg)
            if initial is None:
                initial = gather_full_state_dict(actor.module, cfg.model.vocab_size)
            load_full_state_dict(actor.module, initial, cfg.model.vocab_size)
            old = actor.old_outputs(batch)
            seen = []
            if parallel_state.is_pipeline_first_stage():  # token positions the model computes over
                actor.module.embedding.register_forward_hook(lambda m, a, out: seen.append(out.shape[0] * out.shape[1]))
            zeros = torch.zeros_like(batch.tokens, dtype=torch.float32)
            extras = {"old_logprobs": old.logprobs if old is not None else zeros, "advantages": ADVANTAGES[rows]}
            metrics = actor.update(PolicyBatch(batch.tokens, batch.response_mask, extras))
            result = {"metrics": metrics, "seen": sum(seen), "initial": initial,
                      "num_micro": len(batch.micro_batch_plan(cfg.parallel.micro_batch_size,
                                                              cfg.parallel.max_tokens_per_micro_batch).rows),
                      "weights": gather_full_state_dict(actor.module, cfg.model.vocab_size)}
            if old is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                result["old"] = {"rows": rows, "logprobs": old.logprobs, "entropy": old.entropy,
                                 "pooled_hidden": old.pooled_hidden}
            results.append(result)
        return results
    finally:
        destroy_parallel_state()


def _old_outputs(per_rank: List[Dict]) -> Dict[str, torch.Tensor]:
    """Old-pass outputs of all owning ranks in global batch order."""
    pieces = [r["old"] for r in per_rank if "old" in r]
    out = {}
    for key in ("logprobs", "entropy", "pooled_hidden"):
        first = pieces[0][key]
        full = first.new_zeros(len(LENGTHS), *first.shape[1:])
        for piece in pieces:
            full[piece["rows"]] = piece[key]
        out[key] = full
    return out


def _gradients(result: Dict, lr: float) -> Dict[str, torch.Tensor]:
    return {name: (result["initial"][name] - w) / lr for name, w in result["weights"].items()}


def _assert_same_step(result: List[Dict], oracle: List[Dict], lr: float) -> None:
    """``result`` / ``oracle``: one case's per-rank results. Old outputs, loss, grad norm and the
    SGD gradients agree within fp32 rounding."""
    got, want = _old_outputs(result), _old_outputs(oracle)
    for key in want:
        assert (got[key] - want[key]).abs().max() < TOL, key
    m, m0 = result[0]["metrics"], oracle[0]["metrics"]
    assert m["pg_loss"] == pytest.approx(m0["pg_loss"], abs=TOL)
    assert m["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    grads, grads0 = _gradients(result[0], lr), _gradients(oracle[0], lr)
    scale = max(g.abs().max().item() for g in grads0.values())
    assert scale > 1e-3  # the update did real work
    worst = max((grads[k] - grads0[k]).abs().max().item() for k in grads0)
    assert worst < 1e-4 * scale + TOL, f"gradients differ by {worst} (largest gradient {scale})"


@pytest.fixture(scope="module")
def single():
    """Single process: [fixed whole batch, budget] x [token-mean, 1 mini-batch;
    seq-mean-token-mean, 2 mini-batches of 4 rows]."""
    cases = [_cfg(8, 0), _cfg(1, MAX_TOKENS),
             _cfg(4, 0, "seq-mean-token-mean", 2), _cfg(1, MAX_TOKENS, "seq-mean-token-mean", 2)]
    return run_distributed(_run_cases, 1, args=(1, cases, None), timeout_s=180)[0]


def test_single_process_budget_matches_one_big_micro_batch(single):
    lr = tiny_check_config().actor.lr
    fixed, budget, fixed_seq, budget_seq = ([case] for case in single)
    _assert_same_step(budget, fixed, lr)
    _assert_same_step(budget_seq, fixed_seq, lr)  # two SGD steps: weights after both agree
    assert budget[0]["num_micro"] == 5 and fixed[0]["num_micro"] == 1
    # The padding metric is what the embedding saw; the budget computes far fewer positions.
    for case in (fixed[0], budget[0]):
        assert case["metrics"]["actor/padding_frac"] == pytest.approx(1 - sum(LENGTHS) / case["seen"])
    assert fixed[0]["seen"] == len(LENGTHS) * WIDTH
    assert budget[0]["seen"] < 0.6 * fixed[0]["seen"]
    assert budget[0]["metrics"]["actor/rows_over_token_budget"] == 2
    assert fixed[0]["metrics"]["actor/rows_over_token_budget"] == 0


@pytest.mark.parametrize("dp,pp", [(2, 1), (1, 2)])
def test_layouts_with_budget_match_one_big_micro_batch(single, dp, pp):
    results = run_distributed(_run_cases, dp * pp, args=(pp, [_cfg(1, MAX_TOKENS)], single[0]["initial"]),
                              timeout_s=180)
    per_rank = [r[0] for r in results]
    _assert_same_step(per_rank, [single[0]], tiny_check_config().actor.lr)
    if dp == 2:  # the ranks packed different numbers of micro-batches: each undid its own count
        assert [r["num_micro"] for r in per_rank] == [3, 2]
    seen = sum(r["seen"] for r in per_rank)  # over the DP ranks' first stages (no TP here)
    for r in per_rank:  # the same global figure on every rank
        assert r["metrics"]["actor/padding_frac"] == pytest.approx(1 - sum(LENGTHS) / seen)
