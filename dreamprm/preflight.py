"""Every check that can refuse a training run, before torch, transformers or DeepSpeed is imported.

A mistake costs a second, not a minute: the flags, the DeepSpeed JSON (against the flags), the
reward model's folder, both record files, the `--resume` target, the output folder, and the
configurations under which the upper level could never move a weight, are all checked here by
every rank from the launcher's environment alone (no process group yet), and every problem found
is reported in one message. Nothing is written. `Trainer` takes the records loaded here, so they
are read once.

This module imports the standard library, PIL (through `dreamprm.data.records`) and our stdlib-only
modules; `tests/test_first_hour.py` checks that it stays so.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamprm.checkpoint_layout import CHECKPOINTS, MANIFEST, complete_checkpoints
from dreamprm.config import (TINY_MODEL, ConfigError, TrainConfig, load_ds_config, precision_problem,
                             resolve_ds_config)
from dreamprm.data.records import (MAX_REPORTED_PROBLEMS, DataValidationError, ImageChecker, MetaRecord, TrainRecord, load_meta_records,
                                   load_train_records)


class StartupError(ValueError):
    """Every problem found before start-up; `problems` holds one line each. Exit code 2."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems, nothing was started or written:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(message)


@dataclass
class Records:
    train: list[TrainRecord]
    meta: list[MetaRecord]
    skipped: list[dict[str, Any]]  # --skip_invalid_records: {"file", "record", "reasons"} per record left out
    warnings: list[str] = field(default_factory=list)  # printed once at start-up (`learning_warnings`)


def launcher_world_size() -> int:
    """The world size the launcher announced (torchrun, deepspeed, srun scripts: WORLD_SIZE; mpirun:
    OMPI_COMM_WORLD_SIZE; MPICH: PMI_SIZE); 1 for a plain `python`."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def launcher_rank() -> int:
    """This process's rank as the launcher announced it (0 for a plain `python`): who prints the errors."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def check_training(config: TrainConfig, world_size: int) -> Records:
    """The records of a run that can start, or `StartupError` with every problem found."""
    problems = config.problems()
    # The DeepSpeed JSON settles untyped flags (batch size, precision): later checks use its values,
    # on a copy, since the trainer resolves it again with the device it finds.
    settled = copy.deepcopy(config)
    try:
        resolve_ds_config(load_ds_config(config.run.deepspeed), settled, world_size=world_size, on_gpu=False,
                          source=config.run.deepspeed)
        problems += [p for p in [precision_problem(settled)] if p]
    except ConfigError as err:
        problems.append(str(err))
        settled = config
    problems += model_problems(config.model.reward_model)
    problems += path_problems(config)
    problems += resume_problems(config, world_size)
    records = None
    try:
        records = load_records(settled, world_size)
    except (DataValidationError, ConfigError) as err:
        problems += getattr(err, "problems", None) or [str(err)]
    if records is not None:
        problems += learning_problems(settled, records, world_size)
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = [f"... and {len(problems) - len(shown)} more problems"] if len(problems) > len(shown) else []
        raise StartupError(shown + more + image_root_hint(problems, config))
    records.warnings = learning_warnings(settled, records, world_size)
    return records


def model_problems(name: str) -> list[str]:
    """--reward_model: 'tiny', a folder with config.json, or a hub-style name in the local cache."""
    if name == TINY_MODEL:
        return []
    path = Path(name)
    if not path.exists() and "/" in name and not name.startswith(("/", ".")) and hub_snapshot(name):
        return []
    if not path.exists():
        return [f"--reward_model {name}: no such directory, and not in the local Hugging Face cache (nothing is "
                f"downloaded: pass a local Qwen2-VL directory, or '{TINY_MODEL}' for the offline tiny model)"]
    if not (path / "config.json").is_file():
        return [f"--reward_model {name}: config.json is missing, so this is not a model directory"]
    return []


