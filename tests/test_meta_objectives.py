"""The upper level's objectives and the domain-logit optimiser, against their definitions."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from dreamprm.bilevel.aggregation import AGGREGATIONS, aggregate, aggregate_logits, meta_loss
from dreamprm.bilevel.meta_optimizer import SignalGatedSGD, build_meta_optimizer, effective_count, evidence_factor
from dreamprm.losses import META_LOSSES, chain_meta_loss, pairwise_meta_loss


def brute_force_pairwise(z: list[float], labels: list[int]) -> float:
    pairs = [(a, b) for (a, la), (b, lb) in itertools.product(zip(z, labels), repeat=2) if la == 1 and lb == 0]
    return sum(math.log1p(math.exp(-(a - b))) for a, b in pairs) / len(pairs)


def test_pairwise_loss_is_the_mean_over_right_wrong_pairs():
    z, labels = [0.3, -1.2, 2.0, 0.1, -0.4], [1, 0, 1, 0, 0]
    got = pairwise_meta_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64))
    assert float(got) == pytest.approx(brute_force_pairwise(z, labels), rel=1e-12)


def test_pairwise_loss_ignores_a_shift_of_every_score_and_mse_does_not():
    z = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    for shift in (-3.0, 0.5, 4.0):
        assert float(chain_meta_loss(z + shift, labels, "pairwise")) == pytest.approx(
            float(chain_meta_loss(z, labels, "pairwise")), rel=1e-12)
    assert abs(float(chain_meta_loss(z + 2.0, labels, "mse")) - float(chain_meta_loss(z, labels, "mse"))) > 0.01


def test_pairwise_loss_without_both_kinds_of_chain_is_zero_with_a_zero_gradient():
    z = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    loss = pairwise_meta_loss(z, torch.tensor([1.0, 1.0], dtype=torch.float64))
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(z.grad, torch.zeros(2, dtype=torch.float64))


def test_pairwise_loss_falls_as_right_chains_rise_above_wrong_ones():
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    values = [float(pairwise_meta_loss(torch.tensor([m, 0.0], dtype=torch.float64), labels)) for m in (-2, 0, 2)]
    assert values[0] > values[1] > values[2]
    assert values[1] == pytest.approx(math.log(2))


def test_mse_objective_is_the_originals_on_chain_probabilities():
    torch.manual_seed(0)
    step_logits, index = torch.randn(7, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    labels = torch.tensor([1.0, 0.0, 1.0])
    for name in AGGREGATIONS:
        expected = ((aggregate(name, step_logits, index, 3) - labels) ** 2).mean()
        assert float(meta_loss(step_logits, index, labels, name, "mse")) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("name", ["mean_logit", "min", "max", "last"])
def test_chain_logits_shift_with_the_step_logits(name):
    step_logits, index = torch.tensor([0.2, -1.0, 3.0, 0.5, -0.7], dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1])
    base = aggregate_logits(name, step_logits, index, 2)
    torch.testing.assert_close(aggregate_logits(name, step_logits + 1.5, index, 2), base + 1.5)


def test_chain_logits_of_mean_and_product_are_finite_when_scores_saturate():
    step_logits, index = torch.tensor([40.0, 45.0, -40.0, -45.0], dtype=torch.float64), torch.tensor([0, 0, 1, 1])
    for name in ("mean", "product"):
        assert torch.isfinite(aggregate_logits(name, step_logits, index, 2)).all(), name


def test_unknown_objective_names_the_flag():
    with pytest.raises(ValueError, match="--meta_loss"):
        chain_meta_loss(torch.zeros(2), torch.zeros(2), "hinge")
    assert set(META_LOSSES) == {"mse", "pairwise"}


# ------------------------------------------------------------------ the domain-logit optimiser
def drive(optimizer_name: str, mean: float, steps: int = 300, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Final logits of n independent coordinates fed `mean + N(0, 1)` hypergradients."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    optimizer = build_meta_optimizer(optimizer_name, [logits], lr=0.1, weight_decay=0.0, beta=0.98)
    for _ in range(steps):
        logits.grad = mean + torch.randn(n, dtype=torch.float64, generator=generator)
        optimizer.step()
    return logits.detach()


def test_gated_optimiser_moves_pure_noise_less_than_adamw():
    gated, adamw = drive("gated", 0.0), drive("adamw", 0.0)
    # AdamW turns each noise step into a ~lr step: a random walk of ~lr*sqrt(steps) = 1.7.
    assert float(adamw.std()) > 1.5
    assert float(gated.std()) < 0.65 * float(adamw.std())


def test_gated_optimiser_follows_a_consistent_signal():
    gated = drive("gated", 0.3)
    assert float(gated.mean()) < -5.0  # descends along the mean hypergradient
    assert float((gated < 0).float().mean()) > 0.99


def test_gated_optimiser_stays_shut_until_it_has_seen_enough_steps():
    logits = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = SignalGatedSGD([logits], lr=0.1, beta=0.98)
    for _ in range(4):  # n_eff < 5: a spread estimated from so few steps is itself noise
        logits.grad = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
        optimizer.step()
    assert torch.equal(logits.detach(), torch.zeros(3, dtype=torch.float64))
    assert effective_count(0.98, 1) == pytest.approx(1.0) and effective_count(0.98, 10_000) == pytest.approx(99.0)


def test_gated_optimiser_state_round_trips_exactly():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    first = SignalGatedSGD([a], lr=0.1)
    grads = [torch.randn(4, dtype=torch.float64) + 0.5 for _ in range(30)]
    for g in grads[:20]:
        a.grad = g.clone()
        first.step()
    b = torch.nn.Parameter(a.detach().clone())
    second = SignalGatedSGD([b], lr=0.1)
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as read back from a checkpoint
    for g in grads[20:]:
        a.grad, b.grad = g.clone(), g.clone()
        first.step()
        second.step()
    assert torch.equal(a, b)


# ------------------------------------------------------------------ the gate waits for the meta objective
def drive_with_meta_loss(meta_loss: float, steps: int = 300, seed: int = 0, spread: float = 0.1) -> torch.Tensor:
    """Final logits of the gated optimiser (chance log 2) fed a consistent hypergradient (0.3 sigma)
    and meta losses `meta_loss + N(0, spread)`."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.nn.Parameter(torch.zeros(200, dtype=torch.float64))
    optimizer = build_meta_optimizer("gated", [logits], lr=0.1, weight_decay=0.0, beta=0.98, chance=math.log(2))
    for _ in range(steps):
        logits.grad = 0.3 + torch.randn(200, dtype=torch.float64, generator=generator)
        loss = meta_loss + spread * float(torch.randn((), dtype=torch.float64, generator=generator))
        optimizer.step(lambda: loss)
    return logits.detach()


