"""Probes of the real Trainer on real ZeRO-3 ranks, driven from the test side.

    torchrun --nproc_per_node 2 tests/trainer_probe.py OUT_DIR PROBES <launch/train.py flags>

Builds `dreamprm.trainer.Trainer` from the flags exactly as launch/train.py does, then runs the
named probes (comma-separated, in this order) on the trainer's own methods; each rank writes
OUT_DIR/rank_<r>.json (numbers) and OUT_DIR/rank_<r>.pt (its batches). Nothing in dreamprm is
changed; the probes only replace the trainer's data streams and its domain weights by fixed values
and record what its methods compute (tests/test_trainer_paths.py checks the records).

* ``upper``: domain logits set to fixed non-zero values (same on every rank); two training
  micro-batches and the meta batch come from the trainer's own streams; `Trainer.run_upper_step`
  (the trainer's `upper_step` with its flags: --hypergrad, --fd_radius, --aggregation, ...) runs
  once. Recorded: d and the hypergradient it computed, the batches (for the fp64 reference), and
  whether the parameters came back bit for bit: every ZeRO-3 partition, the fp32 master partitions
  and the scores of a forward before and after.
* ``lower``: the domain weights replaced by fixed values, one of them 0; one `Trainer.lower_step`
  on fixed micro-batches (--gradient_accumulation of them); the gradient the engine holds when the
  trainer calls the optimiser step is captured and compared with sum_m sum_k w_k ∂(S_mk/n_m)/∂θ / M,
  each domain's gradient taken by its own backward pass of a loss written here.
* ``lower_instance`` (--weighting both/both_net): as ``lower``, with a non-uniform instance table or net
  (one `update` from a fixed signal): the captured gradient against sum_i w_k(i) u_i ∂ℓ_i/∂θ, u_i from
  `all_weights()`.
* ``instance_upper``: two `run_upper_step`s; each rank saves its instance state (the test compares them).
* ``warmup``: three segments of `Trainer.train_segment` from step 0 (with --meta_warmup_steps).
* ``checksum``: rank 1's domain logits nudged by 1e-6; `run_upper_step` (with
  --weight_check_every 1) must raise on every rank.
* ``bad_upper``: a NaN in the meta loss of rank 0 at the next --max_bad_steps upper steps
  (tests/inject_faults.py's plan); the last one must stop with TrainingAborted after a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

FIXED_LOGITS = [0.4, -0.6, 0.9, -0.2, 0.1, 0.3, -0.4, 0.7]  # first K used
FIXED_WEIGHTS = [0.0, 1.5, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0]  # first K used, renormalised to mean 1 but the 0


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def parameter_state(trainer) -> list[torch.Tensor]:
    """Every rank-local copy of the parameters the upper step may edit: the ZeRO-3 partitions (the
    16/32-bit working copies) and the optimiser's fp32 master partitions."""
    engine = trainer.engine
    out = [p.ds_tensor.detach().clone() if hasattr(p, "ds_tensor") else p.detach().clone()
           for p in engine.module.parameters()]
    inner = engine.module_engine.optimizer
    out += [t.detach().clone() for t in getattr(inner, "fp32_partitioned_groups_flat", [])]
    return out


def probe_upper(trainer, record: dict, saved: dict) -> None:
    import dreamprm.trainer as trainer_module
    k = len(trainer.domains)
    with torch.no_grad():
        trainer.domain_weights.logits.copy_(torch.tensor(FIXED_LOGITS[:k], dtype=torch.float64))
    batches = [trainer.engine.to_device(trainer.train_batches.next()) for _ in range(2)]
    meta_seen, results = [], []
    next_meta = trainer.meta_batches.next

    def recording_meta_batch():
        batch = next_meta()
        meta_seen.append(batch)
        return batch

    real_upper_step = trainer_module.upper_step

    def recording_upper_step(*args, **kwargs):
        result = real_upper_step(*args, **kwargs)
        results.append(result)
        return result

    from dreamprm.model.prm import model_inputs
    with torch.no_grad():
        scores_before = trainer.engine.forward(model_inputs(batches[0])).detach().clone()
    before = parameter_state(trainer)
    trainer.meta_batches.next, trainer_module.upper_step = recording_meta_batch, recording_upper_step
    try:
        trainer.run_upper_step(batches)
    finally:
        trainer_module.upper_step = real_upper_step
        del trainer.meta_batches.next
    after = parameter_state(trainer)
    with torch.no_grad():
        scores_after = trainer.engine.forward(model_inputs(batches[0])).detach().clone()
    (result,) = results
    record["upper"] = {
        "directional": result.directional.tolist(), "hypergradient": result.hypergradient.tolist(),
        "epsilon": result.epsilon, "v_norm": result.v_norm, "applied": result.applied, "logits_before": FIXED_LOGITS[:k],
        "parameters_restored_bit_exactly": all(torch.equal(a, b) for a, b in zip(before, after)),
        "parameter_tensors_compared": len(before),
        "scores_equal_after": bool(torch.equal(scores_before, scores_after)),
        "local_counts": [int(b["target"].numel()) for b in batches],
    }
    saved["train_batches"] = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    saved["meta_batches"] = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in meta_seen]


