"""The simplifier: compact fused gradients recovered from forward definitions alone."""

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from derive import apply, derive, exp, log, op, simplify, sqrt, tanh
from derive.emit import render
from derive.indexalg import IMax, ISum
from derive.notation import text
from derive.verify import exact_check, load_module, verify

from .conftest import derived


class OpCounter(TorchDispatchMode):
    """Counts the aten operations executed inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_cross_entropy_is_softmax_minus_onehot_over_n():
    d, _ = derived("cross_entropy")
    result = d.gradient("logits").result
    assert not result.has(IMax) and "argmax" not in str(result), "the max-subtraction term must vanish"
    assert text(result) == "(probs[n, c] - δ(c, target[n]))*dloss/N"


def test_cross_entropy_derivation_shows_the_max_term_vanishing():
    d, _ = derived("cross_entropy")
    steps = d.gradient("logits").steps
    assert any("argmax" in str(s.result) for s in steps), "the max term is present before it cancels"
    assert "argmax" not in str(steps[-1].result)


def test_batchnorm_dx_is_the_compact_formula():
    d, _ = derived("batchnorm")
    assert text(d.gradient("x").result) == (
        "(dout[n, d] - xhat[n, d]*Σ_n2(dout[n2, d]*xhat[n2, d])/(N - 1) - Σ_n2(dout[n2, d])/N)*gamma[d]*var_inv[d]"
    )


def test_batchnorm_grads_share_their_batch_sums():
    _, module = derived("batchnorm")
    x, g, b = torch.randn(32, 64), torch.randn(64), torch.randn(64)
    out, saved = module.batchnorm_forward(x, g, b)
    with OpCounter() as counter:
        module.batchnorm_backward(torch.randn_like(out), saved)
    assert counter.ops.count("sum") == 2, counter.ops


def _lecture_batchnorm_ops(dout: torch.Tensor, saved: dict) -> list[str]:
    """The hand formulas of LECTURE.md exercise 3 (allowed here: a test compares against them)."""
    n = dout.shape[0]
    bnraw, bnvar_inv, bngain = saved["xhat"], saved["var_inv"], saved["gamma"]
    with OpCounter() as counter:
        bngain * bnvar_inv / n * (n * dout - dout.sum(0) - n / (n - 1) * bnraw * (dout * bnraw).sum(0))
        (bnraw * dout).sum(0, keepdim=True)
        dout.sum(0, keepdim=True)
    return counter.ops


def test_batchnorm_backward_runs_no_more_aten_ops_than_the_hand_formula():
    _, module = derived("batchnorm")
    x, g, b = torch.randn(32, 64), torch.randn(64), torch.randn(64)
    out, saved = module.batchnorm_forward(x, g, b)
    dout = torch.randn_like(out)
    with OpCounter() as counter:
        module.batchnorm_backward(dout, saved)
    assert len(counter.ops) <= len(_lecture_batchnorm_ops(dout, saved)), counter.ops


def test_cross_entropy_backward_runs_no_more_aten_ops_than_the_hand_formula():
    _, module = derived("cross_entropy")
    logits, y = torch.randn(32, 27), torch.randint(0, 27, (32,))
    _, saved = module.cross_entropy_forward(logits, y)
    with OpCounter() as ours:
        module.cross_entropy_backward(None, saved)
    with OpCounter() as hand:
        dlogits = F.softmax(logits, 1)
        dlogits[range(32), y] -= 1
        dlogits /= 32
    assert len(ours.ops) <= len(hand.ops), (ours.ops, hand.ops)


def test_cross_entropy_matches_autograd_to_1e6_and_is_stable_for_huge_logits():
    _, module = derived("cross_entropy")
    logits = torch.randn(32, 27, requires_grad=True)
    y = torch.randint(0, 27, (32,))
    F.cross_entropy(logits, y).backward()
    _, saved = module.cross_entropy_forward(logits.detach(), y)
    assert (module.cross_entropy_backward(None, saved).logits - logits.grad).abs().max() < 1e-6
    huge = torch.randn(32, 27) * 1e4
    loss, saved = module.cross_entropy_forward(huge, y)
    assert torch.isfinite(loss) and torch.isfinite(module.cross_entropy_backward(None, saved).logits).all()


def test_batchnorm_matches_autograd_to_1e6():
    """float32, relative to each gradient's largest entry (an absolute 1e-6 is 2 ulps at 5.0)."""
    _, module = derived("batchnorm")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=gen).requires_grad_()
    g = torch.randn(64, generator=gen).requires_grad_()
    b = torch.randn(64, generator=gen).requires_grad_()
    out, saved = module.batchnorm_forward(x, g, b)
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout)
    grads = module.batchnorm_backward(dout, saved)
    for got, want in ((grads.x, x.grad), (grads.gamma, g.grad), (grads.beta, b.grad)):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_fused_and_chain_backward_agree(op_name):
    d, module = derived(op_name)
    from derive.verify import default_sizes, example_inputs

    inputs = example_inputs(d.program, default_sizes(d.program), torch.float64, seed=5)
    out, saved = getattr(module, f"{op_name}_forward")(*inputs)
    g = None if out.dim() == 0 else torch.randn(out.shape, dtype=torch.float64)
    fused = getattr(module, f"{op_name}_backward")(g, saved)._asdict()
    steps = getattr(module, f"{op_name}_backward_steps")(g, saved)
    for name, value in fused.items():
        torch.testing.assert_close(value, steps[name], rtol=1e-9, atol=1e-10)


