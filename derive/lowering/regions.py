"""Values inside a branch of a ``Piecewise``, evaluated on what they read clamped to the branch's region.

A select computed by arithmetic on a float mask (:class:`.printer.Select`) evaluates both branches
everywhere, so a branch must stay finite where it is not taken. An ELU's
``Piecewise((u, u > 0), (exp(u) - 1, True))`` is infinite at ``u = 100`` in float32, in the branch
not taken there, and so it kept ``torch.where`` on a bool mask, about ten times slower on a CPU.
Within the second branch ``u <= 0``, so ``exp(u)`` is ``exp(min(u, 0))``: the same value where the
branch is taken, and at most 1 everywhere. The gradients' branches are rewritten the same way, so
the forward and the backward share one saved ``exp(min(u, 0))``. Only values: derivatives were
taken before this, from the forward as written. A branch that squares or multiplies values its
region bounds between two numbers (a hardswish's ``u·(u + 3)/6`` where ``-3 < u < 3``) reads them
clamped the same way, and is then bounded everywhere.

Autograd's reference forward has the converse problem: ``torch.where`` sends a zero gradient to
the branch not taken, and zero times an infinite or NaN derivative there (``sqrt`` of a negative
value, ``exp(100)``) is NaN. :func:`guarded` evaluates such a branch on its bounded values
clamped to its region's bounds: the same function, so autograd's gradient of it checks derive's.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
from sympy.core.function import AppliedUndef

from ..indexalg import is_entry
from ..simplify import plain_step_arguments
from .finite import at_most_one
from .printer import is_constant, is_mask_step


def clamped(e: sympy.Expr) -> sympy.Expr:
    """:func:`in_branches`, then each ``exp`` in a product with a step, or in the value a min or max
    with a number takes, of its argument clamped to where that value counts (:func:`in_steps`)."""
    return in_steps(in_branches(e))


def in_steps(e: sympy.Expr) -> sympy.Expr:
    """Each ``exp`` beside a step, of its argument clamped to the step's region, and each ``exp`` in
    ``g`` of ``min(c, g)`` (``max(c, g)``) for a number ``c``, clamped to where ``g <= c`` (``>=``).

    A CELU written ``max(0, u) + min(0, α·(exp(u/α) - 1))`` has the derivative
    ``step(-u)·exp(u/α) + step(u)``, and ``0·exp(u/α)`` is NaN where ``exp(u/α)`` overflows (``u > 88α``
    in float32). Where the step is 1, ``u <= 0``, so ``exp(min(u, 0)/α)`` is the same value, and it
    is at most 1 everywhere. The min takes ``g`` only where ``g <= 0``, which is ``u <= 0`` too
    (:func:`derive.simplify.plain_step_arguments`), and elsewhere ``g`` clamped is ``g`` at the
    bound, 0: the same value again, so the forward and the backward share one ``exp``.

    Example:
        >>> u, a = sympy.Symbol("u", real=True), sympy.Symbol("alpha", positive=True)
        >>> in_steps(sympy.Heaviside(-u, 1) * sympy.exp(u / a))
        exp(Min(0, u)/alpha)*Heaviside(-u, 1)
    """
    if not e.has(sympy.exp) or not e.has(sympy.Heaviside, sympy.Min, sympy.Max):
        return e

    def rewrite(node: sympy.Expr) -> sympy.Expr:
        if isinstance(node, sympy.Mul):
            steps = [f for f in node.args if is_mask_step(f)]
            bounds = [b for s in steps for b in _step_bounds(s)]
            if not bounds:
                return node
            return sympy.Mul(*(f if f in steps else _clamp_exps(f, bounds) for f in node.args))
        constants = [a for a in node.args if is_constant(a)]
        values = [a for a in node.args if not is_constant(a)]
        if len(constants) != 1 or len(values) != 1 or not values[0].has(sympy.exp):
            return node
        (c,), (g,) = constants, values
        if c != 0 or not _k_times_exp_minus_one(g):
            return node  # k·(exp(v) - 1) at v = 0 is 0 in floats too; 2·exp(log(1/3)) - 2/3 and 0.3 + 1 - 1 are not
        below = isinstance(node, sympy.Min)  # the min takes g where g <= c
        bounds = _step_bounds(plain_step_arguments(sympy.Heaviside(c - g if below else g - c, 1)))
        if not all(bound == 0 for _, bound, _ in bounds):
            return node
        return node.func(c, _clamp_exps(g, bounds))

    return e.replace(lambda n: isinstance(n, (sympy.Mul, sympy.Min, sympy.Max)), rewrite)


def _k_times_exp_minus_one(g: sympy.Expr) -> bool:
    """Whether ``g`` is ``k·exp(v) - k`` for a ``k`` that reads no tensor."""
    terms = sympy.Add.make_args(sympy.expand(g))
    exps = [t for t in terms if t.has(sympy.exp)]
    if len(terms) != 2 or len(exps) != 1:
        return False
    k, power = exps[0].as_independent(sympy.exp)
    (rest,) = (t for t in terms if t is not exps[0])
    return isinstance(power, sympy.exp) and k != 0 and is_constant(k) and sympy.expand(rest + k) == 0


def _step_bounds(step: sympy.Expr) -> Bounds:
    """What a step being 1 says about values: ``step(u - c)`` is ``u >= c``; ``step(c - u)``, ``u <= c``."""
    if not is_mask_step(step):
        return []
    arg = step.args[0]
    c = -sympy.Add(*(t for t in sympy.Add.make_args(arg) if is_constant(t)))
    u = arg + c
    if is_constant(u):
        return []
    return [(-u, -c, True)] if u.could_extract_minus_sign() else [(u, c, False)]


def in_branches(e: sympy.Expr) -> sympy.Expr:
    """``e`` with each ``exp`` in a ``Piecewise`` branch whose argument the branch's region bounds
    above evaluated on the clamped argument (``exp(Min(u, 0))`` where ``u <= 0``), and each
    polynomial branch of degree 2 or more read on values clamped between its region's bounds.

    Example:
        >>> u = sympy.Symbol("u", real=True)
        >>> in_branches(sympy.Piecewise((u, u > 0), (sympy.exp(u) - 1, True)))
        Piecewise((u, u > 0), (exp(Min(0, u)) - 1, True))
    """
    return _each_branch(e, lambda value, bounds: _clamp_polynomial(_clamp_exps(value, bounds), bounds))


Bounds = list[tuple[sympy.Expr, sympy.Expr, bool]]  # (value, bound, whether it is an upper one)


def _each_branch(e: sympy.Expr, rewrite: Callable[[sympy.Expr, Bounds], sympy.Expr]) -> sympy.Expr:
    """``e`` with each ``Piecewise`` branch's value rewritten given the bounds its region sets
    (its own condition, and the negations of the conditions before it)."""

    def branches(node: sympy.Piecewise) -> sympy.Expr:
        args: list[tuple[sympy.Expr, sympy.Basic]] = []
        earlier: list[sympy.Basic] = []
        for value, cond in node.args:
            bounds = condition_bounds(cond, True) + [b for c in earlier for b in condition_bounds(c, False)]
            args.append((rewrite(value, bounds), cond))
            earlier.append(cond)
        return sympy.Piecewise(*args)

    if not e.has(sympy.Piecewise):
        return e
    return e.replace(lambda n: isinstance(n, sympy.Piecewise), branches)


def _clamp_polynomial(value: sympy.Expr, bounds: Bounds) -> sympy.Expr:
    """A branch of degree 2 or more in values its region bounds on both sides (a hardswish's
    ``u·(u + 3)/6`` where ``-3 < u < 3``), read on those values clamped: bounded everywhere."""
    clamps = _two_sided(bounds)
    entries = value.atoms(AppliedUndef)
    if not clamps or not entries or not value.is_polynomial(*entries):
        return value
    if sympy.Poly(value, *entries).total_degree() < 2:
        return value
    inside = value.xreplace(clamps)
    unclamped = inside.xreplace({c: sympy.Dummy() for c in clamps.values()}).atoms(AppliedUndef)
    return value if unclamped else inside


def _two_sided(bounds: Bounds) -> dict[sympy.Expr, sympy.Expr]:
    """Each value with a numeric bound on both sides, clamped between them."""
    out: dict[sympy.Expr, sympy.Expr] = {}
    for u in dict.fromkeys(b[0] for b in bounds):
        lows = [c for v, c, upper in bounds if v == u and not upper and c.is_number]
        highs = [c for v, c, upper in bounds if v == u and upper and c.is_number]
        if lows and highs:
            out[u] = sympy.Min(sympy.Max(u, *lows), *highs)
    return out


def guarded(e: sympy.Expr) -> sympy.Expr:
    """``e`` with each bounded value in a transcendental ``Piecewise`` branch clamped to the
    branch's region: the same value where the branch is taken, its boundary elsewhere.

    Example:
        >>> u = sympy.Symbol("u", real=True)
        >>> guarded(sympy.Piecewise((sympy.sqrt(u), u > 0), (u, True)))
        Piecewise((sqrt(Max(0, u)), u > 0), (u, True))
    """
    return _each_branch(e, lambda value, bounds: _clamped_in(value, _clamps(bounds)) if _singular(value) else value)


def _clamped_in(value: sympy.Expr, clamps: dict[sympy.Expr, sympy.Expr]) -> sympy.Expr:
    """``value`` reading each bounded value clamped, where it stands whole (``sqrt(u)``) or as the
    terms of a larger sum, either sign (``sqrt(a - b + 1)`` for ``b < a``: ``sqrt(Max(a - b, 0) + 1)``)."""
    out = value.xreplace(clamps)
    for u, clamp in clamps.items():
        if not isinstance(u, sympy.Add):
            continue
        for sign in (1, -1):
            terms = set(sympy.Add.make_args(sympy.expand(sign * u)))

            def holds(n: sympy.Basic, terms: set = terms, sign: int = sign) -> bool:
                return isinstance(n, sympy.Add) and (terms < set(n.args) or (sign < 0 and terms == set(n.args)))

            def clamped_sum(
                n: sympy.Expr, terms: set = terms, sign: int = sign, clamp: sympy.Expr = clamp
            ) -> sympy.Expr:
                return sign * clamp + sympy.Add(*(t for t in n.args if t not in terms))

            out = out.replace(holds, clamped_sum)
    return out


def _singular(value: sympy.Expr) -> bool:
    """Whether ``value`` may be infinite or NaN somewhere: it has more than a polynomial's operations."""
    return any(
        isinstance(n, sympy.Function) or (isinstance(n, sympy.Pow) and not (n.exp.is_Integer and n.exp >= 0))
        for n in sympy.preorder_traversal(value)
        if not isinstance(n, (sympy.Max, sympy.Min, sympy.Abs, sympy.Piecewise)) and not is_entry(n)
    )


