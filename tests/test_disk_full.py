"""A full disk during a synchronous save is reported as what it is (issue 24 point 8): it used to end
in "[enforce fail at inline_container.cc:672] unexpected pos" or "results_queue should not be empty"
with "No space left on device" nowhere. The run directory is a small tmpfs (root only: mounting needs it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_e2e import FAST  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB file system: room for the run's data, config and metrics, not for a checkpoint."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_during_a_synchronous_save_says_no_space_naming_path_and_size(small_disk):
    run = small_disk / "run"
    proc = subprocess.run([sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny",
                           f"trainer.output_dir={run}", *FAST, "trainer.max_steps=1", "evaluation.every_steps=0",
                           "trainer.plot_embeddings=false", "trainer.async_save=false"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"No space left on device: saving step 1 to {run}/checkpoints/.tmp-step_1 needs about" in output, output[-3000:]
    assert "GiB is free on that file system; no checkpoint is complete" in output


def test_other_save_failures_are_left_as_they_are(tmp_path):
    import errno

    from clipo_nemo.checkpoint.save import out_of_space

    (tmp_path / "checkpoints" / ".tmp-step_3").mkdir(parents=True)
    assert out_of_space(RuntimeError("a bug"), tmp_path, 3) is None  # plenty of space: not the cause
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("results_queue should not be empty") from inner
    except RuntimeError as outer:
        found = out_of_space(outer, tmp_path, 3)
    assert found.errno == errno.ENOSPC and str(tmp_path / "checkpoints" / ".tmp-step_3") in str(found)
