#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the bundled demo: ZeRO-3, the tiny offline model,
# 2 ranks on CPU (one per GPU where there are GPUs). The README's first command.
# Extra arguments go to launch/train.py and override the demo settings below.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export HWLOC_COMPONENTS=-gl PATH="$PWD/.venv/bin:$PATH"
ngpu=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -gt 0 ]; then ranks=$ngpu; precision=bf16; else ranks=2; precision=fp32; fi
# Demo settings: a global batch of 16 and meta batch of 8 keep the one-batch hypergradient out of
# the noise with 4 domains; fp32 on CPU (bf16 matmuls are slow there). Every 20 steps the PRM picks
# the best of the demo's 4 candidate chains per question (eval/best_of_N in TensorBoard).
exec .venv/bin/deepspeed --num_gpus "$ranks" --master_port "${MASTER_PORT:-29500}" launch/train.py --deepspeed ds_configs/zero3.json \
  --weights_path runs/demo --batch_size $((16 / ranks > 0 ? 16 / ranks : 1)) --meta_batch_size $((8 / ranks > 0 ? 8 / ranks : 1)) \
  --lr 1e-3 --meta_lr 0.1 --iteration_num 200 --precision "$precision" \
  --eval_candidates data/demo/candidates.json --eval_every 20 "$@"
