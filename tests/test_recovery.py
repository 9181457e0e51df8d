"""Checkpoint recovery (issue 13): resume falls back to the newest checkpoint that verifies, never
restarts or prunes over an earlier run's files, and repairs a torn last line of ``metrics.jsonl``.

One 6-step tiny run (checkpoints after steps 4 and 6 kept) is copied per case and damaged. Oracles:
the original run's ``metrics.jsonl`` rows (a resume from step 4 must redo steps 4-5 exactly as the
uninterrupted run did), the byte contents of the old checkpoints (untouched), and the damage itself
(the skipped checkpoint and the reason must be named).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from test_train_e2e import _metrics, _train  # tests/ is on sys.path under pytest

from clipo_nemo.checkpoint.recovery import (CheckpointError, CheckpointWarning, check_fresh_start, find_resume_point,
                                            latest_checkpoint, verify_checkpoint, write_manifest)
from clipo_nemo.trainer.metrics import MetricsLogger

COMMON = ["evaluation.every_steps=0", "trainer.save_every_steps=2", "trainer.plot_embeddings=false"]


def _digests(root: Path):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _same_training(original_rows, redone_rows):
    """Every logged number of the original rows but timings is in the redone rows, equal (a resumed
    run may log more keys on its first row)."""
    assert [r["step"] for r in redone_rows] == [r["step"] for r in original_rows]
    for original, redone in zip(original_rows, redone_rows):
        numbers = {k: v for k, v in original.items() if not (k.startswith("time/") or k == "step_time_s")}
        assert {k: redone.get(k) for k in numbers} == numbers, f"step {original['step']}"


def _truncate(path: Path, keep_fraction=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep_fraction)])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 6-step run: checkpoints step_4 and step_6 (keep_last=2), latest = step_6, 6 rows."""
    run = tmp_path_factory.mktemp("finished") / "run"
    _train(run, "trainer.max_steps=6", *COMMON)
    ckpts = run / "checkpoints"
    assert _step_dirs(ckpts) == ["step_4", "step_6"] and (ckpts / "latest").read_text() == "step_6"
    for step in (4, 6):
        manifest = json.loads((ckpts / f"step_{step}" / "manifest.json").read_text())["files"]
        assert {"trainer_state.pt", "rng/rank_00000.pt", "dist/.metadata", "dist/metadata.json"} <= manifest.keys()
        assert verify_checkpoint(ckpts / f"step_{step}") is None
    assert [r["step"] for r in _metrics(run)] == list(range(6))
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _step_dirs(ckpts: Path):
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))


def _lines(run):
    return (run / "metrics.jsonl").read_text().splitlines()


# --- 1. latest missing (or a directory) ------------------------------------------------------------
def test_missing_latest_resumes_from_newest_and_keeps_old_files(finished_run, run_copy):
    (run_copy / "checkpoints" / "latest").unlink()
    old = {s: _digests(run_copy / "checkpoints" / s) for s in ("step_4", "step_6")}
    proc = _train(run_copy, "trainer.max_steps=8", *COMMON)
    out = proc.stdout + proc.stderr
    assert "checkpoints/latest is missing" in out
    assert f"resumed from {run_copy / 'checkpoints' / 'step_6'} at step 6" in out
    assert [r["step"] for r in _metrics(run_copy)] == list(range(8))
    assert _lines(run_copy)[:6] == _lines(finished_run)  # the earlier run's history, byte for byte
    # The run fell back: nothing of the earlier run is pruned (keep_last=2 would have deleted step_4).
    assert _step_dirs(run_copy / "checkpoints") == ["step_4", "step_6", "step_8"]
    assert {s: _digests(run_copy / "checkpoints" / s) for s in old} == old
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_8"


def test_latest_as_a_directory_falls_back_to_newest(run_copy):
    pointer = run_copy / "checkpoints" / "latest"
    pointer.unlink()
    pointer.mkdir()
    with pytest.warns(CheckpointWarning, match="latest is not a file"):
        assert latest_checkpoint(run_copy) == run_copy / "checkpoints" / "step_6"


