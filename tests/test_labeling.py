"""dreamprm-label in process: verifiers on real answer forms, step splitting, questions validation,
shards and resume files, merge, the VisualPRM importer, the adaptive budget, and the transformers
engine on the tiny model (seeded, reproducible). End to end and kill-and-resume: test_labeling_e2e.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DEMO
from dreamprm.config import ConfigError
from dreamprm.data.records import DataValidationError, load_meta_records, load_train_records
from dreamprm.labeling.chains import Chain, parse_answer, split_chain
from dreamprm.labeling.engines import Completion, Prompt, Sampling
from dreamprm.labeling.merge import balance_meta, merge
from dreamprm.labeling.montecarlo import LabelSettings, label_question
from dreamprm.labeling.questions import load_questions
from dreamprm.labeling.run import main
from dreamprm.labeling.shards import ShardWriter, in_shard, parse_shard, read_shard
from dreamprm.labeling.verify import get_verifier, read_number, verify_auto, verify_choice, verify_math, verify_number
from dreamprm.labeling.visualprm import import_visualprm

IMAGE = str(DEMO / "images" / "cand_000.png")


# ------------------------------------------------------------------------------------ verifiers
@pytest.mark.parametrize("answer, truth", [
    ("\\frac{1}{2}", "0.5"), ("1/2", "\\frac12"), ("$\\frac{3}{4}$", "3/4"), ("\\dfrac{7}{2}", "3.5"),
    ("x^2 + 1", "1 + x^2"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("\\boxed{12}", "12"), ("45^\\circ", "45"),
    ("\\{1, 2\\}", "\\{2, 1\\}"), ("2\\pi", "2 \\pi"),
])
def test_math_verifier_accepts_equal_forms(answer, truth):
    assert verify_math(answer, truth) and verify_auto(answer, truth)


@pytest.mark.parametrize("answer, truth", [("\\frac{1}{3}", "0.5"), ("x^2 - 1", "x^2 + 1"), ("13", "12"), (None, "1")])
def test_math_verifier_rejects_different_values(answer, truth):
    assert not verify_math(answer, truth) and not verify_auto(answer, truth)


@pytest.mark.parametrize("answer, truth", [
    ("1,234", "1234"), ("1,234.5", "1234.50"), ("12 cm", "12"), ("12cm", "12 cm"), ("45%", "0.45"),
    ("3/4", "0.75"), ("$7$", "7.0"), ("-2", "-2.00001"),
])
def test_number_verifier_reads_commas_units_fractions_percent(answer, truth):
    assert verify_number(answer, truth) and verify_auto(answer, truth)


def test_number_verifier_tolerance_and_lists():
    assert not verify_number("1,2", "12")  # a list, not a thousands separator
    assert read_number("1,2") is None and read_number("x + 1") is None
    assert not get_verifier("number", 1e-4)("3.2", "3")
    assert get_verifier("number", 0.1)("3.2", "3")


@pytest.mark.parametrize("answer, truth, choices, right", [
    ("B", "B", ("red", "blue", "green"), True), ("(b)", "B", ("red", "blue", "green"), True),
    ("B. blue", "B", ("red", "blue", "green"), True), ("blue", "B", ("red", "blue", "green"), True),
    ("Blue.", "blue", ("red", "blue", "green"), True), ("**C**", "C", ("1", "2", "3"), True),
    ("A", "B", ("red", "blue", "green"), False), ("B. red", "B", ("red", "blue", "green"), False),
    ("green", "B", ("red", "blue", "green"), False), ("D", "D", ("red", "blue"), False),
])
def test_choice_verifier_letters_and_option_texts(answer, truth, choices, right):
    assert verify_choice(answer, truth, choices) is right
    assert verify_auto(answer, truth, choices) is right


def test_unknown_verifier_is_named():
    with pytest.raises(KeyError, match="unknown verifier 'judge'"):
        get_verifier("judge")


# ------------------------------------------------------------------------------------ chains
def test_step_rule_splits_renumbers_and_reads_the_answer():
    chain = split_chain("Let me look. Step 1: two red.\nStep 2: one more, 2 + 1 = 3.\nFinal answer: **3**", "step")
    assert chain == Chain(steps=("Let me look. two red.", "one more, 2 + 1 = 3."), answer="3")
    assert chain.text() == "Step 1: Let me look. two red.\nStep 2: one more, 2 + 1 = 3.\nFinal answer: 3"


def test_blank_rule_and_chains_without_markers():
    chain = split_chain("I count two.\n\nThen one more.\n \nFinal answer: 3", "blank")
    assert chain.steps == ("I count two.", "Then one more.") and chain.answer == "3"
    lone = split_chain("no format at all", "step")
    assert lone.steps == ("no format at all",) and lone.answer is None
    assert lone.text() == "Step 1: no format at all"


def test_answers_from_boxed_when_no_final_answer_line():
    assert parse_answer("so the area is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert parse_answer("Final answer: 7\nmore text") == "7"
    assert parse_answer("nothing here") is None


# ------------------------------------------------------------------------------------ questions
def write_questions(path: Path, records: list) -> Path:
    """JSON Lines for .jsonl, a JSON list otherwise: the two forms a questions file may take."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if path.suffix == ".jsonl" else json.dumps(records))
    return path


