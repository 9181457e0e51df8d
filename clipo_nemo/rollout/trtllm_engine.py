"""The ``trtllm`` rollout engine: TensorRT-LLM generation with the policy's weights refitted in place.

One engine per model-parallel group (TP x PP ranks of one replica), colocated with training: the
group's first rank (the leader) owns a ``tensorrt_llm.LLM`` (PyTorch backend, Ray orchestrator) whose
workers run with tensor parallel = TP x PP on exactly the group's GPUs. Every step::

    release()              before training: the engine's memory is put to sleep
    generate(...)          free the trainer's cached memory -> wake the weights -> refit -> free the
                           refit's buffers -> wake the KV cache and the rest -> check the refit
                           (probe) -> generate -> results broadcast to the group (gloo)

How each real-library behaviour is handled (TensorRT-LLM release/1.2 sources; the review
``docs/reviews/trtllm.md`` of the shared folder quotes each):

1. MPI at import: ``tensorrt_llm/_utils.py`` initialises MPI when imported. Only group leaders
   import it, lazily, inside :func:`~clipo_nemo.rollout.trtllm_placement.leader_environment`
   (launcher MPI variables dropped, ``TLLM_DISABLE_MPI=1``); other ranks only check it is installed
   (``importlib.util.find_spec``) and compute device UUIDs themselves.
2. Placement: ``executor/ray_executor.py`` ``RayExecutor`` places workers by Ray's free-GPU order,
   not by torchrun rank. The leader builds its engine in a private Ray cluster
   (``TLLM_RAY_FORCE_LOCAL_CLUSTER=1``) that sees only the group's GPUs (``CUDA_VISIBLE_DEVICES``),
   then checks ``RayExecutor.report_device_ids()`` against the group's UUIDs and stops naming both
   lists when they differ. A group spanning hosts is refused (config: ``rollout.trtllm_gpus_per_node``).
3. Log-probs: ``_torch/pyexecutor/sampler.py`` ``TorchSampler`` (1.2's default) returns the top-k of
   the raw distribution, not the sampled token. The engine asks for ``sampler_type="TRTLLMSampler"``,
   whose log-prob is the sampled token's under ``log_softmax(logits / T)`` over the full vocabulary
   (top-k / top-p not renormalised) -- the trainer's definition (``models/logprobs.py``), so the
   mismatch metric and ``actor.tis_cap`` compare like with like. The C++ decoder drops the end token
   and its log-prob: :func:`read_completion` puts the token back with a NaN log-prob (not scored).
4. Memory: before waking, the trainer's cached blocks are returned (``torch.cuda.empty_cache``); the
   weights wake first, the refit runs, its buffers are freed, then the KV cache wakes. The KV cache is
   sized in tokens from ``rollout.trtllm_kv_cache_gb`` (``KvCacheConfig.max_tokens``) -- what the
   planner counts -- with ``trtllm_kv_cache_fraction`` as an upper bound. CUDA IPC handles are not
   made under ``expandable_segments:True`` (verl turns it off for the same reason): refused.
5. Non-leaders wait on a gloo group over the same ranks, not on NCCL.
6. Versions: ``1.2 <= version < 1.3`` (1.3 replaced ``enable_sleep`` by ``sleep_config`` and split
   the weights' memory tag; ``BaseLLM.__init__`` rejects unknown keywords). float32 engines are
   refused at config time (``rollout.trtllm_dtype``).
7. Stop strings: ``llmapi/llm.py`` ``_prepare_sampling_params`` tokenizes them (``_setup``) only when
   ``end_id is None``: the engine never sets ``end_id`` / ``pad_id`` (``_setup`` takes both from the
   engine's tokenizer, whose EOS is the model's).
8. Sleep cost: in 1.2 the ``model`` memory scope is restored from a pinned host copy
   (``py_executor_creator.py``: ``RestoreMode.PINNED``), which the refit then overwrites.
   ``rollout.trtllm_sleep_weights=false`` keeps the weights resident (no copy; the planner counts
   them during training); ``timings`` records each sleep and wake-up.
9. Partial loading: ``llmapi/rlhf_utils.py`` ``WorkerExtension.update_weights`` ignores unknown names
   (``allow_partial_loading=True``). After each refit the engine's log-probs of a fixed probe are
   compared with the trainer's; a mean difference above ``rollout.trtllm_refit_check_tolerance`` stops.
10. Seeds: ``TRTLLMSampler`` seeds each request with ``SamplingParams.seed`` (C++
    ``SamplingConfig.random_seed``; default 0 for all); :func:`response_seed` gives each response its
    own, so the same run seed gives the same rollouts in a fresh process on the same engine build.

Refit: the policy's weights as Hugging Face tensors (:class:`clipo_nemo.rollout.refit.HFWeightStream`)
in buckets of ``rollout.trtllm_refit_bucket_mb``, as CUDA IPC handles ``{device UUID: [(HF name,
handle)]}`` gathered from every GPU of the group, loaded with ``update_weights(handles)`` and finished
with ``update_weights(None)``. Checked only against ``tests/stubs/tensorrt_llm`` (a stand-in written
from those sources); what has run on hardware is in the README.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from clipo_nemo.parallel.gather import broadcast_object
from clipo_nemo.rollout.base import (
    FINISH_LENGTH, FINISH_STOP, GenerationParams, RolloutOutput, register_rollout_engine, validate_prompts)
from clipo_nemo.rollout.megatron_engine import kv_cache_bytes_per_row
from clipo_nemo.rollout.refit import HFWeightStream, buckets, share_tensor
from clipo_nemo.rollout.trtllm_placement import (
    cpu_group_of, group_host_problem, leader_environment, local_gpu, placement_problem)

TRTLLM_CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release (a 1.2.x tag)"
SUPPORTED_RELEASES = ((1, 2), (1, 3))  # [first, last): 1.3 renamed the sleep arguments and memory tags
WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
SAMPLER = "TRTLLMSampler"  # returns the sampled token's log-prob, honours per-request seeds
# ExecutorMemoryType tags released while training (verl's list): the weights, then everything else.
WEIGHT_TAGS = ("model", "draft_model")
OTHER_TAGS = ("sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra", "executor_extra",
              "kv_cache")
PROBE_TOKENS = 8  # tokens of the post-refit probe
_FINISH = {"stop": FINISH_STOP, "length": FINISH_LENGTH}
_MIB, _GIB = 2**20, 2**30


class TrtllmEngineError(RuntimeError):
    """TensorRT-LLM failed (generation, refit, sleep or wake-up); no output of the call is used."""


def _range_text() -> str:
    (a, b), (c, d) = SUPPORTED_RELEASES
    return f">= {a}.{b}, < {c}.{d}"


def require_tensorrt_llm() -> None:
    """ImportError naming the container when ``tensorrt_llm`` is not installed; imports nothing."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise ImportError(
            f"rollout.engine=trtllm needs TensorRT-LLM {_range_text()} (the tensorrt_llm package, PyTorch backend), "
            f"which is not installed here. Run in NVIDIA's TensorRT-LLM container {TRTLLM_CONTAINER} (the "
            "Dockerfile's trtllm target), or use rollout.engine=megatron.")


