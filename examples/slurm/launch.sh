#!/bin/bash
# The body of every sbatch script in this folder; runs as the batch script, on the allocation's first node:
#
#   launch.sh CONFIG INIT_FROM RUN_DIR [key=value ...]
#
# CONFIG    examples/conf/<CONFIG>.yaml
# INIT_FROM absolute path of a converted checkpoint (tools/convert_hf_to_megatron.py) or of another run,
#           passed as trainer.init_from and mounted read-only; "" for none
# RUN_DIR   absolute path on a file system every node sees: trainer.output_dir, checkpoints, logs
#
# One task per node (srun) runs `python -m clipo_nemo.parallel.launcher` (torchrun that forwards stop
# requests to its workers) with GPUS_PER_NODE workers, inside the container.
#
# Stopping and resuming. The sbatch scripts ask SLURM for `--signal=B:USR1@<seconds>`: that long before
# the time limit this script gets SIGUSR1 and sends it to the job step (srun forwards it to every node's
# launcher, which forwards it to the workers). The trainer finishes its current step, saves, and every
# process exits 0; then this script calls `scontrol requeue`, and the requeued job (same job id,
# SLURM_RESTART_COUNT + 1) resumes from RUN_DIR/checkpoints/latest. A preempted job (`--requeue`) is
# requeued by SLURM itself and resumes from the last periodic checkpoint (trainer.save_every_steps).
#
# Failure. A worker that dies makes its node's torchrun stop the other workers and exit 1
# (--max-restarts=0); srun --kill-on-bad-exit=1 then ends every node's task, and the job exits non-zero.
# A hung (not dead) peer makes collectives raise after parallel.timeout_s (default 1800 s).
#
# Logs: RUN_DIR/logs/job<id>_attempt<k>/node<n>.log (every rank of node n, lines prefixed [rank<r>]) and
# .../ranks/<rendezvous id>_*/attempt_0/<local rank>/{stdout,stderr}.log (one pair per process).
#
# Environment (all optional): IMAGE (container image, default clipo-nemo:latest), CODE_DIR (this
# repository, default the directory sbatch was run from), DATA_DIR (mounted where the configs' relative
# ../shared/data/clipo paths point, default CODE_DIR/../shared/data/clipo), GPUS_PER_NODE (default 8),
# MASTER_PORT (default derived from the job id, moved past ports in use), EXTRA_MOUNTS (more
# src:dst[:ro] pairs, comma-separated). NCCL/InfiniBand variables (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...)
# set before sbatch are passed through: see README "SLURM".
set -euo pipefail

CONFIG=${1:?usage: launch.sh CONFIG INIT_FROM RUN_DIR [key=value ...]}
INIT_FROM=${2?usage: launch.sh CONFIG INIT_FROM RUN_DIR [key=value ...] (INIT_FROM may be "")}
RUN_DIR=${3:?usage: launch.sh CONFIG INIT_FROM RUN_DIR [key=value ...]}
shift 3
: "${SLURM_JOB_ID:?launch.sh runs as (or from) an sbatch script: SLURM_JOB_ID is not set}"
for path in "$RUN_DIR" ${INIT_FROM:+"$INIT_FROM"}; do
  [[ $path == /* ]] || { echo "launch.sh: $path must be an absolute path (it is mounted into the container)" >&2; exit 2; }
done
[[ -z $INIT_FROM || -e $INIT_FROM ]] || { echo "launch.sh: INIT_FROM=$INIT_FROM does not exist" >&2; exit 2; }

CODE_DIR=${CODE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
DATA_DIR=${DATA_DIR:-$CODE_DIR/../shared/data/clipo}
IMAGE=${IMAGE:-clipo-nemo:latest}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
ATTEMPT=${SLURM_RESTART_COUNT:-0}
WORKDIR=/workspace/clipo-nemo  # the repository inside the container (the Dockerfile's WORKDIR)

# Rendezvous: the first node hosts torchrun's c10d store, on a port derived from the job id and moved
# past any port something on this node (the first node) already listens on. The id is unique per job
# and per requeue.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
while port_in_use "$MASTER_PORT"; do MASTER_PORT=$((MASTER_PORT + 1)); done
RDZV_ID=clipo-$SLURM_JOB_ID-$ATTEMPT
LOG_DIR=$RUN_DIR/logs/job${SLURM_JOB_ID}_attempt$ATTEMPT
mkdir -p "$LOG_DIR"

# megatron-core needs one CUDA hardware queue per device so that tensor-parallel communication is
# issued in program order relative to compute (it asserts this with sequence parallel).
export CUDA_DEVICE_MAX_CONNECTIONS=1
# A failed or timed-out NCCL collective aborts the process instead of leaving it blocked.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]: '  # literal: torchrun fills ${rank} in

MOUNTS=$CODE_DIR:$WORKDIR,$DATA_DIR:/workspace/shared/data/clipo:ro,$RUN_DIR:$RUN_DIR
OVERRIDES=("trainer.output_dir=$RUN_DIR")
if [[ -n $INIT_FROM ]]; then
  MOUNTS+=,$INIT_FROM:$INIT_FROM:ro
  OVERRIDES+=("trainer.init_from=$INIT_FROM")
fi
MOUNTS+=${EXTRA_MOUNTS:+,$EXTRA_MOUNTS}
# The one task per node gets every CPU of the node's allocation (srun's default would be one CPU, and
# srun does not inherit sbatch's --cpus-per-task since SLURM 22.05).
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:?SLURM_CPUS_ON_NODE is not set}}

STOP_REQUESTED=0
request_stop() {
  STOP_REQUESTED=1
  echo "launch.sh: SIGUSR1 (time limit near): asking every rank to save and exit" >&2
  [[ -z ${SRUN_PID:-} ]] || kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
trap request_stop USR1

# Verifier workers: each rank's pool defaults to its share of the node's CPUs (CPUs / GPUS_PER_NODE).
srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --output="$LOG_DIR/node%n.log" \
  --container-image="$IMAGE" --container-mounts="$MOUNTS" --container-workdir="$WORKDIR" \
  python -m clipo_nemo.parallel.launcher --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" --max-restarts=0 \
    --log-dir="$LOG_DIR/ranks" --tee=3 \
    examples/train_grpo_clipo.py --config-name="$CONFIG" "${OVERRIDES[@]}" "$@" &
SRUN_PID=$!
# `wait` returns early when the trap runs; wait again until srun is gone, then read its status.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done
STATUS=0
wait "$SRUN_PID" || STATUS=$?

if [[ $STATUS -eq 0 && $STOP_REQUESTED -eq 1 ]]; then
  echo "launch.sh: saved before the time limit; requeueing job $SLURM_JOB_ID to resume from $RUN_DIR" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
