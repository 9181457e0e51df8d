"""PNG plots: a run's training curves (paper Figure 5) and head embeddings (paper Figure 4), and curves
with confidence bands over seeds (``benchmarks/ablation.py``)."""
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


def chosen_groups(group_ids: torch.Tensor, correct: torch.Tensor, count: int) -> List[int]:
    """Up to ``count`` group ids to plot, first-seen order: groups with both correct and wrong
    responses first (where clustering by correctness can show), then the others.

    group_ids [B], correct [B] bool.
    """
    mixed, uniform = [], []
    for group in dict.fromkeys(group_ids.tolist()):
        verdicts = correct[group_ids == group]
        (mixed if bool(verdicts.any()) and not bool(verdicts.all()) else uniform).append(group)
    return (mixed + uniform)[:count]


def plot_embeddings(snapshots: Dict[str, Dict[str, torch.Tensor]], out_path: Path, groups: int = 6) -> None:
    """The paper's Figure 4: head embeddings of a few groups, one panel per snapshot (e.g. start, end).

    Each snapshot holds ``embeddings`` [B, D], ``correct`` [B] and ``group_ids`` [B]. CLIPO contrasts
    responses within their group, so each panel shows up to ``groups`` groups (mixed ones first), each
    with its own marker and colour, correct responses filled and wrong ones hollow, in a 2-D PCA of those
    groups' normalised embeddings (a PCA of the whole batch is dominated by differences between groups).
    Identical responses have identical embeddings and share one point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers, colours = "osD^vP*X", plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(snapshots), figsize=(4.6 * len(snapshots), 4.2), squeeze=False)
    for ax, (title, snap) in zip(axes[0], snapshots.items()):
        if "group_ids" not in snap:
            raise KeyError(f"embedding snapshot {title!r} has no group_ids (saved before they were recorded)")
        group_ids, correct = snap["group_ids"].long(), snap["correct"].bool()
        chosen = chosen_groups(group_ids, correct, groups)
        rows = torch.cat([torch.nonzero(group_ids == g).flatten() for g in chosen])
        z = torch.nn.functional.normalize(snap["embeddings"][rows].float(), dim=-1)
        centred = z - z.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = centred @ v[:2].T
        for k, group in enumerate(chosen):
            mine = group_ids[rows] == group
            colour, marker = colours[k % len(colours)], markers[k % len(markers)]
            right, wrong = mine & correct[rows], mine & ~correct[rows]
            ax.scatter(xy[right, 0], xy[right, 1], s=40, marker=marker, color=colour, alpha=0.8,
                       label=f"group {group}: {int(right.sum())}/{int(mine.sum())} correct")
            ax.scatter(xy[wrong, 0], xy[wrong, 1], s=40, marker=marker, facecolors="none", edgecolors=colour, alpha=0.8)
        ax.set_title(f"{title}\n(filled: correct, hollow: wrong)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_bands(curves: Dict[str, Dict[str, Dict[str, List[float]]]], titles: Dict[str, str], out_path: Path) -> None:
    """One panel per metric, one line per variant with its confidence band (e.g. the ablation's seeds).

    ``curves[variant][metric]`` holds equal-length lists ``step``, ``mean``, ``lo`` and ``hi``;
    ``titles[metric]`` is the panel's title, in panel order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(titles), figsize=(4.2 * len(titles), 3.4), squeeze=False)
    for ax, (metric, title) in zip(axes[0], titles.items()):
        for variant, per_metric in curves.items():
            curve = per_metric[metric]
            sparse = len(curve["step"]) <= 20  # e.g. the validations: mark each point
            ax.plot(curve["step"], curve["mean"], linewidth=1.8, marker="o" if sparse else None, label=variant)
            ax.fill_between(curve["step"], curve["lo"], curve["hi"], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