def question(i: int, split: str = "train", **extra) -> dict:
    return {"id": f"q{i}", "question": "How many red shapes?", "image_path": IMAGE, "ground_truth": "3",
            "dataset": "count", "split": split, **extra}


def test_questions_problems_name_file_record_and_field(tmp_path):
    bad = [question(0), {**question(1), "ground_truth": None}, {**question(2), "image_path": "missing.png"},
           {**question(3), "choices": ["a", 3]}, {**question(4), "split": "dev"}, question(0),
           {**question(6), "dataset": " "}, "not an object"]
    path = write_questions(tmp_path / "q.jsonl", bad)
    with pytest.raises(DataValidationError) as err:
        load_questions(path)
    lines = err.value.problems
    assert f"{path}:record 1: ground_truth: missing required field" in lines
    assert any(line.startswith(f"{path}:record 2: image_path: image file") for line in lines)
    assert f"{path}:record 3: choices[1]: expected a non-empty string, found 3" in lines
    assert any(line.startswith(f"{path}:record 4: split: must be one of train, meta, test") for line in lines)
    assert f"{path}:record 5: id: duplicate of {path}:record 0" in lines
    assert f"{path}:record 6: dataset: is empty" in lines
    assert f"{path}:record 7: record: must be a JSON object, found str" in lines
    assert len(lines) == 7


def test_bad_questions_exit_2_and_write_nothing(tmp_path, capsys):
    path = write_questions(tmp_path / "q.json", [question(0), {**question(1), "question": 5}])
    out = tmp_path / "out"
    code = main(["--questions", str(path), "--policy", str(tmp_path), "--out", str(out)])
    assert code == 2
    assert f"{path}:record 1: question: expected string, found int" in capsys.readouterr().err
    assert not out.exists()


def test_missing_policy_exits_2_before_writing(tmp_path, capsys):
    path = write_questions(tmp_path / "q.json", [question(0)])
    code = main(["--questions", str(path), "--policy", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert code == 2 and "--policy" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_vllm_engine_without_vllm_names_the_extra(tiny_model, tmp_path, capsys):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    path = write_questions(tmp_path / "q.json", [question(0)])
    code = main(["--questions", str(path), "--policy", str(tiny_model), "--out", str(tmp_path / "out"),
                 "--engine", "vllm"])
    assert code == 2 and "pip install '.[vllm]'" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ shards
def test_shards_split_every_id_once():
    ids = [f"q{i}" for i in range(500)]
    owners = [[s for s in range(4) if in_shard(q, s, 4)] for q in ids]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o == [s] for o in owners) for s in range(4)]
    assert min(sizes) > 90, sizes  # ~125 each
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_torn_tail_is_cut_and_settings_are_checked(tmp_path):
    path = tmp_path / "shard-00000-of-00001.jsonl"
    writer = ShardWriter(path, {"seed": 0}, questions=3)
    writer.add("a", [("train", {"x": 1})])
    writer.close()
    complete = path.read_bytes()
    # A process killed mid-question: one record of "b" written, then half a line.
    path.write_bytes(complete + b'{"kind": "train", "qid": "b", "record": {"x": 2}, "type": "record"}\n{"kind": "tr')
    header, lines, end = read_shard(path)
    assert end == len(complete) and [item["qid"] for item in lines] == ["a", "a"]
    again = ShardWriter(path, {"seed": 0}, questions=3)
    assert again.done == {"a"} and path.read_bytes() == complete
    again.add("b", [("train", {"x": 2})])
    again.close()
    assert [item["qid"] for item in read_shard(path)[1]] == ["a", "a", "b", "b"]
    with pytest.raises(ConfigError, match="seed: 0 in the file, 1 now"):
        ShardWriter(path, {"seed": 1}, questions=3)


