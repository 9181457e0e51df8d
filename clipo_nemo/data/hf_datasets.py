"""Hugging Face ``datasets`` as problem sources, besides Parquet and JSONL files.

Two forms, wherever a data file is named (``data.train_files``, ``data.val_files``, evaluation
benchmarks):

- a directory written by ``Dataset.save_to_disk`` (one split; of a saved ``DatasetDict``, name the
  split's sub-directory, e.g. ``DIR/train``), read with ``datasets.load_from_disk``;
- ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``, a hub dataset read with ``datasets.load_dataset``
  through the local ``datasets`` cache (``HF_DATASETS_CACHE``); with ``HF_HUB_OFFLINE=1`` (or
  ``HF_DATASETS_OFFLINE=1``) only the cache is read.

Their rows go through the same validation as a file's rows (:func:`clipo_nemo.data.problems.load_problems`).
Needs the ``datasets`` package (``pip install 'clipo-nemo[datasets]'``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Tuple

HUB_PREFIX = "hf:"


def is_hub_spec(source: Any) -> bool:
    """Whether ``source`` names a hub dataset (``hf:NAME[:CONFIG]:SPLIT``)."""
    return str(source).startswith(HUB_PREFIX)


def parse_hub_spec(spec: str) -> Tuple[str, Optional[str], str]:
    """``hf:NAME:SPLIT`` -> (NAME, None, SPLIT); ``hf:NAME:CONFIG:SPLIT`` -> (NAME, CONFIG, SPLIT)."""
    parts = spec[len(HUB_PREFIX):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"data source {spec!r}: a hub dataset is named hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
                         "(e.g. hf:openai/gsm8k:main:test)")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1]


def _datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data source {source} is a Hugging Face dataset, but the datasets package is not "
                          "installed: pip install 'clipo-nemo[datasets]' (or: pip install datasets)") from None
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def saved_dataset_rows(path: Path) -> List[Any]:
    """The rows of a ``save_to_disk`` directory, in order."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{path} is a saved DatasetDict with the splits {splits}: name one split's directory, "
                         f"e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is a directory, not a data file or a dataset written by datasets' save_to_disk "
                         "(no state.json)")
    return _datasets(str(path)).load_from_disk(str(path)).to_list()


def hub_dataset_rows(spec: str) -> List[Any]:
    """The rows of the hub dataset ``spec`` (``hf:NAME[:CONFIG]:SPLIT``) from the local cache, or
    downloaded into it when online."""
    name, config, split = parse_hub_spec(spec)
    datasets = _datasets(spec)
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        offline = datasets.config.HF_HUB_OFFLINE
        raise FileNotFoundError(
            f"data source {spec}: the Hugging Face dataset {name!r} (config {config!r}, split {split!r}) could not "
            f"be loaded{' in offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)' if offline else ''} from the "
            f"cache {datasets.config.HF_DATASETS_CACHE}: {err}") from None
    return dataset.to_list()
