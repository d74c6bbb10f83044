"""Reading and validating DreamPRM's record files before any training starts.

Every problem is reported as ``FILE:record N: field: what is wrong`` (records counted from 0, as
the JSON list indexes them), all of them at once up to a cap, in one `DataValidationError`. The
validators that build those lines (`record_location`, `check_fields`, `check_step_markers`,
`resolve_image`, `check_duplicates`) are public: Best-of-N candidates (`dreamprm.bestofn`) use them.

Training records (lower level): ``input``, ``add``, ``image_path``, ``dataset``, ``accuracy``;
optional ``id``, ``sid``, ``ground_truth``, ``score``, ``times``. Model text: ``input + "\\n\\n" + add``.
Meta records (upper level): ``input`` (question + whole chain), ``image_path``, ``true_false``;
optional ``id`` and ``question_id`` (chains that answer one question share it: the pairwise meta
objective then compares them with each other). The chain is split into step prefixes by `dreamprm.data.steps`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image

from dreamprm.data.steps import split_step_prefixes

MAX_REPORTED_PROBLEMS = 50


class DataValidationError(ValueError):
    """Raised with every problem found in the inputs; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        lines = shown + ([f"... and {more} more problems"] if more > 0 else [])
        super().__init__(f"{len(self.problems)} problem(s) in the input data:\n" + "\n".join(lines))


@dataclass(frozen=True)
class TrainRecord:
    text: str
    image_path: Path
    domain: str
    accuracy: float
    chain_id: str | None
    step_index: int | None
    source: str  # "FILE:record N", for messages
    # `input`, for grouping a chain's records (prefix packing); `text` already holds it, so it takes
    # no part in equality.
    question: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class MetaRecord:
    prefixes: tuple[str, ...]
    image_path: Path
    label: float
    chain_id: str | None
    source: str
    question_id: str | None = None  # chains of one question share it (`dreamprm.losses.meta_pairs`)


def read_json_records(path: str | Path, problems: list[str]) -> list[Any]:
    """A JSON list, or JSON Lines (one object per line). Problems are appended, not raised."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not an error
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{path}: file: cannot be read ({err.__class__.__name__}: {err})")
        return []
    if path.suffix != ".jsonl":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            # Several objects, one per line: JSON Lines in a file not named .jsonl.
            if not (err.msg == "Extra data" and raw.lstrip().startswith("{")):
                problems.append(f"{path}: json: invalid JSON ({err.msg} at line {err.lineno} column {err.colno})")
                return []
        else:
            if not isinstance(data, list):
                problems.append(f"{path}: json: the top level must be a list of records, found {type(data).__name__}")
                return []
            return data
    records = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            problems.append(f"{path}:line {line_no}: json: invalid JSON ({err.msg} at column {err.colno})")
    return records


class ImageChecker:
    """Opens each image once (header and decode check) and remembers the verdict."""

    def __init__(self) -> None:
        self._verdicts: dict[Path, str | None] = {}

    def problem(self, path: Path) -> str | None:
        if path not in self._verdicts:
            self._verdicts[path] = _image_problem(path)
        return self._verdicts[path]


def _image_problem(path: Path) -> str | None:
    if not path.exists():
        return f"image file {path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    if path.stat().st_size == 0:
        return f"image file {path} is empty (0 bytes)"
    try:
        with Image.open(path) as image:
            image.verify()  # chunk checksums, but no decoding: a truncated JPEG passes
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reading every byte
            image.load()
    except Exception as err:  # PIL raises many types for broken files
        return f"{path} is not a readable image ({err.__class__.__name__}: {err})"
    return None


def load_image(path: Path, max_side: int = 512) -> Image.Image:
    """RGB image with its longest side capped at `max_side` (aspect ratio kept)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def record_location(path: str | Path, index: int) -> str:
    """``FILE:record N``: how every problem names a record (N counted from 0)."""
    return f"{path}:record {index}"


def check_fields(record: Any, where: str, spec: dict[str, tuple[type | tuple[type, ...], bool]],
                 problems: list[str]) -> bool:
    """Type-check the fields in `spec` (name -> (types, required)); False when unusable."""
    if not isinstance(record, dict):
        problems.append(f"{where}: record: must be a JSON object, found {type(record).__name__}")
        return False
    ok = True
    for name, (types, required) in spec.items():
        if name not in record or record[name] is None:
            if required:
                problems.append(f"{where}: {name}: missing required field")
                ok = False
            continue
        value = record[name]
        # bool is an int subclass in Python; a JSON true is never a number here.
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            problems.append(f"{where}: {name}: expected {_type_names(types)}, found bool")
            ok = False
        elif not isinstance(value, types):
            problems.append(f"{where}: {name}: expected {_type_names(types)}, found {type(value).__name__}")
            ok = False
    return ok


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in seq))


_NUMBER = (int, float)
_TRAIN_FIELDS = {
    "input": (str, True), "add": (str, True), "image_path": (str, True), "dataset": (str, True),
    "accuracy": (_NUMBER, True), "id": ((str, int), False), "sid": (int, False),
    "ground_truth": ((str, int, float), False), "score": (_NUMBER, False), "times": (_NUMBER, False),
}
_META_FIELDS = {"input": (str, True), "image_path": (str, True), "true_false": (bool, True), "id": ((str, int), False),
                "question_id": ((str, int), False)}


