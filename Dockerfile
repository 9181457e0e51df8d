# GPU image: an NGC NeMo container brings CUDA, PyTorch, Transformer Engine, megatron-core and
# TensorRT-LLM; this installs clipo-nemo on top without touching those.
ARG BASE=nvcr.io/nvidia/nemo:25.09
FROM ${BASE}

WORKDIR /workspace/clipo-nemo
COPY setup.py README.md ./
COPY clipo_nemo ./clipo_nemo
COPY examples ./examples
COPY tools ./tools
COPY benchmarks ./benchmarks
# --no-deps for torch/megatron-core: keep the container's CUDA builds; install only what is missing.
RUN pip install --no-cache-dir --no-deps -e . && \
    pip install --no-cache-dir omegaconf hydra-core "math-verify[antlr4_9_3]" pandas pyarrow tensorboard tqdm \
        matplotlib psutil pytest pytest-timeout hypothesis

ENV PYTHONUNBUFFERED=1
CMD ["python", "examples/train_grpo_clipo.py", "--config-name=tiny"]
