"""Starting a run from converted weights, and the guard that makes loaded weights survive the optimizer.

The guard tests drive megatron's own mixed-precision optimizer classes on CPU: their constructors
insist on CUDA tensors, so the objects are assembled here with exactly the attributes megatron's
constructors set (bf16 model parameters, fp32 main copies made *before* the load), and megatron's own
``reload_model_params`` / ``_copy_main_params_to_model_params`` run on them.
"""
import pytest
import torch

from clipo_nemo.checkpoint.load_guard import (
    StaleOptimizerError, check_optimizer_matches_model, sync_optimizer_with_model)


def _bf16_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.Linear(8, 3)).to(torch.bfloat16)


def _load(model: torch.nn.Module, seed: int) -> dict:
    """Overwrite every weight in place (what a checkpoint load does); returns the loaded values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _float16_optimizer(model):
    """megatron's Float16OptimizerWithFloat16Params as its constructor leaves it (minus the CUDA checks)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    opt = object.__new__(Float16OptimizerWithFloat16Params)
    params = list(model.parameters())
    mains = [p.detach().clone().float() for p in params]
    opt.optimizer = torch.optim.SGD(mains, lr=0.0)
    opt.is_stub_optimizer, opt._dummy_overflow_buf = False, None
    opt.float16_groups, opt.fp32_from_float16_groups, opt.fp32_from_fp32_groups = [params], [mains], [[]]
    return opt


def _distributed_optimizer(model, rank: int, dp_size: int):
    """megatron's DistributedOptimizer for DP rank ``rank`` of ``dp_size``: fp32 main copies of this
    rank's contiguous share of each flat parameter (megatron's ``Range`` objects)."""
    from types import SimpleNamespace

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range

    opt = object.__new__(DistributedOptimizer)
    params, shards, ranges = list(model.parameters()), [], {}
    for p in params:
        per_rank = -(-p.numel() // dp_size)
        span = Range(min(rank * per_rank, p.numel()), min((rank + 1) * per_rank, p.numel()))
        ranges[p] = {"param": span}
        shards.append(p.detach().view(-1)[span.start:span.end].clone().float())
    opt.optimizer = torch.optim.SGD(shards, lr=0.0)
    opt.is_stub_optimizer = False
    opt.config = SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
    opt.ddp_config = SimpleNamespace(use_megatron_fsdp=False)
    opt.model_param_gbuf_map = {p: (0, p.dtype, 0) for p in params}
    opt.gbuf_ranges = [{params[0].dtype: [{"param_map": ranges}]}]
    opt.model_float16_groups, opt.shard_fp32_from_float16_groups = [params], [shards]
    opt.model_fp32_groups, opt.shard_fp32_groups, opt.shard_float16_groups = [[]], [[]], [[]]
    return opt


def test_guard_fires_on_megatron_main_copies_made_before_the_load_and_reload_fixes_them():
    model = _bf16_model(0)
    opt = _float16_optimizer(model)
    assert check_optimizer_matches_model(opt, model) == 3  # fresh: the main copies are the model's
    loaded = _load(model, seed=1)
    with pytest.raises(StaleOptimizerError, match=r"0\.weight: the optimizer's copy differs from the model's weights"):
        check_optimizer_matches_model(opt, model)
    # Without the guard, megatron's write-back after a step restores the pre-load weights:
    stale = _bf16_model(0)
    stale_opt = _float16_optimizer(stale)
    _load(stale, seed=1)
    stale_opt._copy_main_params_to_model_params()
    assert torch.equal(stale[0].weight, _bf16_model(0)[0].weight)

    report = sync_optimizer_with_model(opt, model)  # megatron's reload_model_params, then the check
    assert report.reloaded and report.tensors_checked == 3
    opt._copy_main_params_to_model_params()  # what a (zero-lr) step writes back
    assert all(torch.equal(p, loaded[name]) for name, p in model.named_parameters())


def test_guard_fails_when_reload_does_not_refresh_the_copy(monkeypatch):
    model = _bf16_model(0)
    opt = _float16_optimizer(model)
    _load(model, seed=1)
    monkeypatch.setattr(opt, "reload_model_params", lambda state_dict=None: None)
    with pytest.raises(StaleOptimizerError, match="first step would overwrite the loaded weights: 0.weight"):
        sync_optimizer_with_model(opt, model)


def test_guard_keeps_main_copies_that_already_agree():
    """A resume restores fp32 main copies finer than bf16: they agree with the model after the cast
    and must not be replaced by the bf16 values."""
    model = _bf16_model(0)
    opt = _float16_optimizer(model)
    with torch.no_grad():
        opt.fp32_from_float16_groups[0][0].mul_(1 + 2 ** -12)  # well below bf16's 2**-8 relative step
    finer = opt.fp32_from_float16_groups[0][0].clone()
    assert not torch.equal(finer, model[0].weight.float())
    assert torch.equal(finer.to(torch.bfloat16), model[0].weight)
    report = sync_optimizer_with_model(opt, model)
    assert not report.reloaded and torch.equal(opt.fp32_from_float16_groups[0][0], finer)


@pytest.mark.parametrize("rank", [0, 1])
def test_guard_reads_the_distributed_optimizers_shards(rank):
    model = _bf16_model(0)
    opt = _distributed_optimizer(model, rank, dp_size=2)
    assert check_optimizer_matches_model(opt, model) == 3
    # A change outside this rank's shard is not this rank's copy; inside it is stale.
    other = 1 - rank
    with torch.no_grad():
        model[0].weight.view(-1)[other * 24] += 1.0
    check_optimizer_matches_model(opt, model)
    with torch.no_grad():
        model[0].weight.view(-1)[rank * 24] += 1.0
    with pytest.raises(StaleOptimizerError, match=rf"0\.weight \(elements {rank * 24}\.\.{rank * 24 + 24} of the flat"):
        check_optimizer_matches_model(opt, model)
    _load(model, seed=3)
    assert sync_optimizer_with_model(opt, model).reloaded  # megatron's shard-aware reload
    span = opt._get_model_param_range_map(model[1].weight)["param"]
    assert torch.equal(opt.shard_fp32_from_float16_groups[0][1], model[1].weight.view(-1)[span.start:span.end].float())


def test_guard_on_torch_optim_needs_the_models_own_parameters():
    model = _bf16_model(0).float()
    check_optimizer_matches_model(torch.optim.AdamW(model.parameters()), model)
    built_before = _bf16_model(0).float()  # e.g. the optimizer was built over a model later replaced
    opt = torch.optim.AdamW(built_before.parameters())
    check_optimizer_matches_model(opt, model)  # equal copies pass ...
    _load(model, seed=2)
    with pytest.raises(StaleOptimizerError, match="0.weight"):  # ... stale ones do not
        check_optimizer_matches_model(opt, model)
    with pytest.raises(StaleOptimizerError, match="cannot be matched"):
        check_optimizer_matches_model(torch.optim.AdamW(list(built_before.parameters())[:2]), model)


@pytest.mark.parametrize("optimizer", ["torch", "float16"])
def test_non_finite_loaded_weights_are_named_not_called_stale(optimizer):
    """NaN != NaN made a NaN weight read as a stale optimizer copy 'by up to nan' (issue 24 point 11)."""
    from clipo_nemo.checkpoint.load_guard import NonFiniteWeightsError

    model = _bf16_model(0)
    opt = _float16_optimizer(model) if optimizer == "float16" else torch.optim.SGD(model.parameters(), lr=0.1)
    _load(model, seed=1)
    with torch.no_grad():
        model[1].weight[2, 5] = float("nan")
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"1.weight holds 2 non-finite value\(s\) \(NaN or inf\) of 24"):
        sync_optimizer_with_model(opt, model)


