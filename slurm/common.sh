# shellcheck shell=bash
# Shared part of slurm/train_2b.sh and slurm/train_7b.sh (see slurm/README.md).
#
# Source it from the repository ("$DREAMPRM_REPO/slurm/common.sh"), never relative to the batch
# script: sbatch runs a *copy* of the script from slurmd's spool directory.
#
# Functions:
#   dreamprm_master_addr    print the address of the job's first node (rank 0's host)
#   dreamprm_master_port    print MASTER_PORT, or a port derived from SLURM_JOB_ID
#   dreamprm_export_dist_env   export MASTER_ADDR and MASTER_PORT
#   dreamprm_export_nccl_env   export NCCL / threading settings
#   dreamprm_main           the body of the train_*.sh scripts: srun the trainer, requeue on 75,
#                           never on 74

# Exit code of the trainer when it stopped early on SIGUSR1/SIGTERM after writing a checkpoint.
DREAMPRM_EXIT_PREEMPTED=75
# Exit code of the trainer when a checkpoint could not be written (too little space, quota, I/O
# error). Never requeued: the requeued run would meet the same disk.
DREAMPRM_EXIT_CHECKPOINT_FAILED=74

dreamprm_log() {
    echo "[dreamprm $(date -u +%Y-%m-%dT%H:%M:%SZ) job=${SLURM_JOB_ID:-none}] $*" >&2
}

_dreamprm_is_ipv4() {
    [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]
}

# Address of the first host of the job, where rank 0 runs.
#   1. the host name through getent (DNS, /etc/hosts);
#   2. otherwise Slurm's NodeAddr for that node (simulated or DNS-less clusters, whose node names
#      do not resolve), itself resolved if it is a name;
#   3. otherwise the name as it is.
# A loopback answer (Debian maps the own hostname to 127.0.1.1) is refused for multi-node jobs:
# the other nodes could not reach it. A loopback NodeAddr written in slurm.conf is accepted.
dreamprm_master_addr() {
    local host addr node_addr nnodes
    host=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}" | head -n 1)
    nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    addr=$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR == 1 { print $1 }')
    if [[ -n "$addr" && "$addr" == 127.* && "$nnodes" -gt 1 ]]; then
        addr=""
    fi
    if [[ -z "$addr" ]]; then
        node_addr=$(scontrol show node "$host" 2>/dev/null \
            | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
        if [[ -n "$node_addr" ]] && _dreamprm_is_ipv4 "$node_addr"; then
            addr=$node_addr
        elif [[ -n "$node_addr" ]]; then
            addr=$(getent ahostsv4 "$node_addr" 2>/dev/null | awk 'NR == 1 { print $1 }')
            if [[ -n "$addr" && "$addr" == 127.* && "$nnodes" -gt 1 ]]; then
                addr=""
            fi
            addr=${addr:-$node_addr}
        fi
    fi
    echo "${addr:-$host}"
}

# MASTER_PORT if set, else 20000 + SLURM_JOB_ID % 12000: two jobs sharing a node get different
# ports, and the range stays below Linux's ephemeral ports (32768+), which outgoing connections
# may hold.
dreamprm_master_port() {
    if [[ -n "${MASTER_PORT:-}" ]]; then
        echo "$MASTER_PORT"
    else
        echo $((20000 + ${SLURM_JOB_ID:?not inside a Slurm job} % 12000))
    fi
}

dreamprm_export_dist_env() {
    MASTER_ADDR=${MASTER_ADDR:-$(dreamprm_master_addr)}
    MASTER_PORT=$(dreamprm_master_port)
    export MASTER_ADDR MASTER_PORT
}