# ------------------------------------------------------------------------------------ merge
def shard_files(out: Path, count: int, kinds: dict[str, list[tuple[str, dict]]]) -> None:
    writers = [ShardWriter(out / f"shard-{i:05d}-of-{count:05d}.jsonl", {"seed": 0, "shard": f"{i}/{count}"},
                           sum(in_shard(q, i, count) for q in kinds)) for i in range(count)]
    for qid, records in kinds.items():
        writers[next(i for i in range(count) if in_shard(qid, i, count))].add(qid, records)
    for w in writers:
        w.close()


def meta_record(qid: str, c: int, right: bool, domain: str = "d") -> dict:
    return {"id": f"{qid}-{c}", "input": f"Q?\n\nStep 1: x\nFinal answer: {int(right)}", "image_path": IMAGE,
            "dataset": domain, "true_false": right}


def test_merge_does_not_depend_on_the_shard_count(tmp_path):
    kinds = {f"q{i}": [("meta", meta_record(f"q{i}", 0, i % 3 == 0)), ("meta", meta_record(f"q{i}", 1, False))]
             for i in range(12)}
    for count in (1, 3):
        shard_files(tmp_path / f"s{count}", count, kinds)
        assert merge(tmp_path / f"s{count}", tmp_path / f"m{count}") == {"meta.json": 24}
    assert (tmp_path / "m1" / "meta.json").read_text() == (tmp_path / "m3" / "meta.json").read_text()
    records = load_meta_records(tmp_path / "m1" / "meta.json")  # loads as training's meta set
    assert [r.chain_id for r in records][:3] == ["q0-0", "q0-1", "q1-0"]


