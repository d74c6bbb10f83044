"""Bad inputs through the real entry point (issue 8): one clear message, non-zero exit, nothing written.

Every case runs ``python launch/train.py ...`` as a subprocess with a fresh ``--weights_path`` and
checks that (1) the exit code is non-zero, (2) stderr holds the one message naming the file, record
and field (or the flag, or the DeepSpeed file and key), with no traceback, and (3) the output folder
was not created or is empty. Data cases build tiny files in a tmp dir with their own images, so the
bundled demo is not needed.

A process start costs a few seconds (deepspeed and transformers imports), so there is one process per
kind of failure (data, flag, path, DeepSpeed config); the other messages of each kind come from the
same validators and are checked in process (tests/test_records.py, tests/test_config.py). All cases
start together in one module fixture, two at a time, and each test then checks its own result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL_CONFIG = REPO / "runs" / "tiny-qwen2vl" / "config.json"
CHAIN = "How many circles?\n\nStep 1: one red circle.\nStep 2: one blue circle, so 2.\nFinal answer: 2"
TIMEOUT_S = 240


@dataclass
class Setup:
    """What a case's builder returns: extra flags and the fragments stderr must contain."""
    flags: list[str]
    expect: list[str]
    out: Path | None = None  # the --weights_path, when the case is about it


@dataclass
class Case:
    id: str
    build: Callable[[Path], Setup]


# ---------------------------------------------------------------- tiny valid inputs
def good_train(**over) -> dict:
    r = {"input": "How many circles?", "add": "Step 1: one red circle.", "image_path": "img.png",
         "dataset": "clean", "accuracy": 0.75, "id": "q0", "sid": 1}
    r.update(over)
    return r


def good_meta(**over) -> dict:
    r = {"id": "m0", "input": CHAIN, "image_path": "img.png", "true_false": True}
    r.update(over)
    return r


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1))
    return path


def data_files(tmp: Path, train=None, meta=None) -> tuple[Path, Path, list[str]]:
    """A valid train/meta pair in `tmp` (with its image), or the given records instead."""
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp / "img.png")
    t = write(tmp / "train.json", train if train is not None else [good_train(), good_train(id="q1", dataset="noisy")])
    m = write(tmp / "meta.json", meta if meta is not None else [good_meta(), good_meta(id="m1", true_false=False)])
    # Two meta records: a meta batch of 2 (the default 8 could not be filled).
    return t, m, ["--train_json_file", str(t), "--meta_json_file", str(m), "--meta_batch_size", "2"]


def bad_train(record: dict, expect: Callable[[Path], str]) -> Callable[[Path], Setup]:
    """Record 1 of the training file is `record`; the message must name `FILE:record 1: field: ...`."""
    def build(tmp: Path) -> Setup:
        t, _, flags = data_files(tmp, train=[good_train(), record])
        return Setup(flags, [f"error: {t}:record 1: " + expect(tmp)])
    return build


def bad_meta(record: dict, expect: Callable[[Path], str]) -> Callable[[Path], Setup]:
    def build(tmp: Path) -> Setup:
        _, m, flags = data_files(tmp, meta=[good_meta(), record])
        return Setup(flags, [f"error: {m}:record 1: " + expect(tmp)])
    return build


def bad_image(name: str, content: bytes, expect: str, meta: bool = False) -> Callable[[Path], Setup]:
    """`expect` is formatted with p=the image path."""
    def build(tmp: Path) -> Setup:
        message = lambda t: "image_path: " + expect.format(p=t / name)  # noqa: E731
        inner = (bad_meta(good_meta(id="m1", image_path=name), message) if meta
                 else bad_train(good_train(id="q1", image_path=name), message))
        setup = inner(tmp)
        (tmp / name).write_bytes(content)
        return setup
    return build


def ds_case(ds, flags: list[str], expect: Callable[[Path], str]) -> Callable[[Path], Setup]:
    def build(tmp: Path) -> Setup:
        _, _, data = data_files(tmp)
        path = write(tmp / "ds.json", ds)
        return Setup(data + ["--deepspeed", str(path)] + flags, [expect(path)])
    return build


def flag_case(flags: list[str], expect: str) -> Callable[[Path], Setup]:
    def build(tmp: Path) -> Setup:
        _, _, data = data_files(tmp)
        return Setup(data + flags, [expect])
    return build


def weights_path_under_a_file(tmp: Path) -> Setup:
    _, _, data = data_files(tmp)
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    return Setup(data + ["--weights_path", str(out)], [f"--weights_path {out}: not writable ({blocker} is a file"],
                 out=out)


