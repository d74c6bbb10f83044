"""Lower-level training on real DeepSpeed ZeRO-3 (CPU, gloo): learning, 1 rank = 2 ranks on the same
global batches, exact resume, export that reloads without DeepSpeed, TensorBoard scalars."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import (DEMO, PYTHON, REPO, base_env, exported_tensors, load_export, read_json, read_scalars,
                      run_train, run_trains, small_run_args)
from dreamprm.model.prm import model_inputs
from dreamprm.data.datasets import PRMCollator, TrainDataset
from dreamprm.data.records import load_train_records

# SGD on the domain logits: every upper step moves the weights by its hypergradient, so a wrong
# hypergradient on 2 ranks shows in the weights and the model (the gated optimiser stays shut for the
# first upper steps of so short a run, and uniform weights would hide it). A global meta batch of 4:
# with 2 chains the demo's batches hold one label only, the pairwise loss is 0 and so is every
# hypergradient.
UPPER = ["--unroll_steps", "2", "--hypergrad", "exact", "--meta_optimizer", "sgd", "--meta_lr", "50"]
SHORT = ["--iteration_num", "8", *UPPER]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def both_runs(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """The same 8 steps on 1 rank and on 2 ranks (same global batches), started together."""
    one, two = tmp_path_factory.mktemp("one_rank"), tmp_path_factory.mktemp("two_ranks")
    run_trains([{"args": small_run_args(tiny_model, one, *SHORT, "--batch_size", "4", "--meta_batch_size", "4")},
                {"args": small_run_args(tiny_model, two, *SHORT, "--batch_size", "2", "--meta_batch_size", "2"),
                 "nproc": 2}])
    return one, two


@pytest.fixture(scope="module")
def one_rank(both_runs):
    return both_runs[0]


@pytest.fixture(scope="module")
def two_ranks(both_runs):
    return both_runs[1]


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
        # The weights move by ~3% in 4 upper steps (meta_lr 50); rounding differences of the
        # reductions reach them amplified (measured 1e-6 relative).
        assert wa["weights"][name] == pytest.approx(wb["weights"][name], rel=1e-5)
    # The weights did move, so the comparison above could see a wrong hypergradient.
    assert max(abs(w - 1.0) for w in wa["weights"].values()) > 1e-3, wa
    sa, sb = read_scalars(one_rank / "tb"), read_scalars(two_ranks / "tb")
    la = [v for _, v in sa["train/loss"]]
    lb = [v for _, v in sb["train/loss"]]
    assert la == pytest.approx(lb, rel=1e-4)
    # Every upper step's hypergradient, per domain and its norm (an all-reduce that divided by the
    # world size, or counted one rank's samples only, would halve or double these).
    names = sorted(k for k in sa if k.startswith("hypergrad/") and k != "hypergrad/epsilon")
    assert len(names) == len(wa["weights"]) + 1 and names == sorted(k for k in sb if k.startswith("hypergrad/")
                                                                     and k != "hypergrad/epsilon")
    for name in names:
        ha, hb = [v for _, v in sa[name]], [v for _, v in sb[name]]
        assert len(ha) == 4 and any(abs(v) > 0 for v in ha), (name, ha)
        assert ha == pytest.approx(hb, rel=1e-3, abs=1e-8), (name, ha, hb)


@pytest.mark.multiprocess
def test_tensorboard_has_the_lower_and_upper_level_scalars(two_ranks):
    scalars = read_scalars(two_ranks / "tb")
    expected = {"train/loss", "train/weighted_loss", "train/lr", "perf/samples_per_s", "perf/tokens_per_s",
                "meta/loss", "meta/v_norm", "meta/pair_accuracy", "hypergrad/norm"}
    domains = read_json(two_ranks / "domains.json")
    for name in domains:
        expected |= {f"domain_loss/{name}", f"domain_weight/{name}", f"hypergrad/{name}"}
    assert expected <= set(scalars), expected - set(scalars)
    assert len(scalars["domain_weight/clean"]) == 4  # one upper step per 2-step segment
    assert all(v > 0 for _, v in scalars["perf/tokens_per_s"])
    assert scalars["train/lr"][0][1] == pytest.approx(1e-3)
    assert all(0.0 <= v <= 1.0 for _, v in scalars["meta/pair_accuracy"])


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tiny_model, one_rank, tmp_path):
    flags = small_run_args(tiny_model, tmp_path, *UPPER, "--batch_size", "4", "--meta_batch_size", "4")
    run_train(flags + ["--iteration_num", "4"])
    assert (tmp_path / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    resumed = run_train(flags + ["--iteration_num", "8", "--resume", "auto"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = exported_tensors(one_rank / "export"), exported_tensors(tmp_path / "export")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_json(one_rank / "domain_weights.json") == read_json(tmp_path / "domain_weights.json")


@pytest.fixture(scope="module")
def branches(tiny_model, one_rank, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Three runs branched from one_rank's final checkpoint (step 8) to step 10, 2 at a time:
    `lr` with other learning rates and the model directory spelled relative to the working directory
    (the checkpoint has it absolute), `same` with the checkpoint's flags, `adamw` with another
    domain-logit optimiser. (folder, stdout) each."""
    checkpoint = one_rank / "checkpoints" / "step_00000008"
    common = [*UPPER, "--batch_size", "4", "--meta_batch_size", "4",
              "--iteration_num", "10", "--resume", str(checkpoint), "--no-export"]
    folders = {name: tmp_path_factory.mktemp(f"branch_{name}") for name in ("lr", "same", "adamw")}

    def with_meta_lr(args: list[str], value: str) -> list[str]:
        args = [a for i, a in enumerate(args) if a != "--meta_lr" and (i == 0 or args[i - 1] != "--meta_lr")]
        return args + ["--meta_lr", value]
    lr = small_run_args(os.path.relpath(tiny_model, REPO), folders["lr"], *common, "--save_every_iterations", "2")
    lr[lr.index("--lr") + 1] = "2e-3"
    flags = {"lr": with_meta_lr(lr, "0.2"), "same": small_run_args(tiny_model, folders["same"], *common),
             "adamw": small_run_args(tiny_model, folders["adamw"], *common, "--meta_optimizer", "adamw",
                                     "--save_every_iterations", "2")}
    procs = run_trains([{"args": flags[name]} for name in folders])
    return {name: (folders[name], proc.stdout) for name, proc in zip(folders, procs)}


