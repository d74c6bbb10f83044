#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. The README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
export HWLOC_COMPONENTS=-gl PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
