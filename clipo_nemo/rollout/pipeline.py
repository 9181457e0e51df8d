"""Pipeline-parallel hops of KV-cached generation (thin wrappers over megatron-core's communication).

One generation step over ``P`` pipeline stages: stage 0 embeds the step's tokens and runs its layers,
each later stage receives the previous stage's hidden states [s, rows, h], runs its own layers (and
fills its own layers' KV cache), the last stage makes the logits and samples; the chosen tokens go
back to every stage of the pipeline group (:func:`broadcast_from_last_stage`), so every stage keeps
the same rows, positions and finish decisions. Hidden states travel with megatron-core's inference
p2p helpers (``megatron.core.inference.communication_utils``: ``batch_isend_irecv`` on megatron's
pipeline group); the receiver knows the shape (``s`` and ``rows`` of the step, the model's hidden
size) and dtype (``config.pipeline_dtype``), so nothing else is exchanged. With one stage every
function here is the plain single-stage call.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def is_first_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_first_stage(ignore_virtual=True)


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def stage_forward(model: torch.nn.Module, gpt: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                  mask: Optional[torch.Tensor], context, config) -> Optional[torch.Tensor]:
    """This stage's share of one forward of ``tokens`` [rows, s] at ``positions`` [rows, s].

    ``model`` is the (maybe wrapped) policy and ``gpt`` the ``GPTModel`` inside it; ``context`` is
    this stage's ``StaticInferenceContext`` (its own layers' KV cache). A stage after the first first
    receives the previous stage's hidden states [s, rows, hidden] (``config.pipeline_dtype``); a
    stage before the last sends its output on. Returns the model's output on the last stage
    (gathered logits [rows, 1, V]), None on the others.
    """
    from megatron.core.inference.communication_utils import (
        recv_from_prev_pipeline_rank_, send_to_next_pipeline_rank)

    if not is_first_stage():
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], config.hidden_size, dtype=config.pipeline_dtype,
                             device=tokens.device)
        recv_from_prev_pipeline_rank_(hidden)
        gpt.set_input_tensor(hidden)
    output = model(tokens, positions, mask, inference_context=context, runtime_gather_output=True)
    if is_last_stage():
        return output
    send_to_next_pipeline_rank(output.to(config.pipeline_dtype).contiguous())
    return None


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape: Sequence[int], dtype: torch.dtype,
                              device: torch.device) -> torch.Tensor:
    """``tensor`` (given on the last stage, ``shape``/``dtype``) on every stage of this rank's pipeline
    group; the others pass None and receive it."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if not is_last_stage():
        tensor = torch.empty(tuple(shape), dtype=dtype, device=device)
    elif tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ValueError(f"broadcasting {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}")
    tensor = tensor.contiguous()
    torch.distributed.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return tensor
