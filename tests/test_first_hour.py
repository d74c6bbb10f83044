"""A newcomer's first hour (issue 25): mistakes caught in about a second, all at once, with advice
that can be followed; no run that silently learns nothing; outputs where a user looks; the
documented data-cleaning recipe runs as printed.

In process: the start-up checks (`dreamprm.preflight`), the help texts, the progress bar, Best-of-N's
output location and `dreamprm-clean`. Slow: the real entry points, timed, and the cleaning recipe
end to end (train with instance weights → clean → train on the cleaned file from another folder).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO, REPO, base_env, read_json, run_train, small_run_args

from dreamprm.config import EXIT_USER_ERROR, parse_args
from dreamprm.preflight import StartupError, check_training


def check(*argv: str, world_size: int = 1):
    return check_training(parse_args(list(argv), check=False), world_size)


def problems(*argv: str, world_size: int = 1) -> list[str]:
    with pytest.raises(StartupError) as err:
        check(*argv, world_size=world_size)
    return err.value.problems


# ---------------------------------------------------------------- rule 3: every problem, at once
def test_the_defaults_pass(tmp_path):
    records = check("--weights_path", str(tmp_path / "run"))
    assert len(records.train) == 369 and len(records.meta) == 64 and records.warnings == []
    assert not (tmp_path / "run").exists()  # checking writes nothing


def test_every_problem_of_every_kind_in_one_message(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    found = problems("--train_json_file", str(tmp_path / "train.json"), "--meta_json_file", str(tmp_path / "meta.json"),
                     "--reward_model", str(tmp_path / "model"), "--resume", str(tmp_path / "nowhere"),
                     "--deepspeed", str(ds), "--batch_size", "4", "--lr", "-1", "--image_root", str(tmp_path / "imgs"))
    expected = [f"--reward_model {tmp_path / 'model'}: no such directory", f"--resume {tmp_path / 'nowhere'}: no such",
                f"{tmp_path / 'train.json'}: file: cannot be read", f"{tmp_path / 'meta.json'}: file: cannot be read",
                f"--batch_size 4 conflicts with train_micro_batch_size_per_gpu=2 in {ds}", "--lr: must be a positive",
                f"--image_root {tmp_path / 'imgs'}: no such folder"]
    for fragment in expected:
        assert any(fragment in p for p in found), (fragment, found)
    assert len(found) == len(expected), found


def test_a_missing_image_names_image_root(tmp_path):
    records = read_json(DEMO / "train.json")
    (tmp_path / "train.json").write_text(json.dumps(records))
    found = problems("--train_json_file", str(tmp_path / "train.json"))
    assert "image file" in found[0] and "does not exist" in found[0]
    assert found[-1].startswith("--image_root: relative image paths resolve against each JSON file's folder")
    assert "... and 319 more problems" in found[-2]  # 369 records, 50 listed


# ---------------------------------------------------------------- rule 4: advice that can be followed
def test_instance_weights_in_bf16_are_told_to_add_fp32_not_to_use_exact():
    [message] = problems("--weighting", "instance", "--hypergrad", "fd")
    assert "Add --precision fp32" in message and "--hypergrad exact" not in message
    [message] = problems("--weighting", "instance")
    assert "--hypergrad fd --precision fp32 gives all of them" in message
    check("--weighting", "instance", "--hypergrad", "fd", "--precision", "fp32")  # the advice, followed, passes


def make_checkpoint(run: Path, step: int, world_size: int = 1) -> Path:
    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": step, "world_size": world_size, "files": []}))
    return folder


def test_resume_targets_are_named_with_what_to_type(tmp_path):
    [message] = problems("--resume", str(tmp_path / "nonexistent"))
    assert message == f"--resume {tmp_path / 'nonexistent'}: no such folder"
    run = tmp_path / "demo"
    newest = make_checkpoint(run, 10)
    make_checkpoint(run, 5)
    [message] = problems("--resume", str(run))
    assert "this is a run folder, not a checkpoint" in message and f"--resume {newest}" in message
    assert f"--weights_path {run} --resume auto" in message
    [message] = problems("--resume", str(newest), world_size=2)
    assert "world size: checkpoint 1 vs now 2" in message
    [message] = problems("--resume", "auto")
    assert "--resume auto looks for checkpoints in --weights_path, which is not given" in message
    check("--resume", str(newest), "--weights_path", str(tmp_path / "new"))


# ---------------------------------------------------------------- rule 5: no run that learns nothing
def test_a_meta_set_without_a_pair_is_refused_under_pairwise(tmp_path):
    meta = [r for r in read_json(DEMO / "meta.json") if r["true_false"]]
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    args = ("--meta_json_file", str(path), "--image_root", str(DEMO))
    [message] = problems(*args)
    assert "every meta chain is right" in message and "--meta_loss mse" in message
    check(*args, "--meta_loss", "mse")
    check(*args, "--baseline")


def test_a_single_domain_is_refused_under_domain_weighting(tmp_path):
    train = [r for r in read_json(DEMO / "train.json") if r["dataset"] == "clean"]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train))
    args = ("--train_json_file", str(path), "--image_root", str(DEMO))
    [message] = problems(*args)
    assert "every training record is in domain 'clean'" in message
    check(*args, "--baseline")


def test_too_few_steps_for_an_upper_step_is_warned_about():
    records = check("--iteration_num", "3")
    assert len(records.warnings) == 1 and "no upper step runs" in records.warnings[0]
    assert check("--iteration_num", "5").warnings == []


def test_a_fresh_run_in_a_folder_of_checkpoints_is_warned_about(tmp_path):
    make_checkpoint(tmp_path / "run", 10)
    [warning] = check("--weights_path", str(tmp_path / "run")).warnings
    assert "already holds checkpoints (newest step_00000010)" in warning and "--resume auto" in warning
    assert check("--weights_path", str(tmp_path / "run"), "--resume", "auto").warnings == []


class Said:
    """The trainer's logger as far as these warnings use it: what was said."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_upper_steps_without_signal_are_warned_about_once_when_they_dominate():
    import torch

    from dreamprm.bilevel.upper import UpperResult
    from dreamprm.trainer import MIN_SILENT_STEPS, Trainer, TrainState

    trainer = Trainer.__new__(Trainer)  # the counting alone: no engine is needed for it
    trainer.state, trainer.logger = TrainState(), Said()
    trainer._never_seen, trainer._no_signal, trainer._warned_no_signal = None, 0, False

    def upper(*d: float) -> None:
        trainer.state.upper_steps += 1
        trainer.watch_signal(UpperResult(0.7, torch.tensor(d), torch.zeros(len(d)), 1.0, None, True))

    upper(0.1, 0.0, 0.2)  # domain 1 absent from this step's batches
    for _ in range(MIN_SILENT_STEPS - 1):
        upper(0.0, 0.0, 0.0)
    assert trainer.logger.lines == []  # 3 of 4: not yet
    upper(0.0, 0.0, 0.0)
    assert len(trainer.logger.lines) == 1 and trainer.logger.lines[0].startswith("WARNING: 4 of 5 upper steps")
    upper(0.0, 0.0, 0.0)
    assert len(trainer.logger.lines) == 1  # once
    assert trainer._never_seen.tolist() == [False, True, False]