dreamprm_export_nccl_env() {
    # A rank that dies or stalls mid-collective makes NCCL's watchdog abort the communicator and
    # the process exit (instead of every other rank hanging until the time limit); srun
    # --kill-on-bad-exit=1 then ends the rest of the step. TORCH_NCCL_* is the name since torch
    # 2.2, NCCL_ASYNC_ERROR_HANDLING the older one.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
    # Nodes with several interfaces: pin the one the nodes reach each other on, or NCCL's bootstrap
    # may pick a docker/virtual bridge and hang at init. Exclusion form: "^docker0,lo".
    # export NCCL_SOCKET_IFNAME=ib0
    # InfiniBand adapters to use (list from `ibv_devices`).
    # export NCCL_IB_HCA=mlx5
    # First thing to turn on when a multi-node init hangs: prints interfaces, rings, transports.
    # export NCCL_DEBUG=INFO
    # hwloc (used by Open MPI and by some NCCL/UCX builds) probes X displays through its GL plugin
    # and hangs if anything listens on 127.0.0.1:6000-6009 (TensorBoard's 6006 does).
    export HWLOC_COMPONENTS=-gl
    # One OpenMP pool per rank sized to its CPUs, not to the whole node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

_dreamprm_require_file() {
    if [[ ! -f "$2" ]]; then
        dreamprm_log "error: $1=$2 is not a file (relative paths are taken from $DREAMPRM_REPO)"
        exit 2
    fi
}

# The body of the train_*.sh batch scripts. Needs DREAMPRM_REPO and MODEL; reads the other
# variables documented there.
dreamprm_main() {
    : "${SLURM_JOB_ID:?submit this script with sbatch}"
    : "${DREAMPRM_REPO:?}" "${MODEL:?}"
    cd "$DREAMPRM_REPO" || exit 2

    export PYTHON=${PYTHON:-python}
    export TRAINER=${TRAINER:-launch/train.py}
    export DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
    export TRAIN_JSON=${TRAIN_JSON:-data/train.json}
    export META_JSON=${META_JSON:-data/meta.json}
    export OUTPUT_DIR=${OUTPUT_DIR:-runs/slurm/${SLURM_JOB_NAME:-dreamprm}-${SLURM_JOB_ID}}
    export EXTRA_ARGS=${EXTRA_ARGS:-}
    export MODEL
    local max_requeues=${MAX_REQUEUES:-20}
    local restart=${SLURM_RESTART_COUNT:-0}

    _dreamprm_require_file TRAINER "$TRAINER"
    _dreamprm_require_file DS_CONFIG "$DS_CONFIG"
    _dreamprm_require_file TRAIN_JSON "$TRAIN_JSON"
    _dreamprm_require_file META_JSON "$META_JSON"
    mkdir -p "$OUTPUT_DIR"
    # Where each rank notes that the trainer stopped with 75 (see below). One folder per run of
    # the job, so that a requeued run does not see the notes of the run before it.
    export DREAMPRM_EXIT_DIR="$OUTPUT_DIR/.slurm/$SLURM_JOB_ID.$restart"
    rm -rf "$DREAMPRM_EXIT_DIR"
    mkdir -p "$DREAMPRM_EXIT_DIR"

    dreamprm_export_dist_env
    dreamprm_export_nccl_env
    export PYTHONPATH="$DREAMPRM_REPO${PYTHONPATH:+:$PYTHONPATH}"

    # `--signal=USR1@180` signals the srun tasks only; should the batch shell get USR1 too
    # (`--signal=B:USR1@...`, `scancel --full`), it must not die: the trainer does the work.
    trap 'dreamprm_log "batch shell got SIGUSR1 (the trainer ranks handle it)"' USR1

    dreamprm_log "run $restart of job $SLURM_JOB_ID: nodes=$SLURM_JOB_NODELIST" \
        "tasks=${SLURM_NTASKS:-?} MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" \
        "model=$MODEL output=$OUTPUT_DIR"

    # Each task: torch.distributed's env:// variables from Slurm's, then the trainer. The wrapper
    # does not `exec` the trainer, because of --kill-on-bad-exit: ranks leave at different moments
    # after a checkpoint, and a first rank leaving with 75 would get the others killed mid-save
    # (srun then reports 143, not 75). So a rank's 75 becomes a note in DREAMPRM_EXIT_DIR plus exit
    # 0, and only real failures are "bad exits". A failed checkpoint (74) is agreed on by every rank
    # too and gets a note of its own, so that the script can tell it from a crash. The no-op traps
    # keep the wrapper alive while the trainer handles the signal (Slurm signals every process of
    # the step, the trainer included).
    # shellcheck disable=SC2016  # expanded by the task's bash, not here
    local task_cmd='
        trap : USR1 TERM
        export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
        $PYTHON "$TRAINER" --deepspeed "$DS_CONFIG" --reward_model "$MODEL" \
            --train_json_file "$TRAIN_JSON" --meta_json_file "$META_JSON" \
            --weights_path "$OUTPUT_DIR" --resume auto $EXTRA_ARGS
        rc=$?
        if [ "$rc" -eq 75 ]; then  # DREAMPRM_EXIT_PREEMPTED
            : > "$DREAMPRM_EXIT_DIR/rank$SLURM_PROCID"
            exit 0
        fi
        if [ "$rc" -eq 74 ]; then  # DREAMPRM_EXIT_CHECKPOINT_FAILED
            : > "$DREAMPRM_EXIT_DIR/checkpoint-failed.rank$SLURM_PROCID"
            exit 0
        fi
        exit "$rc"'

    local rc=0
    # Slurm 22.05's srun does not inherit --cpus-per-task from sbatch: pass it on.
    srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        bash -c "$task_cmd" || rc=$?

    local stopped failed
    failed=$(find "$DREAMPRM_EXIT_DIR" -maxdepth 1 -name 'checkpoint-failed.rank*' | wc -l)
    if [[ "$rc" -eq "$DREAMPRM_EXIT_CHECKPOINT_FAILED" || "$failed" -gt 0 ]]; then
        dreamprm_log "the trainer could not write a checkpoint (exit $DREAMPRM_EXIT_CHECKPOINT_FAILED on" \
            "$failed of ${SLURM_NTASKS:-?} ranks; its error message in the .err log names the cause):" \
            "not requeueing job $SLURM_JOB_ID, the requeued run would meet the same disk. Free space" \
            "where $OUTPUT_DIR is (or lower --keep_last in EXTRA_ARGS), then resubmit with" \
            "OUTPUT_DIR=$OUTPUT_DIR to continue from its last checkpoint"
        exit "$DREAMPRM_EXIT_CHECKPOINT_FAILED"
    fi
    stopped=$(find "$DREAMPRM_EXIT_DIR" -maxdepth 1 -name 'rank*' | wc -l)
    if [[ "$rc" -eq "$DREAMPRM_EXIT_PREEMPTED" ]] || [[ "$rc" -eq 0 && "$stopped" -gt 0 ]]; then
        if [[ "$restart" -ge "$max_requeues" ]]; then
            dreamprm_log "trainer stopped early (exit $DREAMPRM_EXIT_PREEMPTED) but the job was" \
                "already requeued $restart times (MAX_REQUEUES=$max_requeues): not requeueing"
            exit "$DREAMPRM_EXIT_PREEMPTED"
        fi
        dreamprm_log "trainer checkpointed and stopped ($stopped of ${SLURM_NTASKS:-?} ranks exited" \
            "$DREAMPRM_EXIT_PREEMPTED): requeueing job $SLURM_JOB_ID; the next run resumes from" \
            "$OUTPUT_DIR"
        # Slurm ends this batch shell as part of the requeue; the next run starts after the job
        # credential expires (AuthInfo cred_expire, 120 s by default).
        scontrol requeue "$SLURM_JOB_ID" || {
            dreamprm_log "error: scontrol requeue failed"
            exit "$DREAMPRM_EXIT_PREEMPTED"
        }
        exit 0
    fi
    dreamprm_log "srun exited with $rc"
    exit "$rc"
}
