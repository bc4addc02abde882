"""``python -m theta`` and the ``theta`` command: the command line (see :mod:`theta._cli`)."""

import sys

_EXIT_INTERRUPTED = 130


def run() -> int:
    """Run the command line; Ctrl-C while it is still importing exits 130 quietly too."""
    try:
        from theta._cli import main
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    return main()


if __name__ == "__main__":
    sys.exit(run())
