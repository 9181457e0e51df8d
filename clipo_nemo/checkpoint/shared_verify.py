"""Verifying a checkpoint with the work split over the job's ranks, and every rank agreeing on the verdict.

:func:`clipo_nemo.checkpoint.recovery.verify_checkpoint` with ``share=(rank, world_size)`` checks
only the manifest entries of one rank (at an unchanged world size: the files that rank wrote and
checksummed at save, about those megatron's fully parallel load then plans for it); here every rank
checks its share and the verdicts are all-gathered, so each rank reads about ``1/world_size`` of the
checkpoint and all ranks take the same decision. The fallback rules stay those of
:func:`~clipo_nemo.checkpoint.recovery.find_resume_point`, which is given this verifier.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from clipo_nemo.checkpoint.recovery import (CheckpointError, CheckpointWarning, ResumePoint, check_fresh_start,
                                            find_resume_point, verify_checkpoint)


def _all_gather(value):
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def verify_together(checkpoint: str | os.PathLike) -> Optional[str]:
    """None when ``checkpoint`` is whole, else why not: the same answer on every rank, each rank having
    checked its share. Collective. Raises CheckpointError if the ranks were asked about different
    checkpoints (their run directories differ: it must be one shared directory)."""
    names = _all_gather(str(Path(checkpoint).resolve()))
    if len(set(names)) > 1:
        raise CheckpointError(f"the ranks resume from different checkpoints ({sorted(set(names))[:3]}): "
                              "trainer.output_dir must be one directory shared by every rank")
    verdicts = _all_gather(verify_checkpoint(checkpoint, share=(dist.get_rank(), dist.get_world_size())))
    problems = list(dict.fromkeys(v for v in verdicts if v is not None))  # in rank order, without repeats
    return "; ".join(problems) if problems else None


def latest_checkpoint_together(run_dir: str | os.PathLike) -> Optional[Path]:
    """:func:`~clipo_nemo.checkpoint.recovery.latest_checkpoint` with :func:`verify_together` (each
    skipped checkpoint a CheckpointWarning from rank 0). Collective."""
    point = find_resume_point(run_dir, verify=verify_together)
    if dist.get_rank() == 0:
        for note in point.notes:
            warnings.warn(note, CheckpointWarning, stacklevel=2)
    return point.checkpoint


def resume_point_together(run_dir: str | os.PathLike) -> ResumePoint:
    """:func:`~clipo_nemo.checkpoint.recovery.find_resume_point` with :func:`verify_together`, then (for
    a fresh start) rank 0's :func:`~clipo_nemo.checkpoint.recovery.check_fresh_start`. Collective: the
    same point, or the same CheckpointError, on every rank."""
    point = find_resume_point(run_dir, verify=verify_together)
    error = None
    if point.checkpoint is None and dist.get_rank() == 0:
        try:
            check_fresh_start(run_dir)
        except CheckpointError as err:
            error = str(err)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    return point
