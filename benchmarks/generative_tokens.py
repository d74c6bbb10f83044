#!/usr/bin/env python
"""Tokens per scored step: the generative head's one sequence per chain against the packed scalar head
and against per-prefix scoring, on the same chains.

Four layouts of every chain (real tokens the model processes, padding not counted, image tokens
included), divided by the number of step scores they give:
- ``scalar/per-prefix``: the original: one sequence per prefix, image and prefix in one user turn;
- ``scalar/packed``: `--packing chain` with a scalar head: one row per chain, branches for the suffix
  every prefix needs (`dreamprm.data.packing`);
- ``generative/per-prefix``: one conversation per prefix (one step per turn);
- ``generative/one sequence``: `--packing chain` with `--head generative`: the chain's conversation
  once, a judgement read after every step.

Data: meta chains, Best-of-N candidates and training records (batches of ``--batch_size`` drawn with
``--chain_batches``) of the bundled demo (2-4 steps, 56x56 images) and of the 5-8-step task with
448x448 images that benchmarks/packing.py builds.

    python benchmarks/generative_tokens.py            # ~2 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.packing import make_long_task, tiny_model_at  # noqa: E402
from dreamprm.data.chat import chain_layout  # noqa: E402
from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset  # noqa: E402
from dreamprm.data.packing import PackedPRMCollator, chain_units, group_chain_records  # noqa: E402
from dreamprm.data.records import domain_index, load_image, load_meta_records, load_train_records  # noqa: E402
from dreamprm.data.sampler import DistributedBatchSampler  # noqa: E402
from dreamprm.data.steps import split_step_prefixes  # noqa: E402

LAYOUTS = {"scalar/per-prefix": (PRMCollator, "logits"), "scalar/packed": (PackedPRMCollator, "logits"),
           "generative/per-prefix": (PRMCollator, "generative"),
           "generative/one sequence": (PackedPRMCollator, "generative")}


def batches_of_items(data: Path, kind: str, batch_size: int) -> list[list[dict]]:
    """The items the collators see, batch by batch, for meta chains, candidates or training records."""
    if kind == "meta":
        dataset = MetaDataset(load_meta_records(data / "meta.json"))
        return [[dataset[i] for i in range(s, min(s + 8, len(dataset)))] for s in range(0, len(dataset), 8)]
    if kind == "candidates":
        path = data / "candidates.json"
        return [[{"image": load_image(path.parent / q["image_path"]), "domain": -1, "target": 0.0,
                  "texts": split_step_prefixes(q["question"] + "\n\n" + c["text"])} for c in q["candidates"]]
                for q in json.loads(path.read_text())]
    records = load_train_records(data / "train.json")
    groups = group_chain_records(records)
    dataset = TrainDataset(records, domain_index(records), groups=groups)
    sampler = DistributedBatchSampler([len(r.text) for r in records], batch_size, seed=0, units=chain_units(groups))
    return [[dataset[i] for i in batch] for batch in sampler]


def tokens_per_score(processor, batches: list[list[dict]]) -> dict[str, float]:
    out = {}
    for name, (collator, head) in LAYOUTS.items():
        collate = collator(processor, chain_layout(head))
        tokens = scores = 0
        for items in batches:
            batch = collate(items)
            tokens += int(batch["attention_mask"].sum())
            scores += int(batch["score_index"].numel())
        out[name] = tokens / scores
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "runs" / "generative_tokens"), help="folder for the task and model")
    p.add_argument("--batch_size", type=int, default=8, help="training records per batch")
    p.add_argument("--out", default=None, help="JSON results (default: WORK/results.json)")
    args = p.parse_args(argv)
    from dreamprm.model.processor import load_processor
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tasks = {"demo (2-4 steps, 56 px)": (REPO / "data" / "demo", tiny_model_at(work / "tiny-56", 56)),
             "long (5-8 steps, 448 px)": (make_long_task(work / "long"), tiny_model_at(work / "tiny-448", 448))}
    results: dict = {}
    for task, (data, model) in tasks.items():
        processor = load_processor(model)
        for kind in ("meta", "candidates", "train"):
            results[f"{task} / {kind}"] = tokens_per_score(processor, batches_of_items(data, kind, args.batch_size))
    print("| tokens per scored step | " + " | ".join(LAYOUTS) + " |")
    print("|---|" + "---:|" * len(LAYOUTS))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in LAYOUTS) + " |")
    Path(args.out or work / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
