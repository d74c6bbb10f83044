#!/usr/bin/env python
"""Why did the domain weights move? Replays the gated domain-logit optimiser on what a run logged.

A DreamPRM run logs, every upper step, the hypergradient of each domain logit (`hypergrad/<domain>`)
and the meta loss (`meta/loss`). The optimiser's update depends on nothing else, so feeding the same
sequence to `SignalGatedSGD` (with the run's --meta_lr, --meta_beta, --meta_weight_decay) gives its
gates and weights again, with the evidence factor (--meta_evidence: the gate waits for a meta loss
below chance) and without it (the gate of the hypergradient alone, the default). The weights' own effect on the
later hypergradients is not replayed: the sequence is the one the run saw.

Per run it prints: the meta loss (mean and its standard error over the last --last upper steps,
and how many standard errors below chance), and per domain the hypergradient's per-step SNR, its lag-1
and lag-2 autocorrelations (the hypergradient gate counts successive steps as independent; positive
autocorrelation makes its n_eff too large by about (1+ρ)/(1-ρ)), the final gate of each replay and
the final weights of each replay beside the logged ones.

    python benchmarks/quality/gate_replay.py runs/quality/<time>/noise/runs/pairwise-s0 [...] --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import torch  # noqa: E402

from dreamprm.bilevel.meta_optimizer import SignalGatedSGD  # noqa: E402
from dreamprm.losses import META_LOSS_CHANCE  # noqa: E402
from dreamprm.metrics import read_scalars  # noqa: E402


def autocorrelation(x: list[float], lag: int) -> float:
    mean = statistics.fmean(x)
    centred = [v - mean for v in x]
    denominator = sum(v * v for v in centred)
    return sum(a * b for a, b in zip(centred, centred[lag:])) / denominator if denominator > 0 else float("nan")


def replay(hyper: torch.Tensor, losses: list[float | None], bilevel: dict, chance: float | None,
           confidence: float) -> dict:
    """The optimiser fed the logged sequence from uniform weights: final weights and gates, and the
    share of steps where each domain's gate was open (> 0)."""
    logits = torch.nn.Parameter(torch.zeros(hyper.shape[1], dtype=torch.float64))
    optimizer = SignalGatedSGD([logits], lr=bilevel["meta_lr"], beta=bilevel["meta_beta"],
                               weight_decay=bilevel["meta_weight_decay"], chance=chance, confidence=confidence)
    open_steps = torch.zeros(hyper.shape[1], dtype=torch.float64)
    first_evidence = None
    for t, (h, loss) in enumerate(zip(hyper, losses)):
        logits.grad = h.clone()
        optimizer.step(lambda: loss)
        open_steps += (optimizer.state[logits]["gate"] > 0).double()
        if chance is not None and first_evidence is None and optimizer.state["meta_evidence"].get("evidence", 0) > 0:
            first_evidence = t + 1
    softplus = torch.nn.functional.softplus(logits.detach())
    return {"weights": (softplus / softplus.mean()).tolist(), "gate": optimizer.state[logits]["gate"].tolist(),
            "open_share": (open_steps / len(losses)).tolist(), "first_evidence_step": first_evidence}


def analyse(run: Path, last: int, confidence: float) -> dict:
    config = json.loads((run / "config.json").read_text())
    bilevel = config["bilevel"]
    domains = list(json.loads((run / "domains.json").read_text()))
    scalars = read_scalars(run / "tb")
    hyper = torch.tensor([[v for _, v in scalars[f"hypergrad/{d}"]] for d in domains], dtype=torch.float64).T
    # A meta batch without a right-wrong pair is no evidence (as in the trainer). The trainer logs no
    # meta loss for it (runs from before 2026-12-04 logged 0 with a zero hypergradient).
    logged = dict(scalars["meta/loss"])
    upper_steps = [step for step, _ in scalars[f"hypergrad/{domains[0]}"]]
    steps = [None if logged.get(step) is None or (logged[step] == 0 and not bool(h.any())) else logged[step]
             for step, h in zip(upper_steps, hyper)]
    losses = [v for v in steps if v is not None]
    chance = META_LOSS_CHANCE[bilevel["meta_loss"]]
    tail = losses[-last:]
    se = statistics.stdev(tail) / math.sqrt(len(tail))
    out = {"run": str(run), "upper_steps": len(steps), "steps_without_pairs": len(steps) - len(losses),
           "meta_loss": bilevel["meta_loss"], "chance": chance,
           "meta_loss_all": statistics.fmean(losses), "meta_loss_last": statistics.fmean(tail), "meta_loss_last_se": se,
           "z_below_chance_last": (chance - statistics.fmean(tail)) / se if se > 0 else float("nan"),
           "logged_weights": {d: scalars[f"domain_weight/{d}"][-1][1] for d in domains}, "domains": {}}
    without = replay(hyper, steps, bilevel, None, confidence)
    with_evidence = replay(hyper, steps, bilevel, chance, confidence)
    out["first_evidence_step"] = with_evidence["first_evidence_step"]
    for i, d in enumerate(domains):
        h = hyper[:, i].tolist()
        out["domains"][d] = {
            "snr": statistics.fmean(h) / statistics.stdev(h), "lag1": autocorrelation(h, 1), "lag2": autocorrelation(h, 2),
            "gate_without": without["gate"][i], "gate_with": with_evidence["gate"][i],
            "open_share_without": without["open_share"][i], "open_share_with": with_evidence["open_share"][i],
            "weight_without": without["weights"][i], "weight_with": with_evidence["weights"][i],
            "weight_logged": out["logged_weights"][d]}
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (--weights_path of DreamPRM runs: config.json, domains.json, tb/)")
    p.add_argument("--last", type=int, default=20, help="upper steps at the end whose meta loss is averaged")
    p.add_argument("--confidence", type=float, default=2.0, help="the replay's --meta_evidence")
    p.add_argument("--json", default=None, help="write the numbers here too")
    args = p.parse_args(argv)
    results = [analyse(Path(run), args.last, args.confidence) for run in args.runs]
    for r in results:
        print(f"{r['run']}: {r['upper_steps']} upper steps ({r['steps_without_pairs']} without a pair); meta loss "
              f"({r['meta_loss']}, chance {r['chance']:.3f}) "
              f"{r['meta_loss_all']:.3f} over the run, {r['meta_loss_last']:.3f} ± {r['meta_loss_last_se']:.3f} over the "
              f"last {args.last} ({r['z_below_chance_last']:+.1f} SE below chance); evidence first open at upper step "
              f"{r['first_evidence_step']} (--meta_evidence {args.confidence:g})")
        print(f"{'domain':>12} {'SNR':>6} {'lag1':>6} {'lag2':>6} {'open w/o':>8} {'open w/':>8} "
              f"{'weight w/o':>10} {'weight w/':>10} {'logged':>7}")
        for d, x in r["domains"].items():
            print(f"{d:>12} {x['snr']:>+6.2f} {x['lag1']:>+6.2f} {x['lag2']:>+6.2f} {x['open_share_without']:>8.2f} "
                  f"{x['open_share_with']:>8.2f} {x['weight_without']:>10.2f} {x['weight_with']:>10.2f} "
                  f"{x['weight_logged']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
