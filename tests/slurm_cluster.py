"""A real, throw-away Slurm cluster on this machine, for tests.

``LocalSlurm`` starts its own ``munged``, one ``slurmctld`` and ``nodes`` simulated ``slurmd``
daemons (Debian's Slurm is built with multiple-slurmd: ``slurmd -N n1``, ``slurmd -N n2`` on one
host, each on its own port), waits until ``sinfo`` shows every node idle, and stops every daemon it
started *by PID* on exit. Nothing is shared with another ``LocalSlurm`` or a system Slurm: the
config lives in the temp dir and is selected with ``SLURM_CONF`` (see ``env``), ports are picked
free, and munged listens on a private socket named in ``AuthInfo``. It needs root (slurmd runs
jobs as any user, munged runs as the ``munge`` user), see ``slurm_available()``.

    with LocalSlurm(tmp_path) as cluster:
        job = cluster.sbatch("#!/bin/bash\\nsrun hostname\\n", args=["--nodes=2"])
        assert job.returncode == 0

Traps met on this machine: node names do not resolve (take
``NodeAddr`` from ``scontrol show node``); ``srun --mpi=pmix`` fails with two slurmds on one host, so
use torch's TCP rendezvous; the output directory of ``--output`` must exist before the job starts.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import random
import re
import shutil
import signal as _signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

SLURM_BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "sinfo",
                  "squeue", "scancel")
MUNGE_BINARIES = ("munged", "munge", "unmunge")
SYSTEM_MUNGE_KEY = Path("/etc/munge/munge.key")
SYSTEM_MUNGE_SOCKET = Path("/run/munge/munge.socket.2")

# Job states after which a job will not run again (a requeued job goes back to PENDING instead).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
})
_SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
# torch.distributed variables of the calling process must not leak into jobs (sbatch exports the
# submitting environment).
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not always on a test runner's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def slurm_available() -> tuple[bool, str]:
    """(True, "") when a LocalSlurm can start here, else (False, why) for ``pytest.skip``."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "Slurm needs a POSIX system"
    if os.geteuid() != 0:
        return False, "LocalSlurm needs root (slurmd and munged are started by the test)"
    missing = [b for b in SLURM_BINARIES + MUNGE_BINARIES if _which(b) is None]
    if missing:
        return False, ("missing binaries: " + ", ".join(missing) + " (apt-get install slurmctld "
                       "slurmd slurm-client munge)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return False, "no 'munge' user (the munge package creates it)"
    return True, ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick, so concurrent runs differ)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


@dataclasses.dataclass
class SbatchResult:
    job_id: int
    returncode: int | None  # the batch script's exit code (128+signal if killed); None: not waited
    state: str | None = None  # final JobState when waited for
    stdout: str = ""  # sbatch's own output
    stderr: str = ""


class SlurmError(RuntimeError):
    pass


