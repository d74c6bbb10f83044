"""Sharding by question id, and the append-only shard file that makes a killed shard resumable.

``--shard i/n`` takes the questions whose id hashes to i modulo n: the split depends on the ids
alone (not on file order or on the other shards), so n jobs started anywhere cover every question
once. A shard writes ``OUT/shard-i-of-n.jsonl``:

    {"type": "header", "settings": {...}, "questions": Q}           first line
    {"type": "record", "qid": ..., "kind": "train", "record": {...}}  a question's records ...
    {"type": "done", "qid": ..., "records": R}                       ... then its completion marker

A question's lines and marker go out in one write, flushed and fsynced. A process killed mid-write
leaves at most a torn tail after the last marker; reopening cuts the file back to that marker, and
the questions with a marker are skipped. So a resumed shard neither repeats nor loses a question,
and its file equals an uninterrupted run's (the records of a question depend on its seed alone).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from dreamprm.config import ConfigError


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text}: expected i/n, e.g. 0/4 (shard i of n, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def in_shard(qid: str, index: int, count: int) -> bool:
    """Whether question `qid` belongs to shard `index` of `count` (sha256 of the id: stable everywhere)."""
    return int.from_bytes(hashlib.sha256(qid.encode()).digest()[:8], "little") % count == index


def shard_path(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / f"shard-{index:05d}-of-{count:05d}.jsonl"


def read_shard(path: Path) -> tuple[dict | None, list[dict], int]:
    """(header, completed lines, byte length of the complete part) of a shard file. Lines after the
    last completion marker (a question cut short, a torn line) are not part of it."""
    header, lines, pending, good_end, offset = None, [], [], 0, 0
    with open(path, "rb") as f:
        for raw in f:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                item = json.loads(raw)
            except json.JSONDecodeError:
                break
            if item.get("type") == "header" and header is None:
                header, good_end = item, offset
            elif item.get("type") == "record":
                pending.append(item)
            elif item.get("type") == "done":
                lines.extend(pending)
                lines.append(item)
                pending, good_end = [], offset
    return header, lines, good_end


def completed_ids(lines: Iterable[dict]) -> set[str]:
    return {item["qid"] for item in lines if item.get("type") == "done"}


class ShardWriter:
    """The shard file of one run: created with its header, or reopened (settings checked, tail cut)."""

    def __init__(self, path: Path, settings: dict[str, Any], questions: int):
        self.path = path
        self.done: set[str] = set()
        if path.exists() and path.stat().st_size > 0:
            header, lines, good_end = read_shard(path)
            if header is None:
                raise ConfigError(f"{path}: not a shard file of dreamprm-label (no header line): remove it or "
                                  "choose another --out")
            _check_same_settings(path, header["settings"], settings)
            with open(path, "r+b") as f:
                f.truncate(good_end)
            self.done = completed_ids(lines)
            self._file = open(path, "a", encoding="utf-8")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")
            self._write([{"type": "header", "settings": settings, "questions": questions}])

    def add(self, qid: str, records: list[tuple[str, dict]]) -> None:
        """A question's records and its completion marker, in one write."""
        lines = [{"type": "record", "qid": qid, "kind": kind, "record": record} for kind, record in records]
        self._write(lines + [{"type": "done", "qid": qid, "records": len(records)}])
        self.done.add(qid)

    def _write(self, items: list[dict]) -> None:
        self._file.write("".join(json.dumps(item, sort_keys=True) + "\n" for item in items))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _check_same_settings(path: Path, old: dict, new: dict) -> None:
    changed = [f"{key}: {old.get(key)!r} in the file, {new.get(key)!r} now" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    if changed:
        raise ConfigError(f"{path}: this shard was started with other settings, so resuming it would mix two runs "
                          f"({'; '.join(changed)}): rerun with the same flags, or write to another --out")
