"""Step scores -> chain score. Pure functions shared by the meta loss and Best-of-N selection.

All take step *logits* (``logit(s_i)``) of the rows of a batch and ``chain_index`` (which chain each
row belongs to, rows of one chain in step order) and return one *logit* per chain; `aggregate`
turns it into a probability. Working in logit space lets the ranking meta objectives
(`dreamprm.losses.META_LOSSES`) compare chains without saturating: for ``mean_logit``, ``min``,
``max`` and ``last`` a shift of every step logit by c shifts every chain logit by exactly c.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dreamprm.config import AGGREGATIONS as NAMES
from dreamprm.losses import chain_meta_loss


def _segment_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, values)


def _count(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return _segment_sum(torch.ones_like(index, dtype=dtype), index, n)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def mean_logit(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The original: sigmoid(mean_i logit(s_i))."""
    return _segment_sum(logits, index, n) / _count(index, n, logits.dtype)


def mean(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """mean_i s_i, as a logit: log p - log(1 - p) with both terms from log-sigmoids (no clamping)."""
    count = _count(index, n, logits.dtype)
    log_p = _segment_logsumexp(F.logsigmoid(logits), index, n) - torch.log(count)
    log_q = _segment_logsumexp(F.logsigmoid(-logits), index, n) - torch.log(count)
    return log_p - log_q


def _segment_logsumexp(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    top = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device).scatter_reduce(
        0, index, values.detach(), reduce="amax", include_self=False)
    return top + torch.log(_segment_sum(torch.exp(values - top[index]), index, n))


def minimum(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    init = torch.full((n,), float("inf"), dtype=logits.dtype, device=logits.device)
    return init.scatter_reduce(0, index, logits, reduce="amin", include_self=False)


def maximum(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    init = torch.full((n,), float("-inf"), dtype=logits.dtype, device=logits.device)
    return init.scatter_reduce(0, index, logits, reduce="amax", include_self=False)


def product(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    # prod_i s_i = exp(sum_i log s_i) (no underflow for long chains), returned as its logit.
    log_p = _segment_sum(F.logsigmoid(logits), index, n)
    return log_p - _log1mexp(log_p.clamp(max=-1e-12))


def last(logits: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    rows = torch.arange(index.numel(), device=index.device)
    last_row = torch.full((n,), -1, dtype=torch.long, device=index.device).scatter_reduce(
        0, index, rows, reduce="amax", include_self=False)
    return logits[last_row]


# The names are `dreamprm.config.AGGREGATIONS` (--aggregation's choices, without torch), in this order;
# tests/test_bestofn.py checks each name's function against a hand computation.
AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = dict(
    zip(NAMES, (mean_logit, mean, minimum, maximum, product, last), strict=True))


def aggregate_logits(name: str, logits: torch.Tensor, chain_index: torch.Tensor, num_chains: int) -> torch.Tensor:
    """Chain logits [num_chains] from step logits [rows]."""
    if name not in AGGREGATIONS:
        raise ValueError(f"--aggregation: unknown aggregation {name!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name](logits, chain_index, num_chains)


def aggregate(name: str, logits: torch.Tensor, chain_index: torch.Tensor, num_chains: int) -> torch.Tensor:
    """Chain probabilities [num_chains] from step logits [rows]."""
    return torch.sigmoid(aggregate_logits(name, logits, chain_index, num_chains))


def meta_loss(step_logits: torch.Tensor, chain_index: torch.Tensor, labels: torch.Tensor,
              aggregation: str = "mean_logit", objective: str = "mse") -> torch.Tensor:
    """The upper-level objective of one batch of chains, from their step logits."""
    chain_logits = aggregate_logits(aggregation, step_logits.float(), chain_index, labels.numel())
    return chain_meta_loss(chain_logits, labels, objective)
