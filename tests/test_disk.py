"""Checkpoints that fit the disk (issue 18): retention, the space check, a clean stop when a write
fails, and `--resume auto` afterwards, with the real trainer (DeepSpeed ZeRO-3, gloo, CPU).

Two ways to fill a disk:

* a real one: a 4 MiB tmpfs mounted for the test (root needed; skipped with the reason otherwise).
  A tiny-model checkpoint is ~2.5 MB, so the first one fits and the second does not;
* a failing writer injected from the test side (a wrapper script that replaces `torch.save` before
  the trainer starts): "Disk quota exceeded" on rank 1 alone, halfway into its ZeRO shard, with two
  ranks started the way srun starts them (one process per rank, exit codes seen one by one).

Each asserts the message, the exit code (74 on every rank), the cleaned folder, and a `--resume
auto` that then finishes. About 1.5 minutes on 2 idle cores.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, base_env, free_port, read_json, run_train, small_run_args
from dreamprm.checkpoint import (MANIFEST, Checkpointer, complete_checkpoints, describe_write_error,
                                 estimate_checkpoint_bytes, folder_bytes, format_bytes, retention_plan)
from dreamprm.config import ConfigError, parse_args
from dreamprm.preemption import EXIT_CHECKPOINT_FAILED

FLAGS = ("--unroll_steps", "2", "--batch_size", "2", "--save_every_iterations", "2", "--dist_timeout", "60")

# Test-side fault injection: run launch/train.py after patching the process (never a user flag).
SKIP_SPACE_CHECK = """\
import runpy, sys
from dreamprm.checkpoint import Checkpointer
Checkpointer._check_space = lambda self, name: None  # let the real disk run full during the write
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

