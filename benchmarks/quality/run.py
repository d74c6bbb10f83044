#!/usr/bin/env python
"""The domain-quality benchmark, one command: does DreamPRM find the bad domains and select better?

    python benchmarks/quality/run.py                      # the full benchmark (3 seeds), ~16 min on 2 cores
    python benchmarks/quality/run.py --seeds 0 --warmup 400 --steps 200 --arms exact   # a quick look

Steps (all on CPU, the tiny Qwen2-VL, fp32, one process per run):

1. `make_task.py` writes the task (five training domains of known label quality, a clean meta set,
   a Best-of-N test set with N = 8) under ``--out``/task.
2. Per seed, a tiny Qwen2-VL (random init from the seed), then:
   - ``warmup``:  vanilla PRM training (``--baseline``) for ``--warmup`` steps on all five domains;
   - ``vanilla``: resumes the warm-up checkpoint, ``--steps`` more vanilla steps;
   - ``exact``:   resumes it, ``--steps`` steps of DreamPRM with ``--hypergrad exact``;
   - ``fd``:      the same with ``--hypergrad fd`` (fp32, as it requires);
   - ``clean``:   vanilla on the clean domain alone, from scratch, ``--clean_steps`` steps: the
                  learnability check (it must beat a random pick clearly).
   The warm-up is a meta warm-up: the three arms share it and differ only afterwards. At random
   initialisation the hypergradient carries no domain signal (measured with `diagnose.py`: per-step
   signal-to-noise ~0.02) and the upper level only random-walks the weights; after 400 vanilla
   steps one upper step's SNR is ~0.1 for the clean and inverted domains at batch 16 / meta batch 8,
   so the arms take an upper step after every lower step (--unroll_steps 1: 300 upper steps,
   cumulative SNR ~sqrt(300) x 0.1; with 3 the weights of seed 0 ordered clean < noisy_50).
3. Every trained PRM selects on the test set (`python -m dreamprm.select`); the table reports the
   learned weight of each domain beside its noise level, the Spearman correlation between weight
   and noise per run (-1: weights fall exactly as noise rises), the meta loss at the end of each
   DreamPRM run (0.25 = chance: chain scores that do not separate right from wrong carry no domain
   signal for the upper level), and Best-of-N accuracy of a random pick, majority vote, the vanilla
   PRM, each DreamPRM arm and the clean-only PRM (mean ± std over seeds).

What it found (RESULTS.md has the numbers and the reasons): exact and fd agree seed by seed; where
the warm-up PRM's meta loss leaves chance, DreamPRM drives the inverted domain to ~0.05, ranks clean
first and beats vanilla at Best-of-8 (seed 0); where it does not, the upper level follows whatever
correlates with the meta labels (chain length, label means) and the weights wander.

Runs go ``--workers`` at a time with ``--threads`` threads each (2 x 1 is faster than 1 x 2 on two
cores: one process keeps ~1.2 cores busy). Writes ``--results`` (Markdown) and ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE), str(REPO)]

import make_task  # noqa: E402

ARMS = ("vanilla", "exact", "fd", "clean")
ARM_LABELS = {"vanilla": "vanilla PRM (--baseline)", "exact": "DreamPRM --hypergrad exact",
              "fd": "DreamPRM --hypergrad fd", "clean": "vanilla PRM, clean domain only"}
# The quality axis: share of labels without information; the inverted domain (labels that carry
# wrong information) ranks below the noisiest one.
NOISE = {name: fraction for name, (_, fraction) in make_task.DOMAINS.items()}


# ------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    name: str
    command: list[str]
    after: tuple[str, ...] = ()
    log: Path | None = None
    seconds: float = 0.0
    returncode: int | None = None
    done: threading.Event = field(default_factory=threading.Event)


def run_jobs(jobs: list[Job], workers: int, env: dict[str, str]) -> None:
    """Run the jobs `workers` at a time, each after the jobs it names; stop everything on a failure."""
    by_name = {job.name: job for job in jobs}
    lock = threading.Lock()
    pending = list(jobs)
    failed: list[Job] = []

    def take() -> Job | None:
        while True:
            with lock:
                if failed or not pending:
                    return None
                for job in pending:
                    if all(by_name[a].done.is_set() for a in job.after):
                        pending.remove(job)
                        return job
                waiting = [by_name[a] for job in pending for a in job.after if not by_name[a].done.is_set()]
            waiting[0].done.wait(timeout=1.0)

    def worker() -> None:
        while (job := take()) is not None:
            started = time.perf_counter()
            with open(job.log, "w") as log:
                log.write("$ " + shlex.join(job.command) + "\n")
                log.flush()
                job.returncode = subprocess.call(job.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            job.seconds = time.perf_counter() - started
            print(f"  {job.name:<18} {job.seconds:6.1f} s" + ("" if job.returncode == 0 else
                                                               f"  FAILED ({job.returncode}), see {job.log}"),
                  flush=True)
            with lock:
                if job.returncode != 0:
                    failed.append(job)
            job.done.set()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise SystemExit(f"error: {failed[0].name} failed; its output is in {failed[0].log}")


# -------------------------------------------------------------------------------- statistics
def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    return make_task.pearson(ranks(x), ranks(y))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


# ------------------------------------------------------------------------------------- plan
def train_command(args, task: Path, model: Path, out: Path, seed: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "train.py"), "--reward_model", str(model), "--weights_path", str(out),
            "--meta_json_file", str(task / "meta.json"), "--precision", "fp32", "--head", args.head,
            "--lr", str(args.lr), "--batch_size", str(args.batch_size), "--seed", str(seed),
            "--log_every", "20", "--save_every_iterations", "1000000", *extra]


def select_command(run: Path, task: Path) -> list[str]:
    return [sys.executable, "-m", "dreamprm.select", "--prm", str(run / "export"), "--candidates",
            str(task / "test.json"), "--output", str(run / "test_selection.json"),
            "--report", str(run / "test_report.json"), "--device", "cpu"]


def plan(args, task: Path, root: Path) -> list[Job]:
    jobs: list[Job] = []
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    arms = [a for a in ARMS if a in args.arms]
    bilevel = ["--meta_lr", str(args.meta_lr), "--meta_batch_size", str(args.meta_batch_size),
               "--unroll_steps", str(args.unroll_steps), "--aggregation", args.aggregation]
    for seed in args.seeds:
        model = root / "models" / f"tiny-s{seed}"
        warm = root / "runs" / f"warmup-s{seed}"
        total = args.warmup + args.steps
        needs_warmup = any(a in arms for a in ("vanilla", "exact", "fd"))
        if needs_warmup:
            jobs.append(Job(f"warmup-s{seed}", train_command(
                args, task, model, warm, seed, "--train_json_file", str(task / "train.json"), "--baseline",
                "--iteration_num", str(args.warmup), "--no-export"), log=logs / f"warmup-s{seed}.log"))
        checkpoint = warm / "checkpoints" / f"step_{args.warmup:08d}"
        for arm in arms:
            run = root / "runs" / f"{arm}-s{seed}"
            if arm == "clean":
                command = train_command(args, task, model, run, seed, "--train_json_file",
                                        str(task / "train_clean.json"), "--baseline",
                                        "--iteration_num", str(args.clean_steps))
                after: tuple[str, ...] = ()
            else:
                mode = ["--baseline"] if arm == "vanilla" else ["--hypergrad", arm, *bilevel]
                command = train_command(args, task, model, run, seed, "--train_json_file", str(task / "train.json"),
                                        "--resume", str(checkpoint), "--iteration_num", str(total), *mode)
                after = (f"warmup-s{seed}",)
            jobs.append(Job(f"{arm}-s{seed}", command, after, log=logs / f"{arm}-s{seed}.log"))
            jobs.append(Job(f"select-{arm}-s{seed}", select_command(run, task), (f"{arm}-s{seed}",),
                            log=logs / f"select-{arm}-s{seed}.log"))
    # Long jobs first among the ready ones: warm-ups, then the bilevel arms.
    priority = {"warmup": 0, "exact": 1, "fd": 1, "vanilla": 2, "clean": 3, "select": 0}
    jobs.sort(key=lambda j: priority[j.name.split("-")[0]])
    return jobs


# ---------------------------------------------------------------------------------- results
def collect(args, root: Path) -> dict:
    runs = {}
    for seed in args.seeds:
        for arm in args.arms:
            run = root / "runs" / f"{arm}-s{seed}"
            report = json.loads((run / "test_report.json").read_text())
            by_n = {row["n"]: row for row in report["by_n"]}
            entry = {"arm": arm, "seed": seed, "n": report["n_max"], "questions": report["questions"],
                     "by_n": {str(row["n"]): {k: row[k] for k in ("prm", "majority", "random", "oracle")}
                              for row in report["by_n"]}}
            if arm in ("exact", "fd"):
                weights = json.loads((run / "domain_weights.json").read_text())["weights"]
                names = list(NOISE)
                entry["weights"] = {name: weights[name] for name in names}
                entry["spearman_weight_noise"] = spearman([weights[n] for n in names], [NOISE[n] for n in names])
                entry["meta_loss_end"] = final_meta_loss(run)
            runs[f"{arm}-s{seed}"] = entry
    return runs


def final_meta_loss(run: Path, last: int = 50) -> float:
    """Mean meta loss of the last `last` upper steps (TensorBoard): 0.25 is a PRM whose chain scores
    do not separate right from wrong meta chains, where the upper level has no quality signal."""
    from dreamprm.metrics import read_scalars
    return statistics.fmean(value for _, value in read_scalars(run / "tb")["meta/loss"][-last:])


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_end": os.getloadavg()}


def table(args, task_manifest: dict, runs: dict) -> str:
    seeds = args.seeds
    n = next(iter(runs.values()))["n"]
    lines = []
    bilevel = [a for a in ("exact", "fd") if a in args.arms]
    if bilevel:
        lines += ["### Learned domain weights (mean 1) after training", "",
                  "| domain | noise | label mean | " + " | ".join(
                      f"{a} s{s}" for a in bilevel for s in seeds) + " | " + " | ".join(
                      f"{a} mean ± std" for a in bilevel) + " |",
                  "|---|---:|---:|" + "---:|" * (len(bilevel) * (len(seeds) + 1))]
        for name in NOISE:
            d = task_manifest["domains"][name]
            noise = "inverted" if d["kind"] == "inverted" else f"{d['noise']:.0%}"
            cells = [f"{runs[f'{a}-s{s}']['weights'][name]:.2f}" for a in bilevel for s in seeds]
            cells += [fmt([runs[f"{a}-s{s}"]["weights"][name] for s in seeds], 2) for a in bilevel]
            lines.append(f"| {name} | {noise} | {d['label_mean']:.3f} | " + " | ".join(cells) + " |")
        cells = [f"{runs[f'{a}-s{s}']['spearman_weight_noise']:+.2f}" for a in bilevel for s in seeds]
        cells += [fmt([runs[f"{a}-s{s}"]["spearman_weight_noise"] for s in seeds], 2) for a in bilevel]
        lines.append("| **Spearman(weight, noise)** | | | " + " | ".join(cells) + " |")
        cells = [f"{runs[f'{a}-s{s}']['meta_loss_end']:.3f}" for a in bilevel for s in seeds]
        cells += [fmt([runs[f"{a}-s{s}"]["meta_loss_end"] for s in seeds], 3) for a in bilevel]
        lines.append("| meta loss, last 50 upper steps (0.25: chance) | | | " + " | ".join(cells) + " |")
        lines.append("")
    any_run = next(iter(runs.values()))
    ns = list(any_run["by_n"])
    lines += [f"### Best-of-N accuracy on {any_run['questions']} held-out questions (mean ± std over seeds "
              f"{', '.join(map(str, seeds))}; N < {n}: mean over candidate subsets)", "",
              "| selector | " + " | ".join(f"N={k}" for k in ns) + f" | per seed, N={n} |",
              "|---|" + "---:|" * (len(ns) + 1)]
    # Random pick, majority vote and the oracle do not depend on the PRM: the same in every report.
    for key, label in (("random", "random pick"), ("majority", "majority vote")):
        lines.append(f"| {label} | " + " | ".join(f"{any_run['by_n'][k][key]:.3f}" for k in ns) + " | |")
    for arm in ARMS:
        if arm not in args.arms:
            continue
        cells = [fmt([runs[f"{arm}-s{s}"]["by_n"][k]["prm"] for s in seeds]) for k in ns]
        per_seed = ", ".join(f"{runs[f'{arm}-s{s}']['by_n'][str(n)]['prm']:.3f}" for s in seeds)
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + f" | {per_seed} |")
    lines.append("| oracle (pass@N) | " + " | ".join(f"{any_run['by_n'][k]['oracle']:.3f}" for k in ns) + " | |")
    return "\n".join(lines)


def write_results(args, command: str, task_manifest: dict, runs: dict, timing: dict, path_md: Path,
                  path_json: Path) -> None:
    info = machine()
    result = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("results", "json")},
              "task": task_manifest, "timing": timing, "runs": runs}
    path_json.write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# Domain-quality benchmark: results", "",
        f"Command: `{command}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['platform']}, Python {info['python']}, "
        f"torch {info['torch']}  ",
        f"Wall time: {timing['wall_s']:.0f} s ({timing['wall_s'] / 60:.1f} min) with {args.workers} run(s) at a time x "
        f"{args.threads} thread(s); CPU time of all runs {timing['cpu_s']:.0f} s; load average at the end "
        f"{info['load_average_at_end'][0]:.1f} (other work on the machine slows the wall time)", "",
        f"Task (`make_task.py`, seed {task_manifest['seed']}): {task_manifest['train_records']} training records "
        f"in {len(task_manifest['domains'])} domains (the inverted one {args.inverted_size:g}x as many chains), "
        f"{task_manifest['meta']['chains']} meta chains "
        f"({task_manifest['meta']['true']} right), {task_manifest['test']['questions']} test questions x "
        f"{task_manifest['test']['n']} candidates. Training: tiny Qwen2-VL (hidden {args.hidden_size}, "
        f"{args.num_layers} layers, --head {args.head}), fp32, --lr {args.lr}, --batch_size {args.batch_size}; "
        f"meta warm-up {args.warmup} vanilla steps, then {args.steps} steps per arm (DreamPRM: --meta_lr "
        f"{args.meta_lr}, --meta_batch_size {args.meta_batch_size}, --unroll_steps {args.unroll_steps}, "
        f"--aggregation {args.aggregation}); clean-only: {args.clean_steps} steps from scratch.", "",
        table(args, task_manifest, runs), "",
    ]
    path_md.write_text("\n".join(md) + "\n")


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "quality"), help="task, models, runs and logs go here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    g = p.add_argument_group("task")
    g.add_argument("--task_seed", type=int, default=0)
    g.add_argument("--chains_per_domain", type=int, default=200)
    g.add_argument("--meta", type=int, default=128, help="meta chains (half right)")
    g.add_argument("--test", type=int, default=96, help="Best-of-N test questions")
    g.add_argument("--inverted_size", type=float, default=make_task.INVERTED_SIZE,
                   help="chains of the inverted domain, in units of --chains_per_domain")
    g = p.add_argument_group("model and training")
    g.add_argument("--hidden_size", type=int, default=64)
    g.add_argument("--num_layers", type=int, default=2)
    g.add_argument("--head", default="hidden", choices=("hidden", "logits"))
    g.add_argument("--lr", type=float, default=1e-3,
                   help="PRM learning rate; 3e-3 collapses the mixed-domain PRM to a constant in 2 of 3 seeds")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--warmup", type=int, default=400, help="shared vanilla steps before the arms branch")
    g.add_argument("--steps", type=int, default=300, help="steps of each arm after the warm-up")
    g.add_argument("--clean_steps", type=int, default=400, help="steps of the clean-only check (from scratch)")
    g.add_argument("--meta_lr", type=float, default=0.1)
    g.add_argument("--meta_batch_size", type=int, default=8)
    g.add_argument("--unroll_steps", type=int, default=1,
                   help="lower steps per upper step; fewer upper steps leave the weights noise-dominated")
    g.add_argument("--aggregation", default="mean_logit")
    g = p.add_argument_group("execution and output")
    g.add_argument("--workers", type=int, default=2, help="runs at a time")
    g.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    g.add_argument("--results", default=str(HERE / "RESULTS.md"))
    g.add_argument("--json", default=str(HERE / "results.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/quality/run.py", *argv])
    root = Path(args.out)
    started = time.perf_counter()
    print(f"task -> {root / 'task'}", flush=True)
    manifest = make_task.make_task(root / "task", args.task_seed, args.chains_per_domain, args.meta, args.test,
                                   inverted_size=args.inverted_size)
    from dreamprm.model.tiny import build_tiny_qwen2vl
    for seed in args.seeds:
        build_tiny_qwen2vl(root / "models" / f"tiny-s{seed}", seed=seed, hidden_size=args.hidden_size,
                           num_layers=args.num_layers)
    jobs = plan(args, root / "task", root)
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                "HWLOC_COMPONENTS": "-gl", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    print(f"{len(jobs)} jobs, {args.workers} at a time:", flush=True)
    run_jobs(jobs, args.workers, env)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
              "jobs": {job.name: round(job.seconds, 1) for job in jobs}}
    runs = collect(args, root)
    write_results(args, command, manifest, runs, timing, Path(args.results), Path(args.json))
    print(Path(args.results).read_text())
    return {"runs": runs, "timing": timing, "task": manifest}


if __name__ == "__main__":
    main()