# --------------------------------------------------------------------------------------------------
# The model description: config keys filled from a converted checkpoint, contradictions refused
# --------------------------------------------------------------------------------------------------
def _description(**changes):
    import dataclasses

    from clipo_nemo.config import ModelConfig

    described = ModelConfig(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                            num_query_groups=4, vocab_size=152064, max_position_embeddings=32768,
                            rotary_base=1000000.0, add_qkv_bias=True, params_dtype="bfloat16")
    return dataclasses.asdict(dataclasses.replace(described, **changes))


def test_defaults_are_filled_from_the_checkpoint_and_run_choices_stay_the_users():
    from clipo_nemo.config import ClipoConfig, apply_checkpoint_model

    cfg = ClipoConfig()
    cfg.model.max_position_embeddings, cfg.model.recompute = 8192, "full"  # run choices
    cfg.model.num_layers = 28  # repeats the checkpoint: fine
    cfg.model.kv_channels = 128  # = 3584 / 28, the head size the checkpoint implies
    filled = apply_checkpoint_model(cfg, _description(), "/ckpt", "/ckpt/tokenizer")
    assert (cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_attention_heads) == (3584, 18944, 28)
    assert (cfg.model.num_query_groups, cfg.model.vocab_size, cfg.model.rotary_base) == (4, 152064, 1e6)
    assert cfg.model.add_qkv_bias and cfg.model.params_dtype == "float32"  # a run choice, default included
    assert (cfg.model.max_position_embeddings, cfg.model.recompute, cfg.model.kv_channels) == (8192, "full", 128)
    assert cfg.trainer.tokenizer == "/ckpt/tokenizer"
    assert "model.hidden_size=3584" in filled and "trainer.tokenizer=/ckpt/tokenizer" in filled
    assert not any(key.startswith(("model.num_layers", "model.max_position")) for key in filled)

    cfg = ClipoConfig()
    cfg.trainer.tokenizer, cfg.model.params_dtype, cfg.model.rope_scaling_factor = "/mine", "bfloat16", 4.0
    apply_checkpoint_model(cfg, _description(params_dtype="float32"), "/ckpt", "/ckpt/tokenizer")
    # the factor is unused without RoPE scaling in the checkpoint, so it is not a contradiction
    assert (cfg.trainer.tokenizer, cfg.model.params_dtype, cfg.model.rope_scaling_factor) == ("/mine", "bfloat16", 4.0)