QUOTA_ON_ONE_RANK = """\
import errno, os, runpy, sys
import torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if (os.environ["RANK"] == os.environ["FAIL_RANK"] and os.environ["FAIL_IN"] in str(f)
            and "optim_states" in str(f)):
        with open(f, "wb") as out:  # a partial shard, as a write that hits the quota leaves it
            out.write(bytes(4096))
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(f))
    return _save(obj, f, *args, **kwargs)
torch.save = save
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def names(root: Path) -> list[str]:
    return [c.name for c in complete_checkpoints(root)]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or not (p / MANIFEST).is_file())


def error_line(stderr: str) -> str:
    """The one error message, which starts a line of its own (not glued to the progress bar)."""
    assert stderr.count("error: ") == 1, stderr[-4000:]
    return next(line for line in stderr.splitlines() if line.startswith("error: "))


# ====================================================================== pure parts
def make_checkpoints(root: Path, steps: list[int], final: set[int] = frozenset()) -> list[Path]:
    for step in steps:
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(json.dumps({"step": step, "final": step in final}))
    return complete_checkpoints(root)


def test_retention_keeps_the_newest_the_one_just_written_and_every_final(tmp_path):
    found = make_checkpoints(tmp_path, [2, 4, 6, 8, 10], final={4})
    by_step = {int(c.name.split("_")[1]): c for c in found}
    assert retention_plan(found, 2, keep=by_step[10]) == [by_step[2], by_step[6]]
    assert retention_plan(found, 1, keep=by_step[10]) == [by_step[2], by_step[6], by_step[8]]
    assert retention_plan(found, 0, keep=by_step[10]) == []  # 0 keeps everything
    assert retention_plan(found, 5, keep=by_step[10]) == []
    # A run that went back to an earlier step in the same folder: what it just wrote stays.
    assert by_step[6] not in retention_plan(found, 2, keep=by_step[6])


def test_keep_last_flag():
    assert parse_args([]).run.keep_last == 3
    assert parse_args(["--keep_last", "1"]).run.keep_last == 1
    with pytest.raises(ConfigError, match=r"--keep_last: must be >= 0 \(0 keeps every checkpoint\), got -1"):
        Checkpointer("unused", engine=None, keep_last=-1)


def test_write_errors_are_named():
    assert describe_write_error(OSError(errno.ENOSPC, "x")) == "No space left on device (ENOSPC)"
    assert describe_write_error(OSError(errno.EDQUOT, "x")) == "Disk quota exceeded (EDQUOT)"
    assert describe_write_error(OSError(errno.EIO, "x")) == "Input/output error (EIO)"
    # torch's legacy writer names the errno in a RuntimeError; its zip writer does not say why at all.
    legacy = RuntimeError("write(): fd 3 failed with No space left on device")
    assert describe_write_error(legacy).startswith("No space left on device (ENOSPC; RuntimeError: write()")
    zipped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert describe_write_error(zipped, free=0).startswith("No space left on device: 0 bytes free after the failure")
    assert describe_write_error(zipped, free=50 * 2**30) == f"RuntimeError: {zipped}"
    assert format_bytes(2445075) == "2.3 MiB (2,445,075 bytes)"


# ====================================================================== a real full disk (tmpfs)
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only); resized with `mount -o remount,size=...`."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); test_a_failed_write_on_one_rank... "
                    "covers the write failure with an injected writer")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_full_disk_stops_cleanly_and_resume_auto_finishes(small_disk, tiny_model, tmp_path):
    out, root = small_disk / "run", small_disk / "run" / "checkpoints"
    args = small_run_args(tiny_model, out, *FLAGS, "--iteration_num", "4", "--keep_last", "1")

    # 1. The first checkpoint fits; the space check refuses the second before writing anything.
    first = run_train(args, check=False)
    assert first.returncode == EXIT_CHECKPOINT_FAILED, first.stderr[-4000:]
    message = error_line(first.stderr)
    assert message.startswith("error: checkpoint step_00000004 not written: it needs about ")
    assert f" in {root} (the size of step_00000002), and that file system has " in message
    assert (f"free. Nothing was written. The last good checkpoint is {root / 'step_00000002'} "
            "(--resume auto continues from it). Free space on that file system, or write to another file system "
            "(--weights_path). Exit code 74: the Slurm scripts do not requeue it") in message
    assert "Traceback" not in first.stderr
    assert names(root) == ["step_00000002"] and leftovers(root) == []

    # 2. Resumed with the space check switched off (test side): the write itself meets the full disk.
    #    Debris of an earlier crash is removed by --resume auto first, and said so.
    (root / ".tmp-step_00000099").mkdir()
    (root / ".tmp-step_00000099" / "shard.pt").write_bytes(bytes(100_000))
    wrapper = tmp_path / "skip_space_check.py"
    wrapper.write_text(SKIP_SPACE_CHECK)
    second = subprocess.run([PYTHON, str(wrapper), str(REPO / "launch" / "train.py"), *args, "--resume", "auto"],
                            cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == EXIT_CHECKPOINT_FAILED, second.stderr[-4000:]
    assert f"resume: removed {root / '.tmp-step_00000099'} (" in second.stdout, second.stdout[-2000:]
    assert f"resumed from {root / 'step_00000002'} at step 2" in second.stdout
    message = error_line(second.stderr)
    assert message.startswith("error: checkpoint step_00000004 could not be written: No space left on device")
    assert f"while writing {root / '.tmp-step_00000004'}/" in message
    assert (f"The partial folder {root / '.tmp-step_00000004'} was removed. The last good checkpoint is "
            f"{root / 'step_00000002'}") in message
    # The checkpoint this run resumed from is still there: nothing newer was ever complete.
    assert names(root) == ["step_00000002"] and leftovers(root) == []

    # 3. More space; --resume auto finishes. Retention: only the final checkpoint is left.
    subprocess.run(["mount", "-o", "remount,size=12m", str(small_disk)], check=True)
    third = run_train(args + ["--resume", "auto"])
    assert f"resumed from {root / 'step_00000002'} at step 2" in third.stdout
    assert "done at step 4" in third.stdout
    assert names(root) == ["step_00000004"] and leftovers(root) == []
    assert read_json(root / "step_00000004" / MANIFEST)["final"] is True
    assert (out / "export" / "model.safetensors").is_file()


# ====================================================================== a failing writer, 2 ranks
def start_ranks(command: list[str], nproc: int, logs: Path, **env: str) -> list[subprocess.Popen]:
    """One process per rank with torch's env:// variables, as srun starts the trainer."""
    port = str(free_port())
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(nproc):
        rank_env = base_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
        with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=out, stderr=err))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, float]]:
    """(exit code, time it ended) of every rank."""
    ended: dict[int, tuple[int, float]] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(procs):
        for rank, proc in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = (proc.returncode, time.monotonic())
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            raise AssertionError(f"ranks still running after {timeout} s: {sorted(set(range(len(procs))) - set(ended))}")
        time.sleep(0.05)
    return [ended[rank] for rank in range(len(procs))]


@dataclass
class QuotaRun:
    root: Path
    failed: list[tuple[int, float]]  # (exit code, end time) per rank
    failed_logs: dict[int, tuple[str, str]]  # rank -> (stdout, stderr)
    resumed: list[tuple[int, float]]
    resumed_logs: dict[int, tuple[str, str]]


def read_logs(logs: Path, nproc: int) -> dict[int, tuple[str, str]]:
    return {r: ((logs / f"rank{r}.out").read_text(), (logs / f"rank{r}.err").read_text()) for r in range(nproc)}


