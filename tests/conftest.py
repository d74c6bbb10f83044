"""Shared test helpers: the repository, the interpreter, the tiny model, and running the real
trainer in 1 or more processes (torchrun, as users do; DeepSpeed, gloo, CPU)."""
from __future__ import annotations

import contextlib
import json
import multiprocessing.process
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dreamprm.metrics import read_scalars  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEMO = REPO / "data" / "demo"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(REPO))  # benchmarks/


# ------------------------------------------------------------------------------------ test tiers
# `pytest -m "not slow"` is the fast tier: in-process tests only. A test that starts a process (or
# whose fixtures do) must say so with `slow` (pytest.ini): while a test that is not marked slow sets
# up and runs, starting a process fails it with the reason (not while it tears down: the last test
# of a module or session also finalises the fixtures of the slow tests before it, e.g. stops Slurm).
# The finer markers (which kind of slow test) need `slow` beside them, checked at collection.
KIND_MARKERS = ("multiprocess", "launcher", "slurm", "benchmark", "browser")


class ProcessOutsideSlowTier(AssertionError):
    """A test not marked slow started a process."""


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if item.get_closest_marker("slow") is None
                and any(item.get_closest_marker(kind) for kind in KIND_MARKERS)]
    if unmarked:
        raise pytest.UsageError(f"marked {'/'.join(KIND_MARKERS)} but not slow (add pytest.mark.slow): "
                                + ", ".join(unmarked[:10]))


