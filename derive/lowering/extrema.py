"""A ``Piecewise`` that picks a value or a number by comparing that value with numbers is a clamp.

Users write a hardtanh as ``Piecewise((-1, u < -1), (1, u > 1), (u, True))``; evaluated as
written, that is four comparisons and their arithmetic, where ``torch.clamp(u, -1, 1)`` is one
pass. Such a ``Piecewise`` is a function of one value whose pieces are that value or a number,
with breaks at the numbers it compares with: two such functions agree everywhere when they agree
at each break and at two points inside each interval between (or beyond) the breaks, which exact
rational arithmetic checks. Only values change: derivatives were taken from the ``Piecewise``.
"""

from __future__ import annotations

from itertools import product

import sympy

from .printer import is_constant

_RELATIONS = (sympy.StrictGreaterThan, sympy.GreaterThan, sympy.StrictLessThan, sympy.LessThan)


def as_extrema(e: sympy.Expr) -> sympy.Expr:
    """``e`` with each ``Piecewise`` that equals ``max(u, a)``, ``min(u, b)`` or
    ``min(max(u, a), b)`` of a value ``u`` and numbers written so.

    Example:
        >>> u = sympy.Symbol("u", real=True)
        >>> as_extrema(sympy.Piecewise((-1, u < -1), (1, u > 1), (u, True)))
        Min(1, Max(-1, u))
    """
    if not e.has(sympy.Piecewise):
        return e
    return e.replace(lambda n: isinstance(n, sympy.Piecewise), _extremum)


def _extremum(node: sympy.Piecewise) -> sympy.Expr:
    found = _value_and_numbers(node)
    if found is None:
        return node
    u, numbers = found
    points = _test_points(numbers)
    candidates = [sympy.Max(u, a) for a in numbers] + [sympy.Min(u, b) for b in numbers]
    candidates += [sympy.Min(sympy.Max(u, a), b) for a, b in product(numbers, numbers) if a < b]
    for candidate in candidates:
        if all(node.xreplace({u: t}) == candidate.xreplace({u: t}) for t in points):
            return candidate
    return node


def _value_and_numbers(node: sympy.Piecewise) -> tuple[sympy.Expr, list[sympy.Expr]] | None:
    """The one value ``node`` compares and may equal, and the numbers it compares it with or
    equals; None when it reads anything else."""
    values = {v for v, _ in node.args if not v.is_number}
    if len(values) != 1:
        return None
    (u,) = values
    numbers = {v for v, _ in node.args if v.is_number}
    for _, cond in node.args:
        for rel in _relations(cond):
            if rel is None:
                return None
            sides = {rel.lhs, rel.rhs}
            if u not in sides or not all(s == u or (s.is_number and is_constant(s)) for s in sides):
                return None
            numbers |= sides - {u}
    if not numbers or not all(n.is_real and n.is_finite for n in numbers):
        return None
    return u, sorted(numbers)


def _relations(cond: sympy.Basic) -> list[sympy.Basic | None]:
    """The comparisons a condition is made of (None for a part that is not one)."""
    if cond == sympy.true:
        return []
    if isinstance(cond, (sympy.And, sympy.Or)):
        return [r for c in cond.args for r in _relations(c)]
    return [cond if isinstance(cond, _RELATIONS) else None]


def _test_points(numbers: list[sympy.Expr]) -> list[sympy.Expr]:
    """Each break, and two points inside each interval between and beyond the breaks."""
    points = list(numbers) + [numbers[0] - 1, numbers[0] - 2, numbers[-1] + 1, numbers[-1] + 2]
    for a, b in zip(numbers, numbers[1:]):
        points += [a + (b - a) / 3, a + 2 * (b - a) / 3]
    return points


__all__ = ["as_extrema"]
