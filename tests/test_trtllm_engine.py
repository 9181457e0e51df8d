"""The ``trtllm`` rollout engine against a stand-in TensorRT-LLM (``tests/stubs/tensorrt_llm``).

Oracles: the HF export tool's output for the refit weight stream (``hf_writer.export_to_hf`` reads
the saved checkpoint through its own reader); the megatron model's own log-probs (``verify
.full_logits``) for the tokens the stand-in sampled with the refitted weights in a ``transformers``
model (equal only if every refitted tensor landed under the right name and layout); dense formulas
for the importance weights and the mismatch metric; a fresh process for seed reproducibility. The
stand-in is importable only inside these tests (``sys.path`` in the fixture / the spawned ranks).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipo_nemo.parallel.launcher import run_distributed

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "tests" / "stubs"
TIMEOUT_S = 300
PROMPTS = [[3, 5, 6, 14, 12, 15, 4], [3, 5, 6, 20, 13, 4, 7, 8]]
SEEDS = [11, 22]


def _cfg(tmp: Path, *overrides: str):
    from clipo_nemo.config import load_config

    return load_config(ROOT / "examples" / "conf" / "tiny.yaml", [
        f"trainer.output_dir={tmp}", "contrastive.enabled=false", "rollout.engine=trtllm", "rollout.n=4",
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.vocab_size=64", *overrides])


@pytest.fixture
def stub(monkeypatch):
    """The stand-in ``tensorrt_llm`` on sys.path for one test, its call record emptied."""
    monkeypatch.syspath_prepend(str(STUBS))
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    import tensorrt_llm

    tensorrt_llm.CALLS.clear()
    yield tensorrt_llm
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name, raising=False)


# ------------------------------------------------------------------------------------------------
# Without TensorRT-LLM, the arguments, the seeds, the outputs
# ------------------------------------------------------------------------------------------------
def test_without_tensorrt_llm_the_engine_names_the_container(monkeypatch, tmp_path):
    from clipo_nemo.validation import validate_config
    from clipo_nemo.rollout import build_rollout_engine

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # not importable, stub or not
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "stubs" not in p])
    cfg = _cfg(tmp_path)
    validate_config(cfg)  # selecting it is valid; building it needs the package
    with pytest.raises(ImportError, match=r"TensorRT-LLM >= 1\.2, < 1\.3.*nvcr\.io/nvidia/tensorrt-llm/release"):
        build_rollout_engine(cfg.rollout, model=None, tokenizer=None, cfg=cfg)


@pytest.mark.parametrize("version", ["1.1.0", "1.3.0"])
def test_versions_outside_1_2_are_refused_by_name(stub, monkeypatch, version):
    """Point 6: 1.3 fails at LLM(...) on enable_sleep (BaseLLM.__init__); refuse it up front."""
    from clipo_nemo.rollout.trtllm_engine import import_tensorrt_llm

    monkeypatch.setattr(stub, "__version__", version)
    with pytest.raises(ImportError, match=rf"supports TensorRT-LLM >= 1\.2, < 1\.3, found {version}"):
        import_tensorrt_llm()


@pytest.mark.parametrize("override,message", [
    ("model.params_dtype=float32", None),  # the trainer may compute in float32; the engine may not
    ("rollout.trtllm_dtype=float32", "rollout.trtllm_dtype='float32'"),
    ("rollout.trtllm_gpus_per_node=1", "exceeds rollout.trtllm_gpus_per_node=1"),
    ("rollout.trtllm_refit_check_tolerance=0", "rollout.trtllm_refit_check_tolerance=0"),
])
def test_settings_the_engine_cannot_serve_are_refused_at_config_time(tmp_path, override, message):
    """Points 2 and 6: a float32 engine, a model-parallel group larger than a node."""
    from clipo_nemo.config import ConfigError
    from clipo_nemo.validation import validate_config

    cfg = _cfg(tmp_path, "parallel.tensor_parallel_size=2", override)
    if message is None:
        validate_config(cfg, world_size=2)
        return
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, world_size=2)


def test_sampling_params_leave_end_id_to_setup_and_keep_stop_strings(stub):
    """Point 7: with an end_id, _setup never runs and every request with a stop string fails."""
    from clipo_nemo.rollout.base import GenerationParams
    from clipo_nemo.rollout.trtllm_engine import sampling_params

    sampled = sampling_params(stub, GenerationParams(n=16, max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9,
                                                     stop=("\n\n", "</s>")), 123, [9])
    assert (sampled.n, sampled.best_of, sampled.max_tokens, sampled.end_id, sampled.pad_id) == (1, 1, 7, None, None)
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.seed) == (0.7, 5, 0.9, 123)
    assert sampled.stop_token_ids == [9] and sampled.stop == ["\n\n", "</s>"] and sampled.include_stop_str_in_output
    assert sampled.logprobs == 1 and sampled.detokenize is False
    greedy = sampling_params(stub, GenerationParams(temperature=0.0, top_p=0.5), 1)
    assert (greedy.top_k, greedy.temperature, greedy.top_p, greedy.stop_token_ids, greedy.stop) == (1, None, None, None, None)


def test_placement_and_memory_guards_name_what_is_wrong(monkeypatch):
    """Points 2 and 4: the worker/group device check, a group over two hosts, expandable segments."""
    from clipo_nemo.rollout.trtllm_engine import refuse_expandable_segments
    from clipo_nemo.rollout.trtllm_placement import group_host_problem, placement_problem

    assert placement_problem(["GPU-b", "GPU-a"], ["GPU-a", "GPU-b"]) is None
    problem = placement_problem(["GPU-cpu-0", "GPU-cpu-1"], ["GPU-cpu-2", "GPU-cpu-3"])
    assert "['GPU-cpu-0', 'GPU-cpu-1']" in problem and "['GPU-cpu-2', 'GPU-cpu-3']" in problem
    assert group_host_problem([("a", "0", "u0"), ("a", "1", "u1")]) is None
    assert "spans hosts ['a', 'b']" in group_host_problem([("a", "0", "u0"), ("b", "0", "u1")])
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(ValueError, match="PYTORCH_CUDA_ALLOC_CONF.*expandable segments"):
        refuse_expandable_segments()


def test_response_seeds_differ_per_response_and_repeat_in_a_fresh_process():
    from clipo_nemo.rollout.trtllm_engine import response_seed

    seeds = [response_seed(prompt_seed, j) for prompt_seed in (1234, 1235, 2_001_237) for j in range(16)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    code = ("from clipo_nemo.rollout.trtllm_engine import response_seed; "
            "print([response_seed(p, j) for p in (1234, 1235, 2001237) for j in range(16)])")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout) == seeds
    with pytest.raises(ValueError, match="non-negative"):
        response_seed(-1, 0)


def test_read_completion_restores_the_end_token_and_refuses_broken_outputs(stub):
    from clipo_nemo.rollout.trtllm_engine import TrtllmEngineError, read_completion

    def out(tokens, reason, stop=None, logprobs=None):
        lps = logprobs if logprobs is not None else [{t: stub.Logprob(-0.5 * (i + 1))} for i, t in enumerate(tokens)]
        return stub.CompletionOutput(0, tokens, lps, reason, stop)

    tokens, lps, reason = read_completion(out([5, 6], "stop"), [2])  # TRTLLMSampler dropped the end token
    assert tokens == [5, 6, 2] and lps[:2] == [-0.5, -1.0] and math.isnan(lps[2]) and reason == "stop"
    assert read_completion(out([5, 2], "stop"), [2])[0] == [5, 2]  # an engine that keeps it: unchanged
    assert read_completion(out([5, 9], "stop", stop=9), [2])[0] == [5, 9]
    assert read_completion(out([5, 7], "stop", stop="\n"), [2])[0] == [5, 7]  # stop string: kept as it is
    assert read_completion(out([5, 7], "length"), [2])[:3:2] == ([5, 7], "length")
    with pytest.raises(TrtllmEngineError, match="finish_reason=None"):
        read_completion(out([5], None), [2])
    with pytest.raises(TrtllmEngineError, match="1 log-probs for 2 tokens"):
        read_completion(out([5, 6], "length", logprobs=[{5: stub.Logprob(-1.0)}]), [2])
    with pytest.raises(TrtllmEngineError, match="no log-prob for the sampled token 6.*TRTLLMSampler"):
        read_completion(out([6], "length", logprobs=[{5: stub.Logprob(-1.0)}]), [2])


# ------------------------------------------------------------------------------------------------
# Truncated importance sampling and the mismatch metric against dense formulas
# ------------------------------------------------------------------------------------------------
def test_truncated_importance_weights_dense_formula():
    from clipo_nemo.algorithms.policy_losses import truncated_importance_weights

    generator = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=generator, dtype=torch.float64) * 3
    rollout = old + torch.randn(3, 5, generator=generator, dtype=torch.float64)
    rollout[1, 2] = float("nan")
    weights = truncated_importance_weights(old.requires_grad_(), rollout, cap=2.0)
    for b in range(3):
        for t in range(5):
            expected = 1.0 if (b, t) == (1, 2) else min(math.exp(old[b, t].item() - rollout[b, t].item()), 2.0)
            assert weights[b, t].item() == pytest.approx(expected, rel=1e-12)
    assert not weights.requires_grad and (weights == 2.0).any() and (weights < 1.0).any()
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_importance_weights(old, rollout, 0.5)


def test_logprob_mismatch_dense_formula():
    from clipo_nemo.algorithms.policy_losses import logprob_mismatch

    train = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, -0.25, 0.0]])
    rollout = torch.tensor([[9.0, -1.5, float("nan"), -2.0], [9.0, -0.5, -0.75, 5.0]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    total, count, peak = logprob_mismatch(train, rollout, mask)
    assert (total, count, peak) == pytest.approx((0.5 + 1.0 + 0.0 + 0.5, 4, 1.0))


# ------------------------------------------------------------------------------------------------
# The refit stream: every HF tensor once, as the export tool writes it, at TP=1, TP=2 and PP=2
# ------------------------------------------------------------------------------------------------
def _stream_and_save(rank, world_size, cfg, run_dir):
    from omegaconf import OmegaConf

    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.rollout.refit import HFWeightStream
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.checkpoint.save import save_checkpoint

    init_parallel_state(cfg.parallel)
    try:
        actor = Actor.build(cfg)
        save_checkpoint(run_dir, 0, actor, None, {"step": 0}, keep_last=1)
        if rank == 0:
            OmegaConf.save(OmegaConf.structured(cfg), Path(run_dir) / "config.yaml")
        return [(name, tensor.clone()) for name, tensor in HFWeightStream(actor.module, cfg.model)]
    finally:
        destroy_parallel_state()


@pytest.mark.parametrize("layout,world", [("tp1", 1), ("tp2", 2), ("pp2", 2)])
def test_refit_stream_is_the_hf_export_at_every_layout(tmp_path, layout, world):
    from safetensors.torch import load_file

    from clipo_nemo.conversion.hf_writer import export_to_hf
    from clipo_nemo.conversion.mapping import expected_hf_shapes

    size = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}[layout]
    cfg = _cfg(tmp_path / "run", f"parallel.tensor_parallel_size={size[0]}", f"parallel.pipeline_parallel_size={size[1]}",
               "model.add_qkv_bias=true", "model.tie_word_embeddings=false", "model.make_vocab_size_divisible_by=20")
    streams = run_distributed(_stream_and_save, world, args=(cfg, str(tmp_path / "run")), timeout_s=TIMEOUT_S)
    export_to_hf(tmp_path / "run", tmp_path / "hf")
    exported = {}
    for shard in sorted((tmp_path / "hf").glob("model*.safetensors")):
        exported.update(load_file(str(shard)))
    for stream in streams:  # every rank of the group sees the same whole stream
        names = [name for name, _ in stream]
        assert len(names) == len(set(names)) and set(names) == set(exported) == set(expected_hf_shapes(cfg.model))
        for name, tensor in stream:
            assert torch.equal(tensor, exported[name]), name
    assert any(name.endswith("q_proj.bias") for name in exported)


# ------------------------------------------------------------------------------------------------
# The engine: refit before generating, sleep/wake pairing, seeds, failures; log-probs = megatron's
# ------------------------------------------------------------------------------------------------
def _megatron_logprobs(model, prompts, out, temperature, vocab_size, dtype=torch.bfloat16):
    """The policy's own log-prob of every generated token (the oracle), [N, T] NaN-padded, with its
    weights rounded to the engine's ``dtype`` for the pass (and restored after)."""
    from clipo_nemo.conversion.verify import response_logprobs

    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype).float())
        result = response_logprobs(model, prompts, out, temperature, vocab_size)
        for param, value in zip(model.parameters(), saved):
            param.copy_(value)
    return result