def test_fused_formula_is_exact_on_small_index_sets(op_name):
    d, _ = derived(op_name)
    statuses = exact_check(d)
    assert [name for name, _ in statuses] == [t.name for t in d.program.differentiable_inputs]
    assert all(status in ("exact", "equal to 50 digits") for _, status in statuses), statuses


@pytest.mark.parametrize(
    "op_name, wrt, error",
    [
        ("tanh", "x", 1),  # twice the derivative
        ("linear", "W", sympy.Rational(1, 10**30)),  # rational: any difference at all
        ("batchnorm", "x", sympy.Rational(1, 10**40)),  # far below float64's resolution
        ("makemore_mlp", "W1", sympy.Rational(1, 10**40)),  # the whole network, at its depth
    ],
)
def test_exact_check_catches_a_wrong_formula(op_name: str, wrt: str, error: sympy.Expr):
    d, _ = derived(op_name)
    gradients = [
        type(g)(g.wrt, g.raw, g.steps, g.result * (1 + error)) if g.wrt.name == wrt else g for g in d.gradients
    ]
    broken = type(d)(d.op, d.program, d.chain, gradients, d.code)
    statuses = dict(exact_check(broken))
    assert statuses.pop(wrt) == "FAILED"
    assert "FAILED" not in statuses.values()


@op(x="n d", w="d")
def relu6_scaled(x, w):
    """relu6 of a product: the exact check's first point has w[0] = 0, so pre[0, d] = 0, a kink."""
    out = apply(lambda u: sympy.Min(sympy.Max(u, 0), 6), x * w)
    return out


def test_the_exact_check_draws_its_point_off_the_kinks():
    """At a kink SymPy's derivative is its own convention (Heaviside(0) = 1/2), not PyTorch's that
    the formulas follow: the check draws again until no entry sits at one."""
    d = derive(relu6_scaled)
    assert dict(exact_check(d)) == {"x": "exact", "w": "exact"}
    broken = [type(g)(g.wrt, g.raw, g.steps, g.result * 2) if g.wrt.name == "w" else g for g in d.gradients]
    assert dict(exact_check(type(d)(d.op, d.program, d.chain, broken, d.code)))["w"] == "FAILED"


@pytest.mark.parametrize(
    "expr, at_kink",
    [
        (sympy.Max(sympy.Symbol("a") - 1, 0), True),
        (sympy.Max(sympy.Symbol("a"), 0), False),
        (sympy.Min(sympy.Symbol("a"), sympy.Symbol("b"), 3), True),
        (sympy.Abs(sympy.Symbol("a") - sympy.Symbol("b")), True),
        (sympy.Piecewise((1, sympy.Symbol("a") > 1), (0, True)), True),
        (sympy.Piecewise((1, sympy.Symbol("a") > 2), (0, True)), False),
        (sympy.exp(sympy.Symbol("a") - 1), False),
    ],
)
def test_a_kink_is_a_tie_of_a_max_or_min_or_a_comparison_or_zero_under_abs(expr, at_kink):
    from derive.verify import _at_kink

    a, b = sympy.Symbol("a"), sympy.Symbol("b")
    assert _at_kink(expr, {a: sympy.S.One, b: sympy.S.One}) is at_kink


@op(x="n d", w="d")
def weighted_spread(x, w):
    """A weighted sum of squared deviations, normalised by its own mean (in no catalogue)."""
    centred = x - x.mean("n", keepdim=True)
    sq = w * centred**2
    total = sq.sum("d", keepdim=True)
    out = sq / total.mean("n", keepdim=True)
    return out


def test_an_op_defined_here_gets_a_verified_fused_backward():
    d = derive(weighted_spread)
    module = load_module(render(d), "weighted_spread")
    v = verify(d, module)
    assert v.ok, v
    assert all(status != "FAILED" for _, status in v.exact)
    assert not any(s.rule == "split sums" for s in d.gradient("x").steps[-1:]), "ends simplified"


def test_the_centred_sum_identity_is_named_in_the_derivation():
    d, _ = derived("batchnorm")
    identities = [s.identity for s in d.gradient("x").steps if s.rule == "sum identities"]
    assert identities and "= 0" in identities[0]


def test_softmax_backward_reuses_the_forward_output():
    d, _ = derived("softmax")
    result = d.gradient("x").result
    assert "e[" not in text(result) and "total" not in text(result), text(result)


def test_bce_with_logits_gradient_is_sigmoid_minus_target_over_count():
    d, _ = derived("bce_with_logits")
    expr = d.gradient("z").result
    entries = {a: sympy.Symbol(str(a.func), real=True) for a in expr.atoms(sympy.core.function.AppliedUndef)}
    z, y, dloss = (sympy.Symbol(n, real=True) for n in ("z", "y", "dloss"))
    N, D = sympy.Symbol("N", integer=True, positive=True), sympy.Symbol("D", integer=True, positive=True)
    expected = (1 / (1 + sympy.exp(-z)) - y) * dloss / (N * D)
    assert not expr.has(ISum)
    assert sympy.simplify(expr.xreplace(entries) - expected) == 0


# -- fractional powers written inline -------------------------------------------------------------
@op(x="n d", gamma="d", beta="d")
def layernorm_inline_power(x, gamma, beta, eps=1e-5):
    """Layer norm as the benchmarks' composition writes it: the inverse root is no named value."""
    diff = x - x.mean("d", keepdim=True)
    var = (diff**2).mean("d", keepdim=True)
    xhat = diff * (var + eps) ** -0.5
    out = gamma * xhat + beta
    return out


def test_a_fractional_power_is_shared_between_the_values_it_forms():
    """dx's ``(eps + var)**-1.5`` holds two factors ``(eps + var)**-0.5``: one forms ``xhat`` beside
    ``diff``, the other ``xhat`` inside the row sum. So dx reads ``xhat`` alone, as the catalogue's
    layer norm does, one product serves dgamma and dx, and the forward need not keep ``diff``."""
    d = derive(layernorm_inline_power)
    dx = text(d.gradient("x").result)
    assert "diff" not in dx and dx.count("xhat[") == 2, dx
    module = load_module(render(d), "layernorm_inline_power")
    x, gamma, beta = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn(5)
    _, saved = module.layernorm_inline_power_forward(x, gamma, beta.double())
    assert "diff" not in saved
    v = verify(d, module)
    assert v.ok, v


@op(x="n g c s", gamma="g c", beta="g c")
def group_norm(x, gamma, beta, eps=1e-5):
    """Group norm: statistics over two dims at once (c, s), an affine per channel (g, c)."""
    diff = x - x.mean(("c", "s"), keepdim=True)
    var = (diff**2).mean(("c", "s"), keepdim=True)
    xhat = diff * (var + eps) ** -0.5
    out = xhat * gamma + beta
    return out


def test_a_value_centred_over_two_dims_sums_to_zero_and_the_norm_backward_is_compact():
    """Σ_c Σ_s diff = 0 as Σ_d diff = 0, and (eps + var)**-0.5 moves into the nested sums to form
    xhat: dx reads xhat, dout and gamma only, as a layer norm's does, and the forward keeps no diff."""
    d = derive(group_norm)
    steps = d.gradient("x").steps
    assert any(s.rule == "sum identities" and "diff" in s.identity and "= 0" in s.identity for s in steps)
    dx = text(d.gradient("x").result)
    assert "diff" not in dx and dx.count("xhat[") == 2, dx
    module = load_module(render(d), "group_norm")
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    gamma, beta = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    assert "diff" not in module.group_norm_forward(x, gamma, beta)[1]
    expected = F.group_norm(x.reshape(3, 8, 5), 2, gamma.reshape(-1), beta.reshape(-1), 1e-5).reshape(x.shape)
    torch.testing.assert_close(module.group_norm_forward(x, gamma, beta)[0], expected)
    v = verify(d, module)
    assert v.ok, v


@op(s="n c", y="const n c")
def squared_hinge(s, y):
    loss = (apply(lambda u: sympy.Max(u, 0), 1 - y * s) ** 2).mean("c").mean("n")
    return loss


def test_a_relu_beside_its_own_step_needs_no_mask():
    """d/da relu(a)**2 is 2·relu(a)·step(a), and relu(a) is 0 wherever the step is: one relu, no mask."""
    d = derive(squared_hinge)
    assert "Heaviside" not in str(d.gradient("s").result), text(d.gradient("s").result)
    module = load_module(render(d), "squared_hinge")
    s = torch.tensor([[0.5, 1.0, 2.0], [-1.0, 1.0, 0.0]], dtype=torch.float64)  # 1 - y*s = 0 at two
    y = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    _, saved = module.squared_hinge_forward(s, y)
    (ds,) = module.squared_hinge_backward(None, saved)
    code = "\n".join(d.code.backward)
    assert not any(m in code for m in ("masked_fill", "where", "torch.gt", "torch.ge")), code
    leaf = s.clone().requires_grad_()
    (F.relu(1 - y * leaf) ** 2).mean().backward()
    torch.testing.assert_close(ds, leaf.grad)


@op(pred="n d", y="n d")
def logcosh_loss(pred, y):
    r = pred - y
    loss = apply(lambda u: sympy.log(sympy.cosh(u)), r).mean("d").mean("n")
    return loss


def test_a_ratio_of_sinh_to_cosh_is_one_tanh():
    """d log(cosh r)/dr is tanh(r): one bounded function, where sinh(r)/cosh(r) is inf/inf = NaN at
    |r| > 89 in float32, and the forward keeps no cosh for the backward."""
    d = derive(logcosh_loss)
    assert text(d.gradient("pred").result) == "dloss*tanh(r[n, d])/(D*N)", text(d.gradient("pred").result)
    module = load_module(render(d), "logcosh_loss")
    pred = torch.tensor([[100.0, 0.5], [-3.0, 0.0]])
    _, saved = module.logcosh_loss_forward(pred, torch.zeros_like(pred))
    assert not any(k.startswith("cosh") for k in saved), sorted(saved)
    grads = module.logcosh_loss_backward(None, saved)
    torch.testing.assert_close(grads.pred, torch.tanh(pred) / 4)
    torch.testing.assert_close(grads.y, -torch.tanh(pred) / 4)


