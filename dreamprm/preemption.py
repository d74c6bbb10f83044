"""Preemption signals: SIGTERM and SIGUSR1 (Slurm's warning before a time limit or a preemption),
and the exit codes the job scripts act on.

The handler only records the signal; the trainer checkpoints at its next safe point (after an
optimiser step), on every rank together, and exits with `EXIT_PREEMPTED` so the job script can
requeue. Handlers are installed first thing in the process, so a signal that arrives during
start-up or after the last step is recorded too instead of killing the process.
"""
from __future__ import annotations

import signal
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job script requeues on it
# EX_IOERR: a checkpoint could not be written (too little space, quota, I/O error). Not requeued:
# a requeued job would meet the same disk (slurm/common.sh).
EXIT_CHECKPOINT_FAILED = 74
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
