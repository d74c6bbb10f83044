"""Atomic, resumable checkpoints that fit the disk.

Layout: ``<weights_path>/checkpoints/step_00000100/`` holding the DeepSpeed engine state
(``engine/``, every rank's shards), ``trainer_state.pt`` (replicated state: domain weights, their
optimiser, data positions, counters; written by rank 0), ``rank_<r>.pt`` (each rank's RNG states)
and ``manifest.json``. Everything we read back goes through ``torch.load(..., weights_only=True)``.

A save, collective on every rank:

1. **Space check**: rank 0 compares the expected size (the newest complete checkpoint's, or for the
   first one an estimate from the parameter count and the optimiser) with the free space of the
   checkpoints folder's file system. Too little stops every rank before a byte is written.
2. **Write** under ``.tmp-step_00000100/``; ``manifest.json`` last, then one rename to the final
   name. Only folders named ``step_*`` with a manifest count, so a run killed mid-save leaves the
   previous checkpoint as the newest complete one.
3. **Agree**: a write that fails on any rank (disk full, quota, I/O error) is caught where it
   happens, the ranks agree in one all-reduce, the partial folder is removed and every rank raises
   `CheckpointWriteError` together (exit code `EXIT_CHECKPOINT_FAILED`, never requeued).
4. **Retention**: only now, with the new checkpoint complete, rank 0 deletes complete checkpoints
   beyond the newest ``keep_last``. The checkpoint a run resumed from is therefore deleted only
   once a newer one exists. A run's final checkpoint (``"final": true`` in its manifest) is never
   deleted, and nothing outside ``checkpoints/`` (the export) is touched.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dreamprm.checkpoint_layout import MANIFEST, checkpoint_name, complete_checkpoints  # noqa: F401 (re-exported)
from dreamprm.config import ConfigError
from dreamprm.preemption import EXIT_CHECKPOINT_FAILED

ENGINE_TAG = "engine"
PARTIAL_PREFIX = ".tmp-"  # a save in progress, or left by one that died
# fp32 master weights + AdamW's two moments, partitioned over the ranks (measured: 12.0 bytes per
# parameter, tiny model, ZeRO-3, fp32, 1 and 2 ranks). The weights themselves are not saved again
# under ZeRO-3: its model-state files hold placeholders only.
OPTIMIZER_BYTES_PER_PARAM = 12
# Measured on the tiny model: 45 KB per rank (RNG state, ZeRO placeholders) and 43 KB once (trainer
# state, DeepSpeed's recovery scripts, manifest); rounded up for models with more tensors.
RANK_OVERHEAD_BYTES = 256 * 1024
FIXED_OVERHEAD_BYTES = 256 * 1024
# torch's zip writer reports a full disk as "unexpected pos"; with less than this free we call it full.
FULL_BELOW_BYTES = 1024 * 1024
# Causes worth naming, found in an OSError's errno or in the text of torch's RuntimeError.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (too little space, quota, I/O error). Raised on every rank
    together, after the partial folder is removed; the message names the cause and the last good
    checkpoint."""


def partial_checkpoints(root: str | Path) -> list[Path]:
    """What interrupted saves left under `root`: `.tmp-*` entries and `step_*` folders without a manifest."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.name.startswith(PARTIAL_PREFIX) or (p.name.startswith("step_") and not (p / MANIFEST).is_file()))


def is_final(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / MANIFEST).read_text()).get("final", False))
    except (OSError, ValueError):
        return False


def retention_plan(checkpoints: list[Path], keep_last: int, keep: Path) -> list[Path]:
    """The complete checkpoints (oldest first) to delete: all but the newest `keep_last` (0 keeps
    all), sparing `keep` (the one just written) and every run's final checkpoint."""
    if keep_last <= 0:
        return []
    return [c for c in checkpoints[:-keep_last] if c != keep and not is_final(c)]


def folder_bytes(folder: Path) -> int:
    """Space the files under `folder` take (allocated blocks, at least their size)."""
    total = 0
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file():
            total += max(st.st_size, getattr(st, "st_blocks", 0) * 512)
    return total


