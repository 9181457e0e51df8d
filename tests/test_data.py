"""Data: the paper's files load and every reference answer verifies; row validation; chat-template
rendering and the prompt-length limit with a locally built tokenizer; the resumable sampler.

The whole-data-set checks run on every shared test set and both train sets (36,342 rows) through
the verifier pool: each reference written as a boxed answer must be judged correct (100%), and
another problem's different reference must be judged wrong (>= 99.5% per file).
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from clipo_nemo.config import DataConfig
from clipo_nemo.data import BadRowError, EpochSampler, build_prompts, load_problems, load_prompt_set, render_prompt
from clipo_nemo.verifiers import VerifierPool, VerifyRequest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clipo"
needs_data = pytest.mark.skipif(not DATA_DIR.exists(), reason=f"the paper's data are not at {DATA_DIR}")

# Row counts from the data README (an independent record of what the files hold).
README_ROWS = {
    "train/gsm8k": 7473, "train/math75": 7500, "test/gsm8k": 1319, "test/gsm_symbolic": 5000,
    "test/gsm_p1": 5000, "test/gsm_p2": 2500, "test/commonsense_qa": 1221, "test/truthfulqa": 1634,
    "test/theoremqa": 1494, "test/mmlu2k": 2000, "test/math": 500, "test/math_perturb_simple": 279,
    "test/math_perturb_hard": 279, "test/amc": 83, "test/aime": 30, "test/aime2025": 30,
}
# train/math75 rows whose worked solution ends in an empty \boxed{} (checked by eye): no reference.
MATH75_EMPTY_BOX_ROWS = [5341, 5343]


@pytest.fixture(scope="module")
def all_problems():
    files = [DATA_DIR / f"{name}.parquet" for name in README_ROWS]
    return load_problems(files, on_bad_row="skip")


@needs_data
def test_files_load_with_readme_row_counts(all_problems):
    counts = collections.Counter(Path(problem.source_file).parent.name + "/" + Path(problem.source_file).stem for problem in all_problems.problems)
    expected = dict(README_ROWS, **{"train/math75": 7500 - len(MATH75_EMPTY_BOX_ROWS)})
    assert counts == expected
    assert [line.split(" row ")[1].split(":")[0] for line in all_problems.skipped] == [str(r) for r in MATH75_EMPTY_BOX_ROWS]
    with pytest.raises(BadRowError, match=r"math75.parquet row 5341: .*last \\boxed\{\} is empty"):
        load_problems([DATA_DIR / "train" / "math75.parquet"])


@needs_data
def test_problem_fields_match_the_files(all_problems):
    by_file = collections.defaultdict(list)
    for problem in all_problems.problems:
        by_file[Path(problem.source_file).stem].append(problem)
    math75 = [p for p in all_problems.problems if "math75" in p.source_file]
    assert math75[3].reference == "17"  # "... \left\lceil17-\frac12\right\rceil=\boxed{17}$."
    assert by_file["aime"][0].verifier == "math"
    assert {p.choices for p in by_file["commonsense_qa"]} == {("A", "B", "C", "D", "E")}
    assert {p.choices for p in by_file["mmlu2k"]} == {("A", "B", "C", "D")}
    for problem in by_file["truthfulqa"]:  # options block: the lines between "Options:" and the instruction
        block = problem.messages[0]["content"].split("Options:\n")[1].split("\nLet's think")[0]
        assert len(problem.choices) == len(block.split("\n")) >= 2
    assert all(p.verifier == "multiple_choice" for name in ("mmlu2k", "truthfulqa", "commonsense_qa") for p in by_file[name])
    raw = pd.read_parquet(DATA_DIR / "test" / "amc.parquet")
    assert [p.reference for p in by_file["amc"]] == [row["ground_truth"] for row in raw["reward_model"]]


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=5.0) as verifier_pool:
        yield verifier_pool


def _boxed(answer: str) -> str:
    return f"Let's think step by step. The computation gives the result, so the answer is $\\boxed{{{answer}}}$."


@needs_data
def test_every_reference_answer_is_judged_correct(all_problems, pool):
    problems = all_problems.problems
    results = pool.verify([VerifyRequest(p.verifier, _boxed(p.reference), p.reference, p.choices) for p in problems])
    wrong = [(p.source_file, p.row, p.reference, r.reason) for p, r in zip(problems, results) if not r.correct]
    assert wrong == []


@needs_data
def test_another_problems_different_answer_is_judged_wrong(all_problems, pool):
    """For each row, the next row of the same file whose reference differs (as text) answers it.
    A few such pairs are mathematically equal ("0.0" vs "0", "120" vs "120^\\circ"), hence >= 99.5%."""
    by_file = collections.defaultdict(list)
    for problem in all_problems.problems:
        by_file[problem.source_file].append(problem)
    requests, files = [], []
    for source_file, problems in by_file.items():
        for i, problem in enumerate(problems):
            j = (i + 1) % len(problems)
            while problems[j].reference == problem.reference:
                j = (j + 1) % len(problems)
            requests.append(VerifyRequest(problem.verifier, _boxed(problems[j].reference), problem.reference, problem.choices))
            files.append(source_file)
    results = pool.verify(requests)
    judged_wrong = collections.Counter(f for f, r in zip(files, results) if not r.correct)
    for source_file, problems in by_file.items():
        assert judged_wrong[source_file] / len(problems) >= 0.995, source_file


# ----------------------------------------------------------------------------------------------
# Row validation, Parquet and JSONL
# ----------------------------------------------------------------------------------------------
def _row(index: int, prompt=None, answer="42", source="conrl/gsm8k"):
    prompt = [{"role": "user", "content": f"What is {index}?"}] if prompt is None else prompt
    return {"data_source": source, "prompt": prompt, "ability": "math",
            "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": index, "split": "test"}}


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_and_parquet_give_the_same_problems(tmp_path):
    rows = [_row(i, answer=str(i)) for i in range(5)]
    rows.append(_row(5, answer="The sum is $\\boxed{7}$."))
    pd.DataFrame(rows).to_parquet(tmp_path / "set.parquet")
    from_parquet = load_problems([tmp_path / "set.parquet"]).problems
    from_jsonl = load_problems([_write_jsonl(tmp_path / "set.jsonl", rows)]).problems
    strip = lambda problems: [(p.row, p.data_source, p.messages, p.reference, p.verifier) for p in problems]  # noqa: E731
    assert strip(from_parquet) == strip(from_jsonl)
    assert from_jsonl[5].reference == "7"
    plain = load_problems([_write_jsonl(tmp_path / "plain.jsonl", [_row(0, prompt="Plain text prompt")])]).problems
    assert plain[0].messages == ({"role": "user", "content": "Plain text prompt"},)


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"data_source": "conrl/gsm8k", "reward_model": {"ground_truth": "1"}}, "missing field 'prompt'"),
        (_row(1, answer=""), "it is empty"),
        (_row(1, answer=7), "must be a string, got int"),
        (_row(1, prompt=[{"role": "user", "content": 3}]), "message 0 must have string 'role' and 'content'"),
        (_row(1, prompt=[]), "non-empty list of messages"),
        (_row(1, source=""), "'data_source' must be a non-empty string"),
        (_row(1, source="conrl/mmlu2k"), "no 'Options:' line"),
        (_row(1, source="conrl/mmlu2k", answer="E", prompt="Q\nOptions:\nA. x\nB. y\n"), "not one of the offered letters"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_rows_are_named_or_skipped_and_counted(tmp_path, bad_row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [_row(0), _row(1), bad_row, _row(3)])
    with pytest.raises(BadRowError, match=rf"bad.jsonl row 2: .*{__import__('re').escape(message)}"):
        load_problems([path])
    loaded = load_problems([path], on_bad_row="skip")
    assert [p.row for p in loaded.problems] == [0, 1, 3]
    assert len(loaded.skipped) == 1 and "row 2" in loaded.skipped[0]


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        load_problems([tmp_path / "x.csv"])
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_problems([tmp_path / "nope.parquet"])


# ----------------------------------------------------------------------------------------------
# Rendering and the prompt-length limit, with a tokenizer built here (no downloads)
# ----------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "<|user|>", "<|assistant|>", "What", "is", "1?", "2?", "a", "very", "long", "question"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def test_render_with_chat_template_adds_the_generation_prompt():
    messages = ({"role": "user", "content": "What is 1?"},)
    assert render_prompt(messages, _tokenizer(CHAT_TEMPLATE)) == "<|user|> What is 1? <|assistant|>"


def test_render_without_template_is_the_raw_text():
    assert render_prompt(({"role": "user", "content": "What is 1?"},), _tokenizer(None)) == "What is 1?"


def _problems(tmp_path):
    rows = [_row(0, prompt="What is 1?"), _row(1, prompt="a very long question a very long question"), _row(2, prompt="What is 2?")]
    return load_problems([_write_jsonl(tmp_path / "p.jsonl", rows)]).problems


def test_over_long_prompts_are_filtered_and_counted(tmp_path):
    # Template tokens: "<|user|> What is 1? <|assistant|>" = 5; the long one = 1 + 8 + 1 = 10.
    prompt_set = build_prompts(_problems(tmp_path), _tokenizer(CHAT_TEMPLATE), max_prompt_length=5)
    assert [p.problem.row for p in prompt_set.prompts] == [0, 2]
    assert prompt_set.prompts[0].token_ids == (2, 4, 5, 6, 3)
    assert len(prompt_set.too_long) == 1 and "p.jsonl row 1: prompt has 10 tokens" in prompt_set.too_long[0]
    with pytest.raises(ValueError, match=r"p.jsonl row 1: prompt has 10 tokens > max_prompt_length 9"):
        build_prompts(_problems(tmp_path), _tokenizer(CHAT_TEMPLATE), max_prompt_length=9, truncation="error")
    assert len(build_prompts(_problems(tmp_path), _tokenizer(CHAT_TEMPLATE), max_prompt_length=10).prompts) == 3


def test_raw_text_gets_the_tokenizers_special_tokens(tmp_path):
    prompt_set = build_prompts(_problems(tmp_path)[:1], _tokenizer(None), max_prompt_length=100)
    tokenizer = _tokenizer(None)
    assert prompt_set.prompts[0].token_ids == tuple(tokenizer("What is 1?")["input_ids"])


def test_load_prompt_set_from_config(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [_row(0, prompt="What is 1?"), "{bad", _row(2, prompt="a very long question a very long question")])
    config = DataConfig(max_prompt_length=6, on_bad_row="skip")
    prompt_set = load_prompt_set([str(path)], config, _tokenizer(CHAT_TEMPLATE))
    assert prompt_set.metrics() == {"data/prompts": 1, "data/too_long": 1, "data/skipped_rows": 1}


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------
def test_each_epoch_is_a_seeded_permutation():
    sampler = EpochSampler(num_items=10, batch_size=3, seed=7)
    epochs = [[i for _ in range(3) for i in sampler.next_batch()] for _ in range(3)]
    for order in epochs:  # 3 full batches of 3 per epoch; item order is a permutation prefix
        assert len(set(order)) == 9 and set(order) <= set(range(10))
    assert epochs[0] != epochs[1] != epochs[2]
    again = EpochSampler(num_items=10, batch_size=3, seed=7)
    assert [i for _ in range(3) for i in again.next_batch()] == epochs[0]
    other_seed = EpochSampler(num_items=10, batch_size=3, seed=8)
    assert [i for _ in range(3) for i in other_seed.next_batch()] != epochs[0]
    assert EpochSampler(num_items=4, batch_size=2, seed=7, shuffle=False).next_batch() == [0, 1]


def test_resumed_sampler_replays_exactly_the_uninterrupted_batches():
    reference = EpochSampler(num_items=11, batch_size=4, seed=3)
    uninterrupted = [reference.next_batch() for _ in range(12)]
    for stop in (0, 1, 2, 5, 6, 7):  # including the epoch boundaries (2 batches per epoch)
        first = EpochSampler(num_items=11, batch_size=4, seed=3)
        seen = [first.next_batch() for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = EpochSampler(num_items=11, batch_size=4, seed=3)
        resumed.load_state_dict(state)
        assert seen + [resumed.next_batch() for _ in range(12 - stop)] == uninterrupted


def test_sampler_refuses_a_state_from_different_data():
    state = EpochSampler(num_items=11, batch_size=4, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_items=11 but this sampler has 12"):
        EpochSampler(num_items=12, batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochSampler(num_items=3, batch_size=4, seed=3)
