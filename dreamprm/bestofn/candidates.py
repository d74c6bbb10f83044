"""The candidates file: N chains of thought per question, validated before anything is scored.

A question is ``id`` (optional), ``image_path``, ``question``, ``candidates`` (N objects with
``text`` and an optional ``correct``) and an optional ``ground_truth`` (format: data/README.md).
Every problem is one ``FILE:record N: field: what is wrong`` line, built by the validators that
training records use (`dreamprm.data.records`); all of them are reported at once.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamprm.data.records import (DataValidationError, ImageChecker, check_duplicates, check_fields,
                                   check_step_markers, read_json_records, record_location, resolve_image)
from dreamprm.data.steps import final_answer, split_step_prefixes


@dataclass(frozen=True)
class Candidate:
    text: str
    prefixes: tuple[str, ...]  # model texts: question + "\n\n" + chain, cut at the step markers
    answer: str | None  # `final_answer(text)`
    correct: bool | None  # the `correct` label, else answer == ground_truth, else unknown


@dataclass(frozen=True)
class Question:
    qid: str
    image_path: Path
    question: str
    candidates: tuple[Candidate, ...]
    ground_truth: str | None
    source: str  # "FILE:record N", for messages

    @property
    def evaluable(self) -> bool:
        return all(c.correct is not None for c in self.candidates)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def normalize_answer(answer: str) -> str:
    """The form answers are compared in: case-folded, whitespace collapsed, surrounding ``$``/``**``
    and a trailing period dropped, numbers canonical (``"3.0"`` -> ``"3"``).

    >>> normalize_answer(" **Yes.** "), normalize_answer("$3.50$"), normalize_answer("7")
    ('yes', '3.5', '7')
    """
    text = " ".join(answer.split()).casefold()
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("*$").strip().rstrip(".").strip()
    if _NUMBER.fullmatch(text):
        value = float(text)
        if math.isfinite(value):
            return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)
    return text


_QUESTION_FIELDS = {"id": ((str, int), False), "image_path": (str, True), "question": (str, True),
                    "candidates": (list, True), "ground_truth": ((str, int, float), False)}
_CANDIDATE_FIELDS = {"text": (str, True), "correct": (bool, False)}


def _build_question(record: Any, where: str, index: int, root: Path, images: ImageChecker,
                    problems: list[str]) -> Question | None:
    ok = check_fields(record, where, _QUESTION_FIELDS, problems)
    if not isinstance(record, dict):
        return None
    # Whatever is usable is checked further even when another field is bad: all problems at once.
    text = record.get("question") if isinstance(record.get("question"), str) else None
    chains = record.get("candidates") if isinstance(record.get("candidates"), list) else []
    if text is not None and not text.strip():
        problems.append(f"{where}: question: is empty")
        ok = False
    if isinstance(record.get("candidates"), list) and not chains:
        problems.append(f"{where}: candidates: is empty (each question needs N >= 1 chains)")
        ok = False
    truth = None if record.get("ground_truth") is None else str(record["ground_truth"])
    candidates = []
    for j, raw in enumerate(chains):
        at = f"{where}: candidates[{j}]"
        if not check_fields(raw, at, _CANDIDATE_FIELDS, problems):
            ok = False
            continue
        if not check_step_markers(raw["text"], at, "text", problems):
            ok = False
            continue
        if not ok:
            continue
        # The meta-record text: the question comes before "Step 1" and belongs to every prefix.
        prefixes = tuple(split_step_prefixes(text + "\n\n" + raw["text"]))
        answer = final_answer(raw["text"])
        if raw.get("correct") is not None:
            correct = raw["correct"]
        elif truth is not None:
            correct = answer is not None and normalize_answer(answer) == normalize_answer(truth)
        else:
            correct = None
        candidates.append(Candidate(text=raw["text"], prefixes=prefixes, answer=answer, correct=correct))
    has_path = isinstance(record.get("image_path"), str)
    image = resolve_image(record, where, root, images, problems) if has_path else None
    if not ok or image is None:
        return None
    qid = record.get("id")
    return Question(qid=str(index) if qid is None else str(qid), image_path=image, question=text,
                    candidates=tuple(candidates), ground_truth=truth, source=where)


def load_candidates(path: str | Path, image_root: str | Path | None = None, *, problems: list[str] | None = None,
                    images: ImageChecker | None = None) -> list[Question]:
    """Questions of a candidates file, validated. Pass `problems` to collect instead of raising."""
    collect = problems is not None
    problems = [] if problems is None else problems
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    images = images or ImageChecker()
    records = read_json_records(path, problems)
    questions = []
    for index, record in enumerate(records):
        question = _build_question(record, record_location(path, index), index, root, images, problems)
        if question is not None:
            questions.append(question)
    _check_same_n(path, records, problems)
    # Over the records, not the questions built: a duplicate of a broken record is still a duplicate.
    ids = [(str(r["id"]), record_location(path, i)) for i, r in enumerate(records)
           if isinstance(r, dict) and isinstance(r.get("id"), (str, int))]
    check_duplicates(ids, "id", problems)
    if not records and not problems:
        problems.append(f"{path}: file: contains no records")
    if problems and not collect:
        raise DataValidationError(problems)
    return questions


def _check_same_n(path: Path, records: list[Any], problems: list[str]) -> None:
    """Every question needs the same N; the odd ones out are named against the most common N."""
    sizes = {i: len(r["candidates"]) for i, r in enumerate(records)
             if isinstance(r, dict) and isinstance(r.get("candidates"), list) and r["candidates"]}
    if len(set(sizes.values())) <= 1:
        return
    counts = Counter(sizes.values())
    # The most common N; on a tie, the N of the earliest record.
    usual = max(counts, key=lambda n: (counts[n], -min(i for i, k in sizes.items() if k == n)))
    first = min(i for i, k in sizes.items() if k == usual)
    for i, n in sizes.items():
        if n != usual:
            problems.append(f"{record_location(path, i)}: candidates: has {n} chains, but {counts[usual]} questions "
                            f"have N = {usual} (first: record {first}); every question needs the same N")
