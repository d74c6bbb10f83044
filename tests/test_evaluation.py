"""Watching a run: Best-of-N evaluation during training (`dreamprm.evaluation`), --keep_best,
--export_from, summary.md.

The fast tests check the parts in process (AUC, the shared scoring loop and its padding, the
metrics against `dreamprm.bestofn`'s report, the flags, retention, the summary). The slow test
trains the tiny model on 2 ZeRO-3 ranks with evaluation, --keep_best and all three trackers, then
checks the live engine's numbers against Best-of-N on the exported PRM, the kept checkpoints,
what each tracker holds, summary.md, and that a resumed run keeps the record of the best.
"""
from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEMO, base_env, read_json, read_scalars, run_train, small_run_args
from dreamprm.bestofn.candidates import load_candidates
from dreamprm.bestofn.config import BestOfNConfig
from dreamprm.bestofn.evaluation import evaluate
from dreamprm.bestofn.run import run as run_bestofn
from dreamprm.bestofn.scorer import ModelScorer, score_chains
from dreamprm.bestofn.selection import select
from dreamprm.checkpoint import retention_plan
from dreamprm.config import ConfigError, parse_args
from dreamprm.data.packing import make_collator
from dreamprm.data.records import DataValidationError
from dreamprm.evaluation import Evaluator, auc, load_eval_questions, metric_names, within_share
from dreamprm.summary import RunSummary, write_run_summary

CANDIDATES = DEMO / "candidates.json"


# ---------------------------------------------------------------- AUC
def brute_force_auc(scores, labels):
    pairs = [(r, w) for r, yr in zip(scores, labels) if yr for w, yw in zip(scores, labels) if not yw]
    return sum(1.0 if r > w else 0.5 if r == w else 0.0 for r, w in pairs) / len(pairs)


def test_auc_equals_the_pairwise_count_with_ties():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 30)
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, rng.random()]) for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        if 0 < sum(labels) < n:
            assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert auc([0.3, 0.9], [True, True]) is None and auc([0.3], [False]) is None
    assert auc([0.9, 0.1], [True, False]) == 1.0 and auc([0.1, 0.9], [True, False]) == 0.0


# ---------------------------------------------------------------- the shared scoring loop
@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory):
    from dreamprm.model.loading import load_backbone
    from dreamprm.model.prm import ProcessRewardModel
    from dreamprm.model.processor import load_processor
    from dreamprm.model.tiny import build_tiny_qwen2vl
    tiny = build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "tiny")
    torch.manual_seed(0)
    return ProcessRewardModel(load_backbone(tiny), "logits").float().eval(), load_processor(tiny)


def test_padding_forwards_change_nothing_and_are_dropped(tiny_prm):
    model, processor = tiny_prm
    questions = load_candidates(CANDIDATES)[:2]
    scorer = ModelScorer(model, processor, torch.device("cpu"), batch_size=3, max_image_side=512)
    chains = [(q, c) for q in range(2) for c in range(len(questions[q].candidates))]
    calls = []

    def forward(batch):
        calls.append(int(batch["item_index"].max()) + 1)  # chains in this forward
        return model(**scorer._inputs(batch))

    plain = score_chains(forward, scorer.collator, questions, chains, 3, 512)
    assert calls == [3, 3, 2]
    calls.clear()
    padded = score_chains(forward, scorer.collator, questions, chains, 3, 512, min_batches=5)
    assert calls == [3, 3, 2, 3, 3] and padded == plain  # two extra forwards, their logits dropped
    calls.clear()
    assert score_chains(forward, scorer.collator, questions, [], 3, 512, min_batches=2) == []
    assert calls == [1, 1]  # a rank without chains still takes part, with the first chain
    by_question = scorer(questions)  # ModelScorer goes through the same loop
    assert [c for q in by_question for c in q] == plain