@pytest.fixture(scope="module")
def quota_run(tiny_model, tmp_path_factory) -> QuotaRun:
    """2 ranks, a checkpoint every 2 steps; rank 1 alone hits the quota while writing its shard of the
    second checkpoint. Then the same job as a requeue starts it (--resume auto), with --keep_last 1."""
    base = tmp_path_factory.mktemp("quota")
    root = base / "run" / "checkpoints"
    args = small_run_args(tiny_model, base / "run", *FLAGS, "--iteration_num", "6")
    wrapper = base / "quota_on_one_rank.py"
    wrapper.write_text(QUOTA_ON_ONE_RANK)
    command = [PYTHON, str(wrapper), str(REPO / "launch" / "train.py"), *args]
    failed = wait_ranks(start_ranks(command, 2, base / "failed", FAIL_RANK="1", FAIL_IN=".tmp-step_00000004"))
    failed_logs = read_logs(base / "failed", 2)
    assert names(root) == ["step_00000002"] and leftovers(root) == [], failed_logs
    command = [PYTHON, str(REPO / "launch" / "train.py"), *args, "--resume", "auto", "--keep_last", "1"]
    resumed = wait_ranks(start_ranks(command, 2, base / "resumed"))
    return QuotaRun(root, failed, failed_logs, resumed, read_logs(base / "resumed", 2))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_failed_write_on_one_rank_stops_every_rank_with_one_message(quota_run):
    root, logs = quota_run.root, quota_run.failed_logs
    assert [code for code, _ in quota_run.failed] == [EXIT_CHECKPOINT_FAILED] * 2, logs
    ends = [t for _, t in quota_run.failed]
    assert max(ends) - min(ends) < 10, "the ranks did not stop together"
    assert "error: " not in logs[1][1] and "Traceback" not in logs[0][1] + logs[1][1]  # one message, rank 0's
    shard = root / ".tmp-step_00000004" / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert error_line(logs[0][1]) == (
        f"error: checkpoint step_00000004 could not be written: rank 1: Disk quota exceeded (EDQUOT) while writing "
        f"{shard}. The partial folder {root / '.tmp-step_00000004'} was removed. The last good checkpoint is "
        f"{root / 'step_00000002'} (--resume auto continues from it). Free space on that file system, keep fewer "
        "checkpoints (--keep_last 2; now 3), or write to another file system (--weights_path). Exit code 74: the "
        "Slurm scripts do not requeue it, since a requeued job would meet the same disk.")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_auto_after_the_failure_finishes_and_keeps_the_last(quota_run):
    root, logs = quota_run.root, quota_run.resumed_logs
    assert [code for code, _ in quota_run.resumed] == [0, 0], logs[0][1][-4000:]
    assert f"resumed from {root / 'step_00000002'} at step 2" in logs[0][0] and "done at step 6" in logs[0][0]
    # Every rank's shards went with the folders retention deleted; the final checkpoint has both.
    assert names(root) == ["step_00000006"] and leftovers(root) == []
    manifest = read_json(root / "step_00000006" / MANIFEST)
    assert manifest["final"] is True and manifest["world_size"] == 2
    assert sorted(f for f in manifest["files"] if f.endswith("optim_states.pt")) == [
        f"engine/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert (root.parent / "export" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_first_checkpoint_estimate_is_close_to_the_measured_size(quota_run, tiny_model):
    from dreamprm.model.loading import build_prm
    params = sum(p.numel() for p in build_prm(tiny_model, "logits", seed=1).parameters())
    written = folder_bytes(quota_run.root / "step_00000006")
    _, estimate = estimate_checkpoint_bytes(params, params, world_size=2, weight_bytes=4)
    assert written <= estimate <= 1.4 * written, (written, estimate)


@pytest.mark.slow
def test_estimate_memory_prints_checkpoint_sizes():
    proc = subprocess.run([PYTHON, str(REPO / "launch" / "estimate_memory.py"), "--markdown", "--formula"], cwd=REPO,
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 8,291,375,616 parameters x 12 bytes = 92.7 GiB, over 16 ranks 5.8 GiB; 4 checkpoints + the bf16 export.
    assert "| Qwen2-VL-7B | 2 x 8 | 5.8 GiB | 92.7 GiB | 15.4 GiB | 386 GiB |" in proc.stdout, proc.stdout
    assert "| Qwen2-VL-2B | 1 x 8 | 3.1 GiB | 24.7 GiB | 4.1 GiB | 103 GiB |" in proc.stdout, proc.stdout
    # InternVL3-1B-hf: 938,193,024 parameters (its model card's 938M), untied lm_head.
    assert "| InternVL3-1B | 0.938 B | 136 M | 1 x 8 | none | 2.5 GiB | 6.1 GiB |" in proc.stdout, proc.stdout
    assert "| InternVL3-1B | 1 x 8 | 1.3 GiB | 10.5 GiB | 1.7 GiB | 44 GiB |" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_estimate_memory_counts_agree_with_the_models_built_on_the_meta_device():
    """The closed forms equal transformers' own models (Qwen2-VL 2B/7B, InternVL3-1B-hf) parameter for parameter."""
    proc = subprocess.run([PYTHON, str(REPO / "launch" / "estimate_memory.py"), "--check", "--markdown"], cwd=REPO,
                          env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "internvl3-1b: meta 938,193,024 / 135,899,904; formula 938,193,024 / 135,899,904: match" in proc.stdout
    assert proc.stdout.count(": match") == 3, proc.stdout
