"""Collectives on picklable objects for entry points without an engine (Best-of-N scoring):
DeepSpeed-free, and the identity when there is one process."""
from __future__ import annotations

import torch.distributed as dist


def gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (small objects: one rank's step scores)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    box: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box
