#!/usr/bin/env bash
# Installs megatron-core 0.16.1, clipo-nemo and its pure-Python dependencies into an NVIDIA container
# (used by both Dockerfile targets). --no-deps for megatron-core and clipo-nemo: keep the container's
# CUDA builds of torch (and Transformer Engine / TensorRT-LLM); megatron-core needs only torch, numpy and
# packaging, all present. NGC's /etc/pip/constraint.txt keeps the container's own packages at their versions.
set -euo pipefail
pip install --no-cache-dir --no-deps megatron-core==0.16.1
pip install --no-cache-dir --no-deps -e .
pip install --no-cache-dir omegaconf hydra-core "math-verify[antlr4_9_3]" pandas pyarrow tensorboard tqdm \
    matplotlib psutil "transformers>=4.45" tokenizers pytest pytest-timeout hypothesis
python -c "import clipo_nemo, megatron.core; print('megatron-core', clipo_nemo.megatron_core_version())"
