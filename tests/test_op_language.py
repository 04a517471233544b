"""The op language: tracing records named statements in index form, by dim name."""

import sys

import pytest
import sympy
import torch
import torch.nn.functional as F

from derive import apply, derive, exp, op
from derive.emit import render
from derive.errors import OpDefinitionError
from derive.indexalg import ISum
from derive.verify import load_module, verify


def test_locals_name_the_intermediates():
    @op(x="n d")
    def f(x):
        centred = x - x.mean("n", keepdim=True)
        out = centred**2
        return out

    p = f.program()
    assert [s.name for s in p.statements] == ["centred", "out"]


def test_an_unnamed_result_beside_a_local_called_out_is_called_out1():
    @op(x="n d")
    def f(x):
        out = x * 2
        return exp(out)

    p = f.program()
    assert [s.name for s in p.statements] == ["out", "out1"] and p.outputs == ("out1",)


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


# -- contraction by name, piecewise functions, constant inputs (issue 11) -----------------------


def _generated(the_op):
    d = derive(the_op)
    module = load_module(render(d), the_op.name)
    assert verify(d, module).ok
    return d, module


def test_matmul_contracts_the_shared_dim_wherever_it_stands():
    @op(x="n i", w="o i", b="o")
    def linear_oi(x, w, b):
        out = x @ w + b
        return out

    d, module = _generated(linear_oi)
    assert [dim.name for dim in d.program.tensors["out"].dims] == ["n", "o"]
    x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    out, _ = module.linear_oi_forward(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b))


def test_matmul_over_names_the_contracted_dims_the_other_shared_ones_are_batch_dims():
    @op(q="b n d", k="b m d")
    def scores(q, k):
        out = q.matmul(k, over="d")
        return out

    @op(x="n k c", W="k c o")
    def two_dims(x, W):
        out = x.matmul(W, over=("k", "c"))
        return out

    d, module = _generated(scores)
    assert [dim.name for dim in d.program.tensors["out"].dims] == ["b", "n", "m"]
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    torch.testing.assert_close(module.scores_forward(q, k)[0], q @ k.transpose(1, 2))
    d, _ = _generated(two_dims)
    assert [dim.name for dim in d.program.tensors["out"].dims] == ["n", "o"]


@pytest.mark.parametrize(
    "body, message",
    [
        ("q @ k", "share dims 'b', 'd': say which to contract"),
        ('q.matmul(k, over="e")', "matmul over 'e': tensor 'q' has no such dim"),
    ],
)
def test_an_ambiguous_or_impossible_matmul_is_a_one_line_error_naming_the_line(body: str, message: str, tmp_path):
    from derive.api import load_user_op

    path = tmp_path / "bad_ops.py"
    path.write_text(
        f'from derive import op\n\n@op(q="b n d", k="b m d")\ndef bad(q, k):\n    out = {body}\n    return out\n'
    )
    with pytest.raises(OpDefinitionError, match=message) as caught:
        load_user_op(path, "bad").program()
    assert "\n" not in str(caught.value) and f"bad_ops.py:5: out = {body}" in str(caught.value)


PIECEWISE = {  # body, PyTorch's function, how the backward selects
    # exp(u) would overflow in the branch not taken (inf * 0 is NaN); it is exp(min(u, 0)) there
    "elu": ("sympy.Piecewise((u, u > 0), (sympy.exp(u) - 1, True))", F.elu, "lerp"),
    "leaky_relu": ("sympy.Piecewise((u, u > 0), (u / 100, True))", F.leaky_relu, "lerp"),
    # the backward's condition is an Or (u <= -1 or u >= 1): the And of its negations, two float masks
    "hardtanh": ("sympy.Piecewise((-1, u <= -1), (1, u >= 1), (u, True))", F.hardtanh, ".mul_(torch.lt(x, 1"),
    "softshrink": (
        "sympy.Piecewise((u - sympy.Rational(1, 2), u > sympy.Rational(1, 2)), (u + sympy.Rational(1, 2), u < -sympy.Rational(1, 2)), (0, True))",
        F.softshrink,
        "dx = torch.clamp(x, -1 / 2, 1 / 2).ne_(x).mul_(dout)",  # outside a closed interval: one buffer
    ),
    # its derivative is a linear branch held at its bounds: clamp(u, -1, 1), one pass
    "huber": (
        "sympy.Piecewise((u**2 / 2, sympy.Abs(u) <= 1), (sympy.Abs(u) - sympy.Rational(1, 2), True))",
        None,
        "dx = torch.clamp(x, min=-1, max=1).mul_(dout)",
    ),
    # conditions as PyTorch's kernel has them: hardswish'(-3) = 0 and hardswish'(3) = 1
    "hardswish": ("sympy.Piecewise((0, u <= -3), (u, u >= 3), (u * (u + 3) / 6, True))", F.hardswish, "lerp"),
}


