"""Two-branch ``Piecewise`` values that are one linear function held between bounds, as a clamp.

The derivative of a Huber loss, ``Piecewise((u/β, |u| < β), (sign(u), True))``, is ``clamp(u/β, -1, 1)``:
the linear branch where ``u`` is within its bounds, and that branch's value at the bound outside.
As a select it costs a comparison, a sign, a division and a lerp over the full size; as a clamp,
one pass. The rewrite is exact, at the bounds too: it is made only where SymPy finds the other
branch equal to the linear one at the nearer bound (``k·β·sign(u) + m`` for ``|u| < β``), so both
forms are one function. Only values change here: every derivative was taken before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import sympy
from sympy.core.function import AppliedUndef

from ..indexalg import tensor_names
from .printer import is_constant
from .regions import Bounds, condition_bounds


def saturated(e: sympy.Expr) -> sympy.Expr:
    """``e`` with each two-branch ``Piecewise`` that is a linear function of one value clamped
    between constant bounds written as that clamp (``Min(Max(k·u + m, m - k·c), m + k·c)``).

    Example:
        >>> u, beta = sympy.Symbol("u", real=True), sympy.Symbol("beta", positive=True)
        >>> saturated(sympy.Piecewise((u / beta, sympy.Abs(u) < beta), (sympy.sign(u), True)))
        Min(1, Max(-1, u/beta))
    """
    if not e.has(sympy.Piecewise):
        return e
    return e.replace(_two_branches, _as_clamp)


def _two_branches(node: sympy.Basic) -> bool:
    return isinstance(node, sympy.Piecewise) and len(node.args) == 2 and node.args[1].cond == sympy.true


def _as_clamp(node: sympy.Piecewise) -> sympy.Expr:
    (a, cond), (b, _) = node.args
    if not isinstance(cond, sympy.core.relational.Relational):  # an And or Or bounds other values too
        return node
    for linear, edge, holds in ((a, b, True), (b, a, False)):  # the linear branch where cond holds, or fails
        for value, low, high in _intervals(condition_bounds(cond, holds)):
            clamp = _clamp(linear, edge, value, low, high)
            if clamp is not None:
                return clamp
    return node


def _intervals(bounds: Bounds) -> list[tuple[sympy.Expr, sympy.Expr | None, sympy.Expr | None]]:
    """Each value a region bounds by constants, with its lower and upper bound (None: unbounded)."""
    found: dict[sympy.Expr, list[sympy.Expr | None]] = {}
    for value, bound, upper in bounds:
        if isinstance(value, sympy.Abs) or is_constant(value) or not is_constant(bound):
            continue
        found.setdefault(value, [None, None])[1 if upper else 0] = bound
    return [(value, low, high) for value, (low, high) in found.items()]


def _clamp(
    linear: sympy.Expr, edge: sympy.Expr, value: sympy.Expr, low: sympy.Expr | None, high: sympy.Expr | None
) -> sympy.Expr | None:
    """``k·clamp(value, low, high) + m`` where ``linear`` is ``k·value + m`` and ``edge`` is its value
    at the bound beyond which it is taken; None where either is not so (or the bounds are not ±c)."""
    z = sympy.Dummy("z", real=True)
    at_z = _in_terms_of(value, z)
    if at_z is None:
        return None
    on, off = at_z(linear), at_z(edge)
    k = sympy.diff(on, z)
    m = sympy.expand(on - k * z)
    if k == 0 or k.has(z) or m.has(z) or not all(is_constant(c) and not tensor_names(c) for c in (k, m)):
        return None  # (k·clamp(x - y) + y for x is not x in floating point: the slope and shift are constants)
    if low is not None and high is not None:
        if not (high.is_positive and sympy.expand(low + high) == 0):  # |u| < c only: one branch outside
            return None
        target = k * high * sympy.sign(z) + m
    else:
        target = k * (high if high is not None else low) + m
    if sympy.expand(off - target) != 0 or not (k.is_positive or k.is_negative):
        return None
    # the linear branch as written, held between its own values at the bounds: where it is taken the
    # same operations, and beyond a bound exactly that value (β·(1/β) would be 0.99999994 at β = 41)
    line = linear
    ends = [None if b is None else sympy.expand(k * b + m) for b in (low, high)]
    lowest, highest = ends if k.is_positive else ends[::-1]
    if lowest is not None:
        line = sympy.Max(line, lowest)
    return line if highest is None else sympy.Min(line, highest)


def _in_terms_of(value: sympy.Expr, z: sympy.Dummy) -> Callable[[sympy.Expr], sympy.Expr] | None:
    """A map writing expressions in ``z`` for ``value``, by solving ``value`` for one tensor entry
    (or value symbol) it holds with a numeric coefficient (``x - y = z`` as ``x = z + y``); None if none is such."""
    values = [a for a in value.atoms(AppliedUndef, sympy.Symbol) if not is_constant(a)]
    for entry in sorted(values, key=sympy.default_sort_key):
        coefficient = sympy.diff(value, entry)
        if coefficient.is_number and coefficient != 0:
            solved = (z - value.xreplace({entry: sympy.S.Zero})) / coefficient
            if sympy.expand(value.xreplace({entry: solved}) - z) == 0:
                return functools.partial(_written_in, {entry: solved})
    return None


def _written_in(mapping: dict[sympy.Basic, sympy.Expr], e: sympy.Expr) -> sympy.Expr:
    return sympy.expand(e.xreplace(mapping))


__all__ = ["saturated"]
