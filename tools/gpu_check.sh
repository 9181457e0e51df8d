#!/usr/bin/env bash
# The project's GPU checks (one GPU, a few minutes). CI has no GPU: nothing here runs there.
#
#   bash tools/gpu_check.sh                       # from the repository root, on a machine with CUDA torch
#   bash tools/gpu_check.sh trtllm                # rollout.engine=trtllm only (the Dockerfile's trtllm image)
#   GPU_CHECK_WHEELS=/path/to/wheels GPU_CHECK_SKIP="memprobe" OUT=/tmp/out bash tools/gpu_check.sh
#
# Dependencies: torch with CUDA, numpy, transformers, safetensors, psutil, pandas, pyarrow must be
# installed; megatron-core, omegaconf, hydra-core, antlr4 4.9, math-verify and latex2sympy2_extended are
# installed (--no-deps, into a private --target dir) from $GPU_CHECK_WHEELS when they do not import
# (default: ../shared/gpu/wheels, the shared smoke kit's wheels). Every check prints `RESULT <name>
# PASS|FAIL|SKIP <detail>`; the summary goes to $OUT/summary.txt; exit status 0 iff nothing FAILed.
#
# Checks (tools/gpu_checks.py unless noted):
#   env        CUDA device, megatron-core import, Transformer Engine present or not, and whether
#              tensorrt_llm imports (rollout.engine=trtllm; SKIP when absent)
#   guard      bf16 policy + megatron's optimizer: weights loaded after the optimizer was built; the load
#              guard must notice the stale fp32 main copy, reload it, and the loaded weights survive a step
#   tiny       examples/train_grpo_clipo.py --config-name=tiny on the GPU: 4 steps with asynchronous
#              checkpoints, then a resume to 6 (megatron's distributed optimizer saved and loaded)
#   memprobe   peak memory of the log-prob + entropy pass at Qwen2.5-7B width (V=152064, S=4608): the
#              chunked fused pass vs a full-vocabulary fp32 reference, forward and backward
#   plan       the layout planner's per-component estimates vs torch.cuda memory measured on a few-layer
#              model at Qwen2.5-7B width (weights, gradient buffer, optimizer state, activations, log-probs)
#   trtllm     (`gpu_check.sh trtllm`, in the TensorRT-LLM 1.2 container, < 5 min): the trtllm engine at TP1
#              on random weights of a small Qwen2 shape: workers on the trainer's GPU (device UUIDs), log-probs
#              of the sampled tokens within 0.05 mean |diff| of the trainer's at T=1 and T=0.6, same seeds ->
#              same tokens, a refit that moves them as the trainer's moved, memory after wake-up vs the planner.
#              Runs without expandable segments (CUDA IPC handles).
set -uo pipefail

ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
SITE=${GPU_CHECK_SITE:-/tmp/clipo_gpu_site}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/../shared/gpu/wheels}
SKIP=" ${GPU_CHECK_SKIP:-} "
MODE=${1:-all}
[[ $MODE == all || $MODE == trtllm ]] || { echo "usage: bash tools/gpu_check.sh [trtllm]"; exit 2; }
ALLOC_CONF=expandable_segments:True
[[ $MODE == trtllm ]] && ALLOC_CONF=  # the engine imports the policy's weights through CUDA IPC handles
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 MPLBACKEND=Agg
export TOKENIZERS_PARALLELISM=false CUDA_DEVICE_MAX_CONNECTIONS=1 PYTORCH_CUDA_ALLOC_CONF=$ALLOC_CONF

[[ -d $ROOT/clipo_nemo ]] || { echo "run from the clipo-nemo repository root"; exit 2; }

if ! $PY -c 'import megatron.core, omegaconf, hydra, math_verify' 2>/dev/null; then
  compgen -G "$WHEELS/*.whl" > /dev/null || { echo "megatron-core etc. missing and no wheels in $WHEELS"; exit 2; }
  echo "installing megatron-core and friends from $WHEELS into $SITE"
  $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$SITE" --upgrade \
    megatron-core omegaconf hydra-core antlr4-python3-runtime math-verify latex2sympy2_extended || exit 2
fi

FAILED=0
check() {  # check NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  if [[ $SKIP == *" $name "* ]]; then echo "RESULT $name SKIP GPU_CHECK_SKIP" | tee -a "$OUT/summary.txt"; return; fi
  echo "===== [$name] $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E 'Warning|warnings.warn' "$OUT/$name.log" | tail -n 15 | cut -c1-300
  grep '^RESULT ' "$OUT/$name.log" >> "$OUT/summary.txt"
  if ((rc != 0)); then
    FAILED=$((FAILED + 1))
    echo "RESULT $name FAIL rc=$rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  fi
}

tiny() {
  local run=/tmp/clipo_gpu_tiny_$$ args=(--config-name=tiny trainer.plot_embeddings=false evaluation.every_steps=0
                                         trainer.save_every_steps=2 trainer.async_save=true)
  $PY examples/train_grpo_clipo.py "${args[@]}" trainer.max_steps=4 trainer.output_dir=$run || return 1
  $PY examples/train_grpo_clipo.py "${args[@]}" trainer.max_steps=6 trainer.output_dir=$run 2>&1 | tee $run.log
  local rc=${PIPESTATUS[0]}
  if ((rc == 0)) && grep -q "resumed from" $run.log && [[ $(cat $run/checkpoints/latest) == step_6 ]]; then
    echo "RESULT tiny PASS 4 steps, resumed at step 4 with megatron's distributed optimizer, latest=step_6 (async saves)"
  else
    echo "RESULT tiny FAIL rc=$rc (see tiny.log)"; return 1
  fi
}
export -f tiny
export PY

check env 90 $PY tools/gpu_checks.py env
if [[ $MODE == trtllm ]]; then
  check trtllm 300 $PY tools/gpu_checks.py trtllm
else
  check guard 120 $PY tools/gpu_checks.py guard
  check tiny 240 bash -c tiny
  check memprobe 150 $PY tools/gpu_checks.py memprobe
  check plan 150 $PY tools/gpu_checks.py plan
fi
echo "===== summary"
cat "$OUT/summary.txt"
((FAILED == 0))
