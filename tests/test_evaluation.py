"""Evaluation: Pass@1 and the paper's aggregates from a fixed per-problem file (hand-computed),
the --responses mode of tools/evaluate.py on the real test sets, and evaluate() with a stand-in
generator."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from clipo_nemo.data import build_prompts, load_problems
from clipo_nemo.trainer.evaluation import (
    evaluate,
    metrics,
    read_per_problem,
    read_responses,
    summarize,
    write_report,
)
from clipo_nemo.verifiers import VerifierPool

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO.parent / "shared" / "data" / "clipo" / "test"
sys.path.insert(0, str(REPO / "tools"))
import evaluate as evaluate_tool  # noqa: E402

# Per-problem verdicts (1 = correct sample); several samples per problem where k > 1.
FIXED = {
    "gsm8k": [[1, 1], [1, 0]],  # (100 + 50) / 2 = 75
    "gsm_symbolic": [[1], [0]],  # 50
    "gsm_p1": [[0], [0]],  # 0
    "gsm_p2": [[1], [1], [1], [0]],  # 75
    "commonsense_qa": [[1]],  # 100
    "truthfulqa": [[0, 0, 0, 1]],  # 25
    "theoremqa": [[1], [0], [0], [0]],  # 25
    "mmlu2k": [[1], [1]],  # 100
    "math": [[1, 0, 0, 0]],  # 25
    "math_perturb_simple": [[1], [1]],  # 100
    "math_perturb_hard": [[0]],  # 0
    "amc": [[1, 1], [0, 0]],  # 50
    "aime": [[1, 0]],  # 50
    "aime2025": [[0, 0, 0, 0]],  # 0
}
HAND_COMPUTED = {
    "track_I": {"M-Avg": (75 + 50 + 0 + 75) / 4, "G-Avg": (100 + 25 + 25 + 100) / 4, "Avg": 450 / 8},
    "track_II": {"M-Avg": 125 / 3, "C-Avg": 100 / 3, "Avg": 225 / 6},
}


def _write_fixed(path: Path, benchmarks) -> Path:
    with open(path, "w") as lines:
        for name in benchmarks:
            for index, verdicts in enumerate(FIXED[name]):
                correct = [bool(v) for v in verdicts]
                lines.write(json.dumps({"benchmark": name, "index": index, "reference": "1", "correct": correct,
                                        "reasons": ["ok" if c else "wrong" for c in correct], "extracted": ["1"] * len(correct)}) + "\n")
    return path


def test_fixed_per_problem_file_reproduces_hand_computed_aggregates(tmp_path):
    per_problem = _write_fixed(tmp_path / "per_problem.jsonl", FIXED)
    assert evaluate_tool.main(["--per-problem", str(per_problem), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["benchmarks"]["gsm8k"]["pass@1"] == pytest.approx(75.0)
    assert report["benchmarks"]["gsm8k"]["n"] == 2
    assert report["benchmarks"]["truthfulqa"] == {"pass@1": pytest.approx(25.0), "n": 1, "samples": 4}
    assert report["aggregates"] == {track: pytest.approx(columns) for track, columns in HAND_COMPUTED.items()}
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert {(r["track"], r["name"]): float(r["pass@1"]) for r in rows if r["kind"] == "aggregate"} == pytest.approx(
        {(track, column): value for track, columns in HAND_COMPUTED.items() for column, value in columns.items()}, abs=1e-4
    )
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| GSM8K | SYM | P1 | P2 | cQA | tQA | thrmQA | MMLU | M-Avg | G-Avg | Avg |" in markdown
    assert "| 75.00 | 50.00 | 0.00 | 75.00 | 100.00 | 25.00 | 25.00 | 100.00 | 50.00 | 62.50 | 56.25 |" in markdown
    assert "| 25.00 | 100.00 | 0.00 | 50.00 | 50.00 | 0.00 | 41.67 | 33.33 | 37.50 |" in markdown
    # The report's own per-problem file recomputes the same report.
    assert summarize(read_per_problem(tmp_path / "out" / "per_problem.jsonl")) == report


def test_an_earlier_report_is_not_overwritten_silently(tmp_path):
    per_problem = _write_fixed(tmp_path / "per_problem.jsonl", FIXED)
    out = tmp_path / "out"
    assert evaluate_tool.main(["--per-problem", str(per_problem), "--out", str(out)]) == 0
    first = (out / "results.json").read_text()
    _write_fixed(per_problem, {"gsm8k": FIXED["gsm8k"]})  # another evaluation, same --out
    with pytest.raises(SystemExit, match="already holds a report .*pass --overwrite"):
        evaluate_tool.main(["--per-problem", str(per_problem), "--out", str(out)])
    assert (out / "results.json").read_text() == first
    with pytest.raises(FileExistsError, match="already holds a report"):
        write_report(read_per_problem(per_problem), out)
    assert evaluate_tool.main(["--per-problem", str(per_problem), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["benchmarks"].keys() == {"gsm8k"}


def test_aggregates_need_every_member_benchmark(tmp_path):
    results = read_per_problem(_write_fixed(tmp_path / "p.jsonl", ["gsm8k", "gsm_symbolic", "gsm_p1", "gsm_p2", "mmlu2k", "aime"]))
    summary = summarize(results)
    assert summary["aggregates"] == {"track_I": {"M-Avg": pytest.approx(50.0)}}
    assert metrics(summary)["val/track_I/M-Avg"] == pytest.approx(50.0)
    assert metrics(summary)["val/aime/pass@1"] == pytest.approx(50.0)


@pytest.mark.skipif(not TEST_DATA.exists(), reason=f"the paper's test sets are not at {TEST_DATA}")
def test_responses_mode_on_the_real_test_sets(tmp_path):
    math_refs = [row["ground_truth"] for row in pd.read_parquet(TEST_DATA / "math.parquet")["reward_model"]]
    mmlu_refs = [row["ground_truth"] for row in pd.read_parquet(TEST_DATA / "mmlu2k.parquet")["reward_model"]]
    wrong_letter = {"A": "B", "B": "C", "C": "D", "D": "A"}
    lines = [
        # math row 0: 2 samples, 1 right -> 0.5; row 5: 1 right of 1; row 7: no box -> 0   => (0.5 + 1 + 0) / 3
        {"benchmark": "math", "index": 0, "response": f"so $\\boxed{{{math_refs[0]}}}$"},
        {"benchmark": "math", "index": 0, "response": "so $\\boxed{\\frac{1}{7}}$ wait"},
        {"benchmark": "math", "index": 5, "response": f"... \\boxed{{{math_refs[5]}}}"},
        {"benchmark": "math", "index": 7, "response": "I give up"},
        # mmlu2k rows 3, 4: right, wrong  => 50%
        {"benchmark": "mmlu2k", "index": 3, "response": f"\\boxed{{\\text{{({mmlu_refs[3]})}}}}"},
        {"benchmark": "mmlu2k", "index": 4, "response": f"\\boxed{{{wrong_letter[mmlu_refs[4]]}}}"},
    ]
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "tools/evaluate.py", "--responses", str(responses), "--data-dir", "../shared/data/clipo/test", "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    report = json.loads((out / "results.json").read_text())
    assert report["benchmarks"]["math"]["pass@1"] == pytest.approx(100 * 1.5 / 3)
    assert report["benchmarks"]["math"]["n"] == 3
    assert report["benchmarks"]["mmlu2k"]["pass@1"] == pytest.approx(50.0)
    assert report["aggregates"] == {}
    per_problem = read_per_problem(out / "per_problem.jsonl")
    assert [(r.benchmark, r.index, r.reasons) for r in per_problem] == [
        ("math", 0, ["ok", "wrong"]), ("math", 5, ["ok"]), ("math", 7, ["no_box"]), ("mmlu2k", 3, ["ok"]), ("mmlu2k", 4, ["wrong"]),
    ]
    assert (out / "results.md").exists() and (out / "results.csv").exists()


def test_responses_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"benchmark": "math", "index": 0, "response": "x"}\n{"benchmark": "math", "index": "0", "response": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: needs string 'benchmark', integer 'index'"):
        read_responses(bad)
    bad.write_text("{nope\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1: invalid JSON"):
        read_responses(bad)


def test_generation_modes_explain_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="config.yaml not found: --checkpoint takes a clipo-nemo run directory"):
        evaluate_tool.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"no config.json \(not a Hugging Face model directory\)"):
        evaluate_tool.main(["--hf-model", str(tmp_path), "--out", str(tmp_path / "out")])


def test_hf_model_is_converted_and_sampled_like_a_checkpoint(tmp_path):
    """--hf-model on a tiny random Llama (the tiny task's tokenizer): greedy answers through the
    rollout engine are the answers of transformers' own greedy generate on the same prompts."""
    import re

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clipo_nemo.data.tiny_task import write_tiny_arith_parquet
    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(4)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    write_tiny_arith_parquet(tmp_path / "data", max_operand=4)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--hf-model", str(tmp_path / "hf"), "--data-dir",
                           str(tmp_path / "data"), "--benchmarks", "heldout", "--k", "1", "--temperature", "0",
                           "--max-new-tokens", "4", "--workers", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ours = {r.index: r.extracted[0] for r in read_per_problem(out / "per_problem.jsonl")}

    problems = load_problems([tmp_path / "data" / "heldout.parquet"]).problems
    prompts = build_prompts(problems, tokenizer, max_prompt_length=64).prompts
    theirs = {}
    for prompt in prompts:
        ids = torch.tensor([list(prompt.token_ids)])
        with torch.no_grad():
            new = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        boxes = re.findall(r"\\boxed\{([^{}]*)\}", tokenizer.decode(new, skip_special_tokens=True))
        theirs[prompt.problem.row] = boxes[-1] if boxes else None
    assert ours == theirs and len(ours) == len(problems)
    assert sum(answer is not None for answer in ours.values()) >= len(ours) // 2  # the comparison has content


class _WordTokenizer:
    """The least a tokenizer must offer build_prompts: no chat template, whitespace tokens."""

    chat_template = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[len(word) for word in text.split()] for text in texts]}


