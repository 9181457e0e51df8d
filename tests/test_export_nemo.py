"""Export to Hugging Face and NeMo import, on tiny models built offline.

Oracles: the original Hugging Face safetensors (export must give them back bit for bit),
``transformers`` logits of the exported directory against our megatron model's logits, the head
weights the trainer checkpoint was saved from, and the HF-path conversion of the same weights (a
NeMo checkpoint written by megatron's own ``dist_checkpointing.save`` from a GPTModel at TP=2 x PP=2 must
convert to exactly those tensors).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipo_nemo.conversion.mapping import ConversionError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
GENERATION = {"bos_token_id": 1, "eos_token_id": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}


# ------------------------------------------------------------------------------------------------
# Inputs built here: tiny HF models, their conversion, trainer and NeMo checkpoints written at TP=2 x PP=2
# ------------------------------------------------------------------------------------------------
def _tiny_hf(directory: Path, architecture: str, seed: int) -> Path:
    """A random tiny HF model (every tensor perturbed, biases too), tiny tokenizer, generation config."""
    import transformers

    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=1)
    if architecture == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=5e5, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192})
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).float()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.generation_config = transformers.GenerationConfig(**GENERATION)
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def _hf_tensors(directory: Path) -> dict:
    tensors = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def _run_config(ckpt: Path, run_dir: Path):
    """The tiny trainer config for a run started from the converted checkpoint ``ckpt`` at TP=2 x PP=2."""
    from clipo_nemo.config import load_config
    from clipo_nemo.trainer.loop import use_converted_checkpoint

    cfg = load_config(ROOT / "examples" / "conf" / "tiny.yaml", [
        f"trainer.init_from={ckpt}", f"trainer.output_dir={run_dir}", "parallel.tensor_parallel_size=2",
        "parallel.pipeline_parallel_size=2",        "contrastive.head.tp_mode=column", "contrastive.head.dim=8"])
    cfg.trainer.tokenizer = ""  # the checkpoint's tokenizer
    for field in ("vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings", "num_layers",
                  "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
        setattr(cfg.model, field, getattr(type(cfg.model)(), field))  # back to defaults: the checkpoint fills them
    use_converted_checkpoint(cfg)
    return cfg


def _save_at_tp2_pp2(rank, world_size, jobs):
    """For each job: build the actor at TP=2 x PP=2, load the converted weights, save a trainer checkpoint
    (with the run's config.yaml) and the GPTModel's NeMo-style dist checkpoints."""
    from megatron.core import dist_checkpointing
    from omegaconf import OmegaConf

    from clipo_nemo.conversion.weights import load_weights_into_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.checkpoint.save import save_checkpoint
    from clipo_nemo.trainer.step import ClipoHead

    heads = []
    init_parallel_state(jobs[0]["cfg"].parallel)
    try:
        for job in jobs:
            cfg = job["cfg"]
            actor, clipo = Actor.build(cfg), ClipoHead.build(cfg)
            load_weights_into_model(actor.module, job["ckpt"], cfg.model.vocab_size)
            actor.sync_reference()
            save_checkpoint(job["run_dir"], 0, actor, clipo, {"step": 0}, keep_last=1)
            if rank == 0:
                OmegaConf.save(OmegaConf.structured(cfg), Path(job["run_dir"]) / "config.yaml")
            heads.append(clipo.head.full_state_dict())
            for prefix, directory in job["nemo_weights"].items():
                Path(directory).mkdir(parents=True, exist_ok=True)
                dist_checkpointing.save(actor.module.sharded_state_dict(prefix=prefix), directory)
        return heads
    finally:
        destroy_parallel_state()


def _write_nemo2(root: Path, model, hf_dir: Path) -> None:
    """NeMo 2 context: model.yaml as nemo.lightning's io_dump writes it (every config field) and the
    tokenizer under context/nemo_tokenizer."""
    from transformers import AutoTokenizer

    config = {
        "_target_": "nemo.collections.llm.gpt.model.qwen2.Qwen2Config",
        "num_layers": model.num_layers, "hidden_size": model.hidden_size, "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads, "num_query_groups": model.num_query_groups,
        "kv_channels": None, "seq_length": model.max_position_embeddings, "vocab_size": model.vocab_size,
        "make_vocab_size_divisible_by": 128, "normalization": "RMSNorm", "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "position_embedding_type": "rope", "rotary_percent": 1.0, "rotary_base": model.rotary_base,
        "layernorm_epsilon": model.norm_epsilon, "add_bias_linear": False, "add_qkv_bias": True,
        "share_embeddings_and_output_weights": False, "qk_layernorm": False, "num_moe_experts": None,
        "init_method_std": 0.02, "hidden_dropout": 0.0, "attention_dropout": 0.0, "bf16": False, "fp16": False,
        "params_dtype": {"_target_": "torch.float32", "_call_": False}, "seq_len_interpolation_factor": None,
    }
    document = {"_target_": "nemo.collections.llm.gpt.model.qwen2.Qwen2Model", "config": config,
                "model_transform": None, "optim": None,
                "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                              "pretrained_model_name": str(hf_dir)}}
    (root / "context").mkdir(parents=True, exist_ok=True)
    (root / "context" / "model.yaml").write_text(yaml.safe_dump(document))
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(root / "context" / "nemo_tokenizer"))


def _nemo1_config(model, hf_dir: Path) -> dict:
    """model_config.yaml of a NeMo 1 megatron_gpt Llama 3.1 model (as NeMo's HF converters write it)."""
    return {
        "mcore_gpt": True, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
        "encoder_seq_length": model.max_position_embeddings, "max_position_embeddings": model.max_position_embeddings,
        "num_layers": model.num_layers, "hidden_size": model.hidden_size, "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads, "num_query_groups": model.num_query_groups,
        "kv_channels": None, "init_method_std": 0.02, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "normalization": "rmsnorm", "layernorm_epsilon": model.norm_epsilon, "make_vocab_size_divisible_by": 128,
        "bias": False, "activation": "fast-swiglu", "position_embedding_type": "rope", "rotary_percentage": 1.0,
        "rotary_base": model.rotary_base, "scale_positional_embedding": True,
        "share_embeddings_and_output_weights": True, "override_vocab_size": model.vocab_size, "precision": 32,
        "transformer_engine": True, "megatron_amp_O2": False,
        "tokenizer": {"library": "huggingface", "type": str(hf_dir), "model": None, "vocab_file": None,
                      "merge_file": None, "use_fast": True},
    }


def _tar(source_dir: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:") as tar:
        for path in sorted(source_dir.rglob("*")):
            tar.add(path, arcname=f"./{path.relative_to(source_dir)}", recursive=False)
    return archive


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two tiny HF models (Qwen2 untied; Llama 3.1 tied, RoPE scaling), their HF-path conversions,
    trainer checkpoints saved at TP=2 x PP=2, a NeMo 2 directory (Qwen2) and a NeMo 1 .nemo (Llama)."""
    from clipo_nemo.conversion.convert import convert_hf
    from clipo_nemo.conversion.weights import model_config_of
    from clipo_nemo.parallel.launcher import run_distributed

    root = tmp_path_factory.mktemp("built")
    out = {"root": root}
    jobs = []
    for name, seed in (("qwen2", 0), ("llama", 1)):
        hf = _tiny_hf(root / f"hf_{name}", name, seed)
        ckpt = convert_hf(hf, root / f"ckpt_{name}", log=None)
        cfg = _run_config(ckpt, root / f"run_{name}")
        prefix, nemo_weights = ("module.", root / "nemo2" / "weights") if name == "qwen2" else \
            ("model.", root / "nemo1" / "model_weights")
        jobs.append({"cfg": cfg, "ckpt": str(ckpt), "run_dir": str(root / f"run_{name}"),
                     "nemo_weights": {prefix: str(nemo_weights)}})
        out[name] = {"hf": hf, "ckpt": ckpt, "cfg": cfg, "run": root / f"run_{name}"}
    heads = run_distributed(_save_at_tp2_pp2, 4, args=(jobs,), timeout_s=TIMEOUT_S)[0]
    out["qwen2"]["head"], out["llama"]["head"] = heads
    _write_nemo2(root / "nemo2", model_config_of(out["qwen2"]["ckpt"]), out["qwen2"]["hf"])
    nemo1_config = _nemo1_config(model_config_of(out["llama"]["ckpt"]), out["llama"]["hf"])
    (root / "nemo1" / "model_config.yaml").write_text(yaml.safe_dump(nemo1_config))
    out["nemo1"] = _tar(root / "nemo1", root / "llama.nemo")
    return out


# ------------------------------------------------------------------------------------------------
# (a) HF -> converted -> actor at TP=2 x PP=2 -> trainer checkpoint -> export: the original tensors back
# ------------------------------------------------------------------------------------------------
def _export_tool(*args):
    return subprocess.run([sys.executable, "tools/export_to_hf.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_export_gives_back_the_original_hf_weights_config_tokenizer_and_head(built, tmp_path, name):
    import transformers

    from clipo_nemo.conversion.hf_writer import export_to_hf, load_head_file

    src = built[name]
    out = tmp_path / "hf"
    if name == "qwen2":  # the tool once; in-process otherwise (saves an interpreter start)
        proc = _export_tool(src["run"], "--out", out, "--shard-size", "40KB")
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        export_to_hf(src["run"], out, shard_size_bytes=40_000)
    original, exported = _hf_tensors(src["hf"]), _hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded at 40 KB
    assert set(index["weight_map"]) == set(original)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[name]
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original.get(key, original.get("model.embed_tokens.weight"))), key
    written, source = json.loads((out / "config.json").read_text()), json.loads((src["hf"] / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert written[key] == source[key], key
    assert loaded.config.rope_parameters["rope_theta"] == src["cfg"].model.rotary_base
    if name == "llama":
        assert loaded.config.rope_parameters["rope_type"] == "llama3" and loaded.config.rope_parameters["factor"] == 8.0
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((src["hf"] / "generation_config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("What is 3 + 4 ?")["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(src["hf"])("What is 3 + 4 ?")["input_ids"]
    description, state = load_head_file(out)
    assert description["type"] == "linear" and description["dim"] == 8 and description["hidden_size"] == 32
    assert state.keys() == src["head"].keys() and all(torch.equal(state[k], src["head"][k]) for k in state)


# ------------------------------------------------------------------------------------------------
# (b) a tiny policy trained a few steps: transformers logits equal ours; the head loads back
# ------------------------------------------------------------------------------------------------
def _our_logits_and_head(rank, world_size, run_dir, tokens):
    from clipo_nemo.config import load_config
    from clipo_nemo.conversion.verify import full_logits
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.checkpoint.load import load_checkpoint
    from clipo_nemo.trainer.step import ClipoHead

    cfg = load_config(Path(run_dir) / "config.yaml")
    init_parallel_state(cfg.parallel)
    try:
        actor, clipo = Actor.build(cfg), ClipoHead.build(cfg)
        load_checkpoint(run_dir, actor, clipo)
        actor.module.eval()
        return full_logits(actor.module, tokens, cfg.model.vocab_size), clipo.head.full_state_dict(), cfg
    finally:
        destroy_parallel_state()


def test_trained_policy_exported_gives_our_logits_in_transformers_and_its_head_loads_back(tmp_path):
    import os

    import transformers

    from clipo_nemo.algorithms.head import ContrastiveHead
    from clipo_nemo.conversion.hf_writer import export_to_hf, load_head_file
    from clipo_nemo.parallel.launcher import run_distributed

    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={run}",
         "trainer.max_steps=2", "trainer.prompts_per_step=8", "rollout.n=4", "evaluation.every_steps=0",
         "parallel.micro_batch_size=8", "contrastive.warmup_steps=0", "actor.lr=0.05", "trainer.plot_embeddings=false"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    out = tmp_path / "hf"
    export_to_hf(run, out)
    tokens = torch.randint(0, 32, (3, 12), generator=torch.Generator().manual_seed(0))
    ours, head, cfg = run_distributed(_our_logits_and_head, 1, args=(str(run), tokens), timeout_s=TIMEOUT_S)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert theirs.shape == ours.shape == (3, 12, cfg.model.vocab_size)
    assert (theirs - ours).abs().max() < 1e-4
    assert json.loads((run / "checkpoints" / "step_2" / "meta.json").read_text())["step"] == 2  # trained 2 steps
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # no original HF config: ids from the tokenizer
    assert hf.config.eos_token_id == tokenizer.eos_token_id == hf.generation_config.eos_token_id is not None
    assert hf.config.pad_token_id == tokenizer.pad_token_id is not None
    description, state = load_head_file(out)
    restored = ContrastiveHead(description["hidden_size"], description["dim"], description["type"])
    restored.load_state_dict(state)
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, head[name]), name


# ------------------------------------------------------------------------------------------------
# (c) NeMo 2 and NeMo 1 inputs convert to exactly the HF path's weights
# ------------------------------------------------------------------------------------------------
def _assert_same_checkpoint(converted: Path, reference: Path) -> None:
    from clipo_nemo.conversion.weights import LazyWeights, model_config_of, read_description

    ours, theirs = LazyWeights(converted), LazyWeights(reference)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    a, b = model_config_of(converted), model_config_of(reference)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "vocab_size", "max_position_embeddings", "rotary_base", "rope_scaling", "rope_scaling_factor",
                  "add_qkv_bias", "tie_word_embeddings", "norm_epsilon", "params_dtype"):
        assert getattr(a, field) == getattr(b, field), field
    assert read_description(converted)["architecture"] == read_description(reference)["architecture"]


def test_nemo2_directory_converts_to_the_hf_path_weights(built, tmp_path):
    from clipo_nemo.conversion.nemo import convert_nemo
    from clipo_nemo.conversion.weights import tokenizer_dir

    out = convert_nemo(built["root"] / "nemo2", tmp_path / "from_nemo2", log=None)
    _assert_same_checkpoint(out, built["qwen2"]["ckpt"])
    # NeMo -> HF through the two tools: the converted checkpoint exports to the original HF tensors.
    proc = _export_tool(out, "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, exported = _hf_tensors(built["qwen2"]["hf"]), _hf_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(original) and all(torch.equal(exported[k], t) for k, t in original.items())
    nemo_tokenizer = built["root"] / "nemo2" / "context" / "nemo_tokenizer"
    assert (tokenizer_dir(out) / "tokenizer.json").read_text() == (nemo_tokenizer / "tokenizer.json").read_text()


def test_nemo1_archive_converts_to_the_hf_path_weights_with_the_converter_tool(built, tmp_path):
    out = tmp_path / "from_nemo1"
    proc = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--nemo", str(built["nemo1"]),
                           "--out", str(out), "--tp", "2"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_checkpoint(out, built["llama"]["ckpt"])
    assert not list(built["root"].glob(".nemo-extract-*"))  # the extracted archive is gone


# ------------------------------------------------------------------------------------------------
# (d) bad inputs: clear errors, nothing written
# ------------------------------------------------------------------------------------------------
def test_export_refuses_bad_inputs_before_writing(built, tmp_path):
    from clipo_nemo.conversion.hf_writer import export_to_hf, load_head_file

    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="neither a trainer run directory"):
        export_to_hf(tmp_path, out)
    with pytest.raises(ConversionError, match="add_qkv_bias=True cannot be written as LlamaForCausalLM"):
        export_to_hf(built["qwen2"]["run"], out, architecture="LlamaForCausalLM")
    with pytest.raises(ConversionError, match="already exists"):
        export_to_hf(built["qwen2"]["run"], built["qwen2"]["hf"])
    # A run whose config.yaml contradicts its checkpoint (3 layers described, 2 stored).
    bad_run = tmp_path / "bad_run"
    (bad_run / "checkpoints").mkdir(parents=True)
    (bad_run / "checkpoints" / "step_0").symlink_to(built["qwen2"]["run"] / "checkpoints" / "step_0")
    (bad_run / "checkpoints" / "latest").write_text("step_0")
    config = yaml.safe_load((built["qwen2"]["run"] / "config.yaml").read_text())
    config["model"]["num_layers"] = 3
    (bad_run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConversionError, match=r"no tensor for 'decoder\.layers\.2\."):
        export_to_hf(bad_run, out)
    config["model"]["num_layers"], config["model"]["ffn_hidden_size"] = 2, 48
    (bad_run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConversionError, match=r"linear_fc1.weight' is stored with shape \(128, 32\).*\(96, 32\)"):
        export_to_hf(bad_run, out)
    assert not out.exists() and not (tmp_path / ".tmp-out").exists()
    with pytest.raises(ConversionError, match="no clipo_head.json"):
        load_head_file(built["qwen2"]["hf"])
    proc = _export_tool(tmp_path / "missing", "--out", out)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def _damaged_copy(run: Path, target: Path, damage) -> Path:
    """A copy of ``run`` whose step_0 checkpoint has ``damage(checkpoint)`` done to it."""
    import shutil

    shutil.copytree(run, target, symlinks=True)
    damage(target / "checkpoints" / "step_0")
    return target


def _flip_a_byte_of_a_shard(checkpoint: Path) -> None:
    shard = max((checkpoint / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _truncate_a_shard_without_manifest(checkpoint: Path) -> None:
    (checkpoint / "manifest.json").unlink()  # a checkpoint from before manifests: checked for completeness only
    shard = max((checkpoint / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])


@pytest.mark.parametrize("damage, message", [
    (_flip_a_byte_of_a_shard, r"dist/.*\.distcp does not match its checksum"),
    (_truncate_a_shard_without_manifest, r"dist/.*\.distcp has \d+ bytes, its index needs \d+ \(truncated"),
])
def test_export_verifies_the_checkpoint_as_every_reader_does(built, tmp_path, damage, message):
    """init_from and evaluate.py refused these checkpoints; export wrote the damaged weights (a flipped
    byte) or stopped with a bare EOFError (a truncated shard)."""
    from clipo_nemo.conversion.hf_writer import export_to_hf

    run = _damaged_copy(built["qwen2"]["run"], tmp_path / "run", damage)
    with pytest.raises(ConversionError, match=message):
        export_to_hf(run / "checkpoints" / "step_0", tmp_path / "out")
    with pytest.raises(ConversionError, match="none can be resumed from"):  # the run: its only checkpoint is bad
        export_to_hf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    proc = _export_tool(run / "checkpoints" / "step_0", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "cannot be exported" in proc.stderr, proc.stderr[-2000:]


def test_nemo_import_refuses_bad_inputs_before_writing(built, tmp_path):
    import shutil

    from clipo_nemo.conversion.nemo import convert_nemo

    out = tmp_path / "out"
    nemo2 = tmp_path / "nemo2"
    shutil.copytree(built["root"] / "nemo2", nemo2)
    model_yaml = nemo2 / "context" / "model.yaml"
    document = yaml.safe_load(model_yaml.read_text())

    def convert_with(**changes):
        model_yaml.write_text(yaml.safe_dump({**document, "config": {**document["config"], **changes}}))
        return convert_nemo(nemo2, out, log=None)

    with pytest.raises(ConversionError, match="normalization='LayerNorm' is not supported"):
        convert_with(normalization="LayerNorm")
    with pytest.raises(ConversionError, match="qk_layernorm=True is not supported"):
        convert_with(qk_layernorm=True)
    with pytest.raises(ConversionError, match="checkpoint has 2 layers, the model description 1"):
        convert_with(num_layers=1)
    with pytest.raises(ConversionError, match="tokenizer .* has 32 tokens, more than the model's vocab_size=16"):
        convert_with(vocab_size=16)
    with pytest.raises(ConversionError, match="add_qkv_bias=False does not fit Qwen2ForCausalLM"):
        convert_with(add_qkv_bias=False)
    with pytest.raises(ConversionError, match="not a Qwen2 or Llama GPT config"):
        convert_with(_target_="nemo.collections.llm.gpt.model.mistral.MistralConfig7B")
    with pytest.raises(ConversionError, match="TP=3"):
        convert_nemo(built["root"] / "nemo2", out, tensor_parallel_size=3, log=None)
    garbage = tmp_path / "garbage.nemo"
    garbage.write_bytes(b"not a tar archive")
    with pytest.raises(ConversionError, match="cannot read the .nemo archive"):
        convert_nemo(garbage, out, log=None)
    empty = _tar(tmp_path / "nemo2" / "context", tmp_path / "empty.nemo")
    with pytest.raises(ConversionError, match="has no model_config.yaml"):
        convert_nemo(empty, out, log=None)
    with pytest.raises(ConversionError, match="neither a NeMo 2 checkpoint directory"):
        convert_nemo(tmp_path, out, log=None)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".nemo-extract-*"))


def test_reader_reads_swiglu_halves_local_norm_names_per_layer_keys_and_cuts_vocab_padding(tmp_path):
    """Storage variants megatron writes besides our trainer's: fc1 as ``_w``/``_v`` halves
    (``singleton_local_shards``), local-spec norm names, unstacked per-layer keys, padded vocabulary."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from clipo_nemo.conversion.dist_reader import DistCheckpointReader, single_process_group
    from clipo_nemo.parallel.cpu import apply_cpu_patches

    gen = torch.Generator().manual_seed(0)
    gate, up, norm = (torch.randn(3, *shape, generator=gen) for shape in ((4, 2), (4, 2), (2,)))
    fc2_layer1, embedding = torch.randn(2, 4, generator=gen), torch.randn(8, 2, generator=gen)
    stored = {"p.decoder.layers.mlp.linear_fc1.weight_w": gate, "p.decoder.layers.mlp.linear_fc1.weight_v": up,
              "p.decoder.layers.input_layernorm.weight": norm, "p.decoder.layers.1.mlp.linear_fc2.weight": fc2_layer1,
              "p.embedding.word_embeddings.weight": embedding}
    apply_cpu_patches()
    with single_process_group():
        dist_checkpointing.save({k: ShardedTensor.from_rank_offsets(k, v, replica_id=0) for k, v in stored.items()},
                                str(tmp_path))
        reader = DistCheckpointReader(tmp_path, "p.", vocab_size=5)
        got = reader.read(["decoder.layers.2.mlp.linear_fc1.weight",
                           "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight",
                           "decoder.layers.1.mlp.linear_fc2.weight", "embedding.word_embeddings.weight"])
    assert torch.equal(got["decoder.layers.2.mlp.linear_fc1.weight"], torch.cat([gate[2], up[2]]))
    assert torch.equal(got["decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"], norm[2])
    assert torch.equal(got["decoder.layers.1.mlp.linear_fc2.weight"], fc2_layer1)
    assert torch.equal(got["embedding.word_embeddings.weight"], embedding[:5])
    assert reader.num_stacked_layers == 3 and not reader.has("decoder.layers.3.mlp.linear_fc1.weight")
    assert reader.unused_keys(["decoder.layers.0.mlp.linear_fc1.weight"]) == [
        "p.decoder.layers.1.mlp.linear_fc2.weight", "p.decoder.layers.input_layernorm.weight",
        "p.embedding.word_embeddings.weight"]
