"""Instance net (`--weighting instance_net|both_net`): a record's weight from its features.

DreamPRM-1.5's answer to a table that sees each record once or twice per run: a small network maps
per-record features to a weight, so an update learned on the records of one upper step moves the
weight of every record that looks like them, visited or not.

    u_i = s(f_i; φ) / M,   s = softplus(MLP_φ(f_i)),   M = mean_j s(f_j; φ)

Features (`--instance_net_features`, a comma list; each is cheap for the trainer):

    mc        the record's Monte Carlo accuracy (its training target)
    gap       sqrt(ℓ_i), the record's lower loss: |MC accuracy - PRM prediction| for the MSE loss (for
              the generative head's cross-entropy it grows with the same mismatch); ℓ_i measured by the
              two forwards of the upper step that last visited the record (their mean ≈ ℓ_i(θ)); a
              record not yet visited takes the mean over the visited ones
    position  step index / the chain's last step index (0 without a chain id)
    domain    one-hot of the record's domain

The default is gap,position,domain. The feature ablation on the benchmark's task with hidden corrupted
records (benchmarks/quality/RESULTS_instance_net.md, working seeds 1-3): without gap the AUC fell to
0.73, without domain to 0.68-0.84, without position it moved either way, and without mc it rose in
every seed (+0.015, +0.017, +0.039): mc is the training target itself, and the net fitted noise
through it.

Every feature is replicated state: the static ones come from the training file, the losses from the
upper step's all-gather. So `weights(rows)` is a function of replicated state only, equal to
`all_weights()[rows]` (up to float32 rounding: a matmul's blocking depends on its row count), and
identical on every rank (which all compute the same rows).

The net's last layer starts at zero: every weight is 1 until the first update (a cold start equal to
vanilla). M is the mean over the whole table up to `EXACT_MEAN_ROWS` records; above, over a fixed
subsample of that many rows (the same on every rank), so an upper step costs O(global batch +
EXACT_MEAN_ROWS), not O(table).

Hypergradient. The lower loss depends on φ only through the u_i, and ∂L_train/∂u_i = c_i ℓ_i / N, so
as for the table (docs/hypergradient.md) ∂L_meta/∂u_i ≈ -c_i d_i with d_i = <∇ℓ_i, v>/N from the
finite difference, and

    ∂L_meta/∂φ ≈ Σ_i (∂u_i/∂φ)^T (-c_i d_i)

(one vector-Jacobian product of the net over the global batch's rows, by autograd; M held fixed, as
the table holds its normaliser fixed). The -c_i d_i are divided by their RMS first: their scale
changes by orders of magnitude over a run (with ‖v‖) and Adam's ε would otherwise swamp them.
Adam (`--instance_net_lr`) then updates φ. Every rank gathers the same (row, c_i d_i, ℓ_i) triples
and runs the same float operations, so φ stays identical across ranks (checked by `checksum`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamprm.bilevel.instance_weights import CHUNK, LastVisits

# M over the whole table up to this size, over a fixed subsample above: its relative error is about
# (std/mean of the scores) / 128, and its inputs (0.7 MB) are kept, so an update costs the same at any size.
EXACT_MEAN_ROWS = 1 << 14
HIDDEN = 16


class RecordFeatures:
    """The static per-record inputs of the net (from the training file) and the replicated last visits.

    Memory per record: 4 (mc) + 4 (position) + 2 (domain) + 4 (last loss) + 2 (last prediction, float16:
    a report column, not an input) = 16 bytes.
    """

    def __init__(self, accuracy: torch.Tensor, position: torch.Tensor, domain: torch.Tensor, num_domains: int):
        self.accuracy = accuracy.to(torch.float32)
        self.position = position.to(torch.float32)
        self.domain = domain.to(torch.int16)
        self.num_domains = num_domains
        self.visits = LastVisits(self.accuracy.numel())  # ℓ_i (the `gap` input) and sigmoid(z_i)

    def __len__(self) -> int:
        return self.accuracy.numel()

    @classmethod
    def from_records(cls, records: list, domains: dict[str, int]) -> "RecordFeatures":
        """Features of the trainer's `TrainRecord`s (accuracy, chain_id, step_index, domain)."""
        last_step: dict[str, int] = {}
        for r in records:
            if r.chain_id is not None and r.step_index is not None:
                last_step[r.chain_id] = max(last_step.get(r.chain_id, 0), r.step_index)
        position = [r.step_index / last_step[r.chain_id] if r.chain_id is not None and r.step_index is not None
                    and last_step[r.chain_id] > 0 else 0.0 for r in records]
        return cls(torch.tensor([r.accuracy for r in records]), torch.tensor(position),
                   torch.tensor([domains[r.domain] for r in records]), len(domains))

    def record_losses(self, rows: torch.Tensor, losses: torch.Tensor, predictions: torch.Tensor | None = None) -> None:
        """Store the losses (and predictions) just measured."""
        self.visits.record(rows, losses, predictions)

    def matrix(self, rows: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """[rows, F] float32 inputs of the net."""
        columns = []
        for name in names:
            if name == "mc":
                columns.append(self.accuracy[rows][:, None])
            elif name == "gap":
                columns.append(self.gap(rows)[:, None])
            elif name == "position":
                columns.append(self.position[rows][:, None])
            else:
                columns.append(F.one_hot(self.domain[rows].long(), self.num_domains).float())
        return torch.cat(columns, dim=1)

    def gap(self, rows: torch.Tensor) -> torch.Tensor:
        """sqrt(ℓ_i) = |MC accuracy - PRM prediction| at the last visit; the visited mean if never visited."""
        return torch.nan_to_num(self.visits.loss[rows], nan=self.visits.mean_loss).clamp(min=0.0).sqrt()

    def width(self, names: tuple[str, ...]) -> int:
        return sum(self.num_domains if name == "domain" else 1 for name in names)

    def state_dict(self) -> dict[str, Any]:
        return self.visits.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.visits.load_state_dict(state)


class InstanceNet:
    """Replicated instance-weight network, with the same interface as `InstanceWeights`."""

    def __init__(self, features: RecordFeatures, names: tuple[str, ...], lr: float, seed: int = 0,
                 hidden: int = HIDDEN):
        self.features, self.names, self.lr = features, tuple(names), lr
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(features.width(self.names), hidden), nn.Tanh(), nn.Linear(hidden, 1))
        with torch.no_grad():  # seeded, so every rank starts from the same φ
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / p.shape[-1]) ** 0.5)
            self.net[2].weight.zero_()  # every weight 1 until the first update
            self.net[2].bias.zero_()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        n = len(features)
        self.mean_rows = (torch.arange(n) if n <= EXACT_MEAN_ROWS else
                          torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:EXACT_MEAN_ROWS].sort().values)
        self.mean_inputs = features.matrix(self.mean_rows, self.names)  # only `gap` changes (refreshed)
        self.updates = 0
        self.normaliser = self._mean_score()

    def __len__(self) -> int:
        return len(self.features)

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """s(f_i; φ) for the rows (float32, with autograd through φ)."""
        return F.softplus(self.net(self.features.matrix(rows, self.names)).squeeze(1))

    @torch.no_grad()
    def _mean_score(self) -> float:
        if "gap" in self.names:
            column = sum(self.features.width((name,)) for name in self.names[:self.names.index("gap")])
            self.mean_inputs[:, column] = self.features.gap(self.mean_rows)
        return float(F.softplus(self.net(self.mean_inputs).squeeze(1)).double().mean())

    @torch.no_grad()
    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """u_i for the given rows (float32, on the rows' device)."""
        return (self.scores(rows.cpu().long()).double() / self.normaliser).float().to(rows.device)

    @torch.no_grad()
    def all_weights(self) -> torch.Tensor:
        """Every record's weight (float32): O(table); for reports, not for the training loop."""
        out = torch.empty(len(self), dtype=torch.float32)
        for start in range(0, len(self), CHUNK):
            rows = torch.arange(start, min(start + CHUNK, len(self)))
            out[start:start + CHUNK] = (self.scores(rows).double() / self.normaliser).float()
        return out

    def last_losses(self) -> torch.Tensor:
        """ℓ_i at each record's last visit by an upper step (NaN: never visited): the loss ranking."""
        return self.features.visits.loss.clone()

    def last_predictions(self) -> torch.Tensor:
        """sigmoid(z_i) at each record's last visit (float32; NaN: never visited)."""
        return self.features.visits.prediction.float()

    def parameter_gradient(self, rows: torch.Tensor, dloss_dweights: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Σ_i (∂u_i/∂φ)^T ∂L/∂u_i, flattened, M held fixed; `dtype` float64 for a reference."""
        net = self.net if dtype == torch.float32 else _copy(self.net, dtype)
        x = self.features.matrix(rows.cpu().long(), self.names).to(dtype)
        params = list(net.parameters())
        with torch.enable_grad():
            u = F.softplus(net(x).squeeze(1)) / self.normaliser
            grads = torch.autograd.grad(u, params, grad_outputs=dloss_dweights.to(dtype))
        return torch.cat([g.reshape(-1) for g in grads])

    def update(self, rows: torch.Tensor, dloss_dweights: torch.Tensor, losses: torch.Tensor,
               predictions: torch.Tensor | None = None) -> dict[str, float]:
        """One upper step: store the measured losses (and predictions), then one Adam step along the
        chained hypergradient (rows may repeat: their terms add up). Returns summary numbers."""
        rows, g = rows.cpu().long(), dloss_dweights.cpu().double()
        self.features.record_losses(rows, losses.cpu(), None if predictions is None else predictions.cpu())
        rms = float(g.pow(2).mean().sqrt())
        if not rms > 0:
            return {"rows": float(torch.unique(rows).numel()), "rms": rms}
        flat = self.parameter_gradient(rows, (g / rms).float())
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        for p in self.net.parameters():
            p.grad = flat[offset:offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()
        self.optimizer.step()
        self.normaliser = self._mean_score()
        self.updates += 1
        return {"rows": float(torch.unique(rows).numel()), "rms": rms}

    def checksum(self) -> torch.Tensor:
        """A float64 value that differs between ranks whenever their nets or loss caches differ."""
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.net.parameters()])
        total = (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum() + self.normaliser
        loss = self.features.visits.loss
        for start in range(0, len(self), CHUNK):
            chunk = torch.nan_to_num(loss[start:start + CHUNK].double(), nan=-1.0)
            total += (chunk * torch.arange(start + 1, start + 1 + chunk.numel(), dtype=torch.float64)).sum()
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "net", "records": len(self), "features": list(self.names),
                "net": {k: v.clone() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "cache": self.features.state_dict(), "updates": self.updates}

    def incompatibility(self, state: dict[str, Any]) -> str | None:
        """Why a checkpoint's instance state cannot be loaded here, or None."""
        if state.get("kind") != "net":
            return "instance weights: the checkpoint holds a per-record table, this run an instance net"
        if state["records"] != len(self):
            return f"instance net: checkpoint {state['records']} records vs {len(self)} in the training file"
        if tuple(state["features"]) != self.names:
            return f"--instance_net_features: checkpoint {','.join(state['features'])} vs now {','.join(self.names)}"
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problem = self.incompatibility(state)
        if problem:
            raise ValueError(problem)
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this run's flag wins (a branched run picks its own)
            group["lr"] = self.lr
        self.features.load_state_dict(state["cache"])
        self.updates = int(state["updates"])
        self.normaliser = self._mean_score()


def _copy(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(net).to(dtype)