def import_tensorrt_llm():
    """The ``tensorrt_llm`` module of a supported release (call in :func:`leader_environment`)."""
    require_tensorrt_llm()
    import tensorrt_llm

    version = getattr(tensorrt_llm, "__version__", "0")
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if not SUPPORTED_RELEASES[0] <= release < SUPPORTED_RELEASES[1]:
        raise ImportError(f"rollout.engine=trtllm supports TensorRT-LLM {_range_text()}, found {version} (1.3 "
                          f"replaced enable_sleep by sleep_config and renamed the memory tags): use the container "
                          f"{TRTLLM_CONTAINER}")
    return tensorrt_llm


def response_seed(prompt_seed: int, response_index: int) -> int:
    """The sampling seed of response ``response_index`` of a prompt seeded ``prompt_seed``: the two
    mixed by numpy's ``SeedSequence`` into 63 bits, so responses of a prompt and prompts of a step
    get unrelated streams, and the same (seed, index) gives the same seed in every run."""
    if prompt_seed < 0 or response_index < 0:
        raise ValueError(f"seeds must be non-negative, got seed={prompt_seed}, response_index={response_index}")
    low, high = np.random.SeedSequence([prompt_seed, response_index]).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)


def sampling_params(tllm, params: GenerationParams, seed: int, extra_stop_token_ids: Sequence[int] = ()):
    """The ``SamplingParams`` of one response: ``n=1`` and ``best_of=1``, greedy as ``top_k=1``, no
    ``end_id`` / ``pad_id`` (so that ``_setup`` runs: it takes both from the engine's tokenizer and
    tokenizes the stop strings), further end tokens as stop tokens, stop strings kept in the output
    (as the megatron engine keeps the completing token), the sampled token's log-prob
    (``logprobs=1`` under TRTLLMSampler), no detokenisation."""
    greedy = params.temperature == 0.0 or params.top_k == 1
    return tllm.SamplingParams(
        n=1, best_of=1, max_tokens=params.max_new_tokens,
        stop_token_ids=[int(i) for i in extra_stop_token_ids] or None, stop=list(params.stop) or None,
        include_stop_str_in_output=True, temperature=None if greedy else params.temperature,
        top_k=1 if greedy else params.top_k, top_p=None if greedy else params.top_p, seed=seed, logprobs=1,
        detokenize=False,
    )


