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

    With ``units`` (lists of indices that belong together: the records of one chain, for prefix
    packing) the shuffle and the length sort move whole units, and the order is then cut into
    batches of exactly ``batch_size`` indices as before: a unit stays contiguous but may be split by
    the end of a batch or a rank's slice. Batch sizes keep counting indices (records).

    ``whole_units`` (the chains of one meta question, so that the pairwise objective can compare
    them) keeps every unit inside one global batch: the shuffled units are packed first-fit into
    global batches (no length sort); a unit larger than a global batch is cut into global-batch
    pieces, and the units of batches that first-fit leaves unfilled fill the last batches, split
    where they must, so an epoch still has ``len(self)`` full batches. A unit may span ranks.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, group_batches: int = 32, shuffle: bool = True, units: list[list[int]] | None = None,
                 whole_units: bool = False):
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
        if units is not None and sorted(i for u in units for i in u) != list(range(len(lengths))):
            raise ValueError("units must hold every index exactly once")
        if whole_units and units is None:
            raise ValueError("whole_units needs units")
        self.units = units
        self.whole_units = whole_units
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return len(self.lengths) // (self.batch_size * self.num_replicas)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Start the next iteration at `batch` of `epoch`."""
        self.epoch, self.start_batch = epoch, batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        if self.units is not None:
            return self._unit_batches(epoch)
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

    def _unit_batches(self, epoch: int) -> list[list[int]]:
        global_batch = self.batch_size * self.num_replicas
        units = list(self.units)
        rng = random.Random(f"{self.seed}:{epoch}:units")
        if self.shuffle:
            rng.shuffle(units)
        if self.whole_units:
            return self._packed_unit_batches(units, rng)
        # Length grouping over stretches of about `group_batches` global batches, unit by unit.
        ordered: list[list[int]] = []
        stretch: list[list[int]] = []
        for unit in units:
            stretch.append(unit)
            if sum(map(len, stretch)) >= global_batch * self.group_batches:
                ordered += sorted(stretch, key=lambda u: sum(self.lengths[i] for i in u) / len(u))
                stretch = []
        ordered += sorted(stretch, key=lambda u: sum(self.lengths[i] for i in u) / len(u))
        order = [i for unit in ordered for i in unit][: len(self) * global_batch]
        batches = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _packed_unit_batches(self, units: list[list[int]], rng: random.Random) -> list[list[int]]:
        global_batch = self.batch_size * self.num_replicas
        pieces = [u[i:i + global_batch] for u in units for i in range(0, len(u), global_batch)]
        full: list[list[int]] = []
        open_bins: list[list[int]] = []
        for piece in pieces:
            for bin_ in open_bins:
                if len(bin_) + len(piece) <= global_batch:
                    bin_ += piece
                    break
            else:
                open_bins.append(list(piece))
                bin_ = open_bins[-1]
            if len(bin_) == global_batch:
                open_bins.remove(bin_)
                full.append(bin_)
        rest = [i for bin_ in open_bins for i in bin_]
        full += [rest[i:i + global_batch] for i in range(0, len(rest) - global_batch + 1, global_batch)]
        if self.shuffle:
            rng.shuffle(full)
        return full[: len(self)]

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches(self.epoch)[self.start_batch:]:
            yield batch[lo:hi]
