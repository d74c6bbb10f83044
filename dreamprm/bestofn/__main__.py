"""``python -m dreamprm.bestofn``: Best-of-N selection in one process (`dreamprm.bestofn.run`)."""
import sys

from dreamprm.bestofn.config import parse_args

if __name__ == "__main__":
    config = parse_args()  # --help and a bad flag answer before torch is imported (run imports it)
    from dreamprm.bestofn.run import run
    sys.exit(run(config))
