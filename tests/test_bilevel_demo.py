"""Bi-level training on the bundled demo moves the domain weights the right way, and what the user
sees: domain_weights.json, the bar chart, and the TensorBoard dashboard drawn in headless Chromium."""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from conftest import REPO, base_env, read_json, read_scalars, run_train
from tensorboard_view import chromium_available, screenshot_dashboard

DEMO_FLAGS = ["--batch_size", "16", "--meta_batch_size", "8", "--lr", "1e-3", "--meta_lr", "0.1",
              "--iteration_num", "200", "--precision", "fp32", "--log_every", "20"]


@pytest.fixture(scope="module")
def demo_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_train(["--reward_model", str(tiny_model), "--weights_path", str(out), *DEMO_FLAGS],
              env=base_env(OMP_NUM_THREADS="2"), timeout=900)
    return out


def test_the_weights_end_in_the_order_of_label_quality(demo_run):
    summary = read_json(demo_run / "domain_weights.json")
    weights = summary["weights"]
    # The README's promise, with the default meta objective and optimiser (pairwise, gated).
    assert summary["order"] == ["clean", "noisy_30", "noisy_80", "inverted"], weights
    assert weights["clean"] > 1.0 > weights["inverted"], weights
    curve = [v for _, v in read_scalars(demo_run / "tb")["domain_weight/inverted"]]
    assert curve[-1] < curve[0]


def test_the_bar_chart_is_written(demo_run):
    with Image.open(demo_run / "domain_weights.png") as chart:
        assert chart.size[0] >= 600 and len(set(chart.convert("RGB").getdata())) > 4


def test_tensorboard_dashboard_draws_the_domain_weight_curves(demo_run):
    ok, reason = chromium_available()
    if not ok:
        pytest.skip(reason)
    artifact = REPO / "tests" / "artifacts" / "demo_domain_weights_dashboard.png"
    artifact.parent.mkdir(exist_ok=True)
    seen = screenshot_dashboard(demo_run / "tb", artifact, tag_filter="domain_weight")
    domains = read_json(demo_run / "domains.json")
    assert set(seen["drawn"]) == {f"domain_weight/{name}" for name in domains}, seen
    assert all(count >= 1 for count in seen["drawn"].values())
    shutil.copy(demo_run / "domain_weights.png", artifact.with_name("demo_domain_weights_bars.png"))
