# GPU image: an NGC PyTorch container (CUDA 13.1, NCCL, PyTorch 2.10, Transformer Engine, Python 3.12)
# with megatron-core 0.16.1 installed on top, then clipo-nemo.
#
# Why not an NGC NeMo container: nemo:25.09 carries megatron-core 0.14, older than this code needs, and
# the megatron-core of later NeMo tags could not be confirmed here. So the version is pinned explicitly:
# 0.16.1 is what the test suite ran against. `import clipo_nemo` refuses megatron-core < 0.16 with a
# message, and the build below imports it, so a wrong base fails the build instead of a run.
# Driver: CUDA 13 needs an R580 or newer driver; on an older one pick a BASE tag whose CUDA it supports
# (NGC's PyTorch release notes list each tag's CUDA), with Python >= 3.10 for megatron-core 0.16.1.
# TensorRT-LLM is not in this image; rollout.engine=megatron (the default) does not need it.
ARG BASE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE}

WORKDIR /workspace/clipo-nemo
COPY setup.py pyproject.toml README.md ./
COPY clipo_nemo ./clipo_nemo
COPY examples ./examples
COPY tools ./tools
COPY benchmarks ./benchmarks
# --no-deps for megatron-core and clipo-nemo: keep the container's CUDA builds of torch and Transformer
# Engine (megatron-core needs only torch, numpy and packaging, all present); then what is missing.
# NGC's /etc/pip/constraint.txt keeps the container's own packages at their versions.
RUN pip install --no-cache-dir --no-deps megatron-core==0.16.1 && \
    pip install --no-cache-dir --no-deps -e . && \
    pip install --no-cache-dir omegaconf hydra-core "math-verify[antlr4_9_3]" pandas pyarrow tensorboard tqdm \
        matplotlib psutil "transformers>=4.45" tokenizers pytest pytest-timeout hypothesis && \
    python -c "import clipo_nemo, megatron.core, transformer_engine; print('megatron-core', clipo_nemo.megatron_core_version())"

ENV PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
CMD ["python", "examples/train_grpo_clipo.py", "--config-name=tiny"]
