"""Hugging Face -> clipo-nemo conversion against Hugging Face ``transformers`` as the oracle.

Tiny random Qwen2 (QKV bias, untied) and Llama (GQA, tied and untied, Llama 3 RoPE scaling) models
are built offline from a config. Checked: megatron-core logits equal the ``transformers`` logits
in fp32 (one process, and TP=2 / PP=2 / TP=2xPP=2 on real gloo processes); the mapping round trip
is bit-identical; greedy generation with our rollout engine equals ``transformers`` greedy
``generate``; bad inputs fail before anything is written; an interrupted conversion leaves nothing.
"""
from __future__ import annotations

import math
import os
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


@pytest.mark.parametrize("rope", [
    # both dicts: transformers reads rope_scaling instead of rope_parameters (conversion used to keep "default")
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
     "rope_scaling": {**LLAMA3_ROPE, "rope_theta": 500000.0}},
    {"rope_parameters": {"rope_type": "default"}, "rope_scaling": dict(LLAMA3_ROPE), "rope_theta": 300000.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 250000.0}, "rope_scaling": {**LLAMA3_ROPE, "factor": 4.0},
     "rope_theta": 250000.0},
    {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}},
    {"rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}, "rope_theta": 123.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 40000.0}},
])
def test_rope_is_read_as_transformers_reads_it(rope):
    import warnings

    from transformers import LlamaConfig

    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100,
              "max_position_embeddings": 16384, **rope}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = LlamaConfig.from_dict(dict(config)).rope_parameters  # the oracle: transformers' own reading
    ours = model_config_from_hf(config)
    assert ours.rotary_base == theirs["rope_theta"]
    assert ours.rope_scaling == (theirs.get("rope_type", theirs.get("type")) == "llama3")
    if ours.rope_scaling:
        assert ours.rope_scaling_factor == theirs["factor"]


def test_contradictory_rope_dicts_are_refused():
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100,
              "max_position_embeddings": 16384, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
              "rope_scaling": dict(LLAMA3_ROPE)}  # transformers would use rope_theta 10000 here
    with pytest.raises(ConversionError, match="rope_parameters with rope_theta=500000.0 and rope_scaling"):
        model_config_from_hf(config)


