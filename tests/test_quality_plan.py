"""The quality benchmark's plan and task files, without training: where it writes, what each arm
runs, and the grouped meta set (benchmarks/quality/run.py, make_task.py)."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
import make_task  # noqa: E402
import run as quality  # noqa: E402

from dreamprm.data.datasets import MetaDataset  # noqa: E402
from dreamprm.data.records import load_meta_records  # noqa: E402


def flag(command: list[str], name: str) -> str:
    return command[len(command) - 1 - command[::-1].index(name) + 1]  # the last occurrence wins in argparse


def test_defaults_write_a_new_folder_and_never_the_committed_report(tmp_path, capsys):
    args = quality.parse_args([])
    out = Path(args.out)
    assert out.parent == REPO / "runs" / "quality" and out.name[:2] == "20"
    assert Path(args.results) == out / "RESULTS.md" and Path(args.json) == out / "results.json"
    for flag_name, committed in (("--results", "RESULTS.md"), ("--json", "results.json")):
        with pytest.raises(SystemExit) as stop:
            quality.parse_args(["--out", str(tmp_path / "x"), flag_name, str(REPO / "benchmarks" / "quality" / committed)])
        assert stop.value.code == 2
        assert "--overwrite_committed" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()  # nothing written
    allowed = quality.parse_args(["--results", str(REPO / "benchmarks" / "quality" / "RESULTS.md"),
                                  "--overwrite_committed"])
    assert allowed.results.endswith("RESULTS.md")


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit) as stop:
        quality.parse_args(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: ['vanilla', 'pairwise', 'grouped', 'clean'])", "(default: [0, 1, 2])",
                  "(default: 300)", "(default: 150)", "(default: 1)", "(default: RESULTS.md in --out)"):
        assert shown in text, shown
    assert "default: None" not in text and text.count("(default:") >= 25


def test_plan_runs_each_arm_with_its_meta_file_precision_and_warm_up(tmp_path):
    args = quality.parse_args(["--out", str(tmp_path), "--tasks", "noise", "--seeds", "3", "4", "--arms", "vanilla",
                               "pairwise", "grouped", "clean", "vanilla_bf16", "pairwise_bf16"])
    jobs = {job.name: job for job in quality.plan(args, tmp_path)}
    train_jobs = {name: job for name, job in jobs.items() if not name.startswith("select")}
    assert set(train_jobs) == {f"{a}-noise-s{s}" for a in ("warmup", "warmup_bf16", "vanilla", "pairwise", "grouped",
                                                           "vanilla_bf16", "pairwise_bf16") for s in (3, 4)} | {
        "clean-noise-s3"}  # the clean-only check: the first --clean_seeds (1) seed only
    for name, job in train_jobs.items():
        arm = name.split("-")[0]
        precision = "bf16" if "bf16" in arm else "fp32"
        assert flag(job.command, "--precision") == precision, name
        meta = Path(flag(job.command, "--meta_json_file")).name
        assert meta == ("meta_grouped.json" if arm == "grouped" else "meta.json"), name
        if arm in ("pairwise", "grouped", "pairwise_bf16"):
            assert flag(job.command, "--meta_loss") == "pairwise"
            assert flag(job.command, "--hypergrad") == ("exact" if precision == "bf16" else "fd"), name
            assert "--baseline" not in job.command
        if arm in ("vanilla", "vanilla_bf16", "pairwise", "grouped", "pairwise_bf16"):
            warm = "warmup_bf16" if precision == "bf16" else "warmup"
            assert job.after == (f"{warm}-{name.split('-', 1)[1]}",), name
            assert f"/{warm}-s" in flag(job.command, "--resume"), name
    assert all(f"select-{name}" in jobs for name in train_jobs if not name.startswith("warmup"))


def test_grouped_meta_set_has_four_balanced_chains_per_question_and_as_many_chains(tmp_path):
    manifest = make_task.make_task(tmp_path, seed=3, chains_per_domain=8, n_meta=24, n_test=4)
    assert manifest["meta_grouped"] == {"chains": 24, "true": 12, "questions": 6}
    records = load_meta_records(tmp_path / "meta_grouped.json")
    assert len(records) == len(load_meta_records(tmp_path / "meta.json")) == 24
    by_question = Counter(r.question_id for r in records)
    assert set(by_question.values()) == {4}
    for q in by_question:
        chains = [r for r in records if r.question_id == q]
        assert sum(r.label for r in chains) == 2 and len({r.image_path for r in chains}) == 1
        assert len({r.prefixes for r in chains}) >= 3  # distinct chains where the policy allows
    assert [len(u) for u in MetaDataset(records).question_units()] == [4] * 6
    with pytest.raises(ValueError, match="multiple of 4"):
        make_task.build_meta_grouped(0, tmp_path, 10)


def test_instance_report_scores_the_record_weights_the_domain_product_and_the_loss_ranking(tmp_path):
    """Per arm: AUC of the record weights, of domain x record weights (what the lower loss used), and of
    the loss ranking of visited records, each against the task's corrupted records."""
    import json
    task, run = tmp_path / "task", tmp_path / "run"
    task.mkdir(), run.mkdir()
    (task / "corrupted.json").write_text(json.dumps([0, 1]))
    rows = [  # record, domain, weight, loss
        (0, "a", 0.5, 0.9), (1, "b", 2.0, None), (2, "a", 1.0, 0.1), (3, "b", 1.5, 0.95), (4, "b", 0.2, 0.2)]
    (run / "instance_weights.jsonl").write_text("".join(
        json.dumps({"record": i, "domain": d, "weight": w, "loss": loss}) + "\n" for i, d, w, loss in rows))
    (run / "domain_weights.json").write_text(json.dumps({"weights": {"a": 1.0, "b": 10.0}}))
    report = quality.instance_report(run, task, ["a", "b"])
    # Weights: clean 1.0, 1.5, 0.2 against corrupted 0.5, 2.0 -> 2 of 6 pairs.
    assert report["auc"] == pytest.approx(2 / 6)
    # Domain x record: clean 1.0, 15, 2 against 0.5, 20 -> 3 of 6.
    assert report["auc_effective"] == pytest.approx(3 / 6)
    # Loss (record 1 never visited): clean -0.1, -0.95, -0.2 against -0.9 -> 2 of 3.
    assert report["auc_loss"] == pytest.approx(2 / 3)
    assert report["auc_by_domain"] == {"a": 1.0, "b": 0.0}
