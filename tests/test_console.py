"""What a run prints: library noise filtered by message (clipo_nemo.console), a short start-up, no
warning with the default verbosity, and closing commands that work as printed (issue 25)."""
import importlib.util
import io
import logging
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from clipo_nemo.config import ClipoConfig
from clipo_nemo.console import setup_console
from clipo_nemo.trainer.run_report import next_steps, python_command

ROOT = Path(__file__).resolve().parents[1]
# 8 prompts x 4 responses, one step, validation on the held-out splits with one sample.
FAST = ["trainer.prompts_per_step=8", "rollout.n=4", "evaluation.every_steps=1", "evaluation.k=1",
        "parallel.micro_batch_size=8", "actor.num_mini_batches=2", "contrastive.warmup_steps=0"]
BAR = re.compile(r"train:\s+\d+%\|")  # a tqdm render of the training bar
APEX = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."


@pytest.fixture
def console(monkeypatch):
    """The root logger with one handler writing into a buffer; logging and warnings restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers = [handler]
    monkeypatch.delenv("RANK", raising=False)
    with warnings.catch_warnings():
        yield buffer
    logging.captureWarnings(False)
    root.handlers = saved[0]
    root.setLevel(saved[1])


def _warn_from(module: str, text: str, category=UserWarning) -> None:
    warnings.warn_explicit(text, category, f"/site-packages/{module.replace('.', '/')}.py", 24, module=module)


def test_listed_library_messages_are_dropped_by_message_and_shown_with_debug(console):
    setup_console("info")
    _warn_from("megatron.core.optimizer", APEX)
    logging.getLogger("megatron.core.distributed.distributed_data_parallel").info(
        "Setting up DistributedDataParallel with config DistributedDataParallelConfig(grad_reduce_in_fp32=True)")
    # Not listed: a warning of the same category and module, a log line of the same logger.
    _warn_from("megatron.core.optimizer", "some other fallback")
    logging.getLogger("megatron.core.distributed.distributed_data_parallel").info("a line nobody listed")
    # The same message issued by another module is not megatron's noise.
    _warn_from("mypackage.optim", APEX)
    shown = console.getvalue()
    assert "Setting up DistributedDataParallel" not in shown
    assert shown.count(APEX) == 1 and "mypackage/optim.py:24: UserWarning" in shown
    assert "some other fallback" in shown and "a line nobody listed" in shown

    console.truncate(0)
    with warnings.catch_warnings():
        warnings.resetwarnings()  # a fresh process: no filter from the "info" setup above
        setup_console("debug")
        _warn_from("megatron.core.optimizer", APEX)
        logging.getLogger("megatron.core.distributed.distributed_data_parallel").info("Setting up DistributedDataParallel")
    shown = console.getvalue()
    assert APEX in shown and "Setting up DistributedDataParallel" in shown


def test_other_ranks_show_warnings_only_and_prefixed(console, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    setup_console("info")
    logging.getLogger("clipo_nemo.anything").info("an info line")
    _warn_from("mypackage.thing", "check this")
    shown = console.getvalue()
    assert "an info line" not in shown
    assert shown.startswith("[rank 3] /site-packages/mypackage/thing.py:24: UserWarning: check this")


def test_a_log_level_that_does_not_exist_is_refused(console):
    with pytest.raises(ValueError, match="log level 'loud' is not one of"):
        setup_console("loud")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_closing_commands_of_a_real_data_run_parse_as_the_tools_read_them(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = ClipoConfig()  # task disabled: the evaluation.* benchmarks
    cfg.evaluation.temperature, cfg.evaluation.k = 1.0, 16
    run = tmp_path / "my run"  # a space: the commands quote it
    assert [line.split(":")[0] for line in next_steps(cfg, run)] == ["metrics"]  # no checkpoint: nothing to run
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    commands = {line.split(":")[0]: shlex.split(line.split(":", 1)[1]) for line in next_steps(cfg, run)}
    evaluate = commands["evaluate"]
    assert evaluate[:2] == [python_command(), "tools/evaluate.py"]
    args = _tool("evaluate").parse_args(evaluate[2:])
    assert (args.checkpoint, args.data_dir, args.benchmarks) == (str(run), cfg.evaluation.data_dir, cfg.evaluation.benchmarks)
    assert (args.k, args.temperature, args.top_p, args.out) == (16, 1.0, cfg.evaluation.top_p, str(run / "eval"))
    assert commands["export"][1:] == ["tools/export_to_hf.py", str(run), "--out", str(run / "hf")]


def _run(args):
    """``args`` run from the repository root; ``stdout`` holds stdout and stderr together as a terminal
    shows them (bytes decoded by hand: text mode would turn tqdm's carriage returns into new lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    proc.stdout = proc.stdout.decode()
    return proc


def _lines_before_bar(out: str) -> list:
    """The lines written before the training bar's first render."""
    lines = out[:BAR.search(out).start()].split("\n")
    return lines if lines[-1].strip(" \r") else lines[:-1]


def test_a_tiny_run_starts_quietly_and_ends_with_commands_that_work(tmp_path):
    run = tmp_path / "run"
    proc = _run([sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={run}",
                 "trainer.max_steps=1", *FAST])
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    start = _lines_before_bar(out)
    assert len(start) <= 12, "\n".join(start)  # issue 25's bound (6 lines when this was written)
    assert "Warning" not in out, out[-4000:]
    assert f"run directory: {run}" in start and any("host memory" in line for line in start)
    assert "GiB per GPU" not in out  # a CPU run's memory plan is in host terms
    assert sum(line.startswith("data ") for line in start) == 2  # the train and val counts

    commands = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith(("evaluate:", "export:"))}
    assert set(commands) == {"evaluate", "export"}
    evaluated = _run(shlex.split(commands["evaluate"]))
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert f"evaluating {run} at step 1" in evaluated.stdout and "Warning" not in evaluated.stdout
    assert {"heldout", "heldout_perturbed"} <= set((run / "eval" / "results.json").read_text().split('"'))
    exported = _run(shlex.split(commands["export"]))
    assert exported.returncode == 0, exported.stdout[-3000:]
    assert (run / "hf" / "config.json").is_file() and "Warning" not in exported.stdout


def test_a_two_process_run_prints_once_and_no_warning(tmp_path):
    from clipo_nemo.parallel.launcher import free_port

    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                 "examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={tmp_path / 'run'}",
                 "trainer.max_steps=1", "parallel.tensor_parallel_size=2", *FAST])
    assert proc.returncode == 0, proc.stdout[-4000:]
    start = _lines_before_bar(proc.stdout)
    assert len(start) <= 12 and "Warning" not in proc.stdout, proc.stdout[-4000:]
    assert sum(line.startswith("run directory:") for line in start) == 1  # rank 0 alone
    assert any("TP 2 x PP 1 x CP 1 x DP 1; 2 processes on CPU" in line for line in start)


def test_debug_log_level_shows_the_library_messages_again(tmp_path):
    proc = _run([sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny",
                 f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=0", "trainer.log_level=debug", *FAST])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "UserWarning: Transformer Engine and Apex are not installed" in proc.stdout
    assert "Setting up DistributedDataParallel with config" in proc.stdout

