"""fp32 arithmetic on bf16 parameters for the upper level's passes (dreamprm/model/precision.py), in
process: gradients as fp32 gives them at the same weights, nothing left switched on afterwards, and
the start-up line for the combinations that stay wrong. The hypergradient itself against the float64
reference, on real ZeRO-3 ranks: tests/test_hypergradient.py and tests/test_trainer_paths.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dreamprm.config import numerics_warnings, parse_args
from dreamprm.model.precision import fp32_compute


class Block(nn.Module):
    """An embedding, a norm, an MLP and a bias-free head: the kinds of layer a decoder has."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64, padding_idx=0)
        self.norm = nn.LayerNorm(64)
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)
        self.head = nn.Linear(64, 1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.down(F.silu(self.up(self.norm(x))))
        # A Hugging Face layer casting back to its parameters' dtype:
        return self.head(x.to(self.head.weight.dtype)).squeeze(-1).float()


def grads(model: nn.Module, ids: torch.Tensor, fp32: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    with fp32_compute(fp32):
        out = model(ids)
    (out ** 2).sum().backward()
    return out.detach(), [p.grad.double() for p in model.parameters()]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


def test_bf16_parameters_give_fp32_gradients_inside_the_context():
    torch.manual_seed(0)
    bf16 = Block().to(torch.bfloat16)
    reference = copy.deepcopy(bf16).float()  # the same (bf16-rounded) weights, fp32 arithmetic
    ids = torch.randint(1, 50, (4, 96))
    ids[:, :3] = 0  # padding rows: no gradient for the padding row of the table
    ref_out, ref_grads = grads(reference, ids, fp32=False)
    out, fp32_grads = grads(bf16, ids, fp32=True)
    plain_out, plain_grads = grads(bf16, ids, fp32=False)
    assert out.dtype == torch.float32
    assert float((out - ref_out).abs().max() / ref_out.abs().max()) < 1e-5
    assert all(g.dtype == torch.float64 for g in fp32_grads)  # (doubled by `grads`; the params' own are bf16)
    assert all(p.grad.dtype == torch.bfloat16 for p in bf16.parameters())
    # The parameters' gradients are bf16: against the fp32 gradients rounded to bf16 the context's
    # differ by an occasional last bit, bf16 arithmetic's by its accumulated error.
    rounded = [g.to(torch.bfloat16).double() for g in ref_grads]
    assert rel(fp32_grads, rounded) < 2e-4
    assert rel(plain_grads, rounded) > 10 * rel(fp32_grads, rounded)
    assert float(bf16.embed.weight.grad[0].abs().max()) == 0.0


def test_the_embedding_gradient_is_summed_in_fp32():
    """Many tokens hitting one row: a bf16 sum of their gradients drifts, an fp32 one does not."""
    torch.manual_seed(1)
    table = nn.Embedding(4, 8).to(torch.bfloat16)
    ids = torch.ones(4096, dtype=torch.long)
    upstream = torch.rand(4096, 8) + 0.5
    with fp32_compute():
        out = table(ids)
    (out * upstream).sum().backward()
    expected = upstream.sum(0)
    assert torch.allclose(table.weight.grad[1].float(), expected, rtol=2 ** -8)


def test_nothing_stays_switched_on_after_the_context():
    linear, tf32 = F.linear, torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(RuntimeError, match="inside"):
        with fp32_compute():
            assert F.linear is not linear
            raise RuntimeError("inside")
    assert F.linear is linear and torch.backends.cuda.matmul.allow_tf32 == tf32
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    assert (x.float() @ torch.ones(3, 3)).to(torch.bfloat16).dtype == torch.bfloat16  # casts work again
    with fp32_compute(enabled=False):
        assert F.linear is linear


def test_the_start_up_names_the_combinations_that_stay_wrong():
    assert numerics_warnings(parse_args([])) == []  # bf16, exact, pairwise, fp32 upper passes
    assert numerics_warnings(parse_args(["--upper_precision", "engine", "--meta_loss", "mse"])) == []
    assert numerics_warnings(parse_args(["--precision", "fp32", "--upper_precision", "engine"])) == []
    assert numerics_warnings(parse_args(["--baseline", "--upper_precision", "engine"])) == []
    (line,) = numerics_warnings(parse_args(["--upper_precision", "engine"]))
    assert "--upper_precision fp32" in line and "63%" in line
    (line,) = numerics_warnings(parse_args(["--hypergrad", "fd_bf16_naive"]))
    assert "use --hypergrad exact" in line


class OneProcessEngine:
    """What `upper_step` asks of an engine, for one process and a 1-parameter model whose step logit
    is `theta` for every row (no DeepSpeed: the meta step's branch logic only)."""

    def __init__(self) -> None:
        from types import SimpleNamespace
        self.theta = torch.nn.Parameter(torch.tensor([0.3]))
        self.info = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))

    def upper_forward(self, batch):
        return self.theta.expand(batch["input_ids"].shape[0])

    def backward_without_step(self, loss):
        (grad,) = torch.autograd.grad(loss, [self.theta], allow_unused=True)
        return [torch.zeros(1) if grad is None else grad.detach()]

    def all_gather(self, tensor):
        return tensor

    def all_reduce_sum(self, tensor):
        return tensor

    def global_dot(self, a, b):
        return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_a_meta_batch_without_a_pair_is_a_zero_update_not_a_bad_one(method):
    """Pairwise, every meta chain right: no (right, wrong) pair, v = 0. Every d is exactly 0 and the
    update counts as applied (fd used to divide by ‖v‖ = 0, and five such steps in a row stopped a run)."""
    from dreamprm.bilevel.domain_weights import DomainWeights
    from dreamprm.bilevel.instance_weights import InstanceWeights
    from dreamprm.bilevel.meta_optimizer import build_meta_optimizer
    from dreamprm.bilevel.upper import upper_step

    engine, weights = OneProcessEngine(), DomainWeights(["a", "b"])
    optimizer = build_meta_optimizer("gated", [weights.logits], lr=0.1, weight_decay=0.0, beta=0.98)
    meta = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "target": torch.ones(4),
            "item_index": torch.arange(4)}
    table = InstanceWeights(10, lr=0.3) if method == "fd" else None
    before = None if table is None else table.all_weights().clone()
    result = upper_step(engine, weights, optimizer, meta, [], method=method, radius=1e-3, aggregation="mean_logit",
                        objective="pairwise", instance_weights=table)
    assert result.applied and result.v_norm == 0.0 and result.meta_loss == 0.0
    assert torch.equal(result.directional, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(result.hypergradient, torch.zeros(2, dtype=torch.float64))
    assert optimizer.state[weights.logits]["step"] == 1  # the gate's averages saw a zero, as exact's always did
    if table is not None:
        assert torch.equal(table.all_weights(), before) and result.instance is None
