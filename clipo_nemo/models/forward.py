"""One policy forward pass: per-token log-probs, entropy and pooled hidden states together.

Batch format and alignment (``PolicyBatch``)::

    tokens         [B, S] long   prompt + response, right padded (any pad id < vocab_size)
    response_mask  [B, S] bool   True where tokens[b, t] is a sampled response token
    extras         {name: [B, ...]}  per-response tensors a loss needs, split with the batch
                                     (those [B, S, ...] are per-token: trimmed with the tokens)

Outputs (``PolicyOutputs``), aligned with ``tokens``::

    logprobs       [b, S] float32  log p(tokens[b, t] | tokens[b, :t]) / temperature-scaled, i.e.
                                   from the logits at position t-1; 0 where response_mask is False
    entropy        [b, S] float32  entropy of that same distribution (the one that sampled token t)
    pooled_hidden  [b, H] float32  the final-norm output H[t] summed over the pooling window
                                   (:func:`pooling_window`) and divided by the response length L:
                                   ``mean`` = the mean over t with response_mask set

Column 0 can never be a response token (nothing predicts it). Every row needs >= 1 response token.

How log-probs and the pooled state come out of the *same* forward pass without full logits: while
``GPTModel.forward`` runs unchanged, its ``output_layer`` returns its input, so the model returns
the final-norm output [b, s, H]. The pooled state is its masked mean; log-probs and entropy are
computed only at the positions whose next token is a response token, by the output-layer matmul
fused with the log-softmax, ``logprob_chunk_size`` positions at a time, forward and backward
(``models/logprobs.py``: peak extra memory about [chunk, V/TP] float32, never [b, s, V]). Calling
the decoder by hand would duplicate GPTModel's pre/post-processing (rotary setup, tied weights),
which changes between megatron releases.

Parallelism: the output weight stays split over TP; log-softmax and entropy use TP all-reduces of
[chunk] tensors (never the vocabulary), and the output layer's input is handled as megatron's
ColumnParallelLinear does (copy to the TP region; with SP, a gather of the sequence). With sequence
parallel the final-norm output is split along the sequence over TP: each rank sums its positions
for the pooled state and the sums are all-reduced over TP. With context
parallel, labels are shifted before megatron's load-balanced sequence split, per-token outputs are
all-gathered over CP (backward: each rank keeps its slice) and pooled sums all-reduced over CP, so
every CP rank sees full-sequence outputs and computes the same loss (return ``(loss, info)`` so
megatron scales it by the CP size, matching its gradient averaging over DP x CP). With PP only the
last stage has outputs. SP and CP are GPU-only and not exercised by the CPU tests.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from clipo_nemo.models.logprobs import VocabShard, fused_logprobs_and_entropy, masked_sum_over_sequence


@dataclass
class PolicyBatch:
    """Token ids, response mask and per-response extras (see the module docstring)."""

    tokens: torch.Tensor
    response_mask: torch.Tensor
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, S], got shape {tuple(self.tokens.shape)}")
        if self.response_mask.shape != self.tokens.shape:
            raise ValueError(
                f"response_mask shape {tuple(self.response_mask.shape)} != tokens shape {tuple(self.tokens.shape)}"
            )
        self.response_mask = self.response_mask.bool()
        if self.response_mask[:, 0].any():
            rows = self.response_mask[:, 0].nonzero().flatten().tolist()
            raise ValueError(f"response_mask[:, 0] is set in rows {rows}: the first token has no log-prob")
        empty = (~self.response_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"rows {empty} have no response tokens")
        for name, value in self.extras.items():
            if value.shape[0] != self.tokens.shape[0]:
                raise ValueError(f"extras[{name!r}] has {value.shape[0]} rows, tokens has {self.tokens.shape[0]}")

    def micro_batch_plan(self, size: int, max_tokens: int = 0) -> "MicroBatchPlan":
        """``max_tokens == 0``: consecutive micro-batches of ``size`` rows at the full width S (the
        batch size must be a multiple of ``size``). ``max_tokens > 0``: rows packed by token budget
        (:func:`pack_by_token_budget`), each micro-batch trimmed to its longest row."""
        num_rows, width = self.tokens.shape
        lengths = sequence_lengths(self.response_mask)
        if max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens} must be >= 0 (0 = fixed micro-batches of {size} rows)")
        if max_tokens == 0:
            if size < 1 or num_rows % size != 0:
                raise ValueError(f"batch of {num_rows} rows does not split into micro-batches of {size}")
            groups = [list(range(i, i + size)) for i in range(0, num_rows, size)]
            widths = [width] * len(groups)
        else:
            groups = pack_by_token_budget(lengths.tolist(), max_tokens)
            widths = [int(lengths[group].max()) for group in groups]
        return MicroBatchPlan(
            rows=[torch.tensor(group, dtype=torch.long) for group in groups], widths=widths,
            real_tokens=int(lengths.sum()),
            rows_over_budget=int((lengths > max_tokens).sum()) if max_tokens > 0 else 0,
        )

    def micro_batches(self, plan: "MicroBatchPlan") -> List["PolicyBatch"]:
        """The planned micro-batches: their rows, right padding trimmed to the plan's width.
        Extras with a second dimension of S are per-token and are trimmed too."""
        width = self.tokens.shape[1]

        def take(value: torch.Tensor, rows: torch.Tensor, keep: int) -> torch.Tensor:
            value = value[rows]
            return value[:, :keep] if value.dim() >= 2 and value.shape[1] == width else value

        return [
            PolicyBatch(self.tokens[rows, :keep], self.response_mask[rows, :keep],
                        {name: take(value, rows, keep) for name, value in self.extras.items()})
            for rows, keep in zip(plan.rows, plan.widths)
        ]


def sequence_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] bool -> [B] long: the real length (prompt + response) of each row, i.e. one past its
    last response position; everything after it is padding no output depends on (causal model)."""
    positions = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)
    return (response_mask.long() * positions).amax(dim=1)


