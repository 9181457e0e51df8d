"""Hugging Face datasets as data: a save_to_disk directory and a hub name read from the local datasets
cache (offline) give the problems, bad-row handling and counts that the same rows give as Parquet."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipo_nemo.config import DataConfig
from clipo_nemo.data import BadRowError, load_problems, load_prompt_set
from clipo_nemo.data.tiny_task import make_tiny_arith_splits
from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer
from clipo_nemo.trainer.evaluation import load_benchmarks

ROOT = Path(__file__).resolve().parents[1]


def _rows():
    """The tiny task's held-out rows, a row with no reference answer, and one too long for 24 tokens."""
    rows = make_tiny_arith_splits(max_operand=3, operators=["+"], val_fraction=0.5)["heldout"]
    missing = json.loads(json.dumps(rows[0]))
    missing["reward_model"]["ground_truth"] = None
    long = json.loads(json.dumps(rows[1]))
    long["prompt"][0]["content"] = " ".join([long["prompt"][0]["content"]] * 6)
    return rows + [missing, long]


@pytest.fixture()
def sources(tmp_path):
    """The same rows as a Parquet file (the oracle: the existing reader) and a save_to_disk directory."""
    import datasets

    rows = _rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "rows.parquet", tmp_path / "saved", len(rows)


def _without_source(problems):
    return [replace(problem, source_file="") for problem in problems]


def test_saved_dataset_gives_the_problems_bad_rows_and_counts_of_the_same_parquet(sources):
    parquet, saved, count = sources
    from_parquet, from_saved = (load_problems([p], on_bad_row="skip") for p in (parquet, saved))
    assert len(from_parquet.problems) == count - 1 and len(from_parquet.skipped) == 1
    assert _without_source(from_saved.problems) == _without_source(from_parquet.problems)
    assert [p.row for p in from_saved.problems] == [p.row for p in from_parquet.problems]
    assert from_saved.skipped == [line.replace(str(parquet), str(saved)) for line in from_parquet.skipped]
    with pytest.raises(BadRowError, match=f"{saved} row {count - 2}: "):
        load_problems([saved])
    data = DataConfig(max_prompt_length=24, on_bad_row="skip")
    counts = [load_prompt_set([str(p)], data, build_tiny_tokenizer()).metrics("train") for p in (parquet, saved)]
    assert counts[0] == counts[1] and counts[1]["data/train/too_long"] == 1 and counts[1]["data/train/skipped_rows"] == 1


def test_saved_dataset_as_an_evaluation_benchmark_and_a_dataset_dict_names_its_splits(sources, tmp_path):
    import datasets

    parquet, _, _ = sources
    clean = datasets.Dataset.from_parquet(str(parquet)).select(range(len(_rows()) - 2))  # without the bad rows
    clean.save_to_disk(str(tmp_path / "bench" / "heldout"))
    benchmark = load_benchmarks(tmp_path / "bench", ["heldout"])["heldout"]
    assert _without_source(benchmark) == _without_source(load_problems([parquet], on_bad_row="skip").problems[:-1])
    dataset = datasets.load_from_disk(str(tmp_path / "bench" / "heldout"))
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"saved DatasetDict with the splits \['train', 'test'\]: name one split's "
                                         r"directory, e.g. .*dict/train"):
        load_problems([tmp_path / "dict"])
    assert len(load_problems([tmp_path / "dict" / "test"], on_bad_row="skip").problems) == len(benchmark)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a data file or a dataset written by datasets' save_to_disk"):
        load_problems([tmp_path / "plain"])
    with pytest.raises(ValueError, match="hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"):
        load_problems(["hf:only-a-name"])


def _cache_as_hub_download(parquet: Path, cache: Path, repo: str) -> None:
    """Put ``parquet`` into the datasets cache where a download of the hub dataset ``repo`` (config
    ``default``) leaves it: ``<cache>/<org>___<name>/default/0.0.0/<hash>/<name>-train.arrow`` with its
    dataset_info.json, as written by datasets' own Parquet builder (what datasets.load reads back in
    offline mode: ``CachedDatasetModuleFactory``)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo.split("/")
    builder = Parquet(cache_dir=str(cache / "build"), dataset_name=name, hash="0" * 16,
                      data_files={"train": str(parquet)})
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / "default" / "0.0.0" / ("0" * 16)
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(cache / "build")


def test_hub_dataset_name_is_read_from_the_local_cache_offline(sources, tmp_path):
    parquet, _, count = sources
    cache = tmp_path / "cache"
    _cache_as_hub_download(parquet, cache, "tiny-org/arith")
    script = ("import json, sys; from clipo_nemo.data import load_problems\n"
              "loaded = load_problems(sys.argv[1:], on_bad_row='skip')\n"
              "print(json.dumps([len(loaded.problems), loaded.skipped, loaded.problems[0].source_file, "
              "loaded.problems[-1].reference]))")
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script, "hf:tiny-org/arith:train"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    kept, skipped, source, last = json.loads(run.stdout.splitlines()[-1])
    oracle = load_problems([parquet], on_bad_row="skip")
    assert kept == len(oracle.problems) == count - 1 and source == "hf:tiny-org/arith:train"
    assert skipped == [line.replace(str(parquet), "hf:tiny-org/arith:train") for line in oracle.skipped]
    assert last == oracle.problems[-1].reference
    # A name the cache does not hold: a clear error saying offline mode and the cache, nothing downloaded.
    run = subprocess.run([sys.executable, "-c", script, "hf:tiny-org/missing:train"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "the Hugging Face dataset 'tiny-org/missing' (config None, split 'train') could not be loaded in offline " \
           f"mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) from the cache {cache}" in run.stderr
