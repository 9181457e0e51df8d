"""Claiming a run directory before a run touches it: one owner at a time, a writable checkpoint
folder, the same architecture as the checkpoints it holds, and the history of its configs.

Ownership is an exclusive ``flock`` on ``run_dir/.owner.lock``, taken by rank 0 and held until the
run ends. The kernel drops it when the holder exits in any way (SIGKILL and OOM kills included), so a
crashed owner never leaves the directory stuck. The lock file also records who holds it (host, pid,
SLURM job), which is what a second trainer's error names. One exception: a requeued SLURM job (the
same ``SLURM_JOB_ID``, a higher ``SLURM_RESTART_COUNT``) takes over from its own earlier allocation
even while a lock of the failed node still lingers on a shared file system (SLURM runs one
allocation of a job at a time). On a file system without locks the run goes on with a note saying
ownership is not enforced there.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, List, Optional

LOCK_NAME = ".owner.lock"
CONFIG_NAME = "config.yaml"
CONFIG_HISTORY = "config_history"  # every earlier config.yaml of the directory, and each resume's config
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunDirectoryBusy(RuntimeError):
    """Another trainer owns the run directory."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}


def describe_holder(holder: dict) -> str:
    """``pid 123 on host h (SLURM job 7), started ...: command`` from a lock file's record."""
    if not holder:
        return "a trainer that has not written its name yet"
    job = f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started')}: "
            f"{holder.get('command', '')}")


def read_holder(run_dir: Path) -> dict:
    """The record of the lock file's last owner ({} when there is none or it is being written)."""
    try:
        record = json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _requeue_of(holder: dict) -> bool:
    """Whether this process is a later allocation of the SLURM job that ``holder`` belongs to."""
    me = _holder()
    return bool(me["slurm_job_id"]) and holder.get("slurm_job_id") == me["slurm_job_id"] and \
        int(holder.get("slurm_restart_count", 0)) < me["slurm_restart_count"]


@dataclass
class RunLock:
    """This process's ownership of a run directory (release it, or exit, to give it up)."""

    handle: Optional[IO]
    notes: List[str]

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor drops the flock
            self.handle = None


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Take ``run_dir``'s lock (creating the directory) or raise :class:`RunDirectoryBusy` naming its holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_NAME, "a+")
    notes = []
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(run_dir)
        if not _requeue_of(holder):
            handle.close()
            raise RunDirectoryBusy(
                f"{run_dir} is in use by another trainer ({describe_holder(holder)}). A run directory has one owner: "
                "wait for that run to end (or stop it: it saves and exits on SIGTERM), or give this run another "
                "trainer.output_dir") from None
        notes.append(f"took over {run_dir} from an earlier allocation of SLURM job {holder['slurm_job_id']} "
                     f"(restart {holder.get('slurm_restart_count', 0)}), whose lock still lingers: a requeued job")
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
        notes.append(f"the file system of {run_dir} does not support locks ({err.strerror}): nothing stops a second "
                     "trainer from using this run directory at the same time; make sure none does")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_holder()))
    handle.flush()
    return RunLock(handle, notes)


def check_checkpoints_writable(run_dir: Path) -> None:
    """PermissionError, before any compute, when the run could not save its checkpoints."""
    for folder in (run_dir / "checkpoints", run_dir):
        if folder.exists():
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"{folder} is not writable: the run could not save its checkpoints there "
                                      "(fix its permissions, or choose another trainer.output_dir)")
            return


def write_config(run_dir: Path, config_yaml: str, resuming: bool) -> Optional[Path]:
    """Keep ``run_dir/config.yaml`` the config its checkpoints were trained with, and every other one.

    A resume (``resuming``: the directory holds a checkpoint or logged steps) leaves ``config.yaml`` as it is
    and adds its own config to ``config_history/``; a fresh start in a directory with an older
    ``config.yaml`` (of a run that never saved) moves that one to ``config_history/`` first. Returns the
    path written to ``config_history/``, if any."""
    current, history = run_dir / CONFIG_NAME, run_dir / CONFIG_HISTORY
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    kept = None
    if current.exists():
        history.mkdir(exist_ok=True)
        kept = history / f"config.{'resumed' if resuming else 'replaced'}-{stamp}.yaml"
        if resuming:
            kept.write_text(config_yaml)
            return kept
        os.replace(current, kept)
    current.write_text(config_yaml)
    return kept


def claim_run_directory(cfg, run_dir: Path, config_yaml: str) -> RunLock:
    """Rank 0's start in ``run_dir``: take its lock, check that checkpoints can be saved and that the
    architecture is the one its checkpoints (or ``trainer.init_from``'s run) were trained with, then
    record the config (:func:`write_config`). Raises RunDirectoryBusy, PermissionError or ConfigError
    (the lock released)."""
    from clipo_nemo.checkpoint.recovery import checkpoints_dir, complete_checkpoints
    from clipo_nemo.config import ConfigError
    from clipo_nemo.validation import architecture_change_problems

    lock = acquire_run_lock(run_dir)
    try:
        check_checkpoints_writable(run_dir)
        problems = architecture_change_problems(cfg, run_dir)
        if problems:
            raise ConfigError("the model's architecture differs from the checkpoints it would load (a checkpoint "
                              "loads only into the architecture it was saved from; use a new trainer.output_dir "
                              "for another architecture):\n  - " + "\n  - ".join(problems))
        # Logged steps without a checkpoint stop the run later (recovery.check_fresh_start): keep their config too.
        earlier_run = bool(complete_checkpoints(checkpoints_dir(run_dir))) or (run_dir / "metrics.jsonl").is_file()
        write_config(run_dir, config_yaml, resuming=earlier_run)
    except BaseException:
        lock.release()
        raise
    return lock