class LocalSlurm:
    """A real Slurm (munged + slurmctld + ``nodes`` slurmd) for the lifetime of a ``with`` block.

    Attributes after ``start()``: ``env`` (environment for subprocesses: SLURM_CONF and PATH, any
    inherited SLURM_*/SBATCH_*/SRUN_* variables removed), ``conf`` (slurm.conf path),
    ``node_names`` (["n1", "n2", ...]), ``partition``, ``ctld_port``, ``node_ports``.
    """

    def __init__(self, tmpdir: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 2,
                 real_memory_mb: int = 2000, gpus_per_node: int = 0, kill_wait_s: int = 5,
                 start_timeout_s: float = 30.0, cred_expire_s: int = 5,
                 reuse_munge: bool = False):
        """``gpus_per_node`` > 0 declares fake ``gpu`` GRES (stand-in device files), so that
        ``#SBATCH --gpus-per-node`` requests schedule as written and tasks get
        CUDA_VISIBLE_DEVICES like on a GPU node (no GPU behind it). ``cpus_per_node`` may exceed
        the host's cores (slurmd's config_overrides). ``reuse_munge``
        uses a munged already answering on /run/munge instead of a private one (the private one is
        the default: a shared munged can be stopped under us by whoever started it).
        ``cred_expire_s`` (AuthInfo cred_expire, Slurm's default 120) is also how long a requeued
        job waits before it may start again."""
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.tmpdir = Path(tmpdir).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.gpus_per_node = gpus_per_node
        self.kill_wait_s = kill_wait_s
        self.start_timeout_s = start_timeout_s
        self.reuse_munge = reuse_munge
        self.cred_expire_s = cred_expire_s
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.partition = "debug"
        self.env: dict[str, str] = {}
        self.conf: Path | None = None
        self.ctld_port: int | None = None
        self.node_ports: dict[str, int] = {}
        self.munge_socket: Path | None = None
        self._procs: list[tuple[str, subprocess.Popen]] = []  # (name, process) in start order
        self._rundir: Path | None = None  # short path for unix sockets (108-byte limit)
        self._started = False
        self._script_counter = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalSlurm":
        ok, why = slurm_available()
        if not ok:
            raise SlurmError(why)
        if self._started:
            return self
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "log", "jobs"):
            (self.tmpdir / sub).mkdir(exist_ok=True)
        # Unix sockets (munge, slurmd's per-step sockets in the spool dir) must fit in 108 bytes,
        # and munged (as user munge) must be able to traverse to its socket: pytest's tmp dirs are
        # 0700 root and long, so those go to a short /tmp dir that stop() removes.
        self._rundir = Path(tempfile.mkdtemp(prefix="lsl-", dir="/tmp"))
        os.chmod(self._rundir, 0o755)
        for name in self.node_names:
            (self._rundir / "spool" / name).mkdir(parents=True)

        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(_SLURM_ENV_PREFIXES) and k not in _DIST_ENV}
        path = base_env.get("PATH", "/usr/bin:/bin")
        for extra in ("/usr/sbin", "/sbin"):
            if extra not in path.split(":"):
                path += ":" + extra
        base_env["PATH"] = path

        self._start_munge(base_env)
        ports = _free_ports(1 + self.nodes)
        self.ctld_port = ports[0]
        self.node_ports = dict(zip(self.node_names, ports[1:]))
        self.conf = self.tmpdir / "slurm.conf"
        self._write_config()
        self.env = dict(base_env, SLURM_CONF=str(self.conf))

        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name])
        self._wait_idle()

    def _start_munge(self, env: dict[str, str]) -> None:
        if self.reuse_munge and self._munge_works(SYSTEM_MUNGE_SOCKET, env):
            self.munge_socket = SYSTEM_MUNGE_SOCKET
            return
        mdir = self._rundir / "munge"
        mdir.mkdir()
        munge_pw = pwd.getpwnam("munge")
        key = mdir / "munge.key"
        if SYSTEM_MUNGE_KEY.is_file():
            shutil.copyfile(SYSTEM_MUNGE_KEY, key)
        else:  # no system key: a private one is enough, every daemon here uses this munged
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        # munged insists: socket dir executable by all, not writable by others; key owned by it.
        for p in (mdir, key):
            os.chown(p, munge_pw.pw_uid, munge_pw.pw_gid)
        os.chmod(mdir, 0o755)
        self.munge_socket = mdir / "munge.socket"
        self._spawn("munged", [
            _which("munged"), "--foreground", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
            f"--seed-file={mdir / 'munged.seed'}", f"--log-file={mdir / 'munged.log'}",
        ], env=env, user=munge_pw.pw_uid, group=munge_pw.pw_gid, extra_groups=[],
           cwd=str(mdir))
        deadline = time.monotonic() + 15
        while not self._munge_works(self.munge_socket, env):
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError("munged did not answer within 15 s\n" + self.log_tail())
            time.sleep(0.1)

    @staticmethod
    def _munge_works(sock: Path, env: Mapping[str, str]) -> bool:
        if not sock.exists():
            return False
        try:
            cred = subprocess.run([_which("munge"), "-n", "-S", str(sock)], env=env,
                                  capture_output=True, timeout=5)
            if cred.returncode != 0:
                return False
            back = subprocess.run([_which("unmunge"), "-S", str(sock)], input=cred.stdout,
                                  env=env, capture_output=True, timeout=5)
            return back.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _write_config(self) -> None:
        t, r = self.tmpdir, self._rundir
        (t / "plugstack.conf").write_text("")  # keep /etc/slurm/plugstack.conf out of it
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={self.node_ports[n]} "
            f"CPUs={self.cpus_per_node} Sockets=1 CoresPerSocket={self.cpus_per_node} "
            f"ThreadsPerCore=1 RealMemory={self.real_memory_mb}{gres} State=UNKNOWN"
            for n in self.node_names)
        auth_info = f"AuthInfo=cred_expire={self.cred_expire_s}"
        if self.munge_socket != SYSTEM_MUNGE_SOCKET:
            auth_info += f",socket={self.munge_socket}"
        if self.gpus_per_node:
            # gres/gpu drops GPUs without File= and wants character devices: stand-ins for
            # /dev/nvidiaN with /dev/null's numbers (nothing opens them; no cgroup confinement).
            (r / "dev").mkdir(exist_ok=True)
            for i in range(self.gpus_per_node):
                os.mknod(r / "dev" / f"gpu{i}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
            (t / "gres.conf").write_text(
                f"Name=gpu File={r / 'dev'}/gpu[0-{self.gpus_per_node - 1}]\n")
        # Job ids start at a random point so that two clusters rarely hand out the same ids (job
        # scripts derive ports from SLURM_JOB_ID).
        first_job_id = random.randint(1000, 60000)
        self.conf.write_text(f"""\
# Generated by tests/slurm_cluster.py for a throw-away local cluster.
ClusterName=lsl{os.getpid() % 100000}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
{auth_info}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
{"GresTypes=gpu" if self.gpus_per_node else ""}
# Simulated nodes may claim more CPUs than the host has.
SlurmdParameters=config_overrides
ReturnToService=2
# Schedule every second (default 60 s main loop, 30 s backfill): a requeued job becomes eligible
# after cred_expire with no event to wake the scheduler.
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait={self.kill_wait_s}
InactiveLimit=0
MinJobAge=600
FirstJobId={first_job_id}
PlugStackConfig={t / 'plugstack.conf'}
StateSaveLocation={t / 'state'}
SlurmdSpoolDir={r / 'spool' / '%n'}
SlurmctldPidFile={t / 'slurmctld.pid'}
SlurmdPidFile={t / 'slurmd-%n.pid'}
SlurmctldLogFile={t / 'log' / 'slurmctld.log'}
SlurmdLogFile={t / 'log' / 'slurmd-%n.log'}
{nodes}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
               **kw) -> subprocess.Popen:
        log = open(self.tmpdir / "log" / f"{name}.stdout", "ab")
        try:
            proc = subprocess.Popen(list(argv), env=dict(env or self.env), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kw)
        finally:
            log.close()
        self._procs.append((name, proc))
        return proc

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}\n" + self.log_tail())

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            if out.returncode == 0:
                states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
                if all(states.get(n) == "idle" for n in self.node_names):
                    return
            time.sleep(0.2)
        raise SlurmError(f"nodes not idle after {self.start_timeout_s} s: {states}\n"
                         + self.log_tail())

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons this object started (by PID), and kill any process
        left over from its jobs (found by this cluster's SLURM_CONF in its environment)."""
        if not self._started:
            return
        self._started = False
        try:
            if self.conf is not None and any(p.poll() is None for n, p in self._procs
                                             if n == "slurmctld"):
                self._cancel_all()
        finally:
            # slurmd first (they talk to slurmctld on the way out), munged last.
            order = ([p for p in self._procs if p[0].startswith("slurmd")]
                     + [p for p in self._procs if p[0] == "slurmctld"]
                     + [p for p in self._procs if p[0] == "munged"])
            for name, proc in order:
                _terminate(proc)
            self._procs.clear()
            if self.conf is not None:
                _kill_processes_with_env("SLURM_CONF", str(self.conf))
            if self._rundir is not None:
                shutil.rmtree(self._rundir, ignore_errors=True)
                self._rundir = None

    def _cancel_all(self) -> None:
        out = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10)
        ids = out.stdout.split() if out.returncode == 0 else []
        if not ids:
            return
        self.run(["scancel", *ids], check=False, timeout=10)
        deadline = time.monotonic() + self.kill_wait_s + 10
        while time.monotonic() < deadline:
            out = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10)
            if out.returncode != 0 or not out.stdout.split():
                return
            time.sleep(0.2)

    # ------------------------------------------------------------------ commands
    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
            env_overrides: Mapping[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
        """Run a command against this cluster (its SLURM_CONF), capturing text output."""
        env = dict(self.env)
        if env_overrides:
            env.update(env_overrides)
        argv = list(argv)
        argv[0] = _which(argv[0]) or argv[0]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n"
                             f"{proc.stderr}")
        return proc

    def sbatch(self, script: str | os.PathLike, env_overrides: Mapping[str, str] | None = None,
               wait: bool = True, args: Iterable[str] = (), cwd: str | os.PathLike | None = None,
               timeout: float = 120) -> SbatchResult:
        """Submit a batch script (a path, or the script text itself if it has a newline).

        ``args`` are sbatch options; they override the script's ``#SBATCH`` lines. The job's
        environment is ``env`` + ``env_overrides`` (sbatch exports it). ``cwd`` (default: the temp
        dir) becomes the job's SLURM_SUBMIT_DIR and working directory. With ``wait`` the call
        returns when the job has finished for good (a requeued job is followed until its last run),
        with its exit code and final state."""
        if isinstance(script, str) and "\n" in script:
            self._script_counter += 1
            path = self.tmpdir / "jobs" / f"job{self._script_counter}.sh"
            path.write_text(script)
            script = path
        argv = ["sbatch", "--parsable", *args, str(script)]
        proc = self.run(argv, env_overrides=env_overrides, cwd=str(cwd or self.tmpdir),
                        check=False, timeout=30)
        if proc.returncode != 0:
            raise SlurmError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        job_id = int(proc.stdout.strip().split(";")[0])
        result = SbatchResult(job_id, None, stdout=proc.stdout, stderr=proc.stderr)
        if wait:
            result.returncode, result.state = self.wait(job_id, timeout=timeout)
        return result

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...);
        empty once slurmctld has forgotten the job."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out.stdout))

    def wait(self, job_id: int, timeout: float = 120,
             states: Iterable[str] = TERMINAL_STATES) -> tuple[int | None, str]:
        """Wait until the job reaches one of ``states`` (default: finished for good); returns
        (exit code of the batch script or 128+signal, JobState)."""
        states = frozenset(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states:
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                rc = 128 + int(sig) if sig and int(sig) else int(code)
                return rc, state
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {info}\n"
                           + self.log_tail())

    def wait_running_step(self, job_id: int, timeout: float = 60) -> str:
        """Wait until the job has a running srun step (not just the batch shell); return its id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["squeue", "-h", "-s", "-j", str(job_id), "-o", "%i"], check=False)
            steps = [s for s in out.stdout.split()
                     if re.fullmatch(rf"{job_id}\.\d+", s)]
            if steps:
                return steps[0]
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                raise SlurmError(f"job {job_id} ended before a step started: {info}")
            time.sleep(0.2)
        raise TimeoutError(f"no running step in job {job_id} after {timeout} s")

    def scancel(self, job_id: int, *extra: str) -> subprocess.CompletedProcess:
        return self.run(["scancel", *extra, str(job_id)], check=False)

    def signal(self, job_id: int, sig: str = "USR1", target: str = "steps"
               ) -> subprocess.CompletedProcess:
        """Send ``sig`` without ending the job. ``target``: "steps" (every task of every srun
        step, not the batch shell: what ``#SBATCH --signal=USR1@T`` does), "batch" (the batch
        shell and its children, ``--batch``; like ``--signal=B:USR1@T``), "full" (both)."""
        flag = {"steps": [], "batch": ["--batch"], "full": ["--full"]}[target]
        return self.run(["scancel", f"--signal={sig}", *flag, str(job_id)], check=True)

    def node_addr(self, name: str) -> str:
        out = self.run(["scontrol", "show", "node", name]).stdout
        m = re.search(r"NodeAddr=(\S+)", out)
        if not m:
            raise SlurmError(f"no NodeAddr for {name}: {out}")
        return m.group(1)

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of every daemon log, for error messages."""
        parts = []
        logs = sorted((self.tmpdir / "log").glob("*")) if self.tmpdir.exists() else []
        if self._rundir is not None and (self._rundir / "munge" / "munged.log").exists():
            logs.append(self._rundir / "munge" / "munged.log")
        for f in logs:
            try:
                text = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"==> {f} <==\n" + "\n".join(text))
        return "\n".join(parts)


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM one process we started, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(_signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _kill_processes_with_env(key: str, value: str) -> list[int]:
    """SIGKILL every process whose environment has key=value (slurmstepd and job tasks of one
    cluster carry its SLURM_CONF), except this process. Returns the PIDs signalled."""
    needle = f"{key}={value}".encode()
    killed = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                os.kill(int(entry), _signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed
