"""Loading the paper's problem files (Parquet, or the same fields as JSONL, or a Hugging Face dataset:
:mod:`clipo_nemo.data.hf_datasets`) into validated problems.

A row has ``data_source`` (str), ``prompt`` (a list of ``{role, content}`` messages, or a plain
string for one user message) and ``reward_model.ground_truth`` (str); the key names are configurable.
Each row is checked once here, so later stages never meet a malformed one: a bad row is an error
naming the file and row, or, with ``on_bad_row="skip"``, dropped and counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from clipo_nemo.data.hf_datasets import hub_dataset_rows, is_hub_spec, saved_dataset_rows
from clipo_nemo.verifiers import DEFAULT_MULTIPLE_CHOICE_SOURCES, offered_letters, reference_answer, verifier_for_source

Message = Dict[str, str]


@dataclass(frozen=True)
class Problem:
    """One validated row."""

    source_file: str  # the file it came from
    row: int  # its 0-based row (line, for JSONL) in that file
    data_source: str  # e.g. "conrl/gsm8k"
    messages: Tuple[Message, ...]  # the chat messages of the prompt
    reference: str  # the reference answer (the last boxed answer when the row holds a whole solution)
    verifier: str  # registry name in clipo_nemo.verifiers
    choices: Tuple[str, ...] = ()  # letters the prompt offers (multiple_choice only)


@dataclass
class LoadedProblems:
    """Problems of one or more files, with the rows that were skipped (``on_bad_row="skip"``)."""

    problems: List[Problem] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # one "file row N: why" line per skipped row

    def extend(self, other: "LoadedProblems") -> None:
        self.problems.extend(other.problems)
        self.skipped.extend(other.skipped)


class BadRowError(ValueError):
    """A row that cannot become a problem; the message names its file and row."""


@dataclass(frozen=True)
class RowSchema:
    """Where a row keeps its fields; dotted keys reach into nested records."""

    prompt_key: str = "prompt"
    answer_key: str = "reward_model.ground_truth"
    data_source_key: str = "data_source"
    multiple_choice_sources: Tuple[str, ...] = DEFAULT_MULTIPLE_CHOICE_SOURCES


def _lookup(row: Mapping[str, Any], dotted_key: str) -> Any:
    value: Any = row
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted_key)
        value = value[part]
    return value


def _messages(prompt: Any) -> Tuple[Message, ...]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"prompt must be a non-empty list of messages or a string, got {type(prompt).__name__}")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise ValueError(f"prompt message {i} must have string 'role' and 'content', got {message!r:.120}")
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(message["content"].strip() for message in messages):
        raise ValueError("prompt has no text")
    return tuple(messages)


def problem_from_row(row: Mapping[str, Any], source_file: str, row_number: int, schema: RowSchema) -> Problem:
    """Validate one row; raises :class:`BadRowError` naming ``source_file`` and ``row_number``."""
    try:
        if not isinstance(row, Mapping):
            raise ValueError(f"a row must be a record, got {type(row).__name__}")
        for key in (schema.prompt_key, schema.answer_key, schema.data_source_key):
            try:
                _lookup(row, key)
            except KeyError:
                raise ValueError(f"missing field {key!r}") from None
        data_source = _lookup(row, schema.data_source_key)
        if not isinstance(data_source, str) or not data_source:
            raise ValueError(f"{schema.data_source_key!r} must be a non-empty string, got {data_source!r:.80}")
        ground_truth = _lookup(row, schema.answer_key)
        if not isinstance(ground_truth, str):
            raise ValueError(f"{schema.answer_key!r} must be a string, got {type(ground_truth).__name__}")
        reference = reference_answer(ground_truth)
        if not reference:
            where = "its last \\boxed{} is empty" if ground_truth.strip() else "it is empty"
            raise ValueError(f"no reference answer in {schema.answer_key!r}: {where}")
        messages = _messages(_lookup(row, schema.prompt_key))
        verifier = verifier_for_source(data_source, schema.multiple_choice_sources)
        choices: Tuple[str, ...] = ()
        if verifier == "multiple_choice":
            choices = offered_letters(messages[-1]["content"])
            if reference not in choices:
                raise ValueError(f"reference answer {reference!r} is not one of the offered letters {choices}")
    except ValueError as exc:  # MalformedBoxError and offered_letters' errors are ValueErrors too
        raise BadRowError(f"{source_file} row {row_number}: {exc}") from None
    return Problem(source_file, row_number, data_source, messages, reference, verifier, choices)


@dataclass(frozen=True)
class UnreadableRow:
    """Stands in for a row that cannot be read (a JSONL line that is not valid UTF-8 or JSON, a Parquet
    row with a text field that is not valid UTF-8), so it is reported, or skipped, like any bad row."""

    reason: str


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def _parquet_rows(path: Path) -> List[Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    try:
        return table.to_pylist()
    except UnicodeDecodeError:  # a text field holds bytes that are not UTF-8: find its rows, keep the others
        rows: List[Any] = []
        for index in range(table.num_rows):
            try:
                rows.append(table.slice(index, 1).to_pylist()[0])
            except UnicodeDecodeError as exc:
                rows.append(UnreadableRow(f"a text field: {_not_utf8(exc)}"))
        return rows


def read_rows(path: str | Path) -> List[Any]:
    """All rows of a ``.parquet`` or ``.jsonl`` file, a ``save_to_disk`` dataset directory or a hub
    dataset ``hf:NAME[:CONFIG]:SPLIT`` as Python records, in order. A row that cannot be read (a JSONL
    line that is not UTF-8 or not JSON, a Parquet row with a text field that is not UTF-8) becomes an
    :class:`UnreadableRow` whose reason names the line."""
    if is_hub_spec(path):
        return hub_dataset_rows(str(path))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        return saved_dataset_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.suffix == ".jsonl":
        rows: List[Any] = []
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    rows.append(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError as exc:
                    rows.append(UnreadableRow(f"line {number}: {_not_utf8(exc)}"))
                except json.JSONDecodeError as exc:
                    rows.append(UnreadableRow(f"line {number}: invalid JSON ({exc})"))
        return rows
    raise ValueError(f"unsupported data file type {path.suffix!r} for {path}; expected .parquet or .jsonl (or a "
                     "datasets save_to_disk directory, or hf:NAME[:CONFIG]:SPLIT)")


def load_problems(
    paths: Sequence[str | Path], schema: RowSchema = RowSchema(), on_bad_row: str = "error"
) -> LoadedProblems:
    """Validated problems of every file in ``paths``, in file then row order.

    ``on_bad_row``: ``"error"`` raises :class:`BadRowError` at the first bad row; ``"skip"`` drops
    bad rows and lists them in ``LoadedProblems.skipped``.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    loaded = LoadedProblems()
    for path in paths:
        for row_number, row in enumerate(read_rows(path)):
            if isinstance(row, UnreadableRow):
                error: Optional[BadRowError] = BadRowError(f"{path} row {row_number}: {row.reason}")
            else:
                try:
                    loaded.problems.append(problem_from_row(row, str(path), row_number, schema))
                    continue
                except BadRowError as exc:
                    error = exc
            if on_bad_row == "error":
                raise error
            loaded.skipped.append(str(error))
    return loaded
