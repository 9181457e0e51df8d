"""Checkpoint and resume: policy, reference, head, both optimizers, trainer state and RNG states.

Every rank of the job calls :func:`save_checkpoint` / :func:`load_checkpoint` together (after
``init_parallel_state``); ``run_dir`` must be visible to all ranks (one machine, or a shared file
system, as megatron's ``dist_checkpointing`` itself assumes). Directory layout::

    run_dir/checkpoints/
        latest                  text: the name of the newest complete checkpoint ("step_12")
        step_<N>/               one complete checkpoint (renamed from .tmp-step_<N> when whole)
            dist/               megatron-core dist_checkpointing (torch_dist): weights and optimizer
                                moments as global sharded tensors, so they load at any TP/PP/DP
            rng/rank_<r>.pt     rank r's RNG states (python, numpy, torch, CUDA, megatron tracker)
            trainer_state.pt    the loop's own dict (rank 0's copy)
            manifest.json       size and CRC-32 of every file above (clipo_nemo.trainer.recovery)
            meta.json           step, layout, contents and the reference pointer; written last
        reference/              a random-init run's frozen reference policy, written once (dist/, meta.json)
        .tmp-step_<N>/          a save in progress or killed mid-way: never read, removed by the next save

The reference policy is not in the step checkpoints: ``meta.json`` points to it with a checksum
(the converted ``init_from`` checkpoint, another run's reference, or ``reference/``; see
:mod:`clipo_nemo.trainer.reference_pointer`). Format-1 checkpoints (reference inline) still load.
The sharded part is written by every data-parallel rank's share, optionally in the background
(:mod:`clipo_nemo.trainer.checkpoint_writer`); meta.json, the rename and ``latest`` come only
once every rank's files are complete.

Sharded keys (global shapes, independent of the layout): ``policy.*`` and ``reference.*`` are the
GPTModels' own ``sharded_state_dict``; ``head.proj.weight`` (or ``head.proj.0.weight`` /
``head.proj.2.weight`` for the MLP head) are the whole [out, in] head weights, so the head's
``replicated`` and ``column`` modes load each other's checkpoints; optimizer moments are
``optimizer.state.<moment>.<parameter key>`` (megatron's own naming) and each optimizer's shared step
and hyperparameters one ``ShardedObject``. On GPU the policy optimizer is megatron's and contributes its
own ``sharded_state_dict`` (``MEGATRON_OPTIMIZER_METADATA``); that path is written against megatron's API but is
not exercised on this CPU-only machine. Transformer Engine layers' ``_extra_state`` entries that a
checkpoint lacks (one written with megatron's local layers) are not requested and stay as built.
RNG states are restored only at the layout they were saved at (they are per rank); at another
layout a warning says so and the current RNG streams are kept.

Crash safety: a SIGKILL at any point leaves ``latest`` naming a complete checkpoint (the rename and
the pointer update are atomic ``os.replace`` calls). ``meta.json`` and ``latest`` are fsynced; the
shard files are not, so a power loss right after a save may still need the previous checkpoint:
resuming verifies the checkpoint against its manifest and falls back to the newest one that verifies
(:mod:`clipo_nemo.trainer.recovery`).
"""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from clipo_nemo.trainer.actor import Actor
from clipo_nemo.trainer.checkpoint_writer import checkpoint_writer
from clipo_nemo.trainer.reference_pointer import (REFERENCE_DIR, Pointer, load_reference, pointer_in_checkpoint,
                                                  save_own_reference, stored_form)
from clipo_nemo.trainer.recovery import STEP_PREFIX as _STEP_PREFIX
from clipo_nemo.trainer.recovery import TMP_PREFIX as _TMP_PREFIX
from clipo_nemo.trainer.recovery import (MANIFEST, CheckpointError, checkpoints_dir, complete_checkpoints,
                                         find_resume_point, verify_checkpoint, write_manifest)
