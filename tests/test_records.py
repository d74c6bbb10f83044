"""Loading and validating record files (`dreamprm.data.records`).

Every bad input must give ``FILE:record N: field: what is wrong``, all problems at once up to a cap.
Records and images are built in tmp dirs; a few tests read the bundled demo.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from dreamprm.data import records as rec
from dreamprm.data.records import (MAX_REPORTED_PROBLEMS, DataValidationError, ImageChecker, MetaRecord, TrainRecord,
                                   domain_index, load_image, load_meta_records, load_train_records, read_json_records)

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"
CHAIN = "How many circles?\n\nStep 1: one red circle.\nStep 2: one blue circle, so 2.\nFinal answer: 2"


# ---------------------------------------------------------------- helpers
def make_image(path: Path, size=(8, 6), mode="RGB", fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (255, 0, 0), "RGBA": (0, 255, 0, 128), "L": 128, "P": 3, "1": 1, "I;16": 300}[mode]
    Image.new(mode, size, color).save(path, fmt)
    return path


def train_rec(**over):
    r = {"input": "How many circles?", "add": "Step 1: one red circle.", "image_path": "img.png",
         "dataset": "clean", "accuracy": 0.75}
    r.update(over)
    return {k: v for k, v in r.items() if v is not _DROP}


def meta_rec(**over):
    r = {"input": CHAIN, "image_path": "img.png", "true_false": True}
    r.update(over)
    return {k: v for k, v in r.items() if v is not _DROP}


_DROP = object()


def write_json(path: Path, records, jsonl=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture
def folder(tmp_path):
    make_image(tmp_path / "img.png")
    return tmp_path


def problems_of(fn, *args, **kw) -> list[str]:
    with pytest.raises(DataValidationError) as info:
        fn(*args, **kw)
    return info.value.problems


# ---------------------------------------------------------------- formats that load
FULL_TRAIN = {"input": "How many circles?", "add": "Step 1: one red circle.\nStep 2: so 1.",
              "image_path": "img.png", "dataset": "clean", "accuracy": 0.5, "id": "q-1", "sid": 2,
              "ground_truth": "1", "score": 0.25, "times": 16}
MIN_TRAIN = {"input": "How many circles?", "add": "Step 1: one.", "image_path": "img.png", "dataset": "clean",
             "accuracy": 1}


@pytest.mark.parametrize("jsonl", [False, True], ids=["json-list", "jsonl"])
def test_train_records_full_and_minimal_fields(folder, jsonl):
    path = write_json(folder / ("train.jsonl" if jsonl else "train.json"), [FULL_TRAIN, MIN_TRAIN], jsonl)
    full, minimal = load_train_records(path)
    assert full == TrainRecord(text="How many circles?\n\nStep 1: one red circle.\nStep 2: so 1.",
                               image_path=folder / "img.png", domain="clean", accuracy=0.5, chain_id="q-1",
                               step_index=2, source=f"{path}:record 0")
    assert minimal.text == "How many circles?\n\nStep 1: one."
    assert minimal.accuracy == 1.0 and isinstance(minimal.accuracy, float)
    assert minimal.chain_id is None and minimal.step_index is None
    assert minimal.source == f"{path}:record 1"


def test_train_optional_fields_may_be_null_and_ids_may_be_ints(folder):
    path = write_json(folder / "train.json", [train_rec(id=7, sid=1, ground_truth=None, score=None, times=None)])
    (r,) = load_train_records(path)
    assert r.chain_id == "7" and r.step_index == 1


@pytest.mark.parametrize("jsonl", [False, True], ids=["json-list", "jsonl"])
def test_meta_records_full_and_minimal_fields(folder, jsonl):
    path = write_json(folder / ("meta.jsonl" if jsonl else "meta.json"),
                      [meta_rec(id="m-1"), meta_rec(true_false=False)], jsonl)
    full, minimal = load_meta_records(path)
    assert full == MetaRecord(prefixes=("How many circles?\n\nStep 1: one red circle.",
                                        "How many circles?\n\nStep 1: one red circle.\nStep 2: one blue circle, so 2."),
                              image_path=folder / "img.png", label=1.0, chain_id="m-1", source=f"{path}:record 0")
    assert minimal.label == 0.0 and minimal.chain_id is None


def test_jsonl_with_blank_lines(folder):
    path = folder / "train.jsonl"
    path.write_text("\n" + json.dumps(train_rec()) + "\n\n   \n" + json.dumps(train_rec(accuracy=0.0)) + "\n")
    assert [r.accuracy for r in load_train_records(path)] == [0.75, 0.0]


def test_json_lines_in_a_file_named_json(folder):
    path = write_json(folder / "train.json", [train_rec(), train_rec(accuracy=0.25)], jsonl=True)
    assert [r.accuracy for r in load_train_records(path)] == [0.75, 0.25]


def test_utf8_byte_order_mark_is_accepted(folder):
    path = folder / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([train_rec(input="Combien de cercles ? é")]).encode())
    (r,) = load_train_records(path)
    assert r.text.startswith("Combien de cercles ? é")


def test_bundled_demo_loads():
    train = load_train_records(DEMO / "train.json")
    meta = load_meta_records(DEMO / "meta.json")
    assert len(train) >= 100 and len(meta) >= 20  # exact sizes belong to data/README.md
    assert domain_index(train) == {"clean": 0, "inverted": 1, "noisy_30": 2, "noisy_80": 3}
    assert all(len(m.prefixes) >= 2 for m in meta)
    assert all(r.image_path.is_file() for r in train + meta)


# ---------------------------------------------------------------- image paths
def test_image_path_relative_to_the_json_folder(tmp_path):
    make_image(tmp_path / "data" / "images" / "a.png")
    path = write_json(tmp_path / "data" / "train.json", [train_rec(image_path="images/a.png")])
    assert load_train_records(path)[0].image_path == tmp_path / "data" / "images" / "a.png"


def test_image_path_relative_to_explicit_image_root(tmp_path):
    make_image(tmp_path / "pics" / "images" / "a.png")
    path = write_json(tmp_path / "data" / "train.json", [train_rec(image_path="images/a.png")])
    meta = write_json(tmp_path / "data" / "meta.json", [meta_rec(image_path="images/a.png")])
    assert load_train_records(path, tmp_path / "pics")[0].image_path == tmp_path / "pics" / "images" / "a.png"
    assert load_meta_records(meta, str(tmp_path / "pics"))[0].image_path == tmp_path / "pics" / "images" / "a.png"
    # The JSON folder is not searched once an image root is given.
    problems = problems_of(load_train_records, path, tmp_path / "data")
    assert problems == [f"{path}:record 0: image_path: image file {tmp_path / 'data' / 'images' / 'a.png'} "
                        "does not exist"]


def test_absolute_image_path_ignores_the_root(tmp_path):
    image = make_image(tmp_path / "elsewhere" / "a.png")
    path = write_json(tmp_path / "data" / "train.json", [train_rec(image_path=str(image))])
    assert load_train_records(path)[0].image_path == image
    assert load_train_records(path, tmp_path / "nowhere")[0].image_path == image


# ---------------------------------------------------------------- domains
def test_domain_index_by_sorted_name(folder):
    names = ["noisy_80", "clean", "Zeta", "inverted", "clean", "alpha"]
    path = write_json(folder / "train.json", [train_rec(dataset=n) for n in names])
    assert domain_index(load_train_records(path)) == {"Zeta": 0, "alpha": 1, "clean": 2, "inverted": 3, "noisy_80": 4}


# ---------------------------------------------------------------- load_image
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1", "I;16"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    image = load_image(make_image(tmp_path / f"x.png", (10, 4), mode))
    assert image.mode == "RGB" and image.size == (10, 4)


def test_load_image_caps_the_longest_side_keeping_aspect(tmp_path):
    wide = load_image(make_image(tmp_path / "wide.png", (1024, 256)))
    assert wide.size == (512, 128)
    tall = load_image(make_image(tmp_path / "tall.jpg", (300, 900), fmt="JPEG"), max_side=300)
    assert tall.size == (100, 300) and tall.mode == "RGB"


def test_load_image_does_not_upscale(tmp_path):
    assert load_image(make_image(tmp_path / "s.png", (56, 40)), max_side=512).size == (56, 40)
    assert load_image(make_image(tmp_path / "e.png", (512, 100))).size == (512, 100)


def test_load_image_closes_the_file(tmp_path):
    path = make_image(tmp_path / "x.png")
    image = load_image(path)
    os.remove(path)  # the returned image is loaded, not lazily tied to the file
    assert image.getpixel((0, 0)) == (255, 0, 0)


# ---------------------------------------------------------------- bad inputs: one precise message each
def _bad_image(folder: Path, kind: str) -> str:
    target = folder / f"bad_{kind}.png"
    if kind == "not-an-image":
        target.write_text("this is text, not a PNG\n")
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated-png":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
        target.write_bytes(buf.getvalue()[:60])
    elif kind == "truncated-jpeg":
        target = folder / "bad.jpg"
        buf = io.BytesIO()
        Image.effect_noise((200, 120), 60).convert("RGB").save(buf, "JPEG")
        target.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, data cut
    elif kind == "directory":
        target.mkdir()
    return target.name


TRAIN_BAD = [
    # id, record overrides (or a callable of the folder), field, message fragment
    ("missing-input", dict(input=_DROP), "input", "missing required field"),
    ("missing-add", dict(add=_DROP), "add", "missing required field"),
    ("missing-image_path", dict(image_path=_DROP), "image_path", "missing required field"),
    ("missing-dataset", dict(dataset=_DROP), "dataset", "missing required field"),
    ("missing-accuracy", dict(accuracy=_DROP), "accuracy", "missing required field"),
    ("null-accuracy", dict(accuracy=None), "accuracy", "missing required field"),
    ("accuracy-string", dict(accuracy="0.5"), "accuracy", "expected integer or number, found str"),
    ("accuracy-bool", dict(accuracy=True), "accuracy", "expected integer or number, found bool"),
    ("accuracy-1.3", dict(accuracy=1.3), "accuracy", "must be a number in [0, 1], found 1.3"),
    ("accuracy-negative", dict(accuracy=-0.1), "accuracy", "must be a number in [0, 1], found -0.1"),
    ("accuracy-nan", dict(accuracy=float("nan")), "accuracy", "must be a number in [0, 1], found nan"),
    ("accuracy-inf", dict(accuracy=float("inf")), "accuracy", "must be a number in [0, 1], found inf"),
    ("accuracy-huge-int", dict(accuracy=10 ** 400), "accuracy", "must be a number in [0, 1], found 1000"),
    ("input-list", dict(input=["a"]), "input", "expected string, found list"),
    ("add-number", dict(add=3), "add", "expected string, found int"),
    ("dataset-number", dict(dataset=1), "dataset", "expected string, found int"),
    ("image_path-number", dict(image_path=5), "image_path", "expected string, found int"),
    ("sid-string", dict(sid="1"), "sid", "expected integer, found str"),
    ("sid-float", dict(sid=1.0), "sid", "expected integer, found float"),
    ("id-list", dict(id=[1]), "id", "expected string or integer, found list"),
    ("score-string", dict(score="high"), "score", "expected integer or number, found str"),
    ("empty-domain", dict(dataset=""), "dataset", "the domain name is empty"),
    ("blank-domain", dict(dataset="   "), "dataset", "the domain name is empty"),
    ("empty-text", dict(input="", add=" "), "input", "the text (input + add) is empty"),
    ("empty-image_path", dict(image_path=" "), "image_path", "is empty"),
    ("missing-image", dict(image_path="nope.png"), "image_path", "nope.png does not exist"),
    ("image-not-an-image", "not-an-image", "image_path", "is not a readable image (UnidentifiedImageError"),
    ("image-0-bytes", "empty", "image_path", "is empty (0 bytes)"),
    ("image-truncated-png", "truncated-png", "image_path", "is not a readable image"),
    ("image-truncated-jpeg", "truncated-jpeg", "image_path", "is not a readable image"),
    ("image-is-a-directory", "directory", "image_path", "is not a file"),
]


@pytest.mark.parametrize("over,field,fragment", [c[1:] for c in TRAIN_BAD], ids=[c[0] for c in TRAIN_BAD])
def test_bad_training_record(folder, over, field, fragment):
    if isinstance(over, str):
        over = dict(image_path=_bad_image(folder, over))
    path = write_json(folder / "train.json", [train_rec(), train_rec(**over)])
    problems = problems_of(load_train_records, path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:record 1: {field}: "), problems[0]
    assert fragment in problems[0]


META_BAD = [
    ("missing-input", dict(input=_DROP), "input", "missing required field"),
    ("missing-image_path", dict(image_path=_DROP), "image_path", "missing required field"),
    ("missing-true_false", dict(true_false=_DROP), "true_false", "missing required field"),
    ("true_false-int", dict(true_false=1), "true_false", "expected boolean, found int"),
    ("true_false-string", dict(true_false="true"), "true_false", "expected boolean, found str"),
    ("id-float", dict(id=1.5), "id", "expected string or integer, found float"),
    ("no-step-markers", dict(input="How many? I count 2.\nFinal answer: 2"), "input", "no step markers"),
    ("empty-chain", dict(input=""), "input", "no step markers"),
    ("missing-image", dict(image_path="images/gone.png"), "image_path", "does not exist"),
    ("image-not-an-image", "not-an-image", "image_path", "is not a readable image"),
    ("image-0-bytes", "empty", "image_path", "is empty (0 bytes)"),
]


@pytest.mark.parametrize("over,field,fragment", [c[1:] for c in META_BAD], ids=[c[0] for c in META_BAD])
def test_bad_meta_record(folder, over, field, fragment):
    if isinstance(over, str):
        over = dict(image_path=_bad_image(folder, over))
    path = write_json(folder / "meta.json", [meta_rec(id="a"), meta_rec(**over)])
    problems = problems_of(load_meta_records, path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:record 1: {field}: "), problems[0]
    assert fragment in problems[0]


def test_record_that_is_not_an_object(folder):
    path = write_json(folder / "train.json", [train_rec(), ["input", "add"], "text", 3])
    assert problems_of(load_train_records, path) == [
        f"{path}:record 1: record: must be a JSON object, found list",
        f"{path}:record 2: record: must be a JSON object, found str",
        f"{path}:record 3: record: must be a JSON object, found int"]


def test_duplicate_id_sid_in_training_records(folder):
    path = write_json(folder / "train.json", [train_rec(id="q", sid=1), train_rec(id="q", sid=2),
                                              train_rec(id="q", sid=1), train_rec(id="r", sid=1)])
    assert problems_of(load_train_records, path) == [f"{path}:record 2: sid: duplicate of {path}:record 0"]


def test_same_sid_without_id_or_without_sid_is_not_a_duplicate(folder):
    path = write_json(folder / "train.json", [train_rec(sid=1), train_rec(sid=1), train_rec(id="q"), train_rec(id="q")])
    assert len(load_train_records(path)) == 4


def test_duplicate_id_in_meta_records(folder):
    path = write_json(folder / "meta.json", [meta_rec(id="m"), meta_rec(id="n"), meta_rec(id="m")])
    assert problems_of(load_meta_records, path) == [f"{path}:record 2: id: duplicate of {path}:record 0"]


# ---------------------------------------------------------------- file-level problems
def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    (problem,) = problems_of(load_train_records, path)
    assert problem.startswith(f"{path}: file: cannot be read (FileNotFoundError")


def test_file_is_a_directory(tmp_path):
    (problem,) = problems_of(load_meta_records, tmp_path)
    assert problem.startswith(f"{tmp_path}: file: cannot be read (IsADirectoryError")


def test_file_not_utf8(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b'[{"input": "\xff\xfe"}]')
    (problem,) = problems_of(load_train_records, path)
    assert problem.startswith(f"{path}: file: cannot be read (UnicodeDecodeError")


def test_file_without_read_permission(tmp_path):
    path = write_json(tmp_path / "train.json", [train_rec()])
    path.chmod(0)
    if os.geteuid() != 0:
        (problem,) = problems_of(load_train_records, path)
    else:
        # Root reads files whatever their mode: read as the unprivileged user "nobody" instead
        # (effective uid only, restored at once), along a path that user may walk.
        for parent in (tmp_path, *tmp_path.parents):
            if not parent.stat().st_mode & 0o001:
                parent.chmod(parent.stat().st_mode | 0o011)
        os.seteuid(65534)
        try:
            (problem,) = problems_of(load_train_records, path)
        finally:
            os.seteuid(0)
    assert problem.startswith(f"{path}: file: cannot be read (PermissionError")


def test_truncated_json(folder):
    path = folder / "train.json"
    path.write_text(json.dumps([train_rec(), train_rec()], indent=1)[:-40])
    (problem,) = problems_of(load_train_records, path)
    assert problem.startswith(f"{path}: json: invalid JSON (") and " at line " in problem


def test_bad_line_in_jsonl_is_reported_with_its_line(folder):
    path = folder / "meta.jsonl"
    path.write_text(json.dumps(meta_rec(id="a")) + "\n{\"input\": oops}\n" + json.dumps(meta_rec(id="b")) + "\n")
    problems: list[str] = []
    loaded = load_meta_records(path, problems=problems)
    assert [m.chain_id for m in loaded] == ["a", "b"]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:line 2: json: invalid JSON (")


@pytest.mark.parametrize("content,found", [('{"input": "x"}', "dict"), ('"text"', "str"), ("3", "int")],
                         ids=["object", "string", "number"])
def test_top_level_must_be_a_list(tmp_path, content, found):
    path = tmp_path / "train.json"
    path.write_text(content)
    assert problems_of(load_train_records, path) == [
        f"{path}: json: the top level must be a list of records, found {found}"]


def test_empty_list_is_an_error(tmp_path):
    path = write_json(tmp_path / "meta.json", [])
    assert problems_of(load_meta_records, path) == [f"{path}: file: contains no records"]


def test_read_json_records_appends_instead_of_raising(tmp_path):
    problems = ["earlier"]
    assert read_json_records(tmp_path / "missing.json", problems) == []
    assert problems[0] == "earlier" and len(problems) == 2


# ---------------------------------------------------------------- all at once, up to a cap
def test_every_problem_is_reported_at_once(folder):
    path = write_json(folder / "train.json", [
        train_rec(),
        train_rec(accuracy=1.3, dataset=""),            # two problems in one record
        train_rec(image_path="gone.png"),
        train_rec(input=_DROP, accuracy="x"),
        train_rec(),
    ])
    problems = problems_of(load_train_records, path)
    assert problems == [
        f"{path}:record 1: accuracy: must be a number in [0, 1], found 1.3",
        f"{path}:record 1: dataset: the domain name is empty",
        f"{path}:record 2: image_path: image file {folder / 'gone.png'} does not exist",
        f"{path}:record 3: input: missing required field",
        f"{path}:record 3: accuracy: expected integer or number, found str",
    ]


def test_collecting_problems_across_files(folder):
    train = write_json(folder / "train.json", [train_rec(accuracy=2)])
    meta = write_json(folder / "meta.json", [meta_rec(input="no steps")])
    problems: list[str] = []
    images = ImageChecker()
    load_train_records(train, problems=problems, images=images)
    load_meta_records(meta, problems=problems, images=images)
    assert [p.split(": ")[0] for p in problems] == [f"{train}:record 0", f"{meta}:record 0"]
    err = DataValidationError(problems)
    assert str(err).startswith("2 problem(s) in the input data:\n")
    assert str(err).splitlines()[1:] == problems


def test_problem_cap(folder):
    n = MAX_REPORTED_PROBLEMS + 23
    path = write_json(folder / "train.json", [train_rec(accuracy=1.5) for _ in range(n)])
    with pytest.raises(DataValidationError) as info:
        load_train_records(path)
    err = info.value
    assert len(err.problems) == n  # all kept for programs
    lines = str(err).splitlines()
    assert lines[0] == f"{n} problem(s) in the input data:"
    assert lines[1:-1] == err.problems[:MAX_REPORTED_PROBLEMS]  # the first 50 shown
    assert lines[-1] == "... and 23 more problems"
    assert lines[MAX_REPORTED_PROBLEMS].startswith(f"{path}:record {MAX_REPORTED_PROBLEMS - 1}: accuracy:")


def test_no_cap_line_at_exactly_the_cap(folder):
    path = write_json(folder / "train.json", [train_rec(accuracy=-1) for _ in range(MAX_REPORTED_PROBLEMS)])
    with pytest.raises(DataValidationError) as info:
        load_train_records(path)
    assert "more problems" not in str(info.value)
    assert len(str(info.value).splitlines()) == MAX_REPORTED_PROBLEMS + 1


# ---------------------------------------------------------------- images are checked once
def test_each_image_is_checked_once(folder, monkeypatch):
    calls = []
    real = rec._image_problem
    monkeypatch.setattr(rec, "_image_problem", lambda p: calls.append(p) or real(p))
    images = ImageChecker()
    train = write_json(folder / "train.json", [train_rec() for _ in range(5)])
    meta = write_json(folder / "meta.json", [meta_rec(), meta_rec()])
    load_train_records(train, images=images)
    load_meta_records(meta, images=images)
    assert calls == [folder / "img.png"]
