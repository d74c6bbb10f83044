#!/usr/bin/env python
"""The domain-quality benchmark, one command: does DreamPRM find the bad domains and select better?

    python benchmarks/quality/run.py            # three tasks x three seeds, the default arms (see RESULTS.md)
    python benchmarks/quality/run.py --tasks noise --seeds 0 --arms vanilla pairwise   # a quick look

Everything, the report included, goes to a new folder, ``runs/quality/<UTC start time>`` (``--out``);
a committed report of this folder is replaced only with ``--overwrite_committed``.

Steps (all on CPU, the tiny Qwen2-VL, fp32 unless an arm says bf16, one process per run):

1. `make_task.py` writes each task (``--tasks``: noise, label_mean, real; training domains of known
   label quality, a clean meta set in two layouts, a Best-of-N test set with N = 8) under
   ``--out``/TASK/task.
2. Per task and seed, a tiny Qwen2-VL (random init from the seed), then:
   - ``warmup``:   vanilla PRM training (``--baseline``) for ``--warmup`` steps on all domains;
   - ``vanilla``:  resumes the warm-up checkpoint, ``--steps`` more vanilla steps;
   - ``pairwise``: resumes it, ``--steps`` steps of DreamPRM at the trainer's defaults (pairwise meta
                   objective, gated domain-logit optimiser, the segment's batches), meta set
                   ``meta.json`` (one chain per question: every pair compares two questions);
   - ``grouped``:  the same on ``meta_grouped.json`` (as many chains, four per question: pairs
                   within a question, as Best-of-N compares chains and as real meta sets are laid out);
   - ``mse``:      (optional) the original objective (``--meta_loss mse``);
   - ``original``: (optional) the original recipe: mse, AdamW on the logits, the last batch only;
   - ``exact``:    (optional) the defaults with ``--hypergrad exact`` whatever ``--hypergrad`` says;
   - ``evidence``: (optional) the defaults with ``--meta_evidence 2`` (the gate also waits for a meta
                   loss two standard errors below chance);
   - ``vanilla_bf16``, ``pairwise_bf16``: (optional) vanilla and the defaults in ``--precision bf16``
                   (``--hypergrad exact``: fd refuses bf16), from a bf16 warm-up of their own;
   - ``clean``:    vanilla on the clean domain(s) alone, from scratch, ``--clean_steps`` steps, on the
                   first ``--clean_seeds`` seeds: the learnability check (it must beat a random pick).
   The warm-up is a meta warm-up: the arms share it and differ only afterwards. At random
   initialisation the hypergradient carries no domain signal (`diagnose.py`: per-step SNR ~0.02).
3. Every trained PRM selects on the test set (`python -m dreamprm.bestofn`); RESULTS.md reports, per
   task, the learned weight of each domain beside its corruption, the Spearman correlation between
   weight and corruption per run (-1: weights fall exactly as corruption rises), the meta loss at the
   end of each DreamPRM run, Best-of-N accuracy of every arm (mean ± std over seeds), and, over every
   (task, seed) run, how often and by how much each DreamPRM arm beats vanilla at Best-of-8.

Runs go ``--workers`` at a time with ``--threads`` threads each (2 x 1 is faster than 1 x 2 on two
cores: one process keeps ~1.2 cores busy). ``--reuse`` continues an interrupted benchmark (same
settings and ``--out``): jobs whose results exist are skipped.
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

from dreamprm.clean import ranking_aucs  # noqa: E402
from dreamprm.ranking import auc as roc_auc  # noqa: E402
from dreamprm.ranking import average_ranks as ranks  # noqa: E402

# Arm -> the trainer flags that make it (DreamPRM arms: everything else at the trainer's defaults).
ARMS = {
    "vanilla": ["--baseline"],
    "mse": ["--meta_loss", "mse"],  # the original objective
    "pairwise": ["--meta_loss", "pairwise"],  # the default objective
    "grouped": ["--meta_loss", "pairwise"],  # the same on meta_grouped.json: four chains per question
    "original": ["--meta_loss", "mse", "--meta_optimizer", "adamw", "--hypergrad_batches", "last"],  # the recipe
    "exact": ["--hypergrad", "exact"],  # defaults with the exact estimator (whatever --hypergrad says)
    "instance": ["--weighting", "instance", "--hypergrad", "fd"],  # one weight per record (needs fd)
    "both": ["--weighting", "both", "--hypergrad", "fd"],  # domain x record weights
    "instance_net": ["--weighting", "instance_net", "--hypergrad", "fd"],  # record weights from the instance net
    "both_net": ["--weighting", "both_net", "--hypergrad", "fd"],  # domain x instance-net weights
    # The instance net without its loss-gap input (the worst noise run's cause, RESULTS_instance_net.md)
    "instance_net_nogap": ["--weighting", "instance_net", "--instance_net_features", "position,domain",
                           "--hypergrad", "fd"],
    "clipped": ["--weighting", "instance", "--instance_recipe", "clipped", "--hypergrad", "fd"],  # DreamPRM-1.5's table
    "clean": ["--baseline"],  # the clean domain(s) alone, from scratch
    "evidence": ["--meta_loss", "pairwise", "--meta_evidence", "2"],  # the gate also waits for a meta loss below chance
    "vanilla_bf16": ["--baseline"],  # what GPU users run: bf16 (from a bf16 warm-up)
    "pairwise_bf16": ["--meta_loss", "pairwise", "--hypergrad", "exact"],  # fd refuses bf16 parameters
}
PRECISION = {"vanilla_bf16": "bf16", "pairwise_bf16": "bf16"}  # the other arms: fp32
META_FILE = {"grouped": "meta_grouped.json"}  # the other arms: meta.json (one chain per question)
DEFAULT_ARMS = ("vanilla", "pairwise", "grouped", "clean")
ARM_LABELS = {"vanilla": "vanilla PRM (--baseline)", "mse": "DreamPRM, original objective (--meta_loss mse)",
              "pairwise": "DreamPRM, defaults (--meta_loss pairwise), one meta chain per question",
              "grouped": "DreamPRM, defaults, four meta chains per question (pairs within a question)",
              "original": "DreamPRM, original recipe (mse, AdamW, last batch)",
              "exact": "DreamPRM, defaults with --hypergrad exact", "clean": "vanilla PRM, clean domain(s) only",
              "instance": "DreamPRM, instance weights (--weighting instance)",
              "both": "DreamPRM, domain x instance weights (--weighting both)",
              "instance_net": "DreamPRM, instance net (--weighting instance_net)",
              "both_net": "DreamPRM, domain x instance net (--weighting both_net)",
              "instance_net_nogap": "DreamPRM, instance net without gap (--instance_net_features position,domain)",
              "clipped": "DreamPRM-1.5's record table, unnormalised, clipped to [-1, 3] (--instance_recipe clipped)",
              "evidence": "DreamPRM, defaults with --meta_evidence 2",
              "vanilla_bf16": "vanilla PRM, --precision bf16",
              "pairwise_bf16": "DreamPRM, defaults, --precision bf16 (--hypergrad exact)"}
BILEVEL_ARMS = ("mse", "pairwise", "grouped", "evidence", "original", "exact", "instance", "both", "instance_net",
                "both_net", "clipped", "pairwise_bf16", "instance_net_nogap")
INSTANCE_ARMS = ("instance", "both", "instance_net", "both_net", "clipped", "instance_net_nogap")
# Domain weights stay 1 in these: each domain's mean record weight is shown.
DOMAIN_FREE_ARMS = ("instance", "instance_net", "clipped", "instance_net_nogap")
# The arm each DreamPRM arm is compared with (same precision, same warm-up).
BASELINE_OF = {"pairwise_bf16": "vanilla_bf16"}


def noise_of(task: str) -> dict[str, float]:
    """The quality axis of a task's domains (share of labels without information; inverted 1)."""
    return {name: d.noise for name, d in make_task.TASKS[task].items()}


