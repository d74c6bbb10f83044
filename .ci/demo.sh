#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the bundled demo: 2 ranks, ZeRO-3, tiny offline model.
# The README's first command. Extra arguments go to launch/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export HWLOC_COMPONENTS=-gl PATH="$PWD/.venv/bin:$PATH"
ngpu=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
exec .venv/bin/deepspeed --num_gpus "$(( ngpu > 0 ? ngpu : 2 ))" launch/train.py --deepspeed ds_configs/zero3.json "$@"
