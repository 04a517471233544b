"""Shared fixtures: the catalogue, derivations cached per session, the lecture's data when present."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from derive import catalogue, derive
from derive.emit import render
from derive.verify import load_module

REPO = Path(__file__).resolve().parents[1]


def derive_cli(*args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python -m derive ARGS``: in this process (the same ``main``, no interpreter start-up), or in
    a ``fresh`` one where start-up itself is under test."""
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "derive", *args], capture_output=True, text=True, cwd=REPO, timeout=300
        )
    from derive.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exc:  # --help
            status = int(exc.code or 0)
    return subprocess.CompletedProcess(["derive", *args], status, out.getvalue(), err.getvalue())


SHARED_NAMES = REPO.parent / "shared" / "data" / "names.txt"
OPS = list(catalogue())

_DERIVED: dict = {}


def derived(name: str):
    """(derivation, generated module) for a catalogue op, derived once per test session."""
    if name not in _DERIVED:
        d = derive(catalogue()[name])
        _DERIVED[name] = (d, load_module(render(d), name))
    return _DERIVED[name]


@pytest.fixture(params=OPS)
def op_name(request: pytest.FixtureRequest) -> str:
    return request.param


# -- running in parallel (pytest-xdist) ----------------------------------------------------------
# Each worker is a process of its own: one torch thread each, so two workers on two cores do not
# fight over them. Counters a test module records (how many random compositions were checked) are
# sent back by each worker and printed once, at the end of the run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

COUNTS: Counter = Counter()
_MERGED: Counter = Counter()


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a worker: hand the counts to the controller
        workeroutput["derive_counts"] = dict(COUNTS)


def pytest_testnodedown(node: Any, error: Any) -> None:
    _MERGED.update(getattr(node, "workeroutput", {}).get("derive_counts", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    counts = _MERGED + COUNTS
    if counts:
        terminalreporter.write_line(
            f"[test_properties] profile {os.environ.get('HYPOTHESIS_PROFILE', 'ci')!r}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        )