def test_a_meta_batch_without_a_pair_leaves_the_meta_loss_curve_alone():
    """Its pairwise loss is 0 by definition: logged, it would read as a PRM that ranks perfectly and
    pull every average of the curve down (the benchmark's 'meta loss end' did, by 5-10%)."""
    import types

    import torch

    from dreamprm.bilevel.upper import UpperResult
    from dreamprm.trainer import Trainer, TrainState

    logged: list[dict[str, float]] = []
    trainer = Trainer.__new__(Trainer)  # log_upper alone: no engine is needed for it
    trainer.state, trainer.domains = TrainState(), {"clean": 0, "noisy": 1}
    trainer.logger = types.SimpleNamespace(scalars=lambda step, values: logged.append(values))
    trainer.domain_weights = types.SimpleNamespace(as_dict=lambda: {"clean": 1.0, "noisy": 1.0}, logits=torch.zeros(2))
    trainer.meta_optimizer = types.SimpleNamespace(state={})
    from dreamprm.summary import MetaTrace
    trainer.meta_trace = MetaTrace("pairwise", 0.6931)  # what summary.md's meta section averages

    def log(objective: str, loss: float, pair_accuracy: float | None) -> dict[str, float]:
        trainer.config = parse_args(["--meta_loss", objective])
        trainer.log_upper(UpperResult(loss, torch.zeros(2), torch.zeros(2), 0.0 if pair_accuracy is None else 1.0,
                                      None, True, pair_accuracy=pair_accuracy), 0.1)
        return logged[-1]

    without_pair = log("pairwise", 0.0, None)
    assert "meta/loss" not in without_pair and "meta/pair_accuracy" not in without_pair
    assert "meta/v_norm" in without_pair and "domain_weight/clean" in without_pair  # the step itself is logged
    with_pairs = log("pairwise", 0.69, 0.75)
    assert with_pairs["meta/loss"] == 0.69 and with_pairs["meta/pair_accuracy"] == 0.75
    assert log("mse", 0.25, None)["meta/loss"] == 0.25  # the original objective needs no pair
    assert trainer.meta_trace.first == [(0.69, 0.75), (0.25, None)]


