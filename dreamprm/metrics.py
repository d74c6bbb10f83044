"""Rank-0 logging: TensorBoard scalars, a tqdm progress bar and plain messages. Other ranks get the
same object with everything switched off, so callers never test the rank themselves.
`MetricWindow` accumulates the training metrics between two log lines on the device; `read_scalars`
reads the scalars back (benchmarks, tests)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm


class MetricWindow:
    """Sums of the lower-level losses, per domain too, since the last log line.

    Everything stays on the device until `summary`, whose one all-reduce is the sync point of
    logging (no host sync per micro-batch)."""

    def __init__(self, num_domains: int, device: torch.device):
        self.num_domains, self.device = num_domains, device
        self.reset()

    def reset(self) -> None:
        # [loss sum, weighted-loss sum, samples, tokens, K domain loss sums, K domain counts]
        self.sums = torch.zeros(4 + 2 * self.num_domains, dtype=torch.float64, device=self.device)
        self.empty = True
        self.started = time.perf_counter()

    def add(self, per_sample: torch.Tensor, domain: torch.Tensor, weighted_loss: torch.Tensor,
            attention_mask: torch.Tensor) -> None:
        """One micro-batch: its per-sample losses and domains, its weighted loss (a batch mean)."""
        k, n = self.num_domains, per_sample.numel()
        per_sample = per_sample.detach().double()
        self.sums[0] += per_sample.sum()
        self.sums[1] += weighted_loss.detach().double() * n
        self.sums[2] += n
        self.sums[3] += attention_mask.sum()
        self.sums[4:4 + k].index_add_(0, domain, per_sample)
        self.sums[4 + k:].index_add_(0, domain, torch.ones_like(per_sample))
        self.empty = False

    def summary(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any] | None:
        """Global means over every rank since the last call (None if nothing was added), then reset."""
        if self.empty:
            return None
        sums = all_reduce_sum(self.sums).cpu()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        k = self.num_domains
        loss, weighted, samples, tokens = sums[:4].tolist()
        domain_sums, counts = sums[4:4 + k], sums[4 + k:]
        self.reset()
        return {"loss": loss / samples, "weighted_loss": weighted / samples, "samples_per_s": samples / elapsed,
                "tokens_per_s": tokens / elapsed,
                "domain_loss": {i: float(domain_sums[i] / counts[i]) for i in range(k) if counts[i] > 0}}


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
            if self.bar.n + steps >= self.bar.total:
                self.bar.n += steps  # not drawn here: end_progress's close() draws the last line, once
            else:
                self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def end_progress(self, step: int) -> None:
        """Bring the bar to `step` (steps since the last log line were not counted yet) and close it, so
        that its last line shows the final step once and the messages after it stand alone."""
        if self.bar is not None:
            self.bar.n = step  # no update(): it would draw the bar once more before close() draws it
            self.bar.close()
            self.bar = None

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
