"""The tiny arithmetic task and its tokenizer: schema, determinism, verifiability, chat rendering."""
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipo_nemo.data.problems import problem_from_row, RowSchema
from clipo_nemo.data.tiny_task import make_tiny_arith_splits, write_tiny_arith_parquet
from clipo_nemo.data.tiny_tokenizer import MAX_VOCAB, build_tiny_tokenizer, load_tiny_tokenizer
from clipo_nemo.verifiers.math_verifier import check_math

REAL_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "clipo" / "train" / "gsm8k.parquet"


def test_same_seed_same_rows_other_seed_other_order():
    assert make_tiny_arith_splits(seed=3) == make_tiny_arith_splits(seed=3)
    assert make_tiny_arith_splits(seed=3)["train"] != make_tiny_arith_splits(seed=4)["train"]


def test_splits_are_disjoint_and_cover_every_problem_once():
    splits = make_tiny_arith_splits(max_operand=4, val_fraction=0.25, seed=0)
    texts = {s: [r["prompt"][0]["content"] for r in rows] for s, rows in splits.items()}
    assert not set(texts["train"]) & set(texts["val"])
    # 5*5 additions + 15 subtractions with a >= b (hand count: 5+4+3+2+1)
    assert len(texts["train"]) + len(texts["val"]) == 40 == len(set(texts["train"] + texts["val"]))
    assert len(texts["val"]) == 10
    for split, rows in splits.items():
        assert [r["extra_info"] for r in rows] == [{"index": i, "split": split} for i in range(len(rows))]


@pytest.mark.skipif(not REAL_TRAIN.is_file(), reason="the paper's data is not on this machine")
def test_parquet_schema_equals_the_papers(tmp_path):
    paths = write_tiny_arith_parquet(tmp_path, max_operand=3)
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