def hub_snapshot(name: str) -> Path | None:
    """A cached snapshot of the hub model `name` holding config.json (the cache's documented layout:
    <cache>/models--ORG--NAME/snapshots/<revision>/), without importing huggingface_hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    snapshots = Path(cache) / ("models--" + name.replace("/", "--")) / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[0].parent if found else None


def path_problems(config: TrainConfig) -> list[str]:
    """--image_root and --weights_path, checked without writing anything."""
    found = []
    root = config.data.image_root
    if root is not None and not Path(root).is_dir():
        found.append(f"--image_root {root}: no such folder")
    if config.run.weights_path:
        out = Path(config.run.weights_path)
        if out.exists() and not out.is_dir():
            found.append(f"--weights_path {out}: exists and is not a folder")
        else:
            existing = next(p for p in [out, *out.absolute().parents] if p.exists())
            if not existing.is_dir():
                found.append(f"--weights_path {out}: not writable ({existing} is a file, not a folder)")
            elif not os.access(existing, os.W_OK | os.X_OK):
                found.append(f"--weights_path {out}: not writable (no write permission in {existing})")
    return found


def resume_problems(config: TrainConfig, world_size: int) -> list[str]:
    """--resume: 'auto' with a run folder to look in, or a complete checkpoint of this world size."""
    resume, out = config.run.resume, config.run.weights_path
    if not resume:
        return []
    if resume == "auto":
        if not out:
            return ["--resume auto looks for checkpoints in --weights_path, which is not given (a new "
                    "runs/<timestamp> folder would start from scratch): pass --weights_path RUN_FOLDER"]
        return []
    folder = Path(resume)
    if not folder.exists():
        return [f"--resume {folder}: no such folder" + newest_hint(Path(out) if out else None)]
    if (folder / MANIFEST).is_file():
        return checkpoint_problems(folder, world_size)
    if (folder / CHECKPOINTS).is_dir():
        newest = complete_checkpoints(folder / CHECKPOINTS)
        where = (f"its newest complete checkpoint is {newest[-1]}: pass --resume {newest[-1]}, or "
                 if newest else "it holds no complete checkpoint; to continue it when it has one, pass ")
        return [f"--resume {folder}: this is a run folder, not a checkpoint; {where}"
                f"--weights_path {folder} --resume auto"]
    return [f"--resume {folder}: not a checkpoint ({MANIFEST} is missing; checkpoints are the folders "
            f"<weights_path>/{CHECKPOINTS}/step_N)" + newest_hint(folder.parent if folder.parent.name == CHECKPOINTS
                                                              else None)]


def newest_hint(run_or_checkpoints: Path | None) -> str:
    """"; the newest complete checkpoint there is ..." when a folder holds one."""
    if run_or_checkpoints is None:
        return ""
    root = run_or_checkpoints if run_or_checkpoints.name == CHECKPOINTS else run_or_checkpoints / CHECKPOINTS
    newest = complete_checkpoints(root)
    return f"; the newest complete checkpoint in {root} is {newest[-1]}" if newest else ""


def checkpoint_problems(folder: Path, world_size: int) -> list[str]:
    """A complete checkpoint (every file of its manifest present) written by `world_size` ranks."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return [f"--resume {folder}: {MANIFEST} cannot be read ({err})"]
    missing = [f for f in manifest.get("files", []) if not (folder / f).is_file()]
    if missing:
        return [f"--resume {folder}: incomplete checkpoint: {len(missing)} file(s) of {MANIFEST} are missing, "
                f"e.g. {missing[0]}"]
    saved = manifest.get("world_size")
    if saved is not None and saved != world_size:
        return [f"--resume {folder}: the checkpoint belongs to a different run: world size: checkpoint {saved} vs "
                f"now {world_size} (ZeRO shards and data positions are per rank; resume with {saved} ranks)"]
    return []


# "FILE:record N: field: what is wrong" (or "FILE:line N: ..." in JSON Lines): a problem of one record.
RECORD_PROBLEM = re.compile(r"^(?P<file>.*?):(?P<unit>record|line) (?P<index>\d+): (?P<reason>.*)$")


def load_records(config: TrainConfig, world_size: int) -> Records:
    """Both record files validated completely, every problem reported at once; with
    --skip_invalid_records, records with problems are left out (and listed) instead."""
    problems: list[str] = []
    images = ImageChecker()
    data, b = config.data, config.bilevel
    train = load_train_records(data.train_json_file, data.image_root, problems=problems, images=images)
    meta = load_meta_records(data.meta_json_file, data.image_root, problems=problems, images=images)
    skipped: list[dict[str, Any]] = []
    if problems and data.skip_invalid_records:
        problems, skipped = split_record_problems(problems)
        left_out = {(s["file"], s["record"]) for s in skipped}
        train = [r for r in train if source_of(r.source) not in left_out]
        meta = [r for r in meta if source_of(r.source) not in left_out]
    if problems:
        raise DataValidationError(problems)
    global_batch = config.optim.batch_size * world_size
    if len(train) < global_batch:
        problems.append(f"{data.train_json_file}: file: {len(train)} records cannot fill one global batch of "
                        f"{global_batch} (--batch_size x world size)")
    meta_global = b.meta_batch_size * world_size
    if not b.baseline and b.meta_loss == "pairwise" and meta_global < 2:
        problems.append("--meta_loss pairwise compares right with wrong meta chains, and one upper step sees "
                        f"{meta_global} chain (--meta_batch_size x world size): use --meta_batch_size 8 (the "
                        "default) or more, or --meta_loss mse")
    if not b.baseline and len(meta) < meta_global:
        problems.append(f"{data.meta_json_file}: file: {len(meta)} records cannot fill one meta batch of "
                        f"{meta_global} (--meta_batch_size x world size)")
    if problems:
        raise DataValidationError(problems)
    return Records(train, meta, skipped)


