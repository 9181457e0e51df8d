"""The fused, chunked log-prob + entropy pass (``fused_logprobs_and_entropy``) against two oracles.

(1) A dense float64 reference: logits = hidden @ W.T over the whole (padded) vocabulary, padding
    columns removed, ``log_softmax``; gradients by autograd through it.
(2) The previous implementation, kept here verbatim as ``previous_sharded_logprobs_and_entropy``:
    it takes the full [N, V/TP] logits and its TP all-reduces are megatron's.
Both at TP=1 and TP=2 (two gloo processes, each holding half of the vocabulary; the second half
holds the padding), for log-probs, entropy and the gradients w.r.t. hidden states and weight, with
chunk sizes that do and do not divide the number of positions, temperature != 1. Also: what autograd
keeps between forward and backward is never vocabulary-sized, and the whole policy forward pass
(megatron GPTModel, TP=2, chunks of 3 positions) matches the dense Qwen2 oracle of
tests/test_policy_forward.py, outputs and gradients.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, Tuple

import pytest
import torch

from clipo_nemo.models.forward import PolicyOutputs
from clipo_nemo.models.logprobs import VocabShard, fused_logprobs_and_entropy
from clipo_nemo.parallel.launcher import run_distributed

POSITIONS, HIDDEN, VOCAB, PADDED_VOCAB = 23, 16, 50, 56  # 6 padding columns
TEMPERATURE = 0.7
CHUNK_SIZES = (1, 5, 23, 64)  # 5 does not divide 23; 64 > N (one chunk)
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def previous_sharded_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int, vocab_size: int, temperature: float = 1.0,
    reduce_sum: Reduce = _identity, reduce_max: Reduce = _identity,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The implementation before the fused pass (logits [..., V_shard] -> (logprobs, entropy) [...]),
    unchanged: the oracle, and the baseline of ``benchmarks/logprob_memory.py``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shard_size = logits.shape[-1]
    column_ids = torch.arange(vocab_start, vocab_start + shard_size, device=logits.device)
    z = (logits.float() / temperature).masked_fill(column_ids >= vocab_size, torch.finfo(torch.float32).min)
    z_max = reduce_max(z.detach().amax(dim=-1))
    shifted = z - z_max.unsqueeze(-1)
    exp_shifted = shifted.exp()
    partition = reduce_sum(exp_shifted.sum(dim=-1))
    log_partition = partition.log()

    in_shard = (labels >= vocab_start) & (labels < vocab_start + shard_size)
    local_index = (labels - vocab_start).clamp(0, shard_size - 1)
    label_logit = shifted.gather(-1, local_index.unsqueeze(-1)).squeeze(-1) * in_shard
    logprobs = reduce_sum(label_logit) - log_partition
    entropy = log_partition - reduce_sum((exp_shifted * shifted).sum(dim=-1)) / partition
    return logprobs, entropy


def _problem(dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Hidden [N, H], full padded weight [V_pad, H], labels [N] (< VOCAB), upstream gradients [N]."""
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(POSITIONS, HIDDEN, generator=gen).to(dtype),
        "weight": (0.5 * torch.randn(PADDED_VOCAB, HIDDEN, generator=gen)).to(dtype),
        "labels": torch.randint(0, VOCAB, (POSITIONS,), generator=gen),
        "grad_logprobs": torch.randn(POSITIONS, generator=gen),
        "grad_entropy": torch.randn(POSITIONS, generator=gen),
    }


