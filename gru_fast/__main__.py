"""``python -m gru_fast``: the same command line as ``gru-fast`` (see :mod:`gru_fast.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
