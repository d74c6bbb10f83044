"""Hypergradient fidelity: every estimator against an exact reference, at the same parameters.

Runs the real ZeRO-3 engine (any number of ranks) on fixed global batches taken from the record
files, computes the per-domain directional derivatives d_k = ⟨∂(S_k/N)/∂θ, ∂L_meta/∂θ⟩ with each
estimator, and writes them with timings to JSON (rank 0). With ``--reference`` it also computes
the same quantity in float64 without DeepSpeed (benchmarks/fp64_reference.py: plain autograd,
float64 end to end, no loss or Jacobian code shared with the estimators) and reports cosine and
relative error of each estimator against it.

    # CPU, tiny model, 2 ranks
    torchrun --standalone --nproc_per_node 2 benchmarks/hypergrad_fidelity.py --precision fp32 --reference
    # GPU, Qwen2-VL-2B config (random init), bf16 engine, fp32 reference on the same card
    python benchmarks/hypergrad_fidelity.py --reward_model /path/to/qwen2vl-2b-random --precision bf16 --reference
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import fp64_reference  # noqa: E402
from benchmarks.fp64_reference import Float64Reference  # noqa: E402
from dreamprm.bilevel import hypergradient as hg  # noqa: E402
from dreamprm.bilevel.domain_weights import DomainWeights  # noqa: E402
from dreamprm.bilevel.upper import domain_sums_at, exact_domain_dots, meta_gradient  # noqa: E402
from dreamprm.config import (DEMO_DIR, REPO_ROOT, UPPER_PRECISIONS, BilevelConfig, TrainConfig,  # noqa: E402
                             load_ds_config, resolve_ds_config)
from dreamprm.data.chat import chain_layout  # noqa: E402
from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset  # noqa: E402
from dreamprm.data.packing import make_collator  # noqa: E402
from dreamprm.losses import lower_loss  # noqa: E402
from dreamprm.data.records import domain_index, load_meta_records, load_train_records  # noqa: E402


def fixed_batches(train_file: str, meta_file: str, processor, global_batch: int, meta_global: int,
                  rank: int = 0, world: int = 1, packing: str = "none", head: str = "logits"):
    """The first records of each domain in turn (so every domain is present), split across ranks;
    `packing` 'chain' packs each meta chain into one row (the trainer's default), 'none' one row per
    prefix. The full (all-rank) batches, for the reference, are per-prefix. In the chat layout of
    ``head`` (generative: one step per turn)."""
    train = load_train_records(train_file)
    domains = domain_index(train)
    by_domain = {d: [r for r in train if r.domain == d] for d in domains}
    picked, i = [], 0
    while len(picked) < global_batch:
        d = list(domains)[i % len(domains)]
        picked.append(by_domain[d][i // len(domains)])
        i += 1
    meta = load_meta_records(meta_file)[:meta_global]
    layout = chain_layout(head)
    collate, local_collate = PRMCollator(processor, layout), make_collator(processor, packing, layout)
    per, mper = global_batch // world, meta_global // world
    train_set, meta_set = TrainDataset(picked, domains), MetaDataset(meta)
    local_train = collate([train_set[j] for j in range(rank * per, (rank + 1) * per)])
    local_meta = local_collate([meta_set[j] for j in range(rank * mper, (rank + 1) * mper)])
    full_train = collate([train_set[j] for j in range(global_batch)])
    full_meta = collate([meta_set[j] for j in range(meta_global)])
    return domains, local_train, local_meta, full_train, full_meta


def reference_values(model_dir: str, head: str, seed: int, full_train, full_meta, num_domains: int,
                     combos: list[tuple[str, str]], loss: str = "mse",
                     device: str | torch.device = "cpu") -> dict[tuple[str, str], torch.Tensor]:
    """d_k in float64 without DeepSpeed (benchmarks/fp64_reference.py) for each (objective, aggregation):
    one meta-gradient per combination, then each domain's gradient once, dotted with all of them.
    ``loss``: the lower loss's name; ``device``: where the float64 model runs (a 2B model: the GPU)."""
    ref = Float64Reference(model_dir, head, seed, loss, device)
    vs = [ref.meta_gradient([full_meta], aggregation, objective) for objective, aggregation in combos]
    d = ref.domain_directionals([full_train], num_domains, vs)
    del ref, vs
    return {combo: d[i] for i, combo in enumerate(combos)}


def loss_name(args: argparse.Namespace) -> str:
    """The lower loss of the run: the generative head's --generative_loss, else the squared error."""
    return args.generative_loss if args.head == "generative" else "mse"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def objective_grid(engine, info, args, model_dir, train, meta, full_train, full_meta, k, radius) -> dict:
    """exact and fd d_k for every meta objective x aggregation; with --reference, their cosine against
    the fp64 reference (rank 0)."""
    from dreamprm.config import AGGREGATIONS, META_LOSSES
    grid = {}
    snapshot = engine.master_params_snapshot()
    for objective in META_LOSSES:
        for aggregation in AGGREGATIONS:
            v, _ = meta_gradient(engine, meta, aggregation, objective)
            v_norm = math.sqrt(float(engine.global_dot(v, v)))
            exact = exact_domain_dots(engine, train, v, k, lower_loss(args.head, args.generative_loss))
            direction = engine.full_gradients_for_edit(v)

            def sums_at(t):
                engine.perturb(snapshot, direction, t)
                return domain_sums_at(engine, train, k, lower_loss(args.head, args.generative_loss))
            try:
                fd = hg.central_difference(sums_at, hg.fd_epsilon(radius, v_norm), args.global_batch)
            finally:
                engine.restore(snapshot)
            grid[f"{objective}/{aggregation}"] = {"exact": exact.tolist(), "fd": fd.tolist()}
    if args.reference and info.rank == 0:
        combos = [tuple(name.split("/")) for name in grid]
        refs = reference_values(model_dir, args.head, args.seed, full_train, full_meta, k, combos,
                                loss_name(args), info.device)
        logits = torch.zeros(k, dtype=torch.float64)
        for (objective, aggregation), ref in refs.items():
            entry = grid[f"{objective}/{aggregation}"]
            ref_hyper = fp64_reference.hypergradient(ref, logits)
            entry["reference"] = ref.tolist()
            for name in ("exact", "fd"):
                hyper = fp64_reference.hypergradient(torch.tensor(entry[name], dtype=torch.float64), logits)
                entry[f"{name}_cosine"] = cosine(hyper, ref_hyper)
                entry[f"{name}_rel_error"] = rel_error(torch.tensor(entry[name]), ref)
                entry[f"{name}_signs_right"] = signs_agree(hyper, ref_hyper)
            print(f"grid {objective:>9} {aggregation:>10}: exact cosine {entry['exact_cosine']:.6f} rel. error "
                  f"{entry['exact_rel_error']:.2e} signs {entry['exact_signs_right']} | fd cosine "
                  f"{entry['fd_cosine']:.6f}", flush=True)
    return grid


def signs_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every component of the hypergradient moves its logit the reference's way."""
    return bool((torch.sign(a.double()) == torch.sign(b.double())).all())


def best_time(fn, repeats: int, device: torch.device):
    """(fn's last value, its fastest of `repeats` runs in seconds), synchronised on CUDA."""
    best, value = math.inf, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return value, best


def fidelity_engine(reward_model: str, head: str, deepspeed_file: str, precision: str, global_batch: int, seed: int,
                    upper_precision: str):
    """(rank info, the PRM in a real DeepSpeed engine, its processor, the model folder) for these scripts."""
    from dreamprm.build import PRECISIONS, resolve_reward_model
    from dreamprm.distributed.engine import DistributedEngine, init_distributed, partitioned_construction
    from dreamprm.model.loading import build_prm
    from dreamprm.model.processor import load_processor

    info = init_distributed("auto")
    model_dir = resolve_reward_model(reward_model, info.rank)
    config = TrainConfig()
    config.optim.batch_size = global_batch // info.world_size
    config.optim.precision = precision
    ds = resolve_ds_config(load_ds_config(deepspeed_file), config, world_size=info.world_size,
                           on_gpu=info.device.type == "cuda")
    with partitioned_construction(ds):
        model = build_prm(model_dir, head, seed=seed, dtype=PRECISIONS[precision])
    return (info, DistributedEngine(model, ds, info, upper_precision=upper_precision), load_processor(model_dir),
            model_dir)


def add_model_and_data_args(p: argparse.ArgumentParser, heads: tuple[str, ...] = ("logits", "hidden")) -> None:
    """The model, records and DeepSpeed config flags the fidelity scripts share (``heads``: the heads a
    script covers; this one covers the generative head and its lower loss too)."""
    p.add_argument("--reward_model", default="tiny")
    p.add_argument("--head", default="logits", choices=heads)
    if "generative" in heads:
        p.add_argument("--generative_loss", default="bce", choices=("bce", "mse"), help="--head generative: lower loss")
    p.add_argument("--train_json_file", default=str(DEMO_DIR / "train.json"))
    p.add_argument("--meta_json_file", default=str(DEMO_DIR / "meta.json"))
    p.add_argument("--deepspeed", default=str(REPO_ROOT / "ds_configs" / "zero3.json"))
    p.add_argument("--upper_precision", default=BilevelConfig.upper_precision, choices=UPPER_PRECISIONS,
                   help="arithmetic of the meta-gradient and exact's passes (launch/train.py's flag)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_args(p, heads=("logits", "hidden", "generative"))
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--meta_global", type=int, default=4)
    p.add_argument("--radii", default="1e-2,1e-3,1e-4")
    p.add_argument("--meta_loss", default="mse", choices=("mse", "pairwise"))
    p.add_argument("--packing", default="none", choices=("none", "chain"), help="meta chains per prefix or packed")
    p.add_argument("--aggregation", default="mean_logit",
                   choices=("mean_logit", "mean", "min", "max", "product", "last"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed repeats of each estimator")
    p.add_argument("--reference", action="store_true", help="also compute the fp64 reference (rank 0)")
    p.add_argument("--grid", action="store_true", help="also run exact and fd (smallest radius) for every meta "
                   "objective x aggregation (with --reference: each against its fp64 reference)")
    p.add_argument("--out", default=None, help="JSON results (rank 0)")
    args = p.parse_args(argv)

    from dreamprm.distributed.engine import shutdown

    info, engine, processor, model_dir = fidelity_engine(args.reward_model, args.head, args.deepspeed, args.precision,
                                                         args.global_batch, args.seed, args.upper_precision)
    world = info.world_size
    domains, train, meta, full_train, full_meta = fixed_batches(
        args.train_json_file, args.meta_json_file, processor, args.global_batch, args.meta_global, info.rank, world,
        args.packing, head=args.head)
    loss = lower_loss(args.head, args.generative_loss)
    k = len(domains)
    train, meta = engine.to_device(train), engine.to_device(meta)

    def timed(fn):
        return best_time(fn, args.repeats, info.device)

    (v, meta_value), t_v = timed(lambda: meta_gradient(engine, meta, args.aggregation, args.meta_loss))
    v_norm = math.sqrt(float(engine.global_dot(v, v)))
    results: dict[str, dict] = {}
    d_exact, t = timed(lambda: exact_domain_dots(engine, train, v, k, loss))
    results["exact"] = {"directional": d_exact.tolist(), "seconds": t}
    snapshot = engine.master_params_snapshot()
    direction = engine.full_gradients_for_edit(v)
    n_global = args.global_batch
    for r in [float(x) for x in args.radii.split(",")]:
        eps = hg.fd_epsilon(r, v_norm)

        def fd():
            def sums_at(t):
                engine.perturb(snapshot, direction, t)
                return domain_sums_at(engine, train, k, loss)
            try:
                return hg.central_difference(sums_at, eps, n_global)
            finally:
                engine.restore(snapshot)

        d_fd, t = timed(fd)
        name = "fd" if args.precision == "fp32" else "fd_bf16_naive"
        results[f"{name}@{r:g}"] = {"directional": d_fd.tolist(), "seconds": t, "epsilon": eps}
    weights = DomainWeights(list(domains))
    for entry in results.values():
        entry["hypergradient"] = hg.hypergradient(torch.tensor(entry["directional"], dtype=torch.float64),
                                                  weights.logit_gradient).tolist()
    summary = {"world_size": world, "precision": args.precision, "upper_precision": args.upper_precision,
               "packing": args.packing, "meta_loss_name": args.meta_loss, "domains": domains, "v_norm": v_norm,
               "meta_loss": meta_value, "meta_gradient_seconds": t_v, "estimators": results,
               "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu"}
    if args.out and info.rank == 0:  # the estimators now: a reference that fails (e.g. out of memory) keeps them
        Path(args.out).write_text(json.dumps(summary, indent=2))
    if args.reference and info.rank == 0:
        t0 = time.perf_counter()
        ref = reference_values(model_dir, args.head, args.seed, full_train, full_meta, k,
                               [(args.meta_loss, args.aggregation)], loss_name(args),
                               info.device)[(args.meta_loss, args.aggregation)]
        ref_hyper = fp64_reference.hypergradient(ref, weights.logits)
        summary["reference"] = {"directional": ref.tolist(), "hypergradient": ref_hyper.tolist(),
                                "seconds": time.perf_counter() - t0}
        for entry in results.values():
            hyper = torch.tensor(entry["hypergradient"], dtype=torch.float64)
            entry["cosine_vs_reference"] = cosine(hyper, ref_hyper)
            entry["rel_error_vs_reference"] = rel_error(torch.tensor(entry["directional"]), ref)
            entry["signs_right"] = signs_agree(hyper, ref_hyper)
    if args.grid:
        summary["grid"] = objective_grid(engine, info, args, model_dir, train, meta, full_train, full_meta, k,
                                         min(float(x) for x in args.radii.split(",")))
    if info.rank == 0:
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"{'estimator':<22}{'cosine':>10}{'rel.err':>10}{'seconds':>10}")
        for name, entry in results.items():
            print(f"{name:<22}{entry.get('cosine_vs_reference', float('nan')):>10.5f}"
                  f"{entry.get('rel_error_vs_reference', float('nan')):>10.4f}{entry['seconds']:>10.3f}")
    shutdown()


if __name__ == "__main__":
    main()
