"""Instance weights (`--weighting instance|both`): one logit per training record.
(`instance_net.py`: the same interface, the weight computed from the record's features.)

    u_i = softplus(a_i) / M,   M = mean over the whole table of softplus(a_j)

so the weights have mean 1 over every training record (not over a batch: a record's weight is
comparable with any other's, and a batch of distrusted records counts less in the lower loss).
M is kept as a float64 running sum updated with the rows that change, so an upper step costs
O(global batch) whatever the table's size; it is saved in checkpoints, so a resumed run continues
bit for bit.

Hypergradient of a row: ∂L_meta/∂a_i ≈ -(∂u_i/∂a_i) · c_i · d_i, with d_i = <∇ℓ_i, v>/N the
record's directional derivative, c_i its domain weight (1 under `--weighting instance`) and
∂u_i/∂a_i = sigmoid(a_i)/M. The normaliser's own derivative, which touches every row with a common
factor of order 1/N, is left out: it would make every update dense, and it only rescales what the
renormalisation by M already keeps at mean 1.

The update (`step`) is the same on every rank: each rank sends the (row, hypergradient) pairs of
its own records, one all-gather sized by the global batch, and every rank applies all of them.
A row's step is `lr · g_i / rms(g)`, the RMS taken over the rows of this update: the hypergradient's
scale changes by orders of magnitude over a run (with ‖v‖), and a record is visited a few times
per epoch at most, too seldom for per-row moment estimates; normalising by the batch keeps each
visit's step near `lr` and keeps no per-row state (4 bytes per record: 10 million records, 40 MB).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

RECIPES = ("softplus", "clipped")
CLIP = (-1.0, 3.0)  # DreamPRM-1.5's range for its unnormalised table
CHUNK = 1 << 20  # rows per pass of the O(table) reports: bounded temporaries at any table size


def store_row_means(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """cache[row] = mean of that row's values (rows may repeat); returns the previous values of the
    unique rows (in `torch.unique` order), with the new ones at cache[torch.unique(rows)]."""
    unique, where = torch.unique(rows, return_inverse=True)
    total = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, where, values.double())
    count = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, where, torch.ones_like(values.double()))
    old = cache[unique].clone()
    cache[unique] = (total / count).to(cache.dtype)
    return old


class LastVisits:
    """Each record's lower loss ℓ_i and the PRM's prediction sigmoid(z_i) at its last visit by an upper
    step (NaN: never visited), and the running mean loss over the visited records. Replicated: every
    rank stores the same gathered values. The loss ranks records for the report's baseline and feeds
    the instance net's `gap`; the prediction is a report column only. 6 bytes per record (float32
    loss, float16 prediction)."""

    def __init__(self, num_records: int):
        self.loss = torch.full((num_records,), float("nan"), dtype=torch.float32)
        self.prediction = torch.full((num_records,), float("nan"), dtype=torch.float16)
        self.loss_sum, self.loss_count = 0.0, 0  # over visited records (float64 Python numbers)

    def record(self, rows: torch.Tensor, losses: torch.Tensor, predictions: torch.Tensor | None = None) -> None:
        """Store the values just measured (a row repeated in one update keeps the mean of its values)."""
        rows = rows.cpu().long()
        if predictions is not None:
            store_row_means(self.prediction, rows, predictions.cpu())
        old = store_row_means(self.loss, rows, losses.cpu())
        new = self.loss[torch.unique(rows)]
        seen = ~torch.isnan(old)
        self.loss_sum += float(new.double().sum() - old[seen].double().sum())
        self.loss_count += int((~seen).sum())

    @property
    def mean_loss(self) -> float:
        """Mean ℓ over the visited records (0 before any visit)."""
        return self.loss_sum / self.loss_count if self.loss_count else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.clone(), "prediction": self.prediction.clone(),
                "loss_sum": torch.tensor(self.loss_sum, dtype=torch.float64), "loss_count": self.loss_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Older checkpoints may lack a key: no loss (nothing measured yet), no prediction (unknown until
        the record's next visit), no running sum (a table's: recomputed from the losses)."""
        if "loss" in state:
            self.loss = state["loss"].to(torch.float32).clone()
        if "prediction" in state:
            self.prediction = state["prediction"].to(torch.float16).clone()
        if "loss_sum" in state:
            self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
        else:
            seen = ~torch.isnan(self.loss)
            self.loss_sum, self.loss_count = float(self.loss[seen].double().sum()), int(seen.sum())


