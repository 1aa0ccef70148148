# shellcheck shell=bash
# Shared by launch/*.slurm (sourced after RECIPE is set). One srun task per node starts torchrun
# with rendezvous on the first node (or, with GPUS_PER_NODE=0, the CPU launcher that spawns its
# own gloo ranks). Output goes to a per-job directory that survives requeues. On the preemption
# warning (#SBATCH --signal=B:USR1@120) the ranks are asked to checkpoint (OUT/PREEMPT); when
# they stop for it (OUT/PREEMPTED) the job is requeued and resumes from that checkpoint.
# Environment knobs: GPUS_PER_NODE (8), PROCS_PER_NODE (CPU ranks per node through torchrun),
# OPSD_OUTPUT_DIR (shared by all nodes), OPSD_CONTAINER_IMAGE (pyxis), OPSD_CONTAINER_MOUNTS,
# MASTER_PORT, OPSD_RDZV_TIMEOUT_S, OPSD_COLLECTIVE_TIMEOUT_S (a lost peer fails the job after
# this long instead of hanging it). Arguments: key=value recipe overrides.
set -euo pipefail

: "${RECIPE:?set RECIPE before sourcing launch/common.sh}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
JOB_ID=${SLURM_JOB_ID:-0}
OUT_DIR=${OPSD_OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-opsd}-${JOB_ID}}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# NCCL / PyTorch settings for A100/H100 clusters (InfiniBand); harmless elsewhere.
export CUDA_DEVICE_MAX_CONNECTIONS=1          # megatron TP/SP comm-compute overlap ordering
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a dead peer fails the job instead of hanging it
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

mkdir -p "$OUT_DIR"
echo "[launch] job ${JOB_ID}: ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), recipe ${RECIPE}, output ${OUT_DIR}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

container_args=()
if [[ -n "${OPSD_CONTAINER_IMAGE:-}" ]]; then
  container_args=(--container-image "$OPSD_CONTAINER_IMAGE" --container-workdir "$PWD"
                  --container-mounts "${OPSD_CONTAINER_MOUNTS:-$PWD:$PWD}")
fi

# Ranks per node: the GPUs (NCCL), or with GPUS_PER_NODE=0 and PROCS_PER_NODE=N, N CPU ranks
# (gloo) through the same torchrun path — what CI runs to test the cluster path less CUDA. With
# GPUS_PER_NODE=0 alone, the CPU launcher of one node spawns its own gloo ranks.
PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
if [[ "$PROCS_PER_NODE" == "0" ]]; then
  launcher=(python -m opsd_megatron.train.cli)
else
  # c10d rendezvous on the first node, keyed by the job (a requeue is a new rendezvous); the
  # rendezvous gives up after OPSD_RDZV_TIMEOUT_S when a node never joins
  launcher=(torchrun --nnodes "$NNODES" --nproc-per-node "$PROCS_PER_NODE" --rdzv-backend c10d
            --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}"
            --rdzv-id "${JOB_ID}-${SLURM_RESTART_COUNT:-0}"
            --rdzv-conf "timeout=${OPSD_RDZV_TIMEOUT_S:-300}" --max-restarts 0
            -m opsd_megatron.train.cli)
fi

# shellcheck disable=SC2329  # invoked by the trap below
on_preemption_warning() {
  echo "[launch] preemption warning: asking the ranks to checkpoint"
  touch "$OUT_DIR/PREEMPT"
}
trap on_preemption_warning USR1

# The one task per node runs every rank of the node: it gets all of the node's CPUs (srun's
# default is one CPU per task). CPUS_PER_TASK overrides it.
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node=1 \
  --cpus-per-task="$CPUS_PER_TASK" "${container_args[@]}" \
  "${launcher[@]}" "$RECIPE" "trainer.output_dir=$OUT_DIR" "$@" &
step_pid=$!
rc=0
while true; do
  wait "$step_pid" && rc=0 || rc=$?
  kill -0 "$step_pid" 2>/dev/null || break   # wait returned for a signal; the step still runs
done

if [[ -f "$OUT_DIR/PREEMPTED" ]]; then
  echo "[launch] stopped for preemption at step $(cat "$OUT_DIR/PREEMPTED"); requeueing job ${JOB_ID}"
  scontrol requeue "$JOB_ID"
  exit 0
fi
exit "$rc"