def test_evaluate_with_a_generate_fn(tmp_path):
    rows = [{"data_source": "tiny/arith", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}} for i in range(4)]
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = build_prompts(load_problems([path]).problems, _WordTokenizer(), max_prompt_length=64).prompts
    calls = []

    def generate_fn(texts, k, temperature, top_p):
        calls.append((len(texts), k, temperature, top_p))
        # Right for even operands on every sample, right on the first sample only for odd ones.
        answers = []
        for text in texts:
            i = int(text.split()[2])
            answers.append([f"\\boxed{{{2 * i if (i % 2 == 0 or s == 0) else -1}}}" for s in range(k)])
        return answers

    with VerifierPool(num_workers=1, timeout_s=5.0) as pool:
        results = evaluate(generate_fn, {"tiny": prompts}, pool, k=4)
        assert calls == [(4, 4, 0.6, 0.95)]
        assert [r.pass_at_1 for r in results] == [1.0, 0.25, 1.0, 0.25]
        summary = write_report(results, tmp_path / "out")
        assert summary["benchmarks"]["tiny"] == {"pass@1": pytest.approx(62.5), "n": 4, "samples": 16}
        assert "| tiny |" in (tmp_path / "out" / "results.md").read_text()
        with pytest.raises(ValueError, match="expected 4 samples each"):
            evaluate(lambda texts, k, t, p: [["x"]] * len(texts), {"tiny": prompts}, pool, k=4)