def test_the_flag_free_run_says_which_recipe_it_trains():
    from dreamprm.cli import recipe_note
    note = recipe_note(parse_args(["--deepspeed", str(REPO / "ds_configs" / "zero3.json")]))
    assert note and "--lr 5e-7" in note and "bash .ci/demo.sh" in note
    assert recipe_note(parse_args(["--lr", "1e-3"])) is None


# ---------------------------------------------------------------- rule 8: help texts, the progress bar
def test_help_names_each_default_once_and_console_scripts_their_own_name(capsys, monkeypatch):
    from dreamprm import cli
    for main, name in ((cli.main_train, "dreamprm-train"), (cli.main_bestofn, "dreamprm-bestofn")):
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f"usage: {name} ")
        doubled = [line for line in out.replace("\n                        ", " ").splitlines()
                   if line.count("(default") > 1]
        assert not doubled, doubled


def test_the_progress_bar_ends_on_the_last_step_once(tmp_path, monkeypatch):
    from dreamprm.metrics import MetricsLogger
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    logger = MetricsLogger(tmp_path, True, total_steps=5)
    logger.bar.mininterval = 0  # as in a real run, where the last refresh was long ago: any update draws
    logger.progress(2)
    logger.progress(3)  # a log line at the last step
    logger.end_progress(5)
    logger.info("done at step 5")
    logger.close()
    frames = [f for f in err.getvalue().replace("\n", "\r").split("\r") if "/5" in f]
    assert frames[-1].strip().startswith("train: 100%") and " 5/5 " in frames[-1], frames
    assert sum(" 5/5 " in f for f in frames) == 1 and any(" 2/5 " in f for f in frames), frames
    assert logger.bar is None  # closed: the message after it is printed on its own line


# ---------------------------------------------------------------- rule 6: Best-of-N beside its report
def test_bestofn_writes_beside_the_report_or_in_the_prm_run_folder():
    from dreamprm.bestofn.config import parse_args as bestofn_args
    c = bestofn_args(["--prm", "runs/demo/export", "--candidates", "data/demo/candidates.json"])
    assert c.output_path == Path("runs/demo/bestofn/candidates.json")
    assert c.report_path == Path("runs/demo/bestofn/candidates.report.json")
    c = bestofn_args(["--prm", "runs/demo/export", "--candidates", "x.json", "--report", "runs/demo/bon.json"])
    assert c.output_path == Path("runs/demo/bon.selection.json")
    other = bestofn_args(["--prm", "runs/other/export", "--candidates", "data/demo/candidates.json"])
    assert other.output_path != bestofn_args(["--prm", "runs/demo/export", "--candidates",
                                              "data/demo/candidates.json"]).output_path


# ---------------------------------------------------------------- rule 2: dreamprm-clean
def instance_report(path: Path, train: Path, order: list[int]) -> Path:
    path.write_text("".join(json.dumps({"file": str(train), "record": i, "weight": w / 10})
                            + "\n" for w, i in enumerate(order)))
    return path