def test_evaluator_metrics_are_the_bestofn_report(tiny_prm):
    model, processor = tiny_prm
    questions = load_candidates(CANDIDATES)
    step_logits = ModelScorer(model, processor, torch.device("cpu"), 16, 512)(questions)
    evaluator = Evaluator(questions, make_collator(processor, "chain"), batch_size=16, max_image_side=512,
                          aggregation="mean_logit", rank=0, world_size=1, gather=lambda x: [x])
    values = evaluator.metrics(step_logits)
    selections = select(questions, step_logits, "mean_logit")
    report = evaluate(questions, selections, seed=0, subsamples=8)
    assert list(values) == metric_names(4) == ["best_of_1", "best_of_2", "best_of_4", "auc"]
    assert [values[f"best_of_{row['n']}"] for row in report["by_n"]] == [row["prm"] for row in report["by_n"]]
    scores = [s for sel in selections for s in sel["chain_scores"]]
    labels = [bool(c.correct) for q in questions for c in q.candidates]
    assert values["auc"] == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_ranks_share_the_chains_and_run_as_many_forwards(tiny_prm):
    questions = load_candidates(CANDIDATES)  # 24 questions x 4 chains
    shares = [Evaluator(questions, make_collator(tiny_prm[1], "chain"), batch_size=7, max_image_side=512,
                        aggregation="mean", rank=r, world_size=3, gather=lambda x: [x]) for r in range(3)]
    assert list(itertools.chain.from_iterable(s.mine for s in shares)) == \
        [(q, c) for q in range(24) for c in range(4)]
    assert {s.batches for s in shares} == {5}  # 32 chains a rank, 7 a forward


# ---------------------------------------------------------------- inputs and flags
def test_eval_candidates_need_labels_and_a_metric_they_have(tmp_path):
    records = json.loads(CANDIDATES.read_text())
    for c in records[2]["candidates"]:
        c.pop("correct", None)
    records[2].pop("ground_truth")
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps(records))
    shutil.copytree(DEMO / "images", tmp_path / "images")
    with pytest.raises(DataValidationError, match=r"candidates\.json:record 2: candidates: --eval_candidates needs"):
        load_eval_questions(str(path), None, None)
    assert len(load_eval_questions(str(CANDIDATES), None, "best_of_4")) == 24
    with pytest.raises(ConfigError, match=r"--keep_best best_of_8: .* N = 4 .* best_of_1, best_of_2, best_of_4, auc"):
        load_eval_questions(str(CANDIDATES), None, "best_of_8")


@pytest.mark.parametrize("flags, message", [
    (["--keep_best", "auc"], "--keep_best auc needs --eval_candidates"),
    (["--eval_candidates", "x.json", "--keep_best", "best_of_three"], "--keep_best best_of_three: must be"),
    (["--export_from", "best"], "--export_from best needs --keep_best"),
    (["--report_to", "tensorboard,comet"], "--report_to tensorboard,comet: a comma-separated list"),
    (["--report_to", "wandb,wandb"], "--report_to wandb,wandb"),
    (["--eval_candidates", "x.json", "--eval_every", "0"], "--eval_every: must be >= 1"),
    (["--eval_max_share", "0"], "--eval_max_share: must be in (0, 1]"),
])
def test_bad_watch_flags_exit_2_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_watch_flags_parse():
    w = parse_args(["--eval_candidates", "c.json", "--keep_best", "auc", "--export_from", "best",
                    "--report_to", "tensorboard, wandb,mlflow"]).watch
    assert w.trackers == ["tensorboard", "wandb", "mlflow"] and w.keep_best == "auc"
    assert parse_args(["--report_to", "none"]).watch.trackers == []
    assert parse_args([]).watch.trackers == ["tensorboard"]


def test_evaluation_share_postpones_only_beyond_the_cap():
    assert within_share(0.0, 0.0, 0.1)  # the first evaluation always runs
    assert within_share(10.0, 100.0, 0.1) and not within_share(10.5, 100.0, 0.1)
    assert within_share(99.0, 100.0, 1.0)


def test_retention_spares_the_best_checkpoint(tmp_path):
    folders = []
    for step in (2, 4, 6, 8, 10):
        folder = tmp_path / f"step_{step:08d}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"step": step, "final": False}))
        folders.append(folder)
    assert retention_plan(folders, 2, keep=folders[-1], best=folders[1]) == [folders[0], folders[2]]
    assert retention_plan(folders, 2, keep=folders[-1]) == folders[:3]


