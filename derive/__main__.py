"""``python -m derive``: parse arguments and call the API (see derive/cli.py)."""

from derive.cli import entry

if __name__ == "__main__":
    entry()
