"""The trainer under every launcher cluster users start DeepSpeed jobs with, 2 real processes each.

* `mpirun -np 2`: no RANK/WORLD_SIZE in the environment; DeepSpeed's MPI discovery (mpi4py) finds
  the ranks, and MASTER_PORT is taken from the environment (`-x MASTER_PORT=...`).
* `accelerate launch --config_file ds_configs/accelerate_zero3.yaml --num_processes 2`.
* `deepspeed --num_gpus 2` (on CPU too).
* `deepspeed --hostfile` with two "nodes" on this machine: started without ssh (`--no_ssh`, one
  launcher per node with its `--node_rank`), and the classic one-command form, pdsh over ssh to a
  private sshd on 127.0.0.1 (tests/ssh_localhost.py; openssh-server and pdsh from .ci/setup.sh).

Each run: exit 0, world size 2 in config.json, TensorBoard scalars of both levels, the exported
PRM; and the same flags give bit-identical exported parameters under every launcher (same ranks,
same global batch, same seed, CPU).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import PYTHON, REPO, base_env, exported_tensors, free_port, read_json, read_scalars  # noqa: E402
from ssh_localhost import LocalSshd, descendants, ssh_missing  # noqa: E402

TRAIN = str(REPO / "launch" / "train.py")
ACCELERATE_YAML = REPO / "ds_configs" / "accelerate_zero3.yaml"
ITERATIONS = 12
RUN_TIMEOUT_S = 300
ROOT_MPI = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

pytestmark = [pytest.mark.slow, pytest.mark.launcher, pytest.mark.multiprocess]


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--reward_model", str(model), "--weights_path", str(out), "--precision", "fp32",
            "--batch_size", "2", "--unroll_steps", "2", "--iteration_num", str(ITERATIONS),
            "--lr", "1e-3", "--meta_lr", "0.05", "--log_every", "2", *extra]


def _bin(name: str) -> list[str]:
    """A console script of this interpreter's environment (deepspeed, accelerate)."""
    path = Path(PYTHON).parent / name
    return [str(path)] if path.exists() else [shutil.which(name) or name]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything it started (workers may sit in sessions of their own;
    a stuck mpirun only yields to SIGKILL)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@dataclass
class Run:
    name: str
    cmd: list[str]
    out: Path
    returncode: int
    output: str
    seconds: float
    port_seen: bool = False
    port: int | None = None  # the MASTER_PORT watched


