"""The tiny task and its tokenizer: schema, determinism, verifiability, perturbed held-out set, chat rendering;
the Figure-4 plot's group choice, the run summary's validation rows and the ablation's statistics."""
from pathlib import Path

import importlib.util
import re

import pyarrow.parquet as pq
import pytest
import torch

from clipo_nemo.data.problems import problem_from_row, RowSchema
from clipo_nemo.config import load_config
from clipo_nemo.data.tiny_task import make_tiny_arith_splits, write_tiny_arith_parquet
from clipo_nemo.data.tiny_tokenizer import MAX_VOCAB, build_tiny_tokenizer, load_tiny_tokenizer
from clipo_nemo.verifiers.math_verifier import check_math

ROOT = Path(__file__).resolve().parents[1]
REAL_TRAIN = ROOT.parent / "shared" / "data" / "clipo" / "train" / "gsm8k.parquet"


def test_same_seed_same_rows_other_seed_other_order():
    assert make_tiny_arith_splits(seed=3) == make_tiny_arith_splits(seed=3)
    assert make_tiny_arith_splits(seed=3)["train"] != make_tiny_arith_splits(seed=4)["train"]


def test_splits_are_disjoint_and_cover_every_problem_once():
    splits = make_tiny_arith_splits(max_operand=4, val_fraction=0.25, seed=0)
    texts = {s: [r["prompt"][0]["content"] for r in rows] for s, rows in splits.items()}
    assert set(splits) == {"train", "heldout"}
    assert not set(texts["train"]) & set(texts["heldout"])
    # 5*5 additions + 15 subtractions with a >= b (hand count: 5+4+3+2+1)
    assert len(texts["train"]) + len(texts["heldout"]) == 40 == len(set(texts["train"] + texts["heldout"]))
    assert len(texts["heldout"]) == 10
    for split, rows in splits.items():
        assert [r["extra_info"] for r in rows] == [{"index": i, "split": split} for i in range(len(rows))]


@pytest.mark.skipif(not REAL_TRAIN.is_file(), reason="the paper's data is not on this machine")
def test_parquet_schema_equals_the_papers(tmp_path):
    paths = write_tiny_arith_parquet(tmp_path, max_operand=3, operators=("max", "+"), perturbed=True)
    assert sorted(p.name for p in paths.values()) == ["heldout.parquet", "heldout_perturbed.parquet", "train.parquet"]
    real = pq.read_schema(REAL_TRAIN).remove_metadata()
    for path in paths.values():
        assert pq.read_schema(path).remove_metadata().equals(real), path


def test_rows_load_and_their_answers_verify():
    """The ground truth is what the problem says (recomputed here) and the math verifier accepts it boxed."""
    rows = make_tiny_arith_splits(max_operand=5, seed=1)["train"]
    for i, row in enumerate(rows):
        problem = problem_from_row(row, "tiny", i, RowSchema())
        a, op, b = problem.messages[0]["content"].split("?")[0].split()[2:5]
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert problem.reference == str(expected) and expected >= 0
        assert check_math(f"\\boxed{{{expected}}}", problem.reference)[0] == 1.0
        assert check_math(f"\\boxed{{{expected + 1}}}", problem.reference)[0] == 0.0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="max_operand"):
        make_tiny_arith_splits(max_operand=0)
    with pytest.raises(ValueError, match="operators"):
        make_tiny_arith_splits(operators=("*",))
    with pytest.raises(ValueError, match="max_operand=40"):
        build_tiny_tokenizer(max_operand=40)


def test_tokenizer_chat_template_one_token_answers_and_round_trip(tmp_path):
    tok = build_tiny_tokenizer(max_operand=4)
    assert len(tok) <= MAX_VOCAB and tok.pad_token_id != tok.eos_token_id
    prompt = [{"role": "user", "content": "What is 3 + 4? Answer in \\boxed{}."}]
    ids = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
    assert tok.convert_ids_to_tokens(ids) == [
        "<|user|>", "What", "is", "3", "+", "4", "?", "Answer", "in", "\\boxed{}", ".", "<|assistant|>"
    ]
    assert tok.unk_token_id not in ids
    answer = tok.encode("\\boxed{7}")
    assert len(answer) == 1 and tok.decode(answer + [tok.eos_token_id], skip_special_tokens=True) == "\\boxed{7}"
    with pytest.raises(Exception, match="unsupported role system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)

    tok.save_pretrained(tmp_path)
    loaded = load_tiny_tokenizer(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) == tok.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False
    )
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tiny_tokenizer(tmp_path / "missing")


def test_every_generated_prompt_encodes_without_unknown_words():
    tok = build_tiny_tokenizer(max_operand=9)
    for rows in make_tiny_arith_splits(max_operand=9).values():
        for row in rows:
            text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            assert tok.unk_token_id not in tok.encode(text), text