def test_merge_refuses_unfinished_shards(tmp_path):
    kinds = {f"q{i}": [("meta", meta_record(f"q{i}", 0, True))] for i in range(6)}
    shard_files(tmp_path / "s", 2, kinds)
    (tmp_path / "s" / "shard-00001-of-00002.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"shards \[1\] of 2 have not started"):
        merge(tmp_path / "s", tmp_path / "m")
    assert not (tmp_path / "m" / "meta.json").exists()
    assert merge(tmp_path / "s", tmp_path / "m", allow_partial=True)["meta.json"] < 6


def test_balance_meta_per_domain():
    meta = ([meta_record(f"a{i}", 0, i < 2, "a") for i in range(10)] + [meta_record(f"b{i}", 0, i < 7, "b") for i in range(9)]
            + [meta_record(f"c{i}", 0, True, "c") for i in range(3)])
    kept = balance_meta(meta, seed=0)
    count = {(d, v): sum(r["dataset"] == d and r["true_false"] is v for r in kept) for d in "abc" for v in (True, False)}
    assert count == {("a", True): 2, ("a", False): 2, ("b", True): 2, ("b", False): 2, ("c", True): 3, ("c", False): 0}
    assert kept == [r for r in meta if r in kept]  # order kept
    assert balance_meta(meta, seed=0) == kept and balance_meta(meta, seed=1) != kept


# ------------------------------------------------------------------------------------ VisualPRM-400K
def test_visualprm_import_writes_loadable_training_records(tmp_path):
    ann = tmp_path / "mavis_geo.jsonl"
    line = {"image": ["images/cand_000.png"], "question": "Find x.", "answer": "3", "response": "...",
            "steps_with_score": [{"step": "Look.", "score": 0.5625, "num_mc_correct": 9, "num_mc_total": 16},
                                 {"step": "So 3.", "score": 1.0, "num_mc_correct": 16, "num_mc_total": 16}]}
    ann.write_text(json.dumps(line) + "\n")
    out = tmp_path / "train.json"
    assert import_visualprm([ann], out, image_prefix=str(DEMO) + "/") == 2
    first, second = json.loads(out.read_text())
    assert first["add"] == "Step 1: Look." and second["add"] == "Step 1: Look.\nStep 2: So 3."
    assert (first["accuracy"], first["score"], first["times"], first["dataset"]) == (0.5625, 9, 16, "mavis_geo")
    records = load_train_records(out)
    assert [r.accuracy for r in records] == [0.5625, 1.0] and records[0].chain_id == records[1].chain_id


def test_visualprm_import_errors_name_line_and_field(tmp_path):
    ann = tmp_path / "src.jsonl"
    good = {"image": "a.png", "question": "Q", "answer": "1", "steps_with_score": [{"step": "s", "score": 1}]}
    ann.write_text("\n".join([json.dumps(good), json.dumps({**good, "steps_with_score": [{"step": "s", "score": 2}]}),
                              "{broken", json.dumps({**good, "question": None})]) + "\n")
    out = tmp_path / "train.json"
    with pytest.raises(DataValidationError) as err:
        import_visualprm([ann], out)
    assert err.value.problems == [
        f"{ann}:line 2: steps_with_score[0].score: expected a number in [0, 1], found 2",
        f"{ann}:line 3: json: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{ann}:line 4: question: missing or not a string"]
    assert not out.exists()


# ------------------------------------------------------------------------------------ Monte Carlo
class ScriptedPolicy:
    """A policy whose text is fixed by the prompt, for the budget arithmetic: a chain is two steps;
    rollouts from step 1 alternate right/wrong, from step 2 they are always right."""
    name = "scripted"

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def generate(self, prompts, n, sampling, seeds):
        self.calls.append((len(prompts), n))
        out = []
        for p in prompts:
            if p.prefix == "Step 1:":
                out.append([Completion(" look.\nStep 2: count.\nFinal answer: 3", 9)] * n)
            elif p.prefix.count("Step ") == 1:
                out.append([Completion(f"Final answer: {3 if j % 2 == 0 else 4}", 3) for j in range(n)])
            else:
                out.append([Completion("Final answer: 3", 3)] * n)
        return out

    def close(self):
        pass


def settings(**changes) -> LabelSettings:
    base = dict(chains=1, meta_chains=2, candidates=3, rollouts=2, max_rollouts=2, split_rule="step",
                instruction="", prefill="Step 1:", chain_sampling=Sampling(1.0, 1.0, 16),
                rollout_sampling=Sampling(1.0, 1.0, 16), seed=0)
    return LabelSettings(**{**base, **changes})


def test_adaptive_budget_samples_until_settled_or_capped(tmp_path):
    q = load_questions(write_questions(tmp_path / "q.json", [question(0)]))[0]
    policy = ScriptedPolicy()
    fixed = label_question(policy, q, settings(), get_verifier("auto")).records
    assert [(r["sid"], r["score"], r["times"], r["accuracy"]) for _, r in fixed] == [(1, 1, 2, 0.5), (2, 2, 2, 1.0)]
    policy = ScriptedPolicy()
    adaptive = label_question(policy, q, settings(max_rollouts=7), get_verifier("auto")).records
    # Step 1 stays at 0 < accuracy < 1: rounds of 2 until the cap (2+2+2+1); step 2 settles at 1.0 at once.
    assert [(r["sid"], r["score"], r["times"]) for _, r in adaptive] == [(1, 4, 7), (2, 2, 2)]
    assert policy.calls == [(1, 1), (2, 2), (1, 2), (1, 2), (1, 1)]
    record = adaptive[0][1]
    assert set(record) == {"id", "sid", "input", "add", "ground_truth", "image_path", "dataset", "score", "times",
                           "accuracy"}


def test_meta_and_candidates_records(tmp_path):
    qs = load_questions(write_questions(tmp_path / "q.json", [question(0, "meta"), question(1, "test", ground_truth="4")]))
    meta = label_question(ScriptedPolicy(), qs[0], settings(), get_verifier("auto")).records
    assert [(k, r["true_false"]) for k, r in meta] == [("meta", True), ("meta", True)]
    assert meta[0][1]["input"] == "How many red shapes?\n\nStep 1: look.\nStep 2: count.\nFinal answer: 3"
    [(kind, cands)] = label_question(ScriptedPolicy(), qs[1], settings(), get_verifier("auto")).records
    assert kind == "candidates" and [c["correct"] for c in cands["candidates"]] == [False] * 3


# ------------------------------------------------------------------------------------ the real engine
def test_transformers_engine_is_seeded_per_prompt(tiny_model):
    from dreamprm.labeling.engines import build_engine
    engine = build_engine("transformers", tiny_model)
    prompt = Prompt("How many red shapes?", Path(IMAGE), "Step 1:")
    sampling = Sampling(1.0, 0.95, 8)
    both = engine.generate([prompt, prompt], 3, sampling, [1, 2])
    alone = engine.generate([prompt], 3, sampling, [1])
    assert alone[0] == both[0] != both[1]
    assert len({c.text for c in both[0]}) > 1  # n samples, not n copies
    assert all(1 <= c.tokens <= 8 for c in both[0])