# --- 2. the newest checkpoint damaged --------------------------------------------------------------
def test_truncated_shard_falls_back_to_previous_checkpoint(finished_run, run_copy):
    ckpts = run_copy / "checkpoints"
    shard = ckpts / "step_6" / "dist" / "__0_0.distcp"
    _truncate(shard)
    size, damaged, step4 = shard.stat().st_size, _digests(ckpts / "step_6"), _digests(ckpts / "step_4")
    proc = _train(run_copy, "trainer.max_steps=6", *COMMON)
    out = proc.stdout + proc.stderr
    assert f"skipped step_6: dist/__0_0.distcp has {size} bytes, the manifest says" in out
    assert f"resumed from {ckpts / 'step_4'} at step 4" in out
    before, after = _metrics(finished_run), _metrics(run_copy)
    assert [r["step"] for r in after] == list(range(6))
    assert _lines(run_copy)[:4] == _lines(finished_run)[:4]
    # Steps 4-5 redone from step_4 equal the uninterrupted run's (the fallback checkpoint was whole).
    _same_training(before[4:], after[4:])
    # The damaged checkpoint was moved aside, not overwritten; step_4 untouched; the new step_6 is whole.
    assert _digests(ckpts / "step_6.skipped") == damaged and _digests(ckpts / "step_4") == step4
    assert "step_6 of the earlier run moved to step_6.skipped" in out
    assert verify_checkpoint(ckpts / "step_6") is None and (ckpts / "latest").read_text() == "step_6"


def _flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # how the newest checkpoint is damaged -> what the skip message must say
    "truncated_metadata_json": (lambda c: _truncate(c / "dist" / "metadata.json"), "dist/metadata.json is not valid JSON"),
    "truncated_trainer_state": (lambda c: _truncate(c / "trainer_state.pt"), "trainer_state.pt has"),
    "missing_rng_file": (lambda c: (c / "rng" / "rank_00000.pt").unlink(), "rng/rank_00000.pt is missing"),
    "flipped_shard_byte": (lambda c: _flip_a_byte(c / "dist" / "__0_1.distcp"),
                           "dist/__0_1.distcp does not match its checksum"),
    "garbage_meta_json": (lambda c: (c / "meta.json").write_bytes(b"\xff\x00{"), "meta.json is not valid JSON"),
    "truncated_manifest": (lambda c: _truncate(c / "manifest.json"), "manifest.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_with_its_reason(run_copy, damage):
    ckpts = run_copy / "checkpoints"
    damage_fn, reason = DAMAGE[damage]
    damage_fn(ckpts / "step_6")
    before = _digests(ckpts)
    with pytest.warns(CheckpointWarning, match=f"skipped step_6: {reason}"):
        assert latest_checkpoint(run_copy) == ckpts / "step_4"
    assert _digests(ckpts) == before  # choosing changes nothing


def test_checkpoints_without_manifest_are_unverified_and_still_checked(run_copy):
    """Checkpoints saved before manifests existed: a whole one is used (said to be unverified; one is
    loaded by the trainer in the torn-line test), a truncated shard is still found from the shard index."""
    ckpts = run_copy / "checkpoints"
    for step in (4, 6):
        (ckpts / f"step_{step}" / "manifest.json").unlink()
    with pytest.warns(CheckpointWarning, match="step_6 has no manifest.json .* could not be verified"):
        assert latest_checkpoint(run_copy) == ckpts / "step_6"
    _truncate(ckpts / "step_6" / "dist" / "__0_1.distcp", 0.9)
    with pytest.warns(CheckpointWarning) as caught:
        assert latest_checkpoint(run_copy) == ckpts / "step_4"
    assert re.fullmatch(r"skipped step_6: dist/__0_1.distcp has \d+ bytes, its index needs \d+ .*", str(caught[0].message))
    assert str(caught[1].message).startswith("step_4 has no manifest.json")


def test_unreadable_checkpoints_are_an_error_not_a_fresh_start(run_copy):
    ckpts = run_copy / "checkpoints"
    _truncate(ckpts / "step_6" / "trainer_state.pt")
    (ckpts / "step_4" / "rng" / "rank_00000.pt").unlink()
    before = _digests(run_copy)
    with pytest.raises(CheckpointError, match=r"(?s)none can be resumed from.*skipped step_6: trainer_state.pt.*"
                                              r"skipped step_4: rng/rank_00000.pt is missing.*new trainer.output_dir"):
        find_resume_point(run_copy)
    assert _digests(run_copy) == before
    shutil.rmtree(ckpts)  # no checkpoint at all, but an earlier run's logged steps
    with pytest.raises(CheckpointError, match="6 logged steps .* no checkpoint"):
        check_fresh_start(run_copy)
    assert {k: v for k, v in before.items() if not k.startswith("checkpoints/")} == _digests(run_copy)


def test_manifest_records_every_file_but_meta(tmp_path):
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / ".metadata").write_bytes(b"abc")
    (tmp_path / "meta.json").write_text("{}")
    write_manifest(tmp_path)
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert files == {"dist/.metadata": {"size": 3, "crc32": "352441c2", "rank": 0}}  # zlib.crc32(b"abc")