# ------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    name: str
    command: list[str]
    after: tuple[str, ...] = ()
    log: Path | None = None
    result: Path | None = None  # a file the job writes last: with --reuse, a job whose result exists is skipped
    seconds: float = 0.0
    returncode: int | None = None
    done: threading.Event = field(default_factory=threading.Event)


def run_jobs(jobs: list[Job], workers: int, env: dict[str, str], reuse: bool = False) -> None:
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
            if reuse and job.result is not None and job.result.exists():
                print(f"  {job.name:<18} reused", flush=True)
                job.returncode = 0
                job.done.set()
                continue
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
def spearman(x: list[float], y: list[float]) -> float:
    return make_task.pearson(ranks(x), ranks(y))


def auc(clean: list[float], corrupted: list[float]) -> float:
    """P(a clean record's weight > a corrupted one's), ties counting 1/2 (Mann-Whitney)."""
    return roc_auc(clean + corrupted, [True] * len(clean) + [False] * len(corrupted))


def instance_report(run: Path, task: Path, domains: list[str]) -> dict:
    """AUC of a run's instance weights for corrupted against clean records: over the task, and
    within each domain that holds corrupted records; and each domain's mean instance weight."""
    bad = set(json.loads((task / "corrupted.json").read_text()))
    rows = [json.loads(line) for line in (run / "instance_weights.jsonl").read_text().splitlines()]
    weight = {r["record"]: r["weight"] for r in rows}
    domain = {r["record"]: r["domain"] for r in rows}
    # The record weights; domain x record, what the lower loss multiplies a record by (domain weights are 1
    # without --weighting both/both_net); and the plain baselines on the visited records: the loss ranking
    # and |MC accuracy - PRM prediction| (`gap`).
    aucs = ranking_aucs(rows, bad, json.loads((run / "domain_weights.json").read_text())["weights"])
    out = {"auc": aucs["weights"], "auc_by_domain": {}, "auc_effective": aucs["effective"], "auc_loss": aucs["loss"],
           "auc_gap": aucs["gap"],
           "mean_weight": {d: statistics.fmean(w for i, w in weight.items() if domain[i] == d) for d in domains}}
    for d in domains:
        own_bad = [weight[i] for i in bad if domain[i] == d]
        own_clean = [w for i, w in weight.items() if domain[i] == d and i not in bad]
        if own_bad and own_clean:
            out["auc_by_domain"][d] = auc(own_clean, own_bad)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


