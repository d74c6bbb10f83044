"""Best-of-N selection and evaluation (`dreamprm.bestofn`, `launch/bestofn.py`).

Most tests substitute a scorer with fixed step logits, so selections and accuracies are known by
hand. The end-to-end tests export a tiny random PRM and run the real command lines on the demo:
one process, and two processes under torchrun.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreamprm.bilevel.aggregation import AGGREGATIONS
from dreamprm.data.records import DataValidationError, load_meta_records
from dreamprm.data.steps import split_step_prefixes
from dreamprm.bestofn.candidates import Candidate, Question, load_candidates, normalize_answer
from dreamprm.bestofn.config import BestOfNConfig, parse_args
from dreamprm.bestofn.evaluation import candidate_subsets, evaluate, subset_sizes
from dreamprm.bestofn.run import main, rank_slice, run
from dreamprm.bestofn.scorer import ModelScorer, resolve_prm_dir
from dreamprm.bestofn.selection import best_index, chain_scores, majority_vote, select
from dreamprm.config import EXIT_USER_ERROR

REPO = Path(__file__).resolve().parent.parent
DEMO_CANDIDATES = REPO / "data" / "demo" / "candidates.json"


# ---------------------------------------------------------------- helpers
def make_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(path)
    return path


def chain(answer: str | None, steps: int = 1) -> str:
    text = "\n".join(f"Step {i + 1}: step {i + 1} of the chain." for i in range(steps))
    return text if answer is None else text + f"\nFinal answer: {answer}"


def question(qid: str, chains: list[str], correct: list[bool] | None = None, **extra) -> dict:
    cands = [{"text": t} if correct is None else {"text": t, "correct": c} for t, c in zip(chains, correct or chains)]
    return {"id": qid, "image_path": "img.png", "question": f"Question {qid}?", "candidates": cands, **extra}


def write_candidates(folder: Path, records: list, name: str = "cands.json") -> Path:
    make_image(folder / "img.png")
    path = folder / name
    path.write_text(json.dumps(records, indent=1))
    return path


def fixed_scorer(table: dict[str, list[list[float]]]):
    """Step logits per question id; checks that every chain gets one logit per step prefix."""
    def score(questions):
        out = []
        for q in questions:
            logits = table[q.qid]
            assert [len(x) for x in logits] == [len(c.prefixes) for c in q.candidates]
            out.append([list(x) for x in logits])
        return out
    return score


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def config(tmp_path: Path, candidates: Path, *extra: str) -> BestOfNConfig:
    return parse_args(["--prm", str(tmp_path / "no-prm"), "--candidates", str(candidates),
                       "--output", str(tmp_path / "out.json"), *extra])


# ---------------------------------------------------------------- aggregation
# Chain 0 has step logits (0, 2, -1); chain 1 has one step, logit 1.5.
HAND = {
    "mean_logit": [sig(1 / 3), sig(1.5)],
    "mean": [(sig(0) + sig(2) + sig(-1)) / 3, sig(1.5)],
    "min": [sig(-1), sig(1.5)],
    "max": [sig(2), sig(1.5)],
    "product": [sig(0) * sig(2) * sig(-1), sig(1.5)],
    "last": [sig(-1), sig(1.5)],
}


def test_every_aggregation_is_checked_by_hand():
    assert set(HAND) == set(AGGREGATIONS)


@pytest.mark.parametrize("name", sorted(HAND))
def test_aggregation_matches_hand_computation(name):
    assert chain_scores([[0.0, 2.0, -1.0], [1.5]], name) == pytest.approx(HAND[name], abs=1e-12)


# ---------------------------------------------------------------- selection with known scores
def test_selection_picks_the_chain_with_known_best_score(tmp_path):
    # q0: mean_logit prefers chain 2 (mean 1.0), min prefers chain 0 (its worst step, 0.5, is the best worst step).
    # q1: chains 0 and 1 tie exactly; the lower index wins.
    path = write_candidates(tmp_path, [
        question("q0", [chain("1", 2), chain("2", 2), chain("3", 2)]),
        question("q1", [chain("5"), chain("6"), chain("7")]),
    ])
    table = {"q0": [[0.5, 0.6], [-3.0, 2.0], [3.0, -1.0]], "q1": [[0.7], [0.7], [-0.2]]}
    assert run(config(tmp_path, path), scorer=fixed_scorer(table)) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["aggregation"] == "mean_logit" and out["n"] == 3 and out["num_questions"] == 2
    q0, q1 = out["questions"]
    assert (q0["id"], q0["best_index"], q0["best_answer"]) == ("q0", 2, "3")
    assert q0["best_text"] == chain("3", 2)
    assert q0["chain_scores"] == pytest.approx([sig(0.55), sig(-0.5), sig(1.0)])
    assert q0["best_score"] == pytest.approx(sig(1.0))
    assert q0["step_scores"] == [pytest.approx([sig(x) for x in steps]) for steps in table["q0"]]
    assert q0["final_answers"] == ["1", "2", "3"] and q0["correct"] == [None, None, None]
    assert q0["best_correct"] is None
    assert q1["best_index"] == 0
    # Nothing labelled: no report.
    assert not (tmp_path / "out.report.json").exists()

    assert run(config(tmp_path, path, "--aggregation", "min"), scorer=fixed_scorer(table)) == 0
    assert json.loads((tmp_path / "out.json").read_text())["questions"][0]["best_index"] == 0


def test_best_index_ties_and_nan():
    assert best_index([0.2, 0.9, 0.9]) == 1
    assert best_index([float("nan"), 0.1]) == 1
    assert best_index([0.2, 0.9, 0.5], among=[0, 2]) == 2


def test_model_text_is_the_meta_record_text(tmp_path):
    """The prefixes scored for a candidate are those training builds for a meta record of
    ``question + "\\n\\n" + chain``: the question precedes "Step 1" in every prefix."""
    text = chain("2", 3)
    path = write_candidates(tmp_path, [question("q", [text])])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"input": "Question q?\n\n" + text, "image_path": "img.png", "true_false": True}]))
    prefixes = load_candidates(path)[0].candidates[0].prefixes
    assert prefixes == load_meta_records(meta)[0].prefixes
    assert len(prefixes) == 3 and all(p.startswith("Question q?\n\nStep 1:") for p in prefixes)
    assert "Final answer" not in prefixes[-1]


# ---------------------------------------------------------------- majority vote, oracle, report
def test_normalize_answer_and_majority_vote_ties():
    assert normalize_answer(" **Yes.** ") == "yes"
    assert normalize_answer("7.0") == normalize_answer("7") == "7"
    assert normalize_answer("$3.50$") == "3.5"
    assert majority_vote(["3", "4", "4", "3"]) == 0  # tie: the answer seen first wins
    assert majority_vote(["3", "4", "4", "3"], among=[1, 3]) == 1
    assert majority_vote(["No", "yes", "Yes."]) == 1
    assert majority_vote([None, None, "2"]) == 2  # chains without an answer do not vote
    assert majority_vote([None, None]) is None


LABELLED = [
    # q0: majority "3" is wrong, the PRM picks the right chain 2.
    question("q0", [chain("3"), chain("3"), chain("4"), chain("5")], ground_truth="4"),
    # q1: "yes" and "no" tie 2-2; "yes" comes first and is wrong. The PRM picks chain 0, wrong.
    question("q1", [chain("Yes"), chain("no"), chain("No."), chain("yes")], ground_truth="No"),
    # q2: labels, no ground truth; "7" and "7.0" agree and are right. The PRM picks chain 3, wrong.
    question("q2", [chain("7"), chain("7.0"), chain("8"), chain("9")], correct=[True, True, False, False]),
    # q3: only chain 2 has a final answer (and it is right); scores tie except chain 2's.
    question("q3", [chain(None), chain(None), chain("2"), chain(None)], ground_truth=2),
]
LABELLED_LOGITS = {"q0": [[0.1], [0.2], [0.9], [0.3]], "q1": [[0.5], [0.1], [0.2], [0.4]],
                   "q2": [[0.1], [0.2], [0.3], [0.9]], "q3": [[0.0], [0.0], [1.0], [0.0]]}


def test_report_majority_oracle_random_by_hand(tmp_path, capsys):
    path = write_candidates(tmp_path, LABELLED)
    report_path = tmp_path / "report.json"
    assert run(config(tmp_path, path, "--report", str(report_path)), scorer=fixed_scorer(LABELLED_LOGITS)) == 0
    report = json.loads(report_path.read_text())
    assert report["questions"] == 4 and report["skipped_unlabelled"] == 0 and report["n_max"] == 4
    by_n = {row["n"]: row for row in report["by_n"]}
    assert sorted(by_n) == [1, 2, 4]
    # N = 4. Correct chains: q0 {2}, q1 {1, 2}, q2 {0, 1}, q3 {2}.
    assert by_n[4]["prm"] == pytest.approx(2 / 4)  # q0, q3
    assert by_n[4]["majority"] == pytest.approx(2 / 4)  # q2, q3
    assert by_n[4]["random"] == pytest.approx((1 / 4 + 2 / 4 + 2 / 4 + 1 / 4) / 4)
    assert by_n[4]["oracle"] == 1.0
    # N = 1 (all 4 single chains): every method is a random pick.
    assert by_n[1]["subsets_per_question"] == 4
    for key in ("prm", "majority", "random", "oracle"):
        assert by_n[1][key] == pytest.approx(0.375)
    # N = 2: all 6 pairs. Oracle: 1 - C(wrong, 2) / 6.
    assert by_n[2]["subsets_per_question"] == 6
    assert by_n[2]["oracle"] == pytest.approx((3 / 6 + 5 / 6 + 5 / 6 + 3 / 6) / 4)
    assert by_n[2]["random"] == pytest.approx(0.375)
    assert by_n[2]["majority"] == pytest.approx((1 / 6 + 3 / 6 + 5 / 6 + 3 / 6) / 4)
    assert by_n[2]["prm"] == pytest.approx((3 / 6 + 1 / 6 + 1 / 6 + 3 / 6) / 4)
    assert report["agreement_at_n_max"] == {"same_answer": 2, "both_correct": 1, "prm_only_correct": 1,
                                            "majority_only_correct": 1, "both_wrong": 1}
    per_q = {p["id"]: p for p in report["per_question"]}
    assert [per_q[q]["majority_votes"] for q in ("q0", "q1", "q2", "q3")] == [2, 2, 2, 1]
    assert [per_q[q]["num_correct"] for q in ("q0", "q1", "q2", "q3")] == [1, 2, 2, 1]
    assert (per_q["q1"]["majority_index"], per_q["q1"]["majority_answer"]) == (0, "Yes")
    assert per_q["q3"]["majority_index"] == 2 and per_q["q3"]["majority_correct"] is True
    # The selection file carries the derived correctness.
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["questions"][1]["correct"] == [False, True, True, False]
    assert out["questions"][3]["correct"] == [False, False, True, False]
    printed = capsys.readouterr().out
    assert "majority" in printed and "oracle" in printed and "   4 " in printed


def test_subsets_are_seeded_and_questions_without_labels_are_left_out():
    assert subset_sizes(1) == [1] and subset_sizes(4) == [1, 2, 4] and subset_sizes(6) == [1, 2, 4, 6]
    draw = candidate_subsets(8, 3, subsamples=5, rng=random.Random("0:3:q"))
    assert draw == candidate_subsets(8, 3, subsamples=5, rng=random.Random("0:3:q"))
    assert len(draw) == 5 and all(len(set(s)) == 3 and list(s) == sorted(s) for s in draw)
    assert len(candidate_subsets(4, 2, subsamples=6, rng=random.Random(0))) == 6  # all of them

    labelled = Question("a", Path("x"), "?", tuple(Candidate(f"Step 1: {i}", ("?",), str(i), i == 0) for i in range(8)),
                        None, "f:record 0")
    unlabelled = Question("b", Path("x"), "?", tuple(Candidate("Step 1: 1", ("?",), "1", None) for _ in range(8)),
                          None, "f:record 1")
    logits = [[[float(i)] for i in range(8)]] * 2
    selections = select([labelled, unlabelled], logits, "mean_logit")
    one = evaluate([labelled, unlabelled], selections, seed=3, subsamples=4)
    assert one == evaluate([labelled, unlabelled], selections, seed=3, subsamples=4)
    assert one["questions"] == 1 and one["skipped_unlabelled"] == 1
    assert [r["subsets_per_question"] for r in one["by_n"]] == [4, 4, 4, 1]
    assert evaluate([unlabelled], selections[1:], seed=0, subsamples=4) is None


# ---------------------------------------------------------------- bad input
def test_bad_candidates_give_every_problem_at_once(tmp_path):
    records = [
        {**question("q0", [chain("1"), chain("2")]), "image_path": "missing.png"},
        question("q1", [chain("1"), "I think the answer is 2.\nFinal answer: 2"]),
        question("q2", [chain("1"), chain("2"), chain("3")]),
        {"id": "q3", "image_path": "img.png", "candidates": [{"text": chain("1"), "correct": "yes"}, {"text": 5}]},
        {"id": "q4", "image_path": "img.png", "question": "Q?", "candidates": "Step 1: a"},
        question("q0", [chain("1"), chain("2")]),
        "not an object",
    ]
    path = write_candidates(tmp_path, records)
    with pytest.raises(DataValidationError) as info:
        load_candidates(path)
    p = str(path)
    assert info.value.problems == [
        f"{p}:record 0: image_path: image file {tmp_path / 'missing.png'} does not exist",
        f"{p}:record 1: candidates[1]: text: no step markers ('Step 1:', 'Step 2:', ...) in the chain of thought",
        f"{p}:record 3: question: missing required field",
        f"{p}:record 3: candidates[0]: correct: expected boolean, found str",
        f"{p}:record 3: candidates[1]: text: expected string, found int",
        f"{p}:record 4: candidates: expected list, found str",
        f"{p}:record 6: record: must be a JSON object, found str",
        f"{p}:record 2: candidates: has 3 chains, but 4 questions have N = 2 (first: record 0); "
        "every question needs the same N",
        f"{p}:record 5: id: duplicate of {p}:record 0",
    ]


def test_bad_input_on_the_command_line_exits_2_and_writes_nothing(tmp_path, capsys):
    path = write_candidates(tmp_path, [question("q0", [chain("1")]), question("q1", [chain("1"), chain("2")])])
    out = tmp_path / "out.json"
    code = main(["--prm", str(tmp_path / "nowhere"), "--candidates", str(path), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "2 problem(s) in the input data" in err
    assert f"--prm {tmp_path / 'nowhere'}: no such directory" in err
    assert f"{path}:record 1: candidates: has 2 chains" in err
    assert not out.exists() and not out.with_suffix(".report.json").exists()
    # --report without labels or ground truth is a mistake caught before scoring.
    good = write_candidates(tmp_path, [question("q0", [chain("1")])], name="good.json")
    code = run(config(tmp_path, good, "--report", str(tmp_path / "r.json")), scorer=fixed_scorer({"q0": [[0.0]]}))
    assert code == EXIT_USER_ERROR and "nothing to evaluate" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_prm_directories(tmp_path):
    def problems_of(path):
        problems = []
        resolve_prm_dir(path, problems)
        return problems

    assert problems_of(tmp_path / "x") == [f"--prm {tmp_path / 'x'}: no such directory"]
    (tmp_path / "file").write_text("")
    assert "not a directory" in problems_of(tmp_path / "file")[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems_of(empty) == [f"--prm {empty}: prm_config.json is missing, so this is not an exported PRM "
                                  "(training writes one to runs/<run>/export)"]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert "a training run or checkpoint, not an exported PRM" in problems_of(run_dir)[0]
    export = tmp_path / "run2" / "export"
    export.mkdir(parents=True)
    for name in ("score_head.safetensors", "config.json", "model.safetensors"):
        (export / name).write_text("")
    (export / "prm_config.json").write_text(json.dumps({"head": "logits", "aggregation": "min"}))
    problems = []
    assert resolve_prm_dir(tmp_path / "run2", problems) == (export, {"head": "logits", "aggregation": "min"})
    assert problems == []  # a run folder stands for its export/
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prm_config.json").write_text("{not json")
    assert problems_of(broken) == [
        f"--prm {broken}: prm_config.json: invalid JSON (Expecting property name enclosed in double quotes "
        "at line 1 column 2)",
        f"--prm {broken}: score_head.safetensors is missing",
        f"--prm {broken}: config.json is missing",
        f"--prm {broken}: backbone weights are missing (expected model.safetensors or model.safetensors.index.json)",
    ]


def test_rank_slices_cover_the_questions_in_order():
    for num in range(7):
        for world in range(1, 5):
            parts = [list(range(num))[rank_slice(num, r, world)] for r in range(world)]
            assert sum(parts, []) == list(range(num))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---------------------------------------------------------------- end to end with a tiny exported PRM
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exported_prm(tmp_path_factory) -> Path:
    from dreamprm.model.loading import export_prm, load_backbone
    from dreamprm.model.prm import ProcessRewardModel
    from dreamprm.model.processor import load_processor
    from dreamprm.model.tiny import build_tiny_qwen2vl

    root = tmp_path_factory.mktemp("prm")
    tiny = build_tiny_qwen2vl(root / "tiny")
    torch.manual_seed(0)
    model = ProcessRewardModel(load_backbone(tiny), "logits")
    return export_prm(root / "export", model.state_dict(), model, load_processor(tiny),
                      {"base_model": "tiny", "aggregation": "mean", "domains": {}, "domain_weights": {}})


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HWLOC_COMPONENTS": "-gl", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
            "PYTHONPATH": str(REPO)}


def assert_same(a, b, path="$"):
    """Equal JSON, floats to 1e-6 (ranks batch the chains differently)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_scores_do_not_depend_on_batching(exported_prm):
    questions = load_candidates(DEMO_CANDIDATES)[:2]
    scorer = ModelScorer.from_export(exported_prm, torch.device("cpu"), batch_size=1, max_image_side=512)
    one = scorer(questions)
    scorer.batch_size = 5  # one forward pass holds chains of both questions
    many = scorer(questions)
    assert [[len(c) for c in q] for q in one] == [[len(c.prefixes) for c in q.candidates] for q in questions]
    assert_same(one, many)


