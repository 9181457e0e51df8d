"""Which checkpoint a run resumes from, and whether a checkpoint is whole (pure file-system code).

Every checkpoint carries ``manifest.json``: the size and CRC-32 of every file its save wrote, each
computed by the rank that wrote the file (its ``rank``), merged in the save's finalize step just before ``meta.json`` (the completion marker, which the manifest
does not cover: :func:`verify_checkpoint` parses it instead). On resume the checkpoint ``latest``
names is verified; if it is damaged, or ``latest`` itself is missing, a directory or not text, the
newest ``step_N`` that verifies is used, and every checkpoint skipped is named with the reason. A
checkpoint written before manifests existed loads if it is otherwise complete (its required files
are present and readable, its shard files as long as their index says), with a note that it could
not be verified. A run directory whose checkpoints all fail, or that holds logged steps but no
checkpoint, is a :class:`CheckpointError` saying what to do: never a fresh start over the old files.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
META = "meta.json"
SKIPPED_SUFFIX = ".skipped"  # a checkpoint skipped at resume is renamed step_N.skipped before step N is saved again
_MANIFEST_FORMAT = 1
_CHUNK_BYTES = 1 << 20
_HASH_THREADS = 8  # zlib releases the GIL: files are checksummed in parallel


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into, or the checkpoint directory is unusable."""


class CheckpointWarning(UserWarning):
    """Part of a checkpoint could not be restored at this layout or configuration (and was skipped), or
    a checkpoint was skipped at resume."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> Optional[int]:
    """N for a ``step_N`` name, else None."""
    suffix = path.name[len(STEP_PREFIX):]
    return int(suffix) if path.name.startswith(STEP_PREFIX) and suffix.isdigit() else None


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete ``step_N`` directories (their ``meta.json`` exists), oldest first."""
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if step_of(p) is not None and (p / META).is_file()]
    return sorted(found, key=step_of)