@op(a="n c", b="n c")
def kl_of_softmaxes(a, b):
    za, zb = a - a.max("c", keepdim=True), b - b.max("c", keepdim=True)
    la = za - log(exp(za).sum("c", keepdim=True))
    lb = zb - log(exp(zb).sum("c", keepdim=True))
    loss = (exp(la) * (la - lb)).sum("c").mean("n")
    return loss


def test_the_exp_of_a_log_softmax_sums_to_one():
    """Σ_c exp(la[n, c]) = 1 for la a log-softmax: db is softmax(b) - softmax(a), with no row sum."""
    d = derive(kl_of_softmaxes)
    db = d.gradient("b")
    assert not any(
        isinstance(n, ISum) and n.body.has(sympy.exp) and "la" in str(n) for n in sympy.preorder_traversal(db.result)
    ), text(db.result)
    assert any(s.rule == "sum identities" and "= 1" in s.identity for s in db.steps), [s.rule for s in db.steps]
    module = load_module(render(d), "kl_of_softmaxes")
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    _, saved = module.kl_of_softmaxes_forward(a, b)
    grads = module.kl_of_softmaxes_backward(None, saved)
    leaves = [t.clone().requires_grad_() for t in (a, b)]
    F.kl_div(
        F.log_softmax(leaves[1], 1), F.log_softmax(leaves[0], 1), reduction="batchmean", log_target=True
    ).backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_a_softmax_is_read_through_the_log_softmax_the_forward_computed():
    """exp(za)/Σexp(za) is exp(la) for la = za - log Σexp(za), an exp the forward computes: da is the
    textbook ``p·(la - lb - Σ p·(la - lb))``, and the forward keeps no exp(za) or row sum for it.
    exp(lb) the forward does not compute, so db divides the forward's exp(zb) by its sum."""
    d = derive(kl_of_softmaxes)
    da, db = text(d.gradient("a").result), text(d.gradient("b").result)
    assert "za" not in da and da.count("exp(la[") == 2 and da.count("Σ") == 1, da  # one sum of differences
    assert "exp(lb" not in db and "exp(zb[n, c])/Σ" in db, db
    module = load_module(render(d), "kl_of_softmaxes")
    assert not any(k.startswith(("exp_za", "sum_za")) for k in module._BACKWARD_KEYS), module._BACKWARD_KEYS


# -- powers with a symbolic exponent --------------------------------------------------------------
@op(x="n d")
def power_of_a_parameter(x, p=2.0):
    out = x**p
    return out


@op(logits="n c", target="int n")
def focal(logits, target, gamma=2.0):
    z = logits - logits.max("c", keepdim=True)
    logp = z - log(exp(z).sum("c", keepdim=True))
    lpt = logp.take(target, "c")
    loss = -(((1 - exp(lpt)) ** gamma) * lpt).mean("n")
    return loss


def test_a_power_with_a_parameter_exponent_is_not_divided_by_its_base():
    """SymPy's d(x**p)/dx is p*x**p/x: 0/0 at x = 0, where PyTorch gives p*x**(p - 1) = 0 for p = 2."""
    d = derive(power_of_a_parameter)
    assert text(d.gradient("x").result) == "p*dout[n, d]*x[n, d]**(p - 1)"
    module = load_module(render(d), "power_of_a_parameter")
    x = torch.tensor([[0.0, 1.5, -2.0]], dtype=torch.float64)
    out, saved = module.power_of_a_parameter_forward(x)
    (dx,) = module.power_of_a_parameter_backward(torch.ones_like(out), saved)
    steps = module.power_of_a_parameter_backward_steps(torch.ones_like(out), saved)
    leaf = x.clone().requires_grad_()
    (leaf**2.0).sum().backward()
    torch.testing.assert_close(dx, leaf.grad)
    torch.testing.assert_close(steps["x"], leaf.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_focal_loss_gradient_is_finite_at_a_confident_row(dtype: torch.dtype):
    """(1 - pt)**gamma at pt == 1 (a logit margin of 20 rounds pt to 1 in float32): 0, not 0/0."""
    module = load_module(render(derive(focal)), "focal")
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.5, 0.1, -0.3]], dtype=dtype)
    target = torch.tensor([0, 2])
    leaf = logits.clone().requires_grad_()
    module.focal(leaf, target).backward()
    ref = logits.clone().requires_grad_()
    lpt = torch.log_softmax(ref, 1).gather(1, target[:, None])[:, 0]
    (-((1 - lpt.exp()) ** 2.0 * lpt).mean()).backward()
    assert torch.isfinite(leaf.grad).all(), leaf.grad
    torch.testing.assert_close(leaf.grad, ref.grad)


@op(y="k")
def scaled_power(y, alpha=0.75):
    return apply(lambda u: sympy.Abs(u) ** (alpha + 1), y / exp(y.sum("k", keepdim=True)))


def test_a_power_of_a_product_combines_with_its_factor_so_an_exact_zero_is_no_zero_division():
    """d|c·y|^p/dy is SymPy's p·(c·|y|)^p·sign(y)/|y|, 0/0 at y = 0; split into c^p·|y|^p (both factors
    nonnegative), the powers of |y| combine: p·c^p·|y|^(p-1)·sign(y), 0 there as autograd gives."""
    d = derive(scaled_power)
    assert "/Abs(y[k])" not in text(d.gradient("y").result), text(d.gradient("y").result)
    module = load_module(render(d), "scaled_power")
    y = torch.tensor([0.0, 0.25, -0.5], dtype=torch.float64)
    leaf = y.clone().requires_grad_()
    module.scaled_power(leaf).sum().backward()
    ref = y.clone().requires_grad_()
    ((ref / ref.sum().exp()).abs() ** 1.75).sum().backward()
    assert torch.isfinite(leaf.grad).all(), leaf.grad
    torch.testing.assert_close(leaf.grad, ref.grad)