# ------------------------------------------------------------------------------------- plan
def train_command(args, task: Path, model: Path, out: Path, seed: int, *extra: str, precision: str = "fp32",
                  meta_file: str = "meta.json") -> list[str]:
    return [sys.executable, str(REPO / "launch" / "train.py"), "--reward_model", str(model), "--weights_path", str(out),
            "--meta_json_file", str(task / meta_file), "--precision", precision, "--head", args.head,
            "--lr", str(args.lr), "--batch_size", str(args.batch_size), "--seed", str(seed),
            "--log_every", "20", "--save_every_iterations", "1000000", *extra]


def bestofn_command(run: Path, task: Path) -> list[str]:
    return [sys.executable, "-m", "dreamprm.bestofn", "--prm", str(run / "export"), "--candidates",
            str(task / "test.json"), "--output", str(run / "test_selection.json"),
            "--report", str(run / "test_report.json"), "--device", "cpu"]


def seeds_of(args, arm: str) -> list[int]:
    """The seeds an arm runs: every seed, except the clean-only check (the first --clean_seeds)."""
    return args.seeds[:args.clean_seeds] if arm == "clean" else args.seeds


def plan(args, root: Path) -> list[Job]:
    """Per task and seed: a shared vanilla warm-up (one per precision), then each arm from its
    checkpoint, then selection."""
    jobs: list[Job] = []
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bilevel = ["--meta_lr", str(args.meta_lr), "--meta_batch_size", str(args.meta_batch_size),
               "--unroll_steps", str(args.unroll_steps), "--aggregation", args.aggregation]
    for task_name in args.tasks:
        task = root / task_name / "task"
        for seed in args.seeds:
            tag = f"{task_name}-s{seed}"
            model = root / "models" / f"tiny-s{seed}"
            arms = [a for a in args.arms if seed in seeds_of(args, a)]
            for precision in sorted({PRECISION.get(a, "fp32") for a in arms if a != "clean"}):
                suffix = "" if precision == "fp32" else f"_{precision}"
                warm = root / task_name / "runs" / f"warmup{suffix}-s{seed}"
                jobs.append(Job(f"warmup{suffix}-{tag}", train_command(
                    args, task, model, warm, seed, "--train_json_file", str(task / "train.json"), "--baseline",
                    "--iteration_num", str(args.warmup), "--no-export", precision=precision),
                    log=logs / f"warmup{suffix}-{tag}.log", result=warm / "domain_weights.json"))
            for arm in arms:
                run = root / task_name / "runs" / f"{arm}-s{seed}"
                precision = PRECISION.get(arm, "fp32")
                suffix = "" if precision == "fp32" else f"_{precision}"
                if arm == "clean":
                    command = train_command(args, task, model, run, seed, "--train_json_file",
                                            str(task / "train_clean.json"), "--baseline",
                                            "--iteration_num", str(args.clean_steps))
                    after: tuple[str, ...] = ()
                else:
                    checkpoint = root / task_name / "runs" / f"warmup{suffix}-s{seed}" / "checkpoints" / \
                        f"step_{args.warmup:08d}"
                    mode = ARMS[arm] + ([] if arm not in BILEVEL_ARMS else bilevel + ["--hypergrad", args.hypergrad] * (
                        "--hypergrad" not in ARMS[arm]))
                    command = train_command(args, task, model, run, seed, "--train_json_file", str(task / "train.json"),
                                            "--resume", str(checkpoint), "--iteration_num",
                                            str(args.warmup + args.steps), *mode, precision=precision,
                                            meta_file=META_FILE.get(arm, "meta.json"))
                    after = (f"warmup{suffix}-{tag}",)
                jobs.append(Job(f"{arm}-{tag}", command, after, log=logs / f"{arm}-{tag}.log",
                                result=run / "export" / "prm_config.json"))
                jobs.append(Job(f"select-{arm}-{tag}", bestofn_command(run, task), (f"{arm}-{tag}",),
                                log=logs / f"select-{arm}-{tag}.log", result=run / "test_report.json"))
    # Long jobs first among the ready ones: warm-ups, then the bilevel arms.
    priority = {"warmup": 0, "warmup_bf16": 0, "select": 0, "vanilla": 2, "vanilla_bf16": 2, "clean": 3,
                **{a: 1 for a in BILEVEL_ARMS}}
    jobs.sort(key=lambda j: priority[j.name.split("-")[0]])
    return jobs


