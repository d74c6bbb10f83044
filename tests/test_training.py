"""Lower-level training on real DeepSpeed ZeRO-3 (CPU, gloo): learning, 1 rank = 2 ranks on the same
global batches, exact resume, export that reloads without DeepSpeed, TensorBoard scalars."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import (DEMO, PYTHON, REPO, base_env, exported_tensors, load_export, read_json, read_scalars,
                      run_train, small_run_args)
from dreamprm.model.prm import model_inputs
from dreamprm.data.datasets import PRMCollator, TrainDataset
from dreamprm.data.records import load_train_records

SHORT = ["--iteration_num", "8", "--unroll_steps", "2", "--hypergrad", "exact"]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def one_rank(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    run_train(small_run_args(tiny_model, out, *SHORT, "--batch_size", "4", "--meta_batch_size", "2"))
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    run_train(small_run_args(tiny_model, out, *SHORT, "--batch_size", "2", "--meta_batch_size", "1"), nproc=2)
    return out


@pytest.mark.multiprocess
def test_two_ranks_match_one_rank_on_the_same_global_batches(one_rank, two_ranks):
    assert read_json(one_rank / "config.json")["world_size"] == 1
    assert read_json(two_ranks / "config.json")["world_size"] == 2
    a, b = exported_tensors(one_rank / "export"), exported_tensors(two_ranks / "export")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    # Same data, same steps; only the order of floating-point reductions differs.
    assert worst < 2e-5, worst
    wa, wb = read_json(one_rank / "domain_weights.json"), read_json(two_ranks / "domain_weights.json")
    for name in wa["weights"]:
        assert wa["weights"][name] == pytest.approx(wb["weights"][name], abs=1e-6)
    la = [v for _, v in read_scalars(one_rank / "tb")["train/loss"]]
    lb = [v for _, v in read_scalars(two_ranks / "tb")["train/loss"]]
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.multiprocess
def test_tensorboard_has_the_lower_and_upper_level_scalars(two_ranks):
    scalars = read_scalars(two_ranks / "tb")
    expected = {"train/loss", "train/weighted_loss", "train/lr", "perf/samples_per_s", "perf/tokens_per_s",
                "meta/loss", "meta/v_norm", "hypergrad/norm"}
    domains = read_json(two_ranks / "domains.json")
    for name in domains:
        expected |= {f"domain_loss/{name}", f"domain_weight/{name}", f"hypergrad/{name}"}
    assert expected <= set(scalars), expected - set(scalars)
    assert len(scalars["domain_weight/clean"]) == 4  # one upper step per 2-step segment
    assert all(v > 0 for _, v in scalars["perf/tokens_per_s"])
    assert scalars["train/lr"][0][1] == pytest.approx(1e-3)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tiny_model, one_rank, tmp_path):
    flags = small_run_args(tiny_model, tmp_path, "--unroll_steps", "2", "--hypergrad", "exact",
                           "--batch_size", "4", "--meta_batch_size", "2")
    run_train(flags + ["--iteration_num", "4"])
    assert (tmp_path / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    resumed = run_train(flags + ["--iteration_num", "8", "--resume", "auto"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = exported_tensors(one_rank / "export"), exported_tensors(tmp_path / "export")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_json(one_rank / "domain_weights.json") == read_json(tmp_path / "domain_weights.json")


def test_a_branched_run_uses_its_own_learning_rates_not_the_checkpoints(tiny_model, one_rank, tmp_path):
    # Loading optimiser state restores its lr too; a run branched from another run's checkpoint
    # (e.g. DreamPRM after a vanilla warm-up) must train with the flags it was given.
    checkpoint = one_rank / "checkpoints" / "step_00000008"
    # The model directory spelled relative to the working directory (the checkpoint has it absolute).
    relative_model = os.path.relpath(tiny_model, REPO)
    flags = small_run_args(relative_model, tmp_path, "--unroll_steps", "2", "--hypergrad", "exact", "--batch_size", "4",
                           "--meta_batch_size", "2", "--iteration_num", "10", "--resume", str(checkpoint),
                           "--save_every_iterations", "2", "--no-export")
    flags[flags.index("--lr") + 1], flags[flags.index("--meta_lr") + 1] = "2e-3", "0.2"
    out = run_train(flags).stdout
    assert "resume: --lr 0.002 replaces the checkpoint's 0.001" in out
    assert "resume: --meta_lr 0.2 replaces the checkpoint's 0.05" in out
    assert [v for _, v in read_scalars(tmp_path / "tb")["train/lr"]] == pytest.approx([2e-3])
    saved = torch.load(tmp_path / "checkpoints" / "step_00000010" / "trainer_state.pt", weights_only=True)
    assert [g["lr"] for g in saved["meta_optimizer"]["param_groups"]] == [0.2]
    # Same flags as the checkpoint: nothing to replace, nothing printed.
    same = small_run_args(tiny_model, tmp_path / "same", "--unroll_steps", "2", "--hypergrad", "exact",
                          "--batch_size", "4", "--meta_batch_size", "2", "--iteration_num", "10", "--resume",
                          str(checkpoint), "--no-export")
    assert "replaces the checkpoint's" not in run_train(same).stdout


def test_a_branched_run_may_choose_another_domain_logit_optimiser(tiny_model, one_rank, tmp_path):
    # The checkpoint holds the default (gated) optimiser's state, which does not fit AdamW: the
    # branch starts AdamW fresh, keeps the domain weights, and says so.
    checkpoint = one_rank / "checkpoints" / "step_00000008"
    flags = small_run_args(tiny_model, tmp_path, "--unroll_steps", "2", "--hypergrad", "exact", "--batch_size", "4",
                           "--meta_batch_size", "2", "--iteration_num", "10", "--resume", str(checkpoint),
                           "--meta_optimizer", "adamw", "--save_every_iterations", "2", "--no-export")
    out = run_train(flags).stdout
    assert "resume: --meta_optimizer adamw starts with a fresh state (the checkpoint's domain-logit optimiser " \
           "was gated); the domain weights are kept" in out
    saved = torch.load(tmp_path / "checkpoints" / "step_00000010" / "trainer_state.pt", weights_only=True)
    assert saved["meta_optimizer_kind"] == "adamw" and "betas" in saved["meta_optimizer"]["param_groups"][0]


def test_export_reloads_without_deepspeed_and_scores_like_the_engine(tiny_model, one_rank, tmp_path):
    checkpoint = one_rank / "checkpoints" / "step_00000008"
    flags = small_run_args(tiny_model, one_rank, *SHORT, "--batch_size", "4", "--meta_batch_size", "2",
                           "--resume", str(checkpoint), "--no-export")
    out = tmp_path / "engine.json"
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "engine_scores.py"), str(out), *flags], cwd=REPO,
                          env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    engine = json.loads(out.read_text())
    assert engine["step"] == 8
    model, processor, meta = load_export(one_rank / "export")
    assert meta["domains"] == read_json(one_rank / "domains.json") and meta["head"] == "logits"
    records = load_train_records(DEMO / "train.json")[:6]
    batch = PRMCollator(processor)([TrainDataset(records, meta["domains"])[i] for i in range(len(records))])
    with torch.no_grad():
        logits = model(**model_inputs(batch))
    torch.testing.assert_close(logits, torch.tensor(engine["logits"]), rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_two_ranks_learn_a_learnable_domain(tiny_model, tmp_path):
    records = [r for r in read_json(DEMO / "train.json") if r["dataset"] == "clean"]
    train = tmp_path / "clean.json"
    train.write_text(json.dumps(records))
    run_train(small_run_args(tiny_model, tmp_path / "run", "--train_json_file", str(train), "--image_root", str(DEMO),
                             "--baseline", "--batch_size", "4", "--lr", "1e-3", "--iteration_num", "200", "--log_every", "20"),
              nproc=2)
    losses = [v for _, v in read_scalars(tmp_path / "run" / "tb")["domain_loss/clean"]]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.6 * first, losses  # the hedging cue is learnt: ~0.2 -> <0.1 here
