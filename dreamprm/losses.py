"""Losses. Per-sample values stay unreduced until a named, weighted reduction.

(The original averaged MSELoss over the batch before multiplying by a per-sample domain weight,
which is only right at batch size 1.)
"""
from __future__ import annotations

import torch

from dreamprm.bilevel.aggregation import aggregate


def per_sample_mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(sigmoid(logit) - Monte Carlo accuracy)^2 per sample, no reduction."""
    return (torch.sigmoid(logits.float()) - target.float()) ** 2


def domain_loss_sums(per_sample: torch.Tensor, domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """S_k = sum of the per-sample losses of domain k in this batch, shape [K]."""
    return torch.zeros(num_domains, dtype=per_sample.dtype, device=per_sample.device).index_add(0, domain, per_sample)


def weighted_training_loss(per_sample: torch.Tensor, domain: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_{domain(i)} * loss_i / batch: the lower-level objective of one micro-batch."""
    return (weights.to(per_sample.device)[domain] * per_sample).sum() / per_sample.numel()


def meta_loss(step_logits: torch.Tensor, chain_index: torch.Tensor, labels: torch.Tensor,
              aggregation: str = "mean_logit") -> torch.Tensor:
    """Mean over chains of (aggregate(step scores) - correctness label)^2."""
    chain_scores = aggregate(aggregation, step_logits.float(), chain_index, labels.numel())
    return ((chain_scores - labels.float()) ** 2).mean()