@pytest.mark.parametrize("name", list(PIECEWISE))
def test_piecewise_functions_select_exactly_and_match_pytorch_at_their_switch_points(name: str):
    """Two finite values select by a lerp on a float mask (exact at 0 and 1), a value and 0 by a product
    with one (an ``And`` or ``Or`` of comparisons multiplies masks); others by ``torch.where``."""
    body, torch_fn, select = PIECEWISE[name]
    namespace = {"op": op, "apply": apply, "sympy": sympy}
    exec(f'@op(x="n d")\ndef {name}(x):\n    out = apply(lambda u: {body}, x)\n    return out\n', namespace)
    d, module = _generated(namespace[name])
    assert select in "\n".join(d.code.backward)
    if torch_fn is None:  # Huber: against F.huber_loss, elementwise
        torch_fn = lambda t: F.huber_loss(t, torch.zeros_like(t), reduction="none")  # noqa: E731
    x = torch.tensor([[-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    g = torch.arange(1.0, 12.0, dtype=torch.float64)[None]  # switch points included
    out, saved = getattr(module, f"{name}_forward")(x)
    leaf = x.clone().requires_grad_()
    torch_fn(leaf).backward(g)
    torch.testing.assert_close(out, torch_fn(x))
    assert torch.equal(getattr(module, f"{name}_backward")(g, saved).x, leaf.grad)


@pytest.mark.parametrize("name", ["hardswish", "huber"])
def test_a_quadratic_branch_bounded_by_its_region_selects_by_arithmetic_in_the_forward(name: str):
    """``u·(u + 3)/6`` where ``-3 <= u <= 3`` (``u**2/2`` where ``|u| <= 1``) squares: computed where it
    is not taken it may overflow, which ``torch.where`` (a scalar loop on a CPU) ignored. It is read
    on ``u`` clamped to its region, bounded everywhere, so the forward selects by arithmetic."""
    body = PIECEWISE[name][0]
    namespace = {"op": op, "apply": apply, "sympy": sympy}
    exec(f'@op(x="n d")\ndef {name}(x):\n    out = apply(lambda u: {body}, x)\n    return out\n', namespace)
    d, module = _generated(namespace[name])
    forward = "\n".join(d.code.forward)
    assert "torch.where" not in forward and "torch.clamp(x, " in forward, forward
    x = torch.tensor([[-1e30, -3e20, 1e20, 1e30]])  # the square overflows float32 here
    out, _ = getattr(module, f"{name}_forward")(x)
    torch.testing.assert_close(
        out, PIECEWISE[name][1](x) if PIECEWISE[name][1] else F.huber_loss(x, 0 * x, reduction="none")
    )


CLAMPS = {  # a Piecewise of a value and numbers, compared with numbers; the forward it prints
    "hardtanh": ("sympy.Piecewise((-1, u < -1), (1, u > 1), (u, True))", "torch.clamp(x, -1, 1)"),
    "hardtanh_le": ("sympy.Piecewise((-1, u <= -1), (1, u >= 1), (u, True))", "torch.clamp(x, -1, 1)"),
    "relu": ("sympy.Piecewise((u, u > 0), (0, True))", "torch.relu(x)"),
    "clip_above": (
        "sympy.Piecewise((sympy.Rational(3, 2), u > sympy.Rational(3, 2)), (u, True))",
        "torch.clamp_max(x, 3 / 2)",
    ),
    "nested": ("sympy.Piecewise((1, u > 1), (u, u > -2), (-2, True))", "torch.clamp(x, -2, 1)"),
    # not clamps: a jump, a slope; they keep their selects
    "jump": ("sympy.Piecewise((2, u > 1), (u, True))", None),
    "leaky": ("sympy.Piecewise((u, u > 0), (u / 4, True))", None),
}


@pytest.mark.parametrize("name", list(CLAMPS))
def test_a_piecewise_that_is_a_clamp_computes_its_forward_as_one(name: str):
    """Four comparisons and their arithmetic, or one ``torch.clamp``: the values agree everywhere
    (checked at the breaks and between them), and the backward is still the Piecewise's."""
    body, expected = CLAMPS[name]
    namespace = {"op": op, "apply": apply, "sympy": sympy}
    exec(f'@op(x="n d")\ndef {name}(x):\n    out = apply(lambda u: {body}, x)\n    return out\n', namespace)
    d, module = _generated(namespace[name])
    forward = "\n".join(d.code.forward)
    if expected is None:
        assert "clamp" not in forward and "relu" not in forward, forward
    else:
        assert f"out = {expected}" in forward, forward
    x = torch.tensor([[-3.0, -2.0, -1.5, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0]], dtype=torch.float64)
    u = sympy.Symbol("u", real=True)
    fn = sympy.lambdify(u, eval(body, {"sympy": sympy, "u": u}))  # noqa: S307
    out, _ = getattr(module, f"{name}_forward")(x)
    assert out.tolist() == [[float(fn(v)) for v in x[0].tolist()]]


SINGULAR_BRANCHES = {  # a branch infinite or NaN where it is not taken; PyTorch's "double where" idiom
    "sqrt": (
        "sympy.Piecewise((sympy.sqrt(u), u > 0), (u, True))",
        lambda u, v: torch.where(u > 0, torch.where(u > 0, u, 1).sqrt(), u),
    ),
    "log_shifted": (
        "sympy.Piecewise((sympy.log(u - 1), u > 1), (u**2, True))",
        lambda u, v: torch.where(u > 1, torch.where(u > 1, u - 1, 1).log(), u**2),
    ),
    "sqrt_of_a_difference": (
        "sympy.Piecewise((sympy.sqrt(u - v), u > v), (0, True))",
        lambda u, v: torch.where(u > v, torch.where(u > v, u - v, 1).sqrt(), 0),
    ),
}


@pytest.mark.parametrize("name", list(SINGULAR_BRANCHES))
def test_a_branch_singular_where_it_is_not_taken_verifies(name: str):
    """Autograd through ``torch.where`` gives NaN from a branch it does not take (0 · inf): the
    reference forward reads such a branch's values clamped to its region, so these verify, and the
    generated backward is finite and right, ties included."""
    body, torch_fn = SINGULAR_BRANCHES[name]
    namespace = {"op": op, "apply": apply, "sympy": sympy}
    exec(
        f'@op(x="n d", y="n d")\ndef {name}(x, y):\n    out = apply(lambda u, v: {body}, x, y)\n    return out\n',
        namespace,
    )
    d, module = _generated(namespace[name])
    x = torch.tensor([[-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 4.0]], dtype=torch.float64)  # switch points included
    y = torch.tensor([[-1.0, -1.0, 0.5, 0.0, 0.0, 1.5, 1.0]], dtype=torch.float64)
    g = torch.arange(1.0, 8.0, dtype=torch.float64)[None]
    out, saved = module.__dict__[f"{name}_forward"](x, y)
    grads = module.__dict__[f"{name}_backward"](g, saved)
    leaves = [t.clone().requires_grad_() for t in (x, y)]
    expect = torch_fn(*leaves)
    torch.testing.assert_close(out, expect.detach())
    dx, dy = torch.autograd.grad(expect, leaves, g, allow_unused=True)
    torch.testing.assert_close(grads.x, dx)
    torch.testing.assert_close(grads.y, torch.zeros_like(y) if dy is None else dy)


def test_a_const_input_gets_no_gradient_and_an_additive_minus_inf_mask_works():
    from derive import exp

    @op(q="b n d", k="b m d", v="b m e", mask="const n m")
    def causal_attention(q, k, v, mask):
        s = q.matmul(k, over="d") * q.size("d") ** -0.5 + mask
        p = exp(s - s.max("m", keepdim=True))
        p = p / p.sum("m", keepdim=True)
        out = p.matmul(v, over="m")
        return out

    d, module = _generated(causal_attention)
    assert module.causal_attention_Grads._fields == ("q", "k", "v")
    q, k, v = (torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
    module.causal_attention(q, k, v, mask).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, attn_mask=mask).sum().backward()
    for got, want in zip((q, k, v), ref):
        torch.testing.assert_close(got.grad, want.grad)


def test_a_value_of_constants_gets_no_gradient_and_the_forward_keeps_nothing_for_one():
    """``t`` reads only the constant ``y``: the loss's sum of ``t * lp`` would otherwise give ``t`` an
    adjoint (a pass over N x C), and the forward would keep ``lp`` for that adjoint alone."""
    from derive import exp, log

    @op(logits="n c", y="const n c")
    def soft_target_ce(logits, y, alpha=0.1):
        z = logits - logits.max("c", keepdim=True)
        lp = z - log(exp(z).sum("c", keepdim=True))
        t = (1 - alpha) * y + alpha / logits.size("c")
        loss = -(t * lp).sum("c").mean("n")
        return loss

    d, module = _generated(soft_target_ce)
    code = "\n".join(d.code.backward)
    assert "dt =" not in code and "lp" not in module._BACKWARD_KEYS, (code, module._BACKWARD_KEYS)
    logits = torch.randn(6, 5, dtype=torch.float64)
    y = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)
    _, saved = module.soft_target_ce_forward(logits, y)
    (dlogits,) = module.soft_target_ce_backward(None, saved)
    leaf = logits.clone().requires_grad_()
    (-((0.9 * y + 0.1 / 5) * F.log_softmax(leaf, 1)).sum(1).mean()).backward()
    torch.testing.assert_close(dlogits, leaf.grad)


def test_sqrt_of_a_size_is_a_number():
    """``sqrt(q.size("d"))`` scales by a number, as ``q.size("d") ** 0.5`` does."""
    from derive import exp, sqrt

    @op(q="n d", k="m d")
    def scores(q, k):
        s = (q * k).sum("d") / sqrt(q.size("d"))
        p = exp(s - s.max("m", keepdim=True))
        out = p / p.sum("m", keepdim=True)
        return out

    d, module = _generated(scores)
    assert verify(d, module).ok
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    out, _ = module.scores_forward(q, k)
    torch.testing.assert_close(out, torch.softmax(q @ k.T / 2.0, 1))


def test_a_sum_or_mean_over_several_dims_reduces_each():
    @op(x="b t d", y="b t d")
    def centred_mse(x, y):
        r = x - y
        r = r - r.mean(("t", "d"), keepdim=True)
        loss = (r**2).mean(("t", "d")).sum("b")
        return loss

    d, module = _generated(centred_mse)
    assert verify(d, module).ok
    x, y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, y)]
    r = leaves[0] - leaves[1]
    want = ((r - r.mean((1, 2), keepdim=True)) ** 2).mean((1, 2)).sum()
    got, saved = module.centred_mse_forward(x, y)
    torch.testing.assert_close(got, want.detach())
    want.backward()
    for g, leaf in zip(module.centred_mse_backward(None, saved), leaves):
        torch.testing.assert_close(g, leaf.grad)