def test_summary_names_the_numbers(tmp_path):
    text, path = write_run_summary(tmp_path, RunSummary(
        steps=40, seconds=80.0, samples_per_s=12.5, weights={"clean": 1.4, "inverted": 0.6}, eval_seconds=4.0,
        final_eval=(40, {"best_of_1": 0.5, "best_of_4": 0.625, "auc": 0.71, "seconds": 1.0}),
        best={"metric": "best_of_4", "value": 0.75, "step": 20, "folder": "step_00000020"},
        lowest_records=[{"weight": 0.2, "domain": "inverted", "file": "train.json", "record": 7, "id": "c1", "sid": 2}],
        export=str(tmp_path / "export"), export_step=20))
    assert path.read_text() == text
    for needle in ("steps: 40", "time: 80.0 s", "samples/s: 12.50", "evaluation time: 4.0 s (5.0% of the run)",
                   "| best_of_4 | 0.6250 | 0.7500 (step 20) |", "| auc | 0.7100 | |",
                   "checkpoints/step_00000020", "| clean | 1.4000 |", "![domain weights](domain_weights.png)",
                   "| 0.2000 | inverted | train.json:record 7 | c1 | 2 |", f"{tmp_path / 'export'} (the PRM of step 20)"):
        assert needle in text, needle
    assert text.index("| clean |") < text.index("| inverted |")  # high to low
    assert "Meta objective" not in text  # a vanilla run (--baseline) has none


def test_summary_shows_the_meta_objective_at_both_ends_of_the_run(tmp_path):
    from dreamprm.summary import META_WINDOW, MetaTrace
    trace = MetaTrace("pairwise", 0.6931)
    for i in range(3 * META_WINDOW):  # the loss falls by 0.005 per upper step, accuracy climbs to 1
        trace.add(0.69 - 0.005 * i, min(1.0, 0.5 + 0.01 * i))
    trace.add(0.2, None)  # a score without a pair accuracy (e.g. --meta_loss mse) counts for the loss only
    text, _ = write_run_summary(tmp_path, RunSummary(steps=10, seconds=1.0, samples_per_s=1.0,
                                                     weights={"clean": 1.0}, meta=trace))
    first_loss = sum(0.69 - 0.005 * i for i in range(META_WINDOW)) / META_WINDOW
    last = range(2 * META_WINDOW + 1, 3 * META_WINDOW)
    last_loss = (sum(0.69 - 0.005 * i for i in last) + 0.2) / META_WINDOW
    last_accuracy = sum(min(1.0, 0.5 + 0.01 * i) for i in last) / (META_WINDOW - 1)
    assert "## Meta objective (pairwise; a PRM that scores every chain alike: 0.693)" in text
    assert f"| first {META_WINDOW} | {first_loss:.3f} | 0.595 |" in text
    assert f"| last {META_WINDOW} | {last_loss:.3f} | {last_accuracy:.3f} |" in text


