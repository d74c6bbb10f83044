"""Reliability (issue 8): numerical faults, preemption, kills and loading safety, with real processes.

Every test runs ``launch/train.py`` for real (DeepSpeed ZeRO-3, gloo, CPU): 2 ranks under torchrun
where ranks matter, 1 plain process where they do not. Signals and kills go to real PIDs:

* SIGUSR1 goes to ONE worker PID, rank 1's (torchrun starts each worker in its own session and, by
  default, dies of SIGUSR1 itself instead of forwarding it): every rank must stop with it; SIGTERM
  goes to torchrun, which forwards it to its workers and gives them 30 s (``--shutdown-timeout``)
  before SIGKILL.
* torchrun exits 1 in both cases: it reports a worker's 75 as a failure ("exitcode : 75" in its
  report) and re-raises its own SIGTERM. The trainer's 75 reaches the job script only when the
  trainer is the task itself (srun, mpirun, plain python); see slurm/README.md.

Runs are small (``--batch_size 2 --unroll_steps 3``, 10 steps, fp32) and shared between tests by
module fixtures; with 3 steps per segment most signals land mid-segment, some at a segment's end.
``--weight_check_every 1`` makes every upper step all-reduce a checksum of the domain weights and
fail the run if the ranks disagree. The whole file takes about 4 minutes on 2 cores.
"""
from __future__ import annotations

import ast
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import (DEMO, INJECT_FAULTS, PYTHON, REPO, base_env, exported_tensors, launch_command, read_json,
                      read_scalars, run_train, small_run_args)
from dreamprm.checkpoint import MANIFEST, complete_checkpoints

N = 10
UNROLL = 3
STEP_FLAGS = ("--batch_size", "2", "--unroll_steps", str(UNROLL), "--weight_check_every", "1")
# Rank 0 alone gets the NaN. AdamW and the mse objective: every applied upper step moves the domain
# logits, so a skipped one shows (the default gated optimiser stays shut for its first steps, and the
# pairwise objective has nothing to compare in a meta batch of two chains with the same label).
FAULT_PLAN = "lower:3;upper:2"  # tests/inject_faults.py
FAULTS = ("--meta_optimizer", "adamw", "--meta_loss", "mse")
EXIT_PREEMPTED = 75
DEAD_RANK_LIMIT_S = 60
KILL_STEPS = 6


def flags(model: Path, out: Path, *extra: str, steps: int = N) -> list[str]:
    return small_run_args(model, out, *STEP_FLAGS, "--iteration_num", str(steps), *extra)


class Job:
    """A training job started in the background in its own session; stdout/stderr go to files."""

    def __init__(self, args: list[str], nproc: int, logs: Path, command: list[str] | None = None,
                 env: dict[str, str] | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.out_file, self.err_file = logs / "stdout.txt", logs / "stderr.txt"
        self.total = int(args[args.index("--iteration_num") + 1])
        with open(self.out_file, "w") as out, open(self.err_file, "w") as err:
            self.proc = subprocess.Popen(command or launch_command(REPO / "launch" / "train.py", args, nproc),
                                         cwd=REPO, env=env or base_env(), stdout=out, stderr=err,
                                         start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.out_file.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_file.read_text(errors="replace")

    def tail(self) -> str:
        return f"--- stdout\n{self.stdout[-2000:]}\n--- stderr\n{self.stderr[-4000:]}"

    def steps_done(self) -> int:
        """Lower steps the progress bar (rank 0, stderr) has shown."""
        return max((int(n) for n in re.findall(rf"\|\s*(\d+)/{self.total} \[", self.stderr)), default=0)

    def wait_for(self, condition, what: str, timeout: float = 240, poll: float = 0.02) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended with {self.proc.returncode} before {what}\n{self.tail()}")
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.tail()}")

    def workers(self) -> dict[int, int]:
        """rank -> PID of torchrun's worker processes (its children), from /proc."""
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        ranks = {}
        for pid in map(int, found):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            if "RANK" in env:
                ranks[int(env["RANK"])] = pid
        return ranks

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not end within {timeout} s\n{self.tail()}") from None

    def kill(self) -> None:
        pids = list(self.workers().values())
        for pid in [self.proc.pid, *pids]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(30)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def fp32_parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 parameters reassembled from a checkpoint's ZeRO-3 shards (DeepSpeed's own tool)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="engine")


def trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True)


# ====================================================================== numerical faults
@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """2 ranks, N steps without interruption; NaN on rank 0 at lower step 3 and upper step 2."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_train(flags(tiny_model, out, *FAULTS), nproc=2, faults=FAULT_PLAN)
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_nonfinite_updates_are_skipped_on_every_rank_and_counted(reference):
    stdout = (reference / "stdout.txt").read_text()
    assert "step 3: non-finite lower-level loss or hypergradient; update skipped on every rank" in stdout
    assert f"upper step 2 (after step {2 * UNROLL}): non-finite upper-level" in stdout
    assert f"done at step {N}" in stdout  # with --weight_check_every 1: the ranks agreed at every upper step
    scalars = read_scalars(reference / "tb")
    assert scalars["faults/skipped_lower"][-1][1] == 1
    assert scalars["faults/skipped_upper"][-1][1] == 1
    # The skipped second upper step left the domain weights as the first one set them.
    for name in read_json(reference / "domains.json"):
        weights = dict(scalars[f"domain_weight/{name}"])
        assert weights[2 * UNROLL] == weights[UNROLL], name
        assert weights[3 * UNROLL] != weights[2 * UNROLL], name
    summary = read_json(reference / "domain_weights.json")
    assert all(math.isfinite(w) for w in summary["weights"].values())
    assert all(math.isfinite(a) for a in summary["logits"].values())
    assert all_finite(exported_tensors(reference / "export").values())
    state = trainer_state(complete_checkpoints(reference / "checkpoints")[-1])
    assert state["state"]["skipped_lower"] == 1 and state["state"]["skipped_upper"] == 1
    assert state["state"]["upper_steps"] == N // UNROLL


@pytest.mark.slow
@pytest.mark.multiprocess
def test_too_many_nonfinite_updates_stop_with_a_message_and_a_good_checkpoint(tiny_model, tmp_path):
    proc = run_train(flags(tiny_model, tmp_path, "--max_bad_steps", "3"), nproc=2, check=False, faults="lower:3,4,5")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert ("error: 3 non-finite lower-level updates in a row at step 5 (--max_bad_steps 3); nothing non-finite "
            "was applied and the last good state is saved in") in proc.stderr
    checkpoints = complete_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_00000005"]
    params = fp32_parameters(checkpoints[-1])
    assert params and all_finite(params.values())
    state = trainer_state(checkpoints[-1])
    assert state["state"]["bad_lower_in_a_row"] == 3 and state["state"]["skipped_lower"] == 3
    assert all_finite(state["domain_weights"].values())
    assert not (tmp_path / "export").exists()


# ====================================================================== preemption and resume
@dataclass
class Preempted:
    signal: str
    out: Path
    rc: int  # torchrun's exit code
    stdout: str
    stderr: str
    stop_s: float  # signal -> torchrun gone
    checkpoints: list[str]  # complete checkpoints right after the stop
    left_at_stop: list[str]  # everything in the output folder right after the stop
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module", params=["SIGUSR1", "SIGTERM"])
def preempted(request, tiny_model, tmp_path_factory, reference) -> Preempted:
    """The reference run again, stopped by a signal after 2+ steps, then resumed with --resume auto."""
    base = tmp_path_factory.mktemp(f"preempted_{request.param}")
    out = base / "run"
    args = flags(tiny_model, out, *FAULTS)
    job = Job(args, 2, base / "logs", command=launch_command(INJECT_FAULTS, [FAULT_PLAN, *args], 2))
    job.wait_for(lambda: job.steps_done() >= 2 and len(job.workers()) == 2, "2 training steps")
    sent = time.monotonic()
    if request.param == "SIGUSR1":
        os.kill(job.workers()[1], signal.SIGUSR1)  # rank 1 alone: the all-reduce must tell rank 0
    else:
        os.kill(job.proc.pid, signal.SIGTERM)  # torchrun forwards it to its workers
    rc = job.wait(120)
    stop_s = time.monotonic() - sent
    checkpoints = [c.name for c in complete_checkpoints(out / "checkpoints")]
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if "tb" not in p.relative_to(out).parts)
    resumed = run_train(flags(tiny_model, out, *FAULTS, "--resume", "auto"), nproc=2, faults=FAULT_PLAN)
    print(f"\n{request.param}: torchrun exit {rc} {stop_s:.1f} s after the signal; checkpoints {checkpoints}")
    return Preempted(request.param, out, rc, job.stdout, job.stderr, stop_s, checkpoints, left, resumed)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_signal_checkpoints_on_every_rank_and_exits_75(preempted):
    assert len(preempted.checkpoints) == 1, preempted.stderr[-3000:]
    step = int(preempted.checkpoints[0].split("_")[1])
    assert 1 <= step < N
    # Rank 0 logs it; under SIGUSR1 only rank 1 was signalled, so rank 0 knows it from the all-reduce.
    assert re.search(rf"(SIGUSR1|SIGTERM|signal): checkpoint written at step {step}; exiting with code "
                     rf"{EXIT_PREEMPTED}", preempted.stdout), preempted.stdout[-2000:]
    checkpoint = preempted.out / "checkpoints" / preempted.checkpoints[0]
    manifest = read_json(checkpoint / MANIFEST)
    assert manifest["world_size"] == 2 and manifest["step"] == step
    assert {"rank_0.pt", "rank_1.pt", "trainer_state.pt"} <= set(manifest["files"])
    assert sum(f.startswith("engine/") and f.endswith("optim_states.pt") for f in manifest["files"]) == 2
    assert not any(".tmp-" in p for p in preempted.left_at_stop)
    assert not any(p.startswith("export") or p.startswith("domain_weights") for p in preempted.left_at_stop)
    # torchrun turns the workers' 75 into its own 1 (see the module docstring).
    assert preempted.rc == 1
    if preempted.signal == "SIGUSR1":
        # torchrun's report: rank 0, which was not signalled, exited 75 (it learnt of the signal from the
        # step's all-reduce and checkpointed with rank 1: both ranks' files are in the manifest above);
        # rank 1 exited 75 too, or torchrun ended it (SIGTERM) once rank 0 had exited first.
        exits = dict(re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", preempted.stderr))
        assert exits.get("0") == str(EXIT_PREEMPTED), preempted.stderr[-3000:]
        assert exits.get("1") in (None, str(EXIT_PREEMPTED), "-15"), preempted.stderr[-3000:]
    assert preempted.stop_s < 30


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_after_preemption_is_bit_exact(preempted, reference):
    step = int(preempted.checkpoints[0].split("_")[1])
    assert f"resumed from {preempted.out / 'checkpoints' / preempted.checkpoints[0]} at step {step}" in (
        preempted.resumed.stdout)
    assert read_json(preempted.out / "domain_weights.json") == read_json(reference / "domain_weights.json")
    a, b = exported_tensors(reference / "export"), exported_tensors(preempted.out / "export")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} exported tensors differ, e.g. {differ[:3]}"
    final_a = trainer_state(complete_checkpoints(reference / "checkpoints")[-1])
    final_b = trainer_state(complete_checkpoints(preempted.out / "checkpoints")[-1])
    assert final_a["state"] == final_b["state"]
    for x, y in zip(final_a["meta_optimizer"]["state"].values(), final_b["meta_optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_replicated_state_after_resume(preempted):
    # --weight_check_every 1: after the resume every upper step compared the domain-weight checksums of
    # the two ranks and would have failed the run on a difference.
    assert f"done at step {N}" in preempted.resumed.stdout
    state = trainer_state(complete_checkpoints(preempted.out / "checkpoints")[-1])
    assert state["state"]["step"] == N
    assert all_finite(state["domain_weights"].values())
    meta = state["meta_optimizer"]
    assert meta["state"], "the meta-optimiser state was saved"
    assert all(all_finite(v for v in s.values() if torch.is_tensor(v)) for s in meta["state"].values())
    assert meta["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert state["domains"] == read_json(preempted.out / "domains.json")


# ====================================================================== kill -9 during a save
@dataclass
class KilledInSave:
    out: Path
    partial: list[str]  # what the kill left besides complete checkpoints
    newest_before: Path  # the newest complete checkpoint right after the kill
    newest_manifest: dict
    newest_files_present: bool  # every file its manifest lists exists
    newest_step: int  # the step in its trainer_state.pt (loaded with weights_only=True)
    resumed: subprocess.CompletedProcess
    loads: list[dict]  # torch.load calls of the resumed run


LOAD_RECORDER = """\
import json, os, runpy, sys
import torch
_load = torch.load
def load(f, *args, **kwargs):
    with open(os.environ["TORCH_LOAD_LOG"], "a") as log:
        log.write(json.dumps({"file": str(f), "weights_only": kwargs.get("weights_only", "default")}) + "\\n")
    return _load(f, *args, **kwargs)
