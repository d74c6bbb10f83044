"""Where checkpoints live and which are complete: the standard library only, so that a `--resume`
target is checked before torch is imported (`dreamprm.preflight`); `dreamprm.checkpoint` writes them."""
from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"  # written last: a step_* folder without it is a save that did not finish
CHECKPOINTS = "checkpoints"  # the folder under --weights_path


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (a run's checkpoints folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))
