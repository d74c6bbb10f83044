"""Step scores -> chain score. Pure functions shared by the meta loss and Best-of-N selection.

All take step *logits* (``logit(s_i)``) of the rows of a batch and ``chain_index`` (which chain each
row belongs to, rows of one chain in step order) and return one probability per chain.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _segment_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, values)


def _count(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return _segment_sum(torch.ones_like(index, dtype=dtype), index, n)


def mean_logit(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The original: sigmoid(mean_i logit(s_i))."""
    return torch.sigmoid(_segment_sum(logits, index, n) / _count(index, n, logits.dtype))


def mean(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return _segment_sum(torch.sigmoid(logits), index, n) / _count(index, n, logits.dtype)


def minimum(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    init = torch.full((n,), float("inf"), dtype=logits.dtype, device=logits.device)
    return torch.sigmoid(init.scatter_reduce(0, index, logits, reduce="amin", include_self=False))


def maximum(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    init = torch.full((n,), float("-inf"), dtype=logits.dtype, device=logits.device)
    return torch.sigmoid(init.scatter_reduce(0, index, logits, reduce="amax", include_self=False))


def product(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    # prod_i s_i computed as exp(sum_i log s_i): no underflow for long chains.
    return torch.exp(_segment_sum(F.logsigmoid(logits), index, n))


def last(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    rows = torch.arange(index.numel(), device=index.device)
    last_row = torch.full((n,), -1, dtype=torch.long, device=index.device).scatter_reduce(
        0, index, rows, reduce="amax", include_self=False)
    return torch.sigmoid(logits[last_row])


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "mean_logit": mean_logit, "mean": mean, "min": minimum, "max": maximum, "product": product, "last": last,
}


def aggregate(name: str, logits: torch.Tensor, chain_index: torch.Tensor, num_chains: int) -> torch.Tensor:
    """Chain probabilities [num_chains] from step logits [rows]."""
    if name not in AGGREGATIONS:
        raise ValueError(f"--aggregation: unknown aggregation {name!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name](logits, chain_index, num_chains)
