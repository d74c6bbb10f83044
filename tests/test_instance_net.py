"""The instance net (`--weighting instance_net|both_net`): weights, hypergradient, state."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dreamprm.bilevel.instance_net import InstanceNet, RecordFeatures
from dreamprm.config import parse_args

NAMES = ("mc", "gap", "position", "domain")


def make_net(n: int = 400, seed: int = 0, names=NAMES) -> InstanceNet:
    generator = torch.Generator().manual_seed(seed)
    features = RecordFeatures(torch.rand(n, generator=generator), torch.rand(n, generator=generator),
                              torch.randint(0, 3, (n,), generator=generator), 3)
    return InstanceNet(features, names, lr=0.05, seed=seed)


def noisy_records_signal(net: InstanceNet, rows: torch.Tensor, generator: torch.Generator):
    """Losses of the visited rows (noisy records: the odd rows, high loss) and ∂L_meta/∂u: raising a
    noisy record's weight raises the meta loss."""
    noisy = rows % 2 == 1
    losses = torch.where(noisy, 0.5, 0.02) + 0.01 * torch.rand(rows.numel(), generator=generator)
    dloss_du = torch.where(noisy, 1.0, -1.0).double() + 0.3 * torch.randn(rows.numel(), generator=generator,
                                                                           dtype=torch.float64)
    return dloss_du, losses.double()


def test_a_new_net_weights_every_record_one():
    net = make_net()
    assert torch.equal(net.all_weights(), torch.ones(len(net)))


def test_the_lower_loss_gets_the_nets_weights_and_they_keep_mean_one():
    net = make_net()
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        rows = torch.randint(0, len(net), (32,), generator=generator)
        net.update(rows, *noisy_records_signal(net, rows, generator))
    everything = net.all_weights()
    assert float(everything.std()) > 0.05  # the updates moved the weights
    assert float(everything.double().mean()) == pytest.approx(1.0, abs=1e-6)
    low = torch.argsort(everything)[:8]
    for rows in (torch.tensor([4, 99, 4, 311]), low):
        # Equal up to float32 rounding: a matmul's blocking depends on how many rows it multiplies.
        torch.testing.assert_close(net.weights(rows), everything[rows], rtol=1e-6, atol=0.0)
    assert float(net.weights(low).mean()) < 0.9  # not renormalised over the batch


def test_what_the_net_learns_on_visited_records_moves_records_never_visited():
    net = make_net(n=2000)
    generator = torch.Generator().manual_seed(2)
    visited = torch.arange(0, 1000)
    for _ in range(30):
        rows = visited[torch.randint(0, 1000, (32,), generator=generator)]
        net.update(rows, *noisy_records_signal(net, rows, generator))
    # The unvisited half has no measured loss; give it one (as a later visit would) and compare.
    unseen = torch.arange(1000, 2000)
    net.features.record_losses(unseen, torch.where(unseen % 2 == 1, 0.5, 0.02).double())
    net.normaliser = net._mean_score()
    weights = net.weights(unseen)
    noisy, clean = weights[unseen % 2 == 1], weights[unseen % 2 == 0]
    assert float(noisy.mean()) < 0.7 * float(clean.mean())


def test_parameter_gradient_is_the_vector_jacobian_product_with_the_normaliser_held():
    net = make_net(n=50)
    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 50, (20,), generator=generator)
    net.update(rows, *noisy_records_signal(net, rows, generator))  # away from the zero last layer
    upstream = torch.randn(20, generator=generator, dtype=torch.float64)
    got = net.parameter_gradient(rows, upstream, torch.float64)
    # Central differences of Σ_i g_i s(f_i; φ)/M along each parameter, in float64.
    double = copy.deepcopy(net.net).double()
    x = net.features.matrix(rows, net.names).double()
    params = list(double.parameters())
    expected = []
    for p in params:
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            keep = float(flat[j])
            values = []
            for h in (1e-6, -1e-6):
                flat[j] = keep + h
                with torch.no_grad():
                    values.append(float((upstream * F.softplus(double(x).squeeze(1)) / net.normaliser).sum()))
            flat[j] = keep
            expected.append((values[0] - values[1]) / 2e-6)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_a_resumed_net_continues_bit_for_bit():
    straight, resumed = make_net(), make_net()
    generator = torch.Generator().manual_seed(4)
    plan = []
    for _ in range(6):
        rows = torch.randint(0, len(straight), (16,), generator=generator)
        plan.append((rows, *noisy_records_signal(straight, rows, generator)))
    for step in plan:
        straight.update(*step)
    for step in plan[:3]:
        resumed.update(*step)
    fresh = make_net()
    fresh.load_state_dict(copy.deepcopy(resumed.state_dict()))
    for step in plan[3:]:
        fresh.update(*step)
    assert torch.equal(fresh.all_weights(), straight.all_weights())
    assert float(fresh.checksum()) == float(straight.checksum())


def test_the_checksum_sees_a_changed_parameter_or_loss():
    a, b = make_net(), make_net()
    assert float(a.checksum()) == float(b.checksum())
    with torch.no_grad():
        b.net[0].bias[3] += 1e-6
    assert float(a.checksum()) != float(b.checksum())
    c = make_net()
    c.features.record_losses(torch.tensor([7]), torch.tensor([0.25], dtype=torch.float64))
    assert float(a.checksum()) != float(c.checksum())


def test_a_checkpoint_of_another_kind_or_size_is_refused():
    net = make_net()
    assert "per-record table" in net.incompatibility({"kind": "table", "logits": torch.zeros(400)})
    assert "records" in net.incompatibility({**net.state_dict(), "records": 10})
    other = make_net(names=("mc", "gap"))
    assert "--instance_net_features" in net.incompatibility(other.state_dict())
    with pytest.raises(ValueError):
        net.load_state_dict(other.state_dict())


def test_a_large_table_normalises_over_a_fixed_subsample():
    net = make_net(n=200_000)
    generator = torch.Generator().manual_seed(5)
    for _ in range(5):
        rows = torch.randint(0, len(net), (64,), generator=generator)
        net.update(rows, *noisy_records_signal(net, rows, generator))
    # The subsample's mean stands in for the table's: weights of mean 1 within its sampling error.
    weights = net.all_weights().double()
    assert float(weights.std()) > 0.01
    assert float(weights.mean()) == pytest.approx(1.0, abs=4 * float(weights.std()) / 128)
    assert net.mean_rows.numel() == 1 << 14
    assert torch.equal(net.mean_rows, make_net(n=200_000).mean_rows)  # the same rows on every rank


def test_flags(capsys):
    config = parse_args(["--weighting", "instance_net", "--hypergrad", "fd", "--instance_net_features", "gap,domain"])
    assert config.bilevel.instance_net_features == "gap,domain"
    with pytest.raises(SystemExit) as err:
        parse_args(["--weighting", "both_net", "--hypergrad", "fd", "--instance_net_features", "gap,loss"])
    assert err.value.code == 2
    assert "--instance_net_features: 'gap,loss'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--weighting", "instance_net"])  # needs --hypergrad fd
    with pytest.raises(SystemExit):
        parse_args(["--meta_warmup_steps", "-1"])
