"""Screenshot TensorBoard's Time Series dashboard from a real server and headless Chromium.

Test helper: ``screenshot_dashboard(logdir, out_png)`` starts
``python -m tensorboard.main --logdir LOGDIR --host 127.0.0.1 --port FREE --load_fast false``,
opens ``/?forceSVG=true&tagFilter=...#timeseries`` in headless Debian Chromium through
Playwright (``executable_path``; nothing is ever downloaded with ``playwright install``),
waits until every scalar tag that matches the filter has a chart card whose SVG series
paths carry real data, and writes a full-page PNG.

Notes on this machine:

* ``forceSVG=true`` makes the line charts SVG; with WebGL the first card renders blank
  in headless Chromium and there would be nothing in the DOM to check.
* ``tagFilter`` is the dashboard's own URL query parameter for the "Filter tags (regex)"
  box (a case-insensitive JavaScript regex).  The box is also checked and filled if the
  parameter did not take.
* The port is picked at random in [20000, 32000): never 6000-6009 (mpirun's hwloc GL
  probe hangs on anything listening there) and below Linux's ephemeral port range.

"Drawn" means: inside the card's ``line-chart .series-view > svg`` there is at least one
``<path>`` whose ``d`` attribute parses to >= 2 finite points spanning a non-zero x range.
Icon paths, axes and grid lines live elsewhere in the card and are not counted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_PATH = os.environ.get("TB_VIEW_CHROMIUM", "/usr/bin/chromium")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_PORT_LOW, _PORT_HIGH = 20000, 32000  # above 20000, below the ephemeral range 32768+

# Collects what each scalar card shows. A card's series paths are the direct <path>
# children of the <svg> that sits directly in the line chart's .series-view (grid lines
# are <line>s in line-chart-grid-view, icons are in mat-icon, axes in line-chart-axis).
_CARDS_JS = r"""
() => {
  const parse = (d) => {
    const nums = (d || '').match(/-?\d*\.?\d+(?:e[-+]?\d+)?/gi) || [];
    const pts = [];
    for (let i = 0; i + 1 < nums.length; i += 2) pts.push([+nums[i], +nums[i + 1]]);
    return pts;
  };
  return [...document.querySelectorAll('scalar-card')].map((card) => {
    const tagEl = card.querySelector('.heading tb-truncated-path.tag, tb-truncated-path.tag');
    const title = tagEl ? (tagEl.getAttribute('title') || tagEl.textContent || '').trim() : '';
    const r = card.getBoundingClientRect();
    const paths = [...card.querySelectorAll('line-chart .series-view > svg > path')].map((p) => {
      const pts = parse(p.getAttribute('d'));
      const finite = pts.length > 0 && pts.every(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
      const xs = pts.map((q) => q[0]);
      const xspan = pts.length ? Math.max(...xs) - Math.min(...xs) : 0;
      const stroke = p.style.stroke || p.getAttribute('stroke') || '';
      return {points: pts.length, drawn: finite && pts.length >= 2 && xspan > 0, stroke};
    });
    return {
      title,
      visible: r.width > 0 && r.height > 0,
      canvases: card.querySelectorAll('canvas').length,
      paths,
    };
  });
}
"""


class TensorBoardViewError(RuntimeError):
    """Raised when TensorBoard or the browser did not produce the expected dashboard."""


def chromium_available() -> tuple[bool, str]:
    """(True, "") when Playwright (Python) and a Chromium binary are present; else (False, why)."""
    try:
        import playwright.sync_api  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"playwright (Python package) not importable: {exc!r}"
    if not (os.path.isfile(CHROMIUM_PATH) and os.access(CHROMIUM_PATH, os.X_OK)):
        return False, f"chromium not found or not executable at {CHROMIUM_PATH} (set TB_VIEW_CHROMIUM)"
    return True, ""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port() -> int:
    for _ in range(200):
        port = random.randint(_PORT_LOW, _PORT_HIGH - 1)
        if _port_is_free(port):
            return port
    raise TensorBoardViewError(f"no free port found in [{_PORT_LOW}, {_PORT_HIGH})")


def _tail(path: Path, n_chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<unreadable>"
    return text[-n_chars:] if text else "<empty>"


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


class _TensorBoard:
    """A tensorboard subprocess, always stopped through its Popen handle."""

    def __init__(self, logdir: Path, workdir: Path):
        self.logdir = logdir
        self.stdout_path = workdir / "tensorboard.stdout"
        self.stderr_path = workdir / "tensorboard.stderr"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def describe(self) -> str:
        rc = None if self.proc is None else self.proc.poll()
        return (
            f"tensorboard port={self.port} returncode={rc}\n"
            f"--- tensorboard stderr (tail) ---\n{_tail(self.stderr_path)}\n"
            f"--- tensorboard stdout (tail) ---\n{_tail(self.stdout_path, 1000)}"
        )

    def start(self, deadline: float) -> str:
        """Start tensorboard and wait until it answers HTTP; returns the base URL."""
        for _attempt in range(3):
            self.port = _pick_port()
            cmd = [
                sys.executable, "-m", "tensorboard.main",
                "--logdir", str(self.logdir),
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--load_fast", "false",
                "--reload_interval", "1",
            ]
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            base = f"http://127.0.0.1:{self.port}"
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    _get_json(base + "/data/plugins_listing")
                    return base
                except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                    time.sleep(0.2)
            else:
                raise TensorBoardViewError("tensorboard did not start serving in time\n" + self.describe())
            # Exited early: retry only on a port race, otherwise report.
            if "address already in use" not in _tail(self.stderr_path).lower():
                raise TensorBoardViewError("tensorboard exited during startup\n" + self.describe())
        raise TensorBoardViewError("tensorboard could not bind a port after 3 tries\n" + self.describe())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _matching_scalar_tags(base: str, tag_filter: str) -> dict[str, list[str]]:
    """{tag: [runs]} for scalar tags that TensorBoard serves and the filter matches."""
    regex = re.compile(tag_filter, re.IGNORECASE)  # the dashboard uses new RegExp(f, "i")
    tags = _get_json(base + "/data/plugin/scalars/tags")
    found: dict[str, list[str]] = {}
    for run, run_tags in tags.items():
        for tag in run_tags:
            if regex.search(tag):
                found.setdefault(tag, []).append(run)
    return found


def screenshot_dashboard(
    logdir: Path,
    out_png: Path,
    tag_filter: str = "domain_weight",
    timeout_s: float = 90,
    viewport: tuple[int, int] = (1600, 1000),
) -> dict:
    """Serve ``logdir`` with TensorBoard, screenshot the filtered Time Series dashboard.

    Returns a dict with: ``url``, ``port``, ``expected_tags`` (scalar tags matching the
    filter, from TensorBoard's API), ``titles`` (scalar chart cards found in the page),
    ``drawn`` ({title: number of drawn series paths}), ``points`` ({title: max points in a
    path}), ``paths_drawn`` (total), ``filter_value`` (what the filter box shows),
    ``png``, ``png_bytes`` and timings ``t_server_s``, ``t_data_s``, ``t_drawn_s``, ``t_total_s``.
    Raises TensorBoardViewError (with tensorboard's stderr tail) on any failure.
    """
    ok, why = chromium_available()
    if not ok:
        raise TensorBoardViewError(why)
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    logdir = Path(logdir)
    out_png = Path(out_png)
    if not logdir.is_dir():
        raise TensorBoardViewError(f"logdir does not exist: {logdir}")
    try:
        re.compile(tag_filter)
    except re.error as exc:
        raise TensorBoardViewError(f"tag_filter is not a valid regex: {tag_filter!r}: {exc}") from exc

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    workdir = Path(tempfile.mkdtemp(prefix="tbview-"))
    tb = _TensorBoard(logdir, workdir)
    console: list[str] = []
    result: dict = {"tag_filter": tag_filter}
    stage = "starting tensorboard"
    try:
        base = tb.start(deadline)
        result["port"] = tb.port
        result["t_server_s"] = round(time.monotonic() - t0, 2)

        # --load_fast false loads the logdir in a background thread: wait for the tags.
        stage = "waiting for tensorboard to load matching scalar tags"
        expected: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            try:
                expected = _matching_scalar_tags(base, tag_filter)
            except (urllib.error.URLError, OSError, ValueError):
                expected = {}
            if expected:
                break
            if tb.proc.poll() is not None:
                raise TensorBoardViewError("tensorboard exited while loading")
            time.sleep(0.3)
        if not expected:
            raise TensorBoardViewError(f"no scalar tag in {logdir} matches {tag_filter!r}")
        result["expected_tags"] = sorted(expected)
        result["t_data_s"] = round(time.monotonic() - t0, 2)

        url = f"{base}/?forceSVG=true&tagFilter={urllib.parse.quote(tag_filter, safe='')}#timeseries"
        result["url"] = url
        stage = "launching chromium"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM_PATH, headless=True, args=CHROMIUM_ARGS,
                timeout=max(1000, (deadline - time.monotonic()) * 1000),
            )
            try:
                page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                stage = "loading the dashboard"
                page.goto(url, wait_until="load", timeout=max(1000, (deadline - time.monotonic()) * 1000))

                stage = "checking the tag filter box"
                box = page.locator("metrics-tag-filter input")
                box.wait_for(state="visible", timeout=max(1000, (deadline - time.monotonic()) * 1000))
                if box.input_value() != tag_filter:  # URL parameter did not take: type it
                    box.fill(tag_filter)
                    box.press("Enter")
                result["filter_value"] = box.input_value()

                stage = "waiting for the chart cards to draw"
                cards = _wait_for_drawn(page, set(expected), deadline)
                result["t_drawn_s"] = round(time.monotonic() - t0, 2)

                # Two animation frames so the last paint is on screen, then the picture.
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                stage = "taking the screenshot"
                out_png.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out_png), full_page=True)
            finally:
                browser.close()

        result["titles"] = [c["title"] for c in cards]
        result["drawn"] = {c["title"]: sum(p["drawn"] for p in c["paths"]) for c in cards}
        result["points"] = {c["title"]: max((p["points"] for p in c["paths"]), default=0) for c in cards}
        result["paths_drawn"] = sum(result["drawn"].values())
        result["png"] = str(out_png)
        result["png_bytes"] = out_png.stat().st_size
        result["console_errors"] = console[-20:]
        result["t_total_s"] = round(time.monotonic() - t0, 2)
        return result
    except (TensorBoardViewError, PlaywrightError, OSError) as exc:
        msg = [f"screenshot_dashboard failed while {stage}: {exc}"]
        if "url" in result:
            msg.append(f"url: {result['url']}")
        if console:
            msg.append("--- browser console errors ---\n" + "\n".join(console[-20:]))
        msg.append(tb.describe())
        raise TensorBoardViewError("\n".join(msg)) from exc
    finally:
        tb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_drawn(page, expected: set[str], deadline: float) -> list[dict]:
    """Poll the DOM until every expected tag has a card with a drawn series path."""
    last: list[dict] = []
    while True:
        last = page.evaluate(_CARDS_JS)
        missing = set(expected)
        for card in last:
            if card["title"] in missing and any(p["drawn"] for p in card["paths"]):
                missing.discard(card["title"])
        if not missing:
            return last
        # Cards render lazily when they intersect the viewport: bring a missing one in.
        for tag in sorted(missing):
            loc = page.locator("scalar-card", has=page.locator(f"tb-truncated-path.tag[title={json.dumps(tag)}]"))
            if loc.count():
                try:
                    loc.first.scroll_into_view_if_needed(timeout=1000)
                except Exception:
                    pass
                break
        if time.monotonic() > deadline:
            seen = {c["title"]: [(p["points"], p["drawn"]) for p in c["paths"]] for c in last}
            raise TensorBoardViewError(
                f"timed out waiting for drawn charts; missing {sorted(missing)}; "
                f"cards seen (title: [(points, drawn) per series path]): {seen}"
            )
        page.wait_for_timeout(250)
