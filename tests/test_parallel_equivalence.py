"""One CLIPO learning step under TP=2, PP=2, TP2 x PP2, DP=2 (also with groups split across ranks),
TP2 x DP2 and the column-parallel head equals the single-process step, and the rollout engine
generates exactly the single process's tokens under each of them (real gloo processes)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipo_nemo.trainer.equivalence import DEFAULT_LAYOUTS, compare, parse_layout, run, tiny_check_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_layout_matches_single_process(tmp_path):
    cfg = tiny_check_config()
    single, results = run(cfg, DEFAULT_LAYOUTS, str(tmp_path), timeout_s=300)
    # The step did real work, so agreement is not agreement on zeros.
    assert single["contrastive_loss"].abs().max() > 0.1
    assert single["contrastive_rewards"].min() < 0
    assert single["advantages"].abs().max() > 0.1
    assert max(t.abs().max().item() for k, t in single.items() if k.startswith("gradients/")) > 1e-3
    assert max(t.abs().max().item() for k, t in single.items() if k.startswith("head/")) > 0
    generated = single["generated_tokens"]
    assert (generated >= 0).sum() > generated.shape[0] and len({tuple(row.tolist()) for row in generated}) == len(generated)
    for name, values in results.items():
        diffs = compare(single, values)
        assert set(diffs) >= {"old_logprobs", "pooled_hidden", "embeddings", "contrastive_loss", "contrastive_rewards",
                              "advantages", "policy_loss", "gradients", "weights", "head", "generated_tokens"}
        worst = {k: v for k, v in diffs.items() if v > 1e-5}
        assert not worst, f"layout {name} differs from the single process: {worst}"


def test_layout_specs():
    assert parse_layout("tp2").tp == 2
    layout = parse_layout("tp=2,pp=2,dp=2,split,column")
    assert (layout.world_size, layout.split_groups, layout.head_tp_mode) == (8, True, "column")
    with pytest.raises(ValueError, match="bad layout"):
        parse_layout("tp=two")


def test_command_line_reports_and_exits_zero():
    proc = subprocess.run([sys.executable, "tools/check_parallel_equivalence.py", "--layouts", "dp2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"max_abs_diff: \d\.\d{3}e[+-]\d+ over 1 layouts", last), last
