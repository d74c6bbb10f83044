"""A resumable stream of batches: a loader read from a saved (epoch, batch) position onwards.

The training stream ends after `max_epochs` passes; the meta stream (no limit) starts its next
pass whenever one ends. The position lives in the trainer's state (`StreamPosition`), so a
checkpoint holds it and a resumed run reads the very next batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from dreamprm.data.sampler import DistributedBatchSampler


@dataclass
class StreamPosition:
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed


class BatchStream:
    def __init__(self, loader: DataLoader, sampler: DistributedBatchSampler, position: StreamPosition,
                 max_epochs: int | None = None):
        self.loader, self.sampler, self.position, self.max_epochs = loader, sampler, position, max_epochs
        self._batches: Iterator | None = None

    def next(self) -> dict[str, torch.Tensor] | None:
        """The next local batch (on the CPU), or None once `max_epochs` passes are done."""
        p = self.position
        while True:
            if self._batches is None:
                if self.max_epochs is not None and p.epoch >= self.max_epochs:
                    return None
                self.sampler.set_position(p.epoch, p.batch)
                self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is not None:
                p.batch += 1
                return batch
            self._batches = None
            p.epoch, p.batch = p.epoch + 1, 0

    def reposition(self, position: StreamPosition) -> None:
        """Continue from `position` (after a resume)."""
        self.position, self._batches = position, None
