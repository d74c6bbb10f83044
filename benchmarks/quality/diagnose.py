#!/usr/bin/env python
"""How much domain signal one upper step sees: the DARTS hypergradient's signal-to-noise ratio at
fixed PRM parameters, from per-sample gradients (plain autograd, no DeepSpeed).

With g_i = ∂loss_i/∂θ for every training record and h_j = ∂z_j/∂θ for every meta chain's logit z_j,
one upper step on a training batch B (N records) and a meta batch M computes

    d_k = (1/N) Σ_{i∈B, domain k} ⟨g_i, v_M⟩,   v_M = Σ_{j∈M} c_j h_j,   c_j = ∂L_meta(z_M)/∂z_j,

where the coefficients c_j depend on the meta objective (``--meta_loss``; for the pairwise one on
every chain of M). At uniform weights the hypergradient moves domain k's logit by -(d_k - mean_k d)
times a constant. This script computes D[i, j] = ⟨g_i, h_j⟩ once and draws many (B, M) pairs of the
trainer's sizes from it: the mean of d_k - mean(d) is the signal, its spread over draws the noise, and
P(up) how often one upper step moves domain k up. A segment of U lower steps whose batches are all
used (--hypergrad_batches segment) is the size (U·N)xM.

    python benchmarks/quality/diagnose.py --prm runs/quality/noise/runs/vanilla-s0/export \
        --train runs/quality/noise/task/train.json --meta runs/quality/noise/task/meta.json \
        --sizes 16x8,32x8 --meta_loss mse,pairwise
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import torch  # noqa: E402

from dreamprm.bilevel.aggregation import AGGREGATIONS, aggregate_logits, meta_loss  # noqa: E402
from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset  # noqa: E402
from dreamprm.data.records import domain_index, load_meta_records, load_train_records  # noqa: E402
from dreamprm.losses import META_LOSSES, chain_meta_loss, per_sample_mse  # noqa: E402
from dreamprm.model.prm import model_inputs  # noqa: E402


def load_model(path: str, seed: int):
    from dreamprm.model.loading import build_prm, load_exported_prm
    from dreamprm.model.processor import load_processor
    if (Path(path) / "prm_config.json").is_file():
        model, processor, _ = load_exported_prm(path)
        return model, processor
    return build_prm(path, "logits", seed=seed), load_processor(path)


def flat_grad(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def dot_matrix(model, processor, train_file: str, meta_file: str, aggregation: str):
    """D [train records, meta chains] = ⟨g_i, ∂z_j/∂θ⟩, the domain index of each record, the train
    losses, and each meta chain's logit z_j and label."""
    train = load_train_records(train_file)
    meta = load_meta_records(meta_file)
    domains = domain_index(train)
    collate = PRMCollator(processor)
    train_set, meta_set = TrainDataset(train, domains), MetaDataset(meta)
    model.eval()  # no dropout in the tiny model either way; eval makes it explicit
    h, chain_logits, labels = [], [], []
    for j in range(len(meta_set)):
        batch = collate([meta_set[j]])
        z = aggregate_logits(aggregation, model(**model_inputs(batch)).float(), batch["item_index"], 1)[0]
        chain_logits.append(float(z.detach()))
        labels.append(float(batch["target"][0]))
        h.append(flat_grad(model, z))
    h = torch.stack(h)  # (M, P)
    rows, dom, train_losses = [], [], []
    for i in range(len(train_set)):
        batch = collate([train_set[i]])
        loss = per_sample_mse(model(**model_inputs(batch)), batch["target"]).sum()
        train_losses.append(float(loss.detach()))
        rows.append(h @ flat_grad(model, loss))
        dom.append(int(batch["domain"][0]))
    return (domains, torch.stack(rows).double(), torch.tensor(dom), train_losses,
            (torch.tensor(chain_logits, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)))


