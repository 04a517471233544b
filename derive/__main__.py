"""``python -m derive``: parse arguments and call the API (see derive/cli.py)."""

import time

_STARTED = time.perf_counter()

import sys

from derive.cli import main

if __name__ == "__main__":
    sys.exit(main(started=_STARTED))
