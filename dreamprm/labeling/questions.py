"""The questions file that `dreamprm-label` reads, validated before any model is loaded.

One object per question (a JSON list or JSON Lines): ``id``, ``question``, ``image_path``,
``ground_truth``, ``dataset`` (the domain), optional ``choices`` (a list of option texts, lettered
A, B, ... in the prompt) and optional ``split`` (``train``: Monte Carlo step labels, ``meta``: whole
chains with a verdict, ``test``: Best-of-N candidates; default ``train``). Every problem is one
``FILE:record N: field: what is wrong`` line, all of them at once, as for the training files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamprm.data.records import (DataValidationError, ImageChecker, check_duplicates, check_fields,
                                   read_json_records, record_location, resolve_image)

SPLITS = ("train", "meta", "test")

_FIELDS = {"id": ((str, int), True), "question": (str, True), "image_path": (str, True),
           "ground_truth": ((str, int, float), True), "dataset": (str, True), "choices": (list, False),
           "split": (str, False)}


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    image_path: Path  # resolved and checked
    image_field: str  # as written in the file, for messages
    ground_truth: str
    dataset: str
    choices: tuple[str, ...]
    split: str
    source: str  # "FILE:record N"


def _build(record: Any, where: str, root: Path, images: ImageChecker, problems: list[str]) -> Question | None:
    if not check_fields(record, where, _FIELDS, problems):
        return None
    ok = True
    for name in ("question", "dataset"):
        if not record[name].strip():
            problems.append(f"{where}: {name}: is empty")
            ok = False
    if isinstance(record["id"], str) and not record["id"].strip():
        problems.append(f"{where}: id: is empty")
        ok = False
    truth = str(record["ground_truth"])
    if not truth.strip():
        problems.append(f"{where}: ground_truth: is empty")
        ok = False
    choices = record.get("choices") or []
    for j, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            problems.append(f"{where}: choices[{j}]: expected a non-empty string, found {choice!r}")
            ok = False
    if len(choices) > 26:
        problems.append(f"{where}: choices: at most 26 options (A-Z), found {len(choices)}")
        ok = False
    split = record.get("split") or "train"
    if split not in SPLITS:
        problems.append(f"{where}: split: must be one of {', '.join(SPLITS)}, found {split!r}")
        ok = False
    image = resolve_image(record, where, root, images, problems)
    if not ok or image is None:
        return None
    return Question(qid=str(record["id"]), question=record["question"], image_path=image,
                    image_field=record["image_path"], ground_truth=truth, dataset=record["dataset"],
                    choices=tuple(choices), split=split, source=where)


def load_questions(path: str | Path, image_root: str | Path | None = None) -> list[Question]:
    """All questions of a file, in file order; raises `DataValidationError` with every problem."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    problems: list[str] = []
    images = ImageChecker()
    records = read_json_records(path, problems)
    questions = [q for i, r in enumerate(records)
                 if (q := _build(r, record_location(path, i), root, images, problems)) is not None]
    # Over the raw records: a duplicate of a broken record is still a duplicate. Ids name the work
    # units of sharding and resume, so they must be unique.
    ids = [(str(r["id"]), record_location(path, i)) for i, r in enumerate(records)
           if isinstance(r, dict) and isinstance(r.get("id"), (str, int))]
    check_duplicates(ids, "id", problems)
    if not records and not problems:
        problems.append(f"{path}: file: contains no records")
    if problems:
        raise DataValidationError(problems)
    return questions