# -- renaming (issue 11) ----------------------------------------------------------------------


def test_causal_self_attention_from_one_input_renames_its_positions():
    from derive import exp

    @op(x="n t c", Wq="c d", Wk="c d", Wv="c d", mask="const t s")
    def self_attention(x, Wq, Wk, Wv, mask):
        q = x @ Wq
        k = (x @ Wk).rename(t="s")
        v = (x @ Wv).rename(t="s")
        scores = q.matmul(k, over="d") * q.size("d") ** -0.5 + mask
        p = exp(scores - scores.max("s", keepdim=True))
        p = p / p.sum("s", keepdim=True)
        out = p.matmul(v, over="s")
        return out

    d, module = _generated(self_attention)
    assert d.program.ties == (("s", "t"),)  # the mask's s must be as long as x's t
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    Ws = [torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)
    module.self_attention(x, *Ws, mask).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, *Ws)]
    q, k, v = (ref[0] @ W for W in ref[1:])
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    for got, want in zip((x, *Ws), ref):
        torch.testing.assert_close(got.grad, want.grad)
    with pytest.raises(ValueError, match="S must equal T"):
        module.self_attention_forward(x, *Ws, mask[:, :4])


def test_a_square_recurrent_weight_applies_to_a_renamed_state():
    @op(x="n i", h="n j", W="i j", U="j k")
    def rnn_step(x, h, W, U):
        out = apply(sympy.tanh, (x @ W).rename(j="k") + h.rename(j="k").rename(k="j") @ U)
        return out

    d, module = _generated(rnn_step)
    assert d.program.ties == (("k", "j"),)
    x, h, W, U = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(3, 4), (3, 5), (4, 5), (5, 5)])
    out = module.rnn_step(x, h, W, U)
    torch.testing.assert_close(out, torch.tanh(x @ W + h @ U))
    assert "rename" not in "\n".join(d.code.backward)


