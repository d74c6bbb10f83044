"""The float64 reference for the hypergradient, sharing no loss or Jacobian code with what it checks.

Everything the trainer computes through `dreamprm.losses`, `dreamprm.bilevel.aggregation` and
`dreamprm.bilevel.domain_weights` is written out again here from its definition: the per-sample
loss (sigmoid(z) - accuracy)^2, the chain logits of every aggregation, both meta objectives, and
the Jacobian J = ∂w/∂a of w = softplus(a) / mean softplus(a). Only the model is shared (it is
what the gradients are taken of): `dreamprm.model.loading.build_prm` in float64.

The whole computation stays in float64, forward and backward: Hugging Face's Qwen2-VL casts to
float32 inside RMSNorm, the rotary embeddings and eager softmax, and the PRM's head returns
`.float()`; `keep_float64()` turns every such cast (and every float32 `dtype=` argument) into
float64 (the default dtype is float64 meanwhile), and `Float64Audit` fails the reference if any operation, forward or backward, still
produced a tensor in another floating dtype. `tests/test_hypergradient.py` checks both.

    d_k = ⟨∂(S_k/N)/∂θ, ∂L_meta/∂θ⟩,   hypergradient = -J^T d
"""
from __future__ import annotations

import collections
import inspect
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
_CASTS_TO_LOW = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)