# --------------------------------------------------------------------------------------------------
# max / min and the perturbed held-out set
# --------------------------------------------------------------------------------------------------
def _question(row):
    return row["prompt"][0]["content"].replace(" Answer in \\boxed{}.", "")


def _expected(question):
    """The answer recomputed from the wording (an oracle independent of the generator's tables)."""
    for pattern, rule in ((r"(\d+) \+ (\d+)", lambda a, b: a + b), (r"(\d+) - (\d+)", lambda a, b: a - b)):
        found = re.search(pattern.replace(" ", r"(?: \w+)? "), question)
        if found:
            return rule(int(found.group(1)), int(found.group(2)))
    a, b = (int(x) for x in re.findall(r"(\d+)(?: \w+)? (?:and|,)", question)[:1] + re.findall(r"and (\d+)", question)[:1])
    return max(a, b) if "larger" in question else min(a, b)


def test_max_min_rows_answer_what_they_ask_and_verify():
    splits = make_tiny_arith_splits(max_operand=9, operators=("max", "min"), seed=2, perturbed=True)
    # 2 operators x 10 x 10 ordered pairs, 20% held out, 3 perturbed wordings per held-out problem
    assert {k: len(v) for k, v in splits.items()} == {"train": 160, "heldout": 40, "heldout_perturbed": 120}
    assert _question(splits["heldout"][0]).startswith("What is the ")
    for rows in splits.values():
        for row in rows:
            expected = _expected(_question(row))
            assert row["reward_model"]["ground_truth"] == str(expected), _question(row)
            assert check_math(f"\\boxed{{{expected}}}", str(expected))[0] == 1.0


def test_perturbed_set_is_the_heldout_problems_with_another_surface():
    splits = make_tiny_arith_splits(max_operand=9, operators=("+", "-", "max", "min"), seed=0, perturbed=True)
    train_words = {w for row in splits["train"] for w in _question(row).replace("?", " ").split()}
    heldout, perturbed = splits["heldout"], splits["heldout_perturbed"]
    assert len(perturbed) == 3 * len(heldout)
    for i, clean in enumerate(heldout):
        operands = re.findall(r"\d+", _question(clean))
        variants = perturbed[3 * i:3 * i + 3]
        reworded, distractor, units = (_question(row) for row in variants)
        for row in variants:  # same problem: same answer, same operands in the same order
            assert row["reward_model"] == clean["reward_model"]
            assert re.findall(r"\d+", _question(row))[-2:] == operands
            assert _question(row) != _question(clean)
        assert distractor.endswith(_question(clean)) and re.match(r"^(Tom|Sue) has \d+ (pens|books)\. ", distractor)
        assert re.sub(r" (cats|coins)", "", units) == _question(clean)
        assert not reworded.startswith("What is")
        # every perturbed wording holds a word the training prompts never contain
        for question in (reworded, distractor, units):
            assert set(question.replace("?", " ").replace(",", " ").split()) - train_words, question
    assert not {_question(r) for r in perturbed} & {_question(r) for r in splits["train"] + heldout}


def test_default_tokenizer_keeps_its_32_ids_and_the_demo_tokenizer_covers_every_prompt():
    expected = (["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "What", "is", "?", "Answer", "in", "\\boxed{}",
                 ".", "+", "-"] + [str(n) for n in range(9)] + [f"\\boxed{{{n}}}" for n in range(9)])
    tok = build_tiny_tokenizer()
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == expected

    cfg = load_config(ROOT / "examples" / "conf" / "tiny.yaml")
    task = cfg.task
    tok = build_tiny_tokenizer(task.max_operand, tuple(task.operators), task.perturbed)
    assert len(tok) == cfg.model.vocab_size  # the demo's embedding has exactly one row per word
    splits = make_tiny_arith_splits(task.max_operand, tuple(task.operators), task.val_fraction, task.seed, task.perturbed)
    assert set(splits) == {"train", "heldout", "heldout_perturbed"}
    longest = 0
    for rows in splits.values():
        for row in rows:
            ids = tok.encode(tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False))
            assert tok.unk_token_id not in ids, row["prompt"]
            longest = max(longest, len(ids))
    assert longest <= cfg.data.max_prompt_length  # no perturbed prompt is filtered out
    assert longest + cfg.rollout.max_new_tokens <= cfg.model.max_position_embeddings
    answers = {tok.convert_ids_to_tokens(tok.encode(f"\\boxed{{{n}}}"))[0] for n in range(task.max_operand + 1)}
    assert len(answers) == task.max_operand + 1 and tok.unk_token not in answers


def test_bad_operators_are_refused():
    with pytest.raises(ValueError, match="without repeats"):
        make_tiny_arith_splits(operators=("max", "max"))


