"""End-to-end: domain-weight scalars -> real TensorBoard -> headless Chromium screenshot."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import pytest

try:
    from tensorboard_view import chromium_available, screenshot_dashboard
except ImportError:  # collected as a package (tests/__init__.py present)
    from tests.tensorboard_view import chromium_available, screenshot_dashboard

pytest.importorskip("tensorboard")
pytest.importorskip("torch.utils.tensorboard")
PIL_Image = pytest.importorskip("PIL.Image")

_OK, _WHY = chromium_available()
pytestmark = [pytest.mark.skipif(not _OK, reason=f"no headless browser: {_WHY}"), pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DOMAIN_TAGS = ["domain_weight/clean", "domain_weight/noisy_80", "domain_weight/inverted"]


def _write_events(logdir: Path, steps: int = 20) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    try:
        for step in range(steps):
            # Weights drift apart as a trainer down-weights noisy/inverted domains.
            clean = 1 / 3 + 0.02 * step
            noisy = 1 / 3 - 0.008 * step
            inverted = 1 - clean - noisy
            writer.add_scalar("domain_weight/clean", clean, step)
            writer.add_scalar("domain_weight/noisy_80", noisy, step)
            writer.add_scalar("domain_weight/inverted", inverted + 0.02 * math.sin(step), step)
            writer.add_scalar("loss/train", 2.0 * math.exp(-step / 6), step)
    finally:
        writer.close()


def test_domain_weight_dashboard_screenshot(tmp_path):
    logdir = tmp_path / "runs" / "dreamprm"
    _write_events(logdir)
    out_png = tmp_path / "tensorboard_domain_weights.png"

    t0 = time.monotonic()
    info = screenshot_dashboard(tmp_path / "runs", out_png, tag_filter="domain_weight", timeout_s=90)
    elapsed = time.monotonic() - t0

    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(out_png, ARTIFACTS / "tensorboard_domain_weights.png")

    assert sorted(info["expected_tags"]) == sorted(DOMAIN_TAGS), info
    assert sorted(info["titles"]) == sorted(DOMAIN_TAGS), info  # loss/train filtered out
    for tag in DOMAIN_TAGS:
        assert info["drawn"][tag] >= 1, (tag, info)
        assert info["points"][tag] == 20, (tag, info)  # one vertex per logged step
    assert info["filter_value"] == "domain_weight", info

    assert out_png.stat().st_size > 10_000, info
    with PIL_Image.open(out_png) as img:
        img.load()
        assert img.format == "PNG"
        assert img.width >= 800 and img.height >= 400, img.size
        # Not a blank page: a real dashboard has many distinct colours.
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 50, len(colors)
    assert elapsed < 60, info