def test_load_prompt_sets_from_the_configs(tmp_path):
    from clipo_nemo.config import DataConfig, EvaluationConfig
    from clipo_nemo.trainer.evaluation import load_prompt_sets

    rows = [{"data_source": "conrl/x", "prompt": [{"role": "user", "content": "one two" + " three" * i}],
             "reward_model": {"ground_truth": "1"}} for i in range(3)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    sets = load_prompt_sets(EvaluationConfig(data_dir=str(tmp_path), benchmarks=["toy"]), DataConfig(max_prompt_length=3), _WordTokenizer())
    assert [prompt.problem.row for prompt in sets["toy"]] == [0, 1]  # row 2 has 4 words > 3
    with pytest.raises(FileNotFoundError, match="benchmark 'nope'"):
        load_prompt_sets(EvaluationConfig(data_dir=str(tmp_path), benchmarks=["nope"]), DataConfig(), _WordTokenizer())
    with pytest.raises(ValueError, match="benchmark 'toy': all 3 prompts are longer than data.max_prompt_length=1"):
        load_prompt_sets(EvaluationConfig(data_dir=str(tmp_path), benchmarks=["toy"]), DataConfig(max_prompt_length=1),
                         _WordTokenizer())


def test_validation_metrics_leave_the_mean_out_when_nothing_was_scored():
    from clipo_nemo.trainer.evaluation import ProblemResult, metrics, summarize

    assert metrics(summarize([])) == {}  # was {"val/pass@1_mean": 0.0}: a score for nothing
    results = [ProblemResult("a", 0, "1", [True], ["ok"], ["1"]), ProblemResult("b", 0, "1", [False], ["wrong"], ["2"])]
    flat = metrics(summarize(results))
    assert flat["val/a/pass@1"] == 100.0 and flat["val/b/pass@1"] == 0.0 and flat["val/pass@1_mean"] == 50.0


@pytest.mark.skipif(not TEST_DATA.exists(), reason=f"the paper's test sets are not at {TEST_DATA}")
def test_responses_for_a_row_that_does_not_exist_are_refused(tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"benchmark": "aime", "index": 30, "response": "\\boxed{1}"}) + "\n")
    with pytest.raises(SystemExit, match="'aime' row 30, which is not a loaded problem"):
        evaluate_tool.main(["--responses", str(responses), "--data-dir", str(TEST_DATA), "--out", str(tmp_path / "o")])


def test_nothing_to_score_says_so_and_names_the_flags(tmp_path):
    empty = tmp_path / "per_problem.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match=rf"nothing to score: --per-problem {empty} holds no responses, no report "
                                         r"written .*--checkpoint RUN --benchmarks NAME"):
        evaluate_tool.main(["--per-problem", str(empty), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
