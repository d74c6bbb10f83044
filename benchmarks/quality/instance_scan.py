#!/usr/bin/env python
"""Tabulate instance-weight runs over task draws (one `run.py --out DIR/draw_N` folder per draw) for
issue 28's goals.

    python benchmarks/quality/instance_scan.py runs/i28/held --draws 40 41 42 43 --json out.json

Each draw folder holds the tasks `hidden` and `noise`, arms vanilla, pairwise (domain weights),
instance (the table), instance_net, clipped (DreamPRM-1.5's table), both and both_net. Reported:

- the AUC of each arm's weights for the records the corruption changed, beside the plain loss
  ranking of the same run (visited records), on both tasks; the goals on task `hidden`;
- task `noise`: Best-of-8 of the instance-only arms against domain weights (pairwise);
- every run: Best-of-8 of both / both_net against vanilla (above, mean gain, worst).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

AUC_ARMS = ("instance", "instance_net", "clipped", "both", "both_net")
GAIN_ARMS = ("pairwise", "instance", "instance_net", "both", "both_net")


def best_of_8(run: dict) -> float:
    return 100 * run["by_n"][str(run["n"])]["prm"]


def collect(folder: Path, draws: list[int]) -> list[dict]:
    """One row per (draw, task, seed): Best-of-8 of every arm, AUCs on the task with known corruption."""
    rows = []
    for draw in draws:
        results = json.loads((folder / f"draw_{draw}" / "results.json").read_text())["runs"]
        keys = sorted({(r["task"], r["seed"]) for r in results.values()})
        for task, seed in keys:
            row = {"draw": draw, "task": task, "seed": seed, "bo8": {}, "auc": {}, "auc_loss": {}, "auc_effective": {}}
            for arm in ("vanilla", *GAIN_ARMS, "clipped"):
                run = results.get(f"{arm}-{task}-s{seed}")
                if run is None:
                    continue
                row["bo8"][arm] = best_of_8(run)
                if "instance" in run:
                    row["auc"][arm] = run["instance"]["auc"]
                    row["auc_loss"][arm] = run["instance"]["auc_loss"]
                    row["auc_effective"][arm] = run["instance"]["auc_effective"]
            rows.append(row)
    return rows


def gain_summary(gains: list[float]) -> dict:
    return {"runs": len(gains), "above": sum(g > 0 for g in gains), "mean": statistics.fmean(gains) if gains else None,
            "worst": min(gains) if gains else None}


def tables(rows: list[dict]) -> tuple[list[str], dict]:
    out: dict = {"rows": rows}
    lines = ["### AUC of the weights for the corrupted records, against the loss ranking of the same run", "",
             "| draw | task | seed | " + " | ".join(f"{a} (loss ranking)" for a in AUC_ARMS) + " | both_net, domain x record |",
             "|---:|---|---:|" + "---:|" * (len(AUC_ARMS) + 1)]
    hidden = [r for r in rows if r["task"] == "hidden"]
    for r in sorted((r for r in rows if r["auc"]), key=lambda r: (r["task"], r["draw"], r["seed"])):
        cells = [f"{r['auc'][a]:.3f} ({r['auc_loss'][a]:.3f})" if a in r["auc"] else "-" for a in AUC_ARMS]
        effective = f"{r['auc_effective']['both_net']:.3f}" if "both_net" in r["auc_effective"] else "-"
        lines.append(f"| {r['draw']} | {r['task']} | {r['seed']} | " + " | ".join(cells) + f" | {effective} |")
    goals = {}
    for arm in AUC_ARMS:
        runs = [r for r in hidden if arm in r["auc"]]
        if runs:
            goals[arm] = {"runs": len(runs), "mean_auc": statistics.fmean(r["auc"][arm] for r in runs),
                          "at_least_0.90": sum(r["auc"][arm] >= 0.90 for r in runs),
                          "above_loss_ranking": sum(r["auc"][arm] > r["auc_loss"][arm] for r in runs),
                          "mean_loss_ranking": statistics.fmean(r["auc_loss"][arm] for r in runs)}
    out["auc"] = goals
    lines += ["", "Task `hidden` (goal: AUC ≥ 0.90 and above the loss ranking in every run):", "",
              "| arm | runs | mean AUC | AUC ≥ 0.90 | above its loss ranking | mean AUC of the loss ranking |",
              "|---|---:|---:|---:|---:|---:|"]
    for arm, g in goals.items():
        lines.append(f"| {arm} | {g['runs']} | {g['mean_auc']:.3f} | {g['at_least_0.90']}/{g['runs']} | "
                     f"{g['above_loss_ranking']}/{g['runs']} | {g['mean_loss_ranking']:.3f} |")

    lines += ["", "### Best-of-8 (points), every run", "",
              "| draw | task | seed | vanilla | " + " | ".join(GAIN_ARMS) + " |", "|---:|---|---:|" + "---:|" * (len(GAIN_ARMS) + 1)]
    for r in rows:
        lines.append(f"| {r['draw']} | {r['task']} | {r['seed']} | {r['bo8']['vanilla']:.1f} | "
                     + " | ".join(f"{r['bo8'][a]:.1f}" if a in r["bo8"] else "-" for a in GAIN_ARMS) + " |")
    out["against_vanilla"] = {a: gain_summary([r["bo8"][a] - r["bo8"]["vanilla"] for r in rows if a in r["bo8"]])
                              for a in GAIN_ARMS}
    lines += ["", "Against vanilla, every run (goal for `both`: ≥ 80% above, mean ≥ +5, none below -5):", "",
              "| arm | above vanilla | mean gain | worst |", "|---|---:|---:|---:|"]
    for arm, g in out["against_vanilla"].items():
        if g["runs"]:
            lines.append(f"| {arm} | {g['above']}/{g['runs']} | {g['mean']:+.1f} | {g['worst']:+.1f} |")
    noise = [r for r in rows if r["task"] == "noise"]
    out["instance_vs_domain_noise"] = {
        a: {"runs": len(noise), "at_least_domain": sum(r["bo8"][a] >= r["bo8"]["pairwise"] for r in noise),
            "mean_difference": statistics.fmean(r["bo8"][a] - r["bo8"]["pairwise"] for r in noise)}
        for a in ("instance", "instance_net") if noise and all(a in r["bo8"] for r in noise)}
    lines += ["", "Task `noise`: instance weights alone against domain weights (pairwise) at Best-of-8 "
              "(goal: instance alone ≥ domain):", "", "| arm | runs ≥ domain | mean difference, points |",
              "|---|---:|---:|"]
    for arm, g in out["instance_vs_domain_noise"].items():
        lines.append(f"| {arm} | {g['at_least_domain']}/{g['runs']} | {g['mean_difference']:+.1f} |")
    return lines, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--draws", type=int, nargs="+", required=True)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    lines, out = tables(collect(Path(args.folder), args.draws))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
