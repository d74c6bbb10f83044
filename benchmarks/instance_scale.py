"""Instance weights at scale: memory per rank, and an upper step's update against the table's size.

For tables of 10^5 .. 10^7 records, on every rank of a real process group (gloo on CPU, NCCL with
GPUs), for the per-record table (`--weighting instance|both`) and the instance net
(`instance_net|both_net`): the resident memory it adds, the time of one update (the all-gather of
the global batch's (row, ∂L/∂u, loss, prediction) rows that `dreamprm.bilevel.upper.instance_update` sends,
and `update`: the table's step, or the net's vector-Jacobian product, Adam step and normaliser), the
bytes that all-gather moves, and the O(table) work the trainer does only now and then (the
replicated-state checksum, every --weight_check_every upper steps; the weights for histograms and
the report, at checkpoints and at the end).

    torchrun --standalone --nproc_per_node 2 benchmarks/instance_scale.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dreamprm.bilevel.instance_net import InstanceNet, RecordFeatures  # noqa: E402
from dreamprm.bilevel.instance_weights import InstanceWeights  # noqa: E402
from dreamprm.config import BilevelConfig  # noqa: E402
from dreamprm.distributed.engine import DistributedEngine, init_distributed, shutdown  # noqa: E402


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state_bytes(weights) -> int:
    """Bytes of the tensors the table or the net keeps for the whole run (what RSS cannot isolate:
    the allocator reuses the memory a previous size freed)."""
    if isinstance(weights, InstanceWeights):
        tensors = [weights.logits, weights.visits.loss, weights.visits.prediction]
    else:
        f = weights.features
        tensors = [f.accuracy, f.position, f.domain, f.visits.loss, f.visits.prediction, weights.mean_rows,
                   weights.mean_inputs, *weights.net.parameters()]
        tensors += [t for state in weights.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--local_rows", type=int, default=80, help="records per rank in one upper step (batch x unroll)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kinds", default="table,net")
    p.add_argument("--domains", type=int, default=8)
    p.add_argument("--features", default=BilevelConfig.instance_net_features,
                   help="the net's inputs (default: the trainer's --instance_net_features default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    info = init_distributed("auto")
    # The engine's own all-gather (it needs only the rank layout): the collective the trainer sends.
    gather = SimpleNamespace(info=info)
    rows_out = []
    generator = torch.Generator().manual_seed(info.rank)
    # The first optimizer a process builds imports torch's compiler stack (~75 MB resident, once per
    # process; the trainer has paid it before the table exists): paid here, outside the measurement.
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())
    for size, kind in [(int(s), k) for s in args.sizes.split(",") for k in args.kinds.split(",")]:
        before = resident_bytes()
        if kind == "table":
            table = InstanceWeights(size, lr=0.3)
            table.logits.fill_(0.0)  # touch every page
        else:
            # The static features are the part that grows with the table; the trainer builds them
            # from its records, here they are made up (their values do not change the cost).
            features = RecordFeatures(torch.rand(size), torch.rand(size), torch.randint(0, args.domains, (size,)),
                                      args.domains)
            table = InstanceNet(features, tuple(args.features.split(",")), lr=0.01)
        held = resident_bytes() - before

        def update():
            rows = torch.randint(0, size, (args.local_rows,), generator=generator)
            local = torch.stack([rows.double(), torch.randn(args.local_rows, generator=generator, dtype=torch.float64),
                                 torch.rand(args.local_rows, generator=generator, dtype=torch.float64),
                                 torch.rand(args.local_rows, generator=generator, dtype=torch.float64)], dim=1)
            gathered = DistributedEngine.all_gather(gather, local)
            table.update(gathered[:, 0].long(), gathered[:, 1], gathered[:, 2], gathered[:, 3])

        update_s = timed(update, args.repeats)
        checksum_s = timed(lambda: table.checksum(), 3)
        peak_before = resident_bytes()
        report_s = timed(lambda: table.all_weights(), 3)
        row = {"records": size, "kind": kind, "state_mb": state_bytes(table) / 1e6, "resident_mb_added": held / 1e6, "update_ms": update_s * 1e3,
               "gathered_bytes": args.local_rows * info.world_size * 4 * 8, "checksum_ms": checksum_s * 1e3,
               "weights_for_report_ms": report_s * 1e3,
               "report_transient_mb": max(resident_bytes() - peak_before, 0) / 1e6}
        rows_out.append(row)
        del table
    if info.rank == 0:
        print(f"{info.world_size} rank(s), {args.local_rows} records per rank per upper step")
        print(f"{'records':>10} {'kind':>6} {'state MB':>9} {'RSS +MB':>8} {'update ms':>10} {'gathered B':>11} "
              f"{'checksum ms':>12} {'report ms':>10}")
        for r in rows_out:
            print(f"{r['records']:>10} {r['kind']:>6} {r['state_mb']:>9.1f} {r['resident_mb_added']:>8.1f} {r['update_ms']:>10.3f} "
                  f"{r['gathered_bytes']:>11} {r['checksum_ms']:>12.1f} {r['weights_for_report_ms']:>10.1f}")
        if args.out:
            Path(args.out).write_text(json.dumps({"world_size": info.world_size, "rows": rows_out}, indent=2))
    if dist.is_initialized():
        dist.barrier()
    shutdown()
    return rows_out


if __name__ == "__main__":
    main()
