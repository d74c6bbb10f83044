"""Read back what W&B wrote to an offline run folder (``<dir>/wandb/offline-run-*/run-*.wandb``),
without the W&B service: the file is a LevelDB-style log (a 7-byte header ``:W&B``, magic, version;
then 32 KiB blocks of chunks ``crc32c (4) | length (2, LE) | type (1) | data``, type 1 a whole record,
2/3/4 its first/middle/last piece) of ``wandb_internal_pb2.Record`` protobufs."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file (header {data[:7]!r})"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the rest of a block too small for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        piece = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 2):
            pending = piece
        else:
            pending += piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of every numeric value logged with run.log."""
    found: dict[str, list[tuple[int, float]]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        step = record.history.step.num
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            value = json.loads(item.value_json)
            if isinstance(value, (int, float)) and not key.startswith("_"):
                found.setdefault(key, []).append((step, float(value)))
    return found


def run_file(folder: str | Path) -> Path:
    """The one offline run file under `folder` (the directory passed to wandb.init)."""
    files = sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {folder}, found {files}"
    return files[0]
