"""A stand-in for the part of TensorRT-LLM (release/1.2) that ``clipo_nemo.rollout.trtllm_engine`` uses.

Tests only: put ``tests/stubs`` on ``sys.path`` (or ``PYTHONPATH``). It was rewritten from the real
release/1.2-era sources (NVIDIA/TensorRT-LLM; see ``/work/shared/docs/reviews/trtllm.md`` for the
versions read) so that it fails where the real library fails, module by module:

- ``_utils``: importing the package initialises MPI (the real ``tensorrt_llm/_utils.py`` runs
  ``from mpi4py import MPI`` and ``comm = MPI.COMM_WORLD`` at module level; later versions skip it
  when ``mpi_disabled()``, i.e. ``TLLM_DISABLE_MPI=1``);
- ``sampling_params``: ``SamplingParams._validate``, ``_setup`` (the only place stop strings are
  tokenized), ``_get_stop_words`` (raises when ``_setup`` never ran) and
  ``params_imply_greedy_decoding``;
- ``llmapi.llm``: ``LLM`` validates its keyword arguments against the installed version's
  ``TorchLlmArgs`` fields (``BaseLLM.__init__``), ``generate`` calls ``_setup`` only when
  ``end_id is None`` (``_prepare_sampling_params``), both samplers' log-prob semantics
  (``_torch/pyexecutor/sampler.py``: ``TorchSampler`` / ``TRTLLMSampler``), the end token dropped
  by the C++ decoder, ``update_weights`` with partial loading that ignores unknown names
  (``llmapi/rlhf_utils.py`` ``WorkerExtension.update_weights``), ``sleep`` / ``wakeup`` tags
  (``executor/ray_gpu_worker.py``) and the pinned host copy of the ``model`` scope;
- ``executor.ray_executor``: Ray placement that knows nothing about torchrun ranks
  (``executor/ray_executor.py`` ``RayExecutor``).

Every call is appended to ``CALLS`` (and, with ``TRTLLM_STUB_LOG=<file>``, written there as a JSON
line). ``TRTLLM_STUB_VERSION`` picks the version the stand-in claims (default ``1.2.0``).
``TRTLLM_STUB_FAIL_GENERATE=k`` (or ``FAIL["generate"] = k``) makes the k-th ``generate`` call of an
``LLM`` (1-based) fail half-way through its requests.
"""
from __future__ import annotations

import os

from tensorrt_llm._utils import CALLS, FAIL, record
from tensorrt_llm.llmapi.llm import LLM, CompletionOutput, Logprob, RequestOutput
from tensorrt_llm.sampling_params import SamplingParams

__version__ = os.environ.get("TRTLLM_STUB_VERSION", "1.2.0")
__all__ = ["CALLS", "FAIL", "LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "record"]
