#!/usr/bin/env bash
# Sets up everything DreamPRM-DS needs on a fresh Debian/Ubuntu machine, idempotently:
#   system packages (as root): Open MPI for mpi4py; Slurm + munge, Chromium, and openssh-server + pdsh
#   (the tests start a private sshd of their own for `deepspeed --hostfile`) for the tests;
#   a virtual environment in .venv with torch (CPU build pinned where there is no GPU), then the
#   package and its test extras.
# Usage: bash .ci/setup.sh            (then use .venv/bin/python, .venv/bin/deepspeed)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for pkg in libopenmpi-dev openmpi-bin slurmctld slurmd slurm-client munge chromium openssh-server pdsh; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q torch
  else
    .venv/bin/pip install -q torch==2.13.0   # the CPU build; unpinned pulls a multi-GB CUDA build
  fi
fi
# DS_BUILD_OPS=0: DeepSpeed's ops are JIT-built where they are used (none on CPU).
.venv/bin/python -c "import dreamprm, deepspeed, playwright, math_verify" 2>/dev/null \
  || DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[test]"
