"""The ``trtllm`` rollout engine: TensorRT-LLM generation with the policy's weights refitted in place.

One engine per model-parallel group (TP x PP ranks of one replica), colocated with training: the
group's first rank owns a ``tensorrt_llm.LLM`` (PyTorch backend, Ray orchestrator) whose workers run
with tensor parallel = TP x PP on the group's GPUs. Every step::

    release()              before training: the engine's KV cache and weights are put to sleep
    generate(...)          wake up -> refit (the policy's current weights) -> generate -> results
                           broadcast to every rank of the group

Refit (never during a generation, always before the first one after a release): the policy's
weights as Hugging Face tensors (:class:`clipo_nemo.rollout.refit.HFWeightStream`: gathered over TP
with ``all_gather``, broadcast over PP, named by the conversion mapping) are shared in buckets of
``rollout.trtllm_refit_bucket_mb`` through CUDA IPC handles, ``{device UUID: [(HF name, handle)]}``
gathered from every GPU of the group, and loaded with ``update_weights(handles)``; a final
``update_weights(None)`` finishes the load and resets the prefix cache. No engine rebuild.

Sampling: every response is its own request (``n=1``, ``best_of=1``) with an explicit seed mixed
from its prompt's seed (the loop derives it from ``rollout.seed``, the step and the prompt) and its
response index (:func:`response_seed`): left alone, TensorRT-LLM seeds every request alike, which
correlates the ``n`` responses of a prompt. The KV-cache block reuse serves the shared prompt
prefill. Responses come back as token ids with the log-prob of each sampled token
(``RolloutOutput.logprobs``); pooled hidden states still come from the megatron-core log-prob pass.
Stop strings are matched by TensorRT-LLM as token sequences (the tokenizer's encoding of the
string), not as decoded text like the megatron engine.

TensorRT-LLM APIs used, all of the 1.2 release line (target: >= 1.2, checked at import). They were
read from TensorRT-LLM's sources and docs; the first release of each was not pinned down further, and
the code ran only against ``tests/stubs/tensorrt_llm``, never a real installation or a GPU:

- ``tensorrt_llm.LLM(model, tokenizer, tensor_parallel_size, dtype, load_format="dummy",
  orchestrator_type="ray", ray_worker_extension_cls="tensorrt_llm.llmapi.rlhf_utils.WorkerExtension",
  enable_sleep=True, kv_cache_config, max_batch_size, max_seq_len)`` (the LLM API's PyTorch backend,
  the default ``LLM`` since 1.0; the Ray orchestrator and its RL worker extension are prototypes);
- ``LLM.generate(inputs=[{"prompt_token_ids": ...}], sampling_params=[...], use_tqdm=False)`` and
  ``RequestOutput.outputs[0]`` (``token_ids``, ``logprobs``, ``finish_reason``, ``stop_reason``);
- ``tensorrt_llm.SamplingParams(n, best_of, max_tokens, end_id, pad_id, stop_token_ids, stop,
  include_stop_str_in_output, temperature, top_k, top_p, seed, logprobs, detokenize)``;
- ``tensorrt_llm.llmapi.KvCacheConfig(free_gpu_memory_fraction, enable_block_reuse)``;
- ``LLM._collective_rpc("update_weights", args=(handles | None,))`` -> ``WorkerExtension
  .update_weights`` (``tensorrt_llm/llmapi/rlhf_utils.py``, 1.2);
- ``LLM._collective_rpc("sleep" | "wakeup", args=(tags,))`` -> the Ray worker's ``sleep`` /
  ``wakeup`` with ``ExecutorMemoryType`` tags ``"kv_cache"`` and ``"model"`` (1.2; later releases
  add ``LLM.release()/resume()`` and a ``sleep_config`` instead of ``enable_sleep``);
- ``tensorrt_llm._torch.utils.get_device_uuid(device_index)`` (the key ``update_weights`` looks up).

Not handled yet: placing the Ray workers on exactly the group's GPUs (TensorRT-LLM's Ray placement
options); as it is, the engine of a group uses the GPUs its first rank's process sees, which is right
only when those are the group's own (one group per node with CUDA_VISIBLE_DEVICES set accordingly).
Whether TensorRT-LLM's returned log-probs are those of the temperature-scaled distribution (as the
trainer's are) is for the mismatch metric to show on a GPU.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from clipo_nemo.parallel.gather import broadcast_object
from clipo_nemo.rollout.base import (
    FINISH_LENGTH, FINISH_STOP, GenerationParams, RolloutOutput, register_rollout_engine, validate_prompts)
from clipo_nemo.rollout.refit import HFWeightStream, buckets, share_tensor

TRTLLM_CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release (a 1.2.x tag)"
MIN_RELEASE = (1, 2)
WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
SLEEP_TAGS = ("kv_cache", "model")  # ExecutorMemoryType values: the KV cache, the model engine (weights)
_FINISH = {"stop": FINISH_STOP, "length": FINISH_LENGTH}
_MIB = 2**20


class TrtllmEngineError(RuntimeError):
    """TensorRT-LLM failed (generation, refit, sleep or wake-up); no output of the call is used."""


def import_tensorrt_llm():
    """The ``tensorrt_llm`` module (>= 1.2), or an ImportError naming the container that carries it."""
    try:
        import tensorrt_llm
    except ImportError as err:
        raise ImportError(
            f"rollout.engine=trtllm needs TensorRT-LLM >= {'.'.join(map(str, MIN_RELEASE))} (the tensorrt_llm "
            f"package, PyTorch backend), which cannot be imported here ({err}). Run in NVIDIA's TensorRT-LLM "
            f"container {TRTLLM_CONTAINER}, or use rollout.engine=megatron.") from err
    version = getattr(tensorrt_llm, "__version__", "0")
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if release < MIN_RELEASE:
        raise ImportError(f"rollout.engine=trtllm needs TensorRT-LLM >= {'.'.join(map(str, MIN_RELEASE))}, found "
                          f"{version}: use the container {TRTLLM_CONTAINER}")
    return tensorrt_llm


def response_seed(prompt_seed: int, response_index: int) -> int:
    """The sampling seed of response ``response_index`` of a prompt seeded ``prompt_seed``: the two
    mixed by numpy's ``SeedSequence`` into 63 bits, so responses of a prompt and prompts of a step
    get unrelated streams, and the same (seed, index) gives the same seed in every run."""
    if prompt_seed < 0 or response_index < 0:
        raise ValueError(f"seeds must be non-negative, got seed={prompt_seed}, response_index={response_index}")
    low, high = np.random.SeedSequence([prompt_seed, response_index]).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def sampling_params(tllm, params: GenerationParams, seed: int, eos_token_ids: Sequence[int], pad_token_id: int):
    """The ``SamplingParams`` of one response: ``n=1`` and ``best_of=1`` (never more candidates than
    returned), greedy as ``top_k=1``, the first EOS id as ``end_id`` and the others as stop tokens,
    stop strings kept in the output (as the megatron engine keeps the completing token), the
    sampled token's log-prob (``logprobs=1``), no detokenisation."""
    greedy = params.temperature == 0.0 or params.top_k == 1
    return tllm.SamplingParams(
        n=1, best_of=1, max_tokens=params.max_new_tokens, end_id=int(eos_token_ids[0]), pad_id=int(pad_token_id),
        stop_token_ids=[int(i) for i in eos_token_ids[1:]] or None, stop=list(params.stop) or None,
        include_stop_str_in_output=True, temperature=None if greedy else params.temperature,
        top_k=1 if greedy else params.top_k, top_p=None if greedy else params.top_p, seed=seed, logprobs=1,
        detokenize=False,
    )


