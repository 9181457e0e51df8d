"""The sbatch scripts run through stand-in ``srun``/``scontrol`` on PATH (no SLURM, no container, no GPU).

The stand-in srun records its arguments and environment; with FAKE_SRUN_EXEC=1 it also runs the command
(after its own --options) here, with the repository standing in for the container's /workspace/clipo-nemo.
The stand-in scontrol answers ``show hostnames`` and records ``requeue``. The command lines are checked
against torchrun's own argument parser and Hydra's composition of the config, not against the scripts.
"""
import json
import os
import posixpath
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"track1": "track1.sbatch", "track2": "track2.sbatch", "llama3_70b": "llama3_70b.sbatch"}
WORKDIR = "/workspace/clipo-nemo"

FAKE_SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_LOG/srun_args"
env -0 > "$FAKE_LOG/srun_env"
output=
while [[ $# -gt 0 && $1 == --* ]]; do
  [[ $1 == --output=* ]] && output=${1#--output=}
  shift
done
[[ ${FAKE_SRUN_EXEC:-0} == 1 ]] || exit 0
exec "$@" > "${output//%n/0}" 2>&1
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1 ${2:-}" in
  "show hostnames") tr ',' '\n' <<< "$FAKE_HOSTS" ;;
  requeue*) echo "requeue $2" >> "$FAKE_LOG/scontrol" ;;
  *) echo "stand-in scontrol: unexpected arguments: $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm_log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("python", f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def env(job_id, hosts, **extra):
        return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                "FAKE_HOSTS": ",".join(hosts), "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NUM_NODES": str(len(hosts)),
                "SLURM_JOB_NODELIST": f"gpu[001-{len(hosts):03d}]", "SLURM_SUBMIT_DIR": str(ROOT),
                "SLURM_CPUS_ON_NODE": "64", "OMP_NUM_THREADS": "1", **extra}

    def srun_call():
        args = (log / "srun_args").read_text().split("\0")[:-1]
        environ = dict(item.split("=", 1) for item in (log / "srun_env").read_text().split("\0") if "=" in item)
        return args, environ

    def requeues():
        path = log / "scontrol"
        return path.read_text().splitlines() if path.exists() else []

    env.srun_call, env.requeues = srun_call, requeues
    return env


def _sbatch_options(script):
    return [line.split(None, 1)[1].strip() for line in (ROOT / "examples" / "slurm" / script).read_text().splitlines()
            if line.startswith("#SBATCH ")]


def _split_srun(args):
    """(srun options as a dict, the command it runs)."""
    first = next(i for i, arg in enumerate(args) if not arg.startswith("--"))
    return dict(arg[2:].split("=", 1) for arg in args[:first]), args[first:]


