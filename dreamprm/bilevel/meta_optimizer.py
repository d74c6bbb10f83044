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

A consistent hypergradient is not yet evidence that following it helps: it is systematic whenever
the training gradients and the meta gradient share a direction, also when the meta objective itself
cannot rank (its loss at chance). So the gate also waits for the meta objective. Given the meta
loss of each step (`step(closure)`, the closure returning it) and its value at `chance`, the same
EMAs (β) of the loss ℓ and ℓ² give its mean μ and spread, and every domain's gate is multiplied by

    evidence = max(0, 1 - z² var_ℓ / (n_eff (chance - μ)²))   where μ < chance, else 0

which opens only once μ is `confidence` (z, 2 by default) standard errors below chance. Each step's
meta batch is drawn afresh, so the meta losses of successive steps share no sampling noise and
their standard error is honest; the hypergradients of successive steps share the PRM's state, which
is why their own spread alone cannot say whether there is a signal to follow.
"""
from __future__ import annotations

from typing import Iterable

import torch

META_OPTIMIZERS = ("gated", "adamw", "sgd")


EVIDENCE_Z = 2.0  # standard errors below chance the meta loss must stand before any weight moves
EVIDENCE_KEY = "meta_evidence"  # the optimiser state entry (not a parameter's) of the meta-loss EMAs


class SignalGatedSGD(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor], lr: float, beta: float = 0.98, weight_decay: float = 0.0,
                 eps: float = 1e-12, chance: float | None = None, confidence: float = EVIDENCE_Z):
        """`chance`: the meta loss of a PRM that cannot rank (`dreamprm.losses.META_LOSS_CHANCE`);
        None leaves out the evidence factor (the gate then reads the hypergradient alone)."""
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"--meta_beta: must be in [0, 1), got {beta}")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, eps=eps))
        self.chance, self.confidence = chance, confidence

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        """One update; `closure()` returns this upper step's meta loss (the evidence factor's input),
        or None for a step that carries no evidence (a meta batch without a right-wrong pair)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        evidence = None
        if self.chance is not None:
            evidence = self.observe(float(loss)) if loss is not None else self.state[EVIDENCE_KEY].get("evidence", 0.0)
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
                if evidence is not None:
                    gate = gate * evidence
                state["gate"] = gate
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.sub_(lr * gate * m / (s.sqrt() + group["eps"]))
        return loss

    def observe(self, loss: float) -> float:
        """Fold one meta loss into its EMAs (the first group's β); returns the evidence factor."""
        beta = self.param_groups[0]["beta"]
        state = self.state[EVIDENCE_KEY]
        if not state:
            state.update(step=0, mean=0.0, square=0.0)
        state["step"] += 1
        state["mean"] = beta * state["mean"] + (1 - beta) * loss
        state["square"] = beta * state["square"] + (1 - beta) * loss * loss
        t = state["step"]
        mean, square = state["mean"] / (1 - beta ** t), state["square"] / (1 - beta ** t)
        state["evidence"] = evidence_factor(mean, square, beta, t, self.chance, self.confidence)
        return state["evidence"]


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


def evidence_factor(mean: float, square: float, beta: float, t: int, chance: float, confidence: float) -> float:
    """max(0, 1 - z² var / (n_eff (chance - mean)²)) where mean < chance, else 0: how far the averaged
    meta loss stands below chance, in units of `confidence` (z) standard errors."""
    n_eff = effective_count(beta, t)
    deficit = chance - mean
    if n_eff < MIN_EFFECTIVE_COUNT or deficit <= 0.0:
        return 0.0
    variance = max(square - mean ** 2, 0.0) * n_eff / (n_eff - 1.0)
    return max(0.0, 1.0 - confidence ** 2 * variance / (n_eff * deficit ** 2))


def build_meta_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float,
                         beta: float, chance: float | None = None, confidence: float = EVIDENCE_Z) -> torch.optim.Optimizer:
    """`chance` (gated only; None: off): the meta objective's chance value, which the gate waits to
    see the meta loss fall below by `confidence` standard errors (`SignalGatedSGD`, --meta_evidence)."""
    if name == "gated":
        return SignalGatedSGD(params, lr=lr, beta=beta, weight_decay=weight_decay, chance=chance, confidence=confidence)
    if name == "adamw":  # the original's
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--meta_optimizer: unknown optimiser {name!r}; choose one of {list(META_OPTIMIZERS)}")