class InstanceWeights:
    """The replicated table of per-record logits (float32) and its normaliser.

    `recipe` 'clipped' is DreamPRM-1.5's table, kept as a baseline (`--instance_recipe clipped`): the
    table holds the weights themselves, u_i = a_i (start 1, no normaliser, ∂u_i/∂a_i = 1), and each
    step is clipped to [-1, 3]; the step size is the same RMS-normalised one."""

    def __init__(self, num_records: int, lr: float, recipe: str = "softplus"):
        if num_records < 1:
            raise ValueError(f"instance weights need at least one record, got {num_records}")
        if recipe not in RECIPES:
            raise ValueError(f"--instance_recipe: unknown recipe {recipe!r}; choose one of {list(RECIPES)}")
        self.lr, self.recipe = lr, recipe
        self.logits = torch.zeros(num_records, dtype=torch.float32) if recipe == "softplus" else torch.ones(num_records)
        self.softplus_sum = num_records * math.log(2.0)  # Σ softplus(a_j), float64 (a Python float)
        self.updates = 0
        self.visits = LastVisits(num_records)  # for the report's loss and |MC - prediction| baselines

    def __len__(self) -> int:
        return self.logits.numel()

    @property
    def mean_softplus(self) -> float:
        return self.softplus_sum / len(self)

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """u_i for the given rows (float32, on the rows' device)."""
        a = self.logits[rows.cpu()]
        if self.recipe == "clipped":
            return a.clone().to(rows.device)
        return (F.softplus(a.double()) / self.mean_softplus).float().to(rows.device)

    def all_weights(self) -> torch.Tensor:
        """Every record's weight (float32): O(table); for reports, not for the training loop."""
        if self.recipe == "clipped":
            return self.logits.clone()
        out = torch.empty_like(self.logits)
        for start in range(0, len(self), CHUNK):  # float64 temporaries of one chunk at a time
            out[start:start + CHUNK] = F.softplus(self.logits[start:start + CHUNK].double()) / self.mean_softplus
        return out

    def logit_gradient(self, rows: torch.Tensor, dloss_dweights: torch.Tensor) -> torch.Tensor:
        """∂L/∂a_i = (∂u_i/∂a_i) ∂L/∂u_i for the given rows, the normaliser held fixed (float64)."""
        if self.recipe == "clipped":
            return dloss_dweights.cpu().double().clone()
        a = self.logits[rows.cpu()].double()
        return torch.sigmoid(a) / self.mean_softplus * dloss_dweights.cpu().double()

    @torch.no_grad()
    def step(self, rows: torch.Tensor, hypergradient: torch.Tensor) -> dict[str, float]:
        """Apply one update (rows may repeat: their hypergradients add up). Returns summary numbers."""
        rows, hypergradient = rows.cpu().long(), hypergradient.cpu().double()
        unique, where = torch.unique(rows, return_inverse=True)
        g = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, where, hypergradient)
        rms = float(g.pow(2).mean().sqrt())
        if not rms > 0:
            return {"rows": float(unique.numel()), "rms": rms}
        old = self.logits[unique].double()
        new = old - self.lr * g / rms
        if self.recipe == "clipped":
            new = new.clamp(*CLIP)
        new = new.float().double()  # the value the float32 table will hold
        self.softplus_sum += float((F.softplus(new) - F.softplus(old)).sum())
        self.logits[unique] = new.float()
        self.updates += 1
        return {"rows": float(unique.numel()), "rms": rms}

    def update(self, rows: torch.Tensor, dloss_dweights: torch.Tensor, losses: torch.Tensor,
               predictions: torch.Tensor | None = None) -> dict[str, float]:
        """One upper step from the gathered ∂L_meta/∂u_i (= -c_i d_i), the measured losses ℓ_i and the
        predictions sigmoid(z_i) (None: not measured)."""
        self.visits.record(rows, losses, predictions)
        return self.step(rows, self.logit_gradient(rows, dloss_dweights))

    def last_losses(self) -> torch.Tensor:
        """ℓ_i at each record's last visit by an upper step (NaN: never visited): the loss ranking."""
        return self.visits.loss.clone()

    def last_predictions(self) -> torch.Tensor:
        """sigmoid(z_i) at each record's last visit (float32; NaN: never visited)."""
        return self.visits.prediction.float()

    def incompatibility(self, state: dict[str, Any]) -> str | None:
        """Why a checkpoint's instance state cannot be loaded here, or None."""
        if state.get("kind", "table") != "table":
            return "instance weights: the checkpoint holds an instance net, this run a per-record table"
        if state.get("recipe", "softplus") != self.recipe:
            return f"--instance_recipe: checkpoint {state.get('recipe', 'softplus')} vs now {self.recipe}"
        if state["logits"].numel() != len(self):
            return f"instance weights: checkpoint {state['logits'].numel()} records vs {len(self)} in the training file"
        return None

    def checksum(self) -> torch.Tensor:
        """A float64 value that differs between ranks whenever their tables differ (O(table))."""
        total = torch.tensor(self.softplus_sum, dtype=torch.float64)
        for start in range(0, len(self), CHUNK):
            chunk = self.logits[start:start + CHUNK].double()
            total += (chunk * torch.arange(start + 1, start + 1 + chunk.numel(), dtype=torch.float64)).sum()
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "table", "recipe": self.recipe, "logits": self.logits.clone(),
                "softplus_sum": torch.tensor(self.softplus_sum, dtype=torch.float64), "updates": self.updates,
                **self.visits.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problem = self.incompatibility(state)
        if problem:
            raise ValueError(problem)
        self.logits = state["logits"].to(torch.float32).clone()
        self.visits.load_state_dict(state)
        self.softplus_sum = float(state["softplus_sum"])
        self.updates = int(state["updates"])
