# Two images (README "Clusters: SLURM and the container"):
#
#   docker build -t clipo-nemo:latest .                       # rollout.engine=megatron (the default)
#   docker build --target trtllm -t clipo-nemo:trtllm .       # rollout.engine=trtllm
#
# Both install megatron-core 0.16.1 (what the test suite ran against; `import clipo_nemo` refuses < 0.16,
# and the build runs that import, so a wrong base fails the build instead of a run) and this package.
#
# Why not an NGC NeMo container: nemo:25.09 carries megatron-core 0.14, older than this code needs, and
# the megatron-core of later NeMo tags could not be confirmed here.
ARG BASE=nvcr.io/nvidia/pytorch:25.12-py3
# The TensorRT-LLM 1.2 release container (PyTorch, TensorRT-LLM's LLM API, Python 3.12). 1.2.0rc6 is the
# 1.2 tag verl's TensorRT-LLM image builds on (docker/Dockerfile.stable.trtllm); any later 1.2.x tag has
# the same API. rollout.engine=trtllm refuses versions outside [1.2, 1.3). Not pulled or built here.
ARG TRTLLM_BASE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0rc6

# ---- the sources both images install ---------------------------------------------------------------------
FROM scratch AS source
COPY setup.py README.md /src/
COPY clipo_nemo /src/clipo_nemo
COPY examples /src/examples
COPY tools /src/tools
COPY benchmarks /src/benchmarks

# ---- rollout.engine=trtllm: TensorRT-LLM 1.2 + megatron-core 0.16.1 + clipo-nemo --------------------------
FROM ${TRTLLM_BASE} AS trtllm
WORKDIR /workspace/clipo-nemo
COPY --from=source /src ./
# Ray (the engine's orchestrator) is not installed by every 1.2 image; the version check reads package
# metadata only (importing tensorrt_llm at build time would need a GPU driver).
RUN bash tools/container_install.sh && \
    (python -c "import ray" || pip install --no-cache-dir "ray[default]") && \
    python -c "from importlib.metadata import version; v = version('tensorrt_llm'); print('tensorrt_llm', v); \
assert v.startswith('1.2'), f'rollout.engine=trtllm supports TensorRT-LLM 1.2.x, the base has {v}'"
# No expandable segments: the engine receives the policy's weights as CUDA IPC handles.
ENV PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTORCH_CUDA_ALLOC_CONF=
CMD ["bash", "tools/gpu_check.sh", "trtllm"]

# ---- rollout.engine=megatron (default target): NGC PyTorch (CUDA 13.1, NCCL, PyTorch 2.10, Transformer
# Engine, Python 3.12). Driver: CUDA 13 needs an R580 or newer driver; on an older one pick a BASE tag
# whose CUDA it supports (NGC's PyTorch release notes list each tag's CUDA), with Python >= 3.10.
# TensorRT-LLM is not in this image.
FROM ${BASE} AS megatron
WORKDIR /workspace/clipo-nemo
COPY --from=source /src ./
RUN bash tools/container_install.sh && python -c "import transformer_engine"
ENV PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
CMD ["python", "examples/train_grpo_clipo.py", "--config-name=tiny"]
