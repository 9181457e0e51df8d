"""Input checks shared by the pure algorithm functions."""
from __future__ import annotations

import torch


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``tensor`` if it holds NaN or +-inf.

    A single NaN in embeddings, rewards or log-probs silently poisons every later step of an RL run,
    so the algorithm functions refuse it at the door instead.
    """
    # One reduction is the fast path: any NaN/inf makes the sum non-finite. Only then (or when
    # finite values overflow the sum) is the element-wise test paid for.
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); shape {tuple(tensor.shape)}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    """Raise ``ValueError`` if ``tensor.shape`` differs from ``shape`` (``None`` matches any size)."""
    ok = tensor.dim() == len(shape) and all(s is None or s == t for s, t in zip(shape, tensor.shape))
    if not ok:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
