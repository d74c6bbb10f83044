"""``dreamprm-clean``: a cleaned training file from an instance-weight report.

    dreamprm-clean --report runs/clean/instance_weights.jsonl --drop 5% --out data/train.cleaned.json
    python launch/clean.py --report runs/clean/instance_weights.jsonl --drop 20 --out train.cleaned.json

The report (`--weighting instance|both` writes it, lowest weight first) names the training file it
ranks (`file`) and each record's index in it (`record`). The lowest `--drop` records are left out and
the rest written, in their original order, as a JSON list. Image paths are written absolute
(resolved as training resolved them: against the training file's folder, or `--image_root`), so the
cleaned file trains from wherever it is saved. A list of the records dropped is written beside it
(`<out>.dropped.jsonl`). Standard library only: this answers in well under a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from dreamprm.config import EXIT_USER_ERROR
from dreamprm.data.records import read_json_records


def parse_drop(text: str, total: int) -> int:
    """'5%' -> 5% of `total` (rounded down), '20' -> 20 records."""
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(total * share / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise ValueError(f"--drop {text}: expected a share like 5% (0-100%) or a record count like 20") from None


def read_report(path: Path) -> list[dict[str, Any]]:
    rows, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"--report {path}: cannot be read ({err.__class__.__name__}: {err})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:line {n}: invalid JSON ({err.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("record"), int) or not isinstance(row.get("file"), str):
            problems.append(f"{path}:line {n}: record, file: expected an instance_weights.jsonl row with an integer "
                            "'record' and a 'file'")
            continue
        rows.append(row)
    if problems:
        raise ValueError("\n".join(problems[:20]))
    if not rows:
        raise ValueError(f"--report {path}: no rows")
    return rows


def train_file_of(rows: list[dict[str, Any]], report: Path, given: str | None) -> Path:
    """The training file the report ranks: --train_json_file, else its `file` (as the run spelled it:
    tried from here, then from the report's run folder)."""
    if given:
        return Path(given)
    files = {row["file"] for row in rows}
    if len(files) != 1:
        raise ValueError(f"--report {report}: file: rows name {len(files)} training files; pass --train_json_file")
    file = Path(files.pop())
    for candidate in (file, report.parent / file):
        if candidate.is_file():
            return candidate
    raise ValueError(f"--report {report}: file: the training file {file} it ranks does not exist (from here or "
                     f"from {report.parent}); pass --train_json_file")


def absolute_images(record: dict[str, Any], root: Path) -> dict[str, Any]:
    path = record.get("image_path")
    if isinstance(path, str) and not os.path.isabs(path):
        record = {**record, "image_path": str((root / path).resolve())}
    return record


def clean(report: Path, drop: str, out: Path, train_json_file: str | None = None,
          image_root: str | None = None) -> tuple[int, int]:
    """Write the cleaned file; returns (records kept, records dropped). Raises ValueError on a user error
    before anything is written."""
    rows = read_report(report)
    train = train_file_of(rows, report, train_json_file)
    problems: list[str] = []
    records = read_json_records(train, problems)
    if problems:
        raise ValueError("\n".join(problems[:20]))
    outside = [row["record"] for row in rows if not 0 <= row["record"] < len(records)]
    if outside:
        raise ValueError(f"--report {report}: record: {len(outside)} row(s) point past the {len(records)} records of "
                         f"{train} (e.g. record {outside[0]}): the report belongs to another file")
    count = parse_drop(drop, len(records))
    if out.resolve() == train.resolve():
        raise ValueError(f"--out {out}: is the training file itself; write the cleaned file elsewhere")
    dropped = rows[:count]  # the report is sorted lowest weight first
    left_out = {row["record"] for row in dropped}
    root = Path(image_root) if image_root else train.resolve().parent
    kept = [absolute_images(r, root) if isinstance(r, dict) else r
            for i, r in enumerate(records) if i not in left_out]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    with open(out.with_name(out.stem + ".dropped.jsonl"), "w", encoding="utf-8") as f:
        for row in dropped:
            f.write(json.dumps(row) + "\n")
    return len(kept), len(dropped)


def build_parser(prog: str = "dreamprm-clean") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="A cleaned training file: the records with the lowest "
                                     "instance weights left out, image paths made absolute.")
    parser.add_argument("--report", required=True, help="instance_weights.jsonl of a --weighting instance|both run")
    parser.add_argument("--drop", required=True, help="how many of the lowest-weighted records to leave out: "
                        "a share (5%%) or a count (20)")
    parser.add_argument("--out", required=True, help="the cleaned training file to write (a JSON list)")
    parser.add_argument("--train_json_file", help="the training file the report ranks (default: its 'file')")
    parser.add_argument("--image_root", help="the folder its image paths are relative to, if training used "
                        "--image_root (default: the training file's folder)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "dreamprm-clean") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        kept, dropped = clean(Path(args.report), args.drop, Path(args.out), args.train_json_file, args.image_root)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(f"{args.out}: {kept} records kept, {dropped} dropped (listed in "
          f"{Path(args.out).with_name(Path(args.out).stem + '.dropped.jsonl')})", flush=True)
    return 0


def console() -> None:
    """Console script `dreamprm-clean`."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main(prog="python -m dreamprm.clean"))
