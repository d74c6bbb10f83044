#!/usr/bin/env python
"""Tabulate a scan of task draws (one `run.py --out DIR/draw_N` folder per draw) for issue 24's goals.

    python benchmarks/quality/scan_table.py runs/quality/scan --working 12 13 14 15 --held_back 16 17 18 19
    python benchmarks/quality/scan_table.py runs/scan/label_mean --task label_mean --arms pairwise evidence --working 70 71

Per run (draw, seed): Best-of-8 of vanilla and of each DreamPRM arm, the gain, the Spearman
correlation of the learned weights with the corruption, whether the weights are misordered
(`misordered`), and the meta loss and pair accuracy at the end. Then the goals, per group of draws.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ARMS = ("pairwise", "grouped")
LAST = 20  # upper steps averaged for the meta loss and pair accuracy at the end


def misordered(task: str, weights: dict[str, float], spearman: float) -> bool:
    """noise: the inverted domain above the clean one, or Spearman(weight, corruption) above -0.8;
    label_mean: a clean domain (easy or hard) below a corrupted one (noisy_80 or inverted), as the two
    clean domains differ in label mean only; real: the clean domain below a corrupted one."""
    if task == "noise":
        return weights["inverted"] > weights["clean"] or spearman > -0.8
    clean = {"label_mean": ("easy", "hard"), "real": ("clean",)}[task]
    return min(weights[k] for k in clean) < max(v for k, v in weights.items() if k not in clean)


def meta_at_end(run: Path) -> tuple[float | None, float | None]:
    """Mean meta loss and pair accuracy of the last LAST upper steps with a (right, wrong) pair
    (runs from before 2026-12-04 logged loss 0 for the others and no pair accuracy)."""
    from dreamprm.metrics import read_scalars
    try:
        scalars = read_scalars(run / "tb")
    except (FileNotFoundError, OSError):
        return None, None
    losses = [v for _, v in scalars.get("meta/loss", []) if v != 0][-LAST:]
    accuracy = [v for _, v in scalars.get("meta/pair_accuracy", [])][-LAST:]
    return (statistics.fmean(losses) if losses else None), (statistics.fmean(accuracy) if accuracy else None)


def paired_se(folder: Path, draw: int, arm: str, seed: int, task: str = "noise") -> float | None:
    """Standard error (points) of the Best-of-8 gain over vanilla from the per-question outcomes of the
    same test questions: how much of a gain the 96-question test set alone can make up."""
    base = folder / f"draw_{draw}" / task / "runs"
    try:
        outcome = {name: {q["id"]: int(q["best_correct"]) for q in
                          json.loads((base / f"{name}-s{seed}" / "test_selection.json").read_text())["questions"]}
                   for name in ("vanilla", arm)}
    except FileNotFoundError:
        return None
    diffs = [outcome[arm][k] - v for k, v in outcome["vanilla"].items()]
    return 100 * statistics.stdev(diffs) / len(diffs) ** 0.5


def runs_of(folder: Path, draw: int, task: str = "noise", arms: tuple[str, ...] = ARMS) -> list[dict]:
    results = json.loads((folder / f"draw_{draw}" / "results.json").read_text())["runs"]
    seeds = sorted({r["seed"] for r in results.values()})
    rows = []
    for seed in seeds:
        vanilla = results.get(f"vanilla-{task}-s{seed}")
        if vanilla is None:
            continue
        for arm in arms:
            r = results.get(f"{arm}-{task}-s{seed}")
            if r is None:
                continue
            w = r["weights"]
            meta_loss, pair_accuracy = meta_at_end(folder / f"draw_{draw}" / task / "runs" / f"{arm}-s{seed}")
            rows.append({"draw": draw, "seed": seed, "arm": arm, "vanilla": 100 * vanilla["by_n"]["8"]["prm"],
                         "dreamprm": 100 * r["by_n"]["8"]["prm"], "spearman": r["spearman_weight_noise"],
                         "inverted_above_clean": w["inverted"] > w[next(k for k in w if k in ("clean", "easy"))],
                         "misordered": misordered(task, w, r["spearman_weight_noise"]),
                         "meta_loss": meta_loss if meta_loss is not None else r.get("meta_loss_end"),
                         "pair_accuracy": pair_accuracy, "weights": w, "se": paired_se(folder, draw, arm, seed, task)})
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
    wrong = sum(r["misordered"] for r in rows)
    return (f"{len(rows)} runs: misordered {wrong}; inverted above clean in {inverted} (goal 0); Spearman <= -0.8 in {spear} "
            f"({100 * spear / len(rows):.0f}%, goal >= 80%); above vanilla in {above} ({100 * above / len(rows):.0f}%, "
            f"goal >= 80%), mean gain {statistics.mean(gains):+.1f} (goal >= +5), worst {min(gains):+.1f} (goal > -5)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--working", type=int, nargs="*", default=[], help="draws looked at while working")
    p.add_argument("--held_back", type=int, nargs="*", default=[], help="draws kept back until the end")
    p.add_argument("--task", default="noise", choices=("noise", "label_mean", "real"))
    p.add_argument("--arms", nargs="+", default=list(ARMS), help="the DreamPRM arms to tabulate against vanilla")
    p.add_argument("--json", type=Path, default=None, help="also write every run's row here")
    args = p.parse_args()
    groups = {"working": args.working, "held back": args.held_back}
    all_rows = {g: [r for d in draws if (args.folder / f"draw_{d}" / "results.json").is_file()
                    for r in runs_of(args.folder, d, args.task, tuple(args.arms))] for g, draws in groups.items()}
    order = {"noise": ("clean", "noisy_20", "noisy_50", "noisy_80", "inverted"),
             "label_mean": ("easy", "hard", "noisy_80", "inverted"),
             "real": ("clean", "outcome_only", "missed_error")}[args.task]
    print("| draws | draw | seed | arm | vanilla B8 | DreamPRM B8 | gain ± paired s.e. | Spearman | misordered | "
          f"meta loss end | pair accuracy end | weights {' / '.join(order)} |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---|")
    for g, rows in all_rows.items():
        for r in rows:
            w = r["weights"]
            names = [k for k in order if k in w]
            print(f"| {g} | {r['draw']} | {r['seed']} | {r['arm']} | {r['vanilla']:.1f} | {r['dreamprm']:.1f} | "
                  f"{r['dreamprm'] - r['vanilla']:+.1f}{_se(r)} | "
                  f"{r['spearman']:+.2f} | "
                  f"{'YES' if r['misordered'] else 'no'} | "
                  f"{r['meta_loss'] if r['meta_loss'] is None else round(r['meta_loss'], 3)} | "
                  f"{'' if r['pair_accuracy'] is None else round(r['pair_accuracy'], 2)} | "
                  f"{' / '.join(f'{w[k]:.2f}' for k in names)} |")
    if args.json:
        args.json.write_text(json.dumps({g: rows for g, rows in all_rows.items()}, indent=1) + "\n")
    print()
    for g, rows in all_rows.items():
        for arm in args.arms:
            sel = [r for r in rows if r["arm"] == arm]
            if sel:
                print(f"- {g}, {arm}: {goals(sel)}")


if __name__ == "__main__":
    main()