@op(x="n d")
def shifted_by_a_function_of_a_parameter(x, alpha=0.75):
    out = apply(lambda u: sympy.tanh(u + sympy.exp(alpha - 2)) ** 2, x)
    return out


def test_a_function_of_a_parameter_alone_is_a_python_number_in_every_forward():
    """``exp(alpha - 2)`` prints as ``math.exp``: the reference forward that verification runs has ``math`` too."""
    d = derive(shifted_by_a_function_of_a_parameter)
    module = load_module(render(d), "shifted_by_a_function_of_a_parameter")
    assert "math.exp(alpha - 2)" in "\n".join(d.code.reference_forward)
    v = verify(d, module)
    assert v.ok, v


# -- δ terms that cancel ---------------------------------------------------------------------------
@op(logits="n c", target="int n")
def label_smoothed_cross_entropy(logits, target, eps=0.1):
    z = logits - logits.max("c", keepdim=True)
    logp = z - log(exp(z).sum("c", keepdim=True))
    loss = ((1 - eps) * -logp.take(target, "c") + eps * -logp.mean("c")).mean("n")
    return loss


@pytest.mark.parametrize("the_op", [label_smoothed_cross_entropy, focal], ids=lambda o: o.name)
def test_the_max_subtracted_for_stability_leaves_no_argmax_in_the_gradient(the_op):
    """``-C·(p - δ(c, argmax)) - C·δ(c, argmax)`` is ``-C·p``: no one-hot of the argmax, which the forward
    then need not keep; the target's δ is a scatter, not a one-hot either."""
    d = derive(the_op)
    result = d.gradient("logits").result
    assert "argmax" not in str(result), text(result)
    code = "\n".join(d.code.backward)
    assert "argmax" not in code and "new_zeros" not in code, code
    module = load_module(render(d), the_op.name)
    logits = torch.tensor([[2.0, 2.0, -1.0, 0.5], [0.3, -0.2, 0.1, 0.1], [5.0, 1.0, 1.0, -3.0]], dtype=torch.float64)
    target = torch.tensor([1, 3, 0])
    leaf = logits.clone().requires_grad_()
    getattr(module, the_op.name)(leaf, target).backward()
    ref = logits.clone().requires_grad_()
    if the_op is focal:
        lpt = torch.log_softmax(ref, 1).gather(1, target[:, None])[:, 0]
        (-((1 - lpt.exp()) ** 2.0 * lpt).mean()).backward()
    else:
        F.cross_entropy(ref, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_label_smoothing_gradient_is_softmax_minus_the_smoothed_target():
    """(1 - eps)·p + eps·p collects to p: the textbook ``p - eps/C - (1 - eps)·onehot``, over N."""
    d = derive(label_smoothed_cross_entropy)
    rest = " + exp(z[n, c])/Σ_c2(exp(z[n, c2])) - eps/C)*dloss/N"
    # SymPy writes the target's coefficient as -(1 - eps) or (eps - 1) depending on its term order
    assert text(d.gradient("logits").result) in {
        f"(-(1 - eps)*δ(c, target[n]){rest}",
        f"((eps - 1)*δ(c, target[n]){rest}",
    }


# -- a stabler forward, when the op asks for it ----------------------------------------------------
@op(x="n d", a="d")
def softplus_mix(x, a):
    out = a * apply(lambda u: sympy.log(1 + sympy.exp(u)), x) + (1 - a) * apply(sympy.Abs, x)
    return out


@op(stable_forward=True, x="n d", a="d")
def softplus_mix_stable(x, a):
    out = a * apply(lambda u: sympy.log(1 + sympy.exp(u)), x) + (1 - a) * apply(sympy.Abs, x)
    return out


def test_a_softplus_written_as_log_one_plus_exp_is_finite_with_a_stable_forward():
    """log(1 + exp(800)) is inf as written; stable_forward computes max(v, 0) + log(1 + exp(-|v|))."""
    x = torch.tensor([[800.0, -800.0, 0.5], [3.0, -2.0, 0.0]])
    a = torch.tensor([0.3, 0.6, 0.9])
    plain = derive(softplus_mix)
    assert any("exp that overflows" in n and "stable_forward=True" in n for n in plain.notes), plain.notes
    module = load_module(render(plain), "softplus_mix")
    assert torch.isinf(module.softplus_mix_forward(x, a)[0]).any()  # as written
    d = derive(softplus_mix_stable)
    module = load_module(render(d), "softplus_mix_stable")
    with OpCounter() as counter:
        module.softplus_mix_stable_forward(x, a)
    assert counter.ops.count("log1p") == 1, counter.ops  # the value kept for the backward is the output's term
    xs, as_ = x.clone().requires_grad_(), a.clone().requires_grad_()
    out = module.softplus_mix_stable(xs, as_)
    xr, ar = x.double().requires_grad_(), a.double().requires_grad_()  # float64: float32 autograd's
    ref = ar * F.softplus(xr) + (1 - ar) * xr.abs()  # da sums softplus and |x| apart, 1e-3 off at x = 800
    torch.testing.assert_close(out, ref.float())
    g = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(xs.grad, xr.grad.float())
    torch.testing.assert_close(as_.grad, ar.grad.float())


# -- step arguments ---------------------------------------------------------------------------
_n = sympy.Symbol("n", integer=True)  # stands for an index: entries below are tensor reads
_X, _Y = sympy.Function("x")(_n), sympy.Function("y")(_n)
_ALPHA = sympy.Symbol("alpha", positive=True)


@pytest.mark.parametrize(
    "step, plain",
    [
        (sympy.Heaviside(2 * _X - 2 * _Y, 0), sympy.Heaviside(_X - _Y, 0)),
        (sympy.Heaviside(-3 * _X, 1), sympy.Heaviside(-_X, 1)),
        (sympy.Heaviside(_ALPHA * (1 - sympy.exp(_X / _ALPHA)), 1), sympy.Heaviside(-_X, 1)),
        (sympy.Heaviside(sympy.exp(_X) - 2, 0), sympy.Heaviside(_X - sympy.log(2), 0)),
        (sympy.Heaviside(_X - sympy.exp(_Y), 0), sympy.Heaviside(_X - sympy.exp(_Y), 0)),  # not a constant
        (sympy.Heaviside(sympy.exp(_X) + 1, 0), sympy.Heaviside(sympy.exp(_X) + 1, 0)),  # no log of -1
    ],
)
def test_a_step_compares_the_value_itself(step, plain):
    """A positive scale and an exp leave a step's 0, 1 and tie points where they were."""
    assert simplify.plain_step_arguments(step) == plain
    for x, y in ((-1.5, 0.25), (0.0, 0.0), (0.6931471805599453, 1.0), (2.0, -1.0)):
        point = {_X: x, _Y: y, _ALPHA: 0.5}
        assert float(step.subs(point)) == float(plain.subs(point))


@op(x="n e", gamma="e")
def layernorm_in_one_line(x, gamma, eps=1e-5):
    """A layer norm as a user writes it: the normalised value never named, the scale in the same line."""
    xc = x - x.mean("e", keepdim=True)
    out = xc * ((xc**2).mean("e", keepdim=True) + eps) ** -0.5 * gamma
    return out


def test_a_power_every_term_divides_by_is_factored_out_of_the_sum():
    """``dout·gamma/sqrt(v) - xc·S/(E·v) - S2/(E·sqrt(v))`` is ``(…)/sqrt(v)``: one scale of the
    whole of dx, not an N x E outer product gamma/sqrt(v) for its first term."""
    d = derive(layernorm_in_one_line)
    dx = d.gradient("x").result
    assert isinstance(dx, sympy.Mul) and any(
        isinstance(f, sympy.Pow) and f.exp == sympy.Rational(-1, 2) for f in dx.args
    ), text(dx)
    assert not any("gamma * pow" in line or "gamma*pow" in line for line in d.code.backward), d.code.backward
    assert verify(d, load_module(render(d), "layernorm_in_one_line")).ok


@op(x="n d")
def mish(x):
    return x * tanh(log(1 + exp(x)))


def test_a_sum_already_in_the_bounded_exponential_is_not_multiplied_out():
    """mish's ``tanh + x·(1 - tanh²)·e/(1 + e)``: its product goes to ``1/(1 + e)`` and stays a
    product; factor() on the whole sum had multiplied it into five terms, two pairs that cancel."""
    d = derive(mish)
    dx = d.gradient("x").result
    (inner,) = [f for f in sympy.Mul.make_args(dx) if isinstance(f, sympy.Add)]
    assert len(inner.args) == 2, text(dx)
    assert verify(d, load_module(render(d), "mish")).ok


@op(stable_forward=True, z="n", y="const n", pw="const n")
def bce_with_a_positive_weight(z, y, pw):
    log_sigmoid = lambda t: apply(lambda u: -sympy.log(1 + sympy.exp(-u)), t)  # noqa: E731
    return -(pw * y * log_sigmoid(z) + (1 - y) * log_sigmoid(-z)).mean("n")


def test_a_ratio_of_exponentials_stays_bounded_when_the_rules_would_take_turns():
    """``combine fractions`` had put ``1/(1 + e)`` terms back over ``1 + e`` (``e/(1 + e)``, inf/inf
    past z = 88 in float32), and ``bounded exponentials`` took them apart again, to the last round."""
    d = derive(bce_with_a_positive_weight)
    module = load_module(render(d), "bce_with_a_positive_weight")
    z = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0])
    y, pw = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]), torch.full((5,), 2.0)
    _, saved = module.bce_with_a_positive_weight_forward(z, y, pw)
    (dz,) = module.bce_with_a_positive_weight_backward(None, saved)
    leaf = z.clone().requires_grad_()
    torch.nn.functional.binary_cross_entropy_with_logits(leaf, y, pos_weight=pw).backward()
    torch.testing.assert_close(dz, leaf.grad)


