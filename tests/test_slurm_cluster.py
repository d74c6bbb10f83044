"""Real Slurm on this machine (tests/slurm_cluster.py): two simulated nodes, torch rendezvous
across them, and slurm/train_7b.sh's SIGUSR1 -> checkpoint -> exit 75 -> requeue -> resume cycle
with a stand-in trainer. Skipped (with the reason) when not root or Slurm/munge are missing."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import LocalSlurm, free_port, slurm_available  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# train_*.sh ask for SIGUSR1 180 s before the limit: under a 3-minute limit Slurm sends it at once,
# at a moment of its own timer, into stubs that do not handle it (exit 138, a flaky test).
LIMIT_PAST_SIGNAL = "--time=10"
PYTHON = sys.executable

_ok, _why = slurm_available()
pytestmark = [pytest.mark.skipif(not _ok, reason=_why), pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    return slurm_cluster  # one cluster per session, shared with tests/test_slurm_train.py (conftest.py)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_cluster_is_up(cluster):
    out = cluster.run(["sinfo", "-h", "-N", "-o", "%N %t %c"]).stdout.split("\n")
    assert sorted(line.split()[:2] for line in out if line) == [["n1", "idle"], ["n2", "idle"]]
    assert cluster.node_addr("n1") == cluster.node_addr("n2") == "127.0.0.1"
    assert cluster.env["SLURM_CONF"] == str(cluster.conf)
    assert "MASTER_PORT" not in cluster.env
    assert cluster.node_ports["n1"] != cluster.node_ports["n2"]


def test_stop_leaves_nothing_running(tmp_path, cluster):
    # A second cluster beside the module's one: own ports, own munged; after stop() none of its
    # daemons, and no process carrying its SLURM_CONF, is left.
    with LocalSlurm(tmp_path, nodes=1, cpus_per_node=1) as other:
        assert other.ctld_port != cluster.ctld_port
        assert set(other.node_ports.values()).isdisjoint(cluster.node_ports.values())
        job = other.sbatch("#!/bin/bash\nsrun true\n", args=["--output=/dev/null"])
        assert job.returncode == 0 and job.state == "COMPLETED"
        pids = [p.pid for _, p in other._procs]
        assert len(pids) == 3  # munged, slurmctld, slurmd
        conf = str(other.conf).encode()
    assert not [pid for pid in pids if _alive(pid)]
    leftovers = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"SLURM_CONF=" + conf in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                leftovers.append(entry)
        except OSError:
            pass
    assert leftovers == []
    # The session's cluster is unaffected.
    assert cluster.sbatch("#!/bin/bash\ntrue\n", args=["--output=/dev/null"]).returncode == 0


WORKER = """\
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="env://")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
names = [None] * dist.get_world_size()
dist.all_gather_object(names, os.environ["SLURMD_NODENAME"])
out = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                  "MASTER_PORT", "SLURM_JOB_ID", "SLURMD_NODENAME")}
out.update(sum=t.item(), nodes=names)
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_node_gloo_allreduce(cluster, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --cpus-per-task=1
        #SBATCH --time=2
        set -euo pipefail
        source "$REPO/slurm/common.sh"
        dreamprm_export_dist_env
        dreamprm_export_nccl_env
        srun --kill-on-bad-exit=1 bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID \\
            WORLD_SIZE=$SLURM_NTASKS exec "$PY" "$WORKER" "$OUT"'
        """)
    port = free_port()  # common.sh keeps a given MASTER_PORT; see the train-script test for the
    # port it derives from the job id
    job = cluster.sbatch(script, env_overrides={
        "REPO": str(REPO), "PY": PYTHON, "WORKER": str(worker), "OUT": str(out),
        "MASTER_PORT": str(port)}, args=[f"--output={tmp_path}/%j.out"], timeout=60)
    log = (tmp_path / f"{job.job_id}.out").read_text()
    assert job.returncode == 0, log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(ranks):
        assert res["RANK"] == str(r) and res["WORLD_SIZE"] == "2" and res["LOCAL_RANK"] == "0"
        assert res["SLURM_JOB_ID"] == str(job.job_id)
        assert res["MASTER_ADDR"] == "127.0.0.1"  # n1's NodeAddr: node names do not resolve
        assert res["MASTER_PORT"] == str(port)
        assert res["sum"] == 3.0  # 1 + 2: both ranks in one process group
        assert res["nodes"] == ["n1", "n2"]  # one rank on each simulated node
    assert {res["SLURMD_NODENAME"] for res in ranks} == {"n1", "n2"}


# Stands in for launch/train.py and follows its contract: reads RANK/WORLD_SIZE/MASTER_* from the
# environment; on SIGUSR1/SIGTERM writes its checkpoint into --weights_path and exits 75;
# --resume auto resumes from a complete checkpoint. Rank 0 takes longer to "save" than rank 1, as
# ranks do: with `exec` + --kill-on-bad-exit, rank 1's exit 75 would get rank 0 killed mid-save.
STUB_TRAINER = """\
import argparse, json, os, signal, sys, time

p = argparse.ArgumentParser()
for flag in ("--deepspeed", "--reward_model", "--train_json_file", "--meta_json_file",
             "--weights_path", "--resume", "--lr"):
    p.add_argument(flag)
p.add_argument("--tag")
args = p.parse_args()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
ckpt = os.path.join(args.weights_path, "ckpt")
complete = os.path.isdir(ckpt) and len(os.listdir(ckpt)) == world
record = dict(argv=sys.argv[1:], cwd=os.getcwd(), resumed=complete and args.resume == "auto",
              **{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                "MASTER_PORT", "SLURM_JOB_ID", "PYTHONPATH",
                                                "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                                "HWLOC_COMPONENTS", "OMP_NUM_THREADS")})
with open(os.path.join(args.weights_path, f"run{run}.rank{rank}.json"), "w") as f:
    json.dump(record, f)
if complete:
    sys.exit(0)  # resumed and trained to the end

stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
open(os.path.join(args.weights_path, f"started.rank{rank}"), "w").close()
deadline = time.time() + 60
while not stop and time.time() < deadline:
    time.sleep(0.05)
if not stop:
    sys.exit(3)
time.sleep(2.0 if rank == 0 else 0.0)  # "writing the shard"
os.makedirs(ckpt, exist_ok=True)
open(os.path.join(ckpt, f"shard{rank}"), "w").close()
sys.exit(75)
"""


def test_train_script_usr1_checkpoint_requeue_resume(cluster, tmp_path):
    stub = tmp_path / "stub_train.py"
    stub.write_text(STUB_TRAINER)
    for name in ("zero3.json", "train.json", "meta.json"):
        (tmp_path / name).write_text("{}" if name.startswith("zero") else "[]")
    out = tmp_path / "weights"
    submit = tmp_path / "submit"  # not the repo: the script must find the repo by itself
    (submit / "logs").mkdir(parents=True)
    env = {"PYTHON": PYTHON, "TRAINER": str(stub), "DS_CONFIG": str(tmp_path / "zero3.json"),
           "TRAIN_JSON": str(tmp_path / "train.json"), "META_JSON": str(tmp_path / "meta.json"),
           "OUTPUT_DIR": str(out), "EXTRA_ARGS": "--lr 1e-5 --tag x"}
    script = os.path.relpath(REPO / "slurm" / "train_7b.sh", submit)  # as typed by a user
    job = cluster.sbatch(script, env_overrides=env, wait=False, cwd=submit, args=[
        "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
        "--time=5"])
    log = submit / "logs" / f"dreamprm-7b-{job.job_id}.out"
    err = submit / "logs" / f"dreamprm-7b-{job.job_id}.err"

    def logs() -> str:
        return "".join(f.read_text() for f in (log, err) if f.exists())

    _wait_for(lambda: all((out / f"started.rank{r}").exists() for r in (0, 1))
              or cluster.job(job.job_id).get("JobState") not in ("PENDING", "RUNNING"),
              45, "trainer ranks did not start")
    assert cluster.job(job.job_id)["JobState"] == "RUNNING", logs()
    cluster.signal(job.job_id, "USR1")  # what --signal=USR1@180 does at the time limit
    rc, state = cluster.wait(job.job_id, timeout=60)
    assert (rc, state) == (0, "COMPLETED"), logs()
    info = cluster.job(job.job_id)
    assert info["Restarts"] == "1", logs()
    assert sorted(os.listdir(out / "ckpt")) == ["shard0", "shard1"]  # nobody killed mid-save

    runs = {(run, r): json.loads((out / f"run{run}.rank{r}.json").read_text())
            for run in (0, 1) for r in (0, 1)}
    port = str(20000 + job.job_id % 12000)
    for (run, r), rec in runs.items():
        assert rec["resumed"] is (run == 1)
        assert rec["RANK"] == str(r) and rec["WORLD_SIZE"] == "2" and rec["LOCAL_RANK"] == "0"
        assert rec["MASTER_ADDR"] == "127.0.0.1" and rec["MASTER_PORT"] == port
        assert rec["SLURM_JOB_ID"] == str(job.job_id)
        assert rec["cwd"] == str(REPO) and rec["PYTHONPATH"].split(":")[0] == str(REPO)
        assert rec["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and rec["HWLOC_COMPONENTS"] == "-gl"
        assert rec["OMP_NUM_THREADS"] == "1"
        assert rec["argv"] == [
            "--deepspeed", env["DS_CONFIG"], "--reward_model", "Qwen/Qwen2-VL-7B-Instruct",
            "--train_json_file", env["TRAIN_JSON"], "--meta_json_file", env["META_JSON"],
            "--weights_path", str(out), "--resume", "auto", "--lr", "1e-5", "--tag", "x"]
    text = logs()
    assert "requeueing job" in text and "run 1 of job" in text  # --open-mode=append kept run 0


def test_train_script_passes_failures_through(cluster, tmp_path):
    """A failing rank (not 75) ends the step (--kill-on-bad-exit) and the job; no requeue."""
    stub = tmp_path / "fail.py"
    stub.write_text("import os, sys, time\n"
                    "if os.environ['RANK'] == '1':\n    sys.exit(7)\n"
                    "time.sleep(60)\n")  # rank 0 would hang without --kill-on-bad-exit
    for name in ("zero3.json", "train.json", "meta.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "logs").mkdir()
    job = cluster.sbatch(REPO / "slurm" / "train_2b.sh", env_overrides={
        "PYTHON": PYTHON, "TRAINER": str(stub), "DS_CONFIG": str(tmp_path / "zero3.json"),
        "TRAIN_JSON": str(tmp_path / "train.json"), "META_JSON": str(tmp_path / "meta.json"),
        "OUTPUT_DIR": str(tmp_path / "w"), "DREAMPRM_REPO": str(REPO)},
        cwd=tmp_path, timeout=45, args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                                        "--cpus-per-task=1", LIMIT_PAST_SIGNAL])
    err = (tmp_path / "logs" / f"dreamprm-2b-{job.job_id}.err").read_text()
    # srun reports the highest task code: rank 0 was terminated (143) after rank 1's 7.
    assert job.state == "FAILED" and job.returncode == 143, err
    assert "task 1: Exited with exit code 7" in err
    assert cluster.job(job.job_id)["Restarts"] == "0"


def test_train_script_does_not_requeue_a_failed_checkpoint(cluster, tmp_path):
    """Exit 74 (a checkpoint could not be written) on every rank, rank 0 last: no rank is killed, the
    job ends FAILED with 74 and a line saying why, and it is not requeued."""
    stub = tmp_path / "disk_full.py"
    stub.write_text("import os, sys, time\n"
                    "if os.environ['RANK'] == '0':\n"
                    "    time.sleep(2)  # removing the partial folder\n"
                    "    print('error: checkpoint step_00000004 could not be written', file=sys.stderr)\n"
                    "sys.exit(74)\n")
    for name in ("zero3.json", "train.json", "meta.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "logs").mkdir()
    out = tmp_path / "w"
    job = cluster.sbatch(REPO / "slurm" / "train_2b.sh", env_overrides={
        "PYTHON": PYTHON, "TRAINER": str(stub), "DS_CONFIG": str(tmp_path / "zero3.json"),
        "TRAIN_JSON": str(tmp_path / "train.json"), "META_JSON": str(tmp_path / "meta.json"),
        "OUTPUT_DIR": str(out), "DREAMPRM_REPO": str(REPO)},
        cwd=tmp_path, timeout=45, args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                                        "--cpus-per-task=1", LIMIT_PAST_SIGNAL])
    err = (tmp_path / "logs" / f"dreamprm-2b-{job.job_id}.err").read_text()
    assert (job.state, job.returncode) == ("FAILED", 74), err
    assert cluster.job(job.job_id)["Restarts"] == "0"
    # Both ranks' wrappers saw 74: rank 0, the last, was not killed when rank 1 left (a killed rank 0
    # would leave no note, and the script would still exit 74 on rank 1's).
    notes = sorted(p.name for p in (out / ".slurm" / f"{job.job_id}.0").iterdir())
    assert notes == ["checkpoint-failed.rank0", "checkpoint-failed.rank1"], f"{notes}\n{err}\n{cluster.log_tail()}"
    assert "could not write a checkpoint (exit 74 on 2 of 2 ranks" in err
    assert "error: checkpoint step_00000004 could not be written" in err, f"{err}\n{cluster.log_tail()}"
    assert f"not requeueing job {job.job_id}" in err and f"OUTPUT_DIR={out}" in err


ECHO_TRAINER = """\
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURMD_NODENAME", "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS", "MASTER_ADDR")
rec = {k: os.environ.get(k) for k in keys}
rec["argv"] = sys.argv[1:]
out = sys.argv[sys.argv.index("--weights_path") + 1]
with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(rec, f)
"""


def test_train_7b_headers_as_written(tmp_path):
    """train_7b.sh with no sbatch overrides on a cluster shaped like the target (2 nodes x 8 fake
    GPUs): 16 ranks, 8 per node, every rank sees the node's 8 GPUs and picks one by LOCAL_RANK."""
    stub = tmp_path / "echo_train.py"
    stub.write_text(ECHO_TRAINER)
    for name in ("zero3.json", "train.json", "meta.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "logs").mkdir()
    out = tmp_path / "w"
    with LocalSlurm(tmp_path / "slurm", nodes=2, cpus_per_node=64, gpus_per_node=8) as big:
        job = big.sbatch(REPO / "slurm" / "train_7b.sh", cwd=tmp_path, timeout=60, env_overrides={
            "PYTHON": PYTHON, "TRAINER": str(stub), "DS_CONFIG": str(tmp_path / "zero3.json"),
            "TRAIN_JSON": str(tmp_path / "train.json"), "META_JSON": str(tmp_path / "meta.json"),
            "OUTPUT_DIR": str(out)})
        info = big.job(job.job_id)
    log = (tmp_path / "logs" / f"dreamprm-7b-{job.job_id}.err").read_text()
    assert (job.returncode, job.state) == (0, "COMPLETED"), log
    assert info["JobName"] == "dreamprm-7b" and info["NumNodes"] == "2"
    assert info["TimeLimit"] == "1-00:00:00" and info["Requeue"] == "1"
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(16)]
    assert {rec["WORLD_SIZE"] for rec in recs} == {"16"}
    for r, rec in enumerate(recs):
        assert rec["LOCAL_RANK"] == str(r % 8)
        assert rec["SLURMD_NODENAME"] == ("n1" if r < 8 else "n2")
        assert rec["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
        assert rec["OMP_NUM_THREADS"] == "8"  # --cpus-per-task=8


def test_time_limit_signal_requeue(cluster, tmp_path):
    """Slurm's own timer (`--signal=USR1@T`, here 50 s before a 1-minute limit) reaches the
    trainer ranks, not the batch shell; the job is requeued and the next run resumes."""
    stub = tmp_path / "stub_train.py"
    stub.write_text(STUB_TRAINER)
    for name in ("zero3.json", "train.json", "meta.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "logs").mkdir()
    out = tmp_path / "w"
    job = cluster.sbatch(REPO / "slurm" / "train_7b.sh", cwd=tmp_path, timeout=150, env_overrides={
        "PYTHON": PYTHON, "TRAINER": str(stub), "DS_CONFIG": str(tmp_path / "zero3.json"),
        "TRAIN_JSON": str(tmp_path / "train.json"), "META_JSON": str(tmp_path / "meta.json"),
        "OUTPUT_DIR": str(out)}, args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                                       "--cpus-per-task=1", "--time=1", "--signal=USR1@50"])
    err = (tmp_path / "logs" / f"dreamprm-7b-{job.job_id}.err").read_text()
    assert (job.returncode, job.state) == (0, "COMPLETED"), err
    assert cluster.job(job.job_id)["Restarts"] == "1"
    assert json.loads((out / "run1.rank0.json").read_text())["resumed"] is True
