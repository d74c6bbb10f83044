"""Label questions with a policy VLM: Monte Carlo step labels, meta chains, Best-of-N candidates.

    python launch/label.py --questions data/questions.jsonl --policy DIR --out runs/label --shard 0/1
    python launch/label.py merge --out runs/label        # -> runs/label/{train,meta,candidates}.json
    # one shard per GPU on a node (the vLLM engine), then merge:
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python launch/label.py --engine vllm --shard $i/4 ... & done; wait

`python launch/label.py --help` lists every flag (the same as `dreamprm-label` and
`python -m dreamprm.labeling`); docs/labeling.md explains them, slurm/label.sh runs shards as a job array.
"""
from __future__ import annotations

import os
import sys

# The repository root on the import path, so that dreamprm/ imports without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamprm.labeling.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/label.py"))
