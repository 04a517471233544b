"""The in-place chain printer: random elementwise expressions, evaluated as chains, against plain torch.

``derive.lowering.inplace.chain`` rewrites an expression into one allocation and in-place updates,
moving numbers onto ``alpha``/``value`` arguments and picking an ``addcmul`` to start a sum. Every
such rewrite must keep the value and never write into a leaf (a saved value or an input).
"""

from __future__ import annotations

import sympy
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from derive.lowering.inplace import chain

N, D = 3, 4
n, d = sympy.symbols("n d")
# leaf -> its axes and the tensor it reads (shape broadcast as the lowerer aligns it)
LEAVES = {
    "F1": (frozenset({n, d}), (N, D)),
    "F2": (frozenset({n, d}), (N, D)),
    "R": (frozenset({n}), (N, 1)),
    "S": (frozenset({n}), (N, 1)),
    "C": (frozenset({d}), (D,)),
}
ALPHA = sympy.Symbol("alpha", positive=True)  # a parameter: a Python number in the code, never a tensor
NUMBERS = [
    sympy.Integer(2),
    sympy.Integer(-1),
    sympy.Rational(1, 2),
    sympy.Integer(3),
    sympy.sqrt(2),
    ALPHA,
    -2 * ALPHA,
    ALPHA / 3,
]


def _expressions() -> st.SearchStrategy[sympy.Expr]:
    leaf = st.sampled_from([sympy.Symbol(k) for k in LEAVES])
    number = st.sampled_from(NUMBERS)

    def extend(inner: st.SearchStrategy[sympy.Expr]) -> st.SearchStrategy[sympy.Expr]:
        operand = st.one_of(inner, inner, number)
        sums = st.lists(operand, min_size=2, max_size=4).map(lambda ts: sympy.Add(*ts))
        products = st.lists(operand, min_size=2, max_size=3).map(lambda fs: sympy.Mul(*fs))
        functions = st.one_of(
            inner.map(sympy.exp),
            inner.map(sympy.tanh),
            inner.map(lambda x: 1 / (1 + x**2)),
            inner.map(lambda x: x**2),
        )
        return st.one_of(sums, products, sums, products, functions)

    return st.recursive(leaf, extend, max_leaves=10)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g, dtype=torch.float64).div_(2) for k, (_, shape) in LEAVES.items()}


def _reference(e: sympy.Expr, values: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """Out-of-place evaluation, node by node: no printer, no chain."""
    if e.is_Symbol:
        return torch.as_tensor(alpha, dtype=torch.float64) if e == ALPHA else values[e.name]
    if e.is_number:
        return torch.as_tensor(float(e), dtype=torch.float64)
    args = [_reference(a, values, alpha) for a in e.args]
    if isinstance(e, sympy.Add):
        return sum(args[1:], args[0])
    if isinstance(e, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if isinstance(e, sympy.Pow):
        return args[0] ** args[1]
    return {sympy.exp: torch.exp, sympy.tanh: torch.tanh}[type(e)](args[0])


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(e=_expressions(), seed=st.integers(0, 2**16))
# a term's number coefficient moved into a sum inside it once lost the term's parameter factor
@example(e=2 * sympy.Symbol("F2") - 2 * ALPHA * (2 * sympy.exp(sympy.Symbol("F1")) + 3), seed=0)
def test_a_chain_computes_its_expression_and_writes_into_no_leaf(e: sympy.Expr, seed: int):
    used = {s.name for s in e.free_symbols} & set(LEAVES)
    if not used:
        return  # a number: not a tensor expression
    axes = {sympy.Symbol(k): LEAVES[k][0] for k in used}
    code = chain(e, axes, inner=d)
    values = _tensors(seed)
    before = {k: v.clone() for k, v in values.items()}
    alpha = 0.75
    got = eval(code, {"torch": torch, "alpha": alpha, "math": __import__("math")}, dict(values))
    want = _reference(e, values, alpha)
    assert all(torch.equal(values[k], before[k]) for k in values), f"a leaf was written in place: {code}"
    torch.testing.assert_close(
        torch.as_tensor(got).expand_as(want), want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{m}\n{e}\n{code}"
    )
