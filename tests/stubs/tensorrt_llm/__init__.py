"""A stand-in for the part of TensorRT-LLM's LLM API that ``clipo_nemo.rollout.trtllm_engine`` uses.

Tests only: put ``tests/stubs`` on ``sys.path`` (or ``PYTHONPATH``) to make it importable. It behaves
like the real API where the engine depends on it, and is strict where the real one would misbehave:

- every call is appended to ``CALLS`` (and, with ``TRTLLM_STUB_LOG=<file>``, written there as a JSON
  line) as ``{"call": name, ...}``;
- ``LLM(model=dir, load_format="dummy")`` builds a ``transformers`` model from ``dir/config.json``
  with random weights; ``_collective_rpc("update_weights", args=(handles,))`` rebuilds every tensor
  of ``handles[device UUID]`` (``(rebuild, args)`` pairs) for each of the engine's devices, requires
  the same tensors from all of them and each HF name once per update; ``update_weights(None)`` loads
  them and requires every parameter of the model to have come exactly once;
- ``sleep``/``wakeup`` take ``ExecutorMemoryType`` value strings and need ``enable_sleep=True``;
  generating or updating weights while asleep, or generating in the middle of an update, raises;
- ``generate`` samples each request with its own ``torch.Generator`` seeded by
  ``SamplingParams.seed`` (temperature, top-k, top-p), returns the log-prob of each sampled token
  under the temperature-scaled distribution, leaves the ``end_id`` token out of ``token_ids`` and
  keeps stop tokens / stop strings; ``TRTLLM_STUB_FAIL_GENERATE=k`` (or ``FAIL["generate"] = k``)
  makes the k-th ``generate`` call (1-based) fail half-way through its requests.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch

from tensorrt_llm import llmapi  # noqa: F401  (tensorrt_llm.llmapi.KvCacheConfig)
from tensorrt_llm._torch.utils import get_device_uuid

__version__ = "1.2.0"
CALLS: List[Dict[str, Any]] = []
FAIL: Dict[str, Optional[int]] = {"generate": None}
MEMORY_TAGS = ("sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra", "executor_extra",
               "kv_cache", "model", "draft_model")


def _record(entry: Dict[str, Any]) -> None:
    CALLS.append(entry)
    path = os.environ.get("TRTLLM_STUB_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(entry) + "\n")


@dataclass
class SamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: Optional[int] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    logprobs: Optional[int] = None
    detokenize: bool = True

    def __post_init__(self):
        self.best_of = self.best_of or self.n
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")


class Logprob(NamedTuple):
    logprob: float
    rank: Optional[int] = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: List[int]
    logprobs: List[Dict[int, Logprob]]
    finish_reason: Optional[str]
    stop_reason: Optional[Union[int, str]]


@dataclass
class RequestOutput:
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]


class LLM:
    def __init__(self, model: str, tokenizer: Optional[str] = None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 **kwargs: Any):
        import transformers

        _record({"call": "LLM", "model": str(model), "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
                 **{k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in kwargs.items()}})
        if kwargs.get("load_format") != "dummy":
            raise ValueError("the stub only builds engines with load_format='dummy' (weights come from refits)")
        self.enable_sleep = bool(kwargs.get("enable_sleep", False))
        config = transformers.AutoConfig.from_pretrained(model)
        self.hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or model)
        self.devices = [get_device_uuid(i) for i in range(tensor_parallel_size)]
        self.asleep: set = set()
        self.pending: Optional[Dict[str, torch.Tensor]] = None  # an update in progress
        self.generate_calls = 0

    # ---------------------------------------------------------------------------------------------
    def _collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None, **_: Any) -> list:
        handler = {"update_weights": self._update_weights, "sleep": self._sleep, "wakeup": self._wakeup}[method]
        return [handler(*args, **(kwargs or {}))] * len(self.devices)

    def _sleep(self, tags: List[str]) -> None:
        _record({"call": "sleep", "tags": list(tags)})
        self._check_tags(tags)
        self.asleep |= set(tags)

    def _wakeup(self, tags: List[str]) -> None:
        _record({"call": "wakeup", "tags": list(tags)})
        self._check_tags(tags)
        self.asleep -= set(tags)

    def _check_tags(self, tags: List[str]) -> None:
        if not self.enable_sleep:
            raise ValueError("Sleep feature is not enabled, please set enable_sleep=True in the LLM arguments.")
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise ValueError(f"Unknown memory tag {unknown}")

    def _update_weights(self, ipc_handles: Optional[dict] = None) -> None:
        if self.asleep & {"model"}:
            raise RuntimeError("update_weights while the model weights are released")
        if ipc_handles is None:
            _record({"call": "update_weights", "final": True})
            received, self.pending = self.pending or {}, None
            expected = dict(self.hf.named_parameters())
            if set(received) != set(expected):
                raise ValueError(f"update covered {sorted(set(received) ^ set(expected))[:5]} wrongly")
            with torch.no_grad():
                for name, param in expected.items():
                    if received[name].shape != param.shape:
                        raise ValueError(f"{name}: shape {tuple(received[name].shape)}, model {tuple(param.shape)}")
                    param.copy_(received[name])
            return
        if set(ipc_handles) != set(self.devices):
            raise ValueError(f"handles for devices {sorted(ipc_handles)}, the engine runs on {self.devices}")
        per_device = {}
        for device, pairs in ipc_handles.items():
            per_device[device] = {name: func(*args).detach().clone().float() for name, (func, args) in pairs}
        first = per_device[self.devices[0]]
        for device, tensors in per_device.items():
            if tensors.keys() != first.keys() or any(not torch.equal(tensors[k], first[k]) for k in first):
                raise ValueError(f"device {device} sent other tensors than {self.devices[0]}")
        _record({"call": "update_weights", "final": False, "devices": sorted(ipc_handles),
                 "tensors": [[name, list(t.shape)] for name, t in first.items()]})
        self.pending = self.pending or {}
        for name, tensor in first.items():
            if name in self.pending:
                raise ValueError(f"{name} sent twice in one update")
            self.pending[name] = tensor

    # ---------------------------------------------------------------------------------------------
    def generate(self, inputs: List[Dict[str, List[int]]], sampling_params: List[SamplingParams],
                 use_tqdm: bool = True) -> List[RequestOutput]:
        self.generate_calls += 1
        _record({"call": "generate", "requests": len(inputs), "seeds": [sp.seed for sp in sampling_params],
                 "params": [{k: v for k, v in asdict(sp).items() if k != "seed"} for sp in sampling_params]})
        if self.asleep:
            raise RuntimeError(f"generate while {sorted(self.asleep)} are released")
        if self.pending is not None:
            raise RuntimeError("generate in the middle of a weight update")
        fail_at = FAIL["generate"] or int(os.environ.get("TRTLLM_STUB_FAIL_GENERATE", "0"))
        outputs = []
        for i, (request, sp) in enumerate(zip(inputs, sampling_params)):
            if fail_at == self.generate_calls and i == len(inputs) // 2:
                raise RuntimeError("stub: injected executor failure")
            outputs.append(RequestOutput(request["prompt_token_ids"], [self._sample(request["prompt_token_ids"], sp)]))
        return outputs

    @torch.no_grad()
    def _sample(self, prompt: List[int], sp: SamplingParams) -> CompletionOutput:
        generator = torch.Generator().manual_seed(int(sp.seed or 0))
        ids, tokens, logprobs = list(prompt), [], []
        stops = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        for _ in range(sp.max_tokens):
            logits = self.hf(torch.tensor([ids])).logits[0, -1].double()
            if sp.top_k == 1:
                token = int(logits.argmax())
                logprob = float(torch.log_softmax(logits, -1)[token])
            else:
                logp = torch.log_softmax(logits / sp.temperature, -1)
                probs = logp.exp()
                if sp.top_k:
                    probs[probs < probs.topk(sp.top_k).values[-1]] = 0
                if sp.top_p is not None and sp.top_p < 1:
                    ordered, order = probs.sort(descending=True)
                    ordered[(ordered.cumsum(0) - ordered) >= sp.top_p * ordered.sum()] = 0
                    probs = torch.zeros_like(probs).scatter(0, order, ordered)
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
                logprob = float(logp[token])
            ids.append(token)
            if token == sp.end_id:
                return CompletionOutput(0, tokens, logprobs, "stop", None)
            tokens.append(token)
            logprobs.append({token: Logprob(logprob, 1)})
            if token in (sp.stop_token_ids or []):
                return CompletionOutput(0, tokens, logprobs, "stop", token)
            text = self.tokenizer.decode(tokens)
            hit = next((s for s in stops if text.endswith(s)), None)
            if hit is not None:
                return CompletionOutput(0, tokens, logprobs, "stop", hit)
        return CompletionOutput(0, tokens, logprobs, "length", None)
