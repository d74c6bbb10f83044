"""The domain-quality benchmark in miniature (benchmarks/quality/run.py, one seed, the noise task made
small, the default DreamPRM arm only): after training, the inverted and the noisiest domain weigh
less than the clean one and the weights fall with the noise. The full benchmark (three tasks, five
seeds, every arm, Best-of-N tables) is `python benchmarks/quality/run.py`."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, base_env

pytestmark = [pytest.mark.slow, pytest.mark.benchmark]

SMALL = ["--tasks", "noise", "--seeds", "0", "--arms", "pairwise", "--chains_per_domain", "100", "--meta", "64",
         "--test", "24", "--warmup", "300", "--steps", "100", "--workers", "1", "--threads", "1"]


def test_small_benchmark_down_weights_the_inverted_and_noisiest_domains(tmp_path):
    results = tmp_path / "results.json"
    proc = subprocess.run([PYTHON, str(REPO / "benchmarks" / "quality" / "run.py"), *SMALL, "--out", str(tmp_path),
                           "--results", str(tmp_path / "RESULTS.md"), "--json", str(results)],
                          cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads(results.read_text())["runs"]["pairwise-noise-s0"]
    weights = run["weights"]
    assert weights["inverted"] < weights["clean"], weights
    assert weights["noisy_80"] < weights["clean"], weights
    assert run["spearman_weight_noise"] < 0, run
    report = (tmp_path / "RESULTS.md").read_text()
    assert "python benchmarks/quality/run.py" in report and "| inverted |" in report
