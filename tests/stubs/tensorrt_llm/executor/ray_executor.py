"""Stand-in for ``tensorrt_llm/executor/ray_executor.py`` ``RayExecutor``: where the workers land.

What the real 1.2 executor does (review §3): the leader process sets
``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``; unless ``TLLM_RAY_FORCE_LOCAL_CLUSTER=1`` it calls
``ray.init(address="auto")`` (attach to the node's running cluster, else start one that sees every
GPU of the node); with it, a private local cluster whose GPUs are those ``CUDA_VISIBLE_DEVICES``
shows at ``ray.init``. It then creates a PACK placement group of ``tensor_parallel_size`` GPU
bundles and one ``RayWorkerWrapper`` per bundle; each worker takes ``ray.get_gpu_ids()[0]`` -- Ray's
free-GPU order, which knows nothing of the torchrun ranks that share the node
(``executor/ray_gpu_worker.py`` ``RayWorkerWrapper.__init__``). ``report_device_ids()`` returns the
workers' device UUIDs.

Modelled here: a node of ``TRTLLM_STUB_GPUS_PER_NODE`` (default 8) fake GPUs, physical GPU ``p``
having the UUID ``GPU-cpu-p`` (``tensorrt_llm._torch.utils.get_device_uuid``). The shared cluster
(no ``TLLM_RAY_FORCE_LOCAL_CLUSTER``) is modelled as the concurrent leaders' race: each sees all the
node's GPUs and places its workers on GPUs ``0 .. tp-1``. A private cluster hands out the GPUs of
``CUDA_VISIBLE_DEVICES`` in order. A placement group larger than the cluster never schedules in the
real library (``ray.get`` blocks); the stand-in raises instead, so that a test cannot hang.
"""
from __future__ import annotations

import os
from typing import List

from tensorrt_llm._torch.utils import stub_uuid


def node_gpus() -> List[int]:
    return list(range(int(os.environ.get("TRTLLM_STUB_GPUS_PER_NODE", "8"))))


class RayExecutor:
    def __init__(self, tensor_parallel_size: int):
        private = os.environ.get("TLLM_RAY_FORCE_LOCAL_CLUSTER", "0") == "1"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        cluster = [int(i) for i in visible.split(",")] if private and visible else node_gpus()
        if tensor_parallel_size > len(cluster):
            raise RuntimeError(f"stand-in Ray: a placement group of {tensor_parallel_size} GPU bundles cannot be "
                               f"scheduled on a cluster with {len(cluster)} GPUs (the real ray.get waits forever)")
        self.private_cluster = private
        self.physical_gpus = cluster[:tensor_parallel_size]
        self.worker_env = dict(os.environ)  # runtime_env={"env_vars": os.environ.copy()}

    def report_device_ids(self) -> List[str]:
        return [stub_uuid(gpu) for gpu in self.physical_gpus]