@pytest.mark.parametrize("change,message", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
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


def test_loading_into_a_model_of_another_shape_names_the_tensors(tmp_path):
    import dataclasses

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.conversion.weights import load_weights_into_model
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    model_cfg, _ = _write(tmp_path / "ckpt", tiny_hf_model("llama"))  # untied, 4 layers
    init_parallel_state(ParallelConfig())
    try:
        for change, message in [
            (dict(tie_word_embeddings=True), r"unexpected tensors \['output_layer.weight'\]"),
            (dict(num_layers=3), r"unexpected tensors \['decoder.layers.3"),
            (dict(num_layers=5), r"missing tensors \['decoder.layers.4"),
            (dict(add_qkv_bias=True), r"missing tensors \['decoder.layers.0.self_attention.linear_qkv.bias'"),
            (dict(ffn_hidden_size=128), r"'decoder.layers.0.mlp.linear_fc1.weight'.* shape"),
        ]:
            model = build_policy_model(dataclasses.replace(model_cfg, **change), ParallelConfig())
            with pytest.raises(ConversionError, match=message):
                load_weights_into_model(model, tmp_path / "ckpt", model_cfg.vocab_size)
    finally:
        destroy_parallel_state()


# ------------------------------------------------------------------------------------------------
# HF directories converted with convert_hf
# ------------------------------------------------------------------------------------------------
MODELS = {"qwen2": ("qwen2", False), "llama_tied": ("llama", True), "llama": ("llama", False)}


def _save_hf_dir(directory: Path, hf, max_shard_size="40KB") -> Path:
    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer

    hf.save_pretrained(directory, max_shard_size=max_shard_size)  # several shards
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF directory, converted checkpoint)."""
    from clipo_nemo.conversion.convert import convert_hf

    root = tmp_path_factory.mktemp("converted")
    dirs = {}
    for name, (kind, tied) in MODELS.items():
        hf_dir = _save_hf_dir(root / f"hf_{name}", tiny_hf_model(kind, tied))
        dirs[name] = (hf_dir, convert_hf(hf_dir, root / f"ckpt_{name}", log=None))
    return dirs


def test_converted_checkpoint_holds_description_tokenizer_and_exact_weights(converted):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from clipo_nemo.conversion.weights import model_config_of, tokenizer_dir

    for name, (hf_dir, ckpt) in converted.items():
        hf_state = {}
        for shard in hf_dir.glob("*.safetensors"):
            hf_state.update(load_file(shard))
        model = model_config_of(ckpt)
        assert model == model_config_from_hf(json_load(hf_dir / "config.json"))
        assert (ckpt / "hf_config.json").is_file() and (ckpt / "generation_config.json").is_file()
        assert len(AutoTokenizer.from_pretrained(str(tokenizer_dir(ckpt)))) == 32
        lazy = LazyWeights(ckpt)
        for group in tensor_groups(model):
            for hf_name, back in zip(group.hf_names, group.to_hf([lazy[n] for n in group.megatron_names])):
                assert torch.equal(back, hf_state[hf_name]), (name, hf_name)


def test_converted_checkpoint_exports_back_bit_identical(converted, tmp_path):
    """HF -> tools/convert_hf_to_megatron.py -> tools/export_to_hf.py gives the HF model back: every
    tensor bit-identical, the same architecture fields and generation config, the same tokenizer."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from clipo_nemo.conversion.hf_writer import export_to_hf

    for name, (hf_dir, ckpt) in converted.items():
        out = tmp_path / name
        if name == "qwen2":  # the tool once, in-process otherwise
            proc = subprocess.run([sys.executable, "tools/export_to_hf.py", str(ckpt), "--out", str(out)],
                                  cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            export_to_hf(ckpt, out)
        original, exported = ({k: v for shard in d.glob("*.safetensors") for k, v in load_file(shard).items()}
                              for d in (hf_dir, out))
        assert sorted(exported) == sorted(original), name
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), (name, key)
        written, source = json_load(out / "config.json"), json_load(hf_dir / "config.json")
        for key in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                    "max_position_embeddings", "bos_token_id", "eos_token_id"):
            assert written.get(key) == source.get(key), (name, key)
        assert json_load(out / "generation_config.json") == json_load(hf_dir / "generation_config.json")
        assert not (out / "clipo_head.json").exists()  # a converted checkpoint has no head
        text = "What is 3 + 4 ?"
        assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    assert json.loads((tmp_path / "qwen2" / "model.safetensors.index.json").read_text())["weight_map"]


