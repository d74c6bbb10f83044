"""--skip_invalid_records: train on the valid records of a file that also holds invalid ones, and
say which were left out and why (the original release's meta.json holds 371 bare questions)."""
from __future__ import annotations

import json

import pytest

from conftest import DEMO, run_trains, small_run_args
from dreamprm.preflight import reason_counts, split_record_problems


def test_record_problems_are_grouped_per_record_and_file_problems_stay_fatal():
    problems = ["m.json:record 3: input: no step markers ('Step 1:', 'Step 2:', ...) in the chain of thought",
                "m.json:record 3: image_path: file not found: x.png",
                "t.json:record 9: accuracy: must be a number in [0, 1], found 1.5",
                "t.json:line 4: json: invalid JSON (Expecting value at column 1)",
                "t.json: file: contains no records"]
    fatal, skipped = split_record_problems(problems)
    assert fatal == ["t.json: file: contains no records"]
    assert skipped == [
        {"file": "m.json", "record": 3, "reasons": [problems[0].split(": ", 1)[1], "image_path: file not found: x.png"]},
        {"file": "t.json", "record": 9, "reasons": ["accuracy: must be a number in [0, 1], found 1.5"]},
        {"file": "t.json", "line": 4, "reasons": ["json: invalid JSON (Expecting value at column 1)"]}]
    assert reason_counts(skipped) == {"input: no step markers": 1, "image_path: file not found": 1,
                                      "accuracy: must be a number in [0, 1]": 1, "json: invalid JSON": 1}


def _meta_with_bare_questions(path, bare: int):
    """The demo's meta chains followed by `bare` questions without a chain, as in the original release."""
    meta = json.loads((DEMO / "meta.json").read_text())
    extra = [{"id": 1000 + i, "input": "How many red squares are there?", "image_path": meta[0]["image_path"],
              "true_false": bool(i % 2)} for i in range(bare)]
    path.write_text(json.dumps(meta + extra))
    return len(meta)


@pytest.mark.slow
def test_invalid_records_are_refused_by_default_and_skipped_and_listed_on_request(tiny_model, tmp_path):
    meta_file = tmp_path / "meta.json"
    valid = _meta_with_bare_questions(meta_file, 5)
    def args(out):
        return small_run_args(tiny_model, out, "--meta_json_file", str(meta_file), "--image_root", str(DEMO),
                              "--iteration_num", "2", "--unroll_steps", "2", "--batch_size", "2", "--meta_batch_size",
                              "2", "--no-export")

    # Both at once, each in its own folder.
    refused, proc = run_trains([{"args": args(tmp_path / "refused"), "check": False},
                                {"args": args(tmp_path / "run") + ["--skip_invalid_records"]}])
    assert refused.returncode == 2
    assert f"{meta_file}:record {valid}: input: no step markers" in refused.stderr
    assert "5 problems, nothing was started or written" in refused.stderr

    assert "--skip_invalid_records: 5 record(s) left out" in proc.stdout
    assert "     5  input: no step markers" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "skipped_records.jsonl").read_text().splitlines()]
    assert [x["record"] for x in lines] == list(range(valid, valid + 5))
    assert all(x["file"] == str(meta_file) and x["reasons"][0].startswith("input: no step markers") for x in lines)
    assert "done at step 2" in proc.stdout
