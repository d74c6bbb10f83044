#!/usr/bin/env python
"""One row per (draw, seed) from `run.py` output folders with instance arms, and the comparisons.

    python benchmarks/quality/instance_summary.py runs/i28/s5/noise_52 runs/i28/s5/noise_53 ... \
        --json benchmarks/quality/results_instance_s5.json

Each row: Best-of-8 of every arm (percent); per instance arm its AUC as a detector of the corrupted
records (`auc_<arm>`), the loss ranking's and |MC - prediction|'s AUC on the records it visited, and
the share of corrupted records in the lower loss's weighted mix (`corrupted_share`: Σ_corrupted
w_i / Σ w_i, with w_i the record weight times its domain weight; `uniform` is vanilla's share). Then
each pair of arms the folders hold: runs above, mean difference, worst.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from instance_scan import best_of_8, gain_summary  # a sibling script: its folder is on sys.path


def corrupted_share(weights: list[float], corrupted: list[bool]) -> float:
    return sum(w for w, bad in zip(weights, corrupted) if bad) / sum(weights)


def rows_of(folder: Path) -> list[dict]:
    """The rows of one run.py output folder (one task draw)."""
    results = json.loads((folder / "results.json").read_text())
    out = []
    for task, manifest in results["tasks"].items():
        bad = set(json.loads((folder / task / "task" / "corrupted.json").read_text()))
        seeds = sorted({r["seed"] for r in results["runs"].values() if r["task"] == task})
        for seed in seeds:
            row = {"task": task, "draw": manifest["seed"], "seed": seed,
                   "head": results["settings"].get("head", "hidden")}
            for key, run in results["runs"].items():
                if run["task"] != task or run["seed"] != seed:
                    continue
                arm = run["arm"]
                row[f"bo8_{arm}"] = best_of_8(run)
                run_dir = folder / task / "runs" / f"{arm}-s{seed}"
                domain_weight = json.loads((run_dir / "domain_weights.json").read_text())["weights"]
                report = run_dir / "instance_weights.jsonl"
                if report.is_file():
                    records = [json.loads(line) for line in report.read_text().splitlines()]
                    weights = [r["weight"] * domain_weight[r["domain"]] for r in records]
                    flags = [r["record"] in bad for r in records]
                    inst = run["instance"]
                    row[f"auc_{arm}"] = inst["auc"]
                    row[f"auc_loss_{arm}"] = inst["auc_loss"]
                    row[f"auc_gap_{arm}"] = inst.get("auc_gap")
                    row.setdefault("corrupted_share", {})[arm] = corrupted_share(weights, flags)
                    row["corrupted_share"]["uniform"] = corrupted_share([1.0] * len(flags), flags)
                elif any(w != 1.0 for w in domain_weight.values()):  # domain weights only: per domain
                    total = sum(domain_weight[d] * v["records"] for d, v in manifest["domains"].items())
                    changed = sum(domain_weight[d] * v["labels_changed"] for d, v in manifest["domains"].items())
                    row.setdefault("corrupted_share", {})[arm] = changed / total
            out.append(row)
    return out


def compare(rows: list[dict], a: str, b: str) -> str | None:
    pairs = [(r[f"bo8_{a}"], r[f"bo8_{b}"]) for r in rows if f"bo8_{a}" in r and f"bo8_{b}" in r]
    if not pairs:
        return None
    diffs = [x - y for x, y in pairs]
    g = gain_summary(diffs)
    return (f"{a} vs {b}: above in {g['above']}/{g['runs']} (ties {sum(d == 0 for d in diffs)}), mean {g['mean']:+.1f}, "
            f"worst {g['worst']:+.1f}")


def markdown(rows: list[dict], arms: list[str]) -> str:
    """Every run as a Markdown table: Best-of-8 per arm, each instance arm's AUC (its loss ranking's),
    the corrupted share of the weighted mix per arm."""
    detectors = [arm for arm in arms if any(r.get(f"auc_{arm}") is not None for r in rows)]
    shares = sorted({k for r in rows for k in r.get("corrupted_share", {})})
    head = (["task", "draw", "seed"] + [f"Bo8 {arm}" for arm in arms] + [f"AUC {arm} (loss)" for arm in detectors]
            + ([f"corrupted share: {' / '.join(shares)}"] if shares else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(arms) + len(detectors))
             + ("---|" if shares else "")]
    for r in rows:
        cells = [r["task"], str(r["draw"]), str(r["seed"])]
        cells += [f"{r[f'bo8_{arm}']:.1f}" if f"bo8_{arm}" in r else "-" for arm in arms]
        cells += [f"{r[f'auc_{arm}']:.3f} ({r[f'auc_loss_{arm}']:.3f})" if r.get(f"auc_{arm}") is not None else "-"
                  for arm in detectors]
        if shares:
            cells.append(" / ".join(f"{r['corrupted_share'][k]:.2f}" if k in r.get("corrupted_share", {}) else "-"
                                    for k in shares))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None, help="write the rows and the command here")
    p.add_argument("--markdown", action="store_true", help="also print every run as a Markdown table")
    args = p.parse_args(argv)
    rows = [row for folder in args.folders for row in rows_of(folder)]
    arms = sorted({k[4:] for r in rows for k in r if k.startswith("bo8_")})
    for r in rows:
        cells = " ".join(f"{arm}={r[f'bo8_{arm}']:.1f}" for arm in arms if f"bo8_{arm}" in r)
        aucs = " ".join(f"auc_{arm}={r[f'auc_{arm}']:.3f}" for arm in arms if f"auc_{arm}" in r)
        loss = next((r[k] for k in r if k.startswith("auc_loss_")), None)
        share = " ".join(f"{k}={v:.2f}" for k, v in r.get("corrupted_share", {}).items())
        print(f"{r['task']} d{r['draw']} s{r['seed']}: {cells} | {aucs} loss={loss if loss is None else round(loss, 3)}"
              f" | share {share}")
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            line = compare(rows, b, a)
            if line:
                print(line)
    for arm in arms:
        values = [r[f"auc_{arm}"] for r in rows if r.get(f"auc_{arm}") is not None]
        if values:
            over_loss = sum(r[f"auc_{arm}"] > r[f"auc_loss_{arm}"] for r in rows if r.get(f"auc_{arm}") is not None)
            print(f"AUC {arm}: mean {statistics.mean(values):.3f}, >= 0.90 in {sum(v >= 0.9 for v in values)}/"
                  f"{len(values)}, above its loss ranking in {over_loss}/{len(values)}")
    if args.markdown:
        print(markdown(rows, arms))
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/quality/instance_summary.py " +
                                         " ".join(sys.argv[1:]), "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