@contextlib.contextmanager
def processes_refused(nodeid: str):
    """Make subprocess, os.system/posix_spawn and multiprocessing raise ProcessOutsideSlowTier."""
    def refuse(what):
        def refused(*args, **kwargs):
            raise ProcessOutsideSlowTier(
                f"{nodeid} starts a process ({what}: {str(args[1:2] or args[:1])[:200]}) but is not marked "
                "slow: mark the test or its module with pytest.mark.slow (pytest.ini), or keep it in process")
        return refused

    patches = [(subprocess.Popen, "_execute_child", refuse("subprocess")), (os, "system", refuse("os.system")),
               (os, "posix_spawn", refuse("os.posix_spawn")), (os, "posix_spawnp", refuse("os.posix_spawnp")),
               (multiprocessing.process.BaseProcess, "start", refuse("multiprocessing"))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _tier_guard(item):
    if item.get_closest_marker("slow") is not None:
        return contextlib.nullcontext()
    return processes_refused(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _tier_guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _tier_guard(item):
        yield


# ---------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread per rank, no hwloc GL probe, repo importable."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update({"HWLOC_COMPONENTS": "-gl", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{Path(PYTHON).parent}:{env.get('PATH', '')}"})
    env.update(extra)
    return env


def launch_command(script: str | Path, args: list[str], nproc: int = 1) -> list[str]:
    """`torchrun --standalone` for several ranks, plain python for one."""
    if nproc == 1:
        return [PYTHON, str(script), *args]
    return [PYTHON, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]


TRAIN = REPO / "launch" / "train.py"
INJECT_FAULTS = REPO / "tests" / "inject_faults.py"  # launch/train.py with NaNs on rank 0: its first argument is the plan


def run_train(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
              env: dict[str, str] | None = None, faults: str | None = None) -> subprocess.CompletedProcess:
    """Run launch/train.py for real (with `faults`, e.g. "lower:3;upper:2", through tests/inject_faults.py);
    on failure the output is in the assertion message."""
    command = launch_command(TRAIN, args, nproc) if faults is None else launch_command(INJECT_FAULTS, [faults, *args],
                                                                                      nproc)
    proc = subprocess.run(command, cwd=REPO,
                          env=env or base_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_trains(runs: list[dict], workers: int = 2) -> list[subprocess.CompletedProcess]:
    """run_train(**kwargs) for each of `runs`, `workers` at a time: independent 1-rank runs (one thread
    each) fill both cores instead of one; results in the order given, the first failure raised."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda kwargs: run_train(**kwargs), runs))


def load_export(path: str | Path):
    from dreamprm.model.loading import load_exported_prm
    return load_exported_prm(path)


def exported_tensors(path: str | Path) -> dict:
    """Backbone + head tensors of an exported PRM, by name."""
    from safetensors.torch import load_file
    path = Path(path)
    tensors = {f"backbone.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    tensors.update({f"score_head.{k}": v for k, v in load_file(str(path / "score_head.safetensors")).items()})
    return tensors


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process tests compute on one thread, as each rank of the trainer does (OMP_NUM_THREADS=1): the
    tiny model gains nothing from a second one, and on a loaded 2-core machine torch's thread pool made
    in-process tests 10-20x slower (tests/test_packing.py; the K-step unroll test: 4 s idle, 58 s loaded)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL directory (built once per session)."""
    from dreamprm.model.tiny import build_tiny_qwen2vl
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "tiny-qwen2vl")


@pytest.fixture(scope="session")
def fidelity_reference(tiny_model) -> dict[tuple[str, str], "torch.Tensor"]:
    """The float64 d_k of benchmarks/hypergrad_fidelity.py's fixed batches (8 training records, 4 meta
    chains, logits head, seed 1) for every (meta objective, aggregation), computed once per session
    by benchmarks/fp64_reference.py (one meta-gradient per combination, each domain gradient once)."""
    from benchmarks.hypergrad_fidelity import fixed_batches, reference_values
    from dreamprm.config import AGGREGATIONS, META_LOSSES
    from dreamprm.model.processor import load_processor
    domains, _, _, full_train, full_meta = fixed_batches(str(DEMO / "train.json"), str(DEMO / "meta.json"),
                                                         load_processor(tiny_model), 8, 4)
    return reference_values(str(tiny_model), "logits", 1, full_train, full_meta, len(domains),
                            [(o, a) for o in META_LOSSES for a in AGGREGATIONS])


def processes_with_env(needle: bytes) -> list[int]:
    """PIDs whose environment holds `needle` (e.g. b"SLURM_CONF=/path")."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:
            pass
    return found


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One private Slurm (tests/slurm_cluster.py: own munged, slurmctld, two simulated nodes n1 and n2,
    2 CPUs each) for the whole session: tests/test_slurm_cluster.py and tests/test_slurm_train.py.
    Skipped with the reason when not root or Slurm/munge are missing. At the end it is stopped, and
    no daemon, slurmstepd, job task or trainer carrying its SLURM_CONF may be left."""
    from slurm_cluster import LocalSlurm, slurm_available
    ok, why = slurm_available()
    if not ok:
        pytest.skip(why)
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2) as cluster:
        daemons = [proc.pid for _, proc in cluster._procs]
        needle = b"SLURM_CONF=" + str(cluster.conf).encode()
        yield cluster
    left = [pid for pid in daemons + processes_with_env(needle) if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"]
    assert not left, f"processes of the session's Slurm left after stop: {left}"


def small_run_args(model: Path, out: Path, *extra: str) -> list[str]:
    """Flags for a short fp32 CPU run on the demo (fast, deterministic)."""
    return ["--reward_model", str(model), "--weights_path", str(out), "--precision", "fp32",
            "--lr", "1e-3", "--meta_lr", "0.05", "--log_every", "2", *extra]


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True)
def no_stale_mlflow_submodules():
    """MLflow's package sets `mlflow.version` etc. as attributes only when it imports those submodules
    itself: if `mlflow` has left sys.modules while its submodules stayed (seen once in a whole-suite
    run, cause not found), the next `import mlflow` fails with "partially initialized module 'mlflow'
    has no attribute 'version'". Each test starts without such leftovers."""
    if "mlflow" not in sys.modules:
        for name in [m for m in sys.modules if m.startswith("mlflow.")]:
            del sys.modules[name]
    yield