def _compose(config_name, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from clipo_nemo.config import ClipoConfig

    ConfigStore.instance().store(name="clipo_schema", node=ClipoConfig)
    with initialize_config_dir(str(ROOT / "examples" / "conf"), version_base=None):
        return OmegaConf.to_object(compose(config_name, overrides=list(overrides)))


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("config_name", sorted(SCRIPTS))
def test_sbatch_command_lines(fake_slurm, tmp_path, config_name, nodes):
    from torch.distributed.run import get_args_parser

    script = SCRIPTS[config_name]
    options = _sbatch_options(script)
    assert "--requeue" in options and "--gpus-per-node=8" in options and "--ntasks-per-node=1" in options
    (signal_option,) = [o for o in options if o.startswith("--signal=")]
    assert signal_option.startswith("--signal=B:USR1@") and int(signal_option.split("@")[1]) >= 600

    init_from, run_dir = tmp_path / "ckpt", tmp_path / "run"
    init_from.mkdir()
    hosts = [f"gpu{i:03d}" for i in range(1, nodes + 1)]
    proc = subprocess.run(["bash", f"examples/slurm/{script}", str(init_from), str(run_dir), "rollout.n=8"], cwd=ROOT,
                          env=fake_slurm(4242, hosts), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert fake_slurm.requeues() == []  # no stop was requested
    args, environ = fake_slurm.srun_call()
    srun, command = _split_srun(args)
    assert srun["kill-on-bad-exit"] == "1" and srun["nodes"] == str(nodes) and srun["ntasks-per-node"] == "1"
    assert srun["cpus-per-task"] == "64" and srun["container-workdir"] == WORKDIR
    mounts = {m.split(":")[1]: m for m in srun["container-mounts"].split(",")}
    assert mounts[WORKDIR] == f"{ROOT}:{WORKDIR}"
    assert mounts[str(run_dir)] == f"{run_dir}:{run_dir}"
    assert mounts[str(init_from)] == f"{init_from}:{init_from}:ro"
    assert srun["output"] == f"{run_dir}/logs/job4242_attempt0/node%n.log"
    assert environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"

    assert command[:3] == ["python", "-m", "clipo_nemo.parallel.launcher"]
    torchrun = get_args_parser().parse_args(command[3:])  # torchrun's own parser
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.max_restarts) == (str(nodes), "8", 0)
    assert torchrun.rdzv_backend == "c10d" and torchrun.rdzv_id == "clipo-4242-0"
    host, port = torchrun.rdzv_endpoint.split(":")
    assert host == "gpu001" and 1024 < int(port) < 65536
    assert torchrun.log_dir == f"{run_dir}/logs/job4242_attempt0/ranks"
    assert torchrun.training_script == "examples/train_grpo_clipo.py"
    hydra_args = torchrun.training_script_args
    assert hydra_args[0] == f"--config-name={config_name}"
    cfg = _compose(config_name, hydra_args[1:])  # every override is a key of the schema
    assert cfg.trainer.output_dir == str(run_dir) and cfg.trainer.init_from == str(init_from)
    assert cfg.rollout.n == 8  # extra arguments reach the trainer
    # The data the config reads lies under a mount (relative paths resolve from the container's workdir).
    for path in [*cfg.data.train_files, *cfg.data.val_files, cfg.evaluation.data_dir]:
        resolved = posixpath.normpath(posixpath.join(WORKDIR, path))
        assert any(resolved.startswith(dst + "/") for dst in mounts), f"{path} -> {resolved} is not mounted"


def test_each_job_gets_its_own_rendezvous_id_and_a_free_port(fake_slurm, tmp_path):
    from torch.distributed.run import get_args_parser

    run_dir = tmp_path / "run"

    def endpoint(job_id, **extra):
        proc = subprocess.run(["bash", "examples/slurm/launch.sh", "tiny", "", str(run_dir)], cwd=ROOT,
                              env=fake_slurm(job_id, ["127.0.0.1"], **extra), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        torchrun = get_args_parser().parse_args(_split_srun(fake_slurm.srun_call()[0])[1][3:])
        return torchrun.rdzv_id, int(torchrun.rdzv_endpoint.split(":")[1])

    ids_ports = {job: endpoint(job) for job in (5101, 5102)}
    assert ids_ports[5101][0] != ids_ports[5102][0] and ids_ports[5101][1] != ids_ports[5102][1]
    assert endpoint(5101, SLURM_RESTART_COUNT="1")[0] == "clipo-5101-1"  # a requeued attempt: a new id
    # A port in use on the first node is skipped.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ids_ports[5101][1]))
        busy.listen()
        assert endpoint(5101)[1] == ids_ports[5101][1] + 1


def test_launch_refuses_relative_paths(fake_slurm, tmp_path):
    proc = subprocess.run(["bash", "examples/slurm/launch.sh", "tiny", "", "runs/relative"], cwd=ROOT,
                          env=fake_slurm(7, ["127.0.0.1"]), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "must be an absolute path" in proc.stderr
    assert not (tmp_path / "slurm_log" / "srun_args").exists()  # nothing was launched


def _metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_usr1_saves_requeues_and_the_requeued_job_resumes(fake_slurm, tmp_path):
    """SLURM's B:USR1 warning reaches the batch script: the ranks save and exit 0, the script requeues the
    job, and the requeued job (same output_dir, SLURM_RESTART_COUNT=1) resumes from the checkpoint."""
    from clipo_nemo.checkpoint.recovery import latest_checkpoint

    run = tmp_path / "run"
    fast = ["trainer.prompts_per_step=8", "rollout.n=4", "parallel.micro_batch_size=8", "actor.num_mini_batches=2",
            "contrastive.warmup_steps=1", "evaluation.every_steps=0", "trainer.save_every_steps=0",
            "parallel.timeout_s=120"]
    env = fake_slurm(6161, ["127.0.0.1"], FAKE_SRUN_EXEC="1", GPUS_PER_NODE="1")
    first = subprocess.Popen(["bash", "examples/slurm/launch.sh", "tiny", "", str(run), *fast, "trainer.max_steps=1000"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not _metrics(run):
        if first.poll() is not None or time.time() > deadline:
            first.kill()
            pytest.fail(f"no training step (exit {first.poll()}): {first.communicate()[0][-3000:]}")
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)
    out, _ = first.communicate(timeout=180)
    node_log = (run / "logs" / "job6161_attempt0" / "node0.log").read_text()
    assert first.returncode == 0, out[-2000:] + node_log[-3000:]
    assert fake_slurm.requeues() == ["requeue 6161"]
    assert "stopped by signal" in node_log
    saved = len(_metrics(run))
    assert latest_checkpoint(str(run)).name == f"step_{saved}"
    (rank_dir,) = (run / "logs" / "job6161_attempt0" / "ranks").glob("clipo-6161-0_*/attempt_0/0")
    assert "stopped by signal" in (rank_dir / "stdout.log").read_text()  # the per-rank log

    env["SLURM_RESTART_COUNT"] = "1"  # what the requeued job sees
    second = subprocess.run(["bash", "examples/slurm/launch.sh", "tiny", "", str(run), *fast,
                             f"trainer.max_steps={saved + 2}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    node_log = (run / "logs" / "job6161_attempt1" / "node0.log").read_text()
    assert second.returncode == 0, second.stderr[-2000:] + node_log[-3000:]
    assert fake_slurm.requeues() == ["requeue 6161"]  # completed: not requeued again
    assert f"at step {saved}" in node_log and "run completed" in node_log
    assert [row["step"] for row in _metrics(run)] == list(range(saved + 2))
    assert latest_checkpoint(str(run)).name == f"step_{saved + 2}"