from clipo_nemo.trainer.sharded_state import (
    MEGATRON_OPTIMIZER_METADATA, allocate_megatron_optimizer_state, head_parameters, head_sharded_state_dict,
    is_megatron_optimizer, load_megatron_optimizer, load_torch_optimizer, moment_keys_over_ranks,
    torch_optimizer_moment_keys, torch_optimizer_sharded_state_dict)
from clipo_nemo.trainer.step import ClipoHead

FORMAT_VERSION = 2  # 2: the reference policy is a pointer (format 1 stored it inline)
READABLE_FORMATS = (1, 2)
_EXTRA_STATE = "_extra_state"  # state-dict key suffix of a module's extra state (TE: its FP8 metadata)


class CheckpointWarning(UserWarning):
    """Part of a checkpoint could not be restored at this layout or configuration (and was skipped)."""


# ------------------------------------------------------------------------------------------------
# Directory bookkeeping (pure file-system helpers)
# ------------------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint to resume from (:func:`clipo_nemo.trainer.recovery.find_resume_point`): the one
    ``latest`` names if it verifies, else the newest one that does, with a warning per checkpoint
    skipped; None when the run has none yet. Raises CheckpointError when none can be used."""
    point = find_resume_point(run_dir)
    for note in point.notes:
        warnings.warn(note, CheckpointWarning, stacklevel=2)
    return point.checkpoint


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int, just_saved: Path, keep: Collection[Path] = ()) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` ones (never ``just_saved``,
    which ``latest`` names, even when a higher-numbered checkpoint exists, nor those in ``keep``)."""
    for old in complete_checkpoints(root)[:-keep_last]:
        if old != just_saved and old not in keep:
            shutil.rmtree(old)


# ------------------------------------------------------------------------------------------------
# Layout and sharded state dicts
# ------------------------------------------------------------------------------------------------
def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


# ------------------------------------------------------------------------------------------------
# What goes into the checkpoint
# ------------------------------------------------------------------------------------------------
def _contents(actor: Actor, clipo_head: Optional[ClipoHead]) -> Dict[str, Any]:
    """meta.json's description of what this job saves (the same on every rank). Collective."""
    head_moments = moment_keys_over_ranks(clipo_head.optimizer if clipo_head is not None else None)
    megatron_opt = is_megatron_optimizer(actor.optimizer)
    return {
        "format": FORMAT_VERSION,
        "layout": _layout(),
        "reference": actor.reference is not None,
        "head": None if clipo_head is None else {"type": clipo_head.head.head_type, "tp_mode": clipo_head.head.tp_mode},
        "policy_optimizer": {"kind": "megatron" if megatron_opt else type(actor.optimizer).__name__,
                             "moments": [] if megatron_opt else torch_optimizer_moment_keys(actor.optimizer)},
        "head_optimizer": None if clipo_head is None or clipo_head.optimizer is None else
        {"kind": type(clipo_head.optimizer).__name__, "moments": head_moments},
    }


def _sharded_state_dict(actor: Actor, clipo_head: Optional[ClipoHead], contents: Dict[str, Any],
                        loading: bool) -> Dict[str, Any]:
    """The sharded state dict to save, or (``loading``) to request: only what ``contents`` lists."""
    policy = actor.module.sharded_state_dict(prefix="policy.")
    sharded: Dict[str, Any] = {"policy": policy}
    if contents["reference"] is True and actor.reference is not None:  # format 1: stored inline
        sharded["reference"] = actor.reference.sharded_state_dict(prefix="reference.")
    popt = contents["policy_optimizer"]
    if popt is not None:
        if is_megatron_optimizer(actor.optimizer):
            allocate_megatron_optimizer_state(actor.optimizer)
            sharded["policy_optimizer"] = actor.optimizer.sharded_state_dict(
                policy, is_loading=loading, metadata=dict(MEGATRON_OPTIMIZER_METADATA))
        else:
            sharded["policy_optimizer"] = torch_optimizer_sharded_state_dict(
                actor.optimizer, policy, "policy_optimizer", popt["moments"], main_on_last_stage=False, loading=loading)
    if contents["head"] is not None and clipo_head is not None:
        head = head_sharded_state_dict(clipo_head.head)
        sharded["head"] = head
        hopt = contents["head_optimizer"]
        if hopt is not None and clipo_head.optimizer is not None:
            sharded["head_optimizer"] = torch_optimizer_sharded_state_dict(
                clipo_head.optimizer, head, "head_optimizer", hopt["moments"], main_on_last_stage=True, loading=loading)
    return sharded


