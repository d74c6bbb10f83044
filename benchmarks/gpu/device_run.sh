#!/usr/bin/env bash
# One prepared run on a GPU machine that reaches no package registry: the checks
# that need a GPU, most important first, each under its own time limit, each writing its JSON to $OUT
# as soon as it ends, so that a run cut short keeps what it measured.
#   1. the hypergradient at the Qwen2-VL-2B config in bf16, the users' defaults (pairwise, exact with
#      fp32 upper passes), against the float64 reference on the same card (4 records, 4 meta chains:
#      the float64 reference's attention at 8 + 4 images of 448x448 did not fit in 141 GiB);
#   2. the scalar and the generative head through the real trainer (benchmarks/gpu/heads.py);
#   3. (time left) the same check as 1 with the upper passes in bf16 (`--upper_precision engine`);
#   4. (time left) the generative head's hypergradient as in 1.
# Run from the repository root, with .whl/ holding wheels for that machine's Python (fetched beforehand
# with `pip download`: a pure-Python deepspeed, pydantic, and transformers 5.25 with its dependencies,
# the version this project is tested with):
#   bash benchmarks/gpu/device_run.sh            # BUDGET_S (default 480) bounds the optional stages
#   NO_INSTALL=1 TINY=1 PATH=.venv/bin:$PATH bash benchmarks/gpu/device_run.sh   # smoke test on CPU
set -u
OUT=${OUT:-/tmp/dreamprm-device-out}
WORK=${WORK:-/tmp/dreamprm-device-work}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HWLOC_COMPONENTS=-gl USE_HUB_KERNELS=0  # and dreamprm loads with use_kernels=False
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/stages.log"; }

ARCH=QWEN2VL_2B SIDE=448 HEADS_FLAGS=""
[[ -n ${TINY:-} ]] && ARCH=TINY SIDE=56 HEADS_FLAGS="--tiny"
if [[ -n ${NO_INSTALL:-} ]]; then export PYTHONPATH=$PWD
else
# without `kernels`: with it, transformers on CUDA fetches activation kernels from the hub (unreachable)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v /kernels-) && export PYTHONPATH=/tmp/site:$PWD || exit 1
if ! python3 -c "import transformers, deepspeed, dreamprm.model.prm, dreamprm.trainer" 2>"$OUT/import_error.txt"; then
  # the carried transformers does not import here: the machine's own, with deepspeed and pydantic only
  log "carried transformers failed to import ($(tail -1 "$OUT/import_error.txt")); using the machine's"
  rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/deepspeed-*.whl .whl/hjson-*.whl .whl/pydantic*.whl .whl/annotated_types-*.whl .whl/typing_*.whl || exit 1
fi
fi
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__,
'deepspeed', deepspeed.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/versions.txt" 2>&1

log "build the model ($ARCH)"
python3 -c "
import sys; sys.path.insert(0, 'benchmarks/gpu')
from pathlib import Path
import bench
bench.build_model_dir(Path('$WORK/model'), getattr(bench, '$ARCH'), $SIDE)" > "$OUT/build.log" 2>&1 || { log "build failed"; tail -20 "$OUT/build.log"; exit 1; }

# torch's AdamW instead of DeepSpeed's FusedAdam: its JIT build fails on this machine's arch list
# ('9.0a') and would cost minutes; the optimizer step is the same for both heads and no estimator takes one.
export TORCH_CUDA_ARCH_LIST=9.0
python3 -c "import json; c = json.load(open('ds_configs/zero3.json')); c['optimizer']['params']['torch_adam'] = True
json.dump(c, open('$WORK/zero3.json', 'w'))"

fidelity() {  # name, time limit, extra flags
  local name=$1 limit=$2; shift 2
  log "fidelity $name"
  timeout "$limit" python3 benchmarks/hypergrad_fidelity.py --reward_model "$WORK/model" --precision bf16 \
    --meta_loss pairwise --aggregation mean_logit --reference --radii 1e-2,1e-3 --repeats 2 \
    --global_batch 4 --meta_global 4 \
    --deepspeed "$WORK/zero3.json" --out "$OUT/fidelity_$name.json" "$@" > "$OUT/fidelity_$name.log" 2>&1
  log "fidelity $name: exit $?"; tail -4 "$OUT/fidelity_$name.log"
}

fidelity bf16_hidden 100 --head hidden
log "heads"
timeout 330 python3 benchmarks/gpu/heads.py $HEADS_FLAGS --deepspeed "$WORK/zero3.json" --workdir "$WORK" --segments 1 --out "$OUT/heads.json" \
  > "$OUT/heads.log" 2>&1
log "heads: exit $?"; tail -4 "$OUT/heads.log"
if (( SECONDS < BUDGET_S - 90 )); then fidelity bf16_engine_hidden 90 --head hidden --upper_precision engine; fi
if (( SECONDS < BUDGET_S - 90 )); then fidelity bf16_generative 90 --head generative; fi
log "done"
