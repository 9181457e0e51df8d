"""Where a TensorRT-LLM engine's Ray workers run, and the process environment its leader needs.

Thin distributed helpers for :mod:`clipo_nemo.rollout.trtllm_engine` (no TensorRT-LLM import here):

- :func:`local_gpu`: this rank's (host, physical GPU, device UUID) without ``tensorrt_llm`` -- the
  UUID is what TensorRT-LLM's ``_torch/utils.py`` ``get_device_uuid`` computes, ``"GPU-" +
  str(torch.cuda.get_device_properties(i).uuid)``, and what ``rlhf_utils.py``
  ``WorkerExtension.update_weights`` looks its handles up by;
- :func:`cpu_group_of`: a gloo group over the ranks of a (NCCL) group, for waiting on the engine's
  leader without busy-polling NCCL kernels on the GPUs the engine uses (verl does the same,
  ``trtllm_rollout.py`` gloo device mesh);
- :func:`leader_environment`: around the leader's ``import tensorrt_llm`` and ``LLM(...)``: the
  launcher's MPI identity dropped and ``TLLM_DISABLE_MPI=1`` (``_utils.py`` initialises MPI at import;
  verl unsets ``PMI*/PMIX*/OMPI*`` the same way), a private Ray cluster
  (``TLLM_RAY_FORCE_LOCAL_CLUSTER=1``, ``executor/ray_executor.py`` ``RayExecutor``) that sees only the
  group's GPUs (``CUDA_VISIBLE_DEVICES``, read by Ray at ``ray.init`` and copied into every worker's
  ``runtime_env``), and ``TRT_LLM_DISABLE_LOAD_WEIGHTS_IN_PARALLEL=1`` (set by verl and NeMo-RL);
- :func:`placement_problem`: the check of the workers' UUIDs (``RayExecutor.report_device_ids``)
  against the group's.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

LAUNCHER_MPI_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_")
Gpu = Tuple[str, str, str]  # (host name, physical GPU as CUDA_VISIBLE_DEVICES names it, device UUID)


def cpu_device_uuid(physical: str) -> str:
    """The UUID a CPU rank stands for (CPU tests with the stand-in, which names its fake GPUs alike)."""
    return f"GPU-cpu-{physical}"


def local_gpu() -> Gpu:
    """This rank's GPU: the current CUDA device (on CPU: ``LOCAL_RANK``, the device it would use),
    mapped through ``CUDA_VISIBLE_DEVICES`` to the physical GPU."""
    local = torch.cuda.current_device() if torch.cuda.is_available() else int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[local].strip() if visible else str(local)
    if torch.cuda.is_available():
        return socket.gethostname(), physical, "GPU-" + str(torch.cuda.get_device_properties(local).uuid)
    return socket.gethostname(), physical, cpu_device_uuid(physical)


def cpu_group_of(group) -> Optional[dist.ProcessGroup]:
    """A gloo group over exactly ``group``'s ranks. Collective over the WHOLE world (every rank
    creates every such group, in the same order, as ``torch.distributed.new_group`` requires)."""
    mine = dist.get_process_group_ranks(group)
    every: List[Optional[List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    found = None
    for ranks in sorted({tuple(r) for r in every}):
        created = dist.new_group(list(ranks), backend="gloo")
        if list(ranks) == mine:
            found = created
    return found


@contextmanager
def leader_environment(physical_gpus: Sequence[str]) -> Iterator[Dict[str, str]]:
    """The leader's environment for importing TensorRT-LLM and building its engine (see the module
    docstring). The MPI variables stay dropped (the import's effects last); ``CUDA_VISIBLE_DEVICES``
    is restored afterwards (the leader's own CUDA context is already set up). Yields what it dropped."""
    dropped = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith(LAUNCHER_MPI_PREFIXES)]}
    os.environ.update(TLLM_DISABLE_MPI="1", TLLM_RAY_FORCE_LOCAL_CLUSTER="1",
                      TRT_LLM_DISABLE_LOAD_WEIGHTS_IN_PARALLEL="1")
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpus)
    try:
        yield dropped
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def group_host_problem(gpus: Sequence[Gpu]) -> Optional[str]:
    """Why the group's GPUs cannot host one engine (its ranks on several hosts), or None."""
    hosts = sorted({host for host, _, _ in gpus})
    if len(hosts) > 1:
        return (f"the model-parallel group spans hosts {hosts}: one TensorRT-LLM engine (a private Ray cluster "
                "on its leader's node) cannot use GPUs of other nodes; use TP x PP <= GPUs per node")
    return None


def placement_problem(worker_uuids: Sequence[str], group_uuids: Sequence[str]) -> Optional[str]:
    """Why the engine's workers are not on the group's GPUs (each exactly once), or None."""
    if sorted(worker_uuids) != sorted(group_uuids):
        return (f"TensorRT-LLM's workers run on {sorted(worker_uuids)}, but the model-parallel group's GPUs are "
                f"{sorted(group_uuids)}: the refit's CUDA IPC handles would not reach them")
    return None