def meta_coefficients(chain_logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """c_j = ∂L_meta/∂z_j for the chains of one meta batch."""
    z = chain_logits.clone().requires_grad_(True)
    (c,) = torch.autograd.grad(chain_meta_loss(z, labels, objective), z, allow_unused=True)
    return torch.zeros_like(z) if c is None else c


def lookahead(model, processor, train_file: str, meta_file: str, aggregation: str,
              lr: float = 1e-3) -> dict[str, tuple[float, float]]:
    """Per domain: the full meta loss change after one plain gradient step of size `lr` on that domain's
    mean loss, (measured, first-order prediction -lr * <grad, v>). A sign check of the hypergradient
    that shares no code with it: the domain whose step lowers the meta loss should gain weight."""
    train = load_train_records(train_file)
    meta = load_meta_records(meta_file)
    domains = domain_index(train)
    collate = PRMCollator(processor)
    meta_set = MetaDataset(meta)
    meta_batch = collate([meta_set[j] for j in range(len(meta_set))])
    params = [p for p in model.parameters() if p.requires_grad]

    def meta_value():
        return meta_loss(model(**model_inputs(meta_batch)), meta_batch["item_index"], meta_batch["target"],
                         aggregation)

    v = flat_grad(model, meta_value())
    with torch.no_grad():
        base = float(meta_value())
    out = {}
    for name, k in domains.items():
        ds = TrainDataset([r for r in train if r.domain == name], domains)
        grads = []
        for start in range(0, len(ds), 32):
            batch = collate([ds[i] for i in range(start, min(start + 32, len(ds)))])
            grads.append(flat_grad(model, per_sample_mse(model(**model_inputs(batch)), batch["target"]).sum()))
        g = torch.stack(grads).sum(0) / len(ds)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= lr * g[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            after = float(meta_value())
            for p, s in zip(params, saved):
                p.copy_(s)
        out[name] = (after - base, -lr * float(g @ v))
    return out


def simulate(D: torch.Tensor, dom: torch.Tensor, k: int, batch: int, meta_batch: int, draws: int, seed: int,
             chains: tuple[torch.Tensor, torch.Tensor], objective: str,
             lengths: tuple[list[int], list[int]] | None = None):
    """Centred directional derivatives d_k - mean(d) over `draws` (train batch, meta batch) pairs.

    Batches are uniform random draws, or, with `lengths` (train, meta), the batches the trainer's
    length-grouped `DistributedBatchSampler` yields (draws taken from its epochs in turn)."""
    rng = random.Random(seed)
    n, m = D.shape
    chain_logits, labels = chains
    if lengths is not None:
        from dreamprm.data.sampler import DistributedBatchSampler
        train_batches, meta_batches = [], []
        epoch = 0
        while len(train_batches) < draws or len(meta_batches) < draws:
            train_batches += DistributedBatchSampler(lengths[0], batch, seed=seed).global_batches(epoch)
            meta_batches += DistributedBatchSampler(lengths[1], meta_batch, seed=seed + 1).global_batches(epoch)
            epoch += 1
    out = torch.zeros(draws, k, dtype=torch.float64)
    for t in range(draws):
        if lengths is not None:
            b, mm = torch.tensor(train_batches[t]), torch.tensor(meta_batches[t])
        else:
            b = torch.tensor(rng.sample(range(n), batch))
            mm = torch.tensor(rng.sample(range(m), meta_batch))
        c = meta_coefficients(chain_logits[mm], labels[mm], objective)
        per_record = (D[b][:, mm] * c).sum(dim=1) / batch  # (1/N) ⟨g_i, v_M⟩
        d = torch.zeros(k, dtype=torch.float64).index_add(0, dom[b], per_record)
        out[t] = d - d.mean()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prm", required=True, help="model directory (seeded head) or an exported PRM")
    parser.add_argument("--train", required=True)
    parser.add_argument("--meta", required=True)
    parser.add_argument("--seed", type=int, default=1, help="head seed for a model directory")
    parser.add_argument("--sizes", default="16x8",
                        help="comma-separated BATCHxMETA_BATCH sizes of one upper step to simulate, e.g. 16x8,64x32")
    parser.add_argument("--aggregation", default="mean_logit", choices=sorted(AGGREGATIONS),
                        help="step scores -> chain score in the meta loss (the trainer's --aggregation)")
    parser.add_argument("--meta_loss", default="mse,pairwise",
                        help=f"comma-separated meta objectives to simulate ({', '.join(META_LOSSES)})")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--sampler", default="random", choices=("random", "trainer"),
                        help="batches drawn uniformly at random, or the trainer's length-grouped batches")
    parser.add_argument("--lookahead", type=float, default=0.0,
                        help="also take one plain gradient step of this size on each domain alone and report "
                        "the meta loss change (a sign check that shares no code with the hypergradient)")
    parser.add_argument("--cache", default=None, help="save D here, or load it when the file exists")
    parser.add_argument("--out", default=None, help="JSON summary")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, processor = load_model(args.prm, args.seed)
    if args.cache and Path(args.cache).is_file():
        domains, D, dom, train_losses, chains = torch.load(args.cache)
    else:
        domains, D, dom, train_losses, chains = dot_matrix(model, processor, args.train, args.meta, args.aggregation)
        if args.cache:
            torch.save((domains, D, dom, train_losses, chains), args.cache)
    k = len(domains)
    names = list(domains)
    objectives = args.meta_loss.split(",")
    summary = {"prm": args.prm, "aggregation": args.aggregation, "train_loss": sum(train_losses) / len(train_losses),
               "meta_loss": {o: float(chain_meta_loss(chains[0], chains[1], o)) for o in objectives}, "full": {},
               "sizes": {}}
    print(f"{args.prm} (meta aggregation {args.aggregation}): train loss {summary['train_loss']:.4f}, meta loss "
          + ", ".join(f"{o} {v:.4f}" for o, v in summary["meta_loss"].items())
          + f"; {args.draws} draws per size, {args.sampler} batches")
    lengths = None
    if args.sampler == "trainer":  # the length proxies the trainer groups batches by
        train = load_train_records(args.train)
        lengths = (TrainDataset(train, domain_index(train)).lengths(),
                   MetaDataset(load_meta_records(args.meta)).lengths())
    for objective in objectives:
        # Full-data signal: the centred d_k with every record and every meta chain.
        c = meta_coefficients(chains[0], chains[1], objective)
        full = torch.zeros(k, dtype=torch.float64).index_add(0, dom, D @ c) / len(dom)
        full = full - full.mean()
        summary["full"][objective] = dict(zip(names, full.tolist()))
        table = {}
        for size in args.sizes.split(","):
            batch, meta_batch = (int(x) for x in size.split("x"))
            sims = simulate(D, dom, k, batch, meta_batch, args.draws, args.seed, chains, objective, lengths)
            mean, std = sims.mean(0), sims.std(0)
            table[size] = {name: {"mean": float(mean[i]), "std": float(std[i]), "snr": float(mean[i] / std[i]),
                                  "p_up": float((sims[:, i] > 0).double().mean())} for i, name in enumerate(names)}
        summary["sizes"][objective] = table
        print(f"--meta_loss {objective}")
        print(f"{'domain':>12} {'full d_k-mean':>14}" + "".join(f" {'SNR ' + size:>12} {'P(up)':>6}" for size in table))
        for i, name in enumerate(names):
            print(f"{name:>12} {float(full[i]):>+14.3e}" + "".join(
                f" {table[size][name]['snr']:>+12.3f} {table[size][name]['p_up']:>6.3f}" for size in table))
    if args.lookahead:
        print(f"one gradient step (lr {args.lookahead:g}) on each domain alone: meta loss change "
              "(measured, first order)")
        summary["lookahead"] = lookahead(model, processor, args.train, args.meta, args.aggregation,
                                         args.lookahead)
        for name, (measured, predicted) in summary["lookahead"].items():
            print(f"{name:>10} {measured:>+12.3e} {predicted:>+12.3e}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
