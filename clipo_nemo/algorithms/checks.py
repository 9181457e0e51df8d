"""Input checks shared by the pure algorithm functions."""
from __future__ import annotations

from typing import Iterable

import torch


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many elements of ``tensor`` are NaN or +-inf (0 for integer tensors)."""
    # One reduction is the fast path: any NaN/inf makes the sum non-finite. Only then (or when
    # finite values overflow the sum) is the element-wise test paid for.
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum().item())


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``tensor`` if it holds NaN or +-inf.

    A single NaN in embeddings, rewards or log-probs silently poisons every later step of an RL run,
    so the algorithm functions refuse it at the door instead.
    """
    bad = nonfinite_count(tensor)
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); shape {tuple(tensor.shape)}")


def nan_max(values: Iterable[float], start: float = 0.0) -> float:
    """The largest of ``start`` and ``values``, or NaN if any of them is NaN.

    Python's ``max(0.0, nan)`` is 0.0 (every comparison with NaN is false), so a "largest difference"
    folded with ``max`` forgets a NaN and a check ``worst <= tol`` then passes: fold with this instead.
    """
    worst = start
    for value in values:
        if value != value:
            return float("nan")
        worst = max(worst, value)
    return worst if worst == worst else float("nan")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    """Raise ``ValueError`` if ``tensor.shape`` differs from ``shape`` (``None`` matches any size)."""
    ok = tensor.dim() == len(shape) and all(s is None or s == t for s, t in zip(shape, tensor.shape))
    if not ok:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
