#!/usr/bin/env python
"""Tabulate a scan of task draws (one `run.py --out DIR/draw_N` folder per draw) for issue 24's goals.

    python benchmarks/quality/scan_table.py runs/quality/scan --working 12 13 14 15 --held_back 16 17 18 19

Per run (draw, seed): Best-of-8 of vanilla and of each DreamPRM arm, the gain, the Spearman
correlation of the learned weights with the corruption, whether the inverted domain ended above
the clean one, and the meta loss at the end. Then the goals, per group of draws.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ARMS = ("pairwise", "grouped")


def paired_se(folder: Path, draw: int, arm: str, seed: int) -> float | None:
    """Standard error (points) of the Best-of-8 gain over vanilla from the per-question outcomes of the
    same test questions: how much of a gain the 96-question test set alone can make up."""
    base = folder / f"draw_{draw}" / "noise" / "runs"
    try:
        outcome = {name: {q["id"]: int(q["best_correct"]) for q in
                          json.loads((base / f"{name}-s{seed}" / "test_selection.json").read_text())["questions"]}
                   for name in ("vanilla", arm)}
    except FileNotFoundError:
        return None
    diffs = [outcome[arm][k] - v for k, v in outcome["vanilla"].items()]
    return 100 * statistics.stdev(diffs) / len(diffs) ** 0.5


def runs_of(folder: Path, draw: int) -> list[dict]:
    results = json.loads((folder / f"draw_{draw}" / "results.json").read_text())["runs"]
    seeds = sorted({r["seed"] for r in results.values()})
    rows = []
    for seed in seeds:
        vanilla = results.get(f"vanilla-noise-s{seed}")
        if vanilla is None:
            continue
        for arm in ARMS:
            r = results.get(f"{arm}-noise-s{seed}")
            if r is None:
                continue
            w = r["weights"]
            rows.append({"draw": draw, "seed": seed, "arm": arm, "vanilla": 100 * vanilla["by_n"]["8"]["prm"],
                         "dreamprm": 100 * r["by_n"]["8"]["prm"], "spearman": r["spearman_weight_noise"],
                         "inverted_above_clean": w["inverted"] > w["clean"], "meta_loss": r.get("meta_loss_end"),
                         "weights": w, "se": paired_se(folder, draw, arm, seed)})
    return rows


def _se(row: dict) -> str:
    return "" if row["se"] is None else f" ± {row['se']:.1f}"


def goals(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    gains = [r["dreamprm"] - r["vanilla"] for r in rows]
    above = sum(g > 0 for g in gains)
    spear = sum(r["spearman"] <= -0.8 for r in rows)
    inverted = sum(r["inverted_above_clean"] for r in rows)
    return (f"{len(rows)} runs: inverted above clean in {inverted} (goal 0); Spearman <= -0.8 in {spear} "
            f"({100 * spear / len(rows):.0f}%, goal >= 80%); above vanilla in {above} ({100 * above / len(rows):.0f}%, "
            f"goal >= 80%), mean gain {statistics.mean(gains):+.1f} (goal >= +5), worst {min(gains):+.1f} (goal > -5)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--working", type=int, nargs="+", required=True, help="draws looked at while working")
    p.add_argument("--held_back", type=int, nargs="*", default=[], help="draws kept back until the end")
    p.add_argument("--json", type=Path, default=None, help="also write every run's row here")
    args = p.parse_args()
    groups = {"working": args.working, "held back": args.held_back}
    all_rows = {g: [r for d in draws if (args.folder / f"draw_{d}" / "results.json").is_file()
                    for r in runs_of(args.folder, d)] for g, draws in groups.items()}
    print("| draws | draw | seed | arm | vanilla B8 | DreamPRM B8 | gain ± paired s.e. | Spearman | inverted > clean | "
          "meta loss end | weights clean / n20 / n50 / n80 / inverted |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|---:|---|")
    for g, rows in all_rows.items():
        for r in rows:
            w = r["weights"]
            names = [k for k in ("clean", "noisy_20", "noisy_50", "noisy_80", "inverted") if k in w]
            print(f"| {g} | {r['draw']} | {r['seed']} | {r['arm']} | {r['vanilla']:.1f} | {r['dreamprm']:.1f} | "
                  f"{r['dreamprm'] - r['vanilla']:+.1f}{_se(r)} | "
                  f"{r['spearman']:+.2f} | "
                  f"{'YES' if r['inverted_above_clean'] else 'no'} | "
                  f"{r['meta_loss'] if r['meta_loss'] is None else round(r['meta_loss'], 3)} | "
                  f"{' / '.join(f'{w[k]:.2f}' for k in names)} |")
    if args.json:
        args.json.write_text(json.dumps({g: rows for g, rows in all_rows.items()}, indent=1) + "\n")
    print()
    for g, rows in all_rows.items():
        for arm in ARMS:
            sel = [r for r in rows if r["arm"] == arm]
            if sel:
                print(f"- {g}, {arm}: {goals(sel)}")


if __name__ == "__main__":
    main()
