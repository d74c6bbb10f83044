"""Train a DreamPRM process reward model with bi-level domain reweighting on DeepSpeed.

    # the bundled demo, tiny offline model, whatever hardware is here (CPU included), with the
    # default (2B) recipe; the demo's own recipe is `bash .ci/demo.sh`
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json
    # 2 processes on one machine
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json
    torchrun --nproc_per_node 2 launch/train.py
    # a Slurm cluster: sbatch slurm/train_7b.sh (see slurm/README.md)

`python launch/train.py --help` lists every flag.
"""
from __future__ import annotations

import os
import sys

# The repository root on the import path, so that dreamprm/ imports without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamprm.cli import exit_now, run_training  # noqa: E402

if __name__ == "__main__":
    exit_now(run_training(sys.argv[1:]))