def test_a_branched_run_uses_its_own_learning_rates_not_the_checkpoints(branches):
    # Loading optimiser state restores its lr too; a run branched from another run's checkpoint
    # (e.g. DreamPRM after a vanilla warm-up) must train with the flags it was given.
    folder, out = branches["lr"]
    assert "resume: --lr 0.002 replaces the checkpoint's 0.001" in out
    assert "resume: --meta_lr 0.2 replaces the checkpoint's 50" in out
    assert [v for _, v in read_scalars(folder / "tb")["train/lr"]] == pytest.approx([2e-3])
    saved = torch.load(folder / "checkpoints" / "step_00000010" / "trainer_state.pt", weights_only=True)
    assert [g["lr"] for g in saved["meta_optimizer"]["param_groups"]] == [0.2]
    # Same flags as the checkpoint: nothing to replace, nothing printed.
    assert "replaces the checkpoint's" not in branches["same"][1]


def test_a_branched_run_may_choose_another_domain_logit_optimiser(branches):
    # The checkpoint holds SGD's state (UPPER), which does not fit AdamW: the branch starts AdamW
    # fresh, keeps the domain weights, and says so.
    folder, out = branches["adamw"]
    assert "resume: --meta_optimizer adamw starts with a fresh state (the checkpoint's domain-logit optimiser " \
           "was sgd); the domain weights are kept" in out
    saved = torch.load(folder / "checkpoints" / "step_00000010" / "trainer_state.pt", weights_only=True)
    assert saved["meta_optimizer_kind"] == "adamw" and "betas" in saved["meta_optimizer"]["param_groups"][0]


def test_export_reloads_without_deepspeed_and_scores_like_the_engine(tiny_model, one_rank, tmp_path):
    checkpoint = one_rank / "checkpoints" / "step_00000008"
    flags = small_run_args(tiny_model, one_rank, *SHORT, "--batch_size", "4", "--meta_batch_size", "4",
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