@pytest.mark.parametrize(
    "body, message",
    [
        ('x.rename(n="d")', "rename n='d': tensor 'x' already has a dim 'd'"),
        ('x.rename(e="f")', "tensor 'x' has no dim 'e'"),
        ('x.rename(d="k").sum("k") + w.rename(d="k")', ""),
    ],
)
def test_rename_errors_name_the_line(body: str, message: str, tmp_path):
    from derive.api import load_user_op

    path = tmp_path / "bad_ops.py"
    path.write_text(f'from derive import op\n\n@op(x="n d", w="d")\ndef bad(x, w):\n    out = {body}\n    return out\n')
    if not message:  # renaming to the same new name twice gives the same dim
        assert [d.name for d in load_user_op(path, "bad").program().tensors["out"].dims] == ["n", "k"]
        return
    with pytest.raises(OpDefinitionError, match=message) as caught:
        load_user_op(path, "bad").program()
    assert "\n" not in str(caught.value) and f"bad_ops.py:5: out = {body}" in str(caught.value)


# -- several outputs (issue 11) ---------------------------------------------------------------


def _lstm_cell():
    from derive import tanh

    def sigmoid(t):
        return apply(lambda u: 1 / (1 + sympy.exp(-u)), t)

    @op(x="n i", h="n k", c="n k", Wi="i k", Wf="i k", Wg="i k", Wo="i k", Ui="j k", Uf="j k", Ug="j k", Uo="j k")
    def lstm_cell(x, h, c, Wi, Wf, Wg, Wo, Ui, Uf, Ug, Uo):
        hj = h.rename(k="j")  # the recurrent weights are square: k -> j
        i = sigmoid(x @ Wi + hj @ Ui)
        f = sigmoid(x @ Wf + hj @ Uf)
        g = tanh(x @ Wg + hj @ Ug)
        o = sigmoid(x @ Wo + hj @ Uo)
        c_new = f * c + i * g
        h_new = o * tanh(c_new)
        return h_new, c_new

    return lstm_cell


