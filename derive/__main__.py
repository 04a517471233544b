"""``python -m derive``: parse arguments and call the API (see derive/cli.py)."""

import sys

from derive.cli import main

if __name__ == "__main__":
    sys.exit(main())
