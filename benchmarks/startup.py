"""``python -m benchmarks.startup``: wall time of ``python -m derive batchnorm`` against a bare import.

Both commands run as fresh processes, interleaved (so a change of load hits both alike), after one
untimed run of each that warms the file cache and derive's module cache. Prints the medians, their
ratio and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

BARE = [sys.executable, "-c", "import torch, sympy"]
DERIVE = [sys.executable, "-m", "derive", "batchnorm", "--no-write"]


def wall(argv: list[str]) -> float:
    """Seconds from start to exit of one process."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(runs: int) -> dict[str, list[float]]:
    """``runs`` interleaved timings of each command, after one warm-up run of each."""
    wall(BARE), wall(DERIVE)
    times: dict[str, list[float]] = {"bare": [], "derive": []}
    for _ in range(runs):
        times["bare"].append(wall(BARE))
        times["derive"].append(wall(DERIVE))
    return times


def report(times: dict[str, list[float]]) -> str:
    bare, derive = statistics.median(times["bare"]), statistics.median(times["derive"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join(
        [
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"1-min load {load:.1f}; {len(times['bare'])} interleaved runs each, medians",
            "",
            "| command | wall, s (median) | runs, s |",
            "|---|---|---|",
            f"| `python -c \"import torch, sympy\"` | {bare:.2f} | {', '.join(f'{t:.2f}' for t in times['bare'])} |",
            f"| `python -m derive batchnorm --no-write` | {derive:.2f} | {', '.join(f'{t:.2f}' for t in times['derive'])} |",
            "",
            f"derive batchnorm / bare import: {derive / bare:.2f}x",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each command (default 7)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print(report(measure(args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