def free_bytes(path: Path) -> int:
    """Free space for this user on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def format_bytes(n: float) -> str:
    """2445075 -> '2.3 MiB (2,445,075 bytes)'."""
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{int(n):,} bytes" if n < 1024 else f"{value:.1f} {unit} ({int(n):,} bytes)"


def estimate_checkpoint_bytes(params: int, trainable: int, *, world_size: int, zero_stage: int = 3,
                              weight_bytes: int = 2) -> tuple[int, int]:
    """(per rank, total) bytes of one checkpoint of a model with `params` parameters.

    Every rank writes its partition of the optimiser state (`OPTIMIZER_BYTES_PER_PARAM` per
    trainable parameter); below ZeRO-3, rank 0 also writes the weights once (`weight_bytes` each).
    Used for the space check before a run's first checkpoint and by launch/estimate_memory.py.
    """
    optimizer = OPTIMIZER_BYTES_PER_PARAM * trainable
    weights = 0 if zero_stage == 3 else weight_bytes * params
    per_rank = math.ceil(optimizer / world_size) + RANK_OVERHEAD_BYTES
    return per_rank, optimizer + weights + world_size * RANK_OVERHEAD_BYTES + FIXED_OVERHEAD_BYTES


def describe_write_error(err: BaseException, free: int | None = None) -> str:
    """The cause of a failed write, in words: 'No space left on device (ENOSPC)'."""
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    raw = f"{type(err).__name__}: {text}"
    for code in WRITE_ERRNOS:  # torch's legacy writer puts the errno's text in its RuntimeError
        if os.strerror(code) in text:
            return f"{os.strerror(code)} ({errno.errorcode[code]}; {raw})"
    if free is not None and free < FULL_BELOW_BYTES:  # torch's zip writer does not say why
        return f"No space left on device: {format_bytes(free)} free after the failure ({raw})"
    return raw


@dataclass
class WriteFailure:
    """A write that failed on this rank: which file, and why."""
    path: str
    error: BaseException

    def describe(self, root: Path) -> str:
        """The cause, with the free space of `root`'s file system measured now (right after the failure)."""
        try:
            free = free_bytes(root)
        except OSError:
            free = None
        return f"{describe_write_error(self.error, free)} while writing {self.path}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _attempt(path: Path | str, write: Callable[[], Any]) -> WriteFailure | None:
    try:
        write()
    except Exception as err:  # anything a write raises is this rank's failure, decided on together
        return WriteFailure(str(path), err)
    return None


