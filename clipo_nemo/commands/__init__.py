"""The console commands (``pyproject.toml``'s ``[project.scripts]``); the scripts under ``tools/`` and
``examples/`` are thin wrappers around them:

    clipo-train     examples/train_grpo_clipo.py   (commands.train)
    clipo-convert   tools/convert_hf_to_megatron.py (commands.convert)
    clipo-export    tools/export_to_hf.py           (commands.export)
    clipo-evaluate  tools/evaluate.py               (commands.evaluate)
    clipo-plan      tools/plan_layout.py            (commands.plan)
"""
from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The YAML configs: ``examples/conf`` of a source checkout, or the copy an installed package carries
    as ``clipo_nemo/conf`` (setup.py maps it there)."""
    packaged = Path(__file__).resolve().parent.parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "examples" / "conf"
