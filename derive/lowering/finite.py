"""Which values stay finite wherever the forward's inputs are: where a select may be arithmetic.

On a CPU, PyTorch runs ``torch.where`` (and anything else that reads a bool mask) as a scalar
loop, about ten times the time of a vectorised pass. Arithmetic on a float 0/1 mask is fast, but
``inf * 0`` is NaN where ``where`` would have picked the other value. So the lowering selects by
arithmetic only where neither value can be infinite or NaN:

- :func:`stays_finite`: a backward with no division by a value and no log of one multiplies by
  masks (``MaskingPrinter``);
- :func:`finite_values` and :meth:`Finite.selectable`: a ``Piecewise`` whose two values are at
  most linear in the inputs (a forward value counts with its own degree: ``x @ W`` is 2) and in
  the gradients becomes ``torch.lerp(b, a, mask)``, exact for a 0/1 mask
  (:class:`.printer.Select`). A square overflows float16 at 256, where ``torch.where`` would have
  picked the other branch; a linear branch overflows only within a factor 2 of the dtype's
  largest value, which is accepted;
- :func:`bound`: a number an expression never exceeds (``Min(u, 0)``, ``-Abs(u)``), so that
  ``exp`` of one at most 0 counts as bounded (:mod:`.regions` clamps an ``exp`` to its branch).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sympy
from sympy.core.function import AppliedUndef

from ..autodiff import grad_name
from ..indexalg import ArgMax, IMax, ISum, entry_name, is_entry, is_index
from ..program import Program, Statement
from .printer import Select, is_constant

# functions with a pole or a log singularity at a finite argument
_POLES = (
    sympy.log,
    sympy.tan,
    sympy.cot,
    sympy.sec,
    sympy.csc,
    sympy.atanh,
    sympy.acoth,
    sympy.loggamma,
    sympy.digamma,
)
# functions bounded whatever their (finite) argument: (lowest, highest)
_RANGES = {
    sympy.sign: (-1, 1),
    sympy.Heaviside: (0, 1),
    sympy.KroneckerDelta: (0, 1),
    sympy.tanh: (-1, 1),
    sympy.erf: (-1, 1),
    sympy.erfc: (0, 2),
    sympy.sin: (-1, 1),
    sympy.cos: (-1, 1),
    sympy.atan: (-sympy.pi / 2, sympy.pi / 2),
}
_LIMITED = tuple(_RANGES)


def stays_finite(e: sympy.Expr, overflowing: frozenset[str] = frozenset()) -> bool:
    """Whether ``e`` is finite wherever the forward's values are: no division by a value, no log of
    one, and no step beside an exp that may overflow (``overflowing``: kept values that are such
    exps, ``exp(u/a)`` of a tensor ``a``, which no region clamps).

    Such a backward may multiply by a 0/1 mask (``MASKING``); one that may divide by 0 where a
    step is 0 (``sqrt(relu(x))``), or multiply inf by it, keeps ``torch.where``, which gives 0 there
    as autograd does.
    """
    for node in sympy.preorder_traversal(e):
        if isinstance(node, sympy.Pow) and node.exp.is_negative is not False and not is_constant(node.base):
            return False
        if isinstance(node, _POLES) and not is_constant(node):
            return False
        if (
            isinstance(node, sympy.Mul)
            and node.has(sympy.Heaviside)
            and any(_may_overflow(f, overflowing) for f in node.args)
        ):
            return False
    return True


def may_overflow(e: sympy.Expr) -> bool:
    """Whether ``e`` is an exp whose argument derive sees no upper bound for."""
    return isinstance(e, sympy.exp) and bound(e.args[0], True) is None


def _may_overflow(f: sympy.Expr, overflowing: frozenset[str]) -> bool:
    base = f.base if isinstance(f, sympy.Pow) and f.exp.is_positive else f
    return may_overflow(base) or (is_entry(base) and entry_name(base) in overflowing)


@dataclass(frozen=True)
class Finite:
    """Tensors finite wherever the inputs are: forward ``values`` with their polynomial degree in
    the inputs (``x`` 1, ``x @ W`` 2), and ``gradients`` (adjoints, degree 1 in the gradients)."""

    values: dict[str, int]
    gradients: frozenset[str]

    def selectable(self, e: sympy.Expr) -> bool:
        """Whether branch ``e`` of a select may be computed where it is not taken: finite, and at
        most linear in the inputs and in the gradients (``dout·v`` is, ``u**2`` and ``x @ W`` are not).

        Example:
            >>> from derive.indexalg import entry
            >>> u, g = entry("u", [sympy.Symbol("n")]), entry("dout", [sympy.Symbol("n")])
            >>> f = Finite({"u": 1}, frozenset({"dout"}))
            >>> f.selectable(g * u / 2 + sympy.sign(u)), f.selectable(u**2), f.selectable(sympy.exp(u))
            (True, False, False)
        """
        degree = self.degree(e)
        return degree is not None and max(degree) <= 1

    def degree(self, e: sympy.Basic) -> tuple[int, int] | None:
        """``e``'s polynomial degree in (inputs, gradients); None where it may not be finite."""
        if is_entry(e):
            name = entry_name(e)
            return (0, 1) if name in self.gradients else (self.values[name], 0) if name in self.values else None
        if e.is_Symbol and e.name.startswith("__val_"):  # type: ignore[attr-defined]
            return None  # a temporary: what it holds is not known here
        if not isinstance(e, sympy.Expr) or is_constant(e) or is_index(e) or isinstance(e, ArgMax):
            return (0, 0)
        if isinstance(e, sympy.Pow):
            if not (e.exp.is_Integer and e.exp >= 0):
                return None
            base = self.degree(e.base)
            return None if base is None else (base[0] * int(e.exp), base[1] * int(e.exp))
        if isinstance(e, sympy.Piecewise):  # (its conditions only choose)
            parts = [self.degree(v) for v, _ in e.args]
        elif isinstance(e, (ISum, IMax)):  # a sum of n values grows with n, not with their size
            parts = [self.degree(e.body)]
        elif isinstance(e, (sympy.Max, sympy.Min)) and bound(e, True) is not None and bound(e, False) is not None:
            parts = [self.degree(a) for a in e.args]  # a clamp between two numbers: bounded
            return None if any(p is None for p in parts) else (0, 0)
        elif isinstance(e, (sympy.Add, sympy.Mul, sympy.Abs, sympy.Max, sympy.Min, Select)):
            parts = [self.degree(a) for a in e.args]
        elif isinstance(e, _LIMITED) or (isinstance(e, sympy.exp) and at_most_one(e.args[0])):  # exp(min(u, 0))
            parts = [self.degree(a) for a in e.args]
            return None if any(p is None for p in parts) else (0, 0)
        else:
            return None
        known = [p for p in parts if p is not None]
        if len(known) < len(parts):
            return None
        combine = sum if isinstance(e, sympy.Mul) else max  # a product's degrees add
        return (combine(p[0] for p in known), combine(p[1] for p in known))


