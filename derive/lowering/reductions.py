"""Sums shared in the printed backward: a tensor summed over the same dims twice, or over dims
that hold the dims of another of its sums, is summed over those once.

The contraction planner reduces each factor over the dims only it has, one formula at a time, so
two gradients may sum one tensor alike: a group norm's ``dbeta = dout.sum((0, 3))`` and the
``dout.sum(3)`` an einsum of ``dx`` reads. Here they become ``r1 = dout.sum(3)``,
``dbeta = r1.sum(0)`` and the einsum reading ``r1``: one pass over ``dout``, the other over a
tensor a dim smaller.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

# a named tensor summed over given dims: ``dout.sum(3)``, ``t2.sum((0, 3))`` (not ``x.T.sum(0)``)
_SUM = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\.sum\((\d+|\(\d+(?:, \d+)+\))\)")


def _dims(text: str) -> frozenset[int]:
    return frozenset(int(d) for d in text.strip("()").split(", "))


def _dims_text(dims: list[int]) -> str:
    return str(dims[0]) if len(dims) == 1 else f"({', '.join(map(str, dims))})"


def _changed(lines: list[str], name: str) -> bool:
    """Whether ``lines`` assign ``name`` again or change it in place."""
    pattern = re.compile(rf"^{name} = |(?<![\w.]){name}\.\w+_\(|out={name}\b")
    return any(pattern.search(line) for line in lines)


def _shared(lines: list[str]) -> tuple[str, frozenset[int], list[int]] | None:
    """A tensor, dims it is summed over at two or more places (each over those dims or more), and
    the lines of those places; the most dims first. None if there is no such sum."""
    sums: dict[str, list[tuple[frozenset[int], int]]] = {}
    for k, line in enumerate(lines):
        if not line.startswith("del "):
            for m in _SUM.finditer(line):
                sums.setdefault(m.group(1), []).append((_dims(m.group(2)), k))
    for name, found in sums.items():
        for dims in sorted({d for d, _ in found}, key=lambda d: (-len(d), sorted(d))):
            at = [k for d, k in found if dims <= d]
            if len(at) > 1 and not _changed(lines[min(at) : max(at) + 1], name):
                return name, dims, at
    return None


def share_reductions(lines: list[str], fresh: Callable[[], str]) -> list[str]:
    """``lines`` with each sum of one tensor over dims it is summed over elsewhere too (alone or with
    more dims) computed once, into a temporary named by ``fresh()``.

    Example:
        >>> names = iter(["r1", "r2"])
        >>> share_reductions(["db = dout.sum((0, 3))", "t = f(dout.sum(3))"], lambda: next(names))
        ['r1 = dout.sum(3)', 'db = r1.sum(0)', 't = f(r1)']
    """
    out = list(lines)
    while (found := _shared(out)) is not None:
        name, dims, at = found
        temp = fresh()
        read = functools.partial(_from_partial, name=name, dims=dims, temp=temp)
        for k in at:
            out[k] = _SUM.sub(read, out[k])
        out.insert(min(at), f"{temp} = {name}.sum({_dims_text(sorted(dims))})")
    return out


def _from_partial(m: re.Match[str], name: str, dims: frozenset[int], temp: str) -> str:
    """The sum ``m`` read from ``temp``, ``name`` summed over ``dims`` (the rest of its dims summed)."""
    more = _dims(m.group(2))
    if m.group(1) != name or not dims <= more:
        return m.group(0)
    rest = sorted(d - sum(1 for s in dims if s < d) for d in more - dims)  # axes left after the first sum
    return f"{temp}.sum({_dims_text(rest)})" if rest else temp


__all__ = ["share_reductions"]