# ---------------------------------------------------------------------------------- results
def collect(args, root: Path) -> dict:
    runs = {}
    for task_name in args.tasks:
        noise = noise_of(task_name)
        for arm in args.arms:
            for seed in seeds_of(args, arm):
                run = root / task_name / "runs" / f"{arm}-s{seed}"
                report = json.loads((run / "test_report.json").read_text())
                entry = {"task": task_name, "arm": arm, "seed": seed, "n": report["n_max"],
                         "questions": report["questions"],
                         "by_n": {str(row["n"]): {k: row[k] for k in ("prm", "majority", "random", "oracle")}
                                  for row in report["by_n"]}}
                if arm in BILEVEL_ARMS:
                    weights = json.loads((run / "domain_weights.json").read_text())["weights"]
                    if arm in INSTANCE_ARMS:
                        entry["instance"] = instance_report(run, root / task_name / "task", list(noise))
                        if arm in DOMAIN_FREE_ARMS:
                            weights = entry["instance"]["mean_weight"]
                    entry["weights"] = {name: weights[name] for name in noise}
                    entry["spearman_weight_noise"] = spearman([weights[n] for n in noise], list(noise.values()))
                    entry["meta_loss_end"] = final_meta_loss(run)
                runs[f"{arm}-{task_name}-s{seed}"] = entry
    return runs