def pack_by_token_budget(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Row indices of each micro-batch such that rows x longest row <= ``max_tokens``.

    Rows are sorted by length, longest first (equal lengths keep their order), and consecutive
    sorted rows are packed greedily, so each micro-batch holds rows of similar length and little
    padding. A row longer than the budget gets a micro-batch of its own (the caller counts those).
    Every row appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    groups: List[List[int]] = []
    for row in order:
        # Sorted longest first: a group's first row is its longest.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


@dataclass
class MicroBatchPlan:
    """How a batch of B rows splits into micro-batches.

    rows              one [b_i] long tensor of batch row indices per micro-batch (all rows, once each)
    widths            the sequence length each micro-batch is trimmed to
    real_tokens       sum over rows of their real length (see :func:`sequence_lengths`)
    rows_over_budget  rows longer than the token budget (each alone in its micro-batch)
    """

    rows: List[torch.Tensor]
    widths: List[int]
    real_tokens: int
    rows_over_budget: int = 0

    @property
    def computed_tokens(self) -> int:
        """Token positions the model runs over: sum of rows x width per micro-batch."""
        return sum(len(rows) * width for rows, width in zip(self.rows, self.widths))

    @property
    def padding_fraction(self) -> float:
        """Share of the computed positions that are padding."""
        return 1.0 - self.real_tokens / max(self.computed_tokens, 1)


@dataclass
class PolicyOutputs:
    """Per-micro-batch outputs of the policy forward pass (see the module docstring)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    pooled_hidden: torch.Tensor

    def detach(self) -> "PolicyOutputs":
        return PolicyOutputs(self.logprobs.detach(), self.entropy.detach(), self.pooled_hidden.detach())


LossFunc = Callable[[PolicyOutputs, PolicyBatch], Tuple[Any, ...]]


POOLING_MODES = ("mean", "authors")


def pooling_window(response_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, S] bool: the positions whose final-norm state is summed into the pooled hidden state (the
    sum is then divided by the response length L in both modes).

    ``mean``: every response position (0..L-1 of the response; SPEC step 3, the paper's Eq. 9).
    ``authors``: response positions 0..L-2, i.e. without the last response token's state (usually
    EOS), as the authors' patched rollout engine accumulates one state per decode step and never
    computes the last one; a 1-token response keeps its only position (their engine would have no
    state at all).
    """
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLING_MODES}")
    mask = response_mask.bool()
    if pooling == "mean":
        return mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
    without_last = mask & (positions != last)
    return torch.where(without_last.any(dim=1, keepdim=True), without_last, mask)


