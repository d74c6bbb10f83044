#!/bin/bash
#SBATCH --job-name=dreamprm-2b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@180
#
# DreamPRM-DS: Qwen2-VL-2B PRM under DeepSpeed ZeRO-3, 1 node x 8 GPUs, one task per GPU.
# See slurm/README.md (memory table, launch alternatives, preemption).
#
# Submit from the repository root (Slurm opens logs/ before the script runs; it must exist):
#   mkdir -p logs && sbatch slurm/train_2b.sh
#   TRAIN_JSON=/data/train.json META_JSON=/data/meta.json sbatch slurm/train_2b.sh
# sbatch options on the command line override the #SBATCH lines above, e.g.
#   sbatch --nodes=2 --time=48:00:00 --partition=gpu slurm/train_2b.sh
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 slurm/train_2b.sh  # CPU
#
# Environment variables (sbatch exports the submitting shell's environment to the job):
#   DREAMPRM_REPO  repository root. Default: the folder above this script; when sbatch runs its
#                  copy of the script, the submitted script's path from `scontrol show job`, then
#                  SLURM_SUBMIT_DIR (or its parent). The job runs from there: relative paths
#                  below are relative to it.
#   PYTHON         interpreter (may carry options, e.g. "python -u"); default: python
#   TRAINER        entry point; default: launch/train.py
#   MODEL          --reward_model; default: Qwen/Qwen2-VL-2B-Instruct
#   TRAIN_JSON     --train_json_file; default: data/train.json
#   META_JSON      --meta_json_file; default: data/meta.json
#   OUTPUT_DIR     --weights_path (checkpoints; the trainer resumes from here); default:
#                  runs/slurm/<job name>-<job id>. Set it to a previous job's folder to continue it.
#   DS_CONFIG      --deepspeed; default: ds_configs/zero3.json
#   MASTER_PORT    rendezvous port; default: 20000 + SLURM_JOB_ID % 12000
#   MASTER_ADDR    rendezvous host; default: the first node's address
#   EXTRA_ARGS     more trainer flags, word-split, e.g. "--lr 5e-6 --iteration_num 20000"
#   MAX_REQUEUES   stop requeueing after this many restarts; default: 20
#
# Preemption: SIGUSR1 reaches every rank 180 s (Slurm may add up to 60 s) before the time limit;
# the trainer writes a checkpoint to OUTPUT_DIR and exits 75; this script then requeues the job
# (same job id, same OUTPUT_DIR), and the next run resumes with --resume auto.
set -uo pipefail

: "${MODEL:=Qwen/Qwen2-VL-2B-Instruct}"

_dreamprm_find_repo() {
    local c cmd
    c="$(dirname "${BASH_SOURCE[0]}")/.."
    if [[ -f "$c/slurm/common.sh" ]]; then (cd "$c" && pwd); return; fi
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then  # sbatch runs a copy: ask Slurm for the original path
        cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
        if [[ -n "$cmd" && "$cmd" != /* ]]; then cmd="${SLURM_SUBMIT_DIR:-.}/$cmd"; fi
        c="$(dirname "${cmd:-/nonexistent/x}")/.."
        if [[ -f "$c/slurm/common.sh" ]]; then (cd "$c" && pwd); return; fi
    fi
    for c in "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
        if [[ -f "$c/slurm/common.sh" ]]; then (cd "$c" && pwd); return; fi
    done
    echo "cannot find the DreamPRM-DS repository: set DREAMPRM_REPO" >&2
    return 1
}
DREAMPRM_REPO=${DREAMPRM_REPO:-$(_dreamprm_find_repo)} || exit 2
export DREAMPRM_REPO MODEL
# shellcheck source=slurm/common.sh
source "$DREAMPRM_REPO/slurm/common.sh"
dreamprm_main
