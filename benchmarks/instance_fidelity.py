"""Instance weights: every record's directional derivative against an fp64 reference, and the cost.

The trainer's `--weighting instance` takes d_i = <∇ℓ_i, v>/N for every record of the segment from
the same two forwards at θ ± εv that give the domain sums (`dreamprm.bilevel.upper.finite_difference`).
This script runs that function on the real ZeRO-3 engine (any number of ranks) on fixed global
batches, gathers every rank's d_i, and with ``--reference`` compares them with d_i computed in
float64 without DeepSpeed (benchmarks/fp64_reference.py: one gradient per record by plain autograd,
no code shared with the estimator). It also times a lower step (forward, backward, optimiser step)
on the same batch, the meta-gradient, and the instance part of the upper step (the two forwards,
the all-gather of (row, ∂L/∂u, loss) triples, the table's and the net's update); with ``--reference`` it
also compares the net's hypergradient (d_i chained through the net's Jacobian) with the same chain
applied to the float64 d_i.

    torchrun --standalone --nproc_per_node 2 benchmarks/instance_fidelity.py --reference --out /tmp/inst.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.hypergrad_fidelity import (add_model_and_data_args, best_time, cosine, fidelity_engine,  # noqa: E402
                                           fixed_batches, rel_error)
from dreamprm.bilevel.instance_net import InstanceNet, RecordFeatures  # noqa: E402
from dreamprm.bilevel.instance_weights import InstanceWeights  # noqa: E402
from dreamprm.bilevel.upper import finite_difference, instance_update, meta_gradient  # noqa: E402
from dreamprm.config import BilevelConfig  # noqa: E402
from dreamprm.losses import per_sample_mse  # noqa: E402
from dreamprm.model.prm import model_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_args(p)
    p.add_argument("--global_batch", type=int, default=16)
    p.add_argument("--meta_global", type=int, default=8)
    p.add_argument("--radius", type=float, default=1e-2)
    p.add_argument("--meta_loss", default="pairwise", choices=("mse", "pairwise"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--features", default=BilevelConfig.instance_net_features,
                   help="the net's inputs (default: the trainer's --instance_net_features default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is reported)")
    p.add_argument("--reference", action="store_true", help="also compute the fp64 reference (rank 0)")
    p.add_argument("--out", default=None, help="JSON results (rank 0)")
    args = p.parse_args(argv)

    from dreamprm.distributed.engine import shutdown

    info, engine, processor, model_dir = fidelity_engine(args.reward_model, args.head, args.deepspeed, "fp32",
                                                         args.global_batch, args.seed, args.upper_precision)
    world = info.world_size
    domains, train, meta, full_train, full_meta = fixed_batches(
        args.train_json_file, args.meta_json_file, processor, args.global_batch, args.meta_global, info.rank, world)
    k = len(domains)
    train, meta = engine.to_device(train), engine.to_device(meta)
    table = InstanceWeights(args.global_batch, lr=0.3)
    # The instance net over these records (`gap` from the losses the two forwards measure), its last
    # layer made non-zero so that its Jacobian is not degenerate.
    net = InstanceNet(RecordFeatures(full_train["target"].float(), torch.linspace(0, 1, args.global_batch),
                                     full_train["domain"], k), tuple(args.features.split(",")), lr=0.01, seed=args.seed)
    with torch.no_grad():
        net.net[2].weight.copy_(torch.linspace(-1.0, 1.0, net.net[2].weight.numel()).reshape(net.net[2].weight.shape))

    def timed(fn):
        return best_time(fn, args.repeats, info.device)

    (v, _), t_meta = timed(lambda: meta_gradient(engine, meta, "mean_logit", args.meta_loss))
    v_norm = math.sqrt(float(engine.global_dot(v, v)))
    at_theta: list[tuple[torch.Tensor, torch.Tensor]] = []
    (directional, per_record, epsilon), t_fd = timed(
        lambda: finite_difference(engine, v, [train], args.radius, v_norm, k, None, at_theta))
    (rows, dloss_du, losses, predictions), t_gather = timed(
        lambda: instance_update(engine, [train], per_record, at_theta[-1:], None))
    _, t_table = timed(lambda: table.update(rows, dloss_du, losses, predictions))
    net.features.record_losses(rows, losses, predictions)
    hyper_net_fd = net.parameter_gradient(rows, dloss_du.float())  # fp32, as the trainer takes it
    _, t_net = timed(lambda: copy.deepcopy(net).update(rows, dloss_du, losses, predictions))
    # Every rank's (record, d_i): the same all-gather the trainer uses for the table update.
    local = torch.stack([train["record"].cpu().double(), per_record[0].cpu()], dim=1)
    gathered = engine.all_gather(local.to(engine.info.device)).cpu()
    d_fd = torch.zeros(args.global_batch, dtype=torch.float64)
    d_fd[gathered[:, 0].long()] = gathered[:, 1]

    def lower_step():
        loss = per_sample_mse(engine.forward(model_inputs(train)), train["target"]).mean()
        engine.backward(loss)
        engine.step()
    _, t_lower = timed(lower_step)

    summary = {"world_size": world, "global_batch": args.global_batch, "meta_global": args.meta_global,
               "epsilon": epsilon, "v_norm": v_norm, "per_record_fd": d_fd.tolist(),
               "seconds": {"lower_step": t_lower, "meta_gradient": t_meta, "finite_difference": t_fd,
                           "gather_pairs": t_gather, "table_update": t_table, "net_update": t_net},
               "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu"}
    summary["instance_part_over_lower_step"] = (t_fd + t_gather + t_table) / t_lower
    if args.reference and info.rank == 0:
        from benchmarks.fp64_reference import Float64Reference
        ref = Float64Reference(model_dir, args.head, args.seed)
        per_row = dict(full_train, domain=torch.arange(args.global_batch))  # one "domain" per record
        grads = ref.domain_gradients([per_row], args.global_batch)
        d_ref = ref.directional(grads, ref.meta_gradient([full_meta], "mean_logit", args.meta_loss))
        summary["per_record_reference"] = d_ref.tolist()
        summary["cosine_vs_reference"] = cosine(d_fd, d_ref)
        summary["rel_error_vs_reference"] = rel_error(d_fd, d_ref)
        summary["sign_agreement"] = float((torch.sign(d_fd) == torch.sign(d_ref)).double().mean())
        # The net's hypergradient Σ_i (∂u_i/∂φ)^T (-d_i): fp32 from the trainer's d_i against float64
        # from the reference's d_i (rows in record order: the gathered rows are a permutation).
        hyper_net_ref = net.parameter_gradient(torch.arange(args.global_batch), -d_ref, torch.float64)
        summary["net_hypergradient_cosine_vs_reference"] = cosine(hyper_net_fd.double(), hyper_net_ref)
        summary["net_hypergradient_rel_error_vs_reference"] = rel_error(hyper_net_fd.double(), hyper_net_ref)
    if info.rank == 0:
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2))
        s = summary["seconds"]
        print(f"records {args.global_batch} on {world} rank(s): lower step {s['lower_step']:.3f} s; upper: meta "
              f"gradient {s['meta_gradient']:.3f} s, two forwards {s['finite_difference']:.3f} s, gather "
              f"{s['gather_pairs'] * 1e3:.2f} ms, table {s['table_update'] * 1e3:.2f} ms, net "
              f"{s['net_update'] * 1e3:.2f} ms "
              f"(instance part {summary['instance_part_over_lower_step']:.2f}x a lower step)")
        if "cosine_vs_reference" in summary:
            print(f"per-record d_i vs fp64: cosine {summary['cosine_vs_reference']:.6f}, rel. error "
                  f"{summary['rel_error_vs_reference']:.2e}, signs agree {summary['sign_agreement']:.0%}; net "
                  f"hypergradient cosine {summary['net_hypergradient_cosine_vs_reference']:.6f}")
    shutdown()
    return summary


if __name__ == "__main__":
    main()