@dataclass
class TrtllmRolloutOutput(RolloutOutput):
    """:class:`RolloutOutput` plus ``logprobs`` [N, T] float32: the engine's log-prob of each
    response token (NaN past a response's end and where the engine gave none)."""

    logprobs: Optional[torch.Tensor] = None


def _token_logprob(entry, token: int) -> float:
    """The sampled token's log-prob from one position of ``CompletionOutput.logprobs`` (a dict
    token -> Logprob, or a float)."""
    if isinstance(entry, dict):
        if token not in entry:
            raise TrtllmEngineError(f"TensorRT-LLM returned no log-prob for the sampled token {token}")
        entry = entry[token]
    return float(getattr(entry, "logprob", entry))


def read_completion(output, eos_token_ids: Sequence[int]) -> Tuple[List[int], List[float], str]:
    """(token ids, their log-probs, finish reason) of one ``CompletionOutput``.

    A response that stopped at an EOS / stop token the engine left out of ``token_ids`` gets it
    appended (log-prob NaN: not scored), so the policy learns to end as the megatron engine's
    responses teach it. An unfinished or cancelled output is an error.
    """
    tokens = [int(t) for t in output.token_ids]
    if output.finish_reason not in _FINISH:
        raise TrtllmEngineError(f"a TensorRT-LLM request ended with finish_reason={output.finish_reason!r}")
    logprobs = [_token_logprob(entry, token) for entry, token in zip(output.logprobs or [], tokens)]
    if len(logprobs) != len(tokens):
        raise TrtllmEngineError(f"TensorRT-LLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
    stop_token = output.stop_reason if isinstance(output.stop_reason, int) else (
        int(eos_token_ids[0]) if output.stop_reason is None else None)
    if output.finish_reason == "stop" and stop_token is not None and (not tokens or tokens[-1] != stop_token):
        tokens.append(stop_token)
        logprobs.append(math.nan)
    return tokens, logprobs, _FINISH[output.finish_reason]


@register_rollout_engine("trtllm")
def build_trtllm_engine(model: torch.nn.Module, tokenizer, cfg) -> "TrtllmRolloutEngine":
    """The registry's factory (imports ``tensorrt_llm`` only now: a clear error without it)."""
    return TrtllmRolloutEngine(model, tokenizer, cfg, import_tensorrt_llm())


class TrtllmRolloutEngine:
    """See the module docstring. ``cfg`` is the whole :class:`clipo_nemo.config.ClipoConfig`.

    Counters for checks: ``refits`` (completed weight updates) and ``generations``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, cfg, tllm):
        from megatron.core import parallel_state

        self.model, self.tokenizer, self.cfg, self.tllm = model, tokenizer, cfg, tllm
        self.vocab_size = cfg.model.vocab_size
        eos = tokenizer.eos_token_id
        if eos is None or not 0 <= eos < self.vocab_size:
            raise ValueError(f"the tokenizer's eos_token_id={eos} must be an id in [0, {self.vocab_size})")
        self.eos_token_ids = [int(eos)]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.group = parallel_state.get_model_parallel_group()
        self.group_size = dist.get_world_size(self.group)
        self.group_rank = dist.get_rank(self.group)
        self.leader = dist.get_global_rank(self.group, 0)
        self.llm = None  # on the group's first rank only
        self.started = self.awake = False
        self.stale = True  # the engine's weights are not the policy's (none loaded yet)
        self.generating = False
        self.refits = self.generations = 0
        self._workdir: Optional[tempfile.TemporaryDirectory] = None

    # ----------------------------------------------------------------------------------------------
    def _on_leader(self, what: str, action):
        """Run ``action`` on the group's first rank; every rank raises TrtllmEngineError if it failed."""
        status = None
        if self.group_rank == 0:
            try:
                action()
            except Exception as err:  # noqa: BLE001  (re-raised on every rank below, with its text)
                status = f"{type(err).__name__}: {err}"
        status = broadcast_object(status, self.leader, self.group)
        if status is not None:
            raise TrtllmEngineError(f"TensorRT-LLM failed during {what}: {status}")

    def _build_llm(self) -> None:
        """The engine, from a directory holding only config.json and the tokenizer (dummy weights:
        the first refit loads the policy's)."""
        import json

        from clipo_nemo.config import max_sequence_length
        from clipo_nemo.conversion.mapping import hf_config_from_model, infer_architecture
        from tensorrt_llm.llmapi import KvCacheConfig

        self._workdir = tempfile.TemporaryDirectory(prefix="clipo-trtllm-")
        directory = Path(self._workdir.name)
        config = hf_config_from_model(self.cfg.model, infer_architecture(self.cfg.model))
        config.update(eos_token_id=self.eos_token_ids[0], pad_token_id=self.pad_token_id)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        self.tokenizer.save_pretrained(str(directory))
        roll = self.cfg.rollout
        self.llm = self.tllm.LLM(
            model=str(directory), tokenizer=str(directory), tensor_parallel_size=self.group_size,
            dtype=self.cfg.model.params_dtype, load_format="dummy", orchestrator_type="ray",
            ray_worker_extension_cls=WORKER_EXTENSION, enable_sleep=True,
            kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=roll.trtllm_kv_cache_fraction, enable_block_reuse=True),
            max_batch_size=roll.max_batch_size or 256, max_seq_len=max_sequence_length(self.cfg),
        )

    def _device_key(self) -> str:
        from tensorrt_llm._torch.utils import get_device_uuid

        index = torch.cuda.current_device() if torch.cuda.is_available() else self.group_rank
        return get_device_uuid(index)

    # ----------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Put the engine's KV cache and weights to sleep before training (collective over the group);
        the next generation wakes it up and refits first."""
        if self.generating:
            raise RuntimeError("release() during a generation")
        self.stale = True  # training is about to change the weights
        if self.started and self.awake:
            self._on_leader("sleep", lambda: self.llm._collective_rpc("sleep", args=(list(SLEEP_TAGS),)))
            self.awake = False

    def _prepare(self) -> None:
        """Before generating: build (first call), wake up, refit when the weights are stale."""
        if not self.started:
            self._on_leader("engine start", self._build_llm)
            self.started = self.awake = True
        if not self.awake:
            self._on_leader("wake-up", lambda: self.llm._collective_rpc("wakeup", args=(list(SLEEP_TAGS),)))
            self.awake = True
        if self.stale:
            self._refit()

    def _refit(self) -> None:
        """Push the policy's current weights (every rank of the group; see the module docstring)."""
        key = self._device_key()
        budget = int(self.cfg.rollout.trtllm_refit_bucket_mb * _MIB)
        for bucket in buckets(iter(HFWeightStream(self.model, self.cfg.model)), budget):
            mine = {key: [(name, share_tensor(tensor)) for name, tensor in bucket]}
            gathered = [None] * self.group_size if self.group_rank == 0 else None
            if self.group_size > 1:
                dist.gather_object(mine, gathered, dst=self.leader, group=self.group)
            else:
                gathered = [mine]
            handles = {k: v for part in (gathered or []) for k, v in part.items()}
            # The bucket's tensors stay alive until every rank has heard the engine loaded them.
            self._on_leader("a weight update", lambda: self.llm._collective_rpc("update_weights", args=(handles,)))
        self._on_leader("the end of a weight update", lambda: self.llm._collective_rpc("update_weights", args=(None,)))
        self.stale = False
        self.refits += 1

    # ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams,
                 seeds: Sequence[int]) -> TrtllmRolloutOutput:
        """``params.n`` responses per prompt, rows ``i*n .. i*n+n-1`` for ``prompts[i]``; response
        ``j`` of prompt ``i`` is sampled with ``response_seed(seeds[i], j)``. Collective over the
        model-parallel group; raises TrtllmEngineError (on every rank) when the engine fails, and
        then nothing of the batch is returned."""
        from clipo_nemo.config import max_sequence_length

        validate_prompts(prompts, seeds, self.vocab_size)
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if longest > max_sequence_length(self.cfg):
            raise ValueError(f"longest prompt + max_new_tokens = {longest} exceeds the engine's max_seq_len "
                             f"{max_sequence_length(self.cfg)} (data.max_prompt_length + rollout.max_new_tokens)")
        self._prepare()
        results: List = []

        def run() -> None:
            requests = [{"prompt_token_ids": [int(t) for t in prompt]} for prompt in prompts for _ in range(params.n)]
            sampling = [sampling_params(self.tllm, params, response_seed(int(seed), j), self.eos_token_ids,
                                        self.pad_token_id) for seed in seeds for j in range(params.n)]
            outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
            if len(outputs) != len(requests):
                raise TrtllmEngineError(f"{len(outputs)} outputs for {len(requests)} requests")
            results.extend(read_completion(out.outputs[0], self.eos_token_ids) for out in outputs)
            bad = sorted({t for tokens, _, _ in results for t in tokens if not 0 <= t < self.vocab_size})
            if bad:
                raise TrtllmEngineError(f"TensorRT-LLM returned token ids outside [0, {self.vocab_size}): {bad[:5]}")

        self.generating = True
        try:
            self._on_leader(f"generation of {len(prompts)} prompts x {params.n} responses (no response of this "
                            "batch is used)", run)
        finally:
            self.generating = False
        self.generations += 1
        return self._output(broadcast_object(results, self.leader, self.group), len(prompts), params.n)

    def _output(self, results, num_prompts: int, n: int) -> TrtllmRolloutOutput:
        lengths = torch.tensor([len(tokens) for tokens, _, _ in results], dtype=torch.long)
        width = max(int(lengths.max()), 1)
        tokens = torch.full((len(results), width), self.pad_token_id, dtype=torch.long)
        logprobs = torch.full((len(results), width), math.nan, dtype=torch.float32)
        for row, (ids, lps, _) in enumerate(results):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[row, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return TrtllmRolloutOutput(tokens, lengths, [reason for _, _, reason in results],
                                   torch.arange(num_prompts).repeat_interleave(n), self.pad_token_id, logprobs)