def json_load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def _layout_logits(rank: int, world_size: int, layouts, ckpts, tokens):
    """Every layout in turn on the same ranks (DP fills the rest): logits of every checkpoint on the
    last PP stage's ranks, None elsewhere."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.conversion.verify import full_logits
    from clipo_nemo.conversion.weights import load_weights_into_model, model_config_of
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    results = {}
    try:
        for tp, pp in layouts:
            parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
            init_parallel_state(parallel)
            for name, ckpt in ckpts.items():
                model_cfg = model_config_of(ckpt)
                model = build_policy_model(model_cfg, parallel)
                load_weights_into_model(model, ckpt, model_cfg.vocab_size)
                results[(tp, pp, name)] = full_logits(model, tokens, model_cfg.vocab_size)
            parallel_state.destroy_model_parallel()
    finally:
        destroy_parallel_state()
    return results


def test_logits_match_transformers_at_every_layout(converted):
    """TP=1, TP=2, PP=2, TP=2 x PP=2 on 4 real gloo processes (DP makes up the rest of the world)."""
    from clipo_nemo.parallel.launcher import run_distributed

    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 100, (2, 200), generator=torch.Generator().manual_seed(3))
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2)]
    ckpts = {name: ckpt for name, (_, ckpt) in converted.items()}
    results = run_distributed(_layout_logits, 4, args=(layouts, ckpts, tokens), timeout_s=400)
    for name, (hf_dir, _) in converted.items():
        with torch.no_grad():
            reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)(tokens).logits
        for tp, pp in layouts:
            got = [r[(tp, pp, name)] for r in results if r[(tp, pp, name)] is not None]
            assert len(got) == 4 // pp, (tp, pp)  # every rank of the last stage (TP x DP)
            for logits in got:
                diff = (logits - reference).abs().max().item()
                assert diff < LOGIT_TOL, f"{name} at TP={tp} PP={pp}: max |logit diff| {diff}"


def test_llama3_rope_scaling_is_exercised(converted):
    """The comparison above would catch a missing Llama 3 RoPE scaling: without it logits move."""
    import dataclasses

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.conversion.verify import full_logits
    from clipo_nemo.conversion.weights import load_weights_into_model, model_config_of
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state

    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = converted["llama"]
    tokens = torch.randint(0, 100, (1, 200), generator=torch.Generator().manual_seed(3))
    init_parallel_state(ParallelConfig())
    try:
        unscaled = dataclasses.replace(model_config_of(ckpt), rope_scaling=False)
        model = build_policy_model(unscaled, ParallelConfig())
        load_weights_into_model(model, ckpt, unscaled.vocab_size)
        logits = full_logits(model, tokens, unscaled.vocab_size)
    finally:
        destroy_parallel_state()
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)(tokens).logits
    assert (logits - reference).abs().max().item() > 100 * LOGIT_TOL


def test_greedy_generation_matches_transformers_generate(converted):
    """Our rollout engine at temperature 0 against transformers generate(do_sample=False): 32 new
    tokens, prompts of different lengths decoded together (KV cache, megatron's static batching)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.conversion.weights import load_weights_into_model, model_config_of
    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.rollout.base import GenerationParams
    from clipo_nemo.rollout.megatron_engine import MegatronRolloutEngine

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 100, (length,), generator=gen).tolist() for length in (5, 9, 14, 3)]
    eos = 99  # an id the greedy decoding may or may not reach: both sides stop on it
    tokenizer = build_tiny_tokenizer()
    for name in ("qwen2", "llama_tied"):
        hf_dir, ckpt = converted[name]
        init_parallel_state(ParallelConfig())
        try:
            model_cfg = model_config_of(ckpt)
            model = build_policy_model(model_cfg, ParallelConfig())
            load_weights_into_model(model, ckpt, model_cfg.vocab_size)
            engine = MegatronRolloutEngine(model, tokenizer, vocab_size=model_cfg.vocab_size, eos_token_ids=[eos])
            out = engine.generate(prompts, GenerationParams(n=1, max_new_tokens=32, temperature=0.0), seeds=[0] * 4)
        finally:
            destroy_parallel_state()
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        config = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=eos, pad_token_id=eos)
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt):]
            assert out.response(row) == expected.tolist(), (name, row)
        assert max(int(n) for n in out.lengths) == 32
        assert len({tuple(out.response(r)) for r in range(4)}) == 4  # not a degenerate constant output


