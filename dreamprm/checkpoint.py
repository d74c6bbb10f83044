"""Atomic, resumable checkpoints.

Layout: ``<weights_path>/checkpoints/step_00000100/`` holding the DeepSpeed engine state
(``engine/``, every rank's shards), ``trainer_state.pt`` (replicated state: domain weights, their
optimiser, data positions, counters; written by rank 0), ``rank_<r>.pt`` (each rank's RNG states)
and ``manifest.json``, written last. A checkpoint is written under a temporary name and renamed
when every rank has finished; only folders with a manifest count, so a run killed mid-save leaves
the previous checkpoint as the newest complete one. Everything we read back goes through
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dreamprm.config import ConfigError

MANIFEST = "manifest.json"
ENGINE_TAG = "engine"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (a run's checkpoints folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


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


class Checkpointer:
    def __init__(self, root: str | Path, engine: Any, keep_last: int = 3):
        self.root = Path(root)
        self.engine = engine
        self.keep_last = keep_last

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        rank, is_main = self.engine.info.rank, self.engine.is_main
        name = checkpoint_name(step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.engine.barrier()
        self.engine.save_checkpoint(str(tmp), ENGINE_TAG, client_state={})
        torch.save(rng_state(), tmp / f"rank_{rank}.pt")
        if is_main:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        self.engine.barrier()
        if is_main:
            if final.exists():  # a complete checkpoint of the same step (e.g. re-saved at the end)
                shutil.rmtree(final)
            os.replace(tmp, final)
            manifest = {"step": step, "world_size": self.engine.info.world_size, "time": time.time(),
                        "files": sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())}
            part = final / (MANIFEST + ".part")
            part.write_text(json.dumps(manifest, indent=1))
            os.replace(part, final / MANIFEST)
            self._prune()
        self.engine.barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

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
        return trainer_state