def _listening(port: int) -> bool:
    """Whether some socket on this machine listens on TCP `port` (IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def launch(name: str, cmds: list[list[str]], out: Path, env: dict[str, str] | None = None,
           watch_port: int | None = None) -> Run:
    """Start the commands together (one per simulated node), wait for all; kill all on timeout.
    With `watch_port`, Run.port_seen tells whether anything listened on it meanwhile (rank 0's
    rendezvous store does, for the whole run)."""
    started = time.monotonic()
    logs = [out.parent / f"{name}.{i}.log" for i in range(len(cmds))]
    procs = []
    port_seen = False
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env or base_env(), stdout=f,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = started + RUN_TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if watch_port is not None and not port_seen:
                port_seen = _listening(watch_port)
            time.sleep(0.25)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
    output = "".join(log.read_text(errors="replace") for log in logs)
    rc = max((abs(p.returncode) for p in procs), default=1)
    seconds = time.monotonic() - started
    print(f"\n{name}: exit {rc} in {seconds:.0f} s: {' '.join(cmds[0])}")
    return Run(name, cmds[0], out, rc, output, seconds, port_seen)


def check_run(run: Run) -> None:
    assert run.returncode == 0, f"{run.name} failed ({run.returncode}):\n{run.output[-8000:]}"
    config = read_json(run.out / "config.json")
    assert config["world_size"] == 2
    assert config["deepspeed_resolved"]["zero_optimization"]["stage"] == 3
    assert config["deepspeed_resolved"]["train_batch_size"] == 4  # 2 per rank x 2 ranks
    assert "on 2 rank(s)" in run.output and f"done at step {ITERATIONS}" in run.output
    scalars = read_scalars(run.out / "tb")
    for tag in ("train/loss", "meta/loss"):
        assert scalars.get(tag), (tag, sorted(scalars))
    for domain in read_json(run.out / "domains.json"):
        assert scalars.get(f"domain_weight/{domain}"), sorted(scalars)
    assert (run.out / "export" / "model.safetensors").is_file()
    assert (run.out / "export" / "score_head.safetensors").is_file()


def checked(run: Run) -> Run:
    check_run(run)
    return run


# ----------------------------------------------------------------------------------- mpirun
def _mpi_missing() -> str:
    if shutil.which("mpirun") is None:
        return "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (DeepSpeed's MPI discovery needs it)"
    return ""


@pytest.fixture(scope="module")
def mpirun_run(tiny_model, tmp_path_factory) -> Run:
    if _mpi_missing():
        pytest.skip(_mpi_missing())
    out = tmp_path_factory.mktemp("mpirun") / "out"
    port = free_port()
    # mpirun sets only OMPI_COMM_WORLD_*; base_env() removes RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
    env = base_env(MASTER_PORT=str(port), **(ROOT_MPI if os.geteuid() == 0 else {}))
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none",
           "-x", "MASTER_PORT", "-x", "HWLOC_COMPONENTS", "-x", "PATH", "-x", "PYTHONPATH",
           "-x", "OMP_NUM_THREADS", PYTHON, TRAIN, *train_args(tiny_model, out)]
    run = checked(launch("mpirun", [cmd], out, env, watch_port=port))
    run.port = port
    return run


def test_mpirun_discovers_ranks_through_mpi4py(mpirun_run):
    # DeepSpeed's MPI discovery would use 29500 whatever MASTER_PORT says; init_distributed passes
    # MASTER_PORT on, so that two jobs can share a node.
    assert mpirun_run.port_seen, f"nothing listened on MASTER_PORT={mpirun_run.port} during the run"


# ------------------------------------------------------------------------------- accelerate
@pytest.fixture(scope="module")
def accelerate_run(tiny_model, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("accelerate") / "out"
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_YAML),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           TRAIN, *train_args(tiny_model, out)]
    return checked(launch("accelerate", [cmd], out))


def test_accelerate_launch_with_the_zero3_config(accelerate_run):
    # No --deepspeed typed: the trainer's default, which is the file the YAML names.
    config = read_json(accelerate_run.out / "config.json")
    assert Path(config["run"]["deepspeed"]) == REPO / "ds_configs" / "zero3.json"


# What a process started by `accelerate launch` makes of the trainer's flags (no engine started).
PARSE_STUB = f"""\
import os, sys
sys.path.insert(0, {str(REPO)!r})
from dreamprm.config import parse_args
print("ACCELERATE_DEEPSPEED_CONFIG_FILE=" + os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", ""))
print("TRAINER_DEEPSPEED=" + parse_args(sys.argv[1:]).run.deepspeed)
"""


def test_accelerate_config_file_reaches_the_trainer(tmp_path):
    ds_file = tmp_path / "zero3_offload_copy.json"
    shutil.copyfile(REPO / "ds_configs" / "zero3_offload.json", ds_file)
    yaml = tmp_path / "accelerate.yaml"
    yaml.write_text(ACCELERATE_YAML.read_text().replace(
        "deepspeed_config_file: ds_configs/zero3.json", f"deepspeed_config_file: {ds_file}"))
    stub = tmp_path / "parse_stub.py"
    stub.write_text(PARSE_STUB)
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(yaml),
           "--num_processes", "1", "--main_process_port", str(free_port()), str(stub), "--lr", "1e-5"]
    run = launch("accelerate-config-file", [cmd], tmp_path / "unused")
    assert run.returncode == 0, run.output[-4000:]
    assert f"ACCELERATE_DEEPSPEED_CONFIG_FILE={ds_file}" in run.output  # what accelerate sets
    assert f"TRAINER_DEEPSPEED={ds_file}" in run.output, run.output[-2000:]  # what the trainer uses


# -------------------------------------------------------------------------------- deepspeed
@pytest.fixture(scope="module")
def deepspeed_run(tiny_model, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("deepspeed") / "out"
    cmd = [*_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           TRAIN, "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), *train_args(tiny_model, out)]
    return checked(launch("deepspeed", [cmd], out))


def test_deepspeed_launcher_num_gpus(deepspeed_run):
    assert "--local_rank=1" in deepspeed_run.output  # the launcher's flag, accepted by the trainer


@pytest.fixture(scope="module")
def hostfile_run(tiny_model, tmp_path_factory) -> Run:
    """Two hostfile entries that are both this machine; each "node" runs its own launcher with
    --no_ssh --node_rank N, as on a cluster without ssh between nodes."""
    tmp_path = tmp_path_factory.mktemp("hostfile")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "out"
    port = str(free_port())
    cmds = [[*_bin("deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port,
             TRAIN, "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), *train_args(tiny_model, out)]
            for node in (0, 1)]
    return checked(launch("deepspeed-hostfile", cmds, out))


def test_deepspeed_hostfile_two_nodes_without_ssh(hostfile_run):
    assert "nnodes=2, num_local_procs=1, node_rank=0" in hostfile_run.output
    assert "nnodes=2, num_local_procs=1, node_rank=1" in hostfile_run.output


@pytest.fixture(scope="module")
def ssh_hostfile_run(tiny_model, tmp_path_factory) -> Run:
    """The classic form, one command: `deepspeed --hostfile hostfile launch/train.py ...`; DeepSpeed checks
    that the first host answers over ssh, then pdsh starts a launcher on each host over ssh. The hosts
    are `localhost` and `127.0.0.1`, both served by a private sshd (tests/ssh_localhost.py: its own
    keys, a free port) that `ssh` on PATH reaches. The remote shells get DeepSpeed's exports (PYTHON*)
    and the variables of the file DS_ENV_FILE names, as a cluster user's `.deepspeed_env`."""
    if ssh_missing():
        pytest.skip(ssh_missing())
    tmp_path = tmp_path_factory.mktemp("ssh")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    ds_env = tmp_path / "deepspeed_env"
    ds_env.write_text("HWLOC_COMPONENTS=-gl\nOMP_NUM_THREADS=1\nTOKENIZERS_PARALLELISM=false\n")
    out = tmp_path / "out"
    with LocalSshd(tmp_path / "sshd") as sshd:
        env = base_env(DS_ENV_FILE=str(ds_env))
        env["PATH"] = f"{sshd.bin}:{env['PATH']}"
        cmd = [*_bin("deepspeed"), "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), TRAIN, "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
               *train_args(tiny_model, out)]
        before = sshd.logins()  # LocalSshd's own check that it answers
        run = launch("deepspeed-ssh", [cmd], out, env)
        logins = sshd.logins() - before
    run.output += f"\n[sshd: {logins} public-key logins]\n"
    return checked(run)


def test_deepspeed_hostfile_over_ssh(ssh_hostfile_run):
    """pdsh ran one launcher per host over ssh: node ranks 0 and 1, each line prefixed by its host."""
    output = ssh_hostfile_run.output
    assert "nnodes=2, num_local_procs=1, node_rank=0" in output and "nnodes=2, num_local_procs=1, node_rank=1" in output
    assert any(line.startswith("localhost: ") for line in output.splitlines()), output[-3000:]
    assert any(line.startswith("127.0.0.1: ") for line in output.splitlines()), output[-3000:]
    # DeepSpeed's reachability check and one pdsh session per host.
    assert "[sshd: 3 public-key logins]" in output, output[-500:]


# ------------------------------------------------------------------------------- comparison
def test_launchers_give_the_same_parameters(request, accelerate_run, deepspeed_run, hostfile_run):
    """Same flags, same ranks, same seed, CPU: bit-identical exported parameters and domain weights
    under every launcher (the runs are this module's fixtures, so this test alone starts them)."""
    runs = {run.name: run for run in (accelerate_run, deepspeed_run, hostfile_run)}
    if not _mpi_missing():
        runs["mpirun"] = request.getfixturevalue("mpirun_run")
    if not ssh_missing():
        runs["deepspeed-ssh"] = request.getfixturevalue("ssh_hostfile_run")
    names = sorted(runs)
    ref_name = names[0]
    ref = exported_tensors(runs[ref_name].out / "export")
    weights = read_json(runs[ref_name].out / "domain_weights.json")["weights"]
    for name in names[1:]:
        other = exported_tensors(runs[name].out / "export")
        assert other.keys() == ref.keys()
        differ = [k for k in ref if not torch.equal(ref[k], other[k])]
        assert not differ, f"{name} vs {ref_name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        assert read_json(runs[name].out / "domain_weights.json")["weights"] == weights
    print(f"\nbit-identical exports: {', '.join(names)}")