@op(x="n d", y="int n", W="d c")
def cosface(x, y, W, s=30.0, m=0.35):
    xn = x / sqrt((x * x).sum("d", keepdim=True))
    Wn = W / sqrt((W * W).sum("d", keepdim=True))
    cos = xn @ Wn
    ct = cos.take(y, "c")
    z = s * cos
    zmax = z.max("c")
    denom = exp(z - z.max("c", keepdim=True)).sum("c") - exp(s * ct - zmax) + exp(s * (ct - m) - zmax)
    return (-(s * (ct - m) - zmax) + log(denom)).mean("n")


def test_an_exp_of_a_difference_stays_one_exp_through_rational_simplification():
    """SymPy's rational functions split ``exp(s·ct - zmax)`` into ``exp(s·ct)·exp(-zmax)``: at s = 100
    ``exp(91)`` overflowed float32 and dx was NaN where the forward, and autograd, are finite."""
    d = derive(cosface)
    module = load_module(render(d), "cosface")
    x, y, W = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([1]), torch.tensor([[1.0, 1.0], [0.0, 0.45], [0.0, 0.0]])
    _, saved = module.cosface_forward(x, y, W, s=100.0)
    dx, dW = module.cosface_backward(None, saved)
    leaves = [x.double().requires_grad_(), W.double().requires_grad_()]
    xn = leaves[0] / leaves[0].norm(dim=1, keepdim=True)
    cos = xn @ (leaves[1] / leaves[1].norm(dim=0, keepdim=True))
    margin = 0.35 * torch.nn.functional.one_hot(y, 2).double()
    torch.nn.functional.cross_entropy(100.0 * (cos - margin), y).backward()
    for got, leaf in zip((dx, dW), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=1e-4, rtol=1e-5)


