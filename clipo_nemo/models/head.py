"""The contrastive head under tensor and data parallelism, and its distributed CLIPO step.

Two tensor-parallel modes give the same numbers:

- ``replicated``: every TP rank holds the whole head. Its inputs (the pooled hidden states, full on
  every TP rank) and hence its gradients are identical across TP ranks, so the copies stay equal;
  they start equal because they are built from one seeded reference head.
- ``column``: megatron ``ColumnParallelLinear`` layers split the output dimension D over TP ranks.
  Each rank returns its raw slice of ``W h``; the loss completes the Gram matrix with one all-reduce
  over the TP group and takes the L2 norms from its diagonal. Normalising the slices inside the head
  instead would need the norm's gradient summed over TP (each rank's slice uses it differently),
  whereas the Gram matrix feeds the same loss on every TP rank, so an identity backward is exact.

Across data-parallel ranks the embeddings, correctness, group ids and global batch positions are
all-gathered; every rank evaluates the loss of the whole global batch (cheap: O(B n D)) in canonical
batch order, so the InfoNCE draws and the result match a single process. Each rank back-propagates
only the anchors it owns; the all-gather's backward hands every rank the gradient of its own rows,
and head gradients are summed over DP before the head's AdamW step.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from clipo_nemo.algorithms.contrastive import contrastive_loss, positive_pair_cosine
from clipo_nemo.algorithms.head import (HEAD_TYPES, ContrastiveHead, HeadStepOutput, contrastive_loss_options,
                                       rewarded_anchors)
from clipo_nemo.algorithms.rewards import contrastive_rewards, permute_within_groups
from clipo_nemo.config import ContrastiveConfig
from clipo_nemo.parallel.gather import GlobalBatch, all_reduce_grads, tensor_parallel_partial_sum

TP_MODES = ("replicated", "column")


def reference_head(hidden_size: int, dim: int, head_type: str, seed: int) -> ContrastiveHead:
    """The single-process head every layout starts from: ``nn.Linear`` init under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ContrastiveHead(hidden_size, dim, head_type)


def layer_names(head_type: str) -> List[str]:
    """Parameter names of the reference head's linear layers, in order (also the names under which
    checkpoints and Hugging Face exports store the head)."""
    return ["proj.weight"] if head_type == "linear" else ["proj.0.weight", "proj.2.weight"]


