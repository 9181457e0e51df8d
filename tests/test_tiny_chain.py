"""The tiny_chain task: problems, tokenizer, reasoning paths, warm-start demonstrations and the
mechanism metrics, checked against hand counts."""
from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest
import torch

from clipo_nemo.data.tiny_task import (CHAIN_FORMS, chain_demonstration, chain_operands, chain_response_form,
                                       make_tiny_arith_splits, tiny_answer_range)
from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_chain_splits_cover_every_triple_once_with_its_sum():
    splits = make_tiny_arith_splits(6, ("chain",), 0.2, 0, perturbed=True)
    seen = []
    for split in ("train", "heldout"):
        for row in splits[split]:
            a, b, e = chain_operands(row["prompt"][0]["content"])
            assert row["reward_model"]["ground_truth"] == str(a + b + e)
            seen.append((a, b, e))
    assert sorted(seen) == [(a, b, e) for a in range(7) for b in range(7) for e in range(7)]
    assert (len(splits["train"]), len(splits["heldout"])) == (274, 69)
    heldout = [chain_operands(r["prompt"][0]["content"]) for r in splits["heldout"]]
    perturbed = [chain_operands(r["prompt"][0]["content"]) for r in splits["heldout_perturbed"]]
    assert perturbed == [t for t in heldout for _ in range(3)]  # every wording keeps the numbers (distractor too)


def test_chain_tokenizer_has_one_token_per_word_and_60_tokens():
    tokenizer = build_tiny_tokenizer(6, ("chain",), perturbed=True)
    assert len(tokenizer) == 60  # examples/conf/tiny_chain.yaml's model.vocab_size
    for row in make_tiny_arith_splits(6, ("chain",), 0.2, 0, perturbed=True)["heldout_perturbed"]:
        assert tokenizer.unk_token_id not in tokenizer(row["prompt"][0]["content"])["input_ids"]
    ids = tokenizer("12 \\boxed{18}", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 and tokenizer.decode(ids) == "12 \\boxed{18}"


@pytest.mark.parametrize("response,form", [("7 \\boxed{9}", "derivation"), ("\\boxed{9}", "direct"),
                                           ("6 \\boxed{9}", "inconsistent"), ("7 \\boxed{5}", "derivation"),
                                           ("9", "other"), ("\\boxed{9} 7", "other"), ("", "other")])
def test_chain_response_form(response, form):
    # The form is the path, not the verdict: "7 \boxed{5}" derives 3 + 4 correctly and then adds wrongly.
    assert chain_response_form("Sue has 5 books. What is 3 coins + 4 coins + 2 coins?", response) == form


def test_demonstrations_follow_the_mix_and_the_recall():
    rng, question = random.Random(0), "What is 3 + 4 + 2?"
    demos = [chain_demonstration(question, rng, (0.5, 0.35, 0.15), 0.3, tiny_answer_range(6, ("chain",)))
             for _ in range(20_000)]
    forms = collections.Counter(chain_response_form(question, d) for d in demos)
    assert forms["derivation"] / 20_000 == pytest.approx(0.5, abs=0.015)
    assert forms["inconsistent"] / 20_000 == pytest.approx(0.15, abs=0.01)
    direct = [d for d in demos if chain_response_form(question, d) == "direct"]
    # right with p = 0.3 + 0.7 / 19 (a uniform guess over 0..18 can hit too)
    assert sum(d == "\\boxed{9}" for d in direct) / len(direct) == pytest.approx(0.3 + 0.7 / 19, abs=0.02)
    assert all(d.endswith("\\boxed{9}") for d in demos if chain_response_form(question, d) != "direct")


def test_chain_metrics_count_paths_and_rewards_by_hand():
    from clipo_nemo.trainer.chain_task import chain_metrics

    question = "What is 1 + 2 + 3?"
    texts = ["3 \\boxed{6}", "\\boxed{6}", "4 \\boxed{6}", "3 \\boxed{6}", "\\boxed{5}", "oops"]
    correct = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    rewards = torch.tensor([-0.1, -0.4, -0.3, -0.2, 0.0, 0.0])
    metrics = chain_metrics([question] * 6, texts, correct, rewards)
    assert metrics["chain/derivation_frac"] == pytest.approx(2 / 6)
    assert metrics["chain/direct_frac"] == pytest.approx(2 / 6)
    assert metrics["chain/inconsistent_frac"] == pytest.approx(1 / 6)
    assert metrics["chain/other_frac"] == pytest.approx(1 / 6)
    assert metrics["chain/correct_inconsistent_frac"] == pytest.approx(2 / 6)  # the correct direct + wrong-s ones
    assert metrics["chain/rc_correct_derivation"] == pytest.approx(-0.15)
    assert metrics["chain/rc_correct_shortcut"] == pytest.approx(-0.35)
    assert set(CHAIN_FORMS) == {"derivation", "inconsistent", "direct", "other"}


def test_tiny_chain_config_is_valid_and_its_warm_start_needs_chain():
    from clipo_nemo.config import ConfigError, load_config
    from clipo_nemo.validation import validate_config

    cfg = load_config(ROOT / "examples" / "conf" / "tiny_chain.yaml")
    validate_config(cfg)
    assert cfg.task.operators == ["chain"] and cfg.task.warm_start_steps > 0 and cfg.evaluation.k >= 16
    bad = load_config(ROOT / "examples" / "conf" / "tiny.yaml", ["task.warm_start_steps=5"])
    with pytest.raises(ConfigError, match="task.warm_start_steps=5 needs task.operators=\\[chain\\]"):
        validate_config(bad)
    with pytest.raises(ConfigError, match="warm_start_mix"):
        validate_config(load_config(ROOT / "examples" / "conf" / "tiny_chain.yaml", ["task.warm_start_mix=[1,0]"]))


def test_tiny_chain_run_warm_starts_then_logs_the_mechanism_metrics(tmp_path):
    """Two steps of the real config: the warm start lowers its loss, the head-only step logs the
    contrastive reward by path, and validation logs Pass@1 per path (checked against its own counts)."""
    import json
    import os
    import re
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny_chain", f"trainer.output_dir={run}",
           "trainer.max_steps=2", "trainer.prompts_per_step=8", "rollout.n=8", "task.warm_start_steps=30",
           "evaluation.every_steps=1", "evaluation.k=2", "contrastive.warmup_steps=1", "trainer.save_every_steps=0",
           "trainer.plot_embeddings=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, last = map(float, re.search(r"supervised warm start: 30 steps .*? loss ([\d.]+) -> ([\d.]+)",
                                       proc.stdout + proc.stderr).groups())
    assert last < first - 0.5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["policy_updated"] == 0.0
    fracs = [rows[0][f"chain/{form}_frac"] for form in CHAIN_FORMS]
    assert sum(fracs) == pytest.approx(1.0) and rows[0]["chain/other_frac"] < 0.5  # the warm start took: mostly its forms
    for name in ("heldout", "heldout_perturbed"):
        shares = [rows[0][f"val/{name}/chain/{form}_frac"] for form in CHAIN_FORMS]
        assert sum(shares) == pytest.approx(100.0)
        # Pass@1 is the share-weighted mean of the per-path Pass@1 ("other" is never correct here).
        weighted = sum(rows[0].get(f"val/{name}/chain/pass@1_{form}", 0.0) * rows[0][f"val/{name}/chain/{form}_frac"]
                       for form in ("derivation", "direct", "inconsistent")) / 100.0
        assert weighted == pytest.approx(rows[0][f"val/{name}/pass@1"], abs=1e-6)
