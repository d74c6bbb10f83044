"""Deterministic, resumable, length-grouped batch sampling across data-parallel ranks.

Each epoch's order is a function of (seed, epoch) alone, so a resumed run skips exactly the batches
it already consumed and sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Iterator


class DistributedBatchSampler:
    """Yields this rank's batches of indices.

    Per epoch: shuffle all indices, cut them into groups of ``group_batches`` global batches, sort
    each group by length (so batches hold similar lengths and pad little) and shuffle the batch
    order again. Every global batch of ``batch_size * num_replicas`` indices is split into
    contiguous per-rank slices, so 1 rank with batch 2B and 2 ranks with batch B see the same
    global batches. The tail that does not fill a global batch is dropped.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, group_batches: int = 32, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        global_batch = batch_size * num_replicas
        if len(lengths) < global_batch:
            raise ValueError(f"{len(lengths)} records cannot fill one global batch of {global_batch} "
                             f"({batch_size} per rank x {num_replicas} ranks)")
        self.lengths = lengths
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.group_batches = group_batches
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return len(self.lengths) // (self.batch_size * self.num_replicas)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Start the next iteration at `batch` of `epoch`."""
        self.epoch, self.start_batch = epoch, batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        global_batch = self.batch_size * self.num_replicas
        order = list(range(len(self.lengths)))
        rng = random.Random(f"{self.seed}:{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        order = order[: len(self) * global_batch]
        batches = []
        group = global_batch * self.group_batches
        for start in range(0, len(order), group):
            chunk = sorted(order[start:start + group], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches(self.epoch)[self.start_batch:]:
            yield batch[lo:hi]
