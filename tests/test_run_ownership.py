"""One owner per run directory (issue 24, points 1, 4 and 11): a second trainer meets a clear error
naming the holder, a crashed owner leaves nothing stuck, a requeued SLURM job takes over, default run
directories never collide, a changed architecture is refused on resume and with init_from=<run>,
config.yaml keeps the config the checkpoints were trained with, and an unwritable checkpoint folder
is found at start."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clipo_nemo.config import ConfigError, load_config
from clipo_nemo.trainer.run_directory import (CONFIG_HISTORY, LOCK_NAME, RunDirectoryBusy, acquire_run_lock,
                                              claim_run_directory)
from clipo_nemo.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "conf" / "tiny.yaml"


def _hold_lock(run_dir: Path, **env) -> subprocess.Popen:
    """Another process that owns ``run_dir`` (as a trainer's rank 0 does) until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from clipo_nemo.trainer.run_directory import acquire_run_lock
        lock = acquire_run_lock(Path({str(run_dir)!r}))
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


def test_a_second_owner_is_refused_naming_the_holder_and_a_killed_owner_leaves_nothing_stuck(tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        with pytest.raises(RunDirectoryBusy) as err:
            acquire_run_lock(run)
        assert f"pid {holder.pid} on host" in str(err.value) and "trainer.output_dir" in str(err.value)
    finally:
        _stop(holder)  # SIGKILL: no cleanup ran
    assert (run / LOCK_NAME).exists()
    lock = acquire_run_lock(run)  # the kernel dropped the dead owner's lock
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lingering_lock_and_nobody_else_does(tmp_path, monkeypatch):
    run = tmp_path / "run"
    holder = _hold_lock(run, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # another step of the same allocation: refused
        with pytest.raises(RunDirectoryBusy, match="SLURM job 4242"):
            acquire_run_lock(run)
        monkeypatch.setenv("SLURM_JOB_ID", "5000")  # another job
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with pytest.raises(RunDirectoryBusy):
            acquire_run_lock(run)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the job itself, requeued after its node failed
        lock = acquire_run_lock(run)
        assert "requeued" in lock.notes[0]
        lock.release()
    finally:
        _stop(holder)


def _tiny(run: Path, *overrides):
    return load_config(TINY, [f"trainer.output_dir={run}", *overrides])


def _train_error(rank, world_size, cfg):
    from clipo_nemo.trainer.loop import train

    try:
        train(cfg)
    except Exception as err:  # noqa: BLE001 -- the test compares what each rank raised
        return type(err).__name__, str(err)
    return None


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_trainer_or_a_whole_job_meets_the_owner_before_touching_the_directory(tmp_path, world_size):
    from clipo_nemo.parallel.launcher import run_distributed

    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        errors = run_distributed(_train_error, world_size, args=(_tiny(run),), timeout_s=240)
    finally:
        _stop(holder)
    for name, message in errors:  # every rank stops, with rank 0's error
        assert name == "RunDirectoryBusy" and f"pid {holder.pid}" in message
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no config.yaml, data or metrics written


def test_default_run_directories_of_runs_started_together_differ():
    code = "from clipo_nemo.config import load_config; print(load_config('examples/conf/tiny.yaml').trainer.output_dir)"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(3)]
    dirs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert len(set(dirs)) == 3 and all(d.startswith("outputs/tiny/") for d in dirs), dirs
    for name in ("track1", "track2", "llama3_70b"):  # no example config keeps a one-second stamp
        assert "${now:" not in (ROOT / "examples" / "conf" / f"{name}.yaml").read_text()


def _saved_run(run: Path, cfg) -> str:
    """``run`` as a run that saved step 1 with ``cfg`` (config.yaml as train writes it, a complete checkpoint)."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    claim_run_directory(cfg, run, text).release()
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "checkpoints" / "step_1" / "meta.json").write_text("{}")
    return text


def test_resuming_with_another_architecture_is_refused_and_config_yaml_keeps_the_original(tmp_path):
    run = tmp_path / "run"
    original = _saved_run(run, _tiny(run))
    changed = _tiny(run, "model.vocab_size=64")
    with pytest.raises(ConfigError, match=r"model.vocab_size=64 now, 49 before \(in .*config.yaml, the run this one "
                                          r"resumes\)"):
        claim_run_directory(changed, run, "changed")
    assert (run / "config.yaml").read_text() == original and not (run / CONFIG_HISTORY).exists()
    lock = acquire_run_lock(run)  # the refused claim released the lock
    lock.release()
    resumed = _tiny(run, "trainer.max_steps=400")  # a run choice may change
    claim_run_directory(resumed, run, "resumed config").release()
    assert (run / "config.yaml").read_text() == original
    assert [p.read_text() for p in (run / CONFIG_HISTORY).iterdir()] == ["resumed config"]


def test_a_fresh_start_keeps_the_earlier_config_in_the_history(tmp_path):
    run = tmp_path / "run"
    claim_run_directory(_tiny(run), run, "first").release()  # a run that never saved
    claim_run_directory(_tiny(run, "model.vocab_size=64"), run, "second").release()
    assert (run / "config.yaml").read_text() == "second"
    assert [p.read_text() for p in (run / CONFIG_HISTORY).iterdir()] == ["first"]
    (run / "metrics.jsonl").write_text('{"step": 0}\n')  # logged steps, no checkpoint: the run will stop, config kept
    claim_run_directory(_tiny(run), run, "third").release()
    assert (run / "config.yaml").read_text() == "second"


def test_init_from_a_run_with_another_architecture_names_key_and_both_values(tmp_path):
    source = tmp_path / "source"
    _saved_run(source, _tiny(source))
    for init_from in (source, source / "checkpoints" / "step_1"):
        cfg = _tiny(tmp_path / "new", f"trainer.init_from={init_from}", "model.hidden_size=32",
                    "model.ffn_hidden_size=128")
        with pytest.raises(ConfigError, match=r"model.hidden_size=32 now, 64 before \(in .*source/config.yaml, the run "
                                              r"trainer.init_from="):
            validate_config(cfg)
    validate_config(_tiny(tmp_path / "new", f"trainer.init_from={source}"))


def test_a_read_only_checkpoint_folder_is_found_at_start(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    as_root = os.geteuid() == 0  # root writes into any folder: make it a read-only mount instead
    if as_root:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(run / "checkpoints")], check=True)
    else:
        (run / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="checkpoints is not writable"):
            claim_run_directory(_tiny(run), run, "x")
    finally:
        if as_root:
            subprocess.run(["umount", str(run / "checkpoints")], check=True)
        else:
            (run / "checkpoints").chmod(0o755)
