"""The op language: tracing records named statements in index form, by dim name."""

import sympy

from derive import apply, op
from derive.indexalg import ISum


def test_locals_name_the_intermediates():
    @op(x="n d")
    def f(x):
        centred = x - x.mean("n", keepdim=True)
        out = centred**2
        return out

    p = f.program()
    assert [s.name for s in p.statements] == ["centred", "out"]


def test_unnamed_temporaries_are_inlined_into_their_consumer():
    @op(x="n d")
    def f(x):
        out = (x * 2).sum("d")
        return out

    (stmt,) = f.program().statements
    assert stmt.expr.has(ISum) and stmt.kind == "sum"


def test_broadcast_by_name_orders_the_result_like_the_larger_operand():
    @op(x="n d", g="d")
    def f(x, g):
        out = g * x
        return out

    assert [d.name for d in f.program().tensors["out"].dims] == ["n", "d"]


def test_keepdim_leaves_a_size_one_axis():
    @op(x="n d")
    def f(x):
        out = x.sum("n", keepdim=True)
        return out

    assert f.program().tensors["out"].shape_text() == "1 x D"


def test_scalar_parameters_stay_symbols():
    @op(x="n d")
    def f(x, eps=0.5):
        out = x + eps
        return out

    p = f.program()
    assert p.params[0].name == "eps" and p.statements[0].expr.has(sympy.Symbol("eps", positive=True))


def test_any_sympy_function_applies_elementwise():
    @op(x="n d")
    def f(x):
        out = apply(lambda u: sympy.log(1 + sympy.exp(u)), x)
        return out

    assert f.program().statements[0].expr.has(sympy.log)


def test_gather_with_shared_dims_picks_one_entry_per_row():
    @op(p="n c", y="int n")
    def f(p, y):
        out = p.take(y, "c")
        return out

    stmt = f.program().statements[0]
    assert stmt.kind == "gather" and [d.name for d in stmt.target.dims] == ["n"]


def test_embedding_gather_with_an_index_of_any_rank():
    @op(C="v e", X="int n t")
    def f(C, X):
        out = C[X]
        return out

    assert [d.name for d in f.program().tensors["out"].dims] == ["n", "t", "e"]


def test_flatten_merges_adjacent_dims():
    @op(x="n t e")
    def f(x):
        out = x.flatten("t", "e")
        return out

    assert f.program().tensors["out"].shape_text() == "N x E*T"
