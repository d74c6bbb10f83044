"""dreamprm-label as a user runs it, on the tiny random Qwen2-VL with the transformers engine:
questions -> 2 shards -> merge -> launch/train.py (10 steps) -> Best-of-N; and a shard stopped by
SIGTERM (exit 75) and killed by SIGKILL midway, resumed, compared record for record with an
uninterrupted run.

The random policy writes garbage, so the tests force the format through the prefill (the start of
the assistant turn, a real flag): every chain says "Final answer: 3", and the ground truths (3 or 4)
decide which chains are right, so the meta set and the candidates hold right and wrong chains."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO, REPO, base_env, read_json, run_train, small_run_args
from dreamprm.bestofn.candidates import load_candidates
from dreamprm.data.records import load_meta_records, load_train_records
from dreamprm.labeling.shards import read_shard

pytestmark = pytest.mark.slow

PREFILL = "Step 1: I count the shapes.\nFinal answer: 3\n"
FAST = ["--max_new_tokens", "6", "--rollout_max_new_tokens", "6", "--chains", "2", "--rollouts", "2",
        "--meta_chains", "2", "--candidates", "3", "--prefill", PREFILL, "--no-progress"]


def write_questions(path: Path, splits: dict[str, int]) -> Path:
    records, n = [], 0
    for split, count in splits.items():
        for i in range(count):
            records.append({"id": f"{split}-{i}", "question": "How many shapes are in the image?",
                            "image_path": f"images/cand_{n % 24:03d}.png", "ground_truth": str(3 + (i % 2)),
                            "dataset": ["alpha", "beta"][(i // 2) % 2], "split": split})
            n += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def label_command(entry: list[str], questions: Path, policy: Path, out: Path, *extra: str) -> list[str]:
    return [*entry, "--questions", str(questions), "--image_root", str(DEMO), "--policy", str(policy),
            "--out", str(out), *FAST, *extra]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command[:4]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_questions_to_trained_prm_to_best_of_n(tiny_model, tmp_path):
    questions = write_questions(tmp_path / "questions.jsonl", {"train": 4, "meta": 4, "test": 4})
    out = tmp_path / "label"
    shards = [subprocess.Popen(label_command(entry, questions, tiny_model, out, "--shard", f"{i}/2"), cwd=REPO,
                               env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i, entry in enumerate([[sys.executable, "-m", "dreamprm.labeling"],
                                         [sys.executable, "launch/label.py"]])]
    for proc in shards:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
    merged = run([sys.executable, "-m", "dreamprm.labeling", "merge", "--out", str(out), "--balance_meta"])
    assert "train.json" in merged.stdout and "candidates.json" in merged.stdout

    train = read_json(out / "train.json")
    assert len(train) == 4 * 2 and {r["id"] for r in train} == {f"train-{i}-{c}" for i in range(4) for c in range(2)}
    for r in train:
        assert set(r) == {"id", "sid", "input", "add", "ground_truth", "image_path", "dataset", "score", "times",
                          "accuracy"}
        assert r["add"] == "Step 1: I count the shapes." and r["sid"] == 1
        assert r["times"] == 2 and r["accuracy"] == r["score"] / r["times"]
    assert len(load_train_records(out / "train.json")) == 8  # the trainer's own validation
    meta = load_meta_records(out / "meta.json")
    labels = [m.label for m in meta]
    assert 0 < sum(labels) < len(labels) and sum(labels) * 2 == len(labels)  # balanced per domain
    candidates = load_candidates(out / "candidates.json")
    assert len(candidates) == 4 and all(len(q.candidates) == 3 for q in candidates)
    assert [all(c.correct for c in q.candidates) for q in candidates] == [True, False, True, False]

    run_dir = tmp_path / "run"
    run_train(small_run_args(tiny_model, run_dir, "--train_json_file", str(out / "train.json"),
                             "--meta_json_file", str(out / "meta.json"), "--iteration_num", "10", "--batch_size", "4",
                             "--meta_batch_size", "4"))
    selection = tmp_path / "selection.json"
    run([sys.executable, "-m", "dreamprm.bestofn", "--prm", str(run_dir), "--candidates", str(out / "candidates.json"),
         "--device", "cpu", "--output", str(selection)])
    chosen = read_json(selection)
    assert chosen["num_questions"] == 4 and chosen["n"] == 3


def done_count(path: Path) -> int:
    return sum(item["type"] == "done" for item in read_shard(path)[1]) if path.exists() else 0


def stop_after(proc: subprocess.Popen, shard: Path, at_least: int, sig: int) -> int:
    """Send `sig` once the shard file holds `at_least` finished questions; the count at that moment."""
    deadline = time.monotonic() + 600
    while done_count(shard) < at_least:
        assert proc.poll() is None, f"the shard ended before it was stopped: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    count = done_count(shard)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    return count


def test_stopped_and_killed_shard_resumes_to_the_same_records(tiny_model, tmp_path):
    questions = write_questions(tmp_path / "questions.jsonl", {"train": 4, "meta": 2, "test": 2})
    entry = [sys.executable, "-m", "dreamprm.labeling"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(label_command(entry, questions, tiny_model, whole))
    shard = cut / "shard-00000-of-00001.jsonl"

    def start():
        return subprocess.Popen(label_command(entry, questions, tiny_model, cut), cwd=REPO, env=base_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    stopped_at = stop_after(first, shard, 1, signal.SIGTERM)
    assert first.returncode == 75, first.stderr.read()[-3000:]  # Slurm's warning: requeue
    second = start()
    killed_at = stop_after(second, shard, stopped_at + 2, signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL and killed_at < 8, killed_at
    survived = done_count(shard)  # the kill may land after one more question was written
    assert survived >= killed_at
    resumed = run(label_command(entry, questions, tiny_model, cut))
    assert (cut / "shard-00000-of-00001.jsonl").read_text() == (whole / "shard-00000-of-00001.jsonl").read_text()
    assert f"{survived} done before, {8 - survived} to do" in resumed.stderr
    for out in (whole, cut):
        run([sys.executable, "-m", "dreamprm.labeling", "merge", "--out", str(out)])
    for name in ("train.json", "meta.json", "candidates.json"):
        assert (cut / name).read_text() == (whole / name).read_text(), name


@pytest.mark.benchmark
def test_throughput_benchmark_reports_rates(tiny_model, tmp_path):
    report = tmp_path / "throughput.json"
    run([sys.executable, "benchmarks/labeling_throughput.py", "--model_dir", str(tiny_model), "--steps", "2",
         "--rollouts", "2", "--max_new_tokens", "4", "--rounds", "1", "--json", str(report)])
    [result] = read_json(report)["results"]
    assert result["engine"] == "transformers" and result["rollouts"] == 4
    assert 4 <= result["tokens"] <= 16 and result["rollouts_per_s"] > 0 and result["tokens_per_s"] > 0


@pytest.mark.parametrize("command", [[], ["merge"], ["import-visualprm"]])
def test_module_help_lists_the_flags(command):
    proc = subprocess.run([sys.executable, "-m", "dreamprm.labeling", *command, "--help"], cwd=REPO, env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {' '.join(['python -m dreamprm.labeling', *command])} ")
    assert {"": "--max_rollouts", "merge": "--balance_meta", "import-visualprm": "--image_prefix"}[" ".join(command)] \
        in proc.stdout
