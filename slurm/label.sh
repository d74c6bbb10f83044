#!/bin/bash
#SBATCH --job-name=dreamprm-label
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --error=logs/%x-%A_%a.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
#
# dreamprm-label as a Slurm job array: array task i labels shard i of n (n = the array's size), one
# shard per GPU by default. Each shard appends to OUT/shard-IIIII-of-NNNNN.jsonl and resumes where it
# stopped (docs/labeling.md), so a requeued task repeats no question.
#
# Submit from the repository root (logs/ must exist before the job starts):
#   mkdir -p logs
#   QUESTIONS=data/questions.jsonl POLICY=/models/Qwen2-VL-7B-Instruct OUT=runs/label sbatch slurm/label.sh
#   # one shard per node of 4 GPUs, the model split across them (vLLM tensor parallelism):
#   TP=4 QUESTIONS=... POLICY=... OUT=... sbatch --array=0-3 --gpus-per-task=4 slurm/label.sh
#   # then, once every task has finished:
#   python launch/label.py merge --out runs/label
#   # or chained: sbatch --dependency=afterok:<array job id> --wrap "python launch/label.py merge --out runs/label"
#
# Environment variables (sbatch exports the submitting shell's environment):
#   DREAMPRM_REPO  repository root; default: the folder sbatch was run from
#   PYTHON         interpreter; default: python
#   QUESTIONS      questions file (required)
#   POLICY         policy model directory (required)
#   OUT            shard folder; default: runs/label/<job name>-<array job id>. Reuse a folder to resume it.
#   ENGINE         vllm (default) or transformers
#   TP             --tensor_parallel_size; default: 1
#   EXTRA_ARGS     more dreamprm-label flags, word-split, e.g. "--rollouts 16 --max_rollouts 32"
#   MAX_REQUEUES   stop requeueing a task after this many restarts; default: 20
#
# Preemption: SIGUSR1 reaches the labeller 120 s before the time limit (and SIGTERM when Slurm
# preempts); it finishes the question at hand, exits 75, and this script requeues the array task.
set -uo pipefail

# sbatch runs a copy of this script from the spool folder, so the repository is the submit folder
# (or DREAMPRM_REPO), not the script's own folder.
DREAMPRM_REPO=${DREAMPRM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$DREAMPRM_REPO/slurm/common.sh" ]]; then
    echo "$DREAMPRM_REPO is not the DreamPRM-DS repository: submit from its root or set DREAMPRM_REPO" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$DREAMPRM_REPO/slurm/common.sh"

: "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch (it is a job array)}"
: "${QUESTIONS:?set QUESTIONS to the questions file}" "${POLICY:?set POLICY to the policy model directory}"
cd "$DREAMPRM_REPO" || exit 2
PYTHON=${PYTHON:-python}
ENGINE=${ENGINE:-vllm}
TP=${TP:-1}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUT=${OUT:-runs/label/${SLURM_JOB_NAME:-dreamprm-label}-${SLURM_ARRAY_JOB_ID}}
SHARDS=${SLURM_ARRAY_TASK_COUNT:-$((SLURM_ARRAY_TASK_MAX + 1))}
max_requeues=${MAX_REQUEUES:-20}
restart=${SLURM_RESTART_COUNT:-0}
export HWLOC_COMPONENTS=-gl OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONPATH="$DREAMPRM_REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

# The batch shell survives a USR1 meant for the step (scancel --full, --signal=B:...).
trap 'dreamprm_log "batch shell got SIGUSR1 (the labeller handles it)"' USR1
dreamprm_log "run $restart of array task $SLURM_ARRAY_TASK_ID: shard $SLURM_ARRAY_TASK_ID/$SHARDS engine=$ENGINE" \
    "tp=$TP out=$OUT"
rc=0
# shellcheck disable=SC2086  # EXTRA_ARGS is word-split on purpose
srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" launch/label.py --questions "$QUESTIONS" \
    --policy "$POLICY" --out "$OUT" --shard "$SLURM_ARRAY_TASK_ID/$SHARDS" --engine "$ENGINE" \
    --tensor_parallel_size "$TP" --no-progress $EXTRA_ARGS || rc=$?

if [[ "$rc" -eq "$DREAMPRM_EXIT_PREEMPTED" ]]; then
    if [[ "$restart" -ge "$max_requeues" ]]; then
        dreamprm_log "labeller stopped early (exit 75), already requeued $restart times: not requeueing"
        exit "$rc"
    fi
    task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    dreamprm_log "labeller stopped early (exit 75): requeueing $task; it resumes from $OUT"
    scontrol requeue "$task" || { dreamprm_log "error: scontrol requeue $task failed"; exit "$rc"; }
    exit 0
fi
dreamprm_log "labeller exited with $rc"
exit "$rc"
