"""The stand-in ``tests/stubs/tensorrt_llm`` behaves as the real TensorRT-LLM 1.2 sources do (each
behaviour is cited in the stand-in's docstrings), and the engine's pure pieces meet it.

Oracles: dense ``log_softmax`` of the stand-in model's own logits (a ``transformers`` model) for
both samplers' log-prob semantics; the tokenizer's own encoding for stop words; explicit lists for
placement and arguments.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "tests" / "stubs"


@pytest.fixture
def stub(monkeypatch):
    """The stand-in on sys.path for one test (a fresh import: its version and MPI state are read then)."""
    monkeypatch.syspath_prepend(str(STUBS))
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)

    def load():
        for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
            del sys.modules[name]
        import tensorrt_llm

        tensorrt_llm.CALLS.clear()
        return tensorrt_llm

    yield load
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name, raising=False)


def _model_dir(tmp_path: Path) -> Path:
    from clipo_nemo.config import load_config
    from clipo_nemo.conversion.mapping import hf_config_from_model, infer_architecture
    from clipo_nemo.trainer.loop import load_tokenizer

    cfg = load_config(ROOT / "examples" / "conf" / "tiny.yaml", [f"trainer.output_dir={tmp_path}"])
    tokenizer = load_tokenizer(cfg)
    config = hf_config_from_model(cfg.model, infer_architecture(cfg.model))
    config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(tmp_path))
    return tmp_path


def _llm(tllm, directory, **kwargs):
    args = dict(load_format="dummy", orchestrator_type="ray", enable_sleep=True)
    args.update(kwargs)
    torch.manual_seed(1)  # load_format="dummy" draws the weights from the global generator, as the real one does
    return tllm.LLM(model=str(directory), tokenizer=str(directory), dtype="float32", **args)


PROMPT = [3, 5, 6, 14, 12, 15, 4]


def _dense_logp(llm, prompt, tokens, temperature):
    ids = torch.tensor([prompt + tokens])
    logits = llm.hf(ids).logits[0, len(prompt) - 1: -1].double()
    return torch.log_softmax(logits / temperature, -1)


@torch.no_grad()
def test_torch_sampler_returns_the_raw_top1_not_the_sampled_token_and_ignores_seeds(stub, tmp_path):
    tllm = stub()
    llm = _llm(tllm, _model_dir(tmp_path))  # sampler_type="auto": TorchSampler
    with torch.no_grad():
        for p in llm.hf.parameters():
            p.mul_(3)  # peaked, yet sampling at T=1 leaves the argmax
    sp = lambda seed: tllm.SamplingParams(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=seed, logprobs=1,
                                          end_id=-1)
    out = llm.generate([{"prompt_token_ids": PROMPT}], [sp(1)])[0].outputs[0]
    raw = _dense_logp(llm, PROMPT, out.token_ids, 1.0)
    for i, entry in enumerate(out.logprobs):
        (token, logprob), = entry.items()
        assert token == int(raw[i].argmax()) and logprob.logprob == pytest.approx(float(raw[i].max()), abs=1e-5)
    assert any(token not in entry for token, entry in zip(out.token_ids, out.logprobs))
    fresh = _llm(tllm, tmp_path)  # one generator seeded 42 per executor: the request seed changes nothing
    fresh.hf.load_state_dict(llm.hf.state_dict())
    assert fresh.generate([{"prompt_token_ids": PROMPT}], [sp(999)])[0].outputs[0].token_ids == out.token_ids


@torch.no_grad()
def test_trtllm_sampler_returns_the_sampled_token_under_the_temperature_and_drops_the_end_token(stub, tmp_path):
    tllm = stub()
    llm = _llm(tllm, _model_dir(tmp_path), sampler_type="TRTLLMSampler")
    eos = llm.tokenizer.eos_token_id
    with torch.no_grad():
        llm.hf.lm_head.weight[eos] += 1.0  # the end token comes within ~30 tokens
    outs = [llm.generate([{"prompt_token_ids": PROMPT}],
                         [tllm.SamplingParams(max_tokens=30, temperature=0.7, top_p=0.9, seed=s, logprobs=1)])[0]
            .outputs[0] for s in range(6)]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # per-request seeds honoured
    for out in outs:
        logp = _dense_logp(llm, PROMPT, out.token_ids, 0.7)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert list(entry) == [token] and entry[token].logprob == pytest.approx(float(logp[i, token]), abs=1e-5)
        if out.finish_reason == "stop":
            assert out.stop_reason is None and eos not in out.token_ids  # dropped with its log-prob
    assert any(o.finish_reason == "stop" for o in outs)


def test_stop_strings_need_setup_which_runs_only_without_end_id(stub, tmp_path):
    tllm = stub()
    llm = _llm(tllm, _model_dir(tmp_path), sampler_type="TRTLLMSampler")
    word = llm.tokenizer.decode([PROMPT[2]])
    with pytest.raises(RuntimeError, match="is not processed by tokenizer, please call the setup method"):
        llm.generate([{"prompt_token_ids": PROMPT}], [tllm.SamplingParams(end_id=2, stop=[word], max_tokens=4)])
    sp = tllm.SamplingParams(stop=[word], max_tokens=4)
    llm.generate([{"prompt_token_ids": PROMPT}], [sp])
    assert sp.end_id == llm.tokenizer.eos_token_id
    assert sp._stop_word_ids == [llm.tokenizer.encode(word, add_special_tokens=False)]


def test_llm_arguments_follow_the_version(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTLLM_STUB_VERSION", "1.3.0")
    tllm = stub()
    with pytest.raises(ValueError, match="LLM got invalid argument: enable_sleep"):
        _llm(tllm, _model_dir(tmp_path))


def test_update_weights_ignores_unknown_names_and_needs_its_own_device(stub, tmp_path):
    tllm = stub()
    llm = _llm(tllm, _model_dir(tmp_path))
    name, param = next(iter(llm.hf.named_parameters()))
    before = param.detach().clone()
    value = (lambda t: t, (torch.ones_like(param),))
    llm._collective_rpc("update_weights", args=({"GPU-cpu-0": [(name + "_misnamed", value)]},))
    assert torch.equal(param, before) and tllm.CALLS[-1]["ignored"] == [name + "_misnamed"]
    with pytest.raises(ValueError, match="Device UUID GPU-cpu-0 not found in ipc_handles"):
        llm._collective_rpc("update_weights", args=({"GPU-cpu-3": [(name, value)]},))
    llm._collective_rpc("update_weights", args=({"GPU-cpu-0": [(name, value)]},))
    assert torch.equal(param, torch.ones_like(param))


def test_ray_places_workers_by_its_own_order_unless_given_a_private_cluster(stub, tmp_path, monkeypatch):
    tllm = stub()
    directory = _model_dir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # ignored by the node's shared cluster
    assert _llm(tllm, directory, tensor_parallel_size=2)._executor.report_device_ids() == ["GPU-cpu-0", "GPU-cpu-1"]
    monkeypatch.setenv("TLLM_RAY_FORCE_LOCAL_CLUSTER", "1")
    assert _llm(tllm, directory, tensor_parallel_size=2)._executor.report_device_ids() == ["GPU-cpu-4", "GPU-cpu-5"]
    with pytest.raises(RuntimeError, match="cannot be scheduled"):
        _llm(tllm, directory, tensor_parallel_size=4)


def test_importing_initialises_mpi_unless_disabled(stub, monkeypatch):
    monkeypatch.setenv("PMIX_RANK", "0")
    with pytest.raises(RuntimeError, match="MPI identity"):
        stub()
    monkeypatch.setenv("TLLM_DISABLE_MPI", "1")
    assert stub().CALLS == []  # imported; its import record was made (and cleared) without MPI
