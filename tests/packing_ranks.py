"""Packed against per-prefix on real ZeRO-3 ranks (run by test_packing.py through torchrun).

For each head: two engines built from the same seed, one fed per-prefix batches and one packed
batches of the same records. Reports (rank 0, JSON) the largest score difference on meta chains
and grouped training chains, the hypergradient of both meta objectives (the trainer's own
`meta_gradient` and `exact_domain_dots`), the gradient of the weighted training loss and the
largest parameter difference after one training step. Usage: packing_ranks.py MODEL_DIR OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dreamprm.bilevel import hypergradient as hg
from dreamprm.bilevel.domain_weights import DomainWeights
from dreamprm.bilevel.upper import exact_domain_dots, meta_gradient
from dreamprm.config import META_LOSSES, REPO_ROOT, TrainConfig, load_ds_config, resolve_ds_config
from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset
from dreamprm.data.packing import PackedPRMCollator, group_chain_records
from dreamprm.data.records import domain_index, load_meta_records, load_train_records
from dreamprm.distributed.engine import DistributedEngine, init_distributed, partitioned_construction, shutdown
from dreamprm.losses import per_sample_mse, weighted_training_loss
from dreamprm.model.loading import build_prm
from dreamprm.model.prm import MODEL_KEYS
from dreamprm.model.processor import load_processor

DEMO = REPO_ROOT / "data" / "demo"
INPUTS = MODEL_KEYS
META_PER_RANK, TRAIN_PER_RANK = 3, 9  # 9 records: chains split across the ranks and the batch end


def local_items(rank: int) -> tuple[list[dict], list[dict], dict[str, int]]:
    """This rank's meta chains (images of several sizes: rows pad, grids are not square) and training
    records in chain order with their chain groups."""
    meta = MetaDataset(load_meta_records(DEMO / "meta.json"))
    sizes = [(56, 56), (112, 56), (56, 140), (84, 84), (168, 112), (70, 98)]
    picked = range(rank * META_PER_RANK, (rank + 1) * META_PER_RANK)
    meta_items = [{**meta[i], "image": meta[i]["image"].resize(sizes[i % len(sizes)])} for i in picked]
    records = load_train_records(DEMO / "train.json")
    domains = domain_index(records)
    # Whole chains, one domain after another, so that every domain has records on some rank.
    chains: dict[str, list] = {}
    for r in records:
        chains.setdefault(r.chain_id, []).append(r)
    by_domain = [[c for c in chains.values() if c[0].domain == d] for d in domains]
    records = [r for i in range(2) for d in by_domain for r in d[i]][rank * TRAIN_PER_RANK:(rank + 1) * TRAIN_PER_RANK]
    train = TrainDataset(records, domains)
    groups = group_chain_records(records)
    return meta_items, [{**train[i], "group": groups[i]} for i in range(len(records))], domains


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    info = init_distributed("cpu")
    config = TrainConfig()
    config.optim.batch_size = TRAIN_PER_RANK
    config.optim.precision = "fp32"
    # AdamW's first step is g / (|g| + eps) per element: where |g| ~ eps (1e-9..1e-8, measured) a
    # rounding difference of the gradient is amplified by lr / eps. At lr 1e-3 two fp32 evaluations of
    # the same gradient (relative difference 2e-7) then land 1.2e-5 apart; at 1e-4 they stay ~1e-6
    # apart while every parameter moves ~1e-4. The gradients themselves are compared relatively.
    config.optim.lr = 1e-4
    ds = resolve_ds_config(load_ds_config(REPO_ROOT / "ds_configs" / "zero3.json"), config,
                           world_size=info.world_size, on_gpu=False)
    processor = load_processor(model_dir)
    meta_items, train_items, domains = local_items(info.rank)
    layouts = {"none": PRMCollator(processor), "chain": PackedPRMCollator(processor)}
    batches = {mode: {"meta": collate(meta_items), "train": collate(train_items)} for mode, collate in layouts.items()}
    weights = torch.linspace(0.4, 1.6, len(domains))
    report: dict = {"world_size": info.world_size, "tokens": {
        mode: {k: int(b["attention_mask"].sum()) for k, b in per.items()} for mode, per in batches.items()}}
    for head in ("logits", "hidden"):
        engines, scores = {}, {}
        for mode in layouts:
            with partitioned_construction(ds):
                model = build_prm(model_dir, head, seed=5)
            engines[mode] = engine = DistributedEngine(model, ds, info, upper_precision="fp32")
            with torch.no_grad():
                scores[mode] = {k: engine.forward({n: v for n, v in b.items() if n in INPUTS})
                                for k, b in batches[mode].items()}
        entry = {f"{k}_score_diff": float((scores["chain"][k] - scores["none"][k]).abs().max()) for k in ("meta", "train")}
        # The hypergradient at the same parameters, each layout through the upper step's own functions.
        domain_weights = DomainWeights(list(domains))
        for objective in META_LOSSES:
            hyper = {}
            for mode, engine in engines.items():
                v, _ = meta_gradient(engine, batches[mode]["meta"], "mean_logit", objective)
                directional = exact_domain_dots(engine, batches[mode]["train"], v, len(domains))
                hyper[mode] = hg.hypergradient(directional, domain_weights.logit_gradient)
            entry[f"hypergradient_{objective}"] = {mode: h.tolist() for mode, h in hyper.items()}
            entry[f"hypergradient_{objective}_cosine"] = float(torch.nn.functional.cosine_similarity(
                hyper["chain"], hyper["none"], dim=0))
        # The weighted training loss's gradient (this rank's shard), then one training step in each
        # layout, and the gathered parameters side by side.
        def loss_of(mode: str) -> torch.Tensor:
            batch = batches[mode]["train"]
            logits = engines[mode].forward({n: v for n, v in batch.items() if n in INPUTS})
            return weighted_training_loss(per_sample_mse(logits, batch["target"]), batch["domain"], weights)

        grads = {mode: engine.backward_without_step(loss_of(mode)) for mode, engine in engines.items()}
        difference = [a - b for a, b in zip(grads["chain"], grads["none"])]
        engine = engines["none"]
        entry["grad_rel_error"] = float(engine.global_dot(difference, difference).sqrt()
                                        / engine.global_dot(grads["none"], grads["none"]).sqrt())
        for mode, engine in engines.items():
            engine.backward(loss_of(mode))
            engine.step()
        states = {mode: engine.consolidated_state_dict() for mode, engine in engines.items()}
        if info.rank == 0:
            moved = max(float((states["none"][n] - p).abs().max()) for n, p in
                        build_prm(model_dir, head, seed=5).state_dict().items())
            entry["param_diff"] = max(float((states["chain"][n] - p).abs().max()) for n, p in states["none"].items())
            entry["param_moved"] = moved  # the step did change the parameters
        report[head] = entry
    if info.rank == 0:
        out.write_text(json.dumps(report, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
