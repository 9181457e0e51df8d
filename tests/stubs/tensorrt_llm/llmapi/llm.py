"""Stand-in for ``tensorrt_llm/llmapi/llm.py`` ``LLM`` (PyTorch backend, Ray orchestrator) and its
Ray workers' RL methods.

- ``LLM(model, tokenizer, tensor_parallel_size, dtype, **kwargs)``: like ``BaseLLM.__init__``, every
  keyword must be a field of the version's ``TorchLlmArgs`` (else ``ValueError("LLM got invalid
  argument: <key>")``): 1.2 has ``enable_sleep``; 1.3 replaced it by ``sleep_config`` (PR #11889).
  ``load_format="dummy"`` builds a ``transformers`` model from ``model/config.json`` with random
  weights, held in ``dtype`` (computed in float32). ``sampler_type`` picks the sampler
  (``_torch.sampler``); ``"auto"`` is ``TorchSampler``. Workers are placed by ``RayExecutor``.
- ``generate``: ``_prepare_sampling_params`` calls ``SamplingParams._setup(tokenizer)`` only
  ``if sampling_params.end_id is None``; the executor then needs ``_get_stop_words()``. An ``end_id``
  token: ``TRTLLMSampler``'s C++ decoder does not count it ("Do not increase seq len when EOS is
  generated"): token and log-prob dropped; ``TorchSampler`` appends it before finishing
  (``FinishReason.END_ID``; kept here -- not verified on the real library). Stop words:
  ``executor/result.py`` ``_handle_sequence``: ``finish_reason="stop"``, ``stop_reason`` the token id
  or the string, the word trimmed (tokens and log-probs) unless ``include_stop_str_in_output``.
- ``_collective_rpc(method, args)`` runs on every worker (``RayExecutor.collective_rpc``):
  ``update_weights`` (``llmapi/rlhf_utils.py`` ``WorkerExtension.update_weights``): each worker looks
  up ``ipc_handles[its own device UUID]`` (missing: ``ValueError("Device UUID ... not found in
  ipc_handles")``), rebuilds ``func(*args)`` and loads with ``allow_partial_loading=True``: names the
  model does not have are ignored and missing ones keep their old (dummy) values, silently;
  ``None`` finishes the load and resets the prefix cache. ``sleep`` / ``wakeup``
  (``executor/ray_gpu_worker.py``) need ``enable_sleep``, check the tags
  (``virtual_memory.verify_sleep_wakeup_tags``); in 1.2 the ``model`` scope is ``RestoreMode.PINNED``
  (``py_executor_creator.py``), so sleeping it copies the weights to pinned host memory: the bytes are
  recorded as ``pinned_host_bytes``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from tensorrt_llm._torch.sampler import TORCH_SAMPLER_SEED, Logprob, torch_sampler_step, trtllm_sampler_step
from tensorrt_llm._utils import FAIL, record
from tensorrt_llm.executor.ray_executor import RayExecutor
from tensorrt_llm.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput"]
COMMON_ARGS = {"load_format", "orchestrator_type", "ray_worker_extension_cls", "kv_cache_config", "max_batch_size",
               "max_seq_len", "sampler_type", "ray_placement_config", "skip_tokenizer_init", "trust_remote_code"}
ARGS_BY_RELEASE = {(1, 2): COMMON_ARGS | {"enable_sleep"}, (1, 3): COMMON_ARGS | {"sleep_config"}}
MEMORY_TAGS = ("sampler", "drafter", "guided_decoder", "spec_resource_manager", "_no_capture_init_kv_cache",
               "_no_capture_init_extra_resources", "model_extra", "executor_extra", "kv_cache", "model", "draft_model")
SAMPLERS = {"auto": torch_sampler_step, "TorchSampler": torch_sampler_step, "TRTLLMSampler": trtllm_sampler_step}
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _release() -> tuple:
    import tensorrt_llm

    return tuple(int(p) for p in tensorrt_llm.__version__.split(".")[:2])


class LLM:
    def __init__(self, model: str, tokenizer: Optional[str] = None, tensor_parallel_size: int = 1, dtype: str = "auto",
                 **kwargs: Any):
        import transformers

        record({"call": "LLM", "model": str(model), "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                **{k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in kwargs.items()}})
        allowed = ARGS_BY_RELEASE.get(_release(), COMMON_ARGS)
        for key in kwargs:
            if key not in allowed:
                raise ValueError(f"LLM got invalid argument: {key}")
        if kwargs.get("load_format") != "dummy" or kwargs.get("orchestrator_type") != "ray":
            raise ValueError("the stand-in only builds load_format='dummy', orchestrator_type='ray' engines")
        self.sample_step = SAMPLERS[kwargs.get("sampler_type", "auto")]
        self.enable_sleep = bool(kwargs.get("enable_sleep", False))
        self.dtype = DTYPES[dtype]
        self._executor = RayExecutor(tensor_parallel_size)
        self.tensor_parallel_size = tensor_parallel_size
        config = transformers.AutoConfig.from_pretrained(model)
        self.hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        self._round_to_dtype()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or model)
        self.global_generator = torch.Generator().manual_seed(TORCH_SAMPLER_SEED)
        self.asleep: set = set()
        self.generate_calls = 0

    def _round_to_dtype(self) -> None:
        with torch.no_grad():
            for param in self.hf.parameters():
                param.copy_(param.to(self.dtype).float())

    # ---------------------------------------------------------------------------------------------
    def _collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None, **_: Any) -> list:
        handler = {"update_weights": self._update_weights, "sleep": self._sleep, "wakeup": self._wakeup}[method]
        return handler(*args, **(kwargs or {}))

    def _sleep(self, tags: List[str]) -> list:
        self._check_tags(tags)
        weight_bytes = sum(p.numel() for p in self.hf.parameters()) * self.dtype.itemsize // self.tensor_parallel_size
        pinned = weight_bytes if "model" in tags and "model" not in self.asleep else 0
        record({"call": "sleep", "tags": list(tags), "pinned_host_bytes": pinned})
        self.asleep |= set(tags)
        return [None] * self.tensor_parallel_size

    def _wakeup(self, tags: List[str]) -> list:
        record({"call": "wakeup", "tags": list(tags)})
        self._check_tags(tags)
        self.asleep -= set(tags)
        return [None] * self.tensor_parallel_size

    def _check_tags(self, tags: List[str]) -> None:
        if not self.enable_sleep:
            raise ValueError("Sleep feature is not enabled, please set enable_sleep=True in the LLM arguments.")
        unknown = [t for t in tags if t not in MEMORY_TAGS]
        if unknown:
            raise ValueError(f"Unknown memory tag {unknown}")

    def _update_weights(self, ipc_handles: Optional[dict] = None) -> list:
        if "model" in self.asleep:
            raise RuntimeError("update_weights while the model weights are released")
        if ipc_handles is None:
            record({"call": "update_weights", "final": True})
            return [None] * self.tensor_parallel_size
        per_worker = []
        for device in self._executor.report_device_ids():
            if device not in ipc_handles:
                raise ValueError(f"Device UUID {device} not found in ipc_handles")
            per_worker.append({name: func(*args).detach().clone() for name, (func, args) in ipc_handles[device]})
        first = per_worker[0]
        for tensors in per_worker[1:]:  # stand-in strictness: each worker rebuilds its own copy
            if tensors.keys() != first.keys() or any(not torch.equal(tensors[k], first[k]) for k in first):
                raise ValueError("the workers of one engine received different tensors")
        params = dict(self.hf.named_parameters())
        loaded = sorted(name for name in first if name in params)
        record({"call": "update_weights", "final": False, "devices": sorted(ipc_handles),
                "tensors": [[name, list(t.shape)] for name, t in first.items()],
                "ignored": sorted(set(first) - set(params))})
        with torch.no_grad():
            for name in loaded:
                if first[name].shape != params[name].shape:
                    raise ValueError(f"{name}: shape {tuple(first[name].shape)}, model {tuple(params[name].shape)}")
                params[name].copy_(first[name].to(self.dtype).float())
        return [None] * self.tensor_parallel_size

    # ---------------------------------------------------------------------------------------------
    def generate(self, inputs: List[Dict[str, List[int]]], sampling_params: List[SamplingParams],
                 use_tqdm: bool = True) -> List[RequestOutput]:
        self.generate_calls += 1
        record({"call": "generate", "requests": len(inputs), "seeds": [sp.seed for sp in sampling_params],
                "params": [{k: v for k, v in asdict(sp).items() if k not in ("seed", "_stop_word_ids")}
                           for sp in sampling_params]})
        if self.asleep:
            raise RuntimeError(f"generate while {sorted(self.asleep)} are released")
        for sp in sampling_params:  # _prepare_sampling_params
            if sp.end_id is None:
                sp._setup(self.tokenizer)
        fail_at = FAIL["generate"] or int(os.environ.get("TRTLLM_STUB_FAIL_GENERATE", "0"))
        outputs = []
        for i, (request, sp) in enumerate(zip(inputs, sampling_params)):
            if fail_at == self.generate_calls and i == len(inputs) // 2:
                raise RuntimeError("stub: injected executor failure")
            outputs.append(RequestOutput(request["prompt_token_ids"], [self._sample(request["prompt_token_ids"], sp)]))
        return outputs

    @torch.no_grad()
    def _sample(self, prompt: List[int], sp: SamplingParams) -> CompletionOutput:
        words = sp._get_stop_words()
        trtllm_sampler = self.sample_step is trtllm_sampler_step
        generator = torch.Generator().manual_seed(int(sp.seed or 0)) if trtllm_sampler else self.global_generator
        ids, tokens, logprobs = list(prompt), [], []
        for _ in range(sp.max_tokens):
            logits = self.hf(torch.tensor([ids])).logits[0, -1].double()
            token, entry = self.sample_step(logits, sp, generator)
            ids.append(token)
            if token == sp.end_id and trtllm_sampler:
                return CompletionOutput(0, tokens, logprobs, "stop", None)
            tokens.append(token)
            logprobs.append(entry)
            if token == sp.end_id:
                return CompletionOutput(0, tokens, logprobs, "stop", None)
            for word in words:
                if word and tokens[-len(word):] == word:
                    single = len(word) == 1 and token in (sp.stop_token_ids or [])
                    reason = token if single else sp.stop_strings[words.index(word) - len(sp.stop_token_ids or [])]
                    if not sp.include_stop_str_in_output:
                        del tokens[-len(word):], logprobs[-len(word):]
                    return CompletionOutput(0, tokens, logprobs, "stop", reason)
        return CompletionOutput(0, tokens, logprobs, "length", None)
