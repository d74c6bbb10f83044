"""One upper-level step, top to bottom: meta-gradient → directional derivatives → hypergradient →
domain-weight update. Returns detached metrics; the trainer logs them.

It drives the engine through `DistributedEngine`'s methods (duck-typed here: this package does not
import DeepSpeed). Communication beyond the forward/backward passes: one all-reduce for ‖v‖² and
one of K floats (the per-domain sums or inner products), identical on every rank afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dreamprm.bilevel import hypergradient as hg
from dreamprm.bilevel.domain_weights import DomainWeights
from dreamprm.data.datasets import select_rows
from dreamprm.losses import domain_loss_sums, meta_loss, per_sample_mse

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "score_index")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


@dataclass
class UpperResult:
    meta_loss: float
    directional: torch.Tensor  # d_k, [K]
    hypergradient: torch.Tensor  # ∂L_meta/∂a, [K]
    v_norm: float
    epsilon: float | None
    applied: bool  # False when a non-finite value skipped the update


def meta_gradient(engine: Any, meta_batch: dict[str, torch.Tensor], aggregation: str,
                  loss_scale: float = 1.0) -> tuple[list[torch.Tensor], float]:
    """v = ∂L_meta/∂θ (this rank's owned elements) and the global meta loss.

    `loss_scale` exists for fault-injection tests (a NaN on one rank must skip the update everywhere).
    """
    logits = engine.forward(model_inputs(meta_batch))
    loss = meta_loss(logits, meta_batch["item_index"], meta_batch["target"], aggregation) * loss_scale
    v = engine.backward_without_step(loss)
    total = engine.all_reduce_sum(loss.detach().double().reshape(1).clone())
    return v, float(total[0]) / engine.info.world_size


def domain_sums_at(engine: Any, batch: dict[str, torch.Tensor], num_domains: int) -> torch.Tensor:
    """All-reduced per-domain loss sums S_k at the current parameters (no-grad forward)."""
    with torch.no_grad():
        logits = engine.forward(model_inputs(batch))
    sums = domain_loss_sums(per_sample_mse(logits, batch["target"]), batch["domain"], num_domains).double()
    return engine.all_reduce_sum(sums)


def exact_domain_dots(engine: Any, batch: dict[str, torch.Tensor], v: list[torch.Tensor], num_domains: int) -> torch.Tensor:
    """⟨∂(S_k/N)/∂θ, v⟩ for each k: one forward+backward per domain on that domain's rows.

    Every rank runs K passes (ZeRO-3 gathers are collective); a rank without rows of a domain runs
    its first row with the loss multiplied by zero.
    """
    grads = []
    n_local = batch["target"].numel()
    for k in range(num_domains):
        rows = torch.nonzero(batch["domain"] == k).flatten()
        scale = 1.0
        if rows.numel() == 0:
            rows, scale = torch.zeros(1, dtype=torch.long, device=batch["domain"].device), 0.0
        sub = select_rows(batch, rows)
        logits = engine.forward(model_inputs(sub))
        loss = per_sample_mse(logits, sub["target"]).sum() * (scale / n_local)
        grads.append(engine.backward_without_step(loss))
    # DeepSpeed averages gradients over ranks: mean_r ∇(S_k^r/N_local) = ∇ S_k / N_global.
    return engine.global_dots(grads, v)


def upper_step(engine: Any, weights: DomainWeights, meta_optimizer: torch.optim.Optimizer,
               meta_batch: dict[str, torch.Tensor], train_batch: dict[str, torch.Tensor], *,
               method: str, radius: float, aggregation: str, meta_loss_scale: float = 1.0) -> UpperResult:
    num_domains = len(weights.names)
    v, meta_loss_value = meta_gradient(engine, meta_batch, aggregation, meta_loss_scale)
    v_norm = math.sqrt(max(float(engine.global_dot(v, v)), 0.0))
    epsilon = None
    if method == "exact":
        directional = hg.exact_directional(lambda: exact_domain_dots(engine, train_batch, v, num_domains))
    else:
        epsilon = hg.fd_epsilon(radius, v_norm) if math.isfinite(v_norm) and v_norm > 0 else float("nan")
        global_count = engine.info.world_size * train_batch["target"].numel()
        if math.isfinite(epsilon):
            snapshot = engine.master_params_snapshot()
            direction = engine.full_gradients_for_edit(v)

            def sums_at(t: float) -> torch.Tensor:
                engine.perturb(snapshot, direction, t)
                return domain_sums_at(engine, train_batch, num_domains)

            try:
                directional = hg.central_difference(sums_at, epsilon, global_count)
            finally:
                engine.restore(snapshot)
        else:
            directional = torch.full((num_domains,), float("nan"), dtype=torch.float64)
    hyper = hg.hypergradient(directional, weights.logit_gradient)
    # Every value above came out of all-reduces, so every rank takes the same branch here.
    applied = bool(torch.isfinite(hyper).all()) and math.isfinite(meta_loss_value)
    if applied:
        meta_optimizer.zero_grad(set_to_none=True)
        weights.logits.grad = hyper.to(weights.logits.dtype).clone()
        meta_optimizer.step()
    return UpperResult(meta_loss=meta_loss_value, directional=directional, hypergradient=hyper,
                       v_norm=v_norm, epsilon=epsilon, applied=applied)
