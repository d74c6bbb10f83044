"""How good is the one-step hypergradient? Against the true hypergradient of a K-step unrolled
inner loop (SGD), computed with `higher` on the tiny PRM in float64.

For each K: start from the same parameters and domain logits a, run K SGD steps of the weighted
training loss on K fixed batches, take the meta loss at θ_K and differentiate through the whole
unroll with respect to a (exact, by `higher`). Beside it, the estimate the trainer uses after a
segment: -J^T d with d_k = ⟨∂(S_k/N)/∂θ, ∂L_meta/∂θ⟩ at θ_K on the segment's last batch.
Prints the cosine between the two per K (scale differs by the inner learning rate; cosine does not).

    python benchmarks/unroll_fidelity.py --ks 1,2,5,10 --out unroll.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import higher  # noqa: E402
import torch  # noqa: E402

from benchmarks.fp64_reference import (chain_logits, hypergradient, keep_float64, meta_loss,  # noqa: E402
                                       per_sample_loss)
from benchmarks.hypergrad_fidelity import cosine  # noqa: E402
from dreamprm.config import DEMO_DIR  # noqa: E402
from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset  # noqa: E402
from dreamprm.data.records import domain_index, load_meta_records, load_train_records  # noqa: E402
from dreamprm.model.loading import build_prm  # noqa: E402
from dreamprm.model.processor import load_processor  # noqa: E402


def as_double(batch: dict) -> dict:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


def domain_weights(logits: torch.Tensor) -> torch.Tensor:
    """w = softplus(a) / mean softplus(a), written out."""
    s = torch.log1p(torch.exp(logits))
    return s / s.mean()


def chain_meta_loss(step_logits: torch.Tensor, meta: dict) -> torch.Tensor:
    """The original objective (mse over mean-logit chain scores), from the reference's definitions."""
    return meta_loss(chain_logits(step_logits, meta["item_index"], "mean_logit"), meta["target"], "mse")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward_model", default=None, help="model directory (default: build the tiny model)")
    p.add_argument("--ks", default="1,2,5,10")
    p.add_argument("--inner_lr", type=float, default=0.05)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--meta_batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model_dir = args.reward_model
    if model_dir is None:
        import tempfile

        from dreamprm.model.tiny import build_tiny_qwen2vl
        model_dir = str(build_tiny_qwen2vl(Path(tempfile.mkdtemp()) / "tiny"))
    processor = load_processor(model_dir)
    collate = PRMCollator(processor)
    train = load_train_records(DEMO_DIR / "train.json")
    domains = domain_index(train)
    train_set = TrainDataset(train, domains)
    meta_set = MetaDataset(load_meta_records(DEMO_DIR / "meta.json"))
    generator = torch.Generator().manual_seed(args.seed)
    ks = [int(k) for k in args.ks.split(",")]
    batches = [as_double(collate([train_set[int(i)] for i in torch.randperm(len(train_set), generator=generator)[:args.batch_size]]))
               for _ in range(max(ks))]
    meta = as_double(collate([meta_set[i] for i in range(args.meta_batch_size)]))
    # away from a = 0, where the normalisation Jacobian is degenerate in one direction
    logits = (torch.randn(len(domains), generator=generator, dtype=torch.float64) * 0.3).requires_grad_(True)
    k_domains = len(domains)
    results = []
    for k in ks:
        # eager attention: SDPA's CPU kernel has no double backward, which the unroll needs
        model = build_prm(model_dir, "logits", seed=args.seed, dtype=torch.float64, attn_implementation="eager")
        params = [q for q in model.parameters() if q.requires_grad]
        inputs = set(inspect.signature(type(model).forward).parameters) - {"self"}

        def model_inputs(batch: dict) -> dict:
            return {key: value for key, value in batch.items() if key in inputs}
        t0 = time.perf_counter()
        float64 = keep_float64()  # HF's float32 casts (RMSNorm, rotary, eager softmax) become float64
        float64.__enter__()
        inner = torch.optim.SGD(params, lr=args.inner_lr)
        with higher.innerloop_ctx(model, inner, copy_initial_weights=True) as (fmodel, diffopt):
            for step in range(k):
                b = batches[step]
                per_sample = per_sample_loss(fmodel(**model_inputs(b)), b["target"])
                diffopt.step((domain_weights(logits)[b["domain"]] * per_sample).sum() / per_sample.numel())
            true_grad = torch.autograd.grad(chain_meta_loss(fmodel(**model_inputs(meta)), meta), logits)[0]
            final = [q.detach() for q in fmodel.parameters(time=-1)]
        t_true = time.perf_counter() - t0
        # The trainer's one-step estimate at θ_K on the last batch.
        with torch.no_grad():
            for q, value in zip(params, final):
                q.copy_(value)
        v = torch.autograd.grad(chain_meta_loss(model(**model_inputs(meta)), meta), params)
        last = batches[k - 1]
        per_sample = per_sample_loss(model(**model_inputs(last)), last["target"])
        sums = [per_sample[last["domain"] == j].sum() for j in range(k_domains)]
        d = torch.stack([sum((g * vv).sum() for g, vv in zip(
            torch.autograd.grad(sums[j] / last["target"].numel(), params, retain_graph=True, allow_unused=True), v)
            if g is not None) if sums[j] != 0 else torch.zeros((), dtype=torch.float64) for j in range(k_domains)])
        float64.__exit__(None, None, None)
        estimate = hypergradient(d.detach(), logits)
        row = {"K": k, "cosine": cosine(estimate, true_grad), "true": true_grad.tolist(), "one_step": estimate.tolist(),
               "seconds_true": t_true}
        results.append(row)
        print(f"K={k:>3}  cosine(one-step estimate, true K-step hypergradient) = {row['cosine']:+.4f}  "
              f"({t_true:.1f} s for the unrolled reference)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"inner_lr": args.inner_lr, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
