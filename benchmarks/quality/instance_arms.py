#!/usr/bin/env python
"""Instance weights on a task with known corrupted records: the learned weights against baselines.

    python benchmarks/quality/instance_arms.py --task hidden --seed 0 --arms instance instance_net

Per (task, seed): the task (`make_task.py`), the tiny Qwen2-VL, a shared vanilla warm-up and each arm
resumed from its checkpoint, exactly as `run.py` builds them (its functions, its settings), without
Best-of-N selection. Each arm's `instance_weights.jsonl` is scored against the task's
`corrupted.json` as a detector of corrupted records (AUC: P(a clean record ranks above a corrupted
one), 0.5 chance):

- the learned weights (the arm's ranking);
- the loss ranking: each record's training loss at its last visit by an upper step (the `loss`
  column; lower loss ranks cleaner). For the MSE loss this is also the ranking by |MC accuracy - PRM
  prediction|, the second baseline, so it is reported once;
- both restricted to the records the arm visited (the loss exists only for those).

Writes a JSON and a Markdown table (``--results``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]

import make_task  # noqa: E402
import run as quality  # noqa: E402

from dreamprm.clean import ranking_aucs  # noqa: E402

ARMS = {
    "instance": ["--weighting", "instance"],
    "both": ["--weighting", "both"],
    "instance_net": ["--weighting", "instance_net"],
    "both_net": ["--weighting", "both_net"],
    "clipped": ["--weighting", "instance", "--instance_recipe", "clipped"],
}
# The feature ablation of the instance net: each arm drops one input (or keeps only the loss gap).
NET_FEATURES = ("mc", "gap", "position", "domain")
for _name in NET_FEATURES:
    ARMS[f"net_no_{_name}"] = ["--weighting", "instance_net", "--instance_net_features",
                               ",".join(f for f in NET_FEATURES if f != _name)]
ARMS["net_gap_only"] = ["--weighting", "instance_net", "--instance_net_features", "gap"]


def detector_scores(run: Path, task: Path) -> dict:
    """AUCs of the weights and of the loss ranking against the corrupted records."""
    bad = set(json.loads((task / "corrupted.json").read_text()))
    rows = [json.loads(line) for line in (run / "instance_weights.jsonl").read_text().splitlines()]
    aucs = ranking_aucs(rows, bad)
    return {"records": aucs["records"], "visited": aucs["visited"], "corrupted": len(bad),
            "auc_weights": aucs["weights"], "auc_weights_visited": aucs["weights_visited"],
            "auc_loss_visited": aucs["loss"], "auc_gap_visited": aucs["gap"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="hidden", choices=list(make_task.TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=["instance", "instance_net"], choices=list(ARMS))
    p.add_argument("--out", default=str(HERE.parent.parent / "runs" / "instance_arms"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=None, help="Markdown table (default: print only)")
    args, rest = p.parse_known_args(argv)
    # run.py's settings (warm-up, steps, learning rates, ...) and their defaults; any of its flags may follow.
    q = quality.parse_args(["--tasks", args.task, "--seeds", str(args.seed), "--out", args.out, *rest])
    root = Path(args.out)
    task = root / args.task / "task"
    # Made once: runs of another invocation may be reading the task's images.
    if not (task / "corrupted.json").exists():
        make_task.make_task(task, q.task_seed, q.chains_per_domain, q.meta, q.test, inverted_size=q.inverted_size,
                            task=args.task)
    from dreamprm.model.tiny import build_tiny_qwen2vl
    model = root / "models" / f"tiny-s{args.seed}"
    if not (model / "config.json").exists():
        build_tiny_qwen2vl(model, seed=args.seed, hidden_size=q.hidden_size, num_layers=q.num_layers)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = f"{args.task}-s{args.seed}"
    warm = root / args.task / "runs" / f"warmup-s{args.seed}"
    train = ["--train_json_file", str(task / "train.json")]
    jobs = [quality.Job(f"warmup-{tag}", quality.train_command(q, task, model, warm, args.seed, *train, "--baseline",
                                                               "--iteration_num", str(q.warmup), "--no-export"),
                        log=logs / f"warmup-{tag}.log", result=warm / "domain_weights.json")]
    bilevel = ["--meta_lr", str(q.meta_lr), "--meta_batch_size", str(q.meta_batch_size), "--unroll_steps",
               str(q.unroll_steps), "--aggregation", q.aggregation, "--hypergrad", "fd"]
    checkpoint = warm / "checkpoints" / f"step_{q.warmup:08d}"
    for arm in args.arms:
        out = root / args.task / "runs" / f"{arm}-s{args.seed}"
        jobs.append(quality.Job(f"{arm}-{tag}", quality.train_command(
            q, task, model, out, args.seed, *train, "--resume", str(checkpoint), "--iteration_num",
            str(q.warmup + q.steps), "--no-export", *bilevel, *ARMS[arm]), (f"warmup-{tag}",),
            log=logs / f"{arm}-{tag}.log", result=out / "instance_weights.jsonl"))
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": "1", "HWLOC_COMPONENTS": "-gl", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent.parent)})
    started = time.perf_counter()
    quality.run_jobs(jobs, args.workers, env, reuse=True)
    results = {"task": args.task, "seed": args.seed, "warmup": q.warmup, "steps": q.steps,
               "wall_s": round(time.perf_counter() - started, 1),
               "jobs": {j.name: round(j.seconds, 1) for j in jobs},
               "arms": {arm: detector_scores(root / args.task / "runs" / f"{arm}-s{args.seed}", task)
                        for arm in args.arms}}
    lines = [f"Task `{args.task}`, seed {args.seed} (single seed): {q.warmup} vanilla warm-up steps, then {q.steps} "
             "steps per arm. AUC of corrupted against clean records (0.5 chance).", "",
             "| arm | AUC, weights (all records) | AUC, weights (visited) | AUC, loss ranking (visited) "
             "| AUC, \\|MC - prediction\\| (visited) | visited |",
             "|---|---:|---:|---:|---:|---:|"]
    for arm, s in results["arms"].items():
        gap = "-" if s["auc_gap_visited"] is None else f"{s['auc_gap_visited']:.3f}"
        lines.append(f"| {arm} | {s['auc_weights']:.3f} | {s['auc_weights_visited']:.3f} | "
                     f"{s['auc_loss_visited']:.3f} | {gap} | {s['visited']}/{s['records']} |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        Path(args.results).write_text(table + "\n\n```json\n" + json.dumps(results, indent=2) + "\n```\n")
    return results


if __name__ == "__main__":
    main()