def test_an_lstm_cell_returns_two_outputs_and_its_backward_takes_one_gradient_per_output():
    d, module = _generated(_lstm_cell())
    assert d.program.outputs == ("h_new", "c_new")
    n, i, k = 3, 4, 5
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(n, i), torch.randn(n, k), torch.randn(n, k)]
    args += [torch.randn(i, k, generator=gen) for _ in range(4)] + [torch.randn(k, k, generator=gen) for _ in range(4)]
    args = [a.double().requires_grad_() for a in args]
    cell = torch.nn.LSTMCell(i, k, bias=False).double()
    with torch.no_grad():
        cell.weight_ih.copy_(torch.cat([W.T for W in args[3:7]]))
        cell.weight_hh.copy_(torch.cat([U.T for U in args[7:]]))
    (h_new, c_new), saved = module.lstm_cell_forward(*args)
    want_h, want_c = cell(args[0], (args[1], args[2]))
    torch.testing.assert_close((h_new, c_new), (want_h, want_c))

    # only h_new is used: its gradient alone, c_new's None
    g = torch.randn(n, k, dtype=torch.float64)
    grads = module.lstm_cell_backward((g, None), saved)
    want = torch.autograd.grad(want_h, [args[0], args[1], args[2], cell.weight_ih, cell.weight_hh], g)
    torch.testing.assert_close((grads.x, grads.h, grads.c), want[:3])
    torch.testing.assert_close(torch.cat([W.T for W in grads[3:7]]), want[3])
    torch.testing.assert_close(torch.cat([U.T for U in grads[7:]]), want[4])

    # through autograd: both outputs used, then only c_new (Wo reaches h_new alone)
    h_new, c_new = module.lstm_cell(*args)
    (h_new.sum() + (c_new**2).sum()).backward()
    want_h, want_c = cell(args[0], (args[1], args[2]))
    want = torch.autograd.grad(want_h.sum() + (want_c**2).sum(), args[:3])
    torch.testing.assert_close([a.grad for a in args[:3]], list(want))
    for a in args:
        a.grad = None
    module.lstm_cell(*args)[1].sum().backward()
    assert torch.equal(args[6].grad, torch.zeros_like(args[6]))

    # one gradient per output, each of its output's shape: a [2, K] tensor was unpacked as two rows
    for wrong, says in [
        (torch.ones(2, k), "must be 2 gradients"),
        ((g,), "got tuple of 1"),
        ((torch.ones(k), None), "the gradient of h_new must have its shape"),
        ((g, torch.ones(1, 1)), "the gradient of c_new must have its shape"),
    ]:
        with pytest.raises(ValueError, match=says):
            module.lstm_cell_backward(wrong, saved)


