"""PNG plots of a run: training curves (paper Figure 5) and head embeddings (paper Figure 4)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch


def plot_training_curves(history: List[Dict[str, float]], out_path: Path) -> None:
    """Reward, contrastive loss and mean positive-pair cosine similarity over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "verifier reward (mean)"), ("contrastive_loss", "contrastive loss"),
              ("pos_pair_cos", "positive-pair cosine similarity")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        rows = [row for row in history if key in row]
        steps, values = [row["step"] for row in rows], [row[key] for row in rows]
        ax.plot(steps, values, marker=".", linewidth=0.8, alpha=0.5)
        if len(values) >= 10:  # a 10-step moving average makes the trend readable through sampling noise
            smooth = [sum(values[max(0, i - 9): i + 1]) / len(values[max(0, i - 9): i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, linewidth=2, color="black", label="10-step mean")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_embeddings(snapshots: Dict[str, Dict[str, torch.Tensor]], out_path: Path) -> None:
    """2-D PCA of head embeddings coloured by correctness, one panel per snapshot (e.g. start, end).

    Each snapshot holds ``embeddings`` [B, D] and ``correct`` [B]; every panel uses its own PCA basis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(snapshots), figsize=(4.2 * len(snapshots), 4.0), squeeze=False)
    for ax, (title, snap) in zip(axes[0], snapshots.items()):
        z = torch.nn.functional.normalize(snap["embeddings"].float(), dim=-1)
        centred = z - z.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = centred @ v[:2].T
        correct = snap["correct"].bool()
        ax.scatter(xy[~correct, 0], xy[~correct, 1], s=10, c="tab:red", alpha=0.6, label="incorrect")
        ax.scatter(xy[correct, 0], xy[correct, 1], s=10, c="tab:blue", alpha=0.6, label="correct")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
