"""Bad bytes in data and responses files are named (file and line) or skipped on request; rows dropped
by data.on_bad_row=skip or the prompt-length filter are reported at start, in metrics.jsonl and in the
run's summary; an empty responses file is an error, not an empty report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipo_nemo.data.problems import BadRowError, load_problems

ROOT = Path(__file__).resolve().parents[1]
BOXED = "Let's think step by step and output the final answer within \\boxed{}."


def _row(i):
    return {"data_source": "conrl/gsm8k", "prompt": [{"role": "user", "content": f"What is {i} + 1? {BOXED}"}],
            "reward_model": {"ground_truth": str(i + 1)}}


def _lines(rows):
    return [json.dumps(row).encode() for row in rows]


# --------------------------------------------------------------------------------------------------
# 10. A data file with a byte that is not UTF-8
# --------------------------------------------------------------------------------------------------
def test_jsonl_with_a_non_utf8_byte_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = _lines([_row(0), _row(1), _row(2), _row(3)])
    lines[2] = lines[2].replace(b"What", b"Wh\xe9t")  # latin-1 text in a UTF-8 file
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadRowError, match=r"train\.jsonl row 2: line 3: not valid UTF-8 \(byte 0xe9"):
        load_problems([path])
    loaded = load_problems([path], on_bad_row="skip")
    assert [p.row for p in loaded.problems] == [0, 1, 3]
    assert [p.reference for p in loaded.problems] == ["1", "2", "4"]
    assert len(loaded.skipped) == 1 and "train.jsonl row 2: line 3: not valid UTF-8" in loaded.skipped[0]


def test_parquet_with_a_non_utf8_string_names_file_and_row_or_is_skipped(tmp_path):
    rows = [_row(i) for i in range(4)]
    sources = pa.array([r["data_source"].encode() for r in rows[:1]] + [b"conrl/\xffgsm8k"]
                       + [r["data_source"].encode() for r in rows[2:]], type=pa.binary()).view(pa.string())
    table = pa.Table.from_pylist(rows).set_column(0, "data_source", sources)
    path = tmp_path / "test.parquet"
    pq.write_table(table, path)
    with pytest.raises(BadRowError, match=r"test\.parquet row 1: a text field: not valid UTF-8 \(byte 0xff"):
        load_problems([path])
    loaded = load_problems([path], on_bad_row="skip")
    assert [p.row for p in loaded.problems] == [0, 2, 3]
    assert [p.reference for p in loaded.problems] == ["1", "3", "4"]
    assert len(loaded.skipped) == 1 and "row 1" in loaded.skipped[0]


# --------------------------------------------------------------------------------------------------
# 11. Dropped rows are reported: at start, in metrics.jsonl, in the summary
# --------------------------------------------------------------------------------------------------
def test_dropped_rows_are_logged_in_metrics_and_summary(tmp_path):
    from clipo_nemo.config import load_config
    from clipo_nemo.data.tiny_task import write_tiny_arith_parquet

    cfg = load_config(ROOT / "examples" / "conf" / "tiny.yaml")
    task = cfg.task
    write_tiny_arith_parquet(tmp_path / "task", max_operand=task.max_operand, operators=tuple(task.operators),
                             val_fraction=task.val_fraction, seed=task.seed)
    rows = pq.read_table(tmp_path / "task" / "train.parquet").to_pylist()[:8]
    too_long = json.loads(json.dumps(rows[0]))
    too_long["prompt"][0]["content"] = " ".join([too_long["prompt"][0]["content"]] * 12)  # > 32 tokens
    empty_box = {**rows[1], "reward_model": {"ground_truth": "\\boxed{}", "style": "rule"}}
    lines = _lines(rows[:4] + [too_long] + rows[4:] + [empty_box])
    lines.insert(2, lines[0].replace(b"What", b"Wh\xe4t"))
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={run}",
         "task.enabled=false", f"data.train_files=[{data}]", "data.val_files=[]", "data.on_bad_row=skip",
         "trainer.max_steps=1", "trainer.prompts_per_step=8", "rollout.n=4", "parallel.micro_batch_size=8",
         "actor.num_mini_batches=2", "contrastive.warmup_steps=0", "evaluation.every_steps=0",
         "trainer.save_every_steps=0", "trainer.plot_embeddings=false"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = "data train: 8 prompts kept, 2 bad rows skipped (data.on_bad_row=skip), 1 over data.max_prompt_length"
    out = proc.stdout + proc.stderr
    assert out.count(counts) == 2, out[-3000:]  # at start and in the summary
    assert "line 3: not valid UTF-8" in out and "its last \\boxed{} is empty" in out and "prompt has" in out
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["data/train/prompts"], first["data/train/skipped_rows"], first["data/train/too_long"]) == (8, 2, 1)


# --------------------------------------------------------------------------------------------------
# 12. tools/evaluate.py on a responses file with bad bytes, and on an empty one
# --------------------------------------------------------------------------------------------------
def _evaluate(tmp_path, responses: bytes, *flags):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist([_row(i) for i in range(3)]), data / "gsm8k.parquet")
    path = tmp_path / "responses.jsonl"
    path.write_bytes(responses)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", "--responses", str(path), "--data-dir", str(data),
                           "--workers", "1", "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def _response(index, answer):
    return json.dumps({"benchmark": "gsm8k", "index": index, "response": f"so \\boxed{{{answer}}}"}).encode()


def test_evaluate_names_a_non_utf8_line_and_skips_it_with_a_flag(tmp_path):
    bad = _response(1, 2).replace(b"so", b"s\xf6")
    text = b"\n".join([_response(0, 1), bad, _response(2, 9)]) + b"\n"
    proc, out = _evaluate(tmp_path, text)
    assert proc.returncode != 0 and "responses.jsonl line 2: not valid UTF-8 (byte 0xf6" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    proc, out = _evaluate(tmp_path, text, "--skip-bad-lines")
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stderr and "line 2: not valid UTF-8" in proc.stderr
    report = json.loads((out / "results.json").read_text())
    assert report["benchmarks"]["gsm8k"]["n"] == 2 and report["benchmarks"]["gsm8k"]["pass@1"] == 50.0


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe\n"])
def test_evaluate_refuses_a_responses_file_with_nothing_to_score(tmp_path, content):
    flags = ("--skip-bad-lines",) if content.startswith(b"\xff") else ()
    proc, out = _evaluate(tmp_path, content, *flags)
    assert proc.returncode != 0 and "holds no responses to score" in proc.stderr, proc.stderr
    assert not out.exists()
