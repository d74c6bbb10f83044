"""``dreamprm-label import-visualprm``: VisualPRM-400K's Monte Carlo annotations -> ``train.json``.

VisualPRM400K-Raw (and -v1.1-Raw), the data DreamPRM-1.5 trained on, ships one JSONL per source
(``annotations/<source>.jsonl``); a line is one sampled response already cut into steps:

    {"image": "path" or ["path"], "question": ..., "answer": ground truth, "response": ...,
     "steps_with_score": [{"step": ..., "score": 0.5625, "num_mc_correct": 9, "num_mc_total": 16}, ...]}

Each step becomes one training record: ``add`` = the steps up to it as "Step n: ...",
``accuracy`` = ``score``, ``score`` = ``num_mc_correct``, ``times`` = ``num_mc_total``, ``dataset``
= the file's name (the source, e.g. ``mavis_geo``): one domain per source. Problems are reported
as ``FILE:line N: field: ...``, all at once, and nothing is written then.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from dreamprm.data.records import DataValidationError
from dreamprm.labeling.chains import render_steps
from dreamprm.labeling.merge import write_json_atomic


def _step_problems(step: object, where: str) -> list[str]:
    if not isinstance(step, dict):
        return [f"{where}: expected an object, found {type(step).__name__}"]
    problems = []
    if not isinstance(step.get("step"), str):
        problems.append(f"{where}.step: expected a string")
    score = step.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or not 0 <= score <= 1:
        problems.append(f"{where}.score: expected a number in [0, 1], found {score!r}")
    for name in ("num_mc_correct", "num_mc_total"):
        if name in step and (isinstance(step[name], bool) or not isinstance(step[name], int)):
            problems.append(f"{where}.{name}: expected an integer, found {step[name]!r}")
    return problems


def convert_file(path: Path, image_prefix: str, problems: list[str]) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{path}: file: cannot be read ({err})")
        return out
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:line {n}"
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: json: invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(item, dict):
            problems.append(f"{where}: record: must be a JSON object")
            continue
        image = item.get("image")
        image = image[0] if isinstance(image, list) and image else image
        bad = [f"{where}: {name}: missing or not a string" for name, value in
               (("image", image), ("question", item.get("question"))) if not isinstance(value, str) or not value]
        steps = item.get("steps_with_score")
        if not isinstance(steps, list) or not steps:
            bad.append(f"{where}: steps_with_score: missing or empty")
            steps = []
        for j, step in enumerate(steps):
            bad += _step_problems(step, f"{where}: steps_with_score[{j}]")
        if bad:
            problems.extend(bad)
            continue
        bodies = [s["step"].strip() for s in steps]
        for sid, step in enumerate(steps, start=1):
            record = {"id": f"{path.stem}-{n}", "sid": sid, "input": item["question"],
                      "add": render_steps(bodies, sid), "image_path": image_prefix + image, "dataset": path.stem,
                      "accuracy": float(step["score"])}
            if item.get("answer") is not None:
                record["ground_truth"] = str(item["answer"])
            if "num_mc_correct" in step and "num_mc_total" in step:
                record["score"], record["times"] = step["num_mc_correct"], step["num_mc_total"]
            out.append(record)
    return out


def import_visualprm(files: list[Path], out: Path, image_prefix: str = "") -> int:
    """Convert annotation files into one training file `out`; returns the number of records."""
    problems: list[str] = []
    records = [r for path in files for r in convert_file(path, image_prefix, problems)]
    if not records and not problems:
        problems.append(f"{', '.join(map(str, files))}: no records")
    if problems:
        raise DataValidationError(problems)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, records)
    return len(records)
