"""``python -m theta``: the command line (see :mod:`theta._cli`)."""

import sys

from theta._cli import main

if __name__ == "__main__":
    sys.exit(main())
