"""Options of the upper step, through the trainer on real ZeRO-3: the optimiser-preconditioned inner
product and the segment's batches. One upper step each (4 lower steps, unroll 2), compared through
the hypergradients the trainer logs; the 4 one-rank runs go 2 at a time."""
from __future__ import annotations

import pytest
import torch

from conftest import read_json, read_scalars, run_trains, small_run_args

pytestmark = [pytest.mark.slow]

BASE = ["--iteration_num", "2", "--unroll_steps", "2", "--batch_size", "8", "--meta_batch_size", "4",
        "--no-export"]


def first_hypergradient(out) -> torch.Tensor:
    scalars = read_scalars(out / "tb")
    return torch.tensor([scalars[f"hypergrad/{name}"][0][1] for name in read_json(out / "domains.json")],
                        dtype=torch.float64)


@pytest.fixture(scope="module")
def hypergradients(tiny_model, tmp_path_factory) -> dict[str, torch.Tensor]:
    runs = {"adam_exact": ["--hypergrad_geometry", "adam"],
            "adam_fd": ["--hypergrad_geometry", "adam", "--hypergrad", "fd", "--fd_radius", "1e-3"],
            "sgd_exact": [],
            "sgd_exact_last": ["--hypergrad_batches", "last"]}
    outs = {name: tmp_path_factory.mktemp(name) for name in runs}
    run_trains([{"args": small_run_args(tiny_model, outs[name], *BASE, *flags)} for name, flags in runs.items()])
    return {name: first_hypergradient(out) for name, out in outs.items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_preconditioned_inner_products_agree_between_exact_and_fd(hypergradients):
    # Two independent paths along the same preconditioned direction P v: per-domain backward passes
    # against perturbed forwards.
    a, b = hypergradients["adam_exact"], hypergradients["adam_fd"]
    assert a.norm() > 0
    assert cosine(a, b) >= 0.999, (a, b)


def test_preconditioning_changes_the_hypergradient(hypergradients):
    # AdamW's preconditioner is far from a multiple of the identity after two steps: the geometry
    # must show in the result (were P dropped, the two would be equal).
    assert cosine(hypergradients["adam_exact"], hypergradients["sgd_exact"]) < 0.99


def test_segment_batches_enter_the_upper_step(hypergradients):
    # --hypergrad_batches segment (the default) averages d over both batches of the segment; 'last'
    # uses the second one alone.
    segment, last = hypergradients["sgd_exact"], hypergradients["sgd_exact_last"]
    assert segment.norm() > 0 and last.norm() > 0
    assert not torch.allclose(segment, last, rtol=1e-3, atol=0.0)