def _dense_reference(p: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """float64 log_softmax over the real vocabulary and autograd gradients of
    sum(grad_logprobs * logprobs + grad_entropy * entropy)."""
    hidden = p["hidden"].double().requires_grad_(True)
    weight = p["weight"].double().requires_grad_(True)
    log_p = ((hidden @ weight.T)[:, :VOCAB] / TEMPERATURE).log_softmax(-1)
    logprobs = log_p.gather(-1, p["labels"][:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    (p["grad_logprobs"].double() @ logprobs + p["grad_entropy"].double() @ entropy).backward()
    return {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "hidden": hidden.grad, "weight": weight.grad}


def _run(kind: str, p: Dict[str, torch.Tensor], weight_rows: slice, chunk_size: int, reduce_sum: Reduce,
         reduce_max: Reduce, hidden_grad_sum: Reduce) -> Dict[str, torch.Tensor]:
    """Outputs and gradients (hidden: summed over shards by ``hidden_grad_sum``; weight: this shard's rows)."""
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["weight"][weight_rows].clone().requires_grad_(True)
    vocab_start = weight_rows.start or 0
    if kind == "fused":
        shard = VocabShard(vocab_start=vocab_start, vocab_size=VOCAB, temperature=TEMPERATURE)
        logprobs, entropy = fused_logprobs_and_entropy(
            hidden, weight, p["labels"], shard, chunk_size=chunk_size, reduce_sum=reduce_sum, reduce_max=reduce_max
        )
    else:
        logprobs, entropy = previous_sharded_logprobs_and_entropy(
            hidden @ weight.T, p["labels"], vocab_start=vocab_start, vocab_size=VOCAB, temperature=TEMPERATURE,
            reduce_sum=reduce_sum, reduce_max=reduce_max,
        )
    (p["grad_logprobs"] @ logprobs + p["grad_entropy"] @ entropy).backward()
    return {"logprobs": logprobs.detach(), "entropy": entropy.detach(),
            "hidden": hidden_grad_sum(hidden.grad), "weight": weight.grad}


def _assert_close(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], rows: slice, tol: float, label: str):
    """Max difference below ``tol`` times the largest expected magnitude (at least 1): float32
    summation order differs between the implementations."""
    for name in ("logprobs", "entropy", "hidden", "weight"):
        expected = want[name][rows] if name == "weight" else want[name]
        diff = (got[name].double() - expected.double()).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        assert diff < tol * scale, f"{label}: {name} differs by {diff} (scale {scale:.2f})"


def test_single_shard_matches_dense_reference_and_previous_function():
    p = _problem()
    dense = _dense_reference(p)
    assert dense["weight"][VOCAB:].abs().max() == 0 and dense["weight"][:VOCAB].abs().max() > 0.1
    rows = slice(0, PADDED_VOCAB)
    previous = _run("previous", p, rows, 0, _identity, _identity, _identity)
    _assert_close(previous, dense, rows, 1e-5, "previous vs dense")  # the oracles agree
    for chunk in CHUNK_SIZES:
        fused = _run("fused", p, rows, chunk, _identity, _identity, _identity)
        _assert_close(fused, dense, rows, 1e-5, f"chunk {chunk} vs dense")
        _assert_close(fused, previous, rows, 1e-5, f"chunk {chunk} vs previous")


def test_only_one_output_used_and_no_grad():
    """Gradient from log-probs only, from entropy only; under no_grad the values are unchanged."""
    p = _problem()
    dense = _dense_reference(dict(p, grad_entropy=torch.zeros(POSITIONS)))
    shard = VocabShard(vocab_start=0, vocab_size=VOCAB, temperature=TEMPERATURE)
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["weight"].clone().requires_grad_(True)
    logprobs, _ = fused_logprobs_and_entropy(hidden, weight, p["labels"], shard, chunk_size=5)
    (p["grad_logprobs"] @ logprobs).backward()
    assert (hidden.grad.double() - dense["hidden"]).abs().max() < 1e-5
    assert (weight.grad.double() - dense["weight"]).abs().max() < 1e-5

    dense = _dense_reference(dict(p, grad_logprobs=torch.zeros(POSITIONS)))
    hidden.grad = weight.grad = None
    _, entropy = fused_logprobs_and_entropy(hidden, weight, p["labels"], shard, chunk_size=4)
    (p["grad_entropy"] @ entropy).backward()
    assert (hidden.grad.double() - dense["hidden"]).abs().max() < 1e-5
    assert (weight.grad.double() - dense["weight"]).abs().max() < 1e-5

    with torch.no_grad():
        logprobs, entropy = fused_logprobs_and_entropy(hidden, weight, p["labels"], shard, chunk_size=7)
    assert not logprobs.requires_grad
    assert (logprobs.double() - dense["logprobs"]).abs().max() < 1e-5
    assert (entropy.double() - dense["entropy"]).abs().max() < 1e-5


def test_bfloat16_matches_previous_function():
    """bf16 hidden/weight like the real run: logits in bf16 then float32, as the output layer did."""
    p = _problem(torch.bfloat16)
    rows = slice(0, PADDED_VOCAB)
    previous = _run("previous", p, rows, 0, _identity, _identity, _identity)
    fused = _run("fused", p, rows, 5, _identity, _identity, _identity)
    for name in ("logprobs", "entropy"):
        assert (fused[name] - previous[name]).abs().max() < 1e-5, name
    for name in ("hidden", "weight"):  # bf16 gradients: within a couple of bf16 ulps of O(1) values
        scale = previous[name].float().abs().max()
        assert (fused[name].float() - previous[name].float()).abs().max() < 2e-2 * scale, name


def test_autograd_keeps_nothing_vocabulary_sized():
    p = _problem()
    saved = []
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["weight"].clone().requires_grad_(True)
    shard = VocabShard(vocab_start=0, vocab_size=VOCAB, temperature=TEMPERATURE)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fused_logprobs_and_entropy(hidden, weight, p["labels"], shard, chunk_size=5)
    assert sorted(saved) == sorted([(POSITIONS, HIDDEN), (PADDED_VOCAB, HIDDEN)] + [(POSITIONS,)] * 3)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        previous_sharded_logprobs_and_entropy(hidden @ weight.T, p["labels"], vocab_start=0, vocab_size=VOCAB)
    assert (POSITIONS, PADDED_VOCAB) in saved  # the check can tell the two apart


def test_bad_arguments_are_named():
    p = _problem()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused_logprobs_and_entropy(p["hidden"], p["weight"], p["labels"], VocabShard(0, VOCAB, 0.0), chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_logprobs_and_entropy(p["hidden"], p["weight"], p["labels"], VocabShard(0, VOCAB), chunk_size=0)
    with pytest.raises(ValueError, match="labels shape"):
        fused_logprobs_and_entropy(p["hidden"], p["weight"], p["labels"][:3], VocabShard(0, VOCAB), chunk_size=4)


def _tensor_parallel_rank(rank: int, world_size: int):
    """One of two TP ranks: this rank's half of the vocabulary, megatron's TP all-reduces."""
    warnings.filterwarnings("ignore")
    from megatron.core import tensor_parallel

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.models.forward import _all_reduce_max
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    init_parallel_state(ParallelConfig(tensor_parallel_size=world_size))
    try:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        reduce_sum = functools.partial(tensor_parallel.reduce_from_tensor_model_parallel_region, group=group)
        reduce_max = functools.partial(_all_reduce_max, group=group)

        def hidden_grad_sum(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=group)
            return grad

        shard_size = PADDED_VOCAB // world_size
        rows = slice(rank * shard_size, (rank + 1) * shard_size)
        p = _problem()
        results = {"previous": _run("previous", p, rows, 0, reduce_sum, reduce_max, hidden_grad_sum)}
        for chunk in CHUNK_SIZES:
            results[chunk] = _run("fused", p, rows, chunk, reduce_sum, reduce_max, hidden_grad_sum)
        return rows, results
    finally:
        destroy_parallel_state()


def test_two_tensor_parallel_shards_match_dense_reference_and_previous_function():
    p = _problem()
    dense = _dense_reference(p)
    ranks = run_distributed(_tensor_parallel_rank, 2, timeout_s=120)
    assert ranks[1][0].stop > VOCAB > ranks[1][0].start  # the second shard holds real ids and padding
    for rows, results in ranks:
        _assert_close(results["previous"], dense, rows, 1e-5, f"rows {rows}: previous vs dense")
        for chunk in CHUNK_SIZES:
            _assert_close(results[chunk], dense, rows, 1e-5, f"rows {rows}, chunk {chunk} vs dense")
            _assert_close(results[chunk], results["previous"], slice(None), 1e-5,
                          f"rows {rows}, chunk {chunk} vs previous")


def _policy_rank_with_small_chunks(rank: int, world_size: int):
    """tests/test_policy_forward.py's layout runner (random weights, forward, backward, gathered
    gradients) with the policy passes scoring 3 positions per chunk."""
    import test_policy_forward as policy_test

    from clipo_nemo.models import forward

    forward.compute_policy_outputs = functools.partial(forward.compute_policy_outputs, logprob_chunk_size=3)
    forward.forward_backward_policy = functools.partial(forward.forward_backward_policy, logprob_chunk_size=3)
    return policy_test._run_layout(rank, world_size, policy_test.MODEL, world_size, 1, None)


def test_policy_forward_in_small_chunks_matches_dense_model():
    import test_policy_forward as policy_test

    results = run_distributed(_policy_rank_with_small_chunks, 2, timeout_s=150)
    state = results[0]["state"]
    logprobs, entropy, pooled = policy_test._oracle_outputs(state)
    grads = policy_test._oracle_grads(state)
    for result in results:
        policy_test._assert_outputs_close(result["outputs"], PolicyOutputs(logprobs, entropy, pooled))
        assert policy_test._max_diff(result["grads"], grads) < policy_test.TOL
