"""``dreamprm-label merge``: the shard files of one run -> ``train.json``, ``meta.json``, ``candidates.json``.

Only completed questions count (`shards.read_shard`). Records are ordered by question id, then as
the shard wrote them, so the files do not depend on the number of shards. Image paths become
relative to the output folder (the trainer resolves them against the folder of the JSON file).
Each file is written to a temporary name and renamed: a merge that fails writes nothing.
"""
from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path

from dreamprm.config import ConfigError
from dreamprm.labeling.shards import read_shard

OUTPUTS = {"train": "train.json", "meta": "meta.json", "candidates": "candidates.json"}


def collect(shard_dir: Path, allow_partial: bool = False) -> tuple[dict[str, list[dict]], dict]:
    """Records by kind from every shard file in `shard_dir`, and the run's settings."""
    files = sorted(shard_dir.glob("shard-*-of-*.jsonl"))
    if not files:
        raise ConfigError(f"{shard_dir}: no shard files (shard-I-of-N.jsonl) to merge")
    settings, by_question, problems, counts = None, {}, [], set()
    for path in files:
        header, lines, _ = read_shard(path)
        if header is None:
            problems.append(f"{path}: no header line (not a dreamprm-label shard file)")
            continue
        own = dict(header["settings"])
        shard = own.pop("shard")
        counts.add(int(shard.split("/")[1]))
        if settings is None:
            settings = own
        elif own != settings:
            diff = sorted(k for k in set(own) | set(settings) if own.get(k) != settings.get(k))
            problems.append(f"{path}: made with other settings than {files[0].name} ({', '.join(diff)})")
        done = [item for item in lines if item["type"] == "done"]
        if len(done) < header["questions"] and not allow_partial:
            problems.append(f"{path}: shard {shard} is not finished ({len(done)} of {header['questions']} "
                            "questions): run it again to resume, or merge with --allow_partial")
        for item in lines:
            if item["type"] == "record":
                by_question.setdefault(item["qid"], []).append((item["kind"], item["record"]))
    if len(counts) > 1:
        problems.append(f"{shard_dir}: shard files of different shard counts ({sorted(counts)}): one run per folder")
    elif counts and not allow_partial:
        n = counts.pop()
        missing = sorted(set(range(n)) - {int(p.name.split("-")[1]) for p in files})
        if missing:
            problems.append(f"{shard_dir}: shards {missing} of {n} have not started: run them, or merge with "
                            "--allow_partial")
    if problems:
        raise ConfigError("cannot merge:\n" + "\n".join(problems))
    records: dict[str, list[dict]] = defaultdict(list)
    for qid in sorted(by_question):
        for kind, record in by_question[qid]:
            records[kind].append(record)
    return records, settings or {}


def balance_meta(meta: list[dict], seed: int) -> list[dict]:
    """Per domain, as many right chains as wrong ones: the larger side is subsampled (seeded), order kept.
    A domain with only right or only wrong chains is kept whole (dropping it would lose the domain)."""
    rng = random.Random(f"balance/{seed}")
    keep: set[int] = set()
    domains: dict[str, dict[bool, list[int]]] = defaultdict(lambda: {True: [], False: []})
    for i, record in enumerate(meta):
        domains[record["dataset"]][bool(record["true_false"])].append(i)
    for sides in domains.values():
        n = min(len(sides[True]), len(sides[False]))
        if n == 0:
            keep.update(sides[True] + sides[False])
            continue
        for side in sides.values():
            keep.update(rng.sample(side, n))
    return [record for i, record in enumerate(meta) if i in keep]


def _relative_images(records: list[dict], out_dir: Path) -> list[dict]:
    return [{**r, "image_path": os.path.relpath(r["image_path"], out_dir.resolve())} for r in records]


def write_json_atomic(path: Path, data: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def merge(shard_dir: Path, out_dir: Path, *, balance: bool = False, seed: int = 0,
          allow_partial: bool = False) -> dict[str, int]:
    """Write the merged files into `out_dir`; returns the record count of each file written."""
    records, _ = collect(shard_dir, allow_partial)
    if balance and records.get("meta"):
        records["meta"] = balance_meta(records["meta"], seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, name in OUTPUTS.items():
        if records.get(kind):  # an empty file would not load (the trainer refuses empty record files)
            write_json_atomic(out_dir / name, _relative_images(records[kind], out_dir))
            written[name] = len(records[kind])
    return written