class Checkpointer:
    """Saves, prunes and loads the checkpoints of one run's `checkpoints/` folder (see the module
    docstring); `save`, `mark_final` and `load` are collective."""

    def __init__(self, root: str | Path, engine: Any, keep_last: int = 3):
        if keep_last < 0:
            raise ConfigError(f"--keep_last: must be >= 0 (0 keeps every checkpoint), got {keep_last}")
        self.root = Path(root)
        self.engine = engine
        self.keep_last = keep_last
        self.resumed_from: Path | None = None  # set by load()

    # ------------------------------------------------------------------ save
    def save(self, step: int, trainer_state: dict[str, Any], final: bool = False) -> Path:
        """Collective: every rank calls it. Returns the complete folder, or raises
        `CheckpointWriteError` on every rank (nothing partial left behind)."""
        rank, is_main = self.engine.info.rank, self.engine.is_main
        name = checkpoint_name(step)
        folder, tmp = self.root / name, self.root / f"{PARTIAL_PREFIX}{name}"
        self._check_space(name)
        failure = _attempt(tmp, lambda: tmp.mkdir(parents=True)) if is_main else None
        self._agree(failure, name, tmp)
        failed = self.engine.save_checkpoint(str(tmp), ENGINE_TAG, client_state={})
        failure = WriteFailure(*failed) if failed else None
        if failure is None:
            failure = _attempt(tmp / f"rank_{rank}.pt", lambda: torch.save(rng_state(), tmp / f"rank_{rank}.pt"))
        if failure is None and is_main:
            failure = _attempt(tmp / "trainer_state.pt", lambda: torch.save(trainer_state, tmp / "trainer_state.pt"))
        self._agree(failure, name, tmp)
        failure = _attempt(tmp / MANIFEST, lambda: self._commit(tmp, folder, step, final)) if is_main else None
        self._agree(failure, name, tmp)
        if is_main:
            for old in retention_plan(complete_checkpoints(self.root), self.keep_last, keep=folder):
                shutil.rmtree(old, ignore_errors=True)
        self.engine.barrier()
        return folder

    def _commit(self, tmp: Path, folder: Path, step: int, final: bool) -> None:
        """Rank 0, every rank's files written: manifest into the temporary folder, then one rename."""
        manifest = {"step": step, "world_size": self.engine.info.world_size, "time": time.time(), "final": final,
                    "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())}
        _write_manifest(tmp, manifest)
        if folder.exists():
            # A complete checkpoint of the same step (another run in this folder): replaced only now
            # that the new one is complete; moved aside first because a rename cannot replace a folder.
            aside = self.root / f"{PARTIAL_PREFIX}{folder.name}.replaced"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            os.replace(tmp, folder)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, folder)

    def mark_final(self, folder: Path) -> None:
        """Mark an existing checkpoint as its run's final one (kept by retention). Best effort: on a
        full disk the old manifest stays as it was, and the checkpoint is still complete."""
        if self.engine.is_main:
            manifest = json.loads((folder / MANIFEST).read_text())
            if not manifest.get("final"):
                try:
                    _write_manifest(folder, {**manifest, "final": True})
                except OSError:
                    (folder / (MANIFEST + ".part")).unlink(missing_ok=True)
        self.engine.barrier()

    def remove_partial(self) -> list[tuple[Path, int]]:
        """Rank 0: delete what interrupted saves left (see `partial_checkpoints`); returns (path, bytes)."""
        removed = []
        if self.engine.is_main:
            for p in partial_checkpoints(self.root):
                if p.is_dir():
                    removed.append((p, folder_bytes(p)))
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    removed.append((p, p.stat().st_size))
                    p.unlink(missing_ok=True)
        return removed

    # ------------------------------------------------------------------ space and failures
    def expected_bytes(self) -> tuple[int, str]:
        """(bytes, where the number comes from) for the next checkpoint."""
        previous = (complete_checkpoints(self.root) or [self.resumed_from])[-1]
        if previous is not None and previous.is_dir():
            return folder_bytes(previous), f"the size of {previous.name}"
        params, trainable = self.engine.parameter_counts()
        _, total = estimate_checkpoint_bytes(params, trainable, world_size=self.engine.info.world_size,
                                             zero_stage=self.engine.stage,
                                             weight_bytes=self.engine.compute_dtype.itemsize)
        return total, f"estimated from {trainable:,} trainable parameters x {OPTIMIZER_BYTES_PER_PARAM} bytes"

    def _check_space(self, name: str) -> None:
        """Rank 0 measures (a shared file system looks the same from every rank); one all-reduce
        tells every rank, so that all of them stop before writing anything."""
        need = free = 0.0
        basis = ""
        if self.engine.is_main:
            # Leftovers of an interrupted save would only take space (and the name of this save).
            self.remove_partial()
            need, basis = self.expected_bytes()
            free = free_bytes(self.root)
        packed = torch.tensor([float(need), float(free)], dtype=torch.float64, device=self.engine.info.device)
        need, free = self.engine.all_reduce_sum(packed).tolist()
        if need > free:
            raise CheckpointWriteError(
                f"checkpoint {name} not written: it needs about {format_bytes(need)} in {self.root} ({basis}), "
                f"and that file system has {format_bytes(free)} free. Nothing was written. {self._advice()}")

    def _agree(self, failure: WriteFailure | None, name: str, tmp: Path) -> None:
        """Collective: raise `CheckpointWriteError` on every rank if this step failed on any rank."""
        world, rank = self.engine.info.world_size, self.engine.info.rank
        # max(world - rank) over the failed ranks names the lowest failed rank; 0: none failed.
        flag = torch.tensor([float(world - rank) if failure else 0.0], device=self.engine.info.device)
        first = int(self.engine.all_reduce_max(flag).item())
        if first == 0:
            return
        src = world - first
        from dreamprm.distributed.engine import broadcast_object  # here: this module stays DeepSpeed-free
        cause = broadcast_object(failure.describe(self.root) if rank == src else None, src=src)
        if self.engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.engine.barrier()
        where = f"rank {src}: " if world > 1 else ""
        raise CheckpointWriteError(f"checkpoint {name} could not be written: {where}{cause}. The partial folder "
                                   f"{tmp} was removed. {self._advice()}")

    def _advice(self) -> str:
        found = complete_checkpoints(self.root) or ([self.resumed_from] if self.resumed_from else [])
        last = (f"the last good checkpoint is {found[-1]} (--resume auto continues from it)" if found
                else "there is no complete checkpoint yet (a new run starts from step 0)")
        fewer = {0: "keep fewer checkpoints (--keep_last N; now all are kept), ", 1: ""}.get(
            self.keep_last, f"keep fewer checkpoints (--keep_last {self.keep_last - 1}; now {self.keep_last}), ")
        return (f"{last[0].upper()}{last[1:]}. Free space on that file system, {fewer}or write to another file "
                f"system (--weights_path). Exit code {EXIT_CHECKPOINT_FAILED}: the Slurm scripts do not requeue it, "
                "since a requeued job would meet the same disk.")

    # ------------------------------------------------------------------ load
    def load(self, folder: str | Path,
             check: Callable[[Path, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Restore the engine and this rank's RNG; returns the trainer state.

        Everything that can refuse the checkpoint runs before DeepSpeed touches the engine: the
        manifest and its files, the world size (ZeRO shards and data positions are per rank), and
        `check(folder, trainer_state)`, the caller's comparison of domains and model; otherwise a
        checkpoint of another run fails inside DeepSpeed with a KeyError or a shape error.
        """
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise ConfigError(f"--resume {folder}: not a complete checkpoint ({MANIFEST} is missing)")
        manifest = json.loads((folder / MANIFEST).read_text())
        missing = [f for f in manifest.get("files", []) if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"--resume {folder}: incomplete checkpoint: {len(missing)} file(s) of {MANIFEST} "
                              f"are missing, e.g. {missing[0]}")
        world_size = self.engine.info.world_size
        if manifest["world_size"] != world_size:
            raise ConfigError(f"--resume {folder}: the checkpoint belongs to a different run: world size: checkpoint "
                              f"{manifest['world_size']} vs now {world_size} (ZeRO shards and data positions are "
                              f"per rank; resume with {manifest['world_size']} ranks)")
        trainer_state = torch.load(folder / "trainer_state.pt", weights_only=True)
        if check is not None:
            check(folder, trainer_state)
        self.engine.load_checkpoint(str(folder), ENGINE_TAG)
        rank_file = folder / f"rank_{self.engine.info.rank}.pt"
        if rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=True))
        self.resumed_from = folder
        return trainer_state


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    part = folder / (MANIFEST + ".part")
    part.write_text(json.dumps(manifest, indent=1))
    os.replace(part, folder / MANIFEST)