def learning_problems(config: TrainConfig, records: Records, world_size: int) -> list[str]:
    """Configurations under which the upper level can never move a weight: refused, since such a
    run would train to the end, exit 0, and say nothing (the rest are warned about at run time)."""
    b = config.bilevel
    if b.baseline:
        return []
    found = []
    labels = {r.label for r in records.meta}
    if b.meta_loss == "pairwise" and len(labels) < 2:
        kind = "right (true_false: true)" if labels == {1.0} else "wrong (true_false: false)"
        found.append(f"{config.data.meta_json_file}: file: every meta chain is {kind}, so --meta_loss pairwise has no "
                     "(right, wrong) pair to compare and the weights cannot move: add chains of the other kind, or "
                     "use --meta_loss mse")
    domains = sorted({r.domain for r in records.train})
    if len(domains) == 1 and b.weighting == "domain":
        found.append(f"{config.data.train_json_file}: dataset: every training record is in domain {domains[0]!r}, and "
                     "one domain's weight is 1 by construction (weights have mean 1): give records of several "
                     "domains, or train with --baseline (vanilla) or --weighting instance")
    return found


def learning_warnings(config: TrainConfig, records: Records, world_size: int) -> list[str]:
    """What may be meant but is worth a loud word once, at start-up: a run that leaves the weights
    where they are (a first stage continued with --resume), a fresh run in a folder of checkpoints."""
    b, o, run = config.bilevel, config.optim, config.run
    found = []
    if run.weights_path and not run.resume:
        existing = complete_checkpoints(Path(run.weights_path) / CHECKPOINTS)
        if existing:
            found.append(f"--weights_path {run.weights_path} already holds checkpoints (newest {existing[-1].name}) "
                         "and --resume is not given: this run starts from scratch in that folder; add --resume auto "
                         "to continue it instead")
    if b.baseline:
        return found
    # Lower steps the data allows (the sampler's batches per epoch, rounded up to stay on the safe side).
    per_epoch = math.ceil(len(records.train) / max(1, o.batch_size * world_size * o.gradiant_accumulation))
    steps = min(run.iteration_num, run.max_epoch * per_epoch)
    if steps < b.unroll_steps and not run.resume:
        found.append(f"--unroll_steps {b.unroll_steps}: this run makes only {steps} lower step(s) (--iteration_num "
                f"{run.iteration_num}, --max_epoch {run.max_epoch}), so no upper step runs and the domain weights "
                f"stay at 1 unless the run is continued with --resume: raise --iteration_num to {b.unroll_steps} "
                "or more, or lower --unroll_steps")
    return found


def image_root_hint(problems: list[str], config: TrainConfig) -> list[str]:
    """Missing images resolve against each JSON file's folder unless --image_root says otherwise: say so once."""
    if not any("image file" in p and "does not exist" in p for p in problems):
        return []
    if config.data.image_root is not None:
        return [f"--image_root {config.data.image_root}: relative image paths resolve against it; leave it out if "
                "they are relative to each JSON file's folder"]
    folders = sorted({str(Path(f).resolve().parent) for f in (config.data.train_json_file,
                                                               config.data.meta_json_file)})
    return [f"--image_root: relative image paths resolve against each JSON file's folder ({', '.join(folders)}); "
                       "pass --image_root FOLDER if they are relative to another folder"]


def source_of(source: str) -> tuple[str, int]:
    """A record's "FILE:record N" as (FILE, N)."""
    file, _, index = source.rpartition(":record ")
    return file, int(index)


def split_record_problems(problems: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(problems of whole files, which stay fatal; the records to leave out, each with its reasons)."""
    fatal, by_record = [], {}
    for problem in problems:
        match = RECORD_PROBLEM.match(problem)
        if match is None:
            fatal.append(problem)
            continue
        key = (match["file"], int(match["index"]), match["unit"])
        by_record.setdefault(key, []).append(match["reason"])
    skipped = [{"file": file, unit: index, "reasons": reasons} for (file, index, unit), reasons in by_record.items()]
    return fatal, skipped


def reason_counts(skipped: list[dict[str, Any]]) -> dict[str, int]:
    """How many records each kind of problem left out ("field: what", without the record's values)."""
    counts: dict[str, int] = {}
    for record in skipped:
        stems = set()
        for reason in record["reasons"]:
            field, _, message = reason.partition(": ")
            stems.add(f"{field}: " + re.split(r" \(|, found |: | of ", message)[0])
        for stem in stems:
            counts[stem] = counts.get(stem, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
