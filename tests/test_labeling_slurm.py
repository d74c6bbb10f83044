"""`slurm/label.sh` on the session's private Slurm (tests/slurm_cluster.py): a job array of two
shards on CPU with the tiny model and the transformers engine. Shard 0 gets SIGUSR1 the way
`#SBATCH --signal=USR1@120` sends it, once it has written a question: it exits 75, the script
requeues its array task, and the requeued run resumes. The merged files must equal a plain
one-process run's (the records do not depend on sharding or interruptions).

Skipped (with the reason) when not root or Slurm/munge are missing; CI has both."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import DEMO, PYTHON, REPO, base_env
from dreamprm.labeling.shards import in_shard
from slurm_cluster import slurm_available
from test_labeling_e2e import done_count, write_questions

_ok, _why = slurm_available()
pytestmark = [pytest.mark.skipif(not _ok, reason=_why), pytest.mark.slow, pytest.mark.slurm]

FLAGS = "--max_new_tokens 6 --rollout_max_new_tokens 6 --chains 1 --rollouts 2 --meta_chains 1 --candidates 2"


def test_label_array_requeues_a_signalled_shard_and_matches_one_process(slurm_cluster, tiny_model, tmp_path):
    questions = write_questions(tmp_path / "questions.jsonl", {"train": 6, "meta": 2, "test": 2})
    out = tmp_path / "label"
    submit = tmp_path / "submit"
    (submit / "logs").mkdir(parents=True)
    env = {"QUESTIONS": str(questions), "POLICY": str(tiny_model), "OUT": str(out), "ENGINE": "transformers",
           "PYTHON": PYTHON, "EXTRA_ARGS": f"--image_root {DEMO} {FLAGS}", "DREAMPRM_REPO": str(REPO),
           "OMP_NUM_THREADS": "1"}
    script = os.path.relpath(REPO / "slurm" / "label.sh", submit)
    job = slurm_cluster.sbatch(script, env_overrides=env, wait=False, cwd=submit,
                               args=["--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1", "--time=10"]).job_id
    # The larger shard is signalled, after its first question: work is left when the signal lands.
    ids = [json.loads(line)["id"] for line in questions.read_text().splitlines()]
    big = max(range(2), key=lambda i: sum(in_shard(q, i, 2) for q in ids))
    shard = out / f"shard-{big:05d}-of-00002.jsonl"
    deadline = time.monotonic() + 300
    while done_count(shard) < 1:
        assert time.monotonic() < deadline, slurm_cluster.log_tail()
        time.sleep(0.1)
    slurm_cluster.signal(f"{job}_{big}", "USR1", target="steps")
    results = [slurm_cluster.wait(f"{job}_{i}", timeout=600) for i in range(2)]
    logs = "".join(p.read_text() for p in sorted((submit / "logs").iterdir()))
    assert results == [(0, "COMPLETED")] * 2, logs
    restarts = [slurm_cluster.job(f"{job}_{i}")["Restarts"] for i in range(2)]
    assert restarts[big] == "1" and restarts[1 - big] == "0", logs
    assert "labeller stopped early (exit 75): requeueing" in logs and "done before" in logs

    merged = subprocess.run([sys.executable, "-m", "dreamprm.labeling", "merge", "--out", str(out)], cwd=REPO,
                            env=base_env(), capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    alone = tmp_path / "alone"
    local = subprocess.run([sys.executable, "launch/label.py", "--questions", str(questions), "--policy", str(tiny_model),
                            "--out", str(alone), "--image_root", str(DEMO), *FLAGS.split(), "--no-progress"],
                           cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr
    subprocess.run([sys.executable, "-m", "dreamprm.labeling", "merge", "--out", str(alone)], cwd=REPO, env=base_env(),
                   check=True, capture_output=True, timeout=120)
    for name in ("train.json", "meta.json", "candidates.json"):
        assert (out / name).read_text() == (alone / name).read_text(), name