def test_a_consistent_hypergradient_moves_nothing_while_the_meta_loss_is_at_chance():
    # The run: meta loss 0.69 (log 2 = 0.693) while the hypergradient kept a direction.
    at_chance = drive_with_meta_loss(math.log(2))
    assert float(at_chance.abs().max()) < 0.5, at_chance.abs().max()
    above_chance = drive_with_meta_loss(0.75)
    assert torch.equal(above_chance, torch.zeros_like(above_chance))
    # Below chance by a few standard errors (0.1 / sqrt(99) = 0.01 at these settings): it follows.
    ranking = drive_with_meta_loss(0.60)
    assert float(ranking.mean()) < -5.0 and float((ranking < 0).float().mean()) > 0.99


def test_evidence_factor_opens_with_the_confidence_of_the_meta_loss():
    # n_eff 99 (beta 0.98, long run), per-step spread 0.1: standard error 0.01; z = 2 needs 0.02 below chance.
    t, beta = 10_000, 0.98
    for mean, expected in ((0.70, 0.0), (0.68, 0.0), (0.6731, 0.0), (0.6531, 0.75), (0.5931, 0.96)):
        square = mean ** 2 + 0.01 * (98 / 99)  # variance 0.01 after the unbiasing factor
        got = evidence_factor(mean, square, beta, t, chance=math.log(2), confidence=2.0)
        assert got == pytest.approx(expected, abs=0.01), (mean, got)
    assert evidence_factor(0.1, 0.01, beta, 3, chance=math.log(2), confidence=2.0) == 0.0  # n_eff < 5: shut


def test_without_a_meta_loss_the_gate_reads_the_hypergradient_alone_and_the_evidence_round_trips():
    assert float(drive("gated", 0.3).mean()) < -5.0  # step() without a closure: as before
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    first = SignalGatedSGD([a], lr=0.1, chance=math.log(2))
    steps = [(torch.randn(4, dtype=torch.float64) + 0.5, 0.55 + 0.05 * float(torch.randn(()))) for _ in range(40)]
    for g, loss in steps[:25]:
        a.grad = g.clone()
        first.step(lambda: loss)
    b = torch.nn.Parameter(a.detach().clone())
    second = SignalGatedSGD([b], lr=0.1, chance=math.log(2))
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as read back from a checkpoint
    for g, loss in steps[25:]:
        a.grad, b.grad = g.clone(), g.clone()
        first.step(lambda: loss)
        second.step(lambda: loss)
    assert torch.equal(a, b) and first.state["meta_evidence"]["evidence"] > 0.5


def test_meta_evidence_is_off_by_default_and_checked(capsys):
    from dreamprm.config import parse_args
    from dreamprm.build import upper_level
    assert parse_args([]).bilevel.meta_evidence == 0.0
    _, _, optimizer = upper_level(parse_args([]), {"a": 0, "b": 1}, 4)
    assert optimizer.chance is None  # the gate reads the hypergradient alone
    _, _, optimizer = upper_level(parse_args(["--meta_evidence", "2"]), {"a": 0, "b": 1}, 4)
    assert optimizer.chance == pytest.approx(math.log(2)) and optimizer.confidence == 2.0
    with pytest.raises(SystemExit) as stop:
        parse_args(["--meta_evidence", "-1"])
    assert stop.value.code == 2 and "error: --meta_evidence: must be a number >= 0" in capsys.readouterr().err
