#!/usr/bin/env python
"""Deterministic generator of the domain-quality benchmark task: training domains whose label quality
is known, a clean meta set, and a held-out Best-of-N test set with N = 8 candidates per question.

The questions, images, chains of thought and simulated Monte Carlo labels come from the demo
generator (`data/demo/make_demo.py`, imported, not copied): counting and comparing coloured shapes
on a 3x3 grid; a simulated policy writes 2-4 step chains; a wrong chain has one wrong step and a
wrong final answer; the policy hedges ("Maybe", "Probably", "I am not sure, but") in 85% of wrong
steps and 5% of right ones, a lexical cue a tiny PRM learns in minutes on a CPU. 72% of each
domain's chains contain a wrong step, which centres every domain's mean label near 0.5, the meta
labels' mean (a domain whose mean label differs would be judged by its bias, not its information).

Three tasks (``--task``), each a set of training domains that differ in their labels:

    noise        clean, noisy_20/50/80 (that share of labels replaced by the label of a random record of
                 the same domain), inverted (1 - the true label; 1.5x the chains). Every domain's mean
                 label is centred near 0.5. Quality axis: the share of labels without information.
    label_mean   domains that differ in label mean but not in quality: easy (clean, 20% of chains
                 wrong, mean label ~0.8) and hard (clean, 97% wrong, ~0.36), plus noisy_80 and
                 inverted (1.5x). Two clean domains should end with similar weights.
    real         corruptions that occur in real PRM data: outcome_only (every prefix labelled with the
                 chain's final correctness, 0 or 1) and missed_error (1.5x: the rollouts miss the
                 wrong step, so it and every later prefix keep the label of a right chain), beside clean.
    hidden       corrupted records inside otherwise clean domains, for instance weights: clean,
                 chains_inverted (30% of its chains inverted, every prefix) and labels_replaced (30% of
                 its labels replaced as in noisy_*). Domain weights can only down-weight a whole domain.

Random-record replacement keeps each domain's label distribution and destroys only information
(uniform random values would act like label smoothing, which a meta objective can prefer).

Writes, under ``--out``:

    images/*.png       56x56 scenes (train_<domain>_NNN, meta_NNN, test_NNN)
    train.json         all the task's domains (lower level)
    corrupted.json     indices (in train.json) of the records whose label the corruption changed
    train_clean.json   the clean domain(s) alone (the learnability check)
    meta.json          clean meta chains, half right, half wrong, one per question (upper level)
    meta_grouped.json  the same number of clean meta chains, four per question (two right, two
                       wrong; `question_id`), as real meta sets are laid out
    test.json          Best-of-N candidates: N = 8 chains per question, 1-4 of them right
    task.json          the manifest: seed, sizes, per-domain noise and label means

    python benchmarks/quality/make_task.py --out runs/quality/task --seed 0

The same seed and sizes give byte-identical files (`random.Random` seeded with strings, PIL, JSON
with sorted keys).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("make_demo", REPO / "data" / "demo" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo_module()

# Chains of a domain that outweighs the clean one, in units of --chains_per_domain. 1.5: with equal
# sizes the other domains' labels shrink toward the mean without changing their order, and a vanilla
# PRM ranks candidates as well as one trained on clean data alone (measured: Best-of-8 0.854 vs
# 0.844), which leaves nothing for reweighting to win.
INVERTED_SIZE = 1.5
# Share of training chains with a wrong step. The demo's 0.62 gives mean labels near 0.57 (a wrong
# chain's prefixes before its wrong step score high); 0.72 centres them at 0.5 (measured on 2000
# chains: 0.62 -> 0.571, 0.68 -> 0.539, 0.70 -> 0.517, 0.72 -> 0.510). 0.2 gives ~0.80, 0.97 ~0.36.
P_CHAIN_ERROR = 0.72


@dataclass(frozen=True)
class Domain:
    kind: str  # clean | replace | inverted | inverted_chains | outcome | missed_error
    noise: float  # the quality axis of the task (share of labels without information; inverted 1)
    p_error: float = P_CHAIN_ERROR  # share of chains with a wrong step
    size: float = 1.0  # chains, in units of --chains_per_domain


TASKS: dict[str, dict[str, Domain]] = {
    "noise": {"clean": Domain("clean", 0.0), "noisy_20": Domain("replace", 0.2), "noisy_50": Domain("replace", 0.5),
              "noisy_80": Domain("replace", 0.8), "inverted": Domain("inverted", 1.0, size=INVERTED_SIZE)},
    "label_mean": {"easy": Domain("clean", 0.0, p_error=0.2), "hard": Domain("clean", 0.0, p_error=0.97),
                   "noisy_80": Domain("replace", 0.8), "inverted": Domain("inverted", 1.0, size=INVERTED_SIZE)},
    "real": {"clean": Domain("clean", 0.0), "outcome_only": Domain("outcome", 0.5),
             "missed_error": Domain("missed_error", 1.0, size=INVERTED_SIZE)},
    "hidden": {"clean": Domain("clean", 0.0), "chains_inverted": Domain("inverted_chains", 0.3),
               "labels_replaced": Domain("replace", 0.3)},
}
DOMAINS = TASKS["noise"]
N_CANDIDATES = 8
MAX_RIGHT = 4  # a test question has 1..MAX_RIGHT right candidates out of N_CANDIDATES
META_CHAINS_PER_QUESTION = 4  # meta_grouped.json


def sample_chain(item: dict, rng: random.Random, correct: bool) -> tuple[list[str], str, int | None]:
    """The demo policy's chain, except that a policy that has gone wrong stays unsure: every step
    after the wrong one is hedged with the same probability as the wrong step itself
    (`demo.P_HEDGE_WRONG`). The cue then sits near the end of every prefix whose label is low, where
    a 2-layer model reading the last position finds it quickly, instead of only in the wrong step.
    Returns (steps, final answer, index of the wrong step or None)."""
    steps, answer, err = demo.sample_chain(item["scene"], item["plan"], item["gt"], rng, correct)
    if err is not None:
        for i in range(err + 1, len(steps)):
            if not steps[i].startswith(demo.HEDGES) and rng.random() < demo.P_HEDGE_WRONG:
                steps[i] = rng.choice(demo.HEDGES) + steps[i][0].lower() + steps[i][1:]
    return steps, answer, err


def corrupt_labels(domain: Domain, records: list[dict], chains: dict[str, tuple[int, int | None]],
                   rng: random.Random) -> int:
    """Corrupt one domain's `accuracy` labels in place; returns how many were changed.

    'replace': each label, with probability `noise`, becomes the (true) label of a random record of
    the same domain. 'inverted': every label becomes 1 - label; 'inverted_chains': so does every label
    of a `noise` share of the domain's chains. 'outcome': every prefix gets its
    chain's final correctness. 'missed_error': in a wrong chain, the wrong step and every later
    prefix are labelled as if the chain had stayed right. `chains`: id -> (steps, wrong step or None).
    """
    changed = 0
    pool = [r["accuracy"] for r in records]
    ids = sorted({r["id"] for r in records})
    inverted_chains = set(rng.sample(ids, round(domain.noise * len(ids)))) if domain.kind == "inverted_chains" else set()
    for r in records:
        n_steps, err = chains[r["id"]]
        if domain.kind == "clean":
            new = r["accuracy"]
        elif domain.kind == "inverted" or r["id"] in inverted_chains:
            new = 1.0 - r["accuracy"]
        elif domain.kind == "inverted_chains":
            new = r["accuracy"]
        elif domain.kind == "replace":
            new = rng.choice(pool) if rng.random() < domain.noise else r["accuracy"]
        elif domain.kind == "outcome":
            new = 0.0 if err is not None else 1.0
        elif domain.kind == "missed_error":
            new = demo.mc_accuracy(n_steps, r["sid"], None, rng) if err is not None and err < r["sid"] else r["accuracy"]
        else:
            raise ValueError(f"unknown corruption {domain.kind!r}")
        changed += new != r["accuracy"]
        r["accuracy"] = new
    return changed


def build_train(seed: int, out: Path, chains_per_domain: int, task: str = "noise",
                inverted_size: float = INVERTED_SIZE) -> tuple[list[dict], dict[str, dict], list[int]]:
    """The training records, per-domain statistics, and the indices of the records whose label changed."""
    records: list[dict] = []
    stats: dict[str, dict] = {}
    corrupted: list[int] = []
    for name, domain in TASKS[task].items():
        rng = random.Random(f"quality/{seed}/train/{name}" if task == "noise" else f"quality/{task}/{seed}/train/{name}")
        first = len(records)
        # Exactly round((1 - p_error) * n) right chains per domain: the domains' mean labels then
        # differ by little more than the step-count draw, not by a binomial draw of right chains.
        size = inverted_size if domain.size != 1.0 else 1.0
        chains = round(chains_per_domain * size)
        n_right = round((1.0 - domain.p_error) * chains)
        flags = [True] * n_right + [False] * (chains - n_right)
        rng.shuffle(flags)
        shapes: dict[str, tuple[int, int | None]] = {}
        for i, correct in enumerate(flags):
            item = demo.new_item(rng, str(out), f"train_{name}_{i:03d}")
            steps, _, err = sample_chain(item, rng, correct)
            shapes[f"{name}-{i:03d}"] = (len(steps), err)
            for sid in range(1, len(steps) + 1):
                records.append({
                    "id": f"{name}-{i:03d}", "sid": sid, "input": item["question"],
                    "add": "\n".join(f"Step {k + 1}: {s}" for k, s in enumerate(steps[:sid])),
                    "image_path": item["image_path"], "dataset": name,
                    "accuracy": demo.mc_accuracy(len(steps), sid, err, rng), "ground_truth": item["gt"],
                })
        mine = records[first:]
        true_labels = [r["accuracy"] for r in mine]
        changed = corrupt_labels(domain, mine, shapes, random.Random(f"quality/{seed}/noise/{name}"))
        labels = [r["accuracy"] for r in mine]
        corrupted += [first + i for i, (t, x) in enumerate(zip(true_labels, labels)) if t != x]
        stats[name] = {
            "kind": domain.kind, "noise": domain.noise, "chains": chains, "records": len(mine),
            "labels_changed": changed, "label_mean": round(statistics.fmean(labels), 4),
            # How much of the true label a domain's labels still carry (1 clean, 0 none, -1 inverted).
            "label_truth_correlation": round(pearson(true_labels, labels), 4),
        }
    return records, stats, corrupted


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")


def build_meta(seed: int, out: Path, n_meta: int, p_wrong: float = 0.5) -> list[dict]:
    rng = random.Random(f"quality/{seed}/meta")
    n_right = round((1.0 - p_wrong) * n_meta)
    flags = [True] * n_right + [False] * (n_meta - n_right)
    rng.shuffle(flags)
    records = []
    for i, ok in enumerate(flags):
        item = demo.new_item(rng, str(out), f"meta_{i:03d}")
        steps, answer, _ = sample_chain(item, rng, ok)
        records.append({"id": f"meta-{i:03d}", "input": item["question"] + "\n\n" + demo.chain_text(steps, answer),
                        "image_path": item["image_path"], "true_false": ok})
    return records


def build_meta_grouped(seed: int, out: Path, n_meta: int, per_question: int = META_CHAINS_PER_QUESTION) -> list[dict]:
    """The meta set as real ones are laid out (DreamPRM-1.5's: ~4 answers per question, balanced):
    `n_meta` chains in all, `per_question` per question (half right, half wrong, distinct texts),
    each with the `question_id` that the pairwise objective pairs within."""
    if n_meta % per_question or per_question % 2:
        raise ValueError(f"--meta {n_meta}: must be a multiple of {per_question} chains per question, "
                         f"an even number")
    rng = random.Random(f"quality/{seed}/meta_grouped")
    records = []
    for q in range(n_meta // per_question):
        item = demo.new_item(rng, str(out), f"metaq_{q:03d}")
        flags = [True] * (per_question // 2) + [False] * (per_question // 2)
        rng.shuffle(flags)
        for j, (text, ok) in enumerate(distinct_chains(item, rng, flags)):
            records.append({"id": f"metaq-{q:03d}-{j}", "question_id": f"metaq-{q:03d}",
                            "input": item["question"] + "\n\n" + text, "image_path": item["image_path"],
                            "true_false": ok})
    return records


def distinct_chains(item: dict, rng: random.Random, flags: list[bool]) -> list[tuple[str, bool]]:
    """One chain text per flag (right or wrong) for one question, distinct texts where possible."""
    chains, seen = [], set()
    for ok in flags:
        for _ in range(50):  # prefer distinct texts
            steps, answer, _ = sample_chain(item, rng, ok)
            text = demo.chain_text(steps, answer)
            if text not in seen:
                break
        seen.add(text)
        chains.append((text, ok))
    return chains


def build_test(seed: int, out: Path, n_questions: int) -> list[dict]:
    """Best-of-N questions: N_CANDIDATES chains each, 1..MAX_RIGHT of them right, distinct texts."""
    rng = random.Random(f"quality/{seed}/test")
    records = []
    for i in range(n_questions):
        item = demo.new_item(rng, str(out), f"test_{i:03d}")
        n_right = rng.randint(1, MAX_RIGHT)
        flags = [True] * n_right + [False] * (N_CANDIDATES - n_right)
        rng.shuffle(flags)
        candidates = [{"text": text, "correct": ok} for text, ok in distinct_chains(item, rng, flags)]
        records.append({"id": f"test-{i:03d}", "image_path": item["image_path"], "question": item["question"],
                        "candidates": candidates, "ground_truth": item["gt"]})
    return records


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True))
        f.write("\n")


def make_task(out: str | Path, seed: int = 0, chains_per_domain: int = 48, n_meta: int = 96,
              n_test: int = 64, meta_wrong: float = 0.5, inverted_size: float = INVERTED_SIZE,
              task: str = "noise") -> dict:
    """Write the task under `out`; returns the manifest (also written as task.json)."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(images)):  # drop stale images of an earlier draw
        if name.endswith(".png") and name.split("_")[0] in ("train", "meta", "metaq", "test"):
            os.remove(images / name)
    train, domain_stats, corrupted = build_train(seed, out, chains_per_domain, task, inverted_size)
    meta = build_meta(seed, out, n_meta, meta_wrong)
    meta_grouped = build_meta_grouped(seed, out, n_meta)
    test = build_test(seed, out, n_test)
    write_json(out / "train.json", train)
    write_json(out / "corrupted.json", corrupted)
    clean = [name for name, d in TASKS[task].items() if d.kind == "clean"]
    write_json(out / "train_clean.json", [r for r in train if r["dataset"] in clean])
    write_json(out / "meta.json", meta)
    write_json(out / "meta_grouped.json", meta_grouped)
    write_json(out / "test.json", test)
    right = [sum(c["correct"] for c in q["candidates"]) for q in test]
    manifest = {
        "seed": seed, "task": task, "domains": domain_stats, "train_records": len(train),
        "corrupted_records": len(corrupted),
        "meta": {"chains": len(meta), "true": sum(r["true_false"] for r in meta),
                 "label_mean": round(sum(r["true_false"] for r in meta) / len(meta), 4)},
        "meta_grouped": {"chains": len(meta_grouped), "true": sum(r["true_false"] for r in meta_grouped),
                         "questions": len({r["question_id"] for r in meta_grouped})},
        "test": {"questions": len(test), "n": N_CANDIDATES, "right_per_question": [min(right), max(right)],
                 "random_pick": round(sum(right) / (N_CANDIDATES * len(test)), 4)},
    }
    write_json(out / "task.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "quality" / "task"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="task seed (images, chains, labels, noise)")
    parser.add_argument("--task", default="noise", choices=sorted(TASKS), help="which set of training domains")
    parser.add_argument("--chains_per_domain", type=int, default=48, help="training chains per domain")
    parser.add_argument("--meta", type=int, default=96, help="meta chains (half right)")
    parser.add_argument("--meta_wrong", type=float, default=0.5, help="share of wrong meta chains")
    parser.add_argument("--test", type=int, default=64, help="Best-of-N test questions")
    parser.add_argument("--inverted_size", type=float, default=INVERTED_SIZE,
                        help="chains of the inverted domain, in units of --chains_per_domain")
    args = parser.parse_args(argv)
    manifest = make_task(args.out, args.seed, args.chains_per_domain, args.meta, args.test, args.meta_wrong,
                         args.inverted_size, args.task)
    for name, d in manifest["domains"].items():
        print(f"{name:>9}: {d['records']:4d} records, {d['labels_changed']:4d} labels changed, "
              f"mean label {d['label_mean']:.3f}, correlation with the truth {d['label_truth_correlation']:+.2f}")
    print(f"meta: {manifest['meta']['chains']} chains ({manifest['meta']['true']} right); test: "
          f"{manifest['test']['questions']} questions x {manifest['test']['n']} (random pick "
          f"{manifest['test']['random_pick']:.3f})")


if __name__ == "__main__":
    main()
