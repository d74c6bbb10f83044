"""The prepared GPU run (benchmarks/gpu/device_run.sh) end to end on CPU with the tiny model: a lent GPU
gives a session minutes, and a script that breaks there wastes them (it did: a child process lost
the carried packages' PYTHONPATH)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, base_env

pytestmark = [pytest.mark.slow, pytest.mark.benchmark]


def test_the_device_script_measures_both_heads_and_the_bf16_hypergradient_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = base_env(NO_INSTALL="1", TINY="1", BUDGET_S="0", OUT=str(out), WORK=str(tmp_path / "work"),
                   PATH=f"{Path(PYTHON).parent}:/usr/bin:/bin")
    proc = subprocess.run(["bash", "benchmarks/gpu/device_run.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = (out / "stages.log").read_text()
    assert "fidelity bf16_hidden: exit 0" in stages and "heads: exit 0" in stages, stages
    fidelity = json.loads((out / "fidelity_bf16_hidden.json").read_text())
    assert fidelity["precision"] == "bf16" and fidelity["meta_loss_name"] == "pairwise"
    assert fidelity["estimators"]["exact"]["cosine_vs_reference"] >= 0.999
    heads = json.loads((out / "heads.json").read_text())["heads"]
    assert set(heads) == {"scalar (hidden)", "generative"}
    for result in heads.values():
        assert result["scored_steps_per_s"] > 0 and result["tokens_per_scored_step"] > 10