def test_an_op_file_imports_as_python_runs_it_dataclasses_and_sibling_modules_included(tmp_path):
    """benchmarks/compositions.py once failed to load: a dataclass needs its module in sys.modules."""
    from derive.api import load_user_op

    (tmp_path / "my_helpers.py").write_text(
        "import sympy\n\ndef softplus(u):\n    return sympy.log(1 + sympy.exp(u))\n"
    )
    path = tmp_path / "my_ops.py"
    path.write_text(
        "from dataclasses import dataclass\n\nfrom derive import apply, op\nfrom my_helpers import softplus\n\n\n"
        "@dataclass(frozen=True)\nclass Config:\n    width: int = 4\n\n\n"
        '@op(x="n d")\ndef smooth(x):\n    out = apply(softplus, x)\n    return out\n'
    )
    assert load_user_op(path, "smooth").program().tensors["out"].dims[0].name == "n"
    assert str(tmp_path) not in sys.path  # the file's folder was importable only while it ran


def test_a_flatten_into_a_dim_the_tensor_already_has_is_a_one_line_error(tmp_path):
    """x / exp(x.flatten(n, d)) has dims n, d, nd: flattening n, d again once conflated the two nd."""
    from derive.api import load_user_op

    path = tmp_path / "bad_ops.py"
    path.write_text(
        'from derive import exp, op\n\n@op(x="n d")\ndef bad(x):\n'
        '    out = (x / exp(x.flatten("n", "d"))).flatten("n", "d")\n    return out\n'
    )
    with pytest.raises(OpDefinitionError, match="already has a dim 'nd'") as caught:
        load_user_op(path, "bad").program()
    assert "\n" not in str(caught.value) and "bad_ops.py:5" in str(caught.value)


def test_a_weight_called_w_beside_a_width_w_gives_the_width_size_another_name():
    """The size of ``w`` is ``W``: with a weight called ``W`` it is ``size_w`` in the derivation and
    the code, through a padding, a window, a tie and the shape checks (and ``S`` is ``size_s``)."""

    @op(x="n h w c", W="kh kw c o", S="s c")
    def conv_then_mix(x, W, S):
        y = x.pad("h", 1, 1).pad("w", 1, 1).unfold("h", 3, 1, "kh").unfold("w", 3, 1, "kw")
        out = y.matmul(W, over=("kh", "kw", "c")) + (S.rename(s="w") ** 2).sum("c")
        return out

    d, module = _generated(conv_then_mix)
    assert d.program.ties == (("w", "s"),)
    source = "\n".join(d.code.forward + d.code.backward)
    assert "size_w" in source
    x = torch.randn(2, 5, 6, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    S = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    module.conv_then_mix(x, W, S).square().sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, W, S)]
    conv = F.conv2d(ref[0].permute(0, 3, 1, 2), ref[1].permute(3, 2, 0, 1), padding=1).permute(0, 2, 3, 1)
    (conv + (ref[2] ** 2).sum(1)[None, None, :, None]).square().sum().backward()
    for got, want in zip((x, W, S), ref):
        torch.testing.assert_close(got.grad, want.grad)
    with pytest.raises(ValueError, match="size_w must equal size_s"):
        module.conv_then_mix_forward(x, W, S[:5])