def _observe_waits(mp_group):
    """Count the engine's object collectives by group (NCCL model-parallel group vs others) and record
    every ``torch.cuda.empty_cache`` into the stand-in's call log once it is imported."""
    import torch.distributed as dist

    seen = {"mp": 0, "other": 0}
    for name in ("broadcast_object_list", "gather_object", "all_gather_object"):
        original = getattr(dist, name)

        def wrapped(*args, _original=original, **kwargs):
            seen["mp" if kwargs.get("group") is mp_group else "other"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)
    empty_cache = torch.cuda.empty_cache

    def recorded():
        if "tensorrt_llm" in sys.modules:
            sys.modules["tensorrt_llm"].record({"call": "empty_cache"})
        empty_cache()

    torch.cuda.empty_cache = recorded
    return seen


def _engine_run(rank, world_size, cfg, misname=False):
    sys.path.insert(0, str(STUBS))
    os.environ.update(PMIX_RANK=str(rank), OMPI_COMM_WORLD_RANK=str(rank))  # as under srun: MPI_Init would trip
    from megatron.core import parallel_state

    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.rollout import GenerationParams, build_rollout_engine, trtllm_engine
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.trainer.loop import load_tokenizer

    init_parallel_state(cfg.parallel)
    try:
        actor = Actor.build(cfg)
        seen = _observe_waits(parallel_state.get_model_parallel_group())
        engine = build_rollout_engine(cfg.rollout, model=actor.module, tokenizer=load_tokenizer(cfg), cfg=cfg)
        params = GenerationParams(n=4, max_new_tokens=5, temperature=0.9)
        first = engine.generate(PROMPTS, params, SEEDS)
        again = engine.generate(PROMPTS, params, SEEDS)  # same weights, same seeds: no refit, same tokens
        oracle_first = _megatron_logprobs(actor.module, PROMPTS, first, 0.9, cfg.model.vocab_size)
        engine.release()  # "training" changes the weights
        engine.release()  # a second release while asleep asks nothing more
        with torch.no_grad():
            for param in actor.module.parameters():
                param.mul_(1.5)
        second = engine.generate(PROMPTS, params, SEEDS)
        oracle_second = _megatron_logprobs(actor.module, PROMPTS, second, 0.9, cfg.model.vocab_size)
        os.environ["TRTLLM_STUB_FAIL_GENERATE"] = "6"  # the engine's next generate call fails half-way
        try:
            engine.generate(PROMPTS, params, SEEDS)
            error = None
        except trtllm_engine.TrtllmEngineError as err:
            error = str(err)
        generations_after_failure = engine.generations
        os.environ["TRTLLM_STUB_FAIL_GENERATE"] = "0"
        retry = engine.generate(PROMPTS, params, SEEDS)
        result = dict(first=first, again=again, second=second, retry=retry, oracle_first=oracle_first,
                      oracle_second=oracle_second, error=error, refits=engine.refits, waits=dict(seen),
                      generations_after_failure=generations_after_failure, probe=engine.probe_mismatch,
                      timings=dict(engine.timings), imported="tensorrt_llm" in sys.modules)
        if misname:  # a naming slip in the refit: the engine keeps the old tensor, the probe must notice
            class Misnamed(trtllm_engine.HFWeightStream):
                def __iter__(self):
                    for name, tensor in super().__iter__():
                        yield ("lm_head.weights" if name == "lm_head.weight" else name), tensor

            trtllm_engine.HFWeightStream = Misnamed
            engine.release()
            with torch.no_grad():
                for param in actor.module.parameters():
                    param.mul_(2.0)
            try:
                engine.generate(PROMPTS, params, SEEDS)
            except trtllm_engine.TrtllmEngineError as err:
                result["misnamed_error"] = str(err)
        stub = sys.modules.get("tensorrt_llm")
        if stub is not None:
            result.update(calls=list(stub.CALLS), workers=engine.llm._executor.report_device_ids())
        return result
    finally:
        destroy_parallel_state()