def directory_sha256(path: str | os.PathLike) -> str:
    """SHA-256 over the sorted relative names and contents of every file under ``path``."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(8 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_identities(path: str | os.PathLike) -> Dict[str, List[int]]:
    """``{relative name: [size, mtime_ns]}`` of every file under ``path``: a cheap identity (stat only)."""
    root = Path(path)
    return {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Manifest and verification
# ------------------------------------------------------------------------------------------------
def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def file_checksums(directory: Path, names: List[str]) -> Dict[str, Dict[str, object]]:
    """``{name: {"size", "crc32"}}`` of the files ``names`` under ``directory`` (read in parallel threads)."""
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, max(len(names), 1))) as pool:
        sums = dict(zip(names, pool.map(lambda name: _crc32(directory / name), names)))
    return {name: {"size": (directory / name).stat().st_size, "crc32": sums[name]} for name in names}


def write_manifest(checkpoint_dir: str | os.PathLike, recorded: Optional[Dict[str, Dict[str, object]]] = None) -> Path:
    """Write ``checkpoint_dir/manifest.json`` (fsynced): the size and CRC-32 of every file under
    ``checkpoint_dir`` but ``meta.json`` (written after it). ``recorded``: entries already computed by
    the ranks that wrote those files (``{"size", "crc32", "rank"}``); only the files it lacks are read
    here (by this process, recorded as rank 0's). Call it once every rank's files are written, before
    ``meta.json``. Returns the manifest's path."""
    checkpoint_dir, recorded = Path(checkpoint_dir), dict(recorded or {})
    names = sorted(p.relative_to(checkpoint_dir).as_posix() for p in checkpoint_dir.rglob("*")
                   if p.is_file() and p.relative_to(checkpoint_dir).as_posix() not in (MANIFEST, META))
    missing = [name for name in names if name not in recorded]
    files = {**{name: recorded[name] for name in names if name in recorded},
             **{name: {**entry, "rank": 0} for name, entry in file_checksums(checkpoint_dir, missing).items()}}
    path = checkpoint_dir / MANIFEST
    with open(path, "w") as handle:
        handle.write(json.dumps({"format": _MANIFEST_FORMAT, "files": dict(sorted(files.items()))}, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    return path


def checked_by(files: Dict[str, dict], world_size: int, saved_world_size: int) -> Dict[str, int]:
    """Which rank verifies each manifest entry at resume: the rank that wrote (and checksummed) it when
    the job has the saved world size (at an unchanged layout, megatron's fully parallel load plans
    about the same shards for a rank as its save did, so a rank verifies what it is about to read);
    otherwise a size-balanced split (largest files first, each to the least-loaded rank)."""
    if world_size == saved_world_size and all(isinstance(e.get("rank"), int) and 0 <= e["rank"] < world_size
                                              for e in files.values()):
        return {name: entry["rank"] for name, entry in files.items()}
    load, owner = [0] * world_size, {}
    for name in sorted(files, key=lambda n: (-int(files[n].get("size", 0)), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name], load[rank] = rank, load[rank] + int(files[name].get("size", 0))
    return owner


def _read_json(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(content, None), or (None, why it is unusable)."""
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        content = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} is not valid JSON ({err})"
    return (content, None) if isinstance(content, dict) else (None, f"{path.name} is not a JSON object")


def _manifest_problems(checkpoint_dir: Path, manifest: dict, share: Optional[Tuple[int, int]],
                       saved_world_size: int) -> List[str]:
    files = manifest.get("files")
    if manifest.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict) or not all(
            isinstance(entry, dict) and {"size", "crc32"} <= entry.keys() for entry in files.values()):
        return [f"{MANIFEST} is not a format-{_MANIFEST_FORMAT} manifest"]
    if share is not None:
        owner = checked_by(files, share[1], saved_world_size)
        files = {name: entry for name, entry in files.items() if owner[name] == share[0]}
    problems, to_hash = [], []
    for name, entry in sorted(files.items()):
        path = checkpoint_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']} (truncated "
                            "or overwritten)")
        else:
            to_hash.append(name)
    sums = file_checksums(checkpoint_dir, to_hash)
    problems += [f"{name} does not match its checksum (corrupted)" for name in to_hash
                 if sums[name]["crc32"] != files[name]["crc32"]]
    return problems


def _unverified_problems(checkpoint_dir: Path, world_size: int) -> List[str]:
    """Checks for a checkpoint without a manifest: the small files load, and every shard file is as
    long as the sharded-tensor index (``dist/.metadata``) says."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    problems = []
    for name in ["trainer_state.pt", "dist/common.pt"] + [f"rng/rank_{r:05d}.pt" for r in range(world_size)]:
        try:
            torch.load(checkpoint_dir / name, weights_only=False, map_location="cpu")
        except Exception as err:  # noqa: BLE001 -- any unreadable pickle is the same verdict
            problems.append(f"{name} cannot be read ({type(err).__name__}: {err})")
    try:
        storage = FileSystemReader(str(checkpoint_dir / "dist")).read_metadata().storage_data
    except Exception as err:  # noqa: BLE001
        return problems + [f"dist/.metadata cannot be read ({type(err).__name__}: {err})"]
    needed: Dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = checkpoint_dir / "dist" / name
        if not path.is_file() or path.stat().st_size < size:
            problems.append(f"dist/{name} has {path.stat().st_size if path.is_file() else 0} bytes, its index "
                            f"needs {size} (truncated or missing)")
    return problems


def verify_checkpoint(checkpoint_dir: str | os.PathLike, share: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """None when the checkpoint is whole, otherwise why not (every file checked against
    ``manifest.json``; without one, the checks of a checkpoint from before manifests existed).

    ``share=(rank, world_size)``: check only the manifest entries :func:`checked_by` gives ``rank``
    (the checks without a manifest: rank 0 only); the ranks' verdicts together are the whole one
    (:func:`clipo_nemo.checkpoint.shared_verify.verify_together`)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return "not a directory"
    meta, problem = _read_json(checkpoint_dir / META)
    if problem:
        return problem + (" (its save never finished)" if not (checkpoint_dir / META).exists() else "")
    layout = meta.get("layout")
    world_size = layout.get("world_size") if isinstance(layout, dict) else None
    if meta.get("step") != step_of(checkpoint_dir) or not isinstance(world_size, int):
        return f"{META} does not describe {checkpoint_dir.name} (step {meta.get('step')!r}, layout {layout!r})"
    required = ["trainer_state.pt", "dist/.metadata", "dist/common.pt"] + [
        f"rng/rank_{r:05d}.pt" for r in range(world_size)]
    problems = [f"{name} is missing" for name in required if not (checkpoint_dir / name).is_file()]
    _, bad_json = _read_json(checkpoint_dir / "dist" / "metadata.json")
    problems += [f"dist/{bad_json}"] if bad_json else []
    if not problems:
        if (checkpoint_dir / MANIFEST).exists():
            manifest, bad_manifest = _read_json(checkpoint_dir / MANIFEST)
            problems = [bad_manifest] if bad_manifest else _manifest_problems(checkpoint_dir, manifest, share,
                                                                              world_size)
        elif share is None or share[0] == 0:
            problems = _unverified_problems(checkpoint_dir, world_size)
    if not problems:
        return None
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


# ------------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from
# ------------------------------------------------------------------------------------------------
def read_latest(root: Path) -> Tuple[Optional[str], Optional[str]]:
    """(the ``step_N`` name ``root/latest`` holds, None) or (None, what is wrong with it); (None,
    None) when there is no pointer."""
    pointer = root / "latest"
    if not pointer.exists():
        return None, None
    if not pointer.is_file():
        return None, f"{pointer} is not a file"
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{pointer} is unreadable ({type(err).__name__}: {err})"
    if step_of(Path(name)) is None or name != Path(name).name:
        return None, f"{pointer} holds {name[:60]!r}, not a checkpoint name"
    if not (root / name).is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    return name, None


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from and what was noticed on the way."""

    checkpoint: Optional[Path]  # None: the run directory has no checkpoint (a fresh run)
    notes: List[str] = field(default_factory=list)  # each skipped checkpoint and why; pointer problems
    fell_back: bool = False  # not simply the verified checkpoint ``latest`` names: keep every old checkpoint
    old_checkpoints: List[Path] = field(default_factory=list)  # every step_N directory found, newest first


def find_resume_point(run_dir: str | os.PathLike,
                      verify: Callable[[Path], Optional[str]] = verify_checkpoint) -> ResumePoint:
    """The checkpoint ``latest`` names if it verifies, otherwise the newest ``step_N`` (older than the
    one ``latest`` names, when it names one) that does. Raises :class:`CheckpointError` when the run
    directory has checkpoints but none can be used. ``verify``: None for a whole checkpoint, else why
    not (a collective one splits the work over the ranks: :mod:`clipo_nemo.checkpoint.shared_verify`)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return ResumePoint(None)
    named, pointer_problem = read_latest(root)
    steps = sorted((p for p in root.iterdir() if step_of(p) is not None and p.is_dir()), key=step_of, reverse=True)
    if named is None and pointer_problem is None and not steps:
        return ResumePoint(None)  # no save ever finished (at most a .tmp- directory of a killed one)
    notes = [pointer_problem] if pointer_problem else []
    if named is None and pointer_problem is None:
        notes.append(f"{root / 'latest'} is missing")
    candidates = steps
    if named is not None:
        newer = [p.name for p in steps if step_of(p) > step_of(root / named)]
        if newer:
            notes.append(f"{', '.join(newer)} newer than latest ({named}): not used")
        candidates = [root / named] + [p for p in steps if step_of(p) < step_of(root / named)]
    for candidate in candidates:
        problem = verify(candidate)
        if problem is None:
            if not (candidate / MANIFEST).exists():
                notes.append(f"{candidate.name} has no {MANIFEST} (saved before checksums were recorded): "
                             "it could not be verified, only checked for completeness")
            return ResumePoint(candidate, notes, fell_back=bool(notes), old_checkpoints=steps)
        notes.append(f"skipped {candidate.name}: {problem}")
    raise CheckpointError(
        f"{root} holds checkpoints but none can be resumed from:\n  " + "\n  ".join(notes) +
        "\nNothing was changed. To resume, restore one of them (or write the name of a whole step_N into "
        f"{root / 'latest'}); to start over, use a new trainer.output_dir or move {root} and metrics.jsonl aside.")


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint to resume from (:func:`find_resume_point`): the one ``latest`` names if it
    verifies, else the newest one that does, with a :class:`CheckpointWarning` per checkpoint
    skipped; None when the run has none yet. Raises CheckpointError when none can be used."""
    point = find_resume_point(run_dir)
    for note in point.notes:
        warnings.warn(note, CheckpointWarning, stacklevel=2)
    return point.checkpoint


def check_fresh_start(run_dir: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` if ``run_dir`` holds logged steps of an earlier run but no
    checkpoint: a fresh start there would overwrite its ``metrics.jsonl``."""
    metrics = Path(run_dir) / "metrics.jsonl"
    lines = [line for line in metrics.read_bytes().splitlines() if line.strip()] if metrics.is_file() else []
    if lines:
        raise CheckpointError(
            f"{run_dir} holds {len(lines)} logged steps of an earlier run (metrics.jsonl) but no checkpoint to "
            "resume from: starting over would overwrite them. Use a new trainer.output_dir, or move metrics.jsonl "
            "and tensorboard/ aside to start over in this directory.")


def set_aside(checkpoint_dir: Path) -> Path:
    """Rename a checkpoint that is about to be saved over (one skipped at resume) to
    ``step_N.skipped`` (``.skipped-2``, ... if taken) and return the new path."""
    target, count = checkpoint_dir.with_name(checkpoint_dir.name + SKIPPED_SUFFIX), 1
    while target.exists():
        count += 1
        target = checkpoint_dir.with_name(f"{checkpoint_dir.name}{SKIPPED_SUFFIX}-{count}")
    os.replace(checkpoint_dir, target)
    return target
