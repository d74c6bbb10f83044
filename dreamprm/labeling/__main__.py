"""``python -m dreamprm.labeling``: the same as ``dreamprm-label`` (`dreamprm.labeling.run`)."""
import sys

from dreamprm.labeling.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dreamprm.labeling"))
