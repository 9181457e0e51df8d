"""Where a run's frozen reference policy lives: a pointer with a checksum instead of a copy per checkpoint.

The reference policy never changes during a run, so checkpoints do not store it again. Each
checkpoint's ``meta.json`` holds ``"reference": {"kind", "path", "sha256"}`` (None without a
reference, i.e. KL off):

- ``kind="weights"``: a converted checkpoint (``trainer.init_from``); the reference is its weights.
- ``kind="dist"``: a megatron ``dist_checkpointing`` directory holding the ``reference.*`` tensors:
  another run's reference (``trainer.init_from`` = a run or one of its checkpoints: the pointer is
  carried over, so chains never form), or, for a run from random initialisation, the run's own copy
  in ``checkpoints/reference/``, written once by the run's first save and never pruned. A
  ``reference/`` without any complete step checkpoint beside it belongs to a run killed before its
  first checkpoint completed and is rewritten.

``sha256`` covers every file under ``path`` (relative names and bytes; for a converted checkpoint
that recorded one at conversion, under its ``weights/``). It is computed once: by the conversion,
when the run's own ``reference/`` is first written, or (an older conversion) when a run first starts
from it; every later pointer carries it over. Pointers also record ``files``, the size and
modification time (ns) of every file under ``path`` (a ``stat`` per file): a load whose files show
the same sizes and times takes the reference as unchanged without reading it; otherwise (copied,
touched or changed files) rank 0 recomputes the SHA-256 and a reference whose bytes changed is
refused. Pointers written before ``files`` existed (format 2) are hashed at every load, as then.
Paths inside the run's ``checkpoints/`` are stored relative to it (the run directory may move);
others absolute. The reference's tensors are then read like a step checkpoint's (each rank its
shard, spread over the data-parallel group) or, from a converted checkpoint, each rank's
rows/columns only.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch.distributed as dist

from clipo_nemo.checkpoint.reader import load_sharded
from clipo_nemo.checkpoint.recovery import CheckpointError, directory_sha256, file_identities
from clipo_nemo.checkpoint.shared_verify import latest_checkpoint_together
from clipo_nemo.checkpoint.sharded_state import drop_extra_state_missing_from, load_module_state, without_prefix
from clipo_nemo.checkpoint.writer import checkpoint_writer, collect_checksums

REFERENCE_DIR = "reference"  # under run_dir/checkpoints: a random-init run's own reference
# {"kind": "weights" | "dist", "path": str, "sha256": str, "files": {name: [size, mtime_ns]}, "hashed": subdir
# of path the sha256 and files cover ("weights" for a converted checkpoint's own record; absent: path itself)}
Pointer = Dict[str, Any]


def identity_problem(pointer: Pointer, sha256: Callable[[Path], str] = directory_sha256) -> Optional[str]:
    """None when the directory ``pointer`` names is the one it recorded, else why not. Files with the
    recorded sizes and modification times are taken as unchanged; otherwise (or for a pointer without
    ``files``) ``sha256`` of the directory decides."""
    path = Path(pointer["path"]) / pointer.get("hashed", "")  # "weights": a converted checkpoint's own record
    if pointer.get("files") is not None and file_identities(path) == pointer["files"]:
        return None
    actual = sha256(path)
    if actual != pointer["sha256"]:
        return f"sha256 {actual}, recorded {pointer['sha256']}"
    return None


def _from_rank0(compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0, its result on every rank. Collective."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def weights_pointer(path: str | os.PathLike) -> Pointer:
    """The pointer to a converted checkpoint used as the reference: the SHA-256 of its ``weights/`` that
    the conversion recorded (``clipo_model.json``'s ``weights_identity``) when the files still match;
    for a conversion without one, hashed at the start of the run that first uses it (resumes carry
    the pointer over). Collective (rank 0 reads)."""
    path = Path(path).resolve()
    return _from_rank0(lambda: _identified_weights(path))


def _identified_weights(path: Path) -> Pointer:
    """A converted checkpoint's pointer: from the identity its conversion recorded when its weight files
    still match it (no hashing), else by hashing the whole directory."""
    from clipo_nemo.conversion.weights import WEIGHTS_DIR, read_description

    recorded = read_description(path).get("weights_identity")
    if recorded is not None and file_identities(path / WEIGHTS_DIR) == recorded["files"]:
        return {"kind": "weights", "path": str(path), "hashed": WEIGHTS_DIR, **recorded}
    return {"kind": "weights", "path": str(path), "files": file_identities(path), "sha256": directory_sha256(path)}


def pointer_in_checkpoint(checkpoint: str | os.PathLike) -> Optional[Pointer]:
    """The reference a complete checkpoint uses (absolute path), or None if it has none.
    Collective for a format-1 checkpoint (reference stored inline: its ``dist/`` is hashed)."""
    checkpoint = Path(checkpoint).resolve()
    stored = json.loads((checkpoint / "meta.json").read_text()).get("reference")
    if not stored:
        return None
    if stored is True:  # format 1: the reference's tensors are in the checkpoint's own dist/
        dist_dir = checkpoint / "dist"
        return {"kind": "dist", "path": str(dist_dir), "sha256": _from_rank0(lambda: directory_sha256(dist_dir))}
    return {**stored, "path": str(checkpoint.parent / stored["path"])}  # "/abs" / x == x


def stored_form(pointer: Pointer, checkpoints_root: Path) -> Pointer:
    """``pointer`` as written into meta.json: relative to ``checkpoints_root`` when inside it."""
    path, root = Path(pointer["path"]).resolve(), checkpoints_root.resolve()
    return {**pointer, "path": str(path.relative_to(root)) if path.is_relative_to(root) else str(path)}


def pointer_for_run(resumed_from: Optional[Path], init_from: str) -> Optional[Pointer]:
    """The reference of a run about to train: the pointer of the checkpoint it resumed from, else
    that of ``init_from`` (a converted checkpoint, a run or a run's checkpoint), else None (random
    init: the first save writes the run's own copy). Collective."""
    from clipo_nemo.conversion.weights import is_weights_checkpoint

    if resumed_from is not None:
        return pointer_in_checkpoint(resumed_from)
    if not init_from:
        return None
    source = Path(init_from)
    if is_weights_checkpoint(source):
        return weights_pointer(source)
    return pointer_in_checkpoint(source if (source / "meta.json").is_file() else latest_checkpoint_together(source))


def load_reference(reference: Any, pointer: Pointer, vocab_size: int, named_by: Path) -> None:
    """Load the reference policy ``reference`` (a GPTModel piece) from ``pointer``, after checking
    that the directory is there and unchanged. Collective."""
    path = Path(pointer["path"])
    if not path.is_dir():
        raise CheckpointError(f"{named_by}: its reference policy {path} is missing")
    problem = _from_rank0(lambda: identity_problem(pointer))
    if problem is not None:
        raise CheckpointError(f"{named_by}: the reference policy {path} changed since it was saved ({problem})")
    if pointer["kind"] == "weights":
        from clipo_nemo.conversion.weights import load_weights_into_model

        load_weights_into_model(reference, path, vocab_size)
        return
    request = {"reference": reference.sharded_state_dict(prefix="reference.")}
    drop_extra_state_missing_from(request, path)
    loaded = load_sharded(request, path)
    load_module_state(reference, without_prefix(loaded["reference"], "reference."))


def save_own_reference(checkpoints_root: Path, reference: Any, parallel: bool) -> Pointer:
    """The run's own copy of a randomly initialised reference: written once to
    ``checkpoints_root/reference`` (under ``.tmp-reference`` until complete), reused afterwards.
    Collective."""
    final, tmp = checkpoints_root / REFERENCE_DIR, checkpoints_root / f".tmp-{REFERENCE_DIR}"
    if not (final / "meta.json").is_file():
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "dist").mkdir(parents=True)
        dist.barrier()

        def finalize() -> None:
            if dist.get_rank() == 0:
                collect_checksums(tmp / "dist", "")  # the writers' per-rank records: not part of the reference
                (tmp / "meta.json").write_text(json.dumps({"sha256": directory_sha256(tmp / "dist")}))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)  # keeps the files' modification times: the identities below match
            dist.barrier()

        checkpoint_writer().save({"reference": reference.sharded_state_dict(prefix="reference.")}, tmp / "dist",
                                 finalize, parallel=parallel, asynchronous=False)
    sha256 = json.loads((final / "meta.json").read_text())["sha256"]
    dist_dir = (final / "dist").resolve()
    return {"kind": "dist", "path": str(dist_dir), "sha256": sha256, "files": _from_rank0(lambda: file_identities(dist_dir))}
