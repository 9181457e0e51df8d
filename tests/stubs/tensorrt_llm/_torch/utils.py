"""Stand-in for ``tensorrt_llm._torch.utils`` (tests only).

The real ``get_device_uuid(device_idx)`` is ``"GPU-" + str(torch.cuda.get_device_properties(idx).uuid)``
for a *local* index (after ``CUDA_VISIBLE_DEVICES``). CPU machines have no UUIDs: the stand-in maps
the local index through ``CUDA_VISIBLE_DEVICES`` to a physical fake GPU ``p`` named ``GPU-cpu-p``,
the name ``clipo_nemo.rollout.trtllm_engine`` gives a CPU rank whose ``LOCAL_RANK`` maps to ``p``.
"""
import os


def stub_uuid(physical_gpu: int) -> str:
    return f"GPU-cpu-{int(physical_gpu)}"


def get_device_uuid(device_idx: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = [int(i) for i in visible.split(",")][device_idx] if visible else device_idx
    return stub_uuid(physical)