@dataclass
class TrtllmRolloutOutput(RolloutOutput):
    """:class:`RolloutOutput` plus ``logprobs`` [N, T] float32: the engine's log-prob of each
    response token under ``softmax(logits / T)`` over the full vocabulary (NaN past a response's end
    and for an end token the engine dropped)."""

    logprobs: Optional[torch.Tensor] = None


def _token_logprob(entry, token: int) -> float:
    """The sampled token's log-prob from one position of ``CompletionOutput.logprobs``."""
    if isinstance(entry, dict):
        if token not in entry:
            raise TrtllmEngineError(f"TensorRT-LLM returned no log-prob for the sampled token {token} (a sampler "
                                    f"other than {SAMPLER} returns the top-k of the raw distribution)")
        entry = entry[token]
    return float(getattr(entry, "logprob", entry))


def read_completion(output, eos_token_ids: Sequence[int]) -> Tuple[List[int], List[float], str]:
    """(token ids, their log-probs, finish reason) of one ``CompletionOutput``.

    A response that stopped at an EOS / stop token the engine left out of ``token_ids`` (the C++
    decoder drops the end token and its log-prob) gets it appended (log-prob NaN: not scored), so the
    policy learns to end as the megatron engine's responses teach it. An unfinished or cancelled
    output is an error.
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


def release_cached_memory() -> None:
    """Return the trainer's cached allocator blocks to the device before the engine maps memory."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()


def refuse_expandable_segments() -> None:
    """CUDA IPC handles of expandable-segment memory are not importable by the engine's workers."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if "expandable_segments:true" in os.environ.get(name, "").replace(" ", "").lower():
            raise ValueError(f"{name}={os.environ[name]!r}: rollout.engine=trtllm shares the policy's weights through "
                             "CUDA IPC handles, which expandable segments break (verl turns them off too); unset it")


def kv_cache_tokens(cfg) -> int:
    """Tokens the engine's KV cache holds per GPU: ``rollout.trtllm_kv_cache_gb`` over one token's
    keys and values at tensor parallel TP x PP in ``rollout.trtllm_dtype``."""
    mp = cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size
    per_token = kv_cache_bytes_per_row(cfg.model, mp, 1, 1, 2)  # bfloat16 / float16: 2 bytes
    return int(cfg.rollout.trtllm_kv_cache_gb * _GIB // per_token)


def probe_prompt(vocab_size: int) -> List[int]:
    """The fixed prompt of the post-refit check."""
    return [(7 * i + 3) % vocab_size for i in range(8)]


@register_rollout_engine("trtllm")
def build_trtllm_engine(model: torch.nn.Module, tokenizer, cfg) -> "TrtllmRolloutEngine":
    """The registry's factory: checks that ``tensorrt_llm`` is installed (only leaders import it)."""
    require_tensorrt_llm()
    return TrtllmRolloutEngine(model, tokenizer, cfg)


