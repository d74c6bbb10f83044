"""Hypergradient estimators for the domain logits, written against closures (no I/O, no DeepSpeed).

Notation: S_k(θ) is the training loss summed over the domain-k samples of the segment's last
batch, N that batch's size, w(a) the domain weights, v = ∂L_meta/∂θ. DARTS's one-step
approximation of the hypergradient is

    ∂L_meta/∂a ≈ -J(a)^T d,   d_k = ⟨∂(S_k/N)/∂θ, v⟩,   J = ∂w/∂a,

since a enters the training loss only through w and ∂L_train/∂w_k = S_k/N. The estimators
differ only in how they get the K directional derivatives d_k:

- ``exact``: one backward pass per domain gives ∂(S_k/N)/∂θ; its inner product with v is taken
  shard-locally and all-reduced. No ε, no rounding of perturbed parameters.
- ``fd``: central difference d_k ≈ (S_k(θ+εv) - S_k(θ-εv)) / (2εN), ε = r/‖v‖, on fp32 parameters.
- ``fd_bf16_naive``: the same on bf16 parameters, as the original did; the perturbation is
  largely rounded away (kept to show the difference).
"""
from __future__ import annotations

from typing import Callable

import torch


def fd_epsilon(radius: float, v_norm: float) -> float:
    """ε = r / ‖v‖, so that the perturbation εv has length r."""
    if not v_norm > 0:
        raise FloatingPointError(f"meta-gradient norm is {v_norm}: no direction to differentiate along")
    return radius / v_norm


def central_difference(domain_loss_sums_at: Callable[[float], torch.Tensor], eps: float, count: int) -> torch.Tensor:
    """d_k ≈ (S_k(θ+εv) - S_k(θ-εv)) / (2ε N), from a closure that evaluates S at θ + t v."""
    plus = domain_loss_sums_at(eps).double()
    minus = domain_loss_sums_at(-eps).double()
    return (plus - minus) / (2.0 * eps * count)


def exact_directional(domain_gradient_dots: Callable[[], torch.Tensor]) -> torch.Tensor:
    """d_k = ⟨∂(S_k/N)/∂θ, v⟩ from a closure that returns those inner products."""
    return domain_gradient_dots().double()


def hypergradient(directional: torch.Tensor, logit_gradient: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """∂L_meta/∂a ≈ -J^T d (J applied by `logit_gradient`, e.g. DomainWeights.logit_gradient)."""
    return -logit_gradient(directional)
