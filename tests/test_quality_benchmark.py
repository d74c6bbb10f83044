"""The domain-quality benchmark in miniature (benchmarks/quality/run.py, one seed, small task, the
exact hypergradient only): after training, the inverted and the noisiest domain weigh less than the
clean one. The full benchmark (3 seeds, all arms, Best-of-N table) is `python benchmarks/quality/run.py`.

Seed 0 of this small task is one where the warm-up PRM gives the upper level a quality signal to
follow; in the full benchmark 1 of 3 seeds is (RESULTS.md), and the others' weights wander."""
from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, REPO, base_env

SMALL = ["--seeds", "0", "--arms", "exact", "--chains_per_domain", "100", "--meta", "64", "--test", "24",
         "--warmup", "400", "--steps", "80", "--workers", "1", "--threads", "1"]


def test_small_benchmark_down_weights_the_inverted_and_noisiest_domains(tmp_path):
    results = tmp_path / "results.json"
    proc = subprocess.run([PYTHON, str(REPO / "benchmarks" / "quality" / "run.py"), *SMALL, "--out", str(tmp_path),
                           "--results", str(tmp_path / "RESULTS.md"), "--json", str(results)],
                          cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads(results.read_text())["runs"]["exact-s0"]
    weights = run["weights"]
    assert weights["inverted"] < weights["clean"], weights
    assert weights["noisy_80"] < weights["clean"], weights
    assert run["spearman_weight_noise"] < 0, run
    report = (tmp_path / "RESULTS.md").read_text()
    assert "python benchmarks/quality/run.py" in report and "| inverted |" in report
