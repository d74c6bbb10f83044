"""The optimiser of the domain logits `a`, and why its default is not AdamW.

One upper step's hypergradient is mostly noise (measured on the quality benchmark: per-step
signal-to-noise ~0.1 per domain). AdamW divides each step by the root of the gradient's second
moment, so a hypergradient of pure noise still moves every logit by about `meta_lr` per step: a
random walk that, over hundreds of upper steps, can carry a harmful domain far up (the collapsed run
in docs/hypergradient.md). `SignalGatedSGD` moves a logit only as far as its averaged hypergradient
stands out from the noise:

    m, s   exponential moving averages (β) of the hypergradient h and of h², bias-corrected
    n_eff  (1 - βᵗ)²(1 + β) / ((1 - β)(1 - β²ᵗ))       effective number of steps averaged in m
    var    max(s - m², 0) · n_eff / (n_eff - 1)        spread of one upper step's h
    gate   max(0, 1 - var / (n_eff m²))                positive-part James-Stein shrinkage of m
    a     ← a - lr · gate · m / (√s + eps)             (then decoupled weight decay)

With a consistent signal the gate opens to 1 and steps are Adam-sized (|m|/√s ≤ 1); with none,
m² ~ var / n_eff and the gate stays mostly shut (and shut while n_eff < 5, where the spread estimate
is itself noise). β sets how many upper steps are pooled (n_eff
tends to (1+β)/(1-β): 99 at β = 0.98), i.e. the per-step signal-to-noise the gate can detect
(about 1/√n_eff).
"""
from __future__ import annotations

from typing import Iterable

import torch

META_OPTIMIZERS = ("gated", "adamw", "sgd")


class SignalGatedSGD(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor], lr: float, beta: float = 0.98, weight_decay: float = 0.0,
                 eps: float = 1e-12):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"--meta_beta: must be in [0, 1), got {beta}")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        for group in self.param_groups:
            beta, lr = group["beta"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["mean"] = torch.zeros_like(p)
                    state["square"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                state["mean"].mul_(beta).add_(p.grad, alpha=1 - beta)
                state["square"].mul_(beta).addcmul_(p.grad, p.grad, value=1 - beta)
                m = state["mean"] / (1 - beta ** t)
                s = state["square"] / (1 - beta ** t)
                gate = signal_gate(m, s, beta, t)
                state["gate"] = gate
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.sub_(lr * gate * m / (s.sqrt() + group["eps"]))


def effective_count(beta: float, t: int) -> float:
    """How many equally weighted samples a bias-corrected EMA of t samples is worth."""
    if beta == 0.0:
        return 1.0
    return (1 - beta ** t) ** 2 * (1 + beta) / ((1 - beta) * (1 - beta ** (2 * t)))


MIN_EFFECTIVE_COUNT = 5.0  # below this the spread estimate is itself noise: the gate stays shut


def signal_gate(mean: torch.Tensor, square: torch.Tensor, beta: float, t: int) -> torch.Tensor:
    """max(0, 1 - var / (n_eff mean²)): 0 where the averaged hypergradient is within its noise."""
    n_eff = effective_count(beta, t)
    if n_eff < MIN_EFFECTIVE_COUNT:
        return torch.zeros_like(mean)
    variance = (square - mean ** 2).clamp(min=0.0) * n_eff / (n_eff - 1.0)  # unbiased
    ratio = variance / (n_eff * mean ** 2).clamp(min=torch.finfo(mean.dtype).tiny)
    return (1.0 - ratio).clamp(min=0.0)


def build_meta_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float,
                         beta: float) -> torch.optim.Optimizer:
    if name == "gated":
        return SignalGatedSGD(params, lr=lr, beta=beta, weight_decay=weight_decay)
    if name == "adamw":  # the original's
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--meta_optimizer: unknown optimiser {name!r}; choose one of {list(META_OPTIMIZERS)}")