def test_clean_writes_a_file_that_passes_the_checks_from_anywhere(tmp_path):
    from dreamprm.clean import main
    train = DEMO / "train.json"
    n = len(read_json(train))
    report = instance_report(tmp_path / "instance_weights.jsonl", train, list(range(n - 1, -1, -1)))
    out = tmp_path / "elsewhere" / "train.cleaned.json"
    assert main(["--report", str(report), "--drop", "5%", "--out", str(out)]) == 0
    cleaned = read_json(out)
    assert len(cleaned) == n - n * 5 // 100
    assert cleaned[-1] == {**read_json(train)[n - n * 5 // 100 - 1],
                           "image_path": str(DEMO / read_json(train)[n - n * 5 // 100 - 1]["image_path"])}
    assert [r["record"] for r in map(json.loads, out.with_name("train.cleaned.dropped.jsonl").open())] == \
        list(range(n - 1, n - 1 - n * 5 // 100, -1))
    assert len(check("--train_json_file", str(out)).train) == len(cleaned)


@pytest.mark.parametrize("argv, fragment", [
    (["--drop", "5x"], "--drop 5x: expected a share like 5%"),
    (["--drop", "101%"], "--drop 101%"),
    (["--drop", "1", "--train_json_file", str(DEMO / "meta.json")], "row(s) point past the 64 records"),
])
def test_clean_refuses_with_one_error_line_and_writes_nothing(tmp_path, capsys, argv, fragment):
    from dreamprm.clean import main
    report = instance_report(tmp_path / "r.jsonl", DEMO / "train.json", list(range(369)))
    out = tmp_path / "out" / "x.json"
    assert main(["--report", str(report), "--out", str(out), *argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("error:") == 1, err
    assert not out.parent.exists()


def test_clean_audits_each_ranking_against_known_corrupted_records_and_drops_by_loss(tmp_path, capsys):
    """--audit prints the AUC of the weights, of domain x record weights and of both baselines (loss,
    |mc - prediction|); --rank_by loss/gap drops the least trusted first and never an unvisited record."""
    from dreamprm.clean import main
    train = DEMO / "train.json"
    # Records 0-9 are the known corrupted ones, in a domain "bad" weighted 0.001 ("good": 1).
    # Weights: 0-2 lowest, 3-9 above every clean record -> AUC 0.3. Loss: 0-7 highest, 8-9 the lowest ->
    # AUC 0.8. Domain x record: every corrupted record below every clean one -> AUC 1. The last record
    # was never visited (loss null).
    weight = {i: (i if i < 3 else 1000 + i if i < 10 else 100 + i) for i in range(369)}
    loss = {i: (10.0 - i if i < 8 else 0.0001 * i if i < 10 else 0.01 + 0.001 * i) for i in range(369)}
    loss[368] = None
    # |mc - prediction|: 0-5 the largest (0.40 down to 0.35), 6-9 exactly 0, clean records in between ->
    # AUC 0.6, an ordering of its own (mc varies, so it is not the prediction's).
    gap = {i: (0.4 - 0.01 * i if i < 6 else 0.0 if i < 10 else 0.01 + 0.0001 * i) for i in range(369)}
    mc = {i: (0.25 if i % 2 else 0.75) for i in range(369)}
    prediction = {i: mc[i] + (gap[i] if mc[i] < 0.5 else -gap[i]) for i in range(368)}
    prediction[368] = None
    (tmp_path / "domain_weights.json").write_text(json.dumps({"weights": {"bad": 0.001, "good": 1.0}}))
    report = tmp_path / "instance_weights.jsonl"
    report.write_text("".join(json.dumps({"file": str(train), "record": i, "domain": "bad" if i < 10 else "good",
                                          "weight": weight[i], "loss": loss[i], "mc": mc[i],
                                          "prediction": prediction[i]}) + "\n"
                              for i in sorted(range(369), key=weight.get)))
    (tmp_path / "bad.json").write_text(json.dumps(list(range(10))))
    out = tmp_path / "cleaned.json"
    assert main(["--report", str(report), "--audit", str(tmp_path / "bad.json"), "--rank_by", "loss",
                 "--drop", "5", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'bad.json'}: 10 known corrupted records")
    table = {line.split("  ", 2)[2].rsplit(" (", 1)[0]: float(line.split()[0]) for line in lines[1:6]}
    assert table["instance weights"] == pytest.approx(0.3, abs=1e-3)
    assert table["loss ranking (records visited by an upper step)"] == pytest.approx(0.8, abs=1e-3)
    assert table["|MC accuracy - PRM prediction|, the same records"] == pytest.approx(0.6, abs=1e-3)
    assert table["domain x record weights (what the lower loss used)"] == pytest.approx(1.0, abs=1e-3)
    dropped = [r["record"] for r in map(json.loads, out.with_name("cleaned.dropped.jsonl").open())]
    assert dropped == [0, 1, 2, 3, 4]
    # Dropping all but one by loss leaves the never-visited record in.
    assert main(["--report", str(report), "--rank_by", "loss", "--drop", "368", "--out", str(out)]) == 0
    assert len(read_json(out)) == 1 and read_json(out)[0]["id"] == read_json(train)[368]["id"]
    # By |mc - prediction|: the largest first.
    assert main(["--report", str(report), "--rank_by", "gap", "--drop", "7", "--out", str(out)]) == 0
    dropped = [r["record"] for r in map(json.loads, out.with_name("cleaned.dropped.jsonl").open())]
    assert dropped == [0, 1, 2, 3, 4, 5, 367]
    assert main(["--report", str(report), "--rank_by", "gap", "--drop", "368", "--out", str(out)]) == 0
    assert len(read_json(out)) == 1 and read_json(out)[0]["id"] == read_json(train)[368]["id"]
    # A record visited before predictions were recorded (an older checkpoint resumed): an error that names it.
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(json.dumps({**row, "prediction": None if row["record"] == 12 else row["prediction"]})
                               + "\n" for row in map(json.loads, report.open())))
    capsys.readouterr()
    assert main(["--report", str(resumed), "--rank_by", "gap", "--drop", "5", "--out", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "record 12: prediction: 1 record(s) have a loss but no prediction" in err, err
    # Audit only: nothing written; a bad audit file is one error line.
    assert main(["--report", str(report), "--audit", str(tmp_path / "bad.json")]) == 0
    (tmp_path / "worse.json").write_text("[3, 4000]")
    capsys.readouterr()
    assert main(["--report", str(report), "--audit", str(tmp_path / "worse.json")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "record 4000: outside the 369 records" in err, err


# ---------------------------------------------------------------- the real entry points, timed
def timed(command: list[str], cwd: Path = REPO) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=base_env(), capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - started


@pytest.mark.slow
def test_a_mistake_is_reported_within_two_seconds_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    proc, seconds = timed([sys.executable, "launch/train.py", "--train_json_file", "train.json", "--meta_json_file",
                           "meta.json", "--reward_model", "/models/Qwen2-VL-2B-Instruct", "--weights_path", str(out)])
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "error: 3 problems, nothing was started or written:", proc.stderr
    assert len(lines) == 4 and "Traceback" not in proc.stderr
    assert not out.exists()
    assert seconds <= 2.0, f"{seconds:.2f} s"
    # ... and the start-up checks never import the heavy libraries.
    code = ("import sys, dreamprm.preflight, dreamprm.cli, dreamprm.clean, dreamprm.bestofn.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    proc, _ = timed([sys.executable, "-c", code])
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "dreamprm.bestofn", "--help"], ["launch/bestofn.py", "--help"],
                                     ["launch/clean.py", "--help"], ["launch/train.py", "--help"]])
def test_help_answers_within_two_seconds(command):
    proc, seconds = timed([sys.executable, *command])
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr
    assert seconds <= 2.0, f"{seconds:.2f} s"


@pytest.mark.slow
def test_the_cleaning_recipe_of_the_readme_runs_as_printed(tiny_model, tmp_path):
    """README "Instance weights: a data-cleaning report": train with instance weights, clean the lowest
    5%, train on the cleaned file started from another folder; a refused resume leaves no folder."""
    run = tmp_path / "clean"
    run_train(small_run_args(tiny_model, run, "--weighting", "both", "--hypergrad", "fd", "--iteration_num", "5",
                             "--batch_size", "4"))
    report = run / "instance_weights.jsonl"
    assert len(report.read_text().splitlines()) == 369
    cleaned = run / "train.cleaned.json"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "clean.py"), "--report", str(report), "--drop", "5%",
                           "--out", str(cleaned)], cwd=tmp_path, env=base_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(read_json(cleaned)) == 369 - 18
    second = tmp_path / "cleaned"
    proc = run_train(small_run_args(tiny_model, second, "--train_json_file", str(cleaned), "--iteration_num", "5",
                             "--batch_size", "4", "--no-export"))
    assert (second / "checkpoints" / "step_00000005" / "manifest.json").is_file()
    frames = [f for f in proc.stderr.replace("\n", "\r").split("\r") if f.startswith("train:")]
    assert " 5/5 " in frames[-1] and sum(" 5/5 " in f for f in frames) == 1, frames  # log_every 2: 4 counted
    # The last step on a log line (--log_every 5): still one last line.
    proc = run_train(small_run_args(tiny_model, tmp_path / "five", "--iteration_num", "5", "--batch_size", "4",
                                    "--log_every", "5", "--no-export"))
    frames = [f for f in proc.stderr.replace("\n", "\r").split("\r") if f.startswith("train:")]
    assert " 5/5 " in frames[-1] and sum(" 5/5 " in f for f in frames) == 1, frames
    # A resume the trainer refuses after its start-up checks (another head) leaves nothing behind.
    refused = tmp_path / "refused"
    proc = run_train(small_run_args(tiny_model, refused, "--resume", str(run / "checkpoints" / "step_00000005"),
                                    "--head", "hidden", "--iteration_num", "10"), check=False)
    assert proc.returncode == EXIT_USER_ERROR and "belongs to a different run" in proc.stderr, proc.stderr[-3000:]
    assert not refused.exists(), sorted(refused.rglob("*"))