def final_meta_loss(run: Path, last: int = 20) -> float:
    """Mean meta loss of the last `last` upper steps whose meta batch held a (right, wrong) pair
    (TensorBoard; runs from before 2026-12-04 logged 0 for the others: left out here too)."""
    from dreamprm.metrics import read_scalars
    return statistics.fmean([value for _, value in read_scalars(run / "tb")["meta/loss"] if value != 0][-last:])


def goals(args, runs: dict) -> list[str]:
    """The issue's goals, checked on these runs: DreamPRM (the default arm) against vanilla at Best-of-N."""
    n = str(next(iter(runs.values()))["n"])
    lines = []
    for arm in [a for a in args.arms if a in BILEVEL_ARMS]:
        baseline = BASELINE_OF.get(arm, "vanilla")
        gains = [runs[f"{arm}-{t}-s{s}"]["by_n"][n]["prm"] - runs[f"{baseline}-{t}-s{s}"]["by_n"][n]["prm"]
                 for t in args.tasks for s in args.seeds] if baseline in args.arms else []
        if not gains:
            continue
        above = sum(g > 0 for g in gains)
        lines.append(f"| {ARM_LABELS[arm]} | {baseline} | {above}/{len(gains)} ({above / len(gains):.0%}) | "
                     f"{statistics.fmean(gains) * 100:+.1f} | {min(gains) * 100:+.1f} |")
    if not lines:
        return []
    return [f"### Against vanilla at Best-of-{n}, over every (task, seed) run", "",
            "| arm | against | runs above it (goal ≥ 80%) | mean gain, points (goal ≥ +5) | worst run, points (goal ≥ -5) |",
            "|---|---|---:|---:|---:|", *lines, ""]


def weight_table(args, task_name: str, manifest: dict, runs: dict) -> list[str]:
    seeds, arms = args.seeds, [a for a in args.arms if a in BILEVEL_ARMS]
    if not arms:
        return []
    lines = ["| domain | noise | label mean | " + " | ".join(f"{a} mean ± std" for a in arms) + " | " +
             " | ".join(f"{a} per seed" for a in arms) + " |", "|---|---:|---:|" + "---:|" * (2 * len(arms))]
    for name, d in manifest["domains"].items():
        noise = d["kind"] if d["kind"] not in ("clean", "replace") else f"{d['noise']:.0%}"
        cells = [fmt([runs[f"{a}-{task_name}-s{s}"]["weights"][name] for s in seeds], 2) for a in arms]
        cells += [" ".join(f"{runs[f'{a}-{task_name}-s{s}']['weights'][name]:.2f}" for s in seeds) for a in arms]
        lines.append(f"| {name} | {noise} | {d['label_mean']:.3f} | " + " | ".join(cells) + " |")
    for label, key, digits in (("**Spearman(weight, noise)**", "spearman_weight_noise", 2),
                               ("meta loss, last 20 upper steps", "meta_loss_end", 3)):
        cells = [fmt([runs[f"{a}-{task_name}-s{s}"][key] for s in seeds], digits) for a in arms]
        cells += [" ".join(f"{runs[f'{a}-{task_name}-s{s}'][key]:+.2f}" for s in seeds) for a in arms]
        lines.append(f"| {label} | | | " + " | ".join(cells) + " |")
    return lines