# --- 3. a torn last line in metrics.jsonl ----------------------------------------------------------
def test_torn_metrics_line_is_truncated_and_the_run_resumes(finished_run, run_copy):
    """A crash while writing step 5's row, before step 6 was saved: resume from step_4 repairs the log.
    step_4 has no manifest here (as if saved before manifests existed): it still loads, said unverified."""
    ckpts = run_copy / "checkpoints"
    shutil.rmtree(ckpts / "step_6")
    (ckpts / "latest").write_text("step_4")
    (ckpts / "step_4" / "manifest.json").unlink()
    lines = _lines(finished_run)
    torn = lines[5][:len(lines[5]) // 2]
    (run_copy / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n" + torn)
    proc = _train(run_copy, "trainer.max_steps=6", *COMMON)
    out = proc.stdout + proc.stderr
    assert "metrics.jsonl: its last line was cut off mid-write" in out and "truncated it" in out
    assert "step_4 has no manifest.json (saved before checksums were recorded): it could not be verified" in out
    assert f"resumed from {ckpts / 'step_4'} at step 4" in out
    after = _metrics(run_copy)
    assert _lines(run_copy)[:4] == lines[:4]
    _same_training(_metrics(finished_run), after)


def test_metrics_logger_repairs_only_a_torn_last_line(tmp_path):
    rows = [{"step": 0, "reward_mean": 0.5}, {"step": 1, "reward_mean": 0.25}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "rew')
    logger = MetricsLogger(str(tmp_path), total_steps=5, start_step=5, enabled=True)
    logger.close()
    assert logger.history == rows and path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')  # damage in the middle is not a crash mid-write
    with pytest.raises(ValueError, match="line 2"):
        MetricsLogger(str(tmp_path), total_steps=5, start_step=2, enabled=True)


# --- 4. garbage bytes in latest ------------------------------------------------------------------
def test_garbage_latest_falls_back_to_newest_verifying(run_copy):
    (run_copy / "checkpoints" / "latest").write_bytes(b"\x89\xff\xfe\x00garbage")
    with pytest.warns(CheckpointWarning, match="latest is unreadable .UnicodeDecodeError"):
        assert latest_checkpoint(run_copy) == run_copy / "checkpoints" / "step_6"
    point = find_resume_point(run_copy)
    assert point.fell_back and point.checkpoint.name == "step_6"
    (run_copy / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.warns(CheckpointWarning, match="not a checkpoint name"):
        assert latest_checkpoint(run_copy) == run_copy / "checkpoints" / "step_6"