def test_tool_verify_prints_the_two_lines_and_catches_a_bad_conversion(converted, tmp_path):
    import subprocess
    import sys

    from clipo_nemo.conversion.verify import verify_conversion

    hf_dir, _ = converted["qwen2"]
    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_hf_to_megatron.py"
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}  # left by in-process tests
    run = subprocess.run([sys.executable, str(tool), "--hf", str(hf_dir), "--out", str(tmp_path / "ck"), "--tp", "2",
                          "--verify"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-2].startswith("max_abs_logit_diff: ") and float(lines[-2].split()[1]) < 1e-4
    assert lines[-1] == "greedy_match: 4/4"
    assert "layer 4/4 converted" in run.stdout
    # the same checkpoint with one MLP weight perturbed: verify must notice
    lazy = LazyWeights(tmp_path / "ck")
    bad = tmp_path / "bad"
    model = read_description(tmp_path / "ck")["model"]
    with WeightsWriter(bad, ModelConfig(**model), "Qwen2ForCausalLM", {}) as writer:
        for name in lazy:
            tensor = lazy[name]
            writer.add(name, tensor * 1.01 if name == "decoder.layers.2.mlp.linear_fc2.weight" else tensor)
        writer.add_tokenizer(hf_dir)
    result = verify_conversion(bad, hf_dir, log=None)
    assert result.max_abs_logit_diff > 1e-3 and not result.ok


def test_verify_fails_a_checkpoint_with_nan_weights(converted, tmp_path):
    """max(0.0, nan) is 0.0: the summary used to print max_abs_logit_diff 0 and pass a NaN model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from clipo_nemo.conversion.verify import verify_conversion

    hf_dir, ckpt = converted["qwen2"]
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    shard = broken / "weights" / LazyWeights(broken).weight_map[name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] = float("nan")  # past the converter's own check, as a disk or a later edit could
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result = verify_conversion(broken, hf_dir, log=None)
    assert math.isnan(result.max_abs_logit_diff) and not result.ok


def test_nan_max_keeps_a_nan_wherever_it_is():
    from clipo_nemo.algorithms.checks import nan_max

    assert max(0.0, float("nan")) == 0.0  # why it exists
    for values in ([float("nan"), 1.0], [1.0, float("nan")], [float("nan")]):
        assert math.isnan(nan_max(values))
    assert nan_max([0.5, 2.0], 1.0) == 2.0 and nan_max([], 3.0) == 3.0


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything is written
# ------------------------------------------------------------------------------------------------
def _hf_dir_with(directory: Path, config_change=None, state_change=None, kind="qwen2", tied=False) -> Path:
    """A single-file HF directory of a tiny model, with its config or tensors altered."""
    import json

    from safetensors.torch import save_file

    hf = tiny_hf_model(kind, tied)
    _save_hf_dir(directory, hf, max_shard_size="10MB")
    config = {**json_load(directory / "config.json"), **(config_change or {})}
    (directory / "config.json").write_text(json.dumps(config))
    if state_change:
        state = {k: v.contiguous() for k, v in _hf_state(hf).items()}
        state_change(state)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("case,message", [
    ("architecture", "architectures"),
    ("missing", "missing \\['model.layers.1.mlp.up_proj.weight'\\]"),
    ("extra", "unexpected \\['model.layers.0.self_attn.o_proj.bias'\\]"),
    ("shape", "'model.layers.3.self_attn.k_proj.weight' has shape \\(16, 64\\), config.json implies \\(32, 64\\)"),
    ("dtype", "model.norm.weight"),
    ("tokenizer", "tokenizer .* has 32 tokens, more than the model's vocab_size=20"),
    ("tp", "num_attention_heads=4 is not divisible by TP=3"),
    ("no_weights", "no model.safetensors"),
    ("nan", "model.safetensors: tensor 'model.layers.2.mlp.down_proj.weight' holds 1 non-finite value"),
    ("inf", "tensor 'model.norm.weight' holds 2 non-finite value"),
    ("truncated", "hf/model.safetensors: not a readable safetensors file .*truncated or corrupt"),
    ("bad_index", "model.safetensors.index.json: not a JSON index"),
    ("bad_tokenizer", "hf: the tokenizer cannot be loaded from \\[.*'tokenizer.json'.*\\].*truncated or corrupt"),
])
def test_bad_inputs_fail_before_anything_is_written(tmp_path, case, message):
    from clipo_nemo.conversion.convert import convert_hf

    changes = {
        "architecture": dict(config_change={"architectures": ["GPT2LMHeadModel"]}),
        "missing": dict(state_change=lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
        "extra": dict(state_change=lambda s: s.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})),
        "shape": dict(state_change=lambda s: s.update({"model.layers.3.self_attn.k_proj.weight": torch.zeros(16, 64)})),
        "dtype": dict(state_change=lambda s: s.update({"model.norm.weight": s["model.norm.weight"].bfloat16()})),
        "nan": dict(state_change=lambda s: s["model.layers.2.mlp.down_proj.weight"].view(-1)[7:8].fill_(float("nan"))),
        "inf": dict(state_change=lambda s: s["model.norm.weight"][:2].fill_(float("-inf"))),
        "tokenizer": dict(config_change={"vocab_size": 20}, state_change=lambda s: s.update(
            {k: s[k][:20].clone() for k in ("model.embed_tokens.weight", "lm_head.weight")})),
    }
    hf_dir = _hf_dir_with(tmp_path / "hf", **changes.get(case, {}))
    if case == "no_weights":
        for shard in hf_dir.glob("model*.safetensors*"):
            shard.unlink()
    if case == "truncated":
        data = (hf_dir / "model.safetensors").read_bytes()
        (hf_dir / "model.safetensors").write_bytes(data[:len(data) // 2])
    if case == "bad_index":
        (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    if case == "bad_tokenizer":
        data = (hf_dir / "tokenizer.json").read_bytes()
        (hf_dir / "tokenizer.json").write_bytes(data[:len(data) // 3])
    with pytest.raises(ConversionError, match=message):
        convert_hf(hf_dir, tmp_path / "out", tensor_parallel_size=3 if case == "tp" else 1, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_interrupted_conversion_leaves_no_output(tmp_path, monkeypatch):
    from clipo_nemo.conversion import hf_checkpoint
    from clipo_nemo.conversion.convert import convert_hf

    hf_dir = _save_hf_dir(tmp_path / "hf", tiny_hf_model("llama", tied=True))
    reads = []
    real_read = hf_checkpoint.HFCheckpoint.read

    def read_then_fail(self, names):
        reads.append(names)
        if len(reads) == 12:  # in layer 1
            raise KeyboardInterrupt
        return real_read(self, names)

    monkeypatch.setattr(hf_checkpoint.HFCheckpoint, "read", read_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(hf_dir, tmp_path / "out", log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    monkeypatch.setattr(hf_checkpoint.HFCheckpoint, "read", real_read)
    convert_hf(hf_dir, tmp_path / "out", log=None)  # a rerun then succeeds
    assert is_weights_checkpoint(tmp_path / "out")


def test_sigterm_mid_conversion_leaves_no_hidden_folder(tmp_path):
    """SIGTERM used to end the tool at once, leaving .tmp-<out> until the next conversion to that path."""
    import signal
    import subprocess
    import sys
    import textwrap

    hf_dir = _save_hf_dir(tmp_path / "hf", tiny_hf_model("qwen2"))
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(root / "tools")!r})
        from clipo_nemo.conversion import hf_checkpoint
        real_read, calls = hf_checkpoint.HFCheckpoint.read, []
        def read_slowly(self, names):  # holds the conversion in layer 1 until the signal comes
            calls.append(names)
            if len(calls) == 6:
                print("mid-conversion", flush=True)
                time.sleep(120)
            return real_read(self, names)
        hf_checkpoint.HFCheckpoint.read = read_slowly
        import convert_hf_to_megatron
        sys.exit(convert_hf_to_megatron.main(["--hf", {str(hf_dir)!r}, "--out", {str(tmp_path / "out")!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        lines = []
        while not lines or lines[-1].strip() != "mid-conversion":
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        assert (tmp_path / ".tmp-out").is_dir()  # the conversion is under way
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_tied_model_storing_a_copy_of_the_embedding_as_lm_head(tmp_path):
    """Some tied checkpoints also store lm_head.weight: accepted as an exact copy, refused otherwise."""
    from clipo_nemo.conversion.convert import convert_hf

    copy = lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()})  # noqa: E731
    hf_dir = _hf_dir_with(tmp_path / "hf", state_change=copy, kind="llama", tied=True)
    convert_hf(hf_dir, tmp_path / "out", log=None)
    assert "output_layer.weight" not in LazyWeights(tmp_path / "out").weight_map
    other = lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1})  # noqa: E731
    hf_dir = _hf_dir_with(tmp_path / "hf2", state_change=other, kind="llama", tied=True)
    with pytest.raises(ConversionError, match="stored 'lm_head.weight' differs"):
        convert_hf(hf_dir, tmp_path / "out2", log=None)
    assert not (tmp_path / "out2").exists()