def instance_table(args, task_name: str, manifest: dict, runs: dict) -> list[str]:
    """AUC of the instance weights, corrupted against clean records (goal on `hidden`: mean ≥ 0.85)."""
    arms = [a for a in args.arms if a in INSTANCE_ARMS]
    if not arms or not manifest.get("corrupted_records"):
        return []
    # Within a domain: only where it holds clean and corrupted records (not in one corrupted as a whole).
    mixed = [d for d in manifest["domains"] if d in runs[f"{arms[0]}-{task_name}-s{args.seeds[0]}"]["instance"]["auc_by_domain"]]
    lines = [f"Instance weights as a detector of the {manifest['corrupted_records']} records whose label the corruption "
             "changed: AUC (P(clean record weighted above a corrupted one); 0.5 chance), over the task and within "
             "each domain that holds both clean and corrupted records:", "",
             "| arm | over the task, mean ± std | per seed | " + " | ".join(f"within {d}" for d in mixed)
             + " | domain x record weight, over the task | loss ranking of the same run (visited records) "
             "| \\|MC - prediction\\| (visited records) |",
             "|---|---:|---:|" + "---:|" * (len(mixed) + 3)]
    for arm in arms:
        entries = [runs[f"{arm}-{task_name}-s{s}"]["instance"] for s in args.seeds]
        cells = [fmt([e["auc"] for e in entries]), " ".join(f"{e['auc']:.2f}" for e in entries)]
        cells += [fmt([e["auc_by_domain"][d] for e in entries]) for d in mixed]
        cells += [fmt([e["auc_effective"] for e in entries]) if arm not in DOMAIN_FREE_ARMS else "(the same)"]
        cells += [fmt([e["auc_loss"] for e in entries])]
        gaps = [e.get("auc_gap") for e in entries]  # None: a run written before the prediction column
        cells += [fmt(gaps) if None not in gaps else "-"]
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    return lines + [""]


def bon_table(args, task_name: str, runs: dict) -> list[str]:
    any_run = runs[f"{args.arms[0]}-{task_name}-s{args.seeds[0]}"]
    ns, n = list(any_run["by_n"]), any_run["n"]
    lines = ["| selector | " + " | ".join(f"N={k}" for k in ns) + f" | per seed, N={n} |",
             "|---|" + "---:|" * (len(ns) + 1)]
    # Random pick, majority vote and the oracle do not depend on the PRM: the same in every report.
    for key, label in (("random", "random pick"), ("majority", "majority vote")):
        lines.append(f"| {label} | " + " | ".join(f"{any_run['by_n'][k][key]:.3f}" for k in ns) + " | |")
    for arm in args.arms:
        seeds = seeds_of(args, arm)
        cells = [fmt([runs[f"{arm}-{task_name}-s{s}"]["by_n"][k]["prm"] for s in seeds]) for k in ns]
        per_seed = ", ".join(f"{runs[f'{arm}-{task_name}-s{s}']['by_n'][str(n)]['prm']:.3f}" for s in seeds)
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + f" | {per_seed} |")
    lines.append("| oracle (pass@N) | " + " | ".join(f"{any_run['by_n'][k]['oracle']:.3f}" for k in ns) + " | |")
    return lines


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


