"""Entry-point glue shared by launch/ scripts: parse, build, run, close; user errors as one message."""
from __future__ import annotations

import sys

from dreamprm.config import EXIT_USER_ERROR, ConfigError, parse_args
from dreamprm.data.records import DataValidationError
from dreamprm.preemption import EXIT_CHECKPOINT_FAILED, EXIT_PREEMPTED, StopRequest


def run_training(argv: list[str]) -> int:
    stop = StopRequest().install()
    config = parse_args(argv)
    from dreamprm.checkpoint import CheckpointWriteError
    from dreamprm.distributed.engine import init_distributed, shutdown
    from dreamprm.trainer import Trainer, TrainingAborted

    info = init_distributed(config.run.device, timeout_s=config.run.dist_timeout)
    code = 1  # an exception escaping train() must not wait in a clean shutdown's barrier
    try:
        code = Trainer(config, info, stop).train()
    except (ConfigError, DataValidationError, TrainingAborted, CheckpointWriteError) as err:
        # Every rank gets these together (aborts and failed saves are agreed on): one message is enough.
        if info.rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = (EXIT_USER_ERROR if isinstance(err, (ConfigError, DataValidationError))
                else EXIT_CHECKPOINT_FAILED if isinstance(err, CheckpointWriteError) else 1)
    finally:
        shutdown(clean=code in (0, EXIT_PREEMPTED, EXIT_USER_ERROR, EXIT_CHECKPOINT_FAILED))
    return code


def main_train() -> None:
    """Console script `dreamprm-train` (one process, or under torchrun/mpirun/srun)."""
    sys.exit(run_training(sys.argv[1:]))


def main_bestofn() -> None:
    """Console script `dreamprm-bestofn` (Best-of-N selection with an exported PRM, one process)."""
    from dreamprm.bestofn.run import main
    sys.exit(main(sys.argv[1:]))


def main_label() -> None:
    """Console script `dreamprm-label` (label a shard, merge shards, import VisualPRM-400K)."""
    from dreamprm.labeling.run import main
    sys.exit(main(sys.argv[1:]))