@pytest.mark.parametrize("key, value, theirs", [
    ("hidden_size", 4096, 3584), ("num_query_groups", 8, 4), ("kv_channels", 64, r"None \(head size 128\)"),
    ("vocab_size", 151936, 152064), ("add_qkv_bias", True, False), ("norm_epsilon", 1e-5, 1e-6),
    ("tie_word_embeddings", True, False), ("rope_scaling", True, False),
])
def test_a_config_that_contradicts_the_checkpoints_architecture_is_refused(key, value, theirs):
    from clipo_nemo.config import ClipoConfig, ConfigError, apply_checkpoint_model

    cfg = ClipoConfig()
    setattr(cfg.model, key, value)
    with pytest.raises(ConfigError, match=rf"model\.{key}={value} contradicts the checkpoint's {key}={theirs}"):
        apply_checkpoint_model(cfg, _description(add_qkv_bias=False), "/ckpt")


@pytest.mark.parametrize("track, shape", [
    ("track1", dict(num_layers=36, hidden_size=2048, ffn_hidden_size=11008, num_attention_heads=16, num_query_groups=2,
                    vocab_size=151936, tie_word_embeddings=True)),  # Qwen2.5-3B-Instruct's config.json
    ("track2", {}),  # Qwen2.5-7B-Instruct's
])
def test_the_track_configs_start_from_their_converted_model_with_nothing_else_given(track, shape):
    from pathlib import Path

    from clipo_nemo.config import apply_checkpoint_model, load_config

    conf = Path(__file__).resolve().parents[1] / "examples" / "conf" / f"{track}.yaml"
    cfg = load_config(conf, ["trainer.init_from=/ckpt"])
    filled = apply_checkpoint_model(cfg, _description(**shape), "/ckpt", "/ckpt/tokenizer")
    assert filled == ["trainer.tokenizer=/ckpt/tokenizer"]  # every model key already agrees


def test_rope_scaling_factor_must_match_when_the_checkpoint_scales_rope():
    from clipo_nemo.config import ClipoConfig, ConfigError, apply_checkpoint_model

    cfg = ClipoConfig()
    cfg.model.rope_scaling_factor = 4.0
    with pytest.raises(ConfigError, match="model.rope_scaling_factor=4.0 contradicts the checkpoint's rope_scaling_factor=8.0"):
        apply_checkpoint_model(cfg, _description(rope_scaling=True), "/ckpt")
    with pytest.raises(ConfigError, match=r"unknown \['attention_sinks'\]"):
        apply_checkpoint_model(ClipoConfig(), {**_description(), "attention_sinks": 4}, "/ckpt")


# --------------------------------------------------------------------------------------------------
# A run started from a converted tiny Llama: weights, description and tokenizer all from the checkpoint
# --------------------------------------------------------------------------------------------------
HF_LLAMA = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random Llama with the tiny task's tokenizer, saved as HF and converted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clipo_nemo.conversion.convert import convert_hf
    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("init_from")
    tokenizer = build_tiny_tokenizer(4)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **HF_LLAMA))
    hf.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    convert_hf(root / "hf", root / "ckpt", log=None)
    return root, {name: t.detach().clone() for name, t in hf.state_dict().items()}


def _megatron_names_from_hf(hf: dict, heads: int, groups: int) -> dict:
    """The HF Llama tensors under megatron's canonical names (the test's own statement of the layout:
    fused QKV = per key/value group [its heads/groups query heads; its key head; its value head],
    fc1 = [gate; up])."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"], "output_layer.weight": hf["lm_head.weight"]}
    layers = {int(name.split(".")[2]) for name in hf if name.startswith("model.layers.")}
    for i in layers:
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        d = q.shape[0] // heads
        q, k, v = q.view(groups, heads // groups * d, -1), k.view(groups, d, -1), v.view(groups, d, -1)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[m + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def _tiny_config_without_model(tmp_path, ckpt, *overrides):
    """tiny.yaml with no model section and no tokenizer, starting from ``ckpt``, a few fast steps."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from clipo_nemo.config import load_config

    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "examples" / "conf" / "tiny.yaml")
    yaml.pop("model")
    yaml.trainer.pop("tokenizer")
    path = tmp_path / "no_model.yaml"
    OmegaConf.save(yaml, path)
    return load_config(path, [f"trainer.output_dir={tmp_path / 'run'}", f"trainer.init_from={ckpt}",
                              "trainer.max_steps=2", "trainer.prompts_per_step=8", "rollout.n=4",
                              "parallel.micro_batch_size=8", "actor.num_mini_batches=2", "contrastive.warmup_steps=0",
                              "evaluation.every_steps=0", "trainer.save_every_steps=0", "trainer.plot_embeddings=false",
                              *overrides])