def write_results(args, command: str, manifests: dict, runs: dict, timing: dict, path_md: Path,
                  path_json: Path) -> None:
    info = machine()
    result = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("results", "json")},
              "tasks": manifests, "timing": timing, "runs": runs}
    path_json.parent.mkdir(parents=True, exist_ok=True)
    path_json.write_text(json.dumps(result, indent=1) + "\n")
    any_manifest = next(iter(manifests.values()))
    md = [
        "# Domain-quality benchmark: results", "",
        f"Command: `{command}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['platform']}, Python {info['python']}, "
        f"torch {info['torch']}  ",
        f"Wall time: {timing['wall_s']:.0f} s ({timing['wall_s'] / 60:.1f} min) with {args.workers} run(s) at a time x "
        f"{args.threads} thread(s); CPU time of all runs {timing['cpu_s']:.0f} s; load average at the end "
        f"{info['load_average_at_end'][0]:.1f} (other work on the machine slows the wall time)", "",
        f"Tasks (`make_task.py --task NAME`, task seed {args.task_seed}): {any_manifest['meta']['chains']} clean meta "
        f"chains ({any_manifest['meta']['true']} right), {any_manifest['test']['questions']} Best-of-N test questions x "
        f"{any_manifest['test']['n']} candidates. Training: tiny Qwen2-VL (hidden {args.hidden_size}, "
        f"{args.num_layers} layers, --head {args.head}), fp32 (arms named _bf16: bf16), --lr {args.lr}, --batch_size {args.batch_size}; "
        f"a vanilla warm-up of {args.warmup} steps per task and seed, then {args.steps} steps per arm (DreamPRM: "
        f"--meta_lr {args.meta_lr}, --meta_batch_size {args.meta_batch_size}, --unroll_steps {args.unroll_steps}, "
        f"--aggregation {args.aggregation}, the rest at the trainer's defaults unless the arm says otherwise); "
        + (f"clean-only: {args.clean_steps} steps from scratch, on seed(s) "
           f"{', '.join(map(str, seeds_of(args, 'clean')))}. " if "clean" in args.arms else "")
        + f"Seeds {', '.join(map(str, args.seeds))}."
        + (" The `grouped` arm reads `meta_grouped.json` (as many meta chains, four per question, two right and two "
           "wrong) instead of `meta.json` (one chain per question)." if "grouped" in args.arms else ""), "",
        *goals(args, runs),
    ]
    for task_name, manifest in manifests.items():
        md += [f"## Task `{task_name}` ({manifest['train_records']} training records)", "",
               "Learned domain weights (mean 1; instance arm: each domain's mean record weight):", "",
               *weight_table(args, task_name, manifest, runs), "", *instance_table(args, task_name, manifest, runs),
               f"Best-of-N accuracy on {manifest['test']['questions']} held-out questions (mean ± std over seeds; "
               f"N < {manifest['test']['n']}: mean over candidate subsets):", "", *bon_table(args, task_name, runs), ""]
    path_md.write_text("\n".join(md) + "\n")