def domain_loss(logits: torch.Tensor, batch: dict, k: int) -> torch.Tensor:
    """S_k / n of one micro-batch, written here: sum over its domain-k rows of (sigmoid(z) - accuracy)^2."""
    squared = (1.0 / (1.0 + torch.exp(-logits.float())) - batch["target"].float()) ** 2
    return (squared * (batch["domain"] == k).float()).sum() / batch["target"].numel()


def probe_lower(trainer, record: dict) -> None:
    from dreamprm.model.prm import model_inputs
    engine, k = trainer.engine, len(trainer.domains)
    micro = engine.gradient_accumulation_steps()
    batches = []
    while len(batches) < micro:  # each micro-batch holds domain 0 (the weight-0 domain) and another one
        batch = trainer.train_batches.next()
        if (batch["domain"] == 0).any() and (batch["domain"] != 0).any():
            batches.append(batch)
    weights = torch.tensor(FIXED_WEIGHTS[:k], dtype=torch.float64)
    weights[1:] *= k / float(weights[1:].sum())  # mean 1 over the K domains, domain 0 at exactly 0
    # Each domain's gradient of each micro-batch at the current parameters (averaged over ranks by
    # DeepSpeed, not scaled for accumulation).
    per_domain = []
    for batch in batches:
        device_batch = engine.to_device(batch)
        rows = []
        for d in range(k):
            logits = engine.forward(model_inputs(device_batch))
            rows.append(flat(engine.backward_without_step(domain_loss(logits, device_batch, d))))
        per_domain.append(rows)
    expected = sum(sum(float(weights[d]) * rows[d] for d in range(k)) for rows in per_domain) / micro
    uniform = sum(sum(rows) for rows in per_domain) / micro
    domain0 = sum(rows[0] for rows in per_domain) / micro
    got, step_calls = stepped_gradient(trainer, batches, weights)
    sums = torch.stack([(got - expected).pow(2).sum(), expected.pow(2).sum(), (uniform - expected).pow(2).sum(),
                        domain0.pow(2).sum(), (got - uniform).pow(2).sum()])
    sums = engine.all_reduce_sum(sums.to(trainer.info.device)).cpu()  # norms over every rank's shard
    record["lower"] = {
        "weights": weights.tolist(), "micro_batches": micro, "step_calls": step_calls,
        "rel_error": math.sqrt(sums[0] / sums[1]),
        "uniform_vs_expected": math.sqrt(sums[2] / sums[1]),
        "domain0_share": math.sqrt(sums[3] / sums[1]),
        "rel_error_vs_uniform": math.sqrt(sums[4] / sums[1]),
    }