def at_most_one(e: sympy.Expr) -> bool:
    """Whether ``exp(e)`` is at most 1 wherever ``e`` is finite: ``e <= 0`` (``Min(u, 0)``, ``-Abs(u)``)."""
    top = bound(e, True)
    return top is not None and bool(top <= 0)


def bound(e: sympy.Expr, up: bool) -> sympy.Expr | None:
    """A number ``e`` never exceeds (``up``) or never falls below, wherever its values are finite; None if
    there is none that derive can see. A parameter's value is the caller's, so it bounds nothing."""
    if e.is_number and not e.has(AppliedUndef):  # (a 0-dim tensor's entry, v(), is no number)
        return e
    if isinstance(e, tuple(_RANGES)):
        return sympy.sympify(_RANGES[type(e)][int(up)])
    if isinstance(e, (sympy.Min, sympy.Max)):
        bounds = [bound(a, up) for a in e.args]
        known = [b for b in bounds if b is not None]
        if isinstance(e, sympy.Min) == up:  # min(u, 0) <= 0 whatever u is
            return (sympy.Min if up else sympy.Max)(*known) if known else None
        return None if len(known) < len(bounds) else e.func(*known)
    if isinstance(e, sympy.Abs):
        return None if up else sympy.S.Zero
    if isinstance(e, sympy.exp):
        if not up:
            return sympy.S.Zero
        top = bound(e.args[0], True)
        return None if top is None else sympy.exp(top)
    if isinstance(e, sympy.Add):
        bounds = [bound(a, up) for a in e.args]
        return None if any(b is None for b in bounds) else sympy.Add(*bounds)
    if isinstance(e, sympy.Mul):
        number, rest = e.as_coeff_Mul()
        scales = [f for f in sympy.Mul.make_args(rest) if f.is_positive and not f.has(AppliedUndef)]
        if scales:  # a positive parameter's value is the caller's: it keeps a bound of 0 only
            inner = bound(rest / sympy.Mul(*scales), up if number > 0 else not up)
            return sympy.S.Zero if inner == 0 else None
        if rest == e or not number.is_number:
            return None  # a product of values
        inner = bound(rest, up if number > 0 else not up)
        return None if inner is None else number * inner
    return None


def finite_values(program: Program, saved: Iterable[Statement] = ()) -> Finite:
    """The inputs (degree 1), each forward value (``saved``: the values computed out of statements)
    finite in earlier ones, with its degree, and the gradients, finite where autograd's are."""
    tensors = [*program.inputs, *(s.target for s in program.statements)]
    gradients = {program.seed_name(o) for o in program.outputs} | {grad_name(t.name) for t in tensors}
    finite = Finite({t.name: 1 for t in program.inputs}, frozenset(gradients))
    for stmt in [*program.statements, *saved]:
        degree = finite.degree(stmt.expr)
        if degree is not None:
            finite.values[stmt.name] = degree[0]
    return finite


__all__ = ["Finite", "at_most_one", "bound", "finite_values", "stays_finite"]