@op(x="n d")
def sigmoid_plus_x_times_its_mirror(x):
    return apply(lambda u: sympy.exp(u) / (1 + sympy.exp(u)) + sympy.exp(-u) / (1 + sympy.exp(-u)) * u, x)


def test_powers_of_an_exp_are_written_through_the_bounded_ratio_too():
    """``exp(2x)/(1 + exp(x))²`` is ``(1 - s)²``: left with ``exp(2x)`` it was inf/inf past x = 44,
    and the sum it joined kept the ratio unbounded (a review found dx NaN at ±100)."""
    d = derive(sigmoid_plus_x_times_its_mirror)
    module = load_module(render(d), "sigmoid_plus_x_times_its_mirror")
    x = torch.tensor([[-100.0, -1.0, 0.5, 100.0]])
    _, saved = module.sigmoid_plus_x_times_its_mirror_forward(x)
    (dx,) = module.sigmoid_plus_x_times_its_mirror_backward(torch.ones(1, 4), saved)
    leaf = x.double().requires_grad_()
    (torch.sigmoid(leaf) + torch.sigmoid(-leaf) * leaf).sum().backward()
    torch.testing.assert_close(dx.double(), leaf.grad, atol=1e-6, rtol=1e-5)


@op(x="n d", g="d", mask="const n d")
def scaled_masked_gelu(x, g, mask):
    return g * (mask * apply(lambda v: v / 2 * (1 + sympy.erf(v / sympy.sqrt(2))), x))


def test_an_exp_of_a_negative_stays_a_factor_not_a_denominator():
    """Over a common denominator ``x·exp(-x²/2) + c`` had become ``(x + c·exp(x²/2))·exp(-x²/2)``:
    inf·0 past |x| = 13.3 in float32, where the GELU's derivative is 0 or 1."""
    d = derive(scaled_masked_gelu)
    module = load_module(render(d), "scaled_masked_gelu")
    x = torch.tensor([[-20.0, -14.0, -13.0, 0.5, 13.0, 14.0, 20.0]])
    g, mask = torch.ones(7), torch.ones(1, 7)
    _, saved = module.scaled_masked_gelu_forward(x, g, mask)
    dx, _ = module.scaled_masked_gelu_backward(torch.ones(1, 7), saved)
    leaf = x.clone().requires_grad_()
    torch.nn.functional.gelu(leaf).sum().backward()
    torch.testing.assert_close(dx, leaf.grad)


@op(mu="n d", raw="n d", y="n d")
def gaussian_nll_with_a_softplus_variance(mu, raw, y, eps=1e-6):
    v = apply(lambda u: sympy.log(1 + sympy.exp(u)), raw) + eps
    return (0.5 * (log(v) + (y - mu) ** 2 / v)).mean(("n", "d"))


def test_one_minus_a_bounded_ratio_is_written_without_cancellation():
    """sigmoid(raw) had been ``1 - 1/(1 + exp(raw))``: exactly 0 in float32 below raw = -17, where
    the gradient, multiplied by 1/v², is -257 at raw = -20. Written ``1/(1 + exp(-raw))`` it is exact."""
    d = derive(gaussian_nll_with_a_softplus_variance)
    module = load_module(render(d), "gaussian_nll_with_a_softplus_variance")
    mu, raw, y = torch.zeros(1, 4), torch.tensor([[-5.0, -15.0, -20.0, -30.0]]), torch.ones(1, 4)
    _, saved = module.gaussian_nll_with_a_softplus_variance_forward(mu, raw, y)
    grads = module.gaussian_nll_with_a_softplus_variance_backward(None, saved)
    leaf = raw.double().requires_grad_()
    v = torch.nn.functional.softplus(leaf) + 1e-6
    (0.5 * (torch.log(v) + 1 / v)).mean().backward()
    torch.testing.assert_close(grads.raw.double(), leaf.grad, rtol=1e-4, atol=0)


