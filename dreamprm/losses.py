"""Losses. Per-sample values stay unreduced until a named, weighted reduction.

(The original averaged MSELoss over the batch before multiplying by a per-sample domain weight,
which is only right at batch size 1.)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def per_sample_mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(sigmoid(logit) - Monte Carlo accuracy)^2 per sample, no reduction."""
    return (torch.sigmoid(logits.float()) - target.float()) ** 2


def per_sample_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logit) against the Monte Carlo accuracy as a soft target, per
    sample, no reduction. For the generative head sigmoid(logit) is the two-way softmax P(+) over
    {+, -}. Its minimum is the target's entropy, not 0; its gradient in the logit is sigmoid(z) - y,
    which does not vanish where the squared error's does (P(+) near 0 or 1)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")


LOWER_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": per_sample_mse, "bce": per_sample_bce,
}


def lower_loss(head: str, generative_loss: str = "bce") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-sample lower-level loss of a head: the scalar heads keep the original's squared error;
    the generative head takes --generative_loss."""
    name = generative_loss if head == "generative" else "mse"
    if name not in LOWER_LOSSES:
        raise ValueError(f"--generative_loss: unknown loss {name!r}; choose one of {sorted(LOWER_LOSSES)}")
    return LOWER_LOSSES[name]


def domain_loss_sums(per_sample: torch.Tensor, domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """S_k = sum of the per-sample losses of domain k in this batch, shape [K]."""
    return torch.zeros(num_domains, dtype=per_sample.dtype, device=per_sample.device).index_add(0, domain, per_sample)


def weighted_training_loss(per_sample: torch.Tensor, domain: torch.Tensor, weights: torch.Tensor,
                           instance_weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_{domain(i)} [* u_i] * loss_i / batch: the lower-level objective of one micro-batch
    (`instance_weights` u_i: one per sample, under --weighting instance/both)."""
    per_sample_weights = weights.to(per_sample.device)[domain]
    if instance_weights is not None:
        per_sample_weights = per_sample_weights * instance_weights.to(per_sample.device)
    return (per_sample_weights * per_sample).sum() / per_sample.numel()


def meta_pairs(labels: torch.Tensor, questions: torch.Tensor | None = None) -> torch.Tensor:
    """[chains, chains] mask of the (right i, wrong j) pairs the pairwise objective compares.

    `questions` [chains] (an integer per chain; None: every chain its own question): a chain whose
    question has both a right and a wrong chain in the batch is paired only within its question, as
    Best-of-N compares chains (a pair across questions also compares the two questions' difficulty
    and images); the remaining chains (questions with one kind of chain, e.g. one chain) are paired
    with each other across questions, the fallback. Without `questions` every right-wrong pair counts.
    """
    right = labels > 0.5
    pairs = right[:, None] & ~right[None, :]
    if questions is None:
        return pairs
    within = pairs & (questions[:, None] == questions[None, :])
    has_partner = within.any(dim=1) | within.any(dim=0)
    return within | (pairs & ~has_partner[:, None] & ~has_partner[None, :])


def pair_accuracy(chain_logits: torch.Tensor, labels: torch.Tensor,
                  questions: torch.Tensor | None = None) -> float | None:
    """Share of the pairwise objective's (right, wrong) pairs (`meta_pairs`) that the chain logits
    order right, ties counting half: the meta batch's AUC over those pairs (chance 0.5). Unlike the
    meta loss it does not depend on the scores' scale, so it tells a PRM that ranks with small
    margins from one that cannot rank. None for a batch without a right-wrong pair."""
    pairs = meta_pairs(labels, questions)
    if not bool(pairs.any()):
        return None
    margins = (chain_logits[:, None] - chain_logits[None, :])[pairs]
    return float(((margins > 0).double() + 0.5 * (margins == 0).double()).mean())


def pairwise_meta_loss(chain_logits: torch.Tensor, labels: torch.Tensor,
                       questions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (right, wrong) chain pairs (`meta_pairs`) of -log sigmoid(z_right - z_wrong), z the
    chain logit.

    What Best-of-N needs: right chains ranked above wrong ones. A shift of every score leaves it
    unchanged, so label means and calibration cannot steer the hypergradient. log 2 = chance.
    A batch without both kinds of chain contributes 0 (and no gradient)."""
    pairs = meta_pairs(labels, questions)
    if not bool(pairs.any()):
        return chain_logits.sum() * 0.0
    margins = chain_logits[:, None] - chain_logits[None, :]
    return F.softplus(-margins[pairs]).mean()


def mse_meta_loss(chain_logits: torch.Tensor, labels: torch.Tensor, questions: torch.Tensor | None = None) -> torch.Tensor:
    """The original: mean over chains of (sigmoid(chain logit) - correctness label)^2 (`questions`
    unused: every chain counts alone).

    It rewards calibration as much as ranking: a PRM whose chain scores rank right above wrong
    chains but sit near 0.5 scores near chance (0.25), and its gradient follows label means."""
    return ((torch.sigmoid(chain_logits) - labels) ** 2).mean()


META_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": mse_meta_loss, "pairwise": pairwise_meta_loss,
}
# Value of a PRM that scores every chain alike (exact: --meta_evidence compares averages with it to 1e-4).
META_LOSS_CHANCE = {"mse": 0.25, "pairwise": math.log(2)}


def chain_meta_loss(chain_logits: torch.Tensor, labels: torch.Tensor, objective: str = "mse",
                    questions: torch.Tensor | None = None) -> torch.Tensor:
    """The upper-level objective over chain logits [chains] and correctness labels [chains];
    `questions` [chains]: which question each chain answers (`meta_pairs`; None: one per chain)."""
    if objective not in META_LOSSES:
        raise ValueError(f"--meta_loss: unknown objective {objective!r}; choose one of {sorted(META_LOSSES)}")
    return META_LOSSES[objective](chain_logits, labels.to(chain_logits.dtype), questions)