def test_damaged_export_is_a_user_error(exported_prm, tmp_path):
    damaged = shutil.copytree(exported_prm, tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataValidationError, match=r"--prm .*damaged: cannot be loaded"):
        ModelScorer.from_export(damaged, torch.device("cpu"), batch_size=1, max_image_side=512)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_end_to_end_one_process_and_two_ranks(exported_prm, tmp_path):
    demo = json.loads(DEMO_CANDIDATES.read_text())
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    args = ["--prm", str(exported_prm), "--candidates", str(DEMO_CANDIDATES), "--batch_size", "7", "--device", "cpu"]
    commands = [[sys.executable, "-m", "dreamprm.bestofn", *args, "--output", str(single)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "launch/bestofn.py", *args, "--output", str(multi)]]
    with ThreadPoolExecutor(max_workers=2) as pool:  # one process and two ranks, at the same time
        done, done_multi = pool.map(lambda cmd: subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                                                               text=True, timeout=300), commands)
    assert done.returncode == 0, done.stderr
    assert "oracle" in done.stdout and f"selection written to {single}" in done.stdout

    out = json.loads(single.read_text())
    assert out["aggregation"] == "mean"  # from the export's prm_config.json
    assert out["num_questions"] == len(demo) and len(out["questions"]) == len(demo)
    for record, q in zip(demo, out["questions"]):
        assert q["id"] == record["id"]
        assert len(q["chain_scores"]) == len(record["candidates"]) == out["n"]
        for cand, steps in zip(record["candidates"], q["step_scores"]):
            assert len(steps) == len(split_step_prefixes(record["question"] + "\n\n" + cand["text"]))
            assert all(0.0 < s < 1.0 for s in steps)
        assert q["chain_scores"] == pytest.approx([sum(s) / len(s) for s in q["step_scores"]])
        assert q["best_index"] == max(range(out["n"]), key=lambda i: (q["chain_scores"][i], -i))
        assert q["correct"] == [c["correct"] for c in record["candidates"]]
    report = json.loads(single.with_suffix(".report.json").read_text())
    assert [row["n"] for row in report["by_n"]] == subset_sizes(out["n"])
    fraction = sum(sum(c["correct"] for c in r["candidates"]) / len(r["candidates"]) for r in demo) / len(demo)
    assert report["by_n"][0]["random"] == pytest.approx(fraction)
    assert report["by_n"][-1]["oracle"] == pytest.approx(sum(any(c["correct"] for c in r["candidates"])
                                                             for r in demo) / len(demo))

    done = done_multi
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("selection written to") == 1  # rank 0 only
    multi_out = json.loads(multi.read_text())
    assert_same({**out, "questions": out["questions"]}, multi_out)
    assert_same(report, json.loads(multi.with_suffix(".report.json").read_text()))
