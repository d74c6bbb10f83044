"""One upper-level step, top to bottom: meta-gradient → directional derivatives → hypergradient →
domain-weight (and instance-weight) update. `upper_step` comes first and reads as the outline; the
functions after it are its parts, in the order it calls them. Returns detached metrics; the
trainer logs them.

It drives the engine through `DistributedEngine`'s methods (duck-typed here: this package does not
import DeepSpeed). Communication beyond the forward/backward passes: one all-gather of the meta
chains' scores (the ranking objectives compare chains across ranks), one all-reduce for ‖v‖², one of
K domain counts (`exact`) and one of K floats (the per-domain sums or inner products), identical on
every rank afterwards. Instance weights add one all-gather of (row, ∂L_meta/∂u_row, loss) triples, three
floats per record of the segment's global batch, never sized by the table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dreamprm.bilevel import hypergradient as hg
from dreamprm.bilevel.domain_weights import DomainWeights
from dreamprm.bilevel.aggregation import aggregate_logits
from dreamprm.bilevel.instance_net import InstanceNet
from dreamprm.bilevel.instance_weights import InstanceWeights
from dreamprm.data.datasets import select_rows
from dreamprm.losses import chain_meta_loss, domain_loss_sums, pair_accuracy, per_sample_mse
from dreamprm.model.prm import model_inputs

LowerLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class UpperResult:
    meta_loss: float
    directional: torch.Tensor  # d_k, [K]
    hypergradient: torch.Tensor  # ∂L_meta/∂a, [K]
    v_norm: float
    epsilon: float | None
    applied: bool  # False when a non-finite value skipped the update
    instance: dict[str, float] | None = None  # --weighting instance/both: the table update's summary
    pair_accuracy: float | None = None  # share of the meta batch's right-wrong pairs ordered right (0.5: chance)


def upper_step(engine: Any, weights: DomainWeights, meta_optimizer: torch.optim.Optimizer,
               meta_batch: dict[str, torch.Tensor], train_batches: list[dict[str, torch.Tensor]], *,
               method: str, radius: float, aggregation: str, objective: str, geometry: str = "sgd",
               instance_weights: InstanceWeights | InstanceNet | None = None,
               update_domains: bool = True, lower_loss: LowerLoss = per_sample_mse) -> UpperResult:
    """One upper step. `train_batches`: the micro-batches whose d_k are averaged (the segment's, or
    only its last). `geometry` 'adam' takes the inner products as ⟨P ∇S_k, v⟩ with P the PRM
    optimiser's own diagonal preconditioner, the step AdamW actually takes (DARTS assumes SGD).
    `instance_weights` (--weighting instance/both; needs a finite-difference `method`): the table is
    updated from the same two forwards; `update_domains` False leaves the domain logits alone
    (--weighting instance). `lower_loss`: the per-sample lower-level loss (`dreamprm.losses.lower_loss`)."""
    num_domains = len(weights.names)
    v, meta_loss_value, pair_acc = meta_signal(engine, meta_batch, aggregation, objective)
    if geometry == "adam":
        preconditioner = engine.adam_preconditioner()
        if preconditioner is not None:  # None before the PRM's first step: P = I there
            v = [p * x for p, x in zip(preconditioner, v)]
    v_norm = math.sqrt(max(float(engine.global_dot(v, v)), 0.0))
    epsilon = None
    rows = row_hypergradient = row_losses = row_predictions = None
    if v_norm == 0.0:
        # No meta signal (e.g. a pairwise meta batch without a right-wrong pair): every d is exactly 0.
        # fd would divide by ‖v‖ and report a non-finite update; five in a row would stop the run.
        directional = torch.zeros(num_domains, dtype=torch.float64)
    elif method == "exact":
        if instance_weights is not None:
            raise ValueError("instance weights need a finite-difference hypergradient (--hypergrad fd)")
        directional = sum(hg.exact_directional(lambda b=b: exact_domain_dots(engine, b, v, num_domains, lower_loss))
                          for b in train_batches) / len(train_batches)
    else:
        # Instance weights scale the lower loss per record; under 'both' the domain sums carry them.
        current = None if instance_weights is None else [instance_weights.weights(b["record"]) for b in train_batches]
        # (ℓ_i(θ), P_i(θ)) ≈ the means of the two forwards: the net's `gap` feature and the report's baselines
        at_theta: list[tuple[torch.Tensor, torch.Tensor]] = []
        directional, per_record, epsilon = finite_difference(
            engine, v, train_batches, radius, v_norm, num_domains,
            current if instance_weights is not None and update_domains else None, at_theta, lower_loss)
        if instance_weights is not None:
            with torch.no_grad():
                domain_w = weights().detach() if update_domains else None
            rows, row_hypergradient, row_losses, row_predictions = instance_update(
                engine, train_batches, per_record, at_theta, domain_w)
    hyper = hg.hypergradient(directional, weights.logit_gradient)
    # Every value above came out of all-reduces or all-gathers, so every rank takes the same branch.
    applied = bool(torch.isfinite(hyper).all()) and math.isfinite(meta_loss_value)
    if row_hypergradient is not None:
        applied = applied and bool(torch.isfinite(row_hypergradient).all())
    instance_summary = None
    if applied:
        if update_domains:
            meta_optimizer.zero_grad(set_to_none=True)
            weights.logits.grad = hyper.to(weights.logits.dtype).clone()
            # --meta_evidence: the gated optimiser waits for a meta loss below chance. A meta batch
            # without a right-wrong pair (v = 0, loss 0) is no evidence.
            meta_optimizer.step(lambda: meta_loss_value if v_norm > 0 else None)
        if instance_weights is not None and rows is not None:
            instance_summary = instance_weights.update(rows, row_hypergradient, row_losses, row_predictions)
    return UpperResult(meta_loss=meta_loss_value, directional=directional, hypergradient=hyper,
                       v_norm=v_norm, epsilon=epsilon, applied=applied, instance=instance_summary,
                       pair_accuracy=pair_acc)


def meta_gradient(engine: Any, meta_batch: dict[str, torch.Tensor], aggregation: str, objective: str
                  ) -> tuple[list[torch.Tensor], float]:
    """v = ∂L_meta/∂θ (this rank's owned elements) and the global meta loss (`meta_signal`)."""
    v, loss, _ = meta_signal(engine, meta_batch, aggregation, objective)
    return v, loss


def meta_signal(engine: Any, meta_batch: dict[str, torch.Tensor], aggregation: str, objective: str
                ) -> tuple[list[torch.Tensor], float, float | None]:
    """v = ∂L_meta/∂θ (this rank's owned elements), the global meta loss, and the share of the
    global meta batch's right-wrong pairs the chain logits order right (`pair_accuracy`).

    The objective is taken over the chains of every rank (a ranking loss pairs chains across
    ranks): the chain logits are all-gathered detached, the loss and its gradient g = ∂L/∂z are
    computed identically on every rank, and each rank back-propagates ⟨g_local, z_local⟩ through
    its own chains. Scaled by the world size, DeepSpeed's gradient averaging then gives ∂L/∂θ.
    """
    logits = engine.upper_forward(model_inputs(meta_batch))
    labels = meta_batch["target"].float()
    n, rank = labels.numel(), engine.info.rank
    chain_logits = aggregate_logits(aggregation, logits.float(), meta_batch["item_index"], labels.numel())
    # The question of each chain travels with its logit (pairs within a question may span ranks).
    # Without question ids each chain is its own question: a negative id unique over ranks.
    questions = meta_batch.get("question")
    if questions is None:
        questions = -1 - torch.arange(rank * n, (rank + 1) * n, device=labels.device)
    # float64 holds integer ids exactly up to 2^53.
    gathered = engine.all_gather(torch.stack([chain_logits.detach().double(), labels.double(),
                                              questions.to(labels.device).double()], dim=1))
    all_logits = gathered[:, 0].clone().requires_grad_(True)
    with torch.enable_grad():
        loss = chain_meta_loss(all_logits, gathered[:, 1], objective, gathered[:, 2])
        (dloss_dlogits,) = torch.autograd.grad(loss, all_logits)
    local = dloss_dlogits[rank * n:(rank + 1) * n].to(chain_logits.dtype)
    v = engine.backward_without_step((local * chain_logits).sum() * engine.info.world_size)
    # Identical on every rank unless one rank's value is not finite: the sum tells all of them.
    total = engine.all_reduce_sum(loss.detach().reshape(1).clone())
    return v, float(total[0]) / engine.info.world_size, pair_accuracy(gathered[:, 0], gathered[:, 1], gathered[:, 2])


def exact_domain_dots(engine: Any, batch: dict[str, torch.Tensor], v: list[torch.Tensor], num_domains: int,
                      lower_loss: LowerLoss = per_sample_mse) -> torch.Tensor:
    """⟨∂(S_k/N)/∂θ, v⟩ for each k: one forward+backward per domain present in the global batch.

    Each inner product is taken shard-locally as soon as its gradient exists, and the gradient is
    dropped, so memory does not grow with the number of domains. A domain absent from every rank's
    batch is skipped (d_k = 0, exactly: S_k = 0); one absent on this rank only runs a zero-loss row,
    because ZeRO-3's parameter gathers are collective.
    """
    n_local = batch["target"].numel()
    present = engine.all_reduce_sum(torch.bincount(batch["domain"].cpu(), minlength=num_domains).double()
                                    .to(engine.info.device)).cpu()
    local = torch.zeros(num_domains, dtype=torch.float64)
    for k in range(num_domains):
        if present[k] == 0:
            continue
        rows = torch.nonzero(batch["domain"] == k).flatten()
        scale = 1.0
        if rows.numel() == 0:
            rows, scale = torch.zeros(1, dtype=torch.long, device=batch["domain"].device), 0.0
        sub = select_rows(batch, rows)
        logits = engine.upper_forward(model_inputs(sub))
        loss = lower_loss(logits, sub["target"]).sum() * (scale / n_local)
        local[k] = engine.local_dot(engine.backward_without_step(loss), v)
    # DeepSpeed averages gradients over ranks: mean_r ∇(S_k^r/N_local) = ∇ S_k / N_global.
    return engine.all_reduce_sum(local.to(engine.info.device)).cpu()


def finite_difference(engine: Any, v: list[torch.Tensor], train_batches: list[dict[str, torch.Tensor]],
                      radius: float, v_norm: float, num_domains: int,
                      instance_weights: list[torch.Tensor] | None = None,
                      at_theta: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      lower_loss: LowerLoss = per_sample_mse) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Central difference along v from two forwards per batch at θ ± εv (parameters restored after).

    Returns (d_k [K], all-reduced; this rank's per-record d_i, one [batch] tensor per batch; ε), with
    d_i = (ℓ_i(θ+εv) - ℓ_i(θ-εv)) / (2εN) and N the global number of samples. With
    `instance_weights` (u_i per batch) the domain sums are of u_i ℓ_i: d_k = Σ_{i in k} u_i d_i.
    `at_theta`, when given, receives this rank's ((ℓ_i(θ+εv) + ℓ_i(θ-εv)) / 2, (P_i(θ+εv) + P_i(θ-εv)) / 2)
    per batch, P_i = sigmoid of the step logit (the PRM's predicted accuracy).
    """
    epsilon = hg.fd_epsilon(radius, v_norm) if math.isfinite(v_norm) and v_norm > 0 else float("nan")
    global_count = engine.info.world_size * sum(b["target"].numel() for b in train_batches)
    if not math.isfinite(epsilon):
        nan = torch.full((num_domains,), float("nan"), dtype=torch.float64)
        per_record = [torch.full_like(b["target"], float("nan"), dtype=torch.float64) for b in train_batches]
        if at_theta is not None:
            at_theta.extend((x, x) for x in per_record)
        return nan, per_record, epsilon
    snapshot = engine.master_params_snapshot()
    direction = engine.full_gradients_for_edit(v)
    losses: dict[float, list[torch.Tensor]] = {}
    predictions: dict[float, list[torch.Tensor]] = {}

    def sums_at(t: float) -> torch.Tensor:
        engine.perturb(snapshot, direction, t)
        losses[t], predictions[t] = map(list, zip(*(per_sample_at(engine, b, lower_loss) for b in train_batches)))
        weighted = losses[t] if instance_weights is None else [x * u for x, u in zip(losses[t], instance_weights)]
        return sum(engine.all_reduce_sum(domain_loss_sums(x, b["domain"], num_domains).double())
                   for x, b in zip(weighted, train_batches))

    try:
        directional = hg.central_difference(sums_at, epsilon, global_count)
    finally:
        engine.restore(snapshot)
    per_record = [(plus.double() - minus.double()) / (2.0 * epsilon * global_count)
                  for plus, minus in zip(losses[epsilon], losses[-epsilon])]
    if at_theta is not None:
        mean = [(plus.double() + minus.double()) / 2.0 for plus, minus in zip(losses[epsilon], losses[-epsilon])]
        at_theta.extend(zip(mean, [(plus.double() + minus.double()) / 2.0
                                   for plus, minus in zip(predictions[epsilon], predictions[-epsilon])]))
    return directional, per_record, epsilon


def instance_update(engine: Any, train_batches: list[dict[str, torch.Tensor]], per_record: list[torch.Tensor],
                    at_theta: list[tuple[torch.Tensor, torch.Tensor]], domain_weights: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (row, ∂L_meta/∂u_row, ℓ_row, P_row) rows, gathered: one all-gather sized by the global
    batch (`at_theta`: the (ℓ, P) pairs `finite_difference` gave). ∂L_meta/∂u_i ≈ -c_i d_i, c_i the
    record's domain weight (`domain_weights`, None: 1); the table or the net chains it through its own
    Jacobian (`update`), identically on every rank.
    """
    rows = torch.cat([b["record"].cpu() for b in train_batches])
    d = torch.cat([x.cpu() for x in per_record]).double()
    if domain_weights is not None:
        d = d * torch.cat([domain_weights.cpu().double()[b["domain"].cpu()] for b in train_batches])
    losses = torch.cat([loss.cpu() for loss, _ in at_theta]).double()
    predictions = torch.cat([p.cpu() for _, p in at_theta]).double()
    local = torch.stack([rows.double(), -d, losses, predictions], dim=1)
    gathered = engine.all_gather(local.to(engine.info.device)).cpu()
    return gathered[:, 0].long(), gathered[:, 1], gathered[:, 2], gathered[:, 3]


def per_sample_at(engine: Any, batch: dict[str, torch.Tensor], lower_loss: LowerLoss = per_sample_mse
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-sample training losses and predicted accuracies sigmoid(logit) at the current
    parameters (one no-grad forward)."""
    with torch.no_grad():
        logits = engine.upper_forward(model_inputs(batch))
    return lower_loss(logits, batch["target"]), torch.sigmoid(logits.float())


def per_sample_losses_at(engine: Any, batch: dict[str, torch.Tensor],
                         lower_loss: LowerLoss = per_sample_mse) -> torch.Tensor:
    """This rank's per-sample training losses at the current parameters (no-grad forward)."""
    return per_sample_at(engine, batch, lower_loss)[0]


def domain_sums_at(engine: Any, batch: dict[str, torch.Tensor], num_domains: int,
                   lower_loss: LowerLoss = per_sample_mse) -> torch.Tensor:
    """All-reduced per-domain loss sums S_k at the current parameters (no-grad forward)."""
    sums = domain_loss_sums(per_sample_losses_at(engine, batch, lower_loss), batch["domain"], num_domains).double()
    return engine.all_reduce_sum(sums)
