"""Best-of-N selection on several processes: each rank scores a contiguous slice of the questions,
rank 0 gathers the step scores and writes the same selection and report as one process would.

    torchrun --nproc_per_node 4 launch/bestofn.py --prm runs/<run>/export --candidates data/demo/candidates.json
    deepspeed --num_gpus 4 launch/bestofn.py --prm runs/<run>/export --candidates data/demo/candidates.json
    # CPU, 2 processes (no GPU needed)
    HWLOC_COMPONENTS=-gl OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 launch/bestofn.py \\
        --prm runs/<run>/export --candidates data/demo/candidates.json --device cpu

`python launch/bestofn.py --help` lists every flag (the same as `python -m dreamprm.bestofn`).
"""
from __future__ import annotations

import os
import sys

# The repository root on the import path, so that dreamprm/ imports without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamprm.bestofn.config import parse_args  # noqa: E402
from dreamprm.config import EXIT_USER_ERROR  # noqa: E402


def main(argv: list[str]) -> int:
    config = parse_args(argv, prog="launch/bestofn.py")
    # After parsing: --help and a bad flag answer without importing torch or DeepSpeed.
    from dreamprm.bestofn.run import run
    from dreamprm.distributed.collectives import gather_object
    from dreamprm.distributed.engine import broadcast_object, init_distributed, shutdown

    info = init_distributed(config.device)
    code = 1
    try:
        code = run(config, rank=info.rank, world_size=info.world_size, device=info.device,
                   broadcast=broadcast_object, gather=gather_object)
    finally:
        # Every rank returns the same code (run broadcasts it), so all of them reach the barrier.
        shutdown(clean=code in (0, EXIT_USER_ERROR))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