# ---------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def watched_run(tiny_model, tmp_path_factory):
    """2 ZeRO-3 ranks, 10 steps, evaluation every 5 (capped to a tiny share of the time: only the first
    and the last run), best by best_of_4 exported, every tracker."""
    out = tmp_path_factory.mktemp("watched") / "run"
    env = {**base_env(), "WANDB_MODE": "offline", "HOME": str(out.parent)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = small_run_args(tiny_model, out, "--iteration_num", "10", "--batch_size", "2", "--save_every_iterations",
                          "5", "--keep_last", "1", "--eval_candidates", str(CANDIDATES), "--eval_every", "5",
                          "--keep_best", "best_of_4", "--export_from", "best", "--report_to",
                          "tensorboard,wandb,mlflow", "--eval_max_share", "0.0001")
    proc = run_train(args, nproc=2, env=env)
    return out, proc, args, env


@pytest.mark.slow
@pytest.mark.multiprocess
def test_watched_run(watched_run, tmp_path, monkeypatch):
    out, proc, args, env = watched_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store back here
    tb = read_scalars(out / "tb")
    evals = {tag: dict(series) for tag, series in tb.items() if tag.startswith("eval/")}
    assert sorted(evals) == ["eval/auc", "eval/best_of_1", "eval/best_of_2", "eval/best_of_4"]
    assert all(sorted(series) == [5, 10] for series in evals.values()), evals
    assert f"eval at step 5: best_of_1 {evals['eval/best_of_1'][5]:.3f}" in proc.stdout + proc.stderr
    # --eval_max_share 0.0001: the evaluation due at step 10 inside the loop waits; the last one runs.
    assert "eval at step 10 postponed" in proc.stdout + proc.stderr

    # The best checkpoint is kept beside --keep_last 1's newest, and named in best.json.
    best = read_json(out / "checkpoints" / "best.json")
    values = evals["eval/best_of_4"]
    best_step = 5 if values[5] >= values[10] else 10
    assert best["metric"] == "best_of_4" and best["step"] == best_step
    assert best["value"] == pytest.approx(values[best_step], abs=1e-6)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{best_step:08d}", "step_00000010"})

    # The live ZeRO-3 numbers are those of Best-of-N on the exported (best) PRM.
    meta = read_json(out / "export" / "prm_config.json")
    assert meta["step"] == best_step
    report = tmp_path / "report.json"
    assert run_bestofn(BestOfNConfig(prm=str(out / "export"), candidates=str(CANDIDATES),
                                     output=str(tmp_path / "select.json"), report=str(report), device="cpu")) == 0
    by_n = {row["n"]: row["prm"] for row in read_json(report)["by_n"]}
    for n, accuracy in by_n.items():
        assert evals[f"eval/best_of_{n}"][best_step] == pytest.approx(accuracy, abs=1e-6), n
    selections = read_json(tmp_path / "select.json")["questions"]
    area = auc([s for q in selections for s in q["chain_scores"]], [c for q in selections for c in q["correct"]])
    assert evals["eval/auc"][best_step] == pytest.approx(area, abs=1e-4)

    # Every tracker got every scalar: W&B's offline run folder and MLflow's file store.
    from mlflow.tracking import MlflowClient
    from wandb_offline import history, run_file
    wandb_series = history(run_file(out))
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("dreamprm").experiment_id])
    assert set(mlrun.data.metrics) == set(tb)
    assert set(wandb_series) == set(tb)
    for tag, series in tb.items():
        assert [s for s, _ in wandb_series[tag]] == [s for s, _ in series], tag
        assert [v for _, v in wandb_series[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag
        history_ml = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, tag))
        assert [s for s, _ in history_ml] == [s for s, _ in series], tag
        assert [v for _, v in history_ml] == pytest.approx([v for _, v in series], rel=1e-6), tag

    # summary.md: steps, time, speed, final and best evaluation, weights, picture, the export.
    summary = (out / "summary.md").read_text()
    assert "- steps: 10" in summary and "samples/s" in summary and "% of the run)" in summary
    assert f"| best_of_4 | {values[10]:.4f} | {best['value']:.4f} (step {best_step}) |" in summary
    assert "![domain weights](domain_weights.png)" in summary and (out / "domain_weights.png").is_file()
    assert f"{out / 'export'} (the PRM of step {best_step})" in summary
    assert "# DreamPRM run summary" in proc.stdout + proc.stderr  # printed too

    # A resumed run keeps the record of the best: a later step must beat it to replace it.
    resumed = run_train([*args[:args.index("--iteration_num")], "--iteration_num", "15",
                         *args[args.index("--iteration_num") + 2:], "--resume", "auto", "--no-export"], nproc=2, env=env)
    assert f"resume: best best_of_4 so far {best['value']:.4f} at step {best_step}" in resumed.stdout + resumed.stderr
    tb = read_scalars(out / "tb")
    at_15 = dict(tb["eval/best_of_4"])[15]
    after = read_json(out / "checkpoints" / "best.json")
    if at_15 > best["value"]:
        assert after["step"] == 15 and "new best best_of_4" in resumed.stdout + resumed.stderr
    else:
        assert after == best and (out / "checkpoints" / best["folder"]).is_dir()
        assert "new best" not in resumed.stdout + resumed.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.browser
def test_eval_curves_in_the_tensorboard_dashboard(watched_run, tmp_path):
    """The run's Best-of-N curves, drawn by the real TensorBoard in headless Chromium."""
    from tensorboard_view import chromium_available, screenshot_dashboard
    ok, why = chromium_available()
    if not ok:
        pytest.skip(f"no headless browser: {why}")
    out = watched_run[0]
    steps = {tag: [s for s, _ in series] for tag, series in read_scalars(out / "tb").items() if tag.startswith("eval/")}
    png = tmp_path / "tensorboard_eval.png"
    info = screenshot_dashboard(out, png, tag_filter="eval/", timeout_s=90)
    (DEMO.parent.parent / "tests" / "artifacts").mkdir(exist_ok=True)
    shutil.copyfile(png, DEMO.parent.parent / "tests" / "artifacts" / "tensorboard_eval_curves.png")
    assert sorted(info["titles"]) == sorted(steps) == ["eval/auc", "eval/best_of_1", "eval/best_of_2", "eval/best_of_4"]
    for tag, logged in steps.items():
        assert info["drawn"][tag] >= 1 and info["points"][tag] == len(logged) >= 2, (tag, info)
    from PIL import Image
    with Image.open(png) as img:
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 50  # a drawn dashboard, not a blank page