def _rng_states() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(states["tracker"]))


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | os.PathLike, step: int, actor: Actor, clipo_head: Optional[ClipoHead],
                    trainer_state: Dict[str, Any], keep_last: int, keep: Collection[Path] = (), *,
                    reference: Optional[Pointer] = None, parallel: bool = True, asynchronous: bool = False) -> Path:
    """Save everything needed to resume after ``step`` to ``run_dir/checkpoints/step_<step>``.

    Collective: every rank calls it with the same arguments (``trainer_state`` is taken from rank
    0). Written under ``.tmp-step_<step>`` and renamed when every rank has finished; then ``latest``
    is replaced atomically and all but the newest ``keep_last`` complete checkpoints (and those in
    ``keep``: the old checkpoints of a run that fell back at resume) are deleted. A
    leftover ``.tmp-*`` from a killed save is removed first. Saving a step that already exists
    replaces it. Returns the checkpoint directory.

    ``reference``: where the frozen reference policy lives
    (:func:`clipo_nemo.trainer.reference_pointer.pointer_for_run`); None: this run's own copy in
    ``checkpoints/reference``, written by the first save that needs it. ``parallel``: every
    data-parallel rank writes its share of the sharded tensors. ``asynchronous``: return once the
    sharded write has started in the background; the manifest, meta.json, the rename, ``latest``
    and pruning follow when every rank's write is complete, at :func:`finish_saves` or
    :func:`wait_for_pending_save` (the next save waits for a pending one first).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    writer = checkpoint_writer()
    writer.wait()
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"{_STEP_PREFIX}{step}", root / f"{_TMP_PREFIX}{_STEP_PREFIX}{step}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if not complete_checkpoints(root):  # a reference/ of a run killed before its first checkpoint
            shutil.rmtree(root / REFERENCE_DIR, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()
    contents = _contents(actor, clipo_head)
    contents["reference"] = None if actor.reference is None else stored_form(
        reference if reference is not None else save_own_reference(root, actor.reference, parallel), root)
    torch.save(_rng_states(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    publish = functools.partial(_publish, root, tmp, final, {"step": step, **contents}, keep_last, keep)
    writer.save(_sharded_state_dict(actor, clipo_head, contents, loading=False), tmp / "dist", publish,
                parallel=parallel, asynchronous=asynchronous)
    return final


def _publish(root: Path, tmp: Path, final: Path, meta: Dict[str, Any], keep_last: int, keep: Collection[Path]) -> None:
    """A save's last part, once every rank's files are complete (collective): rank 0 writes the
    manifest and meta.json, renames ``tmp`` to ``final``, points ``latest`` at it and prunes."""
    if dist.get_rank() == 0:
        write_manifest(tmp)
        _write_atomically(tmp / "meta.json", json.dumps(meta, indent=1))
        if final.exists():  # re-saving a step: move the old copy aside first (rename cannot overwrite)
            replaced = root / f"{_TMP_PREFIX}replaced-{final.name}"
            os.replace(final, replaced)
            os.replace(tmp, final)
            shutil.rmtree(replaced)
        else:
            os.replace(tmp, final)
        _write_atomically(root / "latest", final.name)
        _prune(root, keep_last, final, keep)
    dist.barrier()


def wait_for_pending_save() -> None:
    """Block until a pending asynchronous save is written on every rank, then publish it. Collective."""
    checkpoint_writer().wait()


def finish_saves() -> bool:
    """Publish a pending asynchronous save if every rank has finished writing it (does not block).
    True when no save is pending any more. Collective (one all-reduce while a save is pending)."""
    return checkpoint_writer().poll()


def load_checkpoint(run_dir: str | os.PathLike, actor: Actor, clipo_head: Optional[ClipoHead],
                    path: Optional[str | os.PathLike] = None, verify: bool = True) -> Optional[Dict[str, Any]]:
    """Restore ``latest`` (or the checkpoint at ``path``) into ``actor`` and ``clipo_head``.

    Without ``path``, :func:`latest_checkpoint` chooses (falling back past damaged checkpoints); a
    ``path`` is verified first (``verify=False``: the caller just did) and a damaged one is a
    CheckpointError.

    Collective. Returns the saved ``trainer_state``, or None when ``run_dir`` has no checkpoint.
    Weights and optimizer states load at any TP/PP/DP layout and either head TP mode. RNG states
    are restored only at the layout they were saved at; otherwise a :class:`CheckpointWarning`
    says they were skipped. Do not call ``actor.sync_reference()`` afterwards: the reference policy
    is restored from the checkpoint.
    """
    from megatron.core import dist_checkpointing

    checkpoint = Path(path) if path is not None else latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    if path is not None and verify:
        _check_whole(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{checkpoint}: format {meta.get('format')!r}, this code reads {READABLE_FORMATS}")
    contents = _loadable_contents(meta, actor, clipo_head, checkpoint)
    if actor.reference is not None and isinstance(meta["reference"], dict):
        load_reference(actor.reference, pointer_in_checkpoint(checkpoint), actor.cfg.model.vocab_size, checkpoint)
    request = _sharded_state_dict(actor, clipo_head, contents, loading=True)
    drop_extra_state_missing_from(request, checkpoint / "dist")
    loaded = dist_checkpointing.load(request, str(checkpoint / "dist"))
    load_module_state(actor.module, _without_prefix(loaded["policy"], "policy."))
    # What was requested, not what came back: dist_checkpointing merges the checkpoint's common
    # (non-tensor) state into the result, e.g. an empty head-optimizer moment dict of a save made
    # before the head's first step, which a load without a head must not touch.
    if "reference" in request:
        load_module_state(actor.reference, _without_prefix(loaded["reference"], "reference."))
    if "policy_optimizer" in request:
        if is_megatron_optimizer(actor.optimizer):
            load_megatron_optimizer(actor.optimizer, loaded["policy_optimizer"])
        else:
            load_torch_optimizer(actor.optimizer, loaded["policy_optimizer"],
                                  contents["policy_optimizer"]["moments"], "policy_optimizer")
    if "head" in request:
        with torch.no_grad():
            for name, param in head_parameters(clipo_head.head).items():
                param.copy_(loaded["head"][name])
    if "head_optimizer" in request:
        load_torch_optimizer(clipo_head.optimizer, loaded["head_optimizer"],
                              contents["head_optimizer"]["moments"], "head_optimizer")
    if meta["layout"] == _layout():
        _set_rng_states(torch.load(checkpoint / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=False))
    else:
        _warn(f"{checkpoint.name} was saved at layout {meta['layout']}, this run is {_layout()}: weights and "
              "optimizer states were resharded, but the per-rank RNG states were not restored (runs continue "
              "from the current seeds, so they are not bit-identical to an uninterrupted run)")
    trainer_state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    dist.barrier()
    return trainer_state


def _check_whole(checkpoint: Path) -> None:
    """Raise CheckpointError unless ``checkpoint`` verifies (checked on rank 0, which tells the others)."""
    from clipo_nemo.parallel.gather import broadcast_object

    problem = broadcast_object(verify_checkpoint(checkpoint) if dist.get_rank() == 0 else None, src=0)
    if problem is not None:
        raise CheckpointError(f"{checkpoint} cannot be loaded: {problem}")
    if not (checkpoint / MANIFEST).exists():
        _warn(f"{checkpoint} has no {MANIFEST} (saved before checksums were recorded): it could not be verified")


def drop_extra_state_missing_from(request: Dict[str, Any], checkpoint_dir: str | os.PathLike) -> List[str]:
    """Remove (in place, at any depth) the ``_extra_state`` entries of a requested sharded state dict
    that the checkpoint at ``checkpoint_dir`` does not hold; return their state-dict keys.

    Transformer Engine layers add one ``_extra_state`` ShardedObject per module (their FP8
    metadata); a checkpoint written with megatron's local layers has none, and requesting them would
    fail the load. The modules keep their freshly built extra state (see :func:`load_module_state`).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved: Optional[set] = None  # the checkpoint's keys, read only once an _extra_state entry is requested
    dropped: List[str] = []

    def visit(node: Dict[str, Any]) -> None:
        nonlocal saved
        for key, value in list(node.items()):
            if isinstance(value, dict):
                visit(value)
            elif isinstance(value, ShardedBase) and value.key.endswith(_EXTRA_STATE):
                if saved is None:
                    saved = {entry.key for entry in load_sharded_metadata(str(checkpoint_dir)).values()}
                if value.key not in saved:
                    dropped.append(key)
                    del node[key]

    visit(request)
    return dropped


