"""A cleaned training file from an instance-weight report (`dreamprm.clean`; `dreamprm-clean` once installed).

    python launch/clean.py --report runs/clean/instance_weights.jsonl --drop 5% --out train.cleaned.json

`python launch/clean.py --help` lists every flag.
"""
from __future__ import annotations

import os
import sys

# The repository root on the import path, so that dreamprm/ imports without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamprm.clean import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/clean.py"))
