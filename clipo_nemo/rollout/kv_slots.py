"""KV-cache slots for continuous batching on megatron-core's ``StaticInferenceContext``.

How megatron-core 0.16 uses a static context (``megatron/core/transformer/attention.py``,
``Attention._adjust_key_value_for_inference`` and ``Attention.forward``): every layer keeps keys and
values of shape [max_seq, batch, kv_heads, dim] in ``context.key_value_memory_dict``, writes the
step's keys at ``sequence_len_offset`` for all rows, reads back ``[:sequence_len_offset + s]`` and
only then applies the rotary embedding (``q_pos_emb[start:end]``, ``k_pos_emb[:end]``), so the cache
holds keys *before* RoPE. After the first forward the mask type becomes ``no_mask`` and the core
attention gets the ``attention_mask`` tensor of ``GPTModel.forward``.

So one timeline of cache positions is shared by all rows, and a row may start anywhere on it:
- slot ``s`` holds its response at cache positions ``start[s] .. end - 1`` (``end`` = the context's
  ``sequence_len_offset``, the position every slot writes next);
- its own positions are ``cache position - start[s]``: a forward hook on ``GPTModel.rotary_pos_emb``
  turns megatron's [T, 1, 1, d] rotary table into a per-slot [end + 1, slots, 1, d] gather of the
  same rows (megatron's ``apply_rotary_pos_emb`` broadcasts over the batch dimension, as for mRoPE);
- cache positions before ``start[s]`` (an earlier tenant's keys, zeros) are hidden by a boolean
  ``attention_mask`` [slots, 1, 1, end + 1] (True = masked, megatron's convention). Megatron's local
  ``DotProductAttention`` always applies the tensor; Transformer Engine ignores it under ``no_mask``,
  so a pre-hook on every ``core_attention`` asks for ``AttnMaskType.arbitrary`` whenever a mask is
  given (TE path not run here: no GPU was available).
- the timeline is shifted (:meth:`SlotCache.shift_to`) when it runs out at the buffer's end or a new
  prompt needs room before ``end``: all live slots end at ``end``, so one uniform shift moves them.

A response therefore sees exactly its own tokens at its own positions, as in static batching.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Tuple

import torch


def keep_cache_rows(context, rows: torch.Tensor) -> None:
    """Keep (and reorder/duplicate) batch rows of a ``StaticInferenceContext``'s KV cache.

    megatron's own ``swap_key_value_dict`` only permutes; growing (n samples) and shrinking
    (finished rows) need a new batch size. Cache tensors are [max_seq, batch, heads, dim].
    """
    for layer, (keys, values) in context.key_value_memory_dict.items():
        context.key_value_memory_dict[layer] = (keys[:, rows], values[:, rows])


class SlotCache:
    """``slots`` responses decoded together on one shared timeline of ``buffer_len`` cache positions.

    ``context`` is the megatron ``StaticInferenceContext`` the model reads and fills; ``start``
    [slots] (long, on ``device``) is each slot's first cache position.
    """

    def __init__(self, slots: int, buffer_len: int, device: torch.device) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.context = StaticInferenceContext(slots, buffer_len)
        self.context.enable_decode_mode()
        self.buffer_len = buffer_len
        self.start = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def end(self) -> int:
        """The cache position every slot writes next."""
        return self.context.sequence_len_offset

    @property
    def slots(self) -> int:
        return int(self.start.shape[0])

    def lengths(self) -> torch.Tensor:
        """[slots] tokens each slot holds (its next token's own position)."""
        return self.end - self.start

    def shift_to(self, new_end: int) -> None:
        """Move the whole timeline so that it ends at ``new_end`` (0 < ``new_end`` < buffer_len);
        every live slot must fit (its length <= ``new_end``). One layer's tensor is copied at a time."""
        shift = new_end - self.end
        if not 0 < new_end < self.buffer_len:
            raise ValueError(f"cannot end the timeline at {new_end} of a {self.buffer_len}-position buffer")
        if shift == 0:
            return
        memory = self.context.key_value_memory_dict
        for layer in list(memory):
            memory[layer] = tuple(_shifted(tensor, self.end, shift) for tensor in memory[layer])
        self.start += shift
        self.context.sequence_len_offset = new_end

    def place(self, slot: int, prompt_cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a prefilled prompt (``prompt_cache``: layer -> keys, values [L, 1, heads, dim], a batch-1
        context's cache) into ``slot`` at cache positions ``end - L .. end - 1`` (``end >= L``)."""
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in prompt_cache.items():
            length = keys.shape[0]
            if length > self.end:
                raise ValueError(f"a {length}-token prompt needs the timeline to end at >= {length}, not {self.end}")
            if layer not in memory:  # zeros: masked positions must hold finite numbers (0 x NaN is NaN)
                memory[layer] = tuple(
                    torch.zeros((self.buffer_len, self.slots) + t.shape[2:], dtype=t.dtype, device=t.device)
                    for t in (keys, values))
            memory[layer][0][self.end - length : self.end, slot] = keys[:, 0]
            memory[layer][1][self.end - length : self.end, slot] = values[:, 0]
            self.start[slot] = self.end - length

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only ``slots`` (long [k], on the cache's device), in that order."""
        keep_cache_rows(self.context, slots)
        self.start = self.start[slots]

    def attention_mask(self) -> torch.Tensor:
        """[slots, 1, 1, end + 1] bool, True where a slot must not look (before its ``start``)."""
        positions = torch.arange(self.end + 1, device=self.start.device)
        return (positions[None, :] < self.start[:, None])[:, None, None, :]

    def rotary_rows(self) -> torch.Tensor:
        """[end + 1, slots] long: each cache position's own position in each slot (0 before ``start``)."""
        positions = torch.arange(self.end + 1, device=self.start.device)
        return (positions[:, None] - self.start[None, :]).clamp(min=0)


def _shifted(tensor: torch.Tensor, end: int, shift: int) -> torch.Tensor:
    """``tensor`` [T, ...] with its positions ``[0, end)`` moved by ``shift`` (the rest zeros)."""
    moved = torch.zeros_like(tensor)
    if shift > 0:
        moved[shift : end + shift] = tensor[:end]
    else:
        moved[: end + shift] = tensor[-shift:end]
    return moved


@contextlib.contextmanager
def slot_forward_hooks(gpt: torch.nn.Module, cache: SlotCache) -> Iterator[None]:
    """While a decode step of ``cache``'s slots runs through ``gpt`` (this stage's ``GPTModel``):
    per-slot rotary positions and a core attention that honours the slots' mask (module docstring)."""
    if getattr(gpt, "position_embedding_type", None) != "rope":
        raise ValueError(
            f"continuous batching needs a RoPE model (position_embedding_type='rope'), got "
            f"{getattr(gpt, 'position_embedding_type', None)!r}; use rollout.batching=static")
    rows = cache.rotary_rows()

    def per_slot_rotary(module, inputs, table):  # megatron's [T, 1, 1, d] -> [end + 1, slots, 1, d]
        return table[: rows.shape[0], 0, 0][rows].unsqueeze(2)

    handles = [gpt.rotary_pos_emb.register_forward_hook(per_slot_rotary)]
    for layer in gpt.decoder.layers:
        handles.append(layer.self_attention.core_attention.register_forward_pre_hook(
            _mask_honoured, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mask_honoured(module, args, kwargs):
    """Core-attention pre-hook: megatron passes ``no_mask`` after the first inference step, which
    Transformer Engine reads as "ignore the mask"; with a mask tensor given, ask for ``arbitrary``."""
    from megatron.core.transformer.enums import AttnMaskType

    mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
    if mask is not None and kwargs.get("attn_mask_type") == AttnMaskType.no_mask:
        kwargs["attn_mask_type"] = AttnMaskType.arbitrary
    return args, kwargs


def timeline_length(longest: int) -> int:
    """Cache positions of a continuous-batching timeline for responses of at most ``longest`` tokens
    (prompt + max_new_tokens): ``longest`` plus 1/16 of it, so the timeline is shifted at most once
    per ``longest / 16`` decode steps (one copy of the cache each time)."""
    return longest + max(1, -(-longest // 16))