def check_step_markers(text: str, where: str, field: str, problems: list[str]) -> list[str]:
    """The step prefixes of a chain of thought; none (and a problem) when it has no step markers."""
    prefixes = split_step_prefixes(text)
    if not prefixes:
        problems.append(f"{where}: {field}: no step markers ('Step 1:', 'Step 2:', ...) in the chain of thought")
    return prefixes


def resolve_image(record: dict, where: str, root: Path, images: ImageChecker, problems: list[str]) -> Path | None:
    """The record's ``image_path`` (relative to `root` unless absolute), checked; None after a problem."""
    path = Path(record["image_path"])
    if not record["image_path"].strip():
        problems.append(f"{where}: image_path: is empty")
        return None
    path = path if path.is_absolute() else root / path
    problem = images.problem(path)
    if problem:
        problems.append(f"{where}: image_path: {problem}")
        return None
    return path


def _load(path: str | Path, image_root: str | Path | None, build: Callable[..., Any],
          problems: list[str], images: ImageChecker) -> list[Any]:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out = []
    for index, record in enumerate(read_json_records(path, problems)):
        item = build(record, record_location(path, index), root, images, problems)
        if item is not None:
            out.append(item)
    return out


def _build_train(record: Any, where: str, root: Path, images: ImageChecker, problems: list[str]) -> TrainRecord | None:
    if not check_fields(record, where, _TRAIN_FIELDS, problems):
        return None
    ok = True
    accuracy = record["accuracy"]  # no float() yet: a huge JSON integer would overflow it
    if not (isinstance(accuracy, int) or math.isfinite(accuracy)) or not 0 <= accuracy <= 1:
        problems.append(f"{where}: accuracy: must be a number in [0, 1], found {record['accuracy']!r}")
        ok = False
    if not record["dataset"].strip():
        problems.append(f"{where}: dataset: the domain name is empty")
        ok = False
    if not (record["input"] + record["add"]).strip():
        problems.append(f"{where}: input: the text (input + add) is empty")
        ok = False
    image = resolve_image(record, where, root, images, problems)
    if not ok or image is None:
        return None
    chain_id = record.get("id")
    return TrainRecord(text=record["input"] + "\n\n" + record["add"], image_path=image, domain=record["dataset"],
                       accuracy=float(accuracy), chain_id=None if chain_id is None else str(chain_id),
                       step_index=record.get("sid"), source=where, question=record["input"])


def _build_meta(record: Any, where: str, root: Path, images: ImageChecker, problems: list[str]) -> MetaRecord | None:
    if not check_fields(record, where, _META_FIELDS, problems):
        return None
    prefixes = check_step_markers(record["input"], where, "input", problems)
    image = resolve_image(record, where, root, images, problems)
    if not prefixes or image is None:
        return None
    chain_id, question_id = record.get("id"), record.get("question_id")
    return MetaRecord(prefixes=tuple(prefixes), image_path=image, label=float(record["true_false"]),
                      chain_id=None if chain_id is None else str(chain_id), source=where,
                      question_id=None if question_id is None else str(question_id))


def check_duplicates(items: Iterable[tuple[Any, str]], field: str, problems: list[str]) -> None:
    """``WHERE: field: duplicate of FIRST`` for every repeated key of (key, where) pairs; None keys are skipped."""
    first_seen: dict[Any, str] = {}
    for key, where in items:
        if key is None:
            continue
        if key in first_seen:
            problems.append(f"{where}: {field}: duplicate of {first_seen[key]}")
        else:
            first_seen[key] = where


def load_train_records(path: str | Path, image_root: str | Path | None = None, *,
                       problems: list[str] | None = None, images: ImageChecker | None = None) -> list[TrainRecord]:
    """Training records of one file. Pass `problems` to collect instead of raising."""
    collect = problems is not None
    problems = [] if problems is None else problems
    records = _load(path, image_root, _build_train, problems, images or ImageChecker())
    # Records of one chain share an `id`; the pair (id, sid) names one step prefix.
    check_duplicates((((r.chain_id, r.step_index) if r.step_index is not None else None, r.source)
                       for r in records if r.chain_id is not None), "sid", problems)
    if not records and not problems:
        problems.append(f"{path}: file: contains no records")
    if problems and not collect:
        raise DataValidationError(problems)
    return records


def load_meta_records(path: str | Path, image_root: str | Path | None = None, *,
                      problems: list[str] | None = None, images: ImageChecker | None = None) -> list[MetaRecord]:
    """Meta records of one file. Pass `problems` to collect instead of raising."""
    collect = problems is not None
    problems = [] if problems is None else problems
    records = _load(path, image_root, _build_meta, problems, images or ImageChecker())
    check_duplicates(((r.chain_id, r.source) for r in records), "id", problems)
    if not records and not problems:
        problems.append(f"{path}: file: contains no records")
    if problems and not collect:
        raise DataValidationError(problems)
    return records


def domain_index(records: Iterable[TrainRecord]) -> dict[str, int]:
    """Domains map to indices by sorted name, as the original does."""
    return {name: i for i, name in enumerate(sorted({r.domain for r in records}))}