def _clamps(bounds: Bounds) -> dict[sympy.Expr, sympy.Expr]:
    """Each bounded value, clamped to its bounds: ``Max(u, c)`` for ``u >= c``, ``Min(u, c)`` for ``u <= c``."""
    out: dict[sympy.Expr, sympy.Expr] = {}
    for u, c, upper in bounds:
        inner = out.get(u, u)
        out[u] = sympy.Min(inner, c) if upper else sympy.Max(inner, c)
    return out


def condition_bounds(cond: sympy.Basic, holds: bool) -> Bounds:
    """What ``cond`` (or its negation) says about values: ``(u, c, True)`` for ``u <= c``, ``False`` for ``u >= c``."""
    if isinstance(cond, (sympy.And, sympy.Or)):
        if isinstance(cond, sympy.And) == holds:  # every part holds, or every part fails
            return [b for c in cond.args for b in condition_bounds(c, holds)]
        return []
    if not isinstance(cond, (sympy.StrictGreaterThan, sympy.GreaterThan, sympy.StrictLessThan, sympy.LessThan)):
        return []
    lhs, rhs = cond.lhs, cond.rhs
    upper = isinstance(cond, (sympy.StrictLessThan, sympy.LessThan)) == holds  # lhs below rhs
    if is_constant(lhs) and not is_constant(rhs):
        lhs, rhs, upper = rhs, lhs, not upper
    if is_constant(rhs) and isinstance(lhs, sympy.Abs) and upper:  # |u| <= c: -c <= u <= c
        return [(lhs, rhs, True), (lhs.args[0], rhs, True), (lhs.args[0], -rhs, False)]
    if is_constant(rhs) and not is_constant(lhs):
        return [(lhs, rhs, upper)]
    if not is_constant(lhs) and not is_constant(rhs):  # u > v bounds u - v
        return [(lhs - rhs, sympy.S.Zero, upper)]
    return []


def _clamp_exps(value: sympy.Expr, bounds: Bounds) -> sympy.Expr:
    """Each ``exp(arg)`` in ``value`` that may exceed 1, of the bounded values clamped if that makes it at most 1."""
    if not bounds or not value.has(sympy.exp):
        return value

    def clamp(node: sympy.Expr) -> sympy.Expr:
        arg = node.args[0]
        if at_most_one(arg):
            return node
        mapping = {u: (sympy.Min(u, c) if upper else sympy.Max(u, c)) for u, c, upper in bounds}
        inside = arg.xreplace(mapping)
        return sympy.exp(inside) if at_most_one(inside) else node

    return value.replace(lambda n: isinstance(n, sympy.exp), clamp)


__all__ = ["Bounds", "clamped", "condition_bounds", "guarded", "in_branches", "in_steps"]
