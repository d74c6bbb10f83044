"""Entry-point glue shared by launch/ scripts: parse, check, build, run, close; user errors as one message.

Order matters for a newcomer: the flags, files, DeepSpeed JSON and resume target are checked
(`dreamprm.preflight`) before torch, transformers and DeepSpeed are imported or any process group
starts, so a mistake is reported in about a second, all problems at once, with exit code 2.
"""
from __future__ import annotations

import sys

from dreamprm.config import DEMO_DIR, EXIT_USER_ERROR, ConfigError, TrainConfig, parse_args
from dreamprm.data.records import DataValidationError
from dreamprm.preemption import EXIT_CHECKPOINT_FAILED, EXIT_PREEMPTED, StopRequest
from dreamprm.preflight import StartupError, check_training, launcher_rank, launcher_world_size


def user_error(message: str, rank: int = 0) -> int:
    """One `error:` message on rank 0's stderr; the exit code of a user's mistake."""
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def recipe_note(config: TrainConfig) -> str | None:
    """Which recipe a flag-free run trains: the defaults are the 2B paper recipe, not the demo's."""
    typed = config.explicit_flags - {"deepspeed", "local_rank"}
    if typed or config.data.train_json_file != str(DEMO_DIR / "train.json"):
        return None
    return ("note: no flags given, so this trains the default recipe (the 2B paper's: --lr 5e-7, --precision bf16, "
            f"--iteration_num {config.run.iteration_num}) on the bundled demo with the tiny model; at this learning "
            "rate the tiny model barely moves and the demo's domain weights tell no story. The demo's own recipe "
            "(--lr 1e-3 --meta_lr 0.1 --iteration_num 200 --precision fp32 on CPU, 2 ranks) is `bash .ci/demo.sh`.")


def run_training(argv: list[str], prog: str = "launch/train.py") -> int:
    stop = StopRequest().install()
    config = parse_args(argv, prog=prog, check=False)
    rank = launcher_rank()
    try:
        records = check_training(config, launcher_world_size())
    except StartupError as err:
        return user_error(str(err), rank)
    if rank == 0:
        for line in [recipe_note(config)] + [f"WARNING: {w}" for w in records.warnings]:
            if line:
                print(line, file=sys.stderr, flush=True)
    # Only now the heavy imports (torch, transformers, DeepSpeed: ~10 s) and the process group.
    from dreamprm.checkpoint import CheckpointWriteError
    from dreamprm.distributed.engine import init_distributed, shutdown
    from dreamprm.trainer import Trainer, TrainingAborted

    info = init_distributed(config.run.device, timeout_s=config.run.dist_timeout)
    code = 1  # an exception escaping train() must not wait in a clean shutdown's barrier
    try:
        code = Trainer(config, info, stop, records=records).train()
    except (ConfigError, DataValidationError, TrainingAborted, CheckpointWriteError) as err:
        # Every rank gets these together (aborts and failed saves are agreed on): one message is enough.
        if info.rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = (EXIT_USER_ERROR if isinstance(err, (ConfigError, DataValidationError))
                else EXIT_CHECKPOINT_FAILED if isinstance(err, CheckpointWriteError) else 1)
    finally:
        shutdown(clean=code in (0, EXIT_PREEMPTED, EXIT_USER_ERROR, EXIT_CHECKPOINT_FAILED))
    return code


def exit_now(code: int) -> None:
    """End a training process with `code` once its run is over and its process group left: flush the
    output and skip the interpreter's teardown. A 2-rank run has now and then aborted in that
    teardown, after "done" and a clean shutdown ("terminate called without an active exception",
    exit -6, from a C++ thread destroyed late; seen in whole-suite runs, cause not found)."""
    import logging
    import os
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:  # under mpirun: a rank that skips MPI_Finalize fails the job
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    os._exit(code)


def main_train() -> None:
    """Console script `dreamprm-train` (one process, or under torchrun/mpirun/srun)."""
    exit_now(run_training(sys.argv[1:], prog="dreamprm-train"))


def main_bestofn() -> None:
    """Console script `dreamprm-bestofn` (Best-of-N selection with an exported PRM, one process)."""
    from dreamprm.bestofn.config import parse_args as parse_bestofn
    config = parse_bestofn(sys.argv[1:], prog="dreamprm-bestofn")  # --help before torch is imported
    from dreamprm.bestofn.run import run
    sys.exit(run(config))


def main_label() -> None:
    """Console script `dreamprm-label` (label a shard, merge shards, import VisualPRM-400K)."""
    from dreamprm.labeling.run import main
    sys.exit(main(sys.argv[1:]))
