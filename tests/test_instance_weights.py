"""Instance weights (`--weighting instance|both`): the table, its update, and the trainer around it."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, base_env, exported_tensors, launch_command, read_json, run_train, small_run_args
from dreamprm.bilevel.instance_weights import InstanceWeights
from dreamprm.config import parse_args
from dreamprm.losses import weighted_training_loss


def test_weights_have_mean_one_over_the_table_after_sparse_updates():
    table = InstanceWeights(1000, lr=0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows = torch.randint(0, 1000, (32,), generator=generator)
        table.step(rows, torch.randn(32, generator=generator, dtype=torch.float64))
    # The running normaliser (updated with the changed rows only) equals the sum over the whole table.
    exact = float(F.softplus(table.logits.double()).sum())
    assert table.softplus_sum == pytest.approx(exact, rel=1e-12)
    assert float(table.all_weights().double().mean()) == pytest.approx(1.0, abs=1e-6)
    assert table.logits.std() > 0.1  # the updates moved rows


def test_the_lower_loss_gets_the_tables_weights_after_sparse_updates():
    # `weights(rows)` (what the lower loss multiplies by) must be the table's normalised weights, not
    # the rows renormalised among themselves: over a batch of distrusted rows the two differ.
    table = InstanceWeights(500, lr=0.7)
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        rows = torch.randint(0, 500, (16,), generator=generator)
        table.step(rows, torch.randn(16, generator=generator, dtype=torch.float64))
    everything = table.all_weights()
    for rows in (torch.tensor([4, 99, 4, 311]), torch.argsort(everything)[:8], torch.arange(500)):
        assert torch.equal(table.weights(rows), everything[rows])
    low = torch.argsort(everything)[:8]
    assert float(table.weights(low).mean()) < 0.9  # a batch of distrusted rows keeps its low weights


def test_an_update_moves_only_its_rows_and_repeated_rows_add_up():
    table = InstanceWeights(10, lr=1.0)
    table.step(torch.tensor([2, 7, 2]), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    moved = torch.nonzero(table.logits).flatten().tolist()
    assert moved == [2, 7]
    # Row 2's hypergradients add up to 2, row 7's is -1; steps are lr * g / rms(g) over the two rows.
    rms = math.sqrt((2.0 ** 2 + 1.0) / 2)
    assert float(table.logits[2]) == pytest.approx(-2.0 / rms, rel=1e-6)
    assert float(table.logits[7]) == pytest.approx(1.0 / rms, rel=1e-6)


def test_last_visits_keep_the_mean_loss_and_load_older_states_without_its_sums():
    table = InstanceWeights(200, lr=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):  # revisits: the running sum replaces a row's old loss
        rows = torch.randint(0, 200, (16,), generator=generator)
        table.update(rows, torch.randn(16, generator=generator, dtype=torch.float64),
                     torch.rand(16, generator=generator, dtype=torch.float64), torch.rand(16, generator=generator))
    visited = ~torch.isnan(table.visits.loss)
    assert table.visits.mean_loss == pytest.approx(float(table.visits.loss[visited].double().mean()), rel=1e-6)
    assert int(visited.sum()) == table.visits.loss_count < 200
    # A checkpoint from before the running sums and the predictions were kept.
    old = {k: v for k, v in table.state_dict().items() if k not in ("loss_sum", "loss_count", "prediction")}
    again = InstanceWeights(200, lr=0.5)
    again.load_state_dict(old)
    assert torch.equal(again.last_losses().nan_to_num(-1), table.last_losses().nan_to_num(-1))
    assert again.visits.loss_count == table.visits.loss_count
    assert again.visits.mean_loss == pytest.approx(table.visits.mean_loss, rel=1e-6)
    assert torch.isnan(again.last_predictions()).all()


def test_logit_gradient_is_the_derivative_of_the_weight_with_the_normaliser_held():
    table = InstanceWeights(5, lr=1.0)
    table.step(torch.arange(5), torch.tensor([0.3, -1.2, 0.8, 0.1, -0.4], dtype=torch.float64))
    rows = torch.tensor([1, 3])
    a = table.logits[rows].double().requires_grad_(True)
    upstream = torch.tensor([0.7, -2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(F.softplus(a) / table.mean_softplus, a, grad_outputs=upstream)
    torch.testing.assert_close(table.logit_gradient(rows, upstream), grad)


def test_instance_weights_scale_each_sample_of_the_lower_loss():
    per_sample = torch.tensor([0.5, 0.2, 0.9, 0.4])
    domain = torch.tensor([0, 0, 1, 1])
    domain_weights = torch.tensor([1.5, 0.5])
    instance = torch.tensor([1.0, 0.0, 2.0, 1.0])
    loss = weighted_training_loss(per_sample, domain, domain_weights, instance)
    assert float(loss) == pytest.approx((1.5 * 0.5 + 0.0 + 0.5 * 2.0 * 0.9 + 0.5 * 0.4) / 4)


def test_a_table_of_ten_million_records_fits_in_100_mb():
    table = InstanceWeights(10_000_000, lr=0.3)
    assert table.logits.element_size() * table.logits.numel() == 40_000_000
    assert table.visits.loss.element_size() * table.visits.loss.numel() == 40_000_000  # the last-visit losses
    assert table.visits.prediction.element_size() * table.visits.prediction.numel() == 20_000_000  # and predictions (float16)
    assert set(table.state_dict()) == {"kind", "recipe", "logits", "softplus_sum", "updates", "loss", "prediction",
                                      "loss_sum", "loss_count"}


def test_instance_weights_refuse_the_exact_estimator(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--weighting", "instance"])
    assert "--weighting instance needs every record's directional derivative: --hypergrad fd" in capsys.readouterr().err
    assert parse_args(["--weighting", "instance", "--hypergrad", "fd"]).bilevel.weighting == "instance"
    assert parse_args(["--weighting", "both", "--baseline"]).bilevel.weighting == "both"  # no upper level


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.benchmark
def test_per_record_derivatives_match_the_fp64_reference_on_two_ranks(tiny_model, tmp_path):
    out = tmp_path / "instance.json"
    cmd = launch_command(REPO / "benchmarks" / "instance_fidelity.py",
                         ["--reward_model", str(tiny_model), "--reference", "--repeats", "1", "--out", str(out)], 2)
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = read_json(out)
    assert result["world_size"] == 2 and len(result["per_record_fd"]) == 16
    assert max(abs(x) for x in result["per_record_reference"]) > 0
    assert result["cosine_vs_reference"] >= 0.999, result
    assert result["rel_error_vs_reference"] < 0.01, result
    # The instance net's hypergradient (the fp32 d_i chained through the net's Jacobian) against the
    # float64 d_i through the same chain.
    assert result["net_hypergradient_cosine_vs_reference"] >= 0.999, result


def _instance_run(tiny_model, out, weighting, *extra):
    return small_run_args(tiny_model, out, "--weighting", weighting, "--hypergrad", "fd", "--batch_size", "4",
                          "--meta_batch_size", "2", "--unroll_steps", "2", "--weight_check_every", "1", *extra)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("weighting", ["instance", "instance_net"])
def test_two_ranks_train_report_and_resume_instance_weights_exactly(tiny_model, tmp_path, weighting):
    straight = tmp_path / "straight"
    run_train(_instance_run(tiny_model, straight, weighting, "--iteration_num", "8", "--save_every_iterations", "4"),
              nproc=2)
    resumed = tmp_path / "resumed"
    run_train(_instance_run(tiny_model, resumed, weighting, "--iteration_num", "4", "--save_every_iterations", "4",
                            "--no-export"), nproc=2)
    run_train(_instance_run(tiny_model, resumed, weighting, "--iteration_num", "8", "--save_every_iterations", "4",
                            "--resume", "auto"), nproc=2)

    records = json.loads((REPO / "data" / "demo" / "train.json").read_text())
    lines = [json.loads(x) for x in (straight / "instance_weights.jsonl").read_text().splitlines()]
    assert len(lines) == len(records)
    assert sorted(x["record"] for x in lines) == list(range(len(records)))
    weights = [x["weight"] for x in lines]
    assert weights == sorted(weights)  # lowest first
    assert min(weights) < 1.0 < max(weights)  # 4 upper steps x 16 records moved some rows each way
    for x in lines[:5]:
        r = records[x["record"]]
        assert (x["id"], x["sid"], x["domain"]) == (r["id"], r["sid"], r["dataset"])
        assert x["file"].endswith("train.json")
    # The loss-ranking baseline: every record an upper step visited has its last measured loss.
    assert sum(x["loss"] is not None for x in lines) >= 16 and all(x["loss"] is None or x["loss"] >= 0 for x in lines)
    # ... and the |MC - prediction| baseline: the PRM's sigmoid(z) at the same visit, beside the record's
    # MC accuracy. Under the scalar head's squared error the loss is (prediction - mc)^2, up to the
    # two forwards' O(ε²) spread, the report's rounding and the float16 prediction.
    for x in lines:
        assert x["mc"] == records[x["record"]]["accuracy"]
        assert (x["prediction"] is None) == (x["loss"] is None)
        if x["prediction"] is not None:
            assert 0.0 <= x["prediction"] <= 1.0  # float16 rounds sigmoid(z) ≥ 0.99976 to 1
            assert x["loss"] == pytest.approx((x["prediction"] - x["mc"]) ** 2, abs=2e-3), x
    assert len({x["prediction"] for x in lines if x["prediction"] is not None}) > 4  # measured, not a constant
    # Resumed mid-run (after the 2nd upper step): the same table and the same PRM, bit for bit.
    assert (resumed / "instance_weights.jsonl").read_text() == (straight / "instance_weights.jsonl").read_text()
    a, b = exported_tensors(straight / "export"), exported_tensors(resumed / "export")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(straight / "checkpoints" / "step_00000008" / "trainer_state.pt", weights_only=True)
    saved = state["instance_weights"]
    assert (saved["logits"].numel() if weighting == "instance" else saved["records"]) == len(records)
    # TensorBoard: one histogram of the weights per domain.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(straight / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    domains = {r["dataset"] for r in records}
    assert {f"instance_weight/{d}" for d in domains} <= set(events.Tags()["histograms"])
    # Domain weights stay uniform under --weighting instance.
    assert set(read_json(straight / "domain_weights.json")["weights"].values()) == {1.0}


PROBE = REPO / "tests" / "trainer_probe.py"


@pytest.fixture(scope="module", params=["both", "both_net"])
def instance_probe(request, tiny_model, tmp_path_factory):
    """tests/trainer_probe.py on 2 ZeRO-3 ranks with the table (`both`) or the net (`both_net`)."""
    out = tmp_path_factory.mktemp(f"probe_{request.param}")
    flags = small_run_args(tiny_model, out / "run", "--weighting", request.param, "--hypergrad", "fd",
                           "--fd_radius", "1e-3", "--batch_size", "4", "--meta_batch_size", "2",
                           "--gradient_accumulation", "2", "--unroll_steps", "2", "--meta_warmup_steps", "2",
                           "--instance_net_lr", "0.2", "--iteration_num", "50", "--max_bad_steps", "2",
                           # The runtime guard off: the test compares the ranks' states itself.
                           "--weight_check_every", "1000")
    cmd = launch_command(PROBE, [str(out), "warmup,lower_instance,instance_upper,bad_upper", *flags], 2)
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return {"weighting": request.param, "ranks": [read_json(out / f"rank_{r}.json") for r in range(2)],
            "saved": [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(2)]}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_lower_step_weights_each_record_by_the_instance_weights_on_two_ranks(instance_probe):
    for rank in instance_probe["ranks"]:
        check = rank["lower_instance"]
        used = check["instance_weights_used"]
        assert max(used) - min(used) > 0.05, used  # the probe's instance weights are not uniform
        assert check["domain_only_vs_expected"] > 0.02, check  # ... and change the gradient
        assert check["rel_error"] < 1e-4, check


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_instance_state_is_identical_on_both_ranks_after_upper_steps(instance_probe):
    first, second = instance_probe["saved"]
    for rank in instance_probe["ranks"]:
        assert rank["instance_upper"]["records_moved"] > 0  # the upper steps changed the weights
    assert torch.equal(first["instance_weights"], second["instance_weights"])
    a, b = first["instance_state"], second["instance_state"]
    if instance_probe["weighting"] == "both":
        assert torch.equal(a["logits"], b["logits"]) and float(a["softplus_sum"]) == float(b["softplus_sum"])
        losses, predictions = (a["loss"], b["loss"]), (a["prediction"], b["prediction"])
    else:
        assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
        losses = (a["cache"]["loss"], b["cache"]["loss"])
        predictions = (a["cache"]["prediction"], b["cache"]["prediction"])
    torch.testing.assert_close(*losses, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(*predictions, rtol=0, atol=0, equal_nan=True)
    # The rows the two upper steps visited (every rank's) hold a measured loss on both ranks.
    visited = {r for rank in instance_probe["ranks"] for r in rank["instance_upper"]["records"]}
    assert all(not math.isnan(float(losses[0][r])) for r in visited)
    assert all(not math.isnan(float(predictions[0][r])) for r in visited)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_meta_warmup_steps_delays_the_first_upper_step(instance_probe):
    # --unroll_steps 2 --meta_warmup_steps 2: the segment ending at step 2 is vanilla, the next has its upper step.
    for rank in instance_probe["ranks"]:
        assert rank["warmup"]["step_and_upper_steps"] == [[2, 0], [4, 1], [6, 2]]


def test_the_clipped_recipe_holds_unnormalised_weights_within_minus_one_and_three():
    table = InstanceWeights(6, lr=1.5, recipe="clipped")
    assert torch.equal(table.all_weights(), torch.ones(6))
    for _ in range(4):  # rows 0-3 harmful (∂L/∂u > 0), rows 4-5 helpful
        table.update(torch.arange(6), torch.tensor([1.0, 1.0, 0.5, 1.0, -1.0, -1.0], dtype=torch.float64),
                     torch.zeros(6, dtype=torch.float64))
    weights = table.all_weights()
    assert float(weights.min()) == -1.0 and float(weights.max()) == 3.0  # clipped both ways
    assert float(weights.mean()) != pytest.approx(1.0)  # not renormalised
    assert torch.equal(table.weights(torch.tensor([5, 0])), weights[torch.tensor([5, 0])])
    assert "--instance_recipe" in InstanceWeights(6, lr=1.0).incompatibility(table.state_dict())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_nan_meta_loss_skips_the_instance_update_on_every_rank(instance_probe):
    # NaN in rank 0's meta loss: ε is not finite, every record's d_i is NaN; nothing is applied and
    # --max_bad_steps 2 such upper steps in a row stop the run.
    for rank in instance_probe["ranks"]:
        bad = rank["bad_upper"]
        assert bad["raised"] and "2 non-finite upper-level updates in a row" in bad["raised"], bad
        assert bad["instance_unchanged"] and bad["logits_unchanged"], bad
