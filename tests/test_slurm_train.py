"""The real trainer through the real `slurm/train_7b.sh` on a real (local) Slurm cluster.

One private Slurm (tests/slurm_cluster.py: own munged, slurmctld and two simulated nodes n1, n2)
runs two jobs of the SAME `slurm/train_7b.sh`, selected for CPU by environment overrides and
sbatch options only (tiny Qwen2-VL, demo data, 2 nodes x 1 task, no GPUs), each waited for with
`sbatch --wait`:

* an uninterrupted run: both ranks in one job and one process group (world size 2, one rank on
  each node), lower and upper level ran (TensorBoard), the PRM exported;
* the same run, sent SIGUSR1 the way `#SBATCH --signal=USR1@180` does (`scancel --signal=USR1`:
  every task of the step, not the batch shell): every rank checkpoints and exits 75, the script
  requeues the job, the requeued run resumes from that checkpoint by itself and finishes;
  its final parameters are compared with the uninterrupted run's.

Both jobs run at the same time (each node has 2 CPUs, each job takes 1 per node). The cluster is the
session's (tests/conftest.py, shared with tests/test_slurm_cluster.py), which stops it at the end
and checks that no process of it is left.

Skipped (with the reason) when not root or Slurm/munge are missing; CI has both.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import DEMO, PYTHON, REPO, exported_tensors, processes_with_env, read_json, read_scalars  # noqa: E402
from dreamprm.checkpoint import complete_checkpoints  # noqa: E402
from slurm_cluster import TERMINAL_STATES, LocalSlurm, slurm_available  # noqa: E402

_ok, _why = slurm_available()
pytestmark = [pytest.mark.skipif(not _ok, reason=_why), pytest.mark.slow, pytest.mark.slurm, pytest.mark.multiprocess]

ITERATIONS = 40  # long enough that the signal lands mid-run on an idle machine too
# The trainer's flags beyond what train_7b.sh passes itself: a short deterministic fp32 CPU run.
# --keep_last 1 with a checkpoint every 10 steps: retention across the requeue (the preemption
# checkpoint must survive until the requeued run has written a newer one).
EXTRA_ARGS = (f"--precision fp32 --batch_size 2 --unroll_steps 2 --iteration_num {ITERATIONS} "
              "--lr 1e-3 --meta_lr 0.05 --log_every 2 --keep_last 1 --save_every_iterations 10")
# sbatch options that turn the 2 x 8 GPU template into 2 nodes x 1 CPU task.
SBATCH_CPU = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
              "--time=10"]
JOB_TIMEOUT_S = 300

# PYTHON override: note which node each rank started on, then become the interpreter (exec: the
# trainer is still the process Slurm signals, exactly as with a plain PYTHON).
PY_WRAPPER = f"""#!/bin/bash
echo "job=$SLURM_JOB_ID run=${{SLURM_RESTART_COUNT:-0}} rank=$RANK world=$WORLD_SIZE \
node=$SLURMD_NODENAME" >> "$OUTPUT_DIR/ranks.txt"
exec {PYTHON} "$@"
"""


@dataclass
class Job:
    job_id: int
    returncode: int  # of `sbatch --wait`: the job's exit code
    out: Path  # OUTPUT_DIR
    log: str  # the job's .out and .err (all runs: --open-mode=append)
    info: dict[str, str]  # scontrol show job, after the end
    signalled_at: float | None = None


def _submit(cluster: LocalSlurm, submit_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """`sbatch --wait` train_7b.sh in the background; returns (sbatch process, job id)."""
    (submit_dir / "logs").mkdir(parents=True)
    script = os.path.relpath(REPO / "slurm" / "train_7b.sh", submit_dir)  # as a user would type it
    # stdbuf: sbatch prints the job id before it waits, but stdio would hold it in its buffer.
    proc = subprocess.Popen(["stdbuf", "-oL", "sbatch", "--wait", "--parsable", *SBATCH_CPU, script],
                            cwd=submit_dir, env={**cluster.env, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip():
        proc.wait(timeout=30)
        raise AssertionError(f"sbatch failed ({proc.returncode}): {proc.stderr.read()}")
    return proc, int(line.strip().split(";")[0])


def _logs(submit_dir: Path, job_id: int) -> str:
    return "".join(f.read_text(errors="replace")
                   for f in sorted((submit_dir / "logs").glob(f"dreamprm-7b-{job_id}.*")))


def _finish(cluster, proc, job_id, submit_dir, out, signalled_at=None) -> Job:
    try:
        rc = proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"job {job_id} not done after {JOB_TIMEOUT_S} s: {cluster.job(job_id)}\n"
                             + _logs(submit_dir, job_id)[-6000:] + cluster.log_tail())
    return Job(job_id, rc, out, _logs(submit_dir, job_id), cluster.job(job_id), signalled_at)


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    return slurm_cluster  # one cluster per session, shared with tests/test_slurm_cluster.py (conftest.py)


@pytest.fixture(scope="module")
def jobs(cluster, tiny_model, tmp_path_factory) -> dict[str, Job]:
    """The uninterrupted and the preempted job, run side by side."""
    root = tmp_path_factory.mktemp("slurm_train")
    wrapper = root / "python.sh"
    wrapper.write_text(PY_WRAPPER)
    wrapper.chmod(0o755)
    common = {
        "PYTHON": str(wrapper), "MODEL": str(tiny_model),
        "TRAIN_JSON": str((DEMO / "train.json").relative_to(REPO)),  # relative to the repo, where
        "META_JSON": str((DEMO / "meta.json").relative_to(REPO)),    # the job runs
        "EXTRA_ARGS": EXTRA_ARGS, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = {}
    for name in ("plain", "preempted"):
        out = root / name / "out"
        proc, job_id = _submit(cluster, root / name, {**common, "OUTPUT_DIR": str(out)})
        started[name] = (proc, job_id, root / name, out)

    # Preempt the second job once its rank 0 has started training (its first line on stdout).
    proc, job_id, submit_dir, out = started["preempted"]
    deadline = time.monotonic() + 180
    while "training 4 domains" not in _logs(submit_dir, job_id):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not start training: {cluster.job(job_id)}\n"
                                 + _logs(submit_dir, job_id)[-6000:])
        time.sleep(0.2)
    time.sleep(0.5)  # a few steps in
    cluster.signal(job_id, "USR1", target="steps")  # what `--signal=USR1@180` does
    signalled_at = time.monotonic()

    result = {name: _finish(cluster, p, j, d, o, signalled_at if name == "preempted" else None)
              for name, (p, j, d, o) in started.items()}
    for name, job in result.items():
        print(f"\n{name}: job {job.job_id} exit {job.returncode} state {job.info.get('JobState')} "
              f"restarts {job.info.get('Restarts')}")
    return result


def _ranks(out: Path) -> list[dict[str, str]]:
    lines = (out / "ranks.txt").read_text().splitlines()
    return [dict(kv.split("=", 1) for kv in line.split()) for line in lines]


def test_two_nodes_one_job_trains_both_levels_and_exports(jobs):
    job = jobs["plain"]
    assert job.returncode == 0, job.log[-6000:]
    assert job.info["JobState"] == "COMPLETED" and job.info["Restarts"] == "0", job.info
    assert job.info["NumNodes"] == "2" and job.info["NodeList"] == "n[1-2]"

    # Both ranks in this job, one on each simulated node, in one process group of 2.
    ranks = _ranks(job.out)
    assert sorted((r["rank"], r["node"]) for r in ranks) == [("0", "n1"), ("1", "n2")]
    assert {(r["job"], r["world"], r["run"]) for r in ranks} == {(str(job.job_id), "2", "0")}
    assert read_json(job.out / "config.json")["world_size"] == 2
    assert f"run 0 of job {job.job_id}: nodes=n[1-2] tasks=2 MASTER_ADDR=127.0.0.1" in job.log
    assert "on 2 rank(s)" in job.log and f"done at step {ITERATIONS}" in job.log
    final = job.out / "checkpoints" / f"step_{ITERATIONS:08d}"
    assert read_json(final / "manifest.json")["world_size"] == 2
    # ZeRO-3 shards written by both ranks.
    shards = sorted(p.name for p in (final / "engine").glob("zero_pp_rank_*_model_states.pt"))
    assert [s.split("_")[3] for s in shards] == ["0", "1"], shards

    # Lower level, upper level and domain weights in TensorBoard.
    scalars = read_scalars(job.out / "tb")
    assert scalars.get("train/loss") and scalars.get("meta/loss"), sorted(scalars)
    domains = read_json(job.out / "domains.json")
    for d in domains:
        assert scalars.get(f"domain_weight/{d}"), sorted(scalars)
    assert len(scalars["meta/v_norm"]) == ITERATIONS // 2  # one upper step per 2 lower steps

    # The exported PRM.
    for f in ("config.json", "model.safetensors", "score_head.safetensors", "tokenizer.json"):
        assert (job.out / "export" / f).is_file(), f
    assert exported_tensors(job.out / "export")


def _stop_step(job: Job) -> int:
    m = re.search(r"SIGUSR1: checkpoint written at step (\d+); exiting with code 75", job.log)
    assert m, job.log[-6000:]
    return int(m.group(1))


def test_sigusr1_checkpoints_requeues_and_resumes_by_itself(jobs):
    job = jobs["preempted"]
    assert job.returncode == 0, job.log[-6000:]  # `sbatch --wait` followed the requeue to the end
    assert job.info["JobState"] == "COMPLETED" and job.info["Restarts"] == "1", job.info
    step = _stop_step(job)
    assert 0 < step < ITERATIONS
    # Every rank exited 75 after the checkpoint (the task wrapper's notes), then the script requeued.
    notes = job.out / ".slurm" / f"{job.job_id}.0"
    assert sorted(p.name for p in notes.iterdir()) == ["rank0", "rank1"]
    assert f"requeueing job {job.job_id}" in job.log and f"run 1 of job {job.job_id}" in job.log
    checkpoint = job.out / "checkpoints" / f"step_{step:08d}"
    # The requeued run (same job id, same OUTPUT_DIR) found that checkpoint with --resume auto (its
    # world size checked against the manifest), and retention removed it only after newer ones.
    assert f"resumed from {checkpoint} at step {step}" in job.log
    assert [c.name for c in complete_checkpoints(job.out / "checkpoints")] == [f"step_{ITERATIONS:08d}"]
    assert not [p.name for p in (job.out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert f"done at step {ITERATIONS}" in job.log
    runs = sorted((r["run"], r["rank"], r["node"]) for r in _ranks(job.out))
    assert runs == [("0", "0", "n1"), ("0", "1", "n2"), ("1", "0", "n1"), ("1", "1", "n2")]
    assert (job.out / "export" / "model.safetensors").is_file()
    # The resumed run continued the TensorBoard curves past the stop.
    assert max(s for s, _ in read_scalars(job.out / "tb")["train/loss"]) == ITERATIONS


def test_preempted_run_ends_with_the_uninterrupted_parameters(jobs):
    plain, preempted = jobs["plain"], jobs["preempted"]
    assert plain.returncode == 0 and preempted.returncode == 0
    _stop_step(preempted)
    a, b = exported_tensors(plain.out / "export"), exported_tensors(preempted.out / "export")
    assert a.keys() == b.keys()
    # Same ranks, same reduction order: bit-exact on CPU (measured with the fix applied).
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"{len(diff)} of {len(a)} tensors differ; worst {max(diff.values()):.3g}"
    assert read_json(plain.out / "domain_weights.json") == read_json(preempted.out / "domain_weights.json")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_no_process_of_the_jobs_is_left_after_they_end(cluster, jobs):
    """Every task, slurmstepd and trainer of both jobs is gone once they ended (the session's cluster
    stays up for other tests; tests/conftest.py stops it at the end and checks that nothing of it,
    daemons included, is left)."""
    for job in jobs.values():
        assert cluster.job(job.job_id).get("JobState") in TERMINAL_STATES
    needles = [f"SLURM_JOB_ID={job.job_id}".encode() for job in jobs.values()]

    def left() -> list[int]:
        pids = [pid for needle in needles for pid in processes_with_env(needle)] + _trainer_pids(jobs)
        return [pid for pid in pids if _alive(pid)]
    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == []


def _trainer_pids(jobs: dict[str, Job]) -> list[int]:
    """Trainer processes (any run) still holding one of the jobs' output folders on the command line."""
    outs = [str(job.out).encode() for job in jobs.values()]
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if any(o in cmd for o in outs):
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize("arch,head", [("qwen2_5_vl", "hidden"), ("internvl", "generative")])
def test_train_2b_script_and_zero3_config_unchanged_for_other_backbones(cluster, tmp_path, arch, head):
    """`slurm/train_2b.sh` and `ds_configs/zero3.json` as shipped (only MODEL and EXTRA_ARGS set, as a
    user would) train and export a Qwen2.5-VL and an InternVL3 PRM on 2 nodes x 1 task."""
    from dreamprm.model.tiny import build_tiny_qwen2vl
    model = build_tiny_qwen2vl(tmp_path / f"tiny-{arch}", arch=arch)
    (tmp_path / "logs").mkdir()
    out = tmp_path / "out"
    job = cluster.sbatch(REPO / "slurm" / "train_2b.sh", env_overrides={
        "PYTHON": PYTHON, "MODEL": str(model), "OUTPUT_DIR": str(out), "DREAMPRM_REPO": str(REPO),
        "TRAIN_JSON": str((DEMO / "train.json").relative_to(REPO)), "META_JSON": str((DEMO / "meta.json").relative_to(REPO)),
        "EXTRA_ARGS": f"--head {head} --precision fp32 --batch_size 2 --unroll_steps 2 --iteration_num 4 --log_every 2",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        cwd=tmp_path, timeout=JOB_TIMEOUT_S, args=SBATCH_CPU)
    log = "".join(f.read_text(errors="replace") for f in sorted((tmp_path / "logs").glob(f"*-{job.job_id}.*")))
    assert (job.state, job.returncode) == ("COMPLETED", 0), log[-6000:]
    assert "on 2 rank(s)" in log and "done at step 4" in log, log[-6000:]
    assert read_json(out / "config.json")["world_size"] == 2
    exported = read_json(out / "export" / "config.json")
    assert exported["model_type"] == arch  # the --arch names are the model types
    assert read_json(out / "export" / "prm_config.json")["head"] == head