def reward_model_missing(tmp: Path) -> Setup:
    _, _, data = data_files(tmp)
    return Setup(data + ["--reward_model", str(tmp / "no_such_model")],
                 [f"--reward_model {tmp / 'no_such_model'}: no such directory"])


def problems_in_both_files(tmp: Path) -> Setup:
    t, m, flags = data_files(tmp, train=[good_train(), good_train(id="q1", accuracy=1.3)],
                             meta=[good_meta(), good_meta(id="m1", input="no steps here")])
    return Setup(flags, ["2 problems, nothing was started or written", f"{t}:record 1: accuracy: must be a number in [0, 1]",
                         f"{m}:record 1: input: no step markers"])


DS_OK = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
         "zero_optimization": {"stage": 2}}

# One process per kind of failure; every other message of each kind is checked in process, against
# the same validators (tests/test_records.py: each record and image problem of both files;
# tests/test_config.py: each flag and DeepSpeed-config problem).
CASES = [
    # ---- data: problems in both files at once, every one reported, one "error:" line
    Case("data-problems-in-both-files", problems_in_both_files),
    Case("data-image-not-an-image", bad_image("notes.png", b"just text\n",
                                              "{p} is not a readable image (UnidentifiedImageError")),
    # ---- command-line flags: argparse's own error, and the trainer's checks across flags and paths
    Case("flag-batch_size-wrong-type", flag_case(["--batch_size", "two"], "argument --batch_size: invalid int value")),
    Case("flag-hypergrad-fd-with-bf16", flag_case(["--hypergrad", "fd", "--precision", "bf16"],
                                                  "--hypergrad fd needs --precision fp32")),
    Case("flag-reward_model-missing", reward_model_missing),
    Case("flag-weights_path-under-a-file", weights_path_under_a_file),
    # ---- DeepSpeed configs
    Case("ds-conflicting-batch-size", ds_case(
        {**DS_OK, "train_micro_batch_size_per_gpu": 2}, ["--batch_size", "4"],
        lambda p: f"--batch_size 4 conflicts with train_micro_batch_size_per_gpu=2 in {p}")),
]
assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------- running them
@dataclass
class Result:
    setup: Setup
    out: Path
    proc: subprocess.CompletedProcess


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                        "PMI_RANK")}
    env.update(HWLOC_COMPONENTS="-gl", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(case: Case, tmp: Path) -> Result:
    setup = case.build(tmp)
    out = setup.out or tmp / "out"
    flags = setup.flags + ([] if setup.out else ["--weights_path", str(out)])
    proc = subprocess.run([sys.executable, "launch/train.py", "--iteration_num", "1", *flags], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return Result(setup, out, proc)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Result]:
    dirs = {c.id: tmp_path_factory.mktemp(c.id) for c in CASES}
    done: dict[str, Result] = {}
    pending = list(CASES)
    if not TINY_MODEL_CONFIG.is_file():
        # The first run builds the tiny model; do it alone so parallel runs do not race on it.
        first = pending.pop(0)
        done[first.id] = _run(first, dirs[first.id])
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {c.id: pool.submit(_run, c, dirs[c.id]) for c in pending}
        done.update({name: f.result() for name, f in futures.items()})
    return done


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(results, case):
    r = results[case.id]
    err = r.proc.stderr
    detail = f"\n--- stderr ---\n{err[-4000:]}\n--- stdout ---\n{r.proc.stdout[-2000:]}"
    assert r.proc.returncode != 0, "exited 0" + detail
    assert "Traceback" not in err, "a traceback instead of a message" + detail
    for fragment in r.setup.expect:
        assert fragment in err, f"missing {fragment!r}" + detail
    # One message: a single "error:" line (argparse prints its usage above it).
    error_lines = [line for line in err.splitlines() if line.startswith(("error:", "launch/train.py: error:"))]
    assert len(error_lines) == 1, detail
    assert not r.out.exists() or not any(r.out.iterdir()), f"{r.out} holds {sorted(r.out.rglob('*'))}"


def test_a_good_setup_passes_validation(tmp_path):
    """The builders' valid files pass validation, so each case fails on its injected fault alone."""
    from dreamprm.data.records import load_meta_records, load_train_records
    t, m, _ = data_files(tmp_path)
    assert len(load_train_records(t)) == 2 and len(load_meta_records(m)) == 2
