"""PyTorch's conventions at kinks: the value a derivative takes where its function is not differentiable.

SymPy differentiates ``Max(a, b)`` into ``Heaviside(a - b)``, which is 1/2 at a tie. Generated
code must give what PyTorch's kernel gives for the same forward, whether the function is a
catalogue op or sits inside a user's composition, so the tie value follows the kernel the
forward is printed as (``derive.lowering.printer``):

- ``Max(u, 0)`` runs as ``torch.relu``: relu'(0) = 0;
- ``Max(u, c)``/``Min(u, c)`` with ``c`` free of tensors run as ``torch.clamp_min``/``clamp_max``,
  whose gradient passes at the bound (``u >= c``): 1;
- ``Max(u, v)``/``Min(u, v)`` of two values run as ``torch.maximum``/``minimum``, which split the
  gradient evenly at a tie: 1/2.

``Abs`` needs nothing: SymPy's ``sign(0) = 0`` is PyTorch's. A max over a dim routes to the
argmax PyTorch's ``max(dim)`` returns. Only the tie value is chosen here; the derivative itself
is SymPy's own ``fdiff``.
"""

from __future__ import annotations

import sympy

RELU, CLAMP, SPLIT = sympy.S.Zero, sympy.S.One, sympy.S.Half


def tie_values(shell: sympy.Expr, variables: set[sympy.Symbol]) -> dict[sympy.Expr, sympy.Expr]:
    """``Heaviside(arg)`` as SymPy's ``fdiff`` of each Max/Min in ``shell`` writes it -> the same with PyTorch's tie value.

    ``variables`` are the symbols that stand for tensor values; anything free of them is a
    constant bound (a number, a scalar parameter).
    """
    out: dict[sympy.Expr, sympy.Expr] = {}
    for node in sympy.preorder_traversal(shell):
        if not isinstance(node, (sympy.Max, sympy.Min)):
            continue
        for k, arg in enumerate(node.args):
            if not arg.free_symbols & variables:
                continue  # a constant bound has no gradient
            others = node.args[:k] + node.args[k + 1 :]
            heaviside = node.fdiff(k + 1)
            if isinstance(heaviside, sympy.Heaviside):
                out[heaviside] = sympy.Heaviside(heaviside.args[0], _tie_value(node, others, variables))
    return out


def _tie_value(node: sympy.Expr, others: tuple[sympy.Expr, ...], variables: set[sympy.Symbol]) -> sympy.Expr:
    if len(others) != 1 or others[0].free_symbols & variables:
        return SPLIT  # torch.maximum / torch.minimum between values
    if isinstance(node, sympy.Max) and others[0] == 0:
        return RELU
    return CLAMP


__all__ = ["tie_values"]