class ParallelContrastiveHead(nn.Module):
    """Contrastive head on pooled hidden states [B, H] -> embeddings [B, D] (``column``: [B, D / TP]).

    ``replicated`` outputs are L2-normalised; ``column`` outputs are raw slices (see module doc), which
    the losses normalise with :meth:`partial_sum`. Cosine similarities are the same in both modes.
    """

    def __init__(self, hidden_size: int, dim: int, head_type: str = "linear", tp_mode: str = "replicated",
                 seed: int = 1234, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        from megatron.core import parallel_state

        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown contrastive head type {head_type!r}; choose one of {HEAD_TYPES}")
        if tp_mode not in TP_MODES:
            raise ValueError(f"unknown contrastive.head.tp_mode {tp_mode!r}; choose one of {TP_MODES}")
        self.head_type, self.tp_mode = head_type, tp_mode
        reference = reference_head(hidden_size, dim, head_type, seed).to(params_dtype)
        if tp_mode == "replicated":
            self.head = reference
            return
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if dim % tp != 0:
            raise ValueError(f"contrastive.head.dim={dim} must be divisible by TP={tp} with tp_mode=column")
        self.layers = nn.ModuleList(self._column_layers(hidden_size, dim, tp, params_dtype))
        self.load_full_state_dict(reference.state_dict())

    def _column_layers(self, hidden_size, dim, tp, params_dtype):
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear

        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                     perform_initialization=False, params_dtype=params_dtype)
        # (in, out, gather_output): an MLP's hidden layer is gathered so the ReLU sees whole rows.
        shapes = [(hidden_size, dim, False)] if self.head_type == "linear" else \
            [(hidden_size, hidden_size, True), (hidden_size, dim, False)]
        return [ColumnParallelLinear(i, o, config=config, init_method=nn.init.zeros_, bias=False, gather_output=g)
                for i, o, g in shapes]

    def forward(self, pooled_hidden: torch.Tensor) -> torch.Tensor:
        """pooled_hidden [B, H] -> unit-norm [B, D] (``column``: this rank's raw [B, D / TP] slice)."""
        if self.tp_mode == "replicated":
            return self.head(pooled_hidden)
        x = pooled_hidden.to(self.layers[0].weight.dtype)
        for index, layer in enumerate(self.layers):
            x, _ = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def partial_sum(self):
        """How dot products of this head's outputs are completed (``None``: outputs are whole)."""
        return tensor_parallel_partial_sum if self.tp_mode == "column" else None

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The reference head's state dict (whole weights), gathered over TP in ``column`` mode."""
        if self.tp_mode == "replicated":
            return {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        full = {}
        for name, layer in zip(layer_names(self.head_type), self.layers):
            shards = [torch.empty_like(layer.weight) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, layer.weight.detach().contiguous(), group=group)
            full[name] = torch.cat(shards)
        return full

    def load_full_state_dict(self, full: Dict[str, torch.Tensor]) -> None:
        """Load whole reference-head weights, keeping this TP rank's rows in ``column`` mode."""
        if self.tp_mode == "replicated":
            self.head.load_state_dict(full)
            return
        from megatron.core import parallel_state

        rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, layer in zip(layer_names(self.head_type), self.layers):
                rows = layer.weight.shape[0]
                layer.weight.copy_(full[name][rank * rows: (rank + 1) * rows])


def parallel_contrastive_step(
    head: ParallelContrastiveHead,
    optimizer: Optional[torch.optim.Optimizer],
    pooled_hidden: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    batch_index: torch.Tensor,
    cfg: ContrastiveConfig,
    generator: Optional[torch.Generator],
    dp_group=None,
    placebo_generator: Optional[torch.Generator] = None,
) -> HeadStepOutput:
    """One CLIPO head step on a data-parallel rank: global loss -> local rewards -> head update.

    pooled_hidden [b, H], correct [b], group_ids [b] and batch_index [b] (each response's position
    in the global batch, which fixes the canonical order) describe this rank's responses; ranks may
    hold different counts and split groups. Returns this rank's rewards [b] from the loss before the
    update; metrics and ``embeddings`` are global. ``optimizer=None`` (a fixed head) skips the update,
    and so does a global batch without a valid anchor (on every rank alike: the loss is global).
    ``placebo_generator`` (the placebo arm, ``contrastive.placebo``): the rewards are permuted among each
    group's rewarded responses with it (:func:`~clipo_nemo.algorithms.rewards.permute_within_groups`).
    """
    if dp_group is None:
        from megatron.core import parallel_state

        dp_group = parallel_state.get_data_parallel_group()
    embeddings = head(pooled_hidden.detach())
    view = GlobalBatch(batch_index, dp_group)
    all_embeddings, all_correct, all_groups = (view.gather(t) for t in (embeddings, correct.bool(), group_ids))
    out = contrastive_loss(all_embeddings, all_correct, all_groups, generator=generator, partial_sum=head.partial_sum(),
                           **contrastive_loss_options(cfg))
    local_loss, local_valid = view.local(out.per_anchor_loss), view.local(out.valid_anchor_mask)
    rewarded = rewarded_anchors(out.valid_anchor_mask, all_correct)
    all_rewards = contrastive_rewards(out.per_anchor_loss, rewarded, scale=cfg.reward_scale, offset=cfg.reward_offset,
                                      floor=cfg.reward_floor)
    if placebo_generator is not None:  # the placebo arm (global batch, the same draws on every rank)
        all_rewards = permute_within_groups(all_rewards.cpu(), rewarded.cpu(), all_groups.cpu(),
                                            placebo_generator).to(all_rewards.device)
    rewards = view.local(all_rewards)
    if optimizer is not None and bool(out.valid_anchor_mask.any()):
        optimizer.zero_grad(set_to_none=True)
        (local_loss.sum() / out.valid_anchor_mask.sum().clamp(min=1)).backward()
        all_reduce_grads(list(head.parameters()), dp_group)
        optimizer.step()
    metrics = {
        "contrastive_loss": float(out.loss.detach()),
        "pos_pair_cos": float(positive_pair_cosine(all_embeddings, all_correct, all_groups, head.partial_sum())),
        "valid_anchor_frac": float(out.valid_anchor_mask.float().mean()) if len(all_correct) else 0.0,
    }
    # Global batch, canonical order (in column mode: this TP rank's slice of each embedding).
    return HeadStepOutput(rewards, local_loss.detach(), local_valid, metrics, all_embeddings.detach())