@op(z="n", t="const n")
def logistic_loss_with_soft_targets(z, t):
    return (apply(lambda u: sympy.log(1 + sympy.exp(u)), z) - t * z).sum("n")


def test_the_complement_of_the_bounded_ratio_keeps_its_tail_inside_a_longer_sum():
    """dz = 1 - 1/(1 + exp(z)) - t: the pair is rewritten among other terms (only a sum of exactly
    two had been), so at t = 0 and z = -30 dz is exp(-30), not 0."""
    d = derive(logistic_loss_with_soft_targets)
    module = load_module(render(d), "logistic_loss_with_soft_targets")
    z, t = torch.tensor([-30.0, -20.0, 0.5, 30.0]), torch.zeros(4)
    _, saved = module.logistic_loss_with_soft_targets_forward(z, t)
    (dz,) = module.logistic_loss_with_soft_targets_backward(None, saved)
    torch.testing.assert_close(dz.double(), torch.sigmoid(z.double()), rtol=1e-5, atol=0)


@op(x="n c", a="n")
def logsumexp_with_one_more_term(x, a):
    m = x.max("c")
    return log(exp(a - m) + exp(x - x.max("c", keepdim=True)).sum("c")) + m


def test_delta_terms_whose_coefficients_sum_to_zero_through_a_forward_value_are_dropped():
    """``δ(c, argmax)·(1 - exp(a - m)/p - Σ exp(x - m)/p)`` is 0 by ``p``'s definition: no argmax
    kept, no scatter of zeros; the gradient is ``exp(x - m)/p·dout``."""
    d = derive(logsumexp_with_one_more_term)
    dx = d.gradient("x").result
    assert not dx.has(sympy.KroneckerDelta), text(dx)
    assert not any("scatter" in line or "argmax" in line for line in d.code.backward), d.code.backward
    assert verify(d, load_module(render(d), "logsumexp_with_one_more_term")).ok


@op(x="n d", y="n d")
def ratio(x, y):
    out = x / y
    return out


def test_the_exact_check_draws_its_point_off_a_pole():
    """The draw puts 0 in y at seed 0: x / y is infinite there; the point is drawn again (the
    comparison had crashed: 'Invalid NaN comparison')."""
    assert dict(exact_check(derive(ratio))) == {"x": "exact", "y": "exact"}


@op(fn="n d")
def squared(fn):
    """An input may be called fn (op's own first parameter is positional-only)."""
    out = fn * fn
    return out


def test_an_input_may_be_called_fn():
    assert [t.name for t in squared.program().inputs] == ["fn"]


@op(x="n c t", gamma="c", beta="c")
def instance_norm_inline(x, gamma, beta, eps=1e-5):
    mu = x.mean("t")
    var = ((x - mu) ** 2).mean("t")
    return (x - mu) / (var + eps) ** 0.5 * gamma + beta


@op(x="n d", beta="d")
def swish_learnt(x, beta):
    return x / (1 + exp(-beta * x))


def test_a_sum_of_a_centred_value_is_not_split_into_sums_that_cancel():
    """``Σ_t dout·(x - mu)`` stays one sum of differences: split, ``Σ_t dout·x - mu·Σ_t dout`` lost
    float32's digits when ``|mu|`` dwarfs the spread (a constant input's dgamma was 7.8e-3, not 0),
    and a swish's ``Σ dout·out·x - Σ dout·out²`` (``out ≈ x``) was off by 1.4% of dbeta."""
    d = derive(instance_norm_inline)
    assert "mu[n, c]*Σ" not in text(d.gradient("gamma").result)
    module = load_module(render(d, formatted=False), d.name)
    x = torch.full((4, 6, 50), 5.0)
    out, saved = module.instance_norm_inline_forward(x, torch.randn(6), torch.randn(6))
    assert torch.equal(module.instance_norm_inline_backward(torch.randn_like(out), saved).gamma, torch.zeros(6))

    d = derive(swish_learnt)
    assert text(d.gradient("beta").result).count("Σ") == 1
    module = load_module(render(d, formatted=False), d.name)
    g = torch.Generator().manual_seed(0)
    x, beta = torch.rand(64, 8, generator=g) * 95 + 5, torch.ones(8)
    dout = torch.randn(64, 8, generator=g)
    out, saved = module.swish_learnt_forward(x, beta)
    x64, b64 = x.double(), beta.double().requires_grad_()
    (want,) = torch.autograd.grad(x64 * torch.sigmoid(b64 * x64), b64, dout.double())
    got = module.swish_learnt_backward(dout, saved).beta.double()
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert verify(d, module).ok


@op(x="n d", a="n")
def sum_minus_mean(x, a):
    return a * (x.sum("d") - x.mean("d"))


def test_sums_that_differ_by_a_scale_are_collected_not_merged():
    """Σ_d x - Σ_d x/D has no difference to take per entry: it stays (1 - 1/D)·Σ_d x, the sum the
    forward keeps (merged, dout moved inside and the backward summed x again)."""
    da = text(derive(sum_minus_mean).gradient("a").result)
    assert "Σ_d(x[n, d])" in da and "dout[n]*x" not in da, da