class KeepFloat64(TorchFunctionMode):
    """Casts to a low-precision float become float64 (above autograd, so gradients follow)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") in LOW_PRECISION:
            kwargs["dtype"] = torch.float64
        if func in _CASTS_TO_LOW:
            return args[0].to(torch.float64)
        if func in (torch.Tensor.to, torch.Tensor.type):
            args = tuple(torch.float64 if a in LOW_PRECISION else a for a in args)
        return func(*args, **kwargs)


class Float64Audit(TorchDispatchMode):
    """Counts the operations (forward and backward, below autograd) whose floating outputs are not float64."""

    def __init__(self) -> None:
        super().__init__()
        self.offenders: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.offenders[f"{func} -> {t.dtype}"] += 1
        return out

    def check(self) -> None:
        if self.offenders:
            raise AssertionError(f"the fp64 reference left float64: {dict(self.offenders)}")


@contextmanager
def keep_float64() -> Iterator[Float64Audit]:
    audit = Float64Audit()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e.g. integer positions x 1.0 inside the rotary index
    try:
        with KeepFloat64(), audit:
            yield audit
    finally:
        torch.set_default_dtype(default)
    audit.check()


# ---------------------------------------------------------------- definitions, written out
def sigmoid(z: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-z))


def per_sample_loss(step_logits: torch.Tensor, accuracy: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """For every scored step prefix: 'mse' (sigmoid(z) - Monte Carlo accuracy)^2; 'bce' (the generative
    head's default) -[y log p + (1 - y) log(1 - p)], p = sigmoid(z) = P(+) over {+, -}, y the accuracy."""
    if loss == "mse":
        return (sigmoid(step_logits) - accuracy) ** 2
    if loss == "bce":
        p = sigmoid(step_logits)
        return -(accuracy * torch.log(p) + (1.0 - accuracy) * torch.log(1.0 - p))
    raise ValueError(f"unknown lower loss {loss!r}")


def chain_logits(step_logits: torch.Tensor, chain_index: torch.Tensor, aggregation: str) -> torch.Tensor:
    """One logit per chain, chain by chain: the mean of the step logits, or the logit of an aggregate
    of the step probabilities."""
    chains = []
    for c in range(int(chain_index.max()) + 1):
        z = step_logits[chain_index == c]
        s = sigmoid(z)
        p = {"mean_logit": None, "mean": s.mean(), "min": s.min(), "max": s.max(), "product": s.prod(),
             "last": s[-1]}[aggregation]
        chains.append(z.mean() if p is None else torch.log(p) - torch.log(1.0 - p))
    return torch.stack(chains)


def meta_loss(chain_z: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """mse: mean over chains of (sigmoid(z) - label)^2; pairwise: mean over (right, wrong) pairs,
    taken pair by pair, of -log sigmoid(z_right - z_wrong)."""
    if objective == "mse":
        return ((sigmoid(chain_z) - labels) ** 2).mean()
    terms = [-torch.log(sigmoid(chain_z[i] - chain_z[j]))
             for i in range(len(labels)) for j in range(len(labels)) if labels[i] > 0.5 and labels[j] <= 0.5]
    return torch.stack(terms).mean() if terms else chain_z.sum() * 0.0


def weight_jacobian(logits: torch.Tensor) -> torch.Tensor:
    """J[k, j] = ∂w_k/∂a_j for w = s / mean(s), s = softplus(a):  σ(a_j) (δ_kj / m - s_k / (K m²))."""
    a = logits.detach().double()
    s, slope, k = torch.log1p(torch.exp(a)), sigmoid(a), a.numel()
    m = s.mean()
    return torch.diag(slope / m) - torch.outer(s, slope) / (k * m * m)


def hypergradient(directional: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """∂L_meta/∂a ≈ -J^T d."""
    return -weight_jacobian(logits).T @ directional.double()


# ---------------------------------------------------------------- the model, in float64
class Float64Reference:
    """The PRM in float64 without DeepSpeed; gradients by plain autograd, every one audited.

    Batches are lists of collated batches (e.g. every rank's local batch of a segment): the training
    loss is the sum over all of them divided by their total count, the meta objective is taken over
    the chains of all of them together, as the trainer does across ranks."""

    def __init__(self, model_dir: str, head: str, seed: int, loss: str = "mse", device: str | torch.device = "cpu") -> None:
        from dreamprm.model.loading import build_prm
        self.loss = loss  # the lower-level loss: 'mse', or the generative head's 'bce'
        self.device = torch.device(device)
        # SDPA takes the packed rows' per-token masks; in float64 it takes its math path, in float64.
        self.model = build_prm(model_dir, head, seed=seed, dtype=torch.float64,
                               attn_implementation="sdpa").to(self.device).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.inputs = set(inspect.signature(type(self.model).forward).parameters) - {"self"}

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: (v.double() if v.is_floating_point() else v).to(self.device) for k, v in batch.items()
                             if k in self.inputs})

    def _gradients(self, losses: Callable[[], list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        with keep_float64():
            values = losses()
            out = []
            for i, value in enumerate(values):
                grads = torch.autograd.grad(value, self.params, retain_graph=i < len(values) - 1, allow_unused=True)
                out.append([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)])
        return out

    def meta_gradient(self, meta_batches: list[dict], aggregation: str, objective: str) -> list[torch.Tensor]:
        def loss() -> list[torch.Tensor]:
            z = torch.cat([chain_logits(self.logits(b), b["item_index"], aggregation) for b in meta_batches])
            labels = torch.cat([b["target"].double() for b in meta_batches]).to(self.device)
            return [meta_loss(z, labels, objective)]
        return self._gradients(loss)[0]

    def domain_gradients(self, train_batches: list[dict], num_domains: int) -> list[list[torch.Tensor]]:
        """∂(S_k/N)/∂θ for every k, N the count over all the batches."""
        return self._gradients(lambda: self._domain_losses(train_batches, num_domains))

    def _domain_losses(self, train_batches: list[dict], num_domains: int) -> list[torch.Tensor]:
        """S_k/N for every k, N the count over all the batches (one forward)."""
        n = sum(b["target"].numel() for b in train_batches)
        per_batch = [(per_sample_loss(self.logits(b), b["target"].double().to(self.device), self.loss),
                      b["domain"].to(self.device)) for b in train_batches]
        return [sum(loss[domain == k].sum() for loss, domain in per_batch) / n for k in range(num_domains)]

    def domain_directionals(self, train_batches: list[dict], num_domains: int,
                            vs: list[list[torch.Tensor]]) -> torch.Tensor:
        """[len(vs), K]: ⟨∂(S_k/N)/∂θ, v⟩ for each v, one domain gradient in memory at a time (a 2B
        model's K gradients in float64 do not fit beside it on one GPU)."""
        with keep_float64():
            values = self._domain_losses(train_batches, num_domains)
            columns = []
            for k, value in enumerate(values):
                grads = torch.autograd.grad(value, self.params, retain_graph=k < len(values) - 1, allow_unused=True)
                columns.append(torch.stack([self._dot(grads, v) for v in vs]))
                del grads
        return torch.stack(columns, dim=1).cpu()

    @staticmethod
    def _dot(grads, v: list[torch.Tensor]) -> torch.Tensor:
        """⟨grads, v⟩ over all parameters (a parameter without a gradient adds nothing)."""
        return sum((g * x).sum() for g, x in zip(grads, v) if g is not None)

    @staticmethod
    def directional(domain_grads: list[list[torch.Tensor]], v: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([Float64Reference._dot(gk, v) for gk in domain_grads])
