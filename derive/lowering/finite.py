"""Which values stay finite wherever the forward's inputs are: where a select may be arithmetic.

On a CPU, PyTorch runs ``torch.where`` (and anything else that reads a bool mask) as a scalar
loop, about ten times the time of a vectorised pass. Arithmetic on a float 0/1 mask is fast, but
``inf * 0`` is NaN where ``where`` would have picked the other value. So the lowering selects by
arithmetic only where neither value can be infinite or NaN:

- :func:`stays_finite`: a backward with no division by a value and no log of one multiplies by
  masks (``MaskingPrinter``);
- :func:`bounded` and :func:`finite_values`: a ``Piecewise`` whose two values are finite and at
  most linear in the forward's values and in the gradients (:meth:`Finite.selectable`) becomes
  ``torch.lerp(b, a, mask)``, exact for a 0/1 mask (:class:`.printer.Select`). Such a branch
  overflows only within a factor 2 of the dtype's largest value, which is accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sympy

from ..autodiff import grad_name
from ..indexalg import ArgMax, Flat, IMax, ISum, Pack, entry_name, is_entry, is_index
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
# functions whose values are bounded whatever their (finite) argument
_LIMITED = (
    sympy.sign,
    sympy.Heaviside,
    sympy.KroneckerDelta,
    sympy.tanh,
    sympy.erf,
    sympy.erfc,
    sympy.sin,
    sympy.cos,
    sympy.atan,
)
# functions finite at every finite argument (a Piecewise or Select: when its values are)
_FINITE_FUNCTIONS = (
    sympy.Abs,
    sympy.sign,
    sympy.Max,
    sympy.Min,
    sympy.Heaviside,
    sympy.KroneckerDelta,
    sympy.tanh,
    sympy.erf,
    sympy.erfc,
    sympy.sin,
    sympy.cos,
    sympy.atan,
    sympy.Piecewise,
    Select,
)


def stays_finite(e: sympy.Expr) -> bool:
    """Whether ``e`` is finite wherever the forward's values are: no division by a value, no log of one.

    Such a backward may multiply by a 0/1 mask (``MASKING``); one that may divide by 0 where a
    step is 0 (``sqrt(relu(x))``) keeps ``torch.where``, which gives 0 there as autograd does.
    """
    for node in sympy.preorder_traversal(e):
        if isinstance(node, sympy.Pow) and node.exp.is_negative is not False and not is_constant(node.base):
            return False
        if isinstance(node, _POLES) and not is_constant(node):
            return False
    return True


def bounded(e: sympy.Basic, finite: frozenset[str] | set[str]) -> bool:
    """Whether ``e`` is finite wherever the tensors named in ``finite`` are, and reads no other.

    Example:
        >>> from derive.indexalg import entry
        >>> u = entry("u", [sympy.Symbol("n")])
        >>> bounded(u**2 / 2 + sympy.Abs(u), {"u"}), bounded(sympy.exp(u), {"u"}), bounded(u, set())
        (True, False, False)
    """
    for node in sympy.preorder_traversal(e):
        if is_entry(node):
            if entry_name(node) not in finite:
                return False
        elif isinstance(node, sympy.Symbol):
            if node.name.startswith("__val_"):  # a temporary: what it holds is not known here
                return False
        elif isinstance(node, sympy.Pow):
            if not (is_constant(node) or (node.exp.is_Integer and node.exp >= 0)):
                return False
        elif isinstance(node, sympy.Function) and not is_constant(node):
            if not isinstance(node, _FINITE_FUNCTIONS + (ISum, IMax, ArgMax, Flat, Pack)):
                return False  # (a sum or max is finite where its body is, which the walk checks)
    return True


@dataclass(frozen=True)
class Finite:
    """The tensors finite wherever the inputs are: forward ``values`` and ``gradients`` (adjoints)."""

    values: frozenset[str]
    gradients: frozenset[str]

    def selectable(self, e: sympy.Expr) -> bool:
        """Whether branch ``e`` of a select may be computed where it is not taken: finite, and at
        most linear in the forward's values and in the gradients (``dout·v`` is, ``u**2`` is not).

        A lerp computes ``a - b`` of both branches. A square of a value overflows float16 at 256
        (``u**2/2`` in a Huber loss), where ``torch.where`` would have picked the other branch;
        a linear branch overflows only within a factor 2 of the dtype's largest value.

        Example:
            >>> from derive.indexalg import entry
            >>> u, g = entry("u", [sympy.Symbol("n")]), entry("dout", [sympy.Symbol("n")])
            >>> f = Finite(frozenset({"u"}), frozenset({"dout"}))
            >>> f.selectable(g * u / 2 + sympy.sign(u)), f.selectable(u**2), f.selectable(sympy.exp(u))
            (True, False, False)
        """
        degree = self._degree(e)
        return degree is not None and max(degree) <= 1

    def _degree(self, e: sympy.Basic) -> tuple[int, int] | None:
        """``e``'s polynomial degree in (values, gradients); None where it may not be finite."""
        if is_entry(e):
            name = entry_name(e)
            return (0, 1) if name in self.gradients else (1, 0) if name in self.values else None
        if e.is_Symbol and e.name.startswith("__val_"):  # type: ignore[attr-defined]
            return None  # a temporary: what it holds is not known here
        if not isinstance(e, sympy.Expr) or is_constant(e) or is_index(e):
            return (0, 0)
        if isinstance(e, ArgMax):
            return (0, 0)
        if isinstance(e, sympy.Pow):
            if not (e.exp.is_Integer and e.exp >= 0):
                return None
            base = self._degree(e.base)
            return None if base is None else (base[0] * int(e.exp), base[1] * int(e.exp))
        if isinstance(e, sympy.Piecewise):  # (its conditions only choose)
            parts = [self._degree(v) for v, _ in e.args]
        elif isinstance(e, (ISum, IMax)):  # a sum of n values grows with n, not with their size
            parts = [self._degree(e.body)]
        elif isinstance(e, (sympy.Add, sympy.Mul, sympy.Abs, sympy.Max, sympy.Min, Select)):
            parts = [self._degree(a) for a in e.args]
        elif isinstance(e, _LIMITED):
            parts = [self._degree(a) for a in e.args]
            return None if any(p is None for p in parts) else (0, 0)
        else:
            return None
        known = [p for p in parts if p is not None]
        if len(known) < len(parts):
            return None
        combine = sum if isinstance(e, sympy.Mul) else max  # a product's degrees add
        return (combine(p[0] for p in known), combine(p[1] for p in known))


def finite_values(program: Program, saved: Iterable[Statement] = ()) -> Finite:
    """The tensors finite wherever the inputs are: the inputs and each forward value (``saved``:
    the values computed out of statements) that is :func:`bounded` in earlier ones; and the
    gradients, finite where autograd's are."""
    finite = {t.name for t in program.inputs}
    for stmt in [*program.statements, *saved]:
        if bounded(stmt.expr, finite):
            finite.add(stmt.name)
    tensors = [*program.inputs, *(s.target for s in program.statements)]
    gradients = {program.seed_name(o) for o in program.outputs} | {grad_name(t.name) for t in tensors}
    return Finite(frozenset(finite), frozenset(gradients))


__all__ = ["Finite", "bounded", "finite_values", "stays_finite"]
