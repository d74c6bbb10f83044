"""``dreamprm-clean``: a cleaned training file from an instance-weight report.

    dreamprm-clean --report runs/clean/instance_weights.jsonl --drop 5% --out data/train.cleaned.json
    python launch/clean.py --report runs/clean/instance_weights.jsonl --drop 20 --out train.cleaned.json

The report (`--weighting instance|both` writes it, lowest weight first) names the training file it
ranks (`file`) and each record's index in it (`record`). The lowest `--drop` records are left out and
the rest written, in their original order, as a JSON list. Image paths are written absolute
(resolved as training resolved them: against the training file's folder, or `--image_root`), so the
cleaned file trains from wherever it is saved. A list of the records dropped is written beside it
(`<out>.dropped.jsonl`). Standard library only: this answers in well under a second.

Two plain baselines rank instead of the weights: `--rank_by loss`, each record's training loss at its
last visit by an upper step (the report's `loss`), highest first; `--rank_by gap`, the distance
|MC accuracy - PRM prediction| at that visit (`mc`, `prediction`), largest first. Records never visited
rank as the most trusted. (For the scalar heads' squared error the two order the records alike; for the
generative head's cross-entropy they differ: its loss is high wherever the MC accuracy is near 0.5.)

Where some corrupted records are known (an audit list: a JSON list of record indices in the training
file), `--audit FILE` prints how well each ranking finds them, as AUC = P(a clean record ranks as more
trustworthy than a corrupted one), 0.5 chance: the learned weights, the domain x record weight the
lower loss used (from `domain_weights.json` beside the report), and both baselines. With `--audit`,
`--drop` and `--out` are optional (audit only).

    dreamprm-clean --report runs/clean/instance_weights.jsonl --audit known_bad.json
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
from dreamprm.ranking import auc


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


def training_records(rows: list[dict[str, Any]], report: Path, given: str | None) -> tuple[Path, list[Any]]:
    """The training file the report ranks, and its records (ValueError with the file's problems)."""
    train = train_file_of(rows, report, given)
    problems: list[str] = []
    records = read_json_records(train, problems)
    if problems:
        raise ValueError("\n".join(problems[:20]))
    return train, records


def absolute_images(record: dict[str, Any], root: Path) -> dict[str, Any]:
    path = record.get("image_path")
    if isinstance(path, str) and not os.path.isabs(path):
        record = {**record, "image_path": str((root / path).resolve())}
    return record


def distrust(row: dict[str, Any], baseline: str) -> float | None:
    """A row's score under a baseline ranking (higher: less trusted); None where it was never measured."""
    if baseline == "loss":
        value = row.get("loss")
        return value if isinstance(value, (int, float)) else None
    prediction, mc = row.get("prediction"), row.get("mc")
    if isinstance(prediction, (int, float)) and isinstance(mc, (int, float)):
        return abs(mc - prediction)
    return None


def by_baseline(rows: list[dict[str, Any]], report: Path, baseline: str) -> list[dict[str, Any]]:
    """The rows ordered by a baseline ranking ('loss' or 'gap'): least trusted first, never-visited rows last."""
    column = "loss" if baseline == "loss" else "prediction"
    if not any(column in row for row in rows):
        raise ValueError(f"--rank_by {baseline}: {report}: {column}: the report has no {column} column (written by "
                         "a version before it, or by a run whose upper level never ran)")
    unmeasured = [row["record"] for row in rows if distrust(row, "loss") is not None and distrust(row, baseline) is None]
    if unmeasured:  # visited, but before the run recorded predictions: they would rank as never visited
        raise ValueError(f"--rank_by {baseline}: {report}: record {unmeasured[0]}: prediction: {len(unmeasured)} "
                         "record(s) have a loss but no prediction (a run resumed from a checkpoint written before "
                         "the prediction column); rank them by loss instead")
    scored = [(distrust(row, baseline), row) for row in rows]
    visited = [(score, row) for score, row in scored if score is not None]
    return ([row for _, row in sorted(visited, key=lambda sr: (-sr[0], sr[1]["record"]))]
            + [row for score, row in scored if score is None])


def read_audit(path: Path, records: int) -> set[int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--audit {path}: cannot be read as JSON ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
        raise ValueError(f"--audit {path}: expected a JSON list of record indices (integers) in the training file")
    outside = [i for i in data if not 0 <= i < records]
    if outside:
        raise ValueError(f"--audit {path}: record {outside[0]}: outside the {records} records of the report's "
                         "training file")
    return set(data)


def ranking_aucs(rows: list[dict[str, Any]], corrupted: set[int],
                 domain_weight: dict[str, float] | None = None) -> dict[str, float | None]:
    """AUC against the corrupted records of each ranking an instance-weight report offers: `weights`
    (every row), `effective` (domain x record weight, where `domain_weight` is given), the baselines
    `loss` and `gap` (|mc - prediction|), and `weights_visited`, these three over the rows an upper step
    visited, which alone have the baselines' values. None: not defined (e.g. no prediction column)."""
    def score(subset: list[dict[str, Any]], key) -> float | None:
        return auc([key(r) for r in subset], [r["record"] not in corrupted for r in subset]) if subset else None

    visited = [r for r in rows if distrust(r, "loss") is not None]
    has_gap = bool(visited) and all(distrust(r, "gap") is not None for r in visited)
    return {"weights": score(rows, lambda r: r["weight"]),
            "effective": None if domain_weight is None else
            score(rows, lambda r: r["weight"] * domain_weight[r["domain"]]),
            "loss": score(visited, lambda r: -r["loss"]),
            "gap": score(visited, lambda r: -distrust(r, "gap")) if has_gap else None,
            "weights_visited": score(visited, lambda r: r["weight"]),
            "records": len(rows), "visited": len(visited), "has_gap": has_gap}


def audit(rows: list[dict[str, Any]], report: Path, corrupted: set[int]) -> list[tuple[str, float, int]]:
    """(ranking, AUC, records scored) for the learned weights, domain x record weights and the baselines."""
    domain_weight = None
    domain_file = report.parent / "domain_weights.json"
    if domain_file.is_file() and all("domain" in r for r in rows):
        weights = json.loads(domain_file.read_text(encoding="utf-8")).get("weights", {})
        # Only where the run learned domain weights (--weighting both/both_net); else the same ranking as above.
        if all(r["domain"] in weights for r in rows) and any(w != 1.0 for w in weights.values()):
            domain_weight = weights
    aucs = ranking_aucs(rows, corrupted, domain_weight)
    def auc(key: str) -> float:  # None (no records, or one class empty) prints as nan
        return float("nan") if aucs[key] is None else aucs[key]

    out = [("instance weights", auc("weights"), aucs["records"])]
    if aucs["effective"] is not None:
        out.append(("domain x record weights (what the lower loss used)", aucs["effective"], aucs["records"]))
    if aucs["visited"]:
        out.append(("loss ranking (records visited by an upper step)", auc("loss"), aucs["visited"]))
        if aucs["has_gap"]:  # a report with predictions for every visited record
            out.append(("|MC accuracy - PRM prediction|, the same records", auc("gap"), aucs["visited"]))
        out.append(("instance weights, the same records", auc("weights_visited"), aucs["visited"]))
    return out


def clean(report: Path, drop: str, out: Path, train_json_file: str | None = None,
          image_root: str | None = None, rank_by: str = "weight") -> tuple[int, int]:
    """Write the cleaned file; returns (records kept, records dropped). Raises ValueError on a user error
    before anything is written."""
    rows = read_report(report)
    if rank_by != "weight":
        rows = by_baseline(rows, report, rank_by)
    train, records = training_records(rows, report, train_json_file)
    outside = [row["record"] for row in rows if not 0 <= row["record"] < len(records)]
    if outside:
        raise ValueError(f"--report {report}: record: {len(outside)} row(s) point past the {len(records)} records of "
                         f"{train} (e.g. record {outside[0]}): the report belongs to another file")
    count = parse_drop(drop, len(records))
    if out.resolve() == train.resolve():
        raise ValueError(f"--out {out}: is the training file itself; write the cleaned file elsewhere")
    dropped = rows[:count]  # the report is sorted lowest weight first (by_baseline: least trusted first)
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
    parser.add_argument("--drop", help="how many of the lowest-weighted records to leave out: "
                        "a share (5%%) or a count (20)")
    parser.add_argument("--out", help="the cleaned training file to write (a JSON list)")
    parser.add_argument("--rank_by", choices=("weight", "loss", "gap"), default="weight",
                        help="which records go first: the lowest learned weights (default); or a plain baseline "
                        "at the last upper-step visit: the highest training loss (loss), or the largest "
                        "|MC accuracy - PRM prediction| (gap)")
    parser.add_argument("--audit", help="a JSON list of record indices known to be corrupted: print how well "
                        "each ranking finds them (AUC); --drop/--out become optional")
    parser.add_argument("--train_json_file", help="the training file the report ranks (default: its 'file')")
    parser.add_argument("--image_root", help="the folder its image paths are relative to, if training used "
                        "--image_root (default: the training file's folder)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "dreamprm-clean") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    cleaning = args.drop is not None, args.out is not None
    if cleaning[0] != cleaning[1] or not (any(cleaning) or args.audit):
        parser.error("--drop and --out go together, and are required without --audit")
    report = Path(args.report)
    try:
        if args.audit:
            rows = read_report(report)
            _, records = training_records(rows, report, args.train_json_file)
            corrupted = read_audit(Path(args.audit), len(records))
            table = audit(rows, report, corrupted)
        if args.out:
            kept, dropped = clean(report, args.drop, Path(args.out), args.train_json_file, args.image_root,
                                  args.rank_by)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if args.audit:
        print(f"{args.audit}: {len(corrupted)} known corrupted records; AUC = P(a clean record ranks as more "
              "trustworthy than a corrupted one), 0.5 chance:")
        for name, value, scored in table:
            print(f"  {value:.3f}  {name} ({scored} records)")
    if not args.out:
        return 0
    print(f"{args.out}: {kept} records kept, {dropped} dropped (listed in "
          f"{Path(args.out).with_name(Path(args.out).stem + '.dropped.jsonl')})", flush=True)
    return 0


def console() -> None:
    """Console script `dreamprm-clean`."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main(prog="python -m dreamprm.clean"))
