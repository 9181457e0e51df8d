"""A resumable sampler: a fresh seeded permutation each epoch, and a position that can be saved.

The order of epoch ``e`` depends only on ``(seed, e)``, so a run restored from ``state_dict()``
sees exactly the batches it would have seen without the interruption.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np


class EpochSampler:
    """Batches of indices into ``range(num_items)``; each epoch visits ``num_items // batch_size``
    full batches (a last, partial batch is dropped, as GRPO needs a fixed batch size)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_items < batch_size:
            raise ValueError(f"{num_items} items cannot fill one batch of {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order = self.epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def epoch_order(self, epoch: int) -> List[int]:
        """The visiting order of ``epoch``: a permutation drawn from ``(seed, epoch)``, or identity."""
        if not self.shuffle:
            return list(range(self.num_items))
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist()

    def next_batch(self) -> List[int]:
        """The next batch of indices, moving to the next epoch (and its new order) when one ends."""
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._order = self.epoch_order(self.epoch)
        start = self.batch_in_epoch * self.batch_size
        self.batch_in_epoch += 1
        return self._order[start : start + self.batch_size]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state``; the data set, batch size, seed and shuffling must be the same."""
        for key in ("seed", "num_items", "batch_size", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state.get(key)!r} but this sampler has {getattr(self, key)!r}; "
                    "resuming would not replay the same prompts"
                )
        if not 0 <= state["batch_in_epoch"] <= self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"sampler state position out of range: epoch {state['epoch']}, batch {state['batch_in_epoch']}")
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self._order = self.epoch_order(self.epoch)
