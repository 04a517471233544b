"""Shared fixtures: the catalogue, derivations cached per session, the lecture's data when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from derive import catalogue, derive
from derive.emit import render
from derive.verify import load_module

REPO = Path(__file__).resolve().parents[1]
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
