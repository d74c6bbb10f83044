"""The README's first command, `bash .ci/demo.sh` (2 ranks, ZeRO-3, the bundled demo), moves the domain
weights the right way; and what the user sees: domain_weights.json, the bar chart, and the
TensorBoard dashboard drawn in headless Chromium."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from PIL import Image

from conftest import REPO, base_env, free_port, read_json, read_scalars
from tensorboard_view import chromium_available, screenshot_dashboard

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.browser]


@pytest.fixture(scope="module")
def demo_run(tiny_model, tmp_path_factory):
    """.ci/demo.sh as the README gives it, writing to a temporary folder instead of runs/demo."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(["bash", str(REPO / ".ci" / "demo.sh"), "--weights_path", str(out), "--reward_model",
                           str(tiny_model), "--log_every", "20"], cwd=REPO, capture_output=True, text=True,
                          env=base_env(MASTER_PORT=str(free_port())), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = read_json(out / "config.json")
    assert config["world_size"] == (torch.cuda.device_count() or 2)  # one rank per GPU, else 2
    assert config["deepspeed_resolved"]["zero_optimization"]["stage"] == 3
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
