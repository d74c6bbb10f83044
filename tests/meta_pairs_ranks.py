"""Pairs within a question across real ZeRO-3 ranks (run by test_meta_pairs.py, 1 rank and 2 through torchrun).

The global meta batch is [right 0, right 1 | wrong 2, wrong 3] (rank 0 | rank 1 on two ranks) with
questions [A, B | A, B]: every within-question pair spans the ranks, and the cross-question pairs
(0, 3) and (1, 2) are left out. Reports (rank 0, JSON) the directional derivatives d_k of the
trainer's own `meta_gradient` + `exact_domain_dots`, with the question ids and without them (every
chain its own question: all four pairs). Usage: meta_pairs_ranks.py MODEL_DIR OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dreamprm.bilevel.upper import exact_domain_dots, meta_gradient
from dreamprm.config import REPO_ROOT, TrainConfig, load_ds_config, resolve_ds_config
from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset
from dreamprm.data.records import domain_index, load_meta_records, load_train_records
from dreamprm.distributed.engine import DistributedEngine, init_distributed, partitioned_construction, shutdown
from dreamprm.model.loading import build_prm
from dreamprm.model.processor import load_processor

DEMO = REPO_ROOT / "data" / "demo"
QUESTIONS = [0, 1, 0, 1]  # by global position: questions A, B, A, B
TRAIN_GLOBAL = 8


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    info = init_distributed("cpu")
    config = TrainConfig()
    config.optim.batch_size = TRAIN_GLOBAL // info.world_size
    config.optim.precision = "fp32"
    ds = resolve_ds_config(load_ds_config(REPO_ROOT / "ds_configs" / "zero3.json"), config,
                           world_size=info.world_size, on_gpu=False)
    meta = MetaDataset(load_meta_records(DEMO / "meta.json"))
    right = [i for i in range(len(meta)) if meta[i]["target"] == 1.0][:2]
    wrong = [i for i in range(len(meta)) if meta[i]["target"] == 0.0][:2]
    chains = [{**meta[i], "question": q} for i, q in zip(right + wrong, QUESTIONS)]
    records = load_train_records(DEMO / "train.json")
    domains = domain_index(records)
    # Records of every domain in turn, so that every d_k is measured.
    by_domain = [[r for r in records if r.domain == d] for d in domains]
    train = TrainDataset([by_domain[i % len(domains)][i // len(domains)] for i in range(TRAIN_GLOBAL)], domains)
    per_meta, per_train = len(chains) // info.world_size, TRAIN_GLOBAL // info.world_size
    collate = PRMCollator(load_processor(model_dir))
    meta_batch = collate(chains[info.rank * per_meta:(info.rank + 1) * per_meta])
    train_batch = collate([train[i] for i in range(info.rank * per_train, (info.rank + 1) * per_train)])
    with partitioned_construction(ds):
        model = build_prm(model_dir, "logits", seed=3)
    engine = DistributedEngine(model, ds, info, upper_precision="fp32")
    report: dict = {"world_size": info.world_size}
    for name, batch in (("questions", meta_batch), ("no_questions", {k: v for k, v in meta_batch.items()
                                                                     if k != "question"})):
        v, loss = meta_gradient(engine, batch, "mean_logit", "pairwise")
        report[name] = {"d": exact_domain_dots(engine, train_batch, v, len(domains)).tolist(), "loss": loss}
    if info.rank == 0:
        out.write_text(json.dumps(report, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
