"""``python -m dreamprm.bestofn``: Best-of-N selection in one process (`dreamprm.bestofn.run`)."""
import sys

from dreamprm.bestofn.run import main

if __name__ == "__main__":
    sys.exit(main())
