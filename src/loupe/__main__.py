"""``python -m loupe``: the console script, for launchers that start a module (``torchrun -m loupe train ...``)."""

import sys

from loupe.cli import main

if __name__ == "__main__":
    sys.exit(main())
