"""docs/config.md, the configuration reference, is generated from the schema and kept up to date
(tools/config_reference.py, issue 25)."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipo_nemo.config import ClipoConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("config_reference", ROOT / "tools" / "config_reference.py")
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)


def _keys(obj, prefix=""):
    """Every dotted leaf key of a config object and its default, walking the dataclasses."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def test_docs_config_md_is_what_the_schema_gives():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == reference.render(), "docs/config.md is out of date: run python tools/config_reference.py"
    assert reference.main(["--check"]) == 0


def test_every_key_has_one_row_with_its_default_and_comment():
    rows = {line.split("|")[1].strip().strip("`"): line for line in (ROOT / "docs" / "config.md").read_text().splitlines()
            if line.startswith("| `")}
    keys = dict(_keys(ClipoConfig()))
    assert set(rows) == set(keys)
    for key, default in keys.items():
        cells = [c.strip() for c in rows[key].split(" | ")]
        assert cells[2] == f"`{json.dumps(default)}`", key
        assert len(cells[3].rstrip(" |")) > 3, key  # a comment, not an empty cell
    # Comments placed the three ways the schema places them: on the line, continued below, above.
    assert "positives share the anchor's correctness" in rows["contrastive.anchors"]
    assert "Dual clip (grpo/dapo)" in rows["algorithm.dual_clip_c"]
    assert "Dual clip" not in rows["algorithm.clip_ratio_high"]
    assert "multiple_choice verifier" in rows["data.multiple_choice_sources"]  # after a multi-line statement
    assert "| `contrastive.head.dim` | `int` | `512` |" in rows["contrastive.head.dim"]


def test_a_key_without_a_comment_is_an_error_naming_it():
    source = reference.SCHEMA.read_text()
    line = next(l for l in source.splitlines() if l.strip().startswith("entropy_coef:"))
    with pytest.raises(ValueError, match=r"keys without a comment .*\['algorithm.entropy_coef'\]"):
        reference.render(source.replace(line, line.split("#")[0].rstrip()))


def test_help_points_to_the_config_reference():
    proc = subprocess.run([sys.executable, "examples/train_grpo_clipo.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "docs/config.md" in proc.stdout
