"""Which values stay finite wherever the forward's inputs are: where a select may be arithmetic.

On a CPU, PyTorch runs ``torch.where`` (and anything else that reads a bool mask) as a scalar
loop, about ten times the time of a vectorised pass. Arithmetic on a float 0/1 mask is fast, but
``inf * 0`` is NaN where ``where`` would have picked the other value. So the lowering selects by
arithmetic only where neither value can be infinite or NaN:

- :func:`stays_finite`: a backward with no division by a value and no log of one multiplies by
  masks (``MaskingPrinter``);
- :func:`bounded` and :func:`finite_names`: a ``Piecewise`` whose two values are built only from
  finite tensors, sums, products, non-negative integer powers and functions finite on all reals
  becomes ``torch.lerp(b, a, mask)``, exact for a 0/1 mask (:class:`.printer.Select`).

Integer powers overflow only past about 1e19 in float32 (``x**2``); that is accepted.
"""

from __future__ import annotations

from collections.abc import Iterable

import sympy

from ..indexalg import ArgMax, Flat, IMax, ISum, Pack, entry_name, is_entry
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


def finite_names(program: Program, saved: Iterable[Statement] = ()) -> frozenset[str]:
    """The tensors finite wherever the inputs are: the inputs, the output gradients, and each forward
    value (``saved``: the values computed out of statements) that is :func:`bounded` in earlier ones."""
    finite = {t.name for t in program.inputs} | {program.seed_name(o) for o in program.outputs}
    for stmt in [*program.statements, *saved]:
        if bounded(stmt.expr, finite):
            finite.add(stmt.name)
    return frozenset(finite)


__all__ = ["bounded", "finite_names", "stays_finite"]
