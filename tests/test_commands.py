"""Packaging (point 5 of issue 23): pyproject.toml's console commands are the functions the scripts
wrap, and a wheel built from the tree carries them and the YAML configs."""
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRAPPERS = {"clipo-train": "examples/train_grpo_clipo.py", "clipo-convert": "tools/convert_hf_to_megatron.py",
            "clipo-export": "tools/export_to_hf.py", "clipo-evaluate": "tools/evaluate.py",
            "clipo-plan": "tools/plan_layout.py"}


def _scripts():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _target(spec: str):
    module, function = spec.split(":")
    return getattr(importlib.import_module(module), function)


def test_every_console_command_is_the_function_its_script_runs():
    scripts = _scripts()
    assert set(scripts) == set(WRAPPERS)
    for command, spec in scripts.items():
        loaded = importlib.util.spec_from_file_location(f"wrapper_{command.replace('-', '_')}", ROOT / WRAPPERS[command])
        wrapper = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(wrapper)  # the wrapper's __main__ guard keeps it from running
        assert wrapper.main is _target(spec), command


def test_plan_command_finds_the_configs_from_any_directory(tmp_path):
    """clipo-plan's function, run as its console script would be (a fresh process, another directory)."""
    module, function = _scripts()["clipo-plan"].split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "--config-name=tiny", "--no-recommendations"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].startswith("fits: yes")


def test_wheel_carries_the_commands_and_the_configs(tmp_path):
    source = tmp_path / "src"  # what the build reads, copied: an in-tree build would leave build/ in the repo
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "clipo_nemo", source / "clipo_nemo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "examples" / "conf", source / "examples" / "conf")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("clipo_nemo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"clipo_nemo/conf/{p.name}" for p in (ROOT / "examples" / "conf").glob("*.yaml")} <= set(names)
    assert "clipo_nemo/commands/train.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{command} = {spec}" in text for command, spec in _scripts().items())
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    extras = {line.split(": ")[1] for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
              if line.startswith("Provides-Extra: ")}
    assert {"gpu", "trackers", "test"} <= extras


def test_closing_commands_of_an_installed_package_are_the_console_commands(tmp_path, monkeypatch):
    """An installed package has no tools/: the run's closing lines name clipo-evaluate and clipo-export."""
    import shlex

    from clipo_nemo.config import ClipoConfig
    from clipo_nemo.trainer import run_report

    monkeypatch.setattr(run_report, "ROOT", tmp_path / "site-packages")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    commands = {line.split(":")[0]: shlex.split(line.split(":", 1)[1]) for line in run_report.next_steps(ClipoConfig(), run)}
    assert commands["evaluate"][:3] == ["clipo-evaluate", "--checkpoint", str(run)]
    assert commands["export"] == ["clipo-export", str(run), "--out", str(run / "hf")]
