"""``python -m derive``: parse arguments and call the API (see derive/cli.py)."""

import time

_STARTED = time.perf_counter()

import sys  # noqa: E402

from derive.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(started=_STARTED))