# ------------------------------------------------------------------------------------- main
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default except None (whose meaning the help text gives)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    started = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    p.add_argument("--out", default=str(REPO / "runs" / "quality" / started),
                   help="tasks, models, runs, logs and the report go here (a new folder named by the start time)")
    p.add_argument("--tasks", nargs="+", default=["noise", "label_mean", "real"], choices=list(make_task.TASKS),
                   help="'hidden' (corrupted records inside clean domains) is for --arms instance both")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (model init, data order)")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS),
                   help="what to train per task and seed (see the module docstring)")
    g = p.add_argument_group("task")
    g.add_argument("--task_seed", type=int, default=0, help="the task draw (images, chains, labels, noise)")
    g.add_argument("--chains_per_domain", type=int, default=200, help="training chains per domain")
    g.add_argument("--meta", type=int, default=128,
                   help="meta chains (half right); meta_grouped.json has as many, four per question")
    g.add_argument("--test", type=int, default=96, help="Best-of-N test questions")
    g.add_argument("--inverted_size", type=float, default=make_task.INVERTED_SIZE,
                   help="chains of the domain that outweighs the clean one, in units of --chains_per_domain")
    g = p.add_argument_group("model and training")
    g.add_argument("--hidden_size", type=int, default=64, help="tiny Qwen2-VL text hidden size")
    g.add_argument("--num_layers", type=int, default=2, help="tiny Qwen2-VL text layers")
    g.add_argument("--head", default="hidden", choices=("hidden", "logits", "generative"),
                   help="the PRM's head (generative: \"+\"/\"-\" judgements by the LM head, --judge_tokens default)")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="PRM learning rate; 3e-3 collapses the mixed-domain PRM to a constant in 2 of 3 seeds")
    g.add_argument("--batch_size", type=int, default=16, help="training records per step")
    g.add_argument("--warmup", type=int, default=300, help="shared vanilla steps before the arms branch")
    g.add_argument("--steps", type=int, default=150, help="steps of each arm after the warm-up")
    g.add_argument("--clean_steps", type=int, default=300, help="steps of the clean-only check (from scratch)")
    g.add_argument("--clean_seeds", type=int, default=1,
                   help="the clean-only check runs on the first this many --seeds (it checks learnability, "
                   "which varies little over seeds: Best-of-8 std 0.02-0.03 over 5 seeds)")
    g.add_argument("--meta_lr", type=float, default=0.1, help="DreamPRM arms: --meta_lr")
    g.add_argument("--meta_batch_size", type=int, default=8, help="DreamPRM arms: --meta_batch_size")
    g.add_argument("--unroll_steps", type=int, default=2, help="lower steps per upper step")
    g.add_argument("--aggregation", default="mean_logit", help="DreamPRM arms: --aggregation")
    g.add_argument("--hypergrad", default="fd", choices=("exact", "fd"),
                   help="estimator of the fp32 DreamPRM arms: fd (fp32 here) costs two forwards whatever the number "
                   "of domains and agrees with exact to cosine 1.0000 (tests/test_hypergradient.py); exact, the "
                   "trainer's default for bf16, costs one pass per domain")
    g = p.add_argument_group("execution and output")
    g.add_argument("--workers", type=int, default=2, help="runs at a time")
    g.add_argument("--reuse", action="store_true",
                   help="skip jobs whose results exist under --out (continue an interrupted benchmark with the same settings)")
    g.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    g.add_argument("--results", default=None, help="the Markdown report (default: RESULTS.md in --out)")
    g.add_argument("--json", default=None, help="the JSON results (default: results.json in --out)")
    g.add_argument("--overwrite_committed", action="store_true",
                   help=f"allow --results / --json to replace a report committed in {HERE.relative_to(REPO)}/")
    args = p.parse_args(argv)
    args.results = args.results or str(Path(args.out) / "RESULTS.md")
    args.json = args.json or str(Path(args.out) / "results.json")
    for flag, path in (("--results", args.results), ("--json", args.json)):
        if committed_report(Path(path)) and not args.overwrite_committed:
            p.error(f"{flag} {path}: is a committed report; pass --overwrite_committed to replace it, "
                    "or name another file")
    return args


def committed_report(path: Path) -> bool:
    """True for an existing file in this benchmark's folder (the committed RESULTS*.md / results*.json)."""
    path = path.resolve()
    return path.exists() and path.parent == HERE


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/quality/run.py", *argv])
    root = Path(args.out)
    started = time.perf_counter()
    manifests = {}
    for task_name in args.tasks:
        print(f"task {task_name} -> {root / task_name / 'task'}", flush=True)
        manifests[task_name] = make_task.make_task(root / task_name / "task", args.task_seed, args.chains_per_domain,
                                                   args.meta, args.test, inverted_size=args.inverted_size,
                                                   task=task_name)
    from dreamprm.model.tiny import build_tiny_qwen2vl
    for seed in args.seeds:
        build_tiny_qwen2vl(root / "models" / f"tiny-s{seed}", seed=seed, hidden_size=args.hidden_size,
                           num_layers=args.num_layers)
    jobs = plan(args, root)
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                "HWLOC_COMPONENTS": "-gl", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    print(f"{len(jobs)} jobs, {args.workers} at a time:", flush=True)
    run_jobs(jobs, args.workers, env, args.reuse)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
              "jobs": {job.name: round(job.seconds, 1) for job in jobs}}
    runs = collect(args, root)
    write_results(args, command, manifests, runs, timing, Path(args.results), Path(args.json))
    print(Path(args.results).read_text())
    return {"runs": runs, "timing": timing, "tasks": manifests}


if __name__ == "__main__":
    main()