def load_module_state(module: torch.nn.Module, state_dict: Dict[str, Any]) -> None:
    """``module.load_state_dict`` that accepts missing ``_extra_state`` entries (a checkpoint of
    megatron's local layers loaded into Transformer Engine layers) and nothing else missing or extra."""
    result = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(_EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{type(module).__name__}: checkpoint lacks {missing[:5]} and has unexpected "
                              f"{result.unexpected_keys[:5]} (of {len(missing)} / {len(result.unexpected_keys)})")


def _without_prefix(state_dict: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """A module's state dict from its sharded state dict's keys (which carry the save prefix)."""
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def _loadable_contents(meta: Dict[str, Any], actor: Actor, clipo_head: Optional[ClipoHead],
                       checkpoint: Path) -> Dict[str, Any]:
    """What of the checkpoint to load into these objects; errors for missing parts, warnings for skipped ones."""
    contents = dict(meta)
    if actor.reference is not None and not meta["reference"]:
        raise CheckpointError(f"{checkpoint}: the actor has a reference policy (KL loss on) but the "
                              "checkpoint has none")
    if clipo_head is not None and meta["head"] is None:
        raise CheckpointError(f"{checkpoint}: a contrastive head is configured but the checkpoint has none")
    if clipo_head is not None and meta["head"]["type"] != clipo_head.head.head_type:
        raise CheckpointError(f"{checkpoint}: head type {meta['head']['type']!r} in the checkpoint, "
                              f"{clipo_head.head.head_type!r} configured")
    popt, kind = meta["policy_optimizer"], ("megatron" if is_megatron_optimizer(actor.optimizer)
                                            else type(actor.optimizer).__name__)
    if popt["kind"] != kind:
        _warn(f"{checkpoint.name}: policy optimizer {popt['kind']} in the checkpoint, {kind} now: its state "
              "was not restored (fresh optimizer state)")
        contents["policy_optimizer"] = None
    hopt = meta["head_optimizer"]
    if clipo_head is not None and (clipo_head.optimizer is None or hopt is None
                                   or hopt["kind"] != type(clipo_head.optimizer).__name__):
        if clipo_head.optimizer is not None:
            _warn(f"{checkpoint.name}: no usable head optimizer state ({hopt}); the head optimizer starts fresh")
        contents["head_optimizer"] = None
    return contents


def _warn(message: str) -> None:
    if dist.get_rank() == 0:
        warnings.warn(message, CheckpointWarning, stacklevel=3)
