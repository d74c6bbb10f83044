"""Rank-0 logging: TensorBoard scalars, a tqdm progress bar and plain messages. Other ranks get the
same object with everything switched off, so callers never test the rank themselves. `read_scalars`
reads the scalars back (benchmarks, tests)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, folder: str | Path, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(folder) / "tb"))
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histograms(self, step: int, values: dict[str, Any]) -> None:
        """One TensorBoard histogram per tag (empty tensors are left out)."""
        if self.writer is None:
            return
        for tag, tensor in values.items():
            if tensor.numel():
                self.writer.add_histogram(tag, tensor, step)

    def progress(self, steps: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def info(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series a `MetricsLogger` wrote under `logdir`: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