torch.load = load
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def killed_in_save(tiny_model, tmp_path_factory) -> KilledInSave:
    """1 rank saving after every step, SIGKILLed while a checkpoint is being written; then crash debris
    a later save would have left is added, and the run is resumed with --resume auto to the end."""
    base = tmp_path_factory.mktemp("killed_in_save")
    out, root = base / "run", base / "run" / "checkpoints"
    args = flags(tiny_model, out, "--save_every_iterations", "1", steps=KILL_STEPS)
    job = Job(args, 1, base / "logs")
    job.wait_for(lambda: complete_checkpoints(root) and list(root.glob(".tmp-step_*")),
                 "a save after a complete checkpoint", poll=0.002)
    os.killpg(job.proc.pid, signal.SIGKILL)
    assert job.wait(30) == -signal.SIGKILL
    partial = sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-") or not (p / MANIFEST).is_file())
    newest = complete_checkpoints(root)[-1]
    manifest = read_json(newest / MANIFEST)
    present = all((newest / f).is_file() for f in manifest["files"])
    step = trainer_state(newest)["state"]["step"]
    # What a kill in a later save would leave: a temporary folder, and a renamed one without manifest.
    shutil.copytree(newest, root / ".tmp-step_00000099")
    (root / "step_00000050").mkdir()
    shutil.copy(newest / "trainer_state.pt", root / "step_00000050")
    assert complete_checkpoints(root)[-1] == newest
    recorder = base / "record_loads.py"
    recorder.write_text(LOAD_RECORDER)
    log = base / "loads.jsonl"
    resumed = subprocess.run([PYTHON, str(recorder), str(REPO / "launch" / "train.py"), *args, "--resume", "auto"],
                             cwd=REPO, env=base_env(TORCH_LOAD_LOG=str(log)), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    loads = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return KilledInSave(out, partial, newest, manifest, present, step, resumed, loads)


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(killed_in_save):
    assert killed_in_save.partial, "the kill did not land inside a save"
    assert all(p.startswith(".tmp-step_") or p.startswith("step_") for p in killed_in_save.partial)
    k = killed_in_save
    assert k.newest_files_present
    assert k.newest_step == k.newest_manifest["step"] == int(k.newest_before.name.split("_")[1])


@pytest.mark.slow
def test_resume_auto_picks_the_newest_complete_checkpoint(killed_in_save):
    newest = killed_in_save.newest_before
    output = killed_in_save.resumed.stdout
    assert f"resumed from {newest} at step {int(newest.name.split('_')[1])}" in output, output[-2000:]
    assert f"done at step {KILL_STEPS}" in output
    root = killed_in_save.out / "checkpoints"
    assert not list(root.glob(".tmp-*")), "stale temporary folders are removed at the next save"
    kept = [f"step_{step:08d}" for step in range(KILL_STEPS - 2, KILL_STEPS + 1)]  # the last 3
    assert [c.name for c in complete_checkpoints(root)] == kept
    assert not (root / "step_00000050" / MANIFEST).exists()


# ====================================================================== a rank that dies
@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_rank_ends_the_whole_job_quickly(tiny_model, tmp_path):
    job = Job(flags(tiny_model, tmp_path / "run", "--dist_timeout", "30", steps=400), 2, tmp_path / "logs")
    job.wait_for(lambda: job.steps_done() >= 2 and len(job.workers()) == 2, "2 training steps")
    workers = job.workers()
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    rc = job.wait(DEAD_RANK_LIMIT_S + 30)
    elapsed = time.monotonic() - killed
    print(f"\nrank 1 SIGKILLed: torchrun exited {rc} after {elapsed:.1f} s")
    assert rc != 0
    assert elapsed < DEAD_RANK_LIMIT_S, job.tail()
    assert not alive(workers[0]), "rank 0 outlived the job"
    assert re.search(r"exitcode\s*:\s*-9", job.stderr), job.stderr[-3000:]


STUCK_LIMIT_S = 10


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_stuck_rank_times_out_the_others(tiny_model, tmp_path):
    """--dist_timeout bounds a collective that waits for a rank that is alive but stuck (here rank 1,
    SIGSTOPped mid-run): rank 0 gives up with an error after the timeout instead of waiting forever."""
    job = Job(flags(tiny_model, tmp_path / "run", "--dist_timeout", str(STUCK_LIMIT_S), steps=400), 2,
              tmp_path / "logs")
    job.wait_for(lambda: job.steps_done() >= 2 and len(job.workers()) == 2, "2 training steps")
    workers = job.workers()
    os.kill(workers[1], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while alive(workers[0]) and time.monotonic() < stopped + STUCK_LIMIT_S + 60:
            time.sleep(0.1)
        elapsed = time.monotonic() - stopped
        rank0_alive = alive(workers[0])
    finally:
        job.kill()
    print(f"\nrank 1 stopped: rank 0 ended after {elapsed:.1f} s (--dist_timeout {STUCK_LIMIT_S})")
    assert not rank0_alive, f"rank 0 still waits {elapsed:.0f} s after rank 1 stopped\n{job.tail()}"
    assert STUCK_LIMIT_S - 1 <= elapsed < STUCK_LIMIT_S + 30, job.tail()
    assert re.search(r"[Tt]imed out|[Tt]imeout", job.stderr), job.tail()


CRASH_ON_RANK_0 = """\
import os, runpy, sys, time
import dreamprm.trainer as trainer
_upper = trainer.Trainer.run_upper_step
def run_upper_step(self, batch):
    if self.info.rank == 0 and self.state.upper_steps == 1:
        open(os.environ["CRASH_TIME"], "w").write(repr(time.time()))
        raise RuntimeError("injected crash on rank 0")
    return _upper(self, batch)
trainer.Trainer.run_upper_step = run_upper_step
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_that_raises_ends_the_whole_job_quickly(tiny_model, tmp_path):
    wrapper, crash_time = tmp_path / "crash_on_rank_0.py", tmp_path / "crash_time"
    wrapper.write_text(CRASH_ON_RANK_0)
    args = flags(tiny_model, tmp_path / "run", "--dist_timeout", "20", steps=400)
    command = launch_command(wrapper, [str(REPO / "launch" / "train.py"), *args], 2)
    job = Job(args, 2, tmp_path / "logs", command=command, env=base_env(CRASH_TIME=str(crash_time)))
    rc = job.wait(240)
    elapsed = time.time() - float(crash_time.read_text())
    print(f"\nrank 0 raised: torchrun exited {rc} after {elapsed:.1f} s")
    assert rc != 0 and "injected crash on rank 0" in job.stderr
    assert elapsed < 15, f"the job outlived the crash by {elapsed:.1f} s (--dist_timeout 20)"


# ====================================================================== loading safety
def other_domain_set(tmp: Path) -> Path:
    records = [r for r in read_json(DEMO / "train.json") if r["dataset"] != "noisy_80"]
    path = tmp / "three_domains.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def refusals(tiny_model, tmp_path_factory, killed_in_save, reference) -> dict[str, subprocess.CompletedProcess]:
    """Resumes that must be refused, run two at a time (1 rank each)."""
    tmp = tmp_path_factory.mktemp("refusals")
    one_rank = complete_checkpoints(killed_in_save.out / "checkpoints")[-1]
    two_ranks = complete_checkpoints(reference / "checkpoints")[-1]
    model_copy = tmp / "same-model-elsewhere"
    shutil.copytree(tiny_model, model_copy)
    run_dir = killed_in_save.out
    (tmp / "before").mkdir()
    for name in ("config.json", "domains.json"):
        shutil.copy(run_dir / name, tmp / "before" / name)
    cases = {
        # The job script's resume (same --weights_path, --resume auto) with other data and the same
        # model in another folder: both differences are named.
        "domains+reward_model": flags(model_copy, run_dir, "--train_json_file", str(other_domain_set(tmp)),
                                      "--image_root", str(DEMO), "--resume", "auto", steps=KILL_STEPS),
        "head": flags(tiny_model, tmp / "head", "--head", "hidden", "--resume", str(one_rank), steps=KILL_STEPS),
        "world size": flags(tiny_model, tmp / "world_size", "--resume", str(two_ranks)),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda a: run_train(a, check=False, timeout=300), cases.values())))
    results["before"] = tmp / "before"
    return results


def assert_refused(proc: subprocess.CompletedProcess, key: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "the checkpoint belongs to a different run" in proc.stderr, proc.stderr[-3000:]
    assert f"; {key}: checkpoint" in proc.stderr or f"run: {key}: checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_with_another_domain_set_or_reward_model_is_refused(refusals):
    proc = refusals["domains+reward_model"]
    assert_refused(proc, "domains")
    assert "'noisy_80': 3} vs data" in proc.stderr
    assert "; reward_model: checkpoint" in proc.stderr and "same-model-elsewhere'" in proc.stderr


@pytest.mark.slow
def test_resume_with_another_head_is_refused(refusals):
    assert_refused(refusals["head"], "head")


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(refusals):
    assert_refused(refusals["world size"], "world size")
    assert "checkpoint 2 vs now 1" in refusals["world size"].stderr


@pytest.mark.slow
def test_refused_resume_leaves_the_run_folder_untouched(refusals, killed_in_save):
    assert refusals["domains+reward_model"].returncode == 2
    for name in ("config.json", "domains.json"):
        assert (killed_in_save.out / name).read_text() == (refusals["before"] / name).read_text(), name


def test_a_checkpoint_without_its_manifest_or_files_is_refused_before_the_engine_is_touched(tmp_path):
    # In process: Checkpointer.load must raise the ConfigError (exit 2 through the entry point, as the
    # refusals above show) before it uses the engine, here None.
    from dreamprm.checkpoint import Checkpointer
    from dreamprm.config import ConfigError
    folder = tmp_path / "step_00000004"
    (folder / "engine").mkdir(parents=True)
    (folder / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"--resume {folder}: not a complete checkpoint \\(manifest.json is missing\\)"):
        Checkpointer(tmp_path, None).load(folder)
    (folder / MANIFEST).write_text(json.dumps({"step": 4, "world_size": 1, "files": [
        "trainer_state.pt", "rank_0.pt", "engine/zero_pp_rank_0_mp_rank_00_model_states.pt"]}))
    with pytest.raises(ConfigError, match=f"--resume {folder}: incomplete checkpoint: 2 file\\(s\\) of manifest.json are "
                                          "missing, e.g. rank_0.pt"):
        Checkpointer(tmp_path, None).load(folder)


def test_every_torch_load_in_dreamprm_uses_weights_only():
    calls = []
    for path in sorted((REPO / "dreamprm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert calls, "no torch.load found: the check looks in the wrong place"
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]
    assert "pickle.load" not in "".join(p.read_text() for p in (REPO / "dreamprm").rglob("*.py"))


@pytest.mark.slow
def test_everything_a_resume_reads_back_is_loaded_with_weights_only(killed_in_save):
    assert killed_in_save.loads, "no torch.load was recorded"
    unsafe = sorted({Path(rec["file"]).name for rec in killed_in_save.loads
                     if rec["weights_only"] not in (True, "default", None)})
    assert not unsafe, f"loaded with weights_only=False: {unsafe}"


def test_trust_remote_code_is_off_unless_asked_for():
    from dreamprm.config import parse_args
    from dreamprm.model.loading import build_prm, load_backbone
    from dreamprm.model.processor import load_processor
    assert parse_args([]).model.trust_remote_code is False
    assert parse_args(["--trust_remote_code"]).model.trust_remote_code is True
    for fn in (build_prm, load_backbone, load_processor):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    for path in sorted((REPO / "dreamprm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), path


def test_the_backbone_is_loaded_without_hub_kernels(tiny_model):
    """transformers >= 5.2x swaps layers for kernels fetched from the Hub by default (on an H200:
    'kernels-community/activation' could not be fetched, the model did not load). A PRM loads as it is."""
    from transformers import AutoModelForImageTextToText

    from dreamprm.model.loading import build_prm, load_backbone
    assert load_backbone(tiny_model).use_kernels is False
    assert not any(getattr(m, "use_kernels", False) for m in build_prm(str(tiny_model), "hidden", seed=0).modules())
    # the test can fail: transformers' own default here turns them on
    assert AutoModelForImageTextToText.from_pretrained(str(tiny_model)).use_kernels is True