def _train_recording_start(rank, world_size, cfg):
    """train(cfg), recording the policy and reference weights as the first step begins."""
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.trainer import loop

    start = {}
    first_step = loop.Trainer.train_one_step

    def record_then_step(trainer):
        if not start:
            vocab = trainer.cfg.model.vocab_size
            start.update(policy=gather_full_state_dict(trainer.actor.module, vocab),
                         reference=gather_full_state_dict(trainer.actor.reference, vocab),
                         guard=trainer.weights_check, step=trainer.step, model=trainer.cfg.model,
                         tokenizer=trainer.cfg.trainer.tokenizer)
        return first_step(trainer)

    loop.Trainer.train_one_step = record_then_step
    result = loop.train(cfg)
    return start, {k: result[k] for k in ("status", "step")}, len(result["history"])


def test_a_run_starts_from_the_converted_weights_with_no_model_keys_given(converted, tmp_path):
    from clipo_nemo.parallel.launcher import run_distributed

    root, hf = converted
    cfg = _tiny_config_without_model(tmp_path, root / "ckpt")
    [(start, result, logged)] = run_distributed(_train_recording_start, 1, args=(cfg,), timeout_s=300)
    assert result == {"status": "completed", "step": 2} and logged == 2
    model = start["model"]
    assert (model.hidden_size, model.ffn_hidden_size, model.num_query_groups, model.vocab_size) == (48, 96, 2, 32)
    assert (model.rotary_base, model.norm_epsilon, model.max_position_embeddings) == (50000.0, 1e-5, 4096)
    assert start["tokenizer"] == str(root / "ckpt" / "tokenizer") and start["step"] == 0
    expected = _megatron_names_from_hf(hf, heads=4, groups=2)
    for which in ("policy", "reference"):
        assert set(start[which]) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(start[which][name], tensor), f"{which} {name} is not the HF weight"
    assert start["guard"] is not None and start["guard"].tensors_checked == len(expected) and not start["guard"].reloaded


def test_a_contradicting_model_key_stops_the_run_before_it_starts(converted, tmp_path):
    from clipo_nemo.config import ConfigError
    from clipo_nemo.trainer.loop import train

    root, _ = converted
    cfg = _tiny_config_without_model(tmp_path, root / "ckpt", "model.hidden_size=32")
    with pytest.raises(ConfigError, match="model.hidden_size=32 contradicts the checkpoint's hidden_size=48"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    cfg = _tiny_config_without_model(tmp_path, root / "hf")  # an HF directory, not converted
    with pytest.raises(ConfigError, match="must be converted first: tools/convert_hf_to_megatron.py"):
        train(cfg)


def test_a_tokenizer_other_than_the_converted_checkpoints_is_refused_unless_allowed(converted, tmp_path):
    """The same ids decoded to other words, silently (issue 24 point 5)."""
    import shutil

    from clipo_nemo.config import ConfigError
    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer
    from clipo_nemo.trainer.loop import use_converted_checkpoint
    from clipo_nemo.validation import validate_config

    root, _ = converted
    other = tmp_path / "other_tokenizer"
    build_tiny_tokenizer(3).save_pretrained(other)  # operands 0..3: another vocabulary, fewer tokens
    cfg = _tiny_config_without_model(tmp_path, root / "ckpt", f"trainer.tokenizer={other}")
    use_converted_checkpoint(cfg)
    with pytest.raises(ConfigError, match=r"trainer.tokenizer='.*other_tokenizer' has another vocabulary .* "
                                          r"trainer.allow_tokenizer_mismatch=true"):
        validate_config(cfg)
    cfg.trainer.allow_tokenizer_mismatch = True
    validate_config(cfg)
    same = tmp_path / "same_tokenizer"
    shutil.copytree(root / "ckpt" / "tokenizer", same)  # the checkpoint's own vocabulary, elsewhere: fine
    cfg = _tiny_config_without_model(tmp_path, root / "ckpt", f"trainer.tokenizer={same}")
    use_converted_checkpoint(cfg)
    validate_config(cfg)
