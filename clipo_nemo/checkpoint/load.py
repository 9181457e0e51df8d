"""Resuming from a step checkpoint: choose it (:func:`clipo_nemo.checkpoint.shared_verify.latest_checkpoint_together`
falls back past damaged ones), check it fits the objects it loads into, and restore weights, the
reference, both optimizers, RNG states and the trainer's own state at any TP/PP/DP layout."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from clipo_nemo.checkpoint.contents import (READABLE_FORMATS, HeadState, PolicyState, checkpoint_sharded_state_dict,
                                            current_layout, megatron_sharding, set_rng_states, warn_once)
from clipo_nemo.checkpoint.reader import load_sharded
from clipo_nemo.checkpoint.recovery import MANIFEST, CheckpointError
from clipo_nemo.checkpoint.reference import load_reference, pointer_in_checkpoint
from clipo_nemo.checkpoint.shared_verify import latest_checkpoint_together, verify_together
from clipo_nemo.checkpoint.sharded_state import (DP_RESHARDABLE, drop_extra_state_missing_from, head_parameters,
                                                 is_megatron_optimizer, load_megatron_optimizer, load_module_state,
                                                 load_torch_optimizer, without_prefix)


def load_checkpoint(run_dir: str | os.PathLike, actor: PolicyState, clipo_head: Optional[HeadState],
                    path: Optional[str | os.PathLike] = None, verify: bool = True) -> Optional[Dict[str, Any]]:
    """Restore ``latest`` (or the checkpoint at ``path``) into ``actor`` and ``clipo_head``.

    Without ``path``, :func:`latest_checkpoint_together` chooses (falling back past damaged checkpoints); a
    ``path`` is verified first (``verify=False``: the caller just did) and a damaged one is a
    CheckpointError.

    Collective. Returns the saved ``trainer_state``, or None when ``run_dir`` has no checkpoint.
    Weights and optimizer states load at any TP/PP/DP layout and either head TP mode. RNG states
    are restored only at the layout they were saved at; otherwise a :class:`CheckpointWarning`
    says they were skipped. Do not call ``actor.sync_reference()`` afterwards: the reference policy
    is restored from the checkpoint.
    """
    checkpoint = Path(path) if path is not None else latest_checkpoint_together(run_dir)
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
    request = checkpoint_sharded_state_dict(actor, clipo_head, contents, loading=True)
    drop_extra_state_missing_from(request, checkpoint / "dist")
    loaded = load_sharded(request, checkpoint / "dist")
    load_module_state(actor.module, without_prefix(loaded["policy"], "policy."))
    # What was requested, not what came back: dist_checkpointing merges the checkpoint's common
    # (non-tensor) state into the result, e.g. an empty head-optimizer moment dict of a save made
    # before the head's first step, which a load without a head must not touch.
    if "reference" in request:
        load_module_state(actor.reference, without_prefix(loaded["reference"], "reference."))
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
    if meta["layout"] == current_layout():
        set_rng_states(torch.load(checkpoint / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=False))
    else:
        warn_once(f"{checkpoint.name} was saved at layout {meta['layout']}, this run is {current_layout()}: weights and "
              "optimizer states were resharded, but the per-rank RNG states were not restored (runs continue "
              "from the current seeds, so they are not bit-identical to an uninterrupted run)")
    trainer_state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    dist.barrier()
    return trainer_state


def _check_whole(checkpoint: Path) -> None:
    """Raise CheckpointError unless ``checkpoint`` verifies (each rank checks its share, all agree)."""
    problem = verify_together(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint} cannot be loaded: {problem}")
    if not (checkpoint / MANIFEST).exists():
        warn_once(f"{checkpoint} has no {MANIFEST} (saved before checksums were recorded): it could not be verified")


def check_megatron_layout(sharding: str, saved: Dict[str, int], now: Dict[str, int], checkpoint: Path) -> None:
    """Raise CheckpointError when a distributed-optimizer state in ``sharding`` cannot load at layout
    ``now``: a ``dp_reshardable`` one reshards over DP only, not over TP or PP."""
    if sharding == DP_RESHARDABLE and (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
        raise CheckpointError(
            f"{checkpoint}: its distributed-optimizer state is dp_reshardable (each rank's own shard, loadable at "
            f"another DP size only), saved at TP {saved['tp']} x PP {saved['pp']}; this run is TP {now['tp']} x "
            f"PP {now['pp']}. Resume once at TP {saved['tp']} x PP {saved['pp']} with "
            "trainer.reshardable_optimizer_checkpoints=true and let it save (a step with save_every_steps, "
            "save_every_minutes or a stop signal), then change the layout (README, Clusters: changing TP/PP)")


def _loadable_contents(meta: Dict[str, Any], actor: PolicyState, clipo_head: Optional[HeadState],
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
        warn_once(f"{checkpoint.name}: policy optimizer {popt['kind']} in the checkpoint, {kind} now: its state "
              "was not restored (fresh optimizer state)")
        contents["policy_optimizer"] = None
    elif kind == "megatron":
        check_megatron_layout(megatron_sharding(popt), meta["layout"], current_layout(), checkpoint)
    hopt = meta["head_optimizer"]
    if clipo_head is not None and (clipo_head.optimizer is None or hopt is None
                                   or hopt["kind"] != type(clipo_head.optimizer).__name__):
        if clipo_head.optimizer is not None:
            warn_once(f"{checkpoint.name}: no usable head optimizer state ({hopt}); the head optimizer starts fresh")
        contents["head_optimizer"] = None
    return contents
