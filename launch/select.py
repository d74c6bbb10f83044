"""Best-of-N selection on several processes: each rank scores a contiguous slice of the questions,
rank 0 gathers the step scores and writes the same selection and report as one process would.

    torchrun --nproc_per_node 4 launch/select.py --prm runs/<run>/export --candidates data/demo/candidates.json
    deepspeed --num_gpus 4 launch/select.py --prm runs/<run>/export --candidates data/demo/candidates.json
    # CPU, 2 processes (no GPU needed)
    HWLOC_COMPONENTS=-gl OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 launch/select.py \\
        --prm runs/<run>/export --candidates data/demo/candidates.json --device cpu

`python launch/select.py --help` lists every flag (the same as `python -m dreamprm.select`).
"""
from __future__ import annotations

import os
import sys

# Python puts this script's folder first on sys.path, where this file would shadow the standard
# library's `select` module (imported by subprocess, which torch imports). Drop the folder first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch.distributed as dist  # noqa: E402

from dreamprm.distributed.engine import broadcast_object, init_distributed, shutdown  # noqa: E402
from dreamprm.select import parse_args, run  # noqa: E402


def gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects: a few floats per step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    box: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def main(argv: list[str]) -> int:
    config = parse_args(argv, prog="launch/select.py")
    info = init_distributed(config.device)
    code = 1
    try:
        code = run(config, rank=info.rank, world_size=info.world_size, device=info.device,
                   broadcast=broadcast_object, gather=gather_object)
    finally:
        # Every rank returns the same code (run broadcasts it), so all of them reach the barrier.
        shutdown(clean=code in (0, 2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
