"""The trainer's own lower and upper steps on 2 real ZeRO-3 ranks, checked against values computed
independently (tests/trainer_probe.py drives `Trainer.lower_step` and `Trainer.run_upper_step`;
benchmarks/fp64_reference.py is the float64 reference, no loss or Jacobian code shared).

Two probe jobs, 2 ranks each under torchrun:

* fp32, ``--hypergrad fd --fd_radius 1e-3`` with the non-default options a user may pick:
  ``--head hidden``, ``--gradient_accumulation 2``, ``--aggregation min``, and ZeRO-3 with
  parameters and optimiser states offloaded to the CPU (ds_configs/zero3_offload.json with torch's
  AdamW in place of DeepSpeed's CPU Adam, which JIT-compiles for ~45 s);
* bf16, ``--hypergrad fd_bf16_naive`` with the defaults otherwise (logits head, ZeRO-3, mean_logit);
* bf16 with every default: what GPU users run (``exact``, ``pairwise``, packed meta chains, the
  upper level's passes in fp32 arithmetic).
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import REPO, base_env, launch_command, read_json, small_run_args
from benchmarks import fp64_reference
from benchmarks.fp64_reference import Float64Reference

PROBE = REPO / "tests" / "trainer_probe.py"

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
COMMON = ["--batch_size", "4", "--meta_batch_size", "2", "--weight_check_every", "1", "--iteration_num", "50"]
FP32 = ["--hypergrad", "fd", "--fd_radius", "1e-3", "--head", "hidden", "--gradient_accumulation", "2",
        "--aggregation", "min", "--max_bad_steps", "2"]
BF16 = ["--precision", "bf16", "--hypergrad", "fd_bf16_naive", "--fd_radius", "1e-3"]


def offload_config(folder) -> str:
    config = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the offloaded states
    path = folder / "zero3_offload_torch_adam.json"
    path.write_text(json.dumps(config))
    return str(path)


def probe(tiny_model, out, probes: str, *flags: str) -> dict:
    args = [str(out), probes, *small_run_args(tiny_model, out / "run", *COMMON, *flags)]
    proc = subprocess.run(launch_command(PROBE, args, 2), cwd=REPO, env=base_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    ranks = [read_json(out / f"rank_{r}.json") for r in range(2)]
    batches = [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(2)]
    return {"ranks": ranks, "config": read_json(out / "run" / "config.json"), "out": out,
            "train": [b for saved in batches for b in saved["train_batches"]],
            "meta": [b for saved in batches for b in saved["meta_batches"]]}


def reference(tiny_model, run: dict, head: str, aggregation: str, objective: str = "pairwise") -> dict:
    """d and the hypergradient at the probe's parameters (the initial ones), on every rank's batches."""
    ref = Float64Reference(str(tiny_model), head, seed=1)
    k = len(run["ranks"][0]["domains"])
    d = ref.directional(ref.domain_gradients(run["train"], k), ref.meta_gradient(run["meta"], aggregation, objective))
    logits = torch.tensor(run["ranks"][0]["upper"]["logits_before"], dtype=torch.float64)
    return {"directional": d, "hypergradient": fp64_reference.hypergradient(d, logits)}


@pytest.fixture(scope="module")
def fp32_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_fp32")
    return probe(tiny_model, out, "upper,lower,checksum,bad_upper", *FP32, "--deepspeed", offload_config(out))


@pytest.fixture(scope="module")
def bf16_run(tiny_model, tmp_path_factory):
    return probe(tiny_model, tmp_path_factory.mktemp("probe_bf16"), "upper", *BF16)


@pytest.fixture(scope="module")
def bf16_default_run(tiny_model, tmp_path_factory):
    return probe(tiny_model, tmp_path_factory.mktemp("probe_bf16_default"), "upper", "--precision", "bf16")


def rel_error(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.as_tensor(a, dtype=torch.float64),
                                                       torch.as_tensor(b, dtype=torch.float64), dim=0))


def test_the_probe_ran_the_options_it_names(fp32_run, bf16_run):
    resolved = fp32_run["config"]["deepspeed_resolved"]
    assert resolved["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert resolved["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert resolved["gradient_accumulation_steps"] == 2 and fp32_run["config"]["world_size"] == 2
    assert fp32_run["config"]["model"]["head"] == "hidden"
    assert fp32_run["config"]["bilevel"]["aggregation"] == "min"
    assert bf16_run["config"]["deepspeed_resolved"]["bf16"]["enabled"] is True


def test_domain_weights_reach_the_lower_level_gradient_as_the_weighted_loss_says(fp32_run):
    """Weights (0, 1.5, 0.5, 2): the gradient the engine steps with is sum_k w_k ∂(S_k/n)/∂θ averaged
    over the 2 micro-batches, each ∂(S_k/n)/∂θ from a backward pass of its own; domain 0, weight 0,
    contributes nothing (its gradient alone is as large as the whole, so a leak would show)."""
    for rank in fp32_run["ranks"]:
        lower = rank["lower"]
        assert lower["micro_batches"] == 2 and lower["step_calls"] == 2
        assert lower["rel_error"] < 1e-5, lower  # fp32 sums in another order: measured 3e-7
        # What the check can tell apart: equal weights, or domain 0 let in, would be this far off.
        assert lower["uniform_vs_expected"] > 0.1 and lower["domain0_share"] > 0.1, lower


def test_the_trainers_fd_upper_step_matches_the_fp64_reference(tiny_model, fp32_run):
    """2 ranks x 2 micro-batches: d is the central difference of the summed domain losses over the
    global count (world size x both micro-batches), against ⟨∂(S_k/N)/∂θ, v⟩ in float64."""
    ref = reference(tiny_model, fp32_run, "hidden", "min")
    for rank in fp32_run["ranks"]:
        upper = rank["upper"]
        assert upper["applied"] and upper["local_counts"] == [4, 4]
        # docs/hypergradient.md: fp32, hidden head, fd at r = 1e-3: relative error 0.0002 (measured here 6e-5).
        assert rel_error(upper["directional"], ref["directional"]) < 2e-4, (upper["directional"], ref)
        assert cosine(upper["hypergradient"], ref["hypergradient"]) > 1 - 1e-6
        assert rel_error(upper["hypergradient"], ref["hypergradient"]) < 2e-4


def test_the_default_bf16_upper_step_matches_the_fp64_reference(tiny_model, bf16_default_run):
    """The defaults on 2 bf16 ZeRO-3 ranks: d within 5% of the float64 reference and every sign of the
    hypergradient right (bf16 arithmetic in the upper passes was off by up to 63%, signs wrong)."""
    config = bf16_default_run["config"]
    assert config["optim"]["precision"] == "bf16" and config["data"]["packing"] == "chain"
    bilevel = config["bilevel"]
    assert (bilevel["hypergrad"], bilevel["meta_loss"], bilevel["upper_precision"]) == ("exact", "pairwise", "fp32")
    ref = reference(tiny_model, bf16_default_run, "logits", "mean_logit", "pairwise")
    for rank in bf16_default_run["ranks"]:
        upper = rank["upper"]
        assert upper["applied"] and upper["epsilon"] is None
        # docs/hypergradient.md's bf16 table: measured here 0.2-0.4% (bf16 arithmetic: 39-63%).
        assert rel_error(upper["directional"], ref["directional"]) < 0.05, (upper["directional"], ref)
        signs = torch.sign(torch.tensor(upper["hypergradient"], dtype=torch.float64))
        assert torch.equal(signs, torch.sign(ref["hypergradient"])), (upper["hypergradient"], ref)
        assert cosine(upper["hypergradient"], ref["hypergradient"]) > 0.999


def test_fd_restores_the_parameters_bit_exactly(fp32_run, bf16_run):
    for run in (fp32_run, bf16_run):
        for rank in run["ranks"]:
            upper = rank["upper"]
            assert upper["epsilon"] and upper["epsilon"] > 0
            # ε = r / ‖v‖: the perturbation has length --fd_radius (1e-3) whatever ‖v‖ is.
            assert upper["epsilon"] * upper["v_norm"] == pytest.approx(1e-3, rel=1e-9), upper
            # every ZeRO-3 partition and fp32 master partition, and the scores of the next forward
            assert upper["parameter_tensors_compared"] > 10
            assert upper["parameters_restored_bit_exactly"], run["out"]
            assert upper["scores_equal_after"], run["out"]


def test_the_naive_bf16_finite_difference_is_off_as_the_docs_say(tiny_model, bf16_run):
    # README: "the naive bf16 finite difference is off by 11-103% depending on the radius"; at
    # r = 1e-3 the docs' table has 0.557 (measured here: 0.38). Its d is all-reduced: both ranks agree.
    ref = reference(tiny_model, bf16_run, "logits", "mean_logit")
    a, b = (rank["upper"] for rank in bf16_run["ranks"])
    assert a["directional"] == b["directional"]
    assert 0.11 < rel_error(a["directional"], ref["directional"]) < 1.03, (a["directional"], ref)
    assert cosine(a["hypergradient"], ref["hypergradient"]) > 0.9  # the sign pattern survives


def test_one_ranks_altered_domain_weights_stop_the_run_on_every_rank(fp32_run):
    for rank in fp32_run["ranks"]:
        message = rank["checksum"]["raised"]
        assert message and "domain weights differ across ranks at step" in message, rank["checksum"]
        assert "replicated state is corrupt" in message


def test_max_bad_steps_stops_at_the_upper_level(fp32_run):
    """--max_bad_steps 2, a NaN in rank 0's meta loss at two upper steps in a row: both skipped on
    every rank, then TrainingAborted with a checkpoint of the last good state."""
    for rank in fp32_run["ranks"]:
        bad = rank["bad_upper"]
        assert bad["calls"] == 2 and bad["skipped_upper"] == 2 and bad["logits_unchanged"], bad
        assert bad["raised"] and bad["raised"].startswith(
            "2 non-finite upper-level updates in a row at step 1 (--max_bad_steps 2)"), bad
        folder = bad["raised"].rsplit(" ", 1)[1]
        assert (fp32_run["out"] / "run" / "checkpoints" / folder.rsplit("/", 1)[1] / "manifest.json").is_file()
