"""The policy forward pass against a plain-PyTorch Qwen2/Llama oracle and across TP/PP layouts.

(a) one process: log-probs, entropy and pooled hidden states equal a dense reimplementation of the
    model (RMSNorm, RoPE, GQA, SwiGLU) written here from the megatron model's full state dict;
    gradients of a loss on all three equal the oracle's autograd gradients.
(b) TP=2 and PP=2 (real gloo processes) load that same full state dict and give the same outputs
    and gradients.
(c) layout validation names every problem.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from clipo_nemo.config import ModelConfig, ParallelConfig
from clipo_nemo.models.forward import PolicyOutputs
from clipo_nemo.parallel.state import LayoutError, validate_layout
from clipo_nemo.parallel.launcher import run_distributed

MODEL = ModelConfig(
    num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
    vocab_size=128, make_vocab_size_divisible_by=48,  # padded 144 at TP=1, 192 at TP=2: padding is exercised
    add_qkv_bias=True, rotary_base=10000.0, norm_epsilon=1e-6,
)
TEMPERATURE = 0.7
MICRO_BATCH = 2
TOL = 1e-5
LOSS_SCALE = 0.1


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL.vocab_size, (4, 12), generator=gen)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for row, (prompt, response) in enumerate([(3, 9), (5, 4), (2, 6), (7, 5)]):
        mask[row, prompt : prompt + response] = True
        tokens[row, prompt + response :] = 0  # right padding
    return tokens, mask


def _loss_weights(outputs, micro_batch):
    """A loss touching all three outputs, so their gradients are checked too (scaled so that
    gradients are O(1): fp32 rounding of the summation order stays well under the tolerance)."""
    pooled_w = torch.linspace(-1, 1, outputs.pooled_hidden.shape[-1])
    loss = outputs.logprobs.sum() + 0.3 * outputs.entropy.sum() + (outputs.pooled_hidden * pooled_w).sum()
    return LOSS_SCALE * loss, {}


def _run_layout(rank: int, world_size: int, model_cfg: ModelConfig, tp: int, pp: int,
                full_state: Dict[str, torch.Tensor] | None):
    """One rank: build the model under (tp, pp), load or create weights, forward, backward, gather."""
    warnings.filterwarnings("ignore")
    from clipo_nemo.models.forward import PolicyBatch, compute_policy_outputs, forward_backward_policy
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.models.sharding import gather_full_state_dict, load_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, micro_batch_size=MICRO_BATCH)
    init_parallel_state(parallel)
    try:
        model = build_policy_model(model_cfg, parallel)
        if full_state is None:  # the reference run: random non-trivial weights (norms, biases too)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.1 * torch.randn(param.shape, generator=gen))
            full_state = gather_full_state_dict(model, model_cfg.vocab_size)
        else:
            load_full_state_dict(model, full_state, model_cfg.vocab_size)
        batch = PolicyBatch(*_batch())
        kwargs = dict(micro_batch_size=MICRO_BATCH, temperature=TEMPERATURE, vocab_size=model_cfg.vocab_size)
        outputs = compute_policy_outputs(model, batch, **kwargs)
        authors = compute_policy_outputs(model, batch, pooling="authors", **kwargs)
        forward_backward_policy(model, batch, loss_func=_loss_weights, **kwargs)
        with torch.no_grad():  # gather the gradients with the weight-gathering collective
            for param in model.parameters():
                param.copy_(param.grad)
        grads = gather_full_state_dict(model, model_cfg.vocab_size)
        return {"state": full_state, "outputs": outputs, "grads": grads,
                "authors_pooled": None if authors is None else authors.pooled_hidden}
    finally:
        destroy_parallel_state()


# ------------------------------------------------------------------------------------------------
# The oracle: a dense Qwen2/Llama forward from the full state dict
# ------------------------------------------------------------------------------------------------
def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, base):
    """x [B, S, heads, d]; rotate-half RoPE with positions 0..S-1."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def _oracle(m: ModelConfig, state, tokens):
    """(final-norm output [B, S, H], logits [B, S, vocab]) of the dense model."""
    heads, groups, d = m.num_attention_heads, m.num_query_groups, m.hidden_size // m.num_attention_heads
    per_group = heads // groups
    h = state["embedding.word_embeddings.weight"][tokens]
    batch, seq = tokens.shape
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    for i in range(m.num_layers):
        p = lambda name: state[f"decoder.layers.{i}.{name}"]
        x = _rms_norm(h, p("self_attention.linear_qkv.layer_norm_weight"), m.norm_epsilon)
        qkv = (x @ p("self_attention.linear_qkv.weight").T + p("self_attention.linear_qkv.bias"))
        qkv = qkv.view(batch, seq, groups, per_group + 2, d)
        q = qkv[:, :, :, :per_group].reshape(batch, seq, heads, d)
        k = qkv[:, :, :, per_group]
        v = qkv[:, :, :, per_group + 1]
        q, k = _rope(q, m.rotary_base), _rope(k, m.rotary_base)
        k = k.repeat_interleave(per_group, dim=2)
        v = v.repeat_interleave(per_group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        attn = scores.masked_fill(causal, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(batch, seq, heads * d)
        h = h + out @ p("self_attention.linear_proj.weight").T
        x = _rms_norm(h, p("mlp.linear_fc1.layer_norm_weight"), m.norm_epsilon)
        gate, up = (x @ p("mlp.linear_fc1.weight").T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ p("mlp.linear_fc2.weight").T
    final = _rms_norm(h, state["decoder.final_layernorm.weight"], m.norm_epsilon)
    output = state["embedding.word_embeddings.weight" if m.tie_word_embeddings else "output_layer.weight"]
    return final, final @ output.T


def _oracle_outputs(state, m: ModelConfig = MODEL):
    tokens, mask = _batch()
    final, logits = _oracle(m, state, tokens)
    log_softmax = (logits[:, :-1] / TEMPERATURE).log_softmax(-1)
    logprobs = F.pad(log_softmax.gather(-1, tokens[:, 1:, None]).squeeze(-1), (1, 0)) * mask
    entropy = F.pad(-(log_softmax.exp() * log_softmax).sum(-1), (1, 0)) * mask
    pooled = (final * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return logprobs, entropy, pooled


def _oracle_grads(state):
    params = {name: t.clone().requires_grad_(True) for name, t in state.items()}
    logprobs, entropy, pooled = _oracle_outputs(params)
    tokens, mask = _batch()
    pooled_w = torch.linspace(-1, 1, pooled.shape[-1])
    # megatron divides each micro-batch's loss by the number of micro-batches
    loss = (logprobs.sum() + 0.3 * entropy.sum() + (pooled * pooled_w).sum()) * LOSS_SCALE / (tokens.shape[0] // MICRO_BATCH)
    loss.backward()
    return {name: p.grad for name, p in params.items()}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_run_layout, 1, args=(MODEL, 1, 1, None), timeout_s=120)[0]


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_single_process_matches_dense_oracle(reference):
    logprobs, entropy, pooled = _oracle_outputs(reference["state"])
    out = reference["outputs"]
    assert torch.allclose(out.logprobs, logprobs, atol=TOL, rtol=0)
    assert torch.allclose(out.entropy, entropy, atol=TOL, rtol=0)
    assert torch.allclose(out.pooled_hidden, pooled, atol=TOL, rtol=0)
    assert out.logprobs.abs().sum() > 1.0 and out.entropy.min() >= 0  # not trivially zero
    # contrastive.pooling=authors: the states at response positions 0..L-2 summed, divided by L.
    tokens, mask = _batch()
    final, _ = _oracle(MODEL, reference["state"], tokens)
    lengths = mask.sum(1, keepdim=True)
    last = mask.cumsum(1) == lengths
    authors = (final * (mask & ~last)[..., None]).sum(1) / lengths
    assert torch.allclose(reference["authors_pooled"], authors, atol=TOL, rtol=0)
    assert (reference["authors_pooled"] - pooled).abs().max() > 10 * TOL  # the two windows differ
    grads = _oracle_grads(reference["state"])
    assert _max_diff(reference["grads"], grads) < TOL


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_layouts_match_single_process(reference, tp, pp):
    results = run_distributed(_run_layout, tp * pp, args=(MODEL, tp, pp, reference["state"]), timeout_s=150)
    last_stage = [r for r in results if r["outputs"] is not None]
    assert len(last_stage) == tp  # the TP ranks of the last PP stage
    for result in last_stage:
        _assert_outputs_close(result["outputs"], reference["outputs"])
        assert (result["authors_pooled"] - reference["authors_pooled"]).abs().max() < TOL
    for result in results:
        assert _max_diff(result["state"], reference["state"]) == 0.0
        assert _max_diff(result["grads"], reference["grads"]) < TOL


def _assert_outputs_close(a, b) -> None:
    for name in ("logprobs", "entropy", "pooled_hidden"):
        diff = (getattr(a, name) - getattr(b, name)).abs().max().item()
        assert diff < TOL, f"{name} differs by {diff}"


def test_tied_embeddings_under_tp2_pp2(reference):
    """Tied embeddings: the last PP stage's output layer is the first stage's embedding.

    Compared with the dense oracle (proven equal to a single process above). Only forward outputs:
    the tied weight's gradient is split between the first and last stage until megatron's
    finalize_model_grads sums it (the training step's job)."""
    tied = dataclasses.replace(MODEL, tie_word_embeddings=True)
    state = {k: v for k, v in reference["state"].items() if k != "output_layer.weight"}
    results = run_distributed(_run_layout, 4, args=(tied, 2, 2, state), timeout_s=200)
    last_stage = [r["outputs"] for r in results if r["outputs"] is not None]
    assert len(last_stage) == 2
    expected = PolicyOutputs(*_oracle_outputs(state, tied))
    for outputs in last_stage:
        _assert_outputs_close(outputs, expected)


def test_layout_validation_names_each_problem():
    model = dataclasses.replace(MODEL, num_layers=3, num_query_groups=1)
    with pytest.raises(LayoutError) as err:
        validate_layout(6, model, ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2),
                        batch_size=10, group_size=4, cuda_available=False)
    message = str(err.value)
    assert "world size 6 is not a multiple of TP*PP*CP = 2*2*1 = 4" in message
    assert "num_query_groups=1 is not divisible by TP=2" in message
    assert "num_layers=3 is not divisible by PP=2" in message
    assert "batch size 10 is not a whole number of groups of 4" in message


def test_layout_validation_batch_and_gpu_only_features():
    parallel = ParallelConfig(tensor_parallel_size=2, micro_batch_size=3, sequence_parallel=True, context_parallel_size=2)
    with pytest.raises(LayoutError) as err:
        validate_layout(8, MODEL, parallel, batch_size=8, group_size=4, cuda_available=False)
    message = str(err.value)
    assert "per-rank batch 4 (batch 8 / DP 2) is not divisible by parallel.micro_batch_size=3" in message
    assert "sequence_parallel=true needs a GPU" in message
    assert "context_parallel_size=2 needs a GPU" in message
    # a good layout returns the data-parallel size
    assert validate_layout(8, MODEL, ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2),
                           batch_size=16, group_size=8) == 2


def test_authors_pooling_window_drops_the_last_response_position_but_never_all():
    from clipo_nemo.models.forward import pooling_window

    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert pooling_window(mask, "mean").tolist() == mask.tolist()
    assert pooling_window(mask, "authors").int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="pooling='last'"):
        pooling_window(mask, "last")