def _call_text(calls):
    """The call log as words, consecutive partial updates as one ``update``."""
    words = []
    for c in calls:
        word = c["call"] if c["call"] != "update_weights" else ("final" if c["final"] else "update")
        if not (word == "update" and words and words[-1] == "update"):
            words.append(word)
    return " ".join(words)


def test_engine_at_tp2_imports_once_waits_on_gloo_and_samples_the_policy(tmp_path):
    """Points 1, 3, 4, 5, 7 (stop via _setup), 8 (pinned copy measured), 10 on one TP=2 group."""
    from clipo_nemo.conversion.mapping import expected_hf_shapes
    from clipo_nemo.rollout.trtllm_engine import OTHER_TAGS, SAMPLER, WEIGHT_TAGS, WORKER_EXTENSION, response_seed

    cfg = _cfg(tmp_path, "parallel.tensor_parallel_size=2", "rollout.trtllm_refit_bucket_mb=0.01")
    results = run_distributed(_engine_run, 2, args=(cfg,), timeout_s=TIMEOUT_S)
    lead = results[0]
    for other in results[1:]:  # every rank of the group gets the same responses and the same error
        assert torch.equal(other["first"].tokens, lead["first"].tokens) and other["error"] == lead["error"]
    # 1: only the leader imports TensorRT-LLM, without MPI (the launcher's PMIx identity was dropped)
    assert lead["imported"] and not results[1]["imported"]
    assert [c for c in lead["calls"] if c["call"] == "import"] == [{"call": "import", "rank": "0", "mpi": False}]
    # 5: nobody waits on the model-parallel (NCCL on GPUs) group
    assert all(r["waits"]["mp"] == 0 and r["waits"]["other"] > 10 for r in results)

    # 3: the log-probs are the sampled tokens' under softmax(logits / T): the policy's own (bf16 weights)
    for out, oracle in ((lead["first"], lead["oracle_first"]), (lead["second"], lead["oracle_second"])):
        known = ~torch.isnan(out.logprobs)
        assert known.sum() >= 8 and torch.equal(known, ~torch.isnan(oracle))
        assert (out.logprobs.double()[known] - oracle[known]).abs().max() < 1e-4
    assert 0 <= lead["probe"] < 0.05
    assert torch.equal(lead["again"].tokens, lead["first"].tokens)
    assert torch.equal(lead["retry"].tokens, lead["second"].tokens)
    assert not torch.equal(lead["second"].logprobs.nan_to_num(), lead["first"].logprobs.nan_to_num())

    # 4: cached memory returned before each wake-up; weights wake, refit, then the KV cache wakes
    text = _call_text(lead["calls"])
    assert text == ("import LLM update final empty_cache generate generate generate sleep empty_cache wakeup update "
                    "final empty_cache wakeup generate generate generate generate"), text
    engine_args = next(c for c in lead["calls"] if c["call"] == "LLM")
    assert (engine_args["tensor_parallel_size"], engine_args["enable_sleep"], engine_args["sampler_type"]) == (
        2, True, SAMPLER)
    assert (engine_args["orchestrator_type"], engine_args["ray_worker_extension_cls"], engine_args["load_format"],
            engine_args["dtype"]) == ("ray", WORKER_EXTENSION, "dummy", "bfloat16")
    head_dim, groups = cfg.model.hidden_size // cfg.model.num_attention_heads, cfg.model.num_query_groups
    kv_tokens = int(16 * 2**30 // (2 * cfg.model.num_layers * -(-groups // 2) * head_dim * 2))
    assert f"max_tokens={kv_tokens}" in engine_args["kv_cache_config"]
    sleeps = [c for c in lead["calls"] if c["call"] in ("sleep", "wakeup")]
    assert [(c["call"], c["tags"]) for c in sleeps] == [
        ("sleep", list(WEIGHT_TAGS + OTHER_TAGS)), ("wakeup", list(WEIGHT_TAGS)), ("wakeup", list(OTHER_TAGS))]
    # 8: 1.2 copies the weights to pinned host memory on each sleep (here: bf16, half per TP rank)
    shapes = expected_hf_shapes(cfg.model)
    assert sleeps[0]["pinned_host_bytes"] == sum(math.prod(s) for s in shapes.values()) * 2 // 2
    assert set(lead["timings"]) == {"sleep_s", "wake_weights_s", "wake_rest_s"}

    # Each refit: every HF tensor exactly once, whole shapes, from both GPUs of the group (2: theirs).
    assert lead["workers"] == ["GPU-cpu-0", "GPU-cpu-1"]
    refit, refits = [], []
    for call in lead["calls"]:
        if call["call"] == "update_weights" and not call["final"]:
            assert call["devices"] == ["GPU-cpu-0", "GPU-cpu-1"] and call["ignored"] == []
            refit += call["tensors"]
        elif call["call"] == "update_weights":
            refits.append(refit)
            refit = []
    for received in refits:
        assert dict(received) == {name: list(shape) for name, shape in shapes.items()} and len(received) == len(shapes)

    # 10: one seed per response (the probe: seed 0), honoured by the sampler
    generates = [c for c in lead["calls"] if c["call"] == "generate" and c["requests"] == 8]
    expected_seeds = [response_seed(s, j) for s in SEEDS for j in range(4)]
    assert len(generates) == 5 and all(c["seeds"] == expected_seeds for c in generates) and len(set(expected_seeds)) == 8
    assert all(p["n"] == 1 and p["best_of"] == 1 and p["max_tokens"] == 5 and p["temperature"] == 0.9
               and p["logprobs"] == 1 for c in generates for p in c["params"])
    # A failed generation: a clear error on every rank, not counted, nothing of it returned.
    assert "TensorRT-LLM failed during generation of 2 prompts x 4 responses" in lead["error"]
    assert "no response of this batch is used" in lead["error"] and "injected executor failure" in lead["error"]
    assert lead["generations_after_failure"] == 3


def test_engines_of_two_groups_on_one_node_sit_on_their_own_gpus(tmp_path):
    """Points 2, 8 (weights kept awake), 9 (a misnamed tensor stops the run), 10 (fresh processes)."""
    from clipo_nemo.rollout.trtllm_engine import OTHER_TAGS

    cfg = _cfg(tmp_path, "rollout.trtllm_sleep_weights=false")
    results = run_distributed(_engine_run, 2, args=(cfg, True), timeout_s=TIMEOUT_S)
    for rank, result in enumerate(results):  # TP1 x DP2: each rank leads its own engine
        mine = f"GPU-cpu-{rank}"
        assert result["workers"] == [mine]
        assert next(c for c in result["calls"] if c["call"] == "LLM")["cuda_visible_devices"] == str(rank)
        assert all(c["devices"] == [mine] for c in result["calls"] if c["call"] == "update_weights" and not c["final"])
        sleeps = [c for c in result["calls"] if c["call"] in ("sleep", "wakeup")]
        assert all(c["tags"] == list(OTHER_TAGS) for c in sleeps) and len(sleeps) == 4
        assert all(c["pinned_host_bytes"] == 0 for c in sleeps if c["call"] == "sleep")
        assert "wake_weights_s" not in result["timings"]
        assert "trtllm_refit_check_tolerance=0.05" in result["misnamed_error"]
        assert "ignored" in str(result["calls"]) and ["lm_head.weights"] in [
            c["ignored"] for c in result["calls"] if c["call"] == "update_weights" and not c["final"]]
    # The same seeds and weights in two other processes give the same responses; a prompt's differ.
    assert torch.equal(results[0]["first"].tokens, results[1]["first"].tokens)
    assert len({tuple(results[0]["first"].response(r)) for r in range(4)}) > 1


# ------------------------------------------------------------------------------------------------
# The training loop with rollout.engine=trtllm: refit each step, mismatch logged, failures stop it
# ------------------------------------------------------------------------------------------------
def _train(tmp_path: Path, *extra: str, fail_at: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{STUBS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRTLLM_STUB_LOG": str(tmp_path / "calls.jsonl"), "TRTLLM_STUB_FAIL_GENERATE": str(fail_at)}
    run = subprocess.run(
        [sys.executable, "examples/train_grpo_clipo.py", "--config-name=tiny", f"trainer.output_dir={tmp_path / 'run'}",
         "rollout.engine=trtllm", "trainer.max_steps=3", "trainer.prompts_per_step=8", "rollout.n=4",
         "evaluation.every_steps=0", "parallel.micro_batch_size=8", "contrastive.warmup_steps=0", "actor.lr=0.05",
         "trainer.plot_embeddings=false", "trainer.save_every_steps=0", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    calls = [json.loads(line)["call"] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return run, calls, [s for s in steps if "rollout/logprob_mismatch_mean" in s or "step" in s]


def test_training_with_trtllm_refits_every_step_and_logs_the_mismatch(tmp_path):
    run, calls, steps = _train(tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    mismatch = [s for s in steps if "rollout/logprob_mismatch_mean" in s]
    assert len(mismatch) == 3
    for step in mismatch:  # the engine sampled with the policy's weights of that step (in bfloat16)
        assert 0 <= step["rollout/logprob_mismatch_mean"] <= step["rollout/logprob_mismatch_max"] < 0.05
    text = " ".join(c for c in calls if c in ("LLM", "update_weights", "sleep", "wakeup", "generate"))
    # step 0: start, refit, probe, generate; then per step: sleep for training, wake the weights,
    # refit, wake the rest, probe, generate
    assert text.startswith("LLM update_weights") and text.count("generate") == 6
    assert text.count("sleep") == 3 and text.count("wakeup") == 4
    for chunk in text.split("sleep")[1:-1]:
        assert chunk.split() == ["wakeup"] + ["update_weights"] * chunk.count("update_weights") + [
            "wakeup", "generate", "generate"]

    # The evaluation tool samples the trained policy through the same engine (refitted from the checkpoint).
    (tmp_path / "calls.jsonl").unlink()
    benchmark = sorted((tmp_path / "run" / "data").glob("*.parquet"))[0].stem
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(STUBS), "TRTLLM_STUB_LOG": str(tmp_path / "calls.jsonl")}
    evaluated = subprocess.run(
        [sys.executable, "tools/evaluate.py", "--checkpoint", str(tmp_path / "run"), "--engine", "trtllm", "--data-dir",
         str(tmp_path / "run" / "data"), "--benchmarks", benchmark, "--k", "2", "--max-new-tokens", "4", "--workers", "1",
         "--out", str(tmp_path / "eval")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    calls = [c for c in calls if c["call"] != "import"]
    assert [c["call"] for c in calls][0] == "LLM" and [c["call"] for c in calls][-1] == "generate"
    assert all(p["n"] == 1 and p["temperature"] == 0.6 and p["top_p"] == 0.95 for p in calls[-1]["params"])
    assert (tmp_path / "eval" / "results.json").is_file()


def test_an_engine_failure_stops_the_run_before_the_step_counts(tmp_path):
    run, calls, steps = _train(tmp_path, fail_at=4)  # generate calls: probe, step 0, probe, step 1 (fails)
    assert run.returncode != 0
    assert "TensorRT-LLM failed during generation" in run.stderr and "no response of this batch is used" in run.stderr
    assert [s.get("step") for s in steps if "rollout/logprob_mismatch_mean" in s] == [0]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").glob("step_*"))