def stepped_gradient(trainer, batches: list, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the gradient the engine steps with, how many steps) of one `Trainer.lower_step` on `batches`
    with the domain weights fixed to `weights`."""
    engine, captured = trainer.engine, []
    real_step = engine.step

    def capturing_step():
        captured.append(flat(engine.owned_gradients()))
        real_step()

    stream = iter(batches)
    trainer.train_batches.next = lambda: next(stream)
    trainer.domain_weights.forward = lambda: weights.clone()
    engine.step = capturing_step
    try:
        trainer.lower_step()
    finally:
        del engine.step, trainer.domain_weights.forward, trainer.train_batches.next
    return captured[-1], len(captured)


def fixed_instance_state(trainer) -> None:
    """Non-uniform instance weights, the same on every rank: one update of the table or the net, through
    its own `update`, from a fixed signal over every record."""
    rows = torch.arange(len(trainer.instance_weights))
    trainer.instance_weights.update(rows, torch.cos(rows.double() * 1.7), (rows % 7).double() / 10.0)


def probe_lower_instance(trainer, record: dict) -> None:
    """One `Trainer.lower_step` with fixed domain weights and a non-uniform instance table or net: the
    gradient at the optimiser step must be sum_m sum_i w_k(i) u_i ∂ℓ_i/∂θ / (n_m M), with u_i read from
    `all_weights()` (the report's values) and the loss written here."""
    from dreamprm.model.prm import model_inputs
    engine, k = trainer.engine, len(trainer.domains)
    fixed_instance_state(trainer)
    table = trainer.instance_weights.all_weights().double()
    micro = engine.gradient_accumulation_steps()
    batches = [trainer.train_batches.next() for _ in range(micro)]
    weights = torch.tensor(FIXED_WEIGHTS[1:k + 1], dtype=torch.float64)
    weights *= k / float(weights.sum())

    def gradient(per_sample_weight) -> torch.Tensor:
        total = 0
        for batch in batches:
            device_batch = engine.to_device(batch)
            logits = engine.forward(model_inputs(device_batch))
            squared = (1.0 / (1.0 + torch.exp(-logits.float())) - device_batch["target"].float()) ** 2
            factor = per_sample_weight(batch).float().to(squared.device)
            total = total + flat(engine.backward_without_step((squared * factor).sum() / batch["target"].numel()))
        return total / micro

    expected = gradient(lambda b: weights[b["domain"]] * table[b["record"]])
    domain_only = gradient(lambda b: weights[b["domain"]])
    got, step_calls = stepped_gradient(trainer, batches, weights)
    sums = torch.stack([(got - expected).pow(2).sum(), expected.pow(2).sum(), (domain_only - expected).pow(2).sum()])
    sums = engine.all_reduce_sum(sums.to(trainer.info.device)).cpu()
    used = torch.cat([table[b["record"]] for b in batches])
    record["lower_instance"] = {"rel_error": math.sqrt(sums[0] / sums[1]),
                                "domain_only_vs_expected": math.sqrt(sums[2] / sums[1]),
                                "instance_weights_used": used.tolist()}


def probe_instance_upper(trainer, record: dict, saved: dict) -> None:
    """Two `Trainer.run_upper_step`s with the instance table or net: each rank saves its own state, so
    the test compares the ranks' states directly (not through the trainer's checksum guard)."""
    fixed_instance_state(trainer)
    batches = [trainer.engine.to_device(trainer.train_batches.next()) for _ in range(2)]
    before = trainer.instance_weights.all_weights()
    for _ in range(2):
        trainer.run_upper_step(batches)
    after = trainer.instance_weights.all_weights()
    record["instance_upper"] = {"upper_steps": trainer.state.upper_steps,
                                "records_moved": int((after != before).sum()),
                                "records": [int(r) for b in batches for r in b["record"]]}
    saved["instance_state"] = trainer.instance_weights.state_dict()
    saved["instance_weights"] = after
    saved["train_batches"] = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def probe_warmup(trainer, record: dict) -> None:
    """Segments of the real loop from step 0 under --meta_warmup_steps: upper steps counted after each."""
    counts = []
    for _ in range(3):
        trainer.train_segment()
        counts.append([trainer.state.step, trainer.state.upper_steps])
    record["warmup"] = {"step_and_upper_steps": counts}


def probe_checksum(trainer, record: dict, saved: dict) -> None:
    logits = trainer.domain_weights.logits
    keep = logits.detach().clone()
    if trainer.info.rank == 1:
        with torch.no_grad():
            logits[0] += 1e-6
    batches = [trainer.engine.to_device(b) for b in saved["train_batches"]]
    try:
        trainer.run_upper_step(batches)
        record["checksum"] = {"raised": None}
    except RuntimeError as err:
        record["checksum"] = {"raised": str(err)}
    with torch.no_grad():
        logits.copy_(keep)


def probe_bad_upper(trainer, record: dict, saved: dict) -> None:
    from inject_faults import install
    from dreamprm.trainer import TrainingAborted
    limit = trainer.config.run.max_bad_steps
    first = trainer.state.upper_steps + 1
    install({"lower": set(), "upper": set(range(first, first + limit))})
    before = trainer.domain_weights.logits.detach().clone()
    instance_before = None if trainer.instance_weights is None else trainer.instance_weights.all_weights()
    batches = [trainer.engine.to_device(b) for b in saved["train_batches"]]
    out = {"raised": None, "calls": 0}
    for _ in range(limit):
        out["calls"] += 1
        try:
            trainer.run_upper_step(batches)
        except TrainingAborted as err:
            out["raised"] = str(err)
            break
    out["logits_unchanged"] = bool(torch.equal(before, trainer.domain_weights.logits.detach()))
    out["skipped_upper"] = trainer.state.skipped_upper
    if instance_before is not None:
        out["instance_unchanged"] = bool(torch.equal(instance_before, trainer.instance_weights.all_weights()))
    record["bad_upper"] = out


def main() -> int:
    out_dir, probes, argv = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    from dreamprm.config import parse_args
    from dreamprm.distributed.engine import init_distributed, shutdown
    from dreamprm.preemption import StopRequest
    from dreamprm.trainer import Trainer
    config = parse_args(argv)
    info = init_distributed(config.run.device, timeout_s=config.run.dist_timeout)
    trainer = Trainer(config, info, StopRequest())
    record: dict = {"rank": info.rank, "world_size": info.world_size, "domains": trainer.domains,
                    "precision": config.optim.precision}
    saved: dict = {}
    for name in probes:
        {"upper": lambda: probe_upper(trainer, record, saved), "lower": lambda: probe_lower(trainer, record),
         "checksum": lambda: probe_checksum(trainer, record, saved),
         "bad_upper": lambda: probe_bad_upper(trainer, record, saved),
         "lower_instance": lambda: probe_lower_instance(trainer, record),
         "instance_upper": lambda: probe_instance_upper(trainer, record, saved),
         "warmup": lambda: probe_warmup(trainer, record)}[name]()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank_{info.rank}.json").write_text(json.dumps(record, indent=1))
    torch.save(saved, out_dir / f"rank_{info.rank}.pt")
    trainer.logger.close()
    shutdown(clean=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