# --------------------------------------------------------------------------------------------------
# Figure 4, the run summary, the ablation's statistics
# --------------------------------------------------------------------------------------------------
def test_embedding_plot_picks_mixed_groups_first_and_writes_a_png(tmp_path):
    from clipo_nemo.trainer.plots import chosen_groups, plot_embeddings

    group_ids = torch.arange(24) // 4  # 6 groups of 4
    correct = torch.zeros(24, dtype=torch.bool)
    correct[0:4] = True  # group 0 all correct
    correct[9] = True  # group 2 mixed
    correct[[20, 21]] = True  # group 5 mixed
    assert chosen_groups(group_ids, correct, 3) == [2, 5, 0]
    assert chosen_groups(group_ids, correct, 10) == [2, 5, 0, 1, 3, 4]
    snap = {"embeddings": torch.randn(24, 8), "correct": correct, "group_ids": group_ids}
    plot_embeddings({"step 0": snap, "step 9": snap}, tmp_path / "e.png", groups=4)
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_shows_every_benchmarks_first_and_last_validation():
    from clipo_nemo.trainer.metrics import summarize

    history = [{"step": s, "reward_mean": 0.1 * s} for s in range(40)]
    history[0].update({"val/heldout/pass@1": 10.0, "val/heldout_perturbed/pass@1": 5.0})
    history[39].update({"val/heldout/pass@1": 70.0, "val/heldout_perturbed/pass@1": 50.0})
    lines = {line.split()[0]: line.split()[1:] for line in summarize(history).splitlines()[2:]}
    assert lines["val/heldout/pass@1"] == ["10.0000", "70.0000"]
    assert lines["val/heldout_perturbed/pass@1"] == ["5.0000", "50.0000"]
    assert lines["reward_mean"] == ["0.9500", "2.9500"]  # means of 0.0..1.9 and 2.0..3.9


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_intervals_and_paired_differences():
    ablation = _ablation()
    # [1..5]: mean 3, sd sqrt(2.5), t_{0.975,4} = 2.7764 -> half-width 2.7764 * 1.5811 / sqrt(5) = 1.9632
    stat = ablation.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stat["mean"] == 3.0 and stat["hi"] - 3.0 == pytest.approx(1.9632, abs=1e-4)

    def run(clean, perturbed, reward):
        rows = [{"step": s, "reward_mean": reward} for s in range(30)]
        rows[-1].update({"val/heldout/pass@1": clean, "val/heldout_perturbed/pass@1": perturbed})
        return rows

    results = {"grpo": [run(10, 5, 0.5), run(20, 10, 0.5), run(30, 20, 0.5)],
               "clipo": [run(12, 9, 0.6), run(22, 12, 0.6), run(33, 23, 0.6)]}
    table, summary = ablation.report(results, 3, 60.0)
    diff = summary["paired"]["clipo - grpo"]["val/heldout_perturbed/pass@1"]
    # paired differences 4, 2, 3: mean 3, sd 1, t_{0.975,2} = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.4841
    assert diff["mean"] == pytest.approx(3.0) and diff["lo"] == pytest.approx(3.0 - 2.4841, abs=1e-4)
    # exact Wilcoxon signed-rank, 3 positive differences: p = 2 * (1/2)^3 = 0.25; signs 3 / 0 / 0
    assert diff["wilcoxon_p"] == pytest.approx(0.25) and diff["signs"] == [3, 0, 0]
    assert summary["final"]["clipo"]["reward_mean"]["mean"] == pytest.approx(0.6)
    assert summary["per_seed"]["clipo"] == [9, 12, 23]
    assert "| clipo - grpo |" in table and "n/a" in table  # GRPO has no positive-pair cosine


def test_ablation_endpoint_averages_the_last_validations_and_placebo_comparisons():
    ablation = _ablation()
    rows = [{"step": s, "reward_mean": 0.1} for s in range(10)]
    for step, value in ((0, 10.0), (5, 30.0), (9, 50.0)):
        rows[step]["val/heldout_perturbed/pass@1"] = value
    assert ablation.rows_final(rows, "val/heldout_perturbed/pass@1", 2) == 40.0
    assert ablation.rows_final(rows, "val/heldout_perturbed/pass@1", 1) == 50.0
    assert ablation._comparisons(["grpo", "clipo", "placebo"]) == [
        ("clipo", "grpo"), ("placebo", "grpo"), ("clipo", "placebo")]
    # 5 of 5 positive: exact two-sided Wilcoxon p = 2 / 2^5 = 0.0625
    assert ablation.paired_stats([1.0, 2.0, 3.0, 4.0, 5.0])["wilcoxon_p"] == pytest.approx(0.0625)


def test_ablation_seeds_for_power_match_the_textbook_paired_t_sizes():
    ablation = _ablation()
    # One-sample / paired t, two-sided alpha 0.05, power 0.8 (Cohen's tables, G*Power): d = 1 -> 10, d = 0.5 -> 34
    assert ablation.seeds_for_power(1.0, 1.0) == 10
    assert ablation.seeds_for_power(5.0, 10.0) == 34
    assert ablation.seeds_for_power(0.0, 1.0) is None