def compute_policy_outputs(
    model: torch.nn.Module, batch: PolicyBatch, *, micro_batch_size: int, temperature: float, vocab_size: int,
    max_tokens_per_micro_batch: int = 0, logprob_chunk_size: int = 1024, pooling: str = "mean",
) -> Optional[PolicyOutputs]:
    """Forward only, without autograd (e.g. old log-probs): the whole batch's outputs on the last
    PP stage, in the batch's row order and at its full width S (zeros past each micro-batch's
    width), None on the other stages."""
    plan = batch.micro_batch_plan(micro_batch_size, max_tokens_per_micro_batch)
    with torch.no_grad():
        infos = forward_backward_policy(
            model, batch, micro_batch_size=micro_batch_size, temperature=temperature, vocab_size=vocab_size,
            loss_func=_keep_outputs, forward_only=True, max_tokens_per_micro_batch=max_tokens_per_micro_batch,
            logprob_chunk_size=logprob_chunk_size, plan=plan, pooling=pooling,
        )
    if not infos:
        return None
    num_rows, width = batch.tokens.shape
    first = infos[0]
    logprobs = first.logprobs.new_zeros(num_rows, width)
    entropy = first.entropy.new_zeros(num_rows, width)
    pooled_hidden = first.pooled_hidden.new_zeros(num_rows, first.pooled_hidden.shape[-1])
    for rows, info in zip(plan.rows, infos):
        rows = rows.to(logprobs.device)
        logprobs[rows, : info.logprobs.shape[1]] = info.logprobs
        entropy[rows, : info.entropy.shape[1]] = info.entropy
        pooled_hidden[rows] = info.pooled_hidden
    return PolicyOutputs(logprobs, entropy, pooled_hidden)


def _keep_outputs(outputs: PolicyOutputs, micro_batch: PolicyBatch) -> Tuple[torch.Tensor, PolicyOutputs]:
    return outputs.logprobs.new_zeros(()), outputs.detach()


