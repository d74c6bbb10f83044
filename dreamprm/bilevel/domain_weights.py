"""Domain weights w_k = softplus(a_k) / mean_j softplus(a_j): positive, mean 1, all 1 at a = 0.

The logits `a` and their AdamW optimiser are small and replicated on every rank; ranks stay
identical because they apply the same all-reduced hypergradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DomainWeights(nn.Module):
    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.logits = nn.Parameter(torch.zeros(len(names), dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        s = F.softplus(self.logits)
        return s / s.mean()

    def as_dict(self) -> dict[str, float]:
        with torch.no_grad():
            return dict(zip(self.names, self().tolist()))

    def logit_gradient(self, dloss_dweights: torch.Tensor) -> torch.Tensor:
        """Chain rule through the normalisation: dL/da = J^T dL/dw with J = dw/da."""
        with torch.enable_grad():
            weights = self()
            (grad,) = torch.autograd.grad(weights, self.logits, grad_outputs=dloss_dweights.to(weights.dtype))
        return grad

    def checksum(self) -> torch.Tensor:
        """A value that differs between ranks whenever their logits differ."""
        with torch.no_grad():
            return (self.logits.detach() * torch.arange(1, len(self.names) + 1, dtype=torch.float64)).sum()