class TrtllmRolloutEngine:
    """See the module docstring. ``cfg`` is the whole :class:`clipo_nemo.config.ClipoConfig`.

    Built on every rank of the world together (it creates the gloo groups). Counters for checks:
    ``refits`` (completed weight updates), ``generations``, ``probe_mismatch`` (the last refit
    check's mean |logp_engine - logp_trainer|) and ``timings`` (seconds of the last sleep, wake-up).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, cfg):
        from megatron.core import parallel_state

        refuse_expandable_segments()
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.vocab_size = cfg.model.vocab_size
        eos = tokenizer.eos_token_id
        if eos is None or not 0 <= eos < self.vocab_size:
            raise ValueError(f"the tokenizer's eos_token_id={eos} must be an id in [0, {self.vocab_size})")
        self.eos_token_ids = [int(eos)]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        group = parallel_state.get_model_parallel_group()
        self.group_size = dist.get_world_size(group)
        self.group_rank = dist.get_rank(group)
        self.leader = dist.get_global_rank(group, 0)
        self.cpu_group = cpu_group_of(group)  # every wait on the leader goes through gloo
        self.gpus = [None] * self.group_size
        dist.all_gather_object(self.gpus, local_gpu(), group=self.cpu_group)
        self.device_key = local_gpu()[2]
        self.tllm = self.llm = None  # on the group's leader only
        self.started = False
        self.asleep: Tuple[str, ...] = ()
        self.stale = True  # the engine's weights are not the policy's (none loaded yet)
        self.generating = False
        self.refits = self.generations = 0
        self.probe_mismatch = math.nan
        self.timings: Dict[str, float] = {}
        self._workdir: Optional[tempfile.TemporaryDirectory] = None

    # ----------------------------------------------------------------------------------------------
    def _on_leader(self, what: str, action):
        """Run ``action`` on the group's leader; every rank raises TrtllmEngineError if it failed."""
        status = None
        if self.group_rank == 0:
            try:
                action()
            except Exception as err:  # noqa: BLE001  (re-raised on every rank below, with its text)
                status = f"{type(err).__name__}: {err}"
        status = broadcast_object(status, self.leader, self.cpu_group)
        if status is not None:
            raise TrtllmEngineError(f"TensorRT-LLM failed during {what}: {status}")

    def _rpc(self, method: str, arg) -> None:
        self.llm._collective_rpc(method, args=(arg,))

    def _build_llm(self) -> None:
        """Import TensorRT-LLM and build the engine on the group's GPUs, from a directory holding only
        config.json and the tokenizer (dummy weights: the first refit loads the policy's)."""
        from clipo_nemo.config import max_sequence_length
        from clipo_nemo.conversion.mapping import hf_config_from_model, infer_architecture

        problem = group_host_problem(self.gpus)
        if problem:
            raise RuntimeError(problem)
        self._workdir = tempfile.TemporaryDirectory(prefix="clipo-trtllm-")
        directory = Path(self._workdir.name)
        config = hf_config_from_model(self.cfg.model, infer_architecture(self.cfg.model))
        config.update(eos_token_id=self.eos_token_ids[0], pad_token_id=self.pad_token_id)
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        self.tokenizer.save_pretrained(str(directory))
        roll = self.cfg.rollout
        with leader_environment([physical for _, physical, _ in self.gpus]):
            self.tllm = import_tensorrt_llm()
            from tensorrt_llm.llmapi import KvCacheConfig

            self.llm = self.tllm.LLM(
                model=str(directory), tokenizer=str(directory), tensor_parallel_size=self.group_size,
                dtype=roll.trtllm_dtype, load_format="dummy", orchestrator_type="ray",
                ray_worker_extension_cls=WORKER_EXTENSION, enable_sleep=True, sampler_type=SAMPLER,
                kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=roll.trtllm_kv_cache_fraction,
                                              max_tokens=kv_cache_tokens(self.cfg), enable_block_reuse=True),
                max_batch_size=roll.max_batch_size or 256, max_seq_len=max_sequence_length(self.cfg),
            )
        problem = placement_problem(self.llm._executor.report_device_ids(), [uuid for _, _, uuid in self.gpus])
        if problem:
            raise RuntimeError(problem)

    def _timed(self, name: str, what: str, method: str, tags: Sequence[str]) -> None:
        start = time.perf_counter()
        self._on_leader(what, lambda: self._rpc(method, list(tags)))
        self.timings[name] = time.perf_counter() - start

    # ----------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Put the engine to sleep before training (collective over the group): every memory tag, or
        all but the weights with ``rollout.trtllm_sleep_weights=false``; the next generation wakes it
        up and refits first."""
        if self.generating:
            raise RuntimeError("release() during a generation")
        self.stale = True  # training is about to change the weights
        if self.started and not self.asleep:
            tags = (WEIGHT_TAGS if self.cfg.rollout.trtllm_sleep_weights else ()) + OTHER_TAGS
            self._timed("sleep_s", "sleep", "sleep", tags)
            self.asleep = tags

    def _prepare(self) -> None:
        """Before generating: build (first call), wake up around the refit, check the refit."""
        if not self.started:
            self._on_leader("engine start", self._build_llm)
            self.started = True
        weights = tuple(t for t in self.asleep if t in WEIGHT_TAGS)
        rest = tuple(t for t in self.asleep if t not in WEIGHT_TAGS)
        if self.asleep:
            release_cached_memory()  # the training step's cached peak goes back to the device first
        if weights:
            self._timed("wake_weights_s", "wake-up of the weights", "wakeup", weights)
        refit = self.stale
        if refit:
            self._refit()
            release_cached_memory()  # the refit's gathered tensors
        if rest:
            self._timed("wake_rest_s", "wake-up of the KV cache", "wakeup", rest)
        self.asleep = ()
        if refit:
            self._check_refit()

    def _refit(self) -> None:
        """Push the policy's current weights (every rank of the group; see the module docstring)."""
        budget = int(self.cfg.rollout.trtllm_refit_bucket_mb * _MIB)
        for bucket in buckets(iter(HFWeightStream(self.model, self.cfg.model)), budget):
            mine = {self.device_key: [(name, share_tensor(tensor)) for name, tensor in bucket]}
            gathered = [None] * self.group_size if self.group_rank == 0 else None
            dist.gather_object(mine, gathered, dst=self.leader, group=self.cpu_group)
            handles = {k: v for part in (gathered or []) for k, v in part.items()}
            # The bucket's tensors stay alive until every rank has heard the engine loaded them.
            self._on_leader("a weight update", lambda: self._rpc("update_weights", handles))
        self._on_leader("the end of a weight update", lambda: self._rpc("update_weights", None))
        self.stale = False
        self.refits += 1

    def _check_refit(self) -> None:
        """The engine's log-probs of a fixed probe (T=1, seed 0) against the trainer's own; a mean
        difference above ``rollout.trtllm_refit_check_tolerance`` means a tensor did not land
        (TensorRT-LLM ignores unknown names) and stops the run."""
        from clipo_nemo.models.forward import PolicyBatch, compute_policy_outputs

        prompt = probe_prompt(self.vocab_size)
        out = self._run([prompt], GenerationParams(n=1, max_new_tokens=PROBE_TOKENS, temperature=1.0), [0],
                        "the post-refit probe")
        tokens = torch.tensor([prompt + out.response(0)])
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[0, len(prompt):] = True
        trainer = compute_policy_outputs(  # the trainer's own log-prob pass (last pipeline stage only)
            self.model, PolicyBatch(tokens, mask), micro_batch_size=1, temperature=1.0, vocab_size=self.vocab_size,
            logprob_chunk_size=self.cfg.actor.logprob_chunk_size)
        mismatch = None
        if trainer is not None:
            engine = out.logprobs[0, : int(out.lengths[0])].double()
            known = ~torch.isnan(engine)
            trainer_logprobs = trainer.logprobs[0, len(prompt):].double().cpu()
            mismatch = float((engine[known] - trainer_logprobs[known]).abs().mean()) if known.any() else 0.0
        every = [None] * self.group_size
        dist.all_gather_object(every, mismatch, group=self.cpu_group)
        self.probe_mismatch = next(m for m in every if m is not None)
        tolerance = self.cfg.rollout.trtllm_refit_check_tolerance
        if not self.probe_mismatch <= tolerance:
            raise TrtllmEngineError(
                f"after refit {self.refits}, the engine's log-probs of a fixed probe differ from the trainer's by "
                f"{self.probe_mismatch:.4g} on average (rollout.trtllm_refit_check_tolerance={tolerance:g}): a weight "
                "did not land under its name (TensorRT-LLM ignores unknown names and keeps dummy weights)")

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
        out = self._run(prompts, params, seeds, f"generation of {len(prompts)} prompts x {params.n} responses (no "
                                                "response of this batch is used)")
        self.generations += 1
        return out

    def _run(self, prompts: Sequence[Sequence[int]], params: GenerationParams, seeds: Sequence[int],
             what: str) -> TrtllmRolloutOutput:
        results: List = []

        def run() -> None:
            requests = [{"prompt_token_ids": [int(t) for t in prompt]} for prompt in prompts for _ in range(params.n)]
            sampling = [sampling_params(self.tllm, params, response_seed(int(seed), j), self.eos_token_ids[1:])
                        for seed in seeds for j in range(params.n)]
            outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
            if len(outputs) != len(requests):
                raise TrtllmEngineError(f"{len(outputs)} outputs for {len(requests)} requests")
            results.extend(read_completion(out.outputs[0], self.eos_token_ids) for out in outputs)
            bad = sorted({t for tokens, _, _ in results for t in tokens if not 0 <= t < self.vocab_size})
            if bad:
                raise TrtllmEngineError(f"TensorRT-LLM returned token ids outside [0, {self.vocab_size}): {bad[:5]}")

        self.generating = True
        try:
            self._on_leader(what, run)
        finally:
            self.generating = False
        return self._output(broadcast_object(results, self.leader, self.cpu_group), len(prompts), params.n)

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