def forward_backward_policy(
    model: torch.nn.Module,
    batch: PolicyBatch,
    *,
    micro_batch_size: int,
    temperature: float,
    vocab_size: int,
    loss_func: LossFunc,
    forward_only: bool = False,
    max_tokens_per_micro_batch: int = 0,
    logprob_chunk_size: int = 1024,
    plan: Optional[MicroBatchPlan] = None,
    pooling: str = "mean",
) -> List[Any]:
    """Run ``batch`` in micro-batches through megatron's forward-backward schedule.

    Micro-batches: ``micro_batch_size`` consecutive rows at full width, or with
    ``max_tokens_per_micro_batch > 0`` length-sorted rows packed by token budget, each trimmed to
    its longest row (``PolicyBatch.micro_batch_plan``). Varying shapes need megatron's pipeline
    shape exchange, so that mode sets ``variable_seq_lengths`` on the model config (used with PP > 1).

    ``loss_func(outputs, micro_batch)`` runs on the last PP stage for every micro-batch and returns
    what megatron's schedules accept: ``(loss, info)`` (megatron divides the loss by the number of
    micro-batches and multiplies it by the CP size) or ``(loss, num_tokens, info)``. Gradients are
    accumulated into the parameters (or the DDP buffers) unless ``forward_only``. Log-probs and
    entropy are computed ``logprob_chunk_size`` response positions at a time (``actor.logprob_chunk_size``).
    ``plan``: the caller's ``batch.micro_batch_plan(micro_batch_size, max_tokens_per_micro_batch)``
    when it needs the plan itself (built here otherwise). ``pooling``: the pooled state's window
    (:func:`pooling_window`).

    Returns the ``info`` of each micro-batch in the plan's order on the last PP stage; ``[]`` on the
    others.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if batch.tokens.max().item() >= vocab_size or batch.tokens.min().item() < 0:
        bad = ((batch.tokens >= vocab_size) | (batch.tokens < 0)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"rows {bad} hold token ids outside [0, vocab_size={vocab_size})")
    if plan is None:
        plan = batch.micro_batch_plan(micro_batch_size, max_tokens_per_micro_batch)
    micro_batches = batch.micro_batches(plan)
    config = get_model_config(model)
    sequence_parallel = config.sequence_parallel
    if max_tokens_per_micro_batch > 0:
        # Pipeline stages then send each activation's [s, b, h] ahead of it (p2p_communication).
        config.variable_seq_lengths = True
    seq_length = max(plan.widths) + _sequence_padding(max(plan.widths), sequence_parallel)
    step = functools.partial(
        _forward_step, temperature=temperature, vocab_size=vocab_size, loss_func=loss_func,
        sequence_parallel=sequence_parallel, logprob_chunk_size=logprob_chunk_size, pooling=pooling,
    )
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=max(len(rows) for rows in plan.rows),
        forward_only=forward_only,
    )


def _sequence_padding(seq_len: int, sequence_parallel: bool) -> int:
    """Right padding so the sequence splits over CP (2*CP chunks) and, with SP, over TP."""
    from megatron.core import parallel_state

    multiple = 1
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        multiple *= 2 * cp
    if sequence_parallel:
        multiple *= parallel_state.get_tensor_model_parallel_world_size()
    return -seq_len % multiple


def _forward_step(data_iterator: Iterator[PolicyBatch], model: torch.nn.Module, *, temperature: float,
                  vocab_size: int, loss_func: LossFunc, sequence_parallel: bool, logprob_chunk_size: int,
                  pooling: str):
    from megatron.core.utils import unwrap_model

    micro_batch = next(data_iterator)
    gpt = unwrap_model(model)
    device = next(gpt.parameters()).device
    inputs = _prepare_inputs(micro_batch, device, sequence_parallel, pooling)
    if not gpt.post_process:  # an intermediate PP stage: the schedule sends `output` on
        return model(inputs["tokens"], inputs["position_ids"], inputs["attention_mask"]), None
    with _output_layer_returns_input(gpt):
        final_norm_output = model(inputs["tokens"], inputs["position_ids"], inputs["attention_mask"])

    def loss_on_last_stage(hidden: torch.Tensor):
        outputs = _policy_outputs(
            hidden, _output_weight(gpt), inputs, micro_batch, temperature, vocab_size, sequence_parallel,
            logprob_chunk_size,
        )
        return loss_func(outputs, micro_batch)

    return final_norm_output, loss_on_last_stage


@contextlib.contextmanager
def _output_layer_returns_input(gpt: torch.nn.Module) -> Iterator[None]:
    """While active, ``gpt.output_layer`` returns its input, so ``GPTModel.forward`` (labels=None)
    returns the final-norm output transposed to [b, s, H] instead of logits. The module is still
    called, so hooks on it (e.g. megatron DDP's parameter-gather waits) run as usual."""
    if gpt.config.mtp_num_layers or getattr(gpt.output_layer, "embedding_activation_buffer", None) is not None:
        raise ValueError("the fused log-prob pass supports GPTModel without multi-token prediction and "
                         "without defer_embedding_wgrad_compute")
    gpt.output_layer.forward = lambda hidden_states, weight=None, runtime_gather_output=None: (hidden_states, None)
    try:
        yield
    finally:
        del gpt.output_layer.forward  # the instance attribute; the class's forward is back


def _output_weight(gpt: torch.nn.Module) -> torch.Tensor:
    """This TP rank's [V_pad/TP, H] output-layer weight, as GPTModel picks it (tied or not)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _prepare_inputs(micro_batch: PolicyBatch, device: torch.device, sequence_parallel: bool,
                    pooling: str = "mean") -> Dict[str, Any]:
    """Pad, shift labels into place (position t predicts token t+1) and take this CP rank's part."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens = micro_batch.tokens.to(device)
    mask = micro_batch.response_mask.to(device)
    pad = _sequence_padding(tokens.shape[1], sequence_parallel)
    tokens = torch.nn.functional.pad(tokens, (0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad))
    seq_len = tokens.shape[1]
    inputs = {
        "tokens": tokens,
        "position_ids": torch.arange(seq_len, device=device).expand_as(tokens),
        "labels": torch.nn.functional.pad(tokens[:, 1:], (0, 1)),
        "label_mask": torch.nn.functional.pad(mask[:, 1:], (0, 1)),
        "hidden_mask": pooling_window(mask, pooling),
    }
    inputs = get_batch_on_this_cp_rank(inputs)
    # An explicit causal mask (True = hidden) is needed on CPU, where megatron would build its
    # default one with device="cuda"; on GPU the attention kernels apply causality themselves.
    inputs["attention_mask"] = None
    if not torch.cuda.is_available():
        inputs["attention_mask"] = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    return inputs


def _policy_outputs(hidden: torch.Tensor, weight: torch.Tensor, inputs: Dict[str, Any], micro_batch: PolicyBatch,
                    temperature: float, vocab_size: int, sequence_parallel: bool,
                    logprob_chunk_size: int) -> PolicyOutputs:
    """Outputs from this rank's final-norm output [b, s_cp(/TP with SP), H] and output weight [V/TP, H]."""
    from megatron.core import parallel_state, tensor_parallel

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # What ColumnParallelLinear does with its input: gather the sequence (SP; backward
    # reduce-scatter) or copy (backward all-reduce of each rank's vocabulary-shard part; megatron
    # all-reduces a contiguous copy of the gradient and returns the original, so the gradient
    # arriving there must be contiguous: it is, as the index backward below makes a [b, s, H] one).
    if sequence_parallel:
        full = tensor_parallel.gather_from_sequence_parallel_region(
            hidden.transpose(0, 1), tensor_parallel_output_grad=True, group=tp_group
        ).transpose(0, 1)
    else:
        full = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    label_mask = inputs["label_mask"]  # [b, s_cp]: positions whose next token is a response token
    scored = full[label_mask]  # [N, H]
    shard = VocabShard(vocab_start=tp_rank * weight.shape[0], vocab_size=vocab_size, temperature=temperature)
    scored_logprobs, scored_entropy = fused_logprobs_and_entropy(
        scored, weight, inputs["labels"][label_mask], shard, chunk_size=logprob_chunk_size,
        reduce_sum=functools.partial(tensor_parallel.reduce_from_tensor_model_parallel_region, group=tp_group),
        reduce_max=functools.partial(_all_reduce_max, group=tp_group),
    )
    zeros = torch.zeros(label_mask.shape, dtype=torch.float32, device=label_mask.device)
    next_logprobs = _gather_sequence_over_cp(zeros.masked_scatter(label_mask, scored_logprobs))
    next_entropy = _gather_sequence_over_cp(zeros.masked_scatter(label_mask, scored_entropy))
    # Shifted frame -> token frame: the value at t-1 belongs to token t.
    seq_len = micro_batch.tokens.shape[1]
    response = micro_batch.response_mask.to(hidden.device)
    logprobs = torch.nn.functional.pad(next_logprobs[:, : seq_len - 1], (1, 0)) * response
    entropy = torch.nn.functional.pad(next_entropy[:, : seq_len - 1], (1, 0)) * response

    hidden_mask = inputs["hidden_mask"]
    if sequence_parallel:
        local = hidden.shape[1]
        hidden_mask = hidden_mask[:, tp_rank * local : (tp_rank + 1) * local]
    pooled_sum = masked_sum_over_sequence(hidden.transpose(0, 1).float(), hidden_mask)
    if sequence_parallel:
        pooled_sum = tensor_parallel.reduce_from_tensor_model_parallel_region(pooled_sum, group=tp_group)
    if parallel_state.get_context_parallel_world_size() > 1:
        pooled_sum = tensor_parallel.reduce_from_tensor_model_parallel_region(
            pooled_sum, group=parallel_state.get_context_parallel_group()
        )
    counts = response.sum(dim=1, keepdim=True).to(pooled_sum.dtype)
    return PolicyOutputs(logprobs, entropy, pooled_sum / counts)


def _all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    return x


def _gather_sequence_over_cp(x: torch.Tensor) -> torch.Tensor:
    """[b, S/CP] in megatron's load-balanced chunk order -> [b, S] in sequence order (autograd:
    each rank keeps the gradient of its own positions)."""
    from megatron.core import parallel_state, tensor_parallel

    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return x
    gathered = tensor_parallel.gather_from_sequence_parallel_region(
        x.transpose(0, 1).contiguous(), tensor_parallel_output_grad=False,
        group=parallel_state.get_context_parallel_group(),
    )  # [S, b]: rank r holds sequence chunks r and 2*CP-1-r
    chunk_order = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
    chunks = gathered.chunk(2 * cp, dim=0)
    ordered = [chunks[chunk_order.index(c)] for c in range(2 * cp)]
    return torch.cat(ordered, dim=0).transpose(0, 1)
