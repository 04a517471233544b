"""Lowering of compositions a user writes: the code a performance engineer would write.

Matmuls in place of broadcast products, one mask, no recomputed contraction, scatters of values,
transcendentals evaluated once, PyTorch's conventions at kinks, overflow-free exponentials.
(The no-blow-up invariant is asserted on every catalogue op and random composition in
test_properties.py.)
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from derive import apply, derive, exp, log, op, sqrt
from derive.emit import render
from derive.lowering import plan as planner
from derive.lowering.saturate import saturated
from derive.verify import TensorSizes, default_sizes, example_inputs, load_module, verify

from .conftest import OPS, REPO, derived
from .test_simplify import focal, group_norm


class AtenOps(TorchDispatchMode):
    """Counts aten ops by name inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class InnerBroadcasts(TorchDispatchMode):
    """Elementwise kernels that read two or more tensors broadcast along their output's last dim.

    PyTorch's CPU loops vectorise along the last dim when at most one operand is broadcast there
    (stride 0); with two, the loop runs element by element.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] > 1 and torch.Tag.pointwise in func.tags:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor) and a.dim()]
            broadcast = [
                a for a in args if isinstance(a, torch.Tensor) and a.dim() and 0 in (a.shape[-1] - 1, a.stride(-1))
            ]
            if len(broadcast) >= 2:
                self.found.append(f"{func.__name__}{shapes}")
        return out


class MatrixProducts(TorchDispatchMode):
    """The shapes of the matrix products (mm, bmm) run inside the block: a product of matrices, not
    of a matrix and a vector."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "bmm") and min(out.shape[-2:]) > 1:
            self.shapes.append(tuple(out.shape))
        return out


relu = lambda u: sympy.Max(u, 0)  # noqa: E731


@op(x="n i", W1="i h", b1="h", W2="h o", b2="o", y="n o")
def mlp_mse(x, W1, b1, W2, b2, y):
    loss = ((apply(relu, x @ W1 + b1) @ W2 + b2 - y) ** 2).mean("o").mean("n")
    return loss


@op(x="n i", W="i h", V="i h")
def gated(x, W, V):
    out = apply(lambda u: u / (1 + sympy.exp(-u)), x @ W) * (x @ V)
    return out


@op(x="b t c")
def max_middle(x):
    out = x.max("t")
    return out


_MODULES: dict[str, tuple] = {}


def generated(the_op):
    if the_op.name not in _MODULES:
        d = derive(the_op)
        _MODULES[the_op.name] = (d, load_module(render(d), the_op.name))
    return _MODULES[the_op.name]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- a two-layer MLP written in one expression -------------------------------------------------
def test_two_layer_mlp_in_one_expression_lowers_to_matmuls_with_transposes_and_one_mask():
    d, _ = generated(mlp_mse)
    assert [s.name for s in d.program.statements] == ["pre1", "act1", "pre2", "loss"]
    code = "\n".join(d.code.backward)
    for line in ("dW1 = x.T @ dpre1", "dx = dpre1 @ W1.T", "dW2 = act1.T @ dpre2", "dact1 = dpre2 @ W2.T"):
        assert line in code, code
    assert code.count("@") == 4 and "einsum" not in code
    # one mask, relu'(0) = 0, as 0/1 floats (a bool mask and torch.where are scalar loops on a CPU),
    # which takes the product in place (one buffer, not two)
    assert "dpre1 = torch.gt(pre1, 0, out=torch.empty_like(pre1)).mul_(dact1)" in code
    assert not re.search(r"\bx @ W1\b|^pre1 = ", code, re.M)  # the pre-activation is saved, not recomputed


def test_two_layer_mlp_backward_runs_four_matmuls_and_no_larger_tensor_than_its_forward():
    d, module = generated(mlp_mse)
    args = [_randn(64, 32, seed=1), _randn(32, 48, seed=2), _randn(48, seed=3), _randn(48, 16, seed=4)]
    args += [_randn(16, seed=5), _randn(64, 16, seed=6)]
    with TensorSizes() as forward:
        _, saved = module.mlp_mse_forward(*args)
    with AtenOps() as ops, TensorSizes() as backward:
        grads = module.mlp_mse_backward(None, saved)
    assert ops.counts["mm"] == 4, ops.counts
    assert backward.largest <= max(forward.largest, *(a.numel() for a in args))
    leaves = [a.clone().requires_grad_() for a in args]
    ((F.relu(leaves[0] @ leaves[1] + leaves[2]) @ leaves[3] + leaves[4] - leaves[5]) ** 2).mean().backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-6, rtol=1e-5)


# -- a gated unit ------------------------------------------------------------------------------
def test_gated_unit_keeps_both_matmuls_and_evaluates_no_exp_in_the_backward():
    d, module = generated(gated)
    assert "dV = x.T @ dmm2" in d.code.backward
    x, W, V = _randn(32, 8, seed=1), _randn(8, 16, seed=2), _randn(8, 16, seed=3)
    with AtenOps() as fwd:
        out, saved = module.gated_forward(x, W, V)
    assert fwd.counts["mm"] == 2 and fwd.counts["exp"] == 1
    with AtenOps() as bwd:
        module.gated_backward(torch.ones_like(out), saved)
    assert bwd.counts["exp"] == 0 and bwd.counts["exp_"] == 0, bwd.counts  # exp(-a) comes from the forward
    # and so does the sigmoid 1/(1 + exp(-a)), which stands three times in the gradients: no div
    assert bwd.counts["div"] + bwd.counts["div_"] == 0, (bwd.counts, "\n".join(d.code.backward))
    assert "inv_mm1[n, h] = 1/(1 + exp(-mm1[n, h]))" in module.__doc__


@op(x="n d", w="d")
def relu6_scaled(x, w):
    out = apply(lambda u: sympy.Min(sympy.Max(u, 0), 6), x * w)
    return out


def test_a_product_two_gradients_hold_as_parts_is_computed_once():
    """``dx = dout·mask·w`` and ``dw = Σ_n dout·mask·x`` share ``dout·mask`` (the gradient at
    ``x*w``): one product with dout, read by both, not one per gradient."""
    d, module = generated(relu6_scaled)
    backward = "\n".join(d.code.backward)
    assert backward.count("dout") == 1, backward
    assert not any(re.fullmatch(r"\s*(\w+) = (\w+)", line) for line in d.code.backward), backward  # no alias
    x, w = _randn(16, 8, seed=1) * 4, _randn(8, seed=2)
    x[0, 0] = 0.0  # at the kink: relu'(0) = 0, as PyTorch's
    out, saved = module.relu6_scaled_forward(x, w)
    dout = _randn(16, 8, seed=3)
    grads = module.relu6_scaled_backward(dout, saved)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.autograd.backward(F.relu6(xr * wr), dout)
    torch.testing.assert_close(grads.x, xr.grad)
    torch.testing.assert_close(grads.w, wr.grad)


@op(x="n i", Wq="i h", Wk="i h", Wv="i h")
def three_projections(x, Wq, Wk, Wv):
    out = (x @ Wq) * (x @ Wk) + apply(relu, x @ Wv)
    return out


def test_the_matmuls_a_gradient_sums_accumulate_into_one_buffer():
    d, module = generated(three_projections)
    code = "\n".join(d.code.backward)
    assert re.search(r"^dx = \w+\.addmm_\(\w+, W\w\.T\)\.addmm_\(\w+, W\w\.T\)$", code, re.M), code
    args = [_randn(32, 8, seed=1), _randn(8, 16, seed=2), _randn(8, 16, seed=3), _randn(8, 16, seed=4)]
    out, saved = module.three_projections_forward(*args)
    dout = _randn(32, 16, seed=5)
    with AtenOps() as ops:
        grads = module.three_projections_backward(dout, saved)
    assert ops.counts["addmm_"] == 2 and ops.counts["add"] + ops.counts["add_"] == 0, ops.counts
    leaves = [a.clone().requires_grad_() for a in args]
    x, Wq, Wk, Wv = leaves
    ((x @ Wq) * (x @ Wk) + F.relu(x @ Wv)).backward(dout)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


@op(q="n d", k="m d", v="m e")
def scaled_attention(q, k, v):
    s = q.matmul(k, over="d") / sqrt(q.size("d"))
    p = exp(s - s.max("m", keepdim=True))
    p = p / p.sum("m", keepdim=True)
    out = p @ v
    return out


def test_a_matmul_times_a_number_is_scaled_in_its_own_buffer():
    d, module = generated(scaled_attention)
    code = "\n".join(d.code.backward)
    assert re.search(r"^dq = \(ds @ k\)\.div_\(", code, re.M) and re.search(
        r"^dk = \(ds\.T @ q\)\.div_\(", code, re.M
    ), code
    args = [_randn(32, 8, seed=1), _randn(24, 8, seed=2), _randn(24, 4, seed=3)]
    out, saved = module.scaled_attention_forward(*args)
    dout = _randn(32, 4, seed=4)
    with AtenOps() as ops:
        grads = module.scaled_attention_backward(dout, saved)
    assert ops.counts["div_"] == 2 and ops.counts["div"] == 0, ops.counts
    q, k, v = (a.clone().requires_grad_() for a in args)
    (torch.softmax(q @ k.T / 8**0.5, 1) @ v).backward(dout)
    for got, leaf in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "cross_entropy", "logsumexp"])
def test_a_forward_that_needs_a_maxs_values_alone_takes_amax(name: str):
    d, module = derived(name)
    inputs = [torch.randn(64, 10) if not t.is_int else torch.randint(0, 10, (64,)) for t in d.program.inputs]
    forward = getattr(module, f"{name}_forward")
    with AtenOps() as ops:
        forward(*inputs)
    assert ops.counts["amax"] == 1 and ops.counts["max"] == 0, ops.counts  # max(dim) also finds indices: 10x the work
    with AtenOps() as ops:
        _, saved = forward(*inputs, _keep_all=True)
    assert ops.counts["max"] == 1, ops.counts  # the chain routes the max's gradient to max(dim)'s index
    assert any(k.startswith("argmax") for k in saved)


@op(x="b t d")
def logsumexp_of_a_max_of_a_max(x):
    m = x.max("t").max("d")
    out = log(exp(x - m).sum("t").sum("d")) + m
    return out


def test_a_max_of_a_max_whose_values_alone_are_needed_takes_amax_twice():
    d, module = generated(logsumexp_of_a_max_of_a_max)
    forward = "\n".join(d.code.forward)
    x = _randn(3, 4, 5, seed=1)
    with AtenOps() as ops:
        out, saved = module.logsumexp_of_a_max_of_a_max_forward(x)
    assert ops.counts["amax"] == 2 and ops.counts["max"] == 0, (ops.counts, forward)
    torch.testing.assert_close(out, torch.logsumexp(x.flatten(1), 1))
    steps = module.logsumexp_of_a_max_of_a_max_backward_steps(torch.ones_like(out), saved)
    leaf = x.clone().requires_grad_()
    torch.logsumexp(leaf.flatten(1), 1).sum().backward()
    torch.testing.assert_close(steps["x"], leaf.grad)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_gated_unit_backward_stays_finite_where_exp_overflows(scale: float):
    _, module = generated(gated)
    x, W, V = _randn(16, 8, seed=1), _randn(8, 4, seed=2) * scale, _randn(8, 4, seed=3)
    out, saved = module.gated_forward(x, W, V)
    grads = module.gated_backward(torch.ones_like(out), saved)
    leaves = [t.clone().requires_grad_() for t in (x, W, V)]
    (F.silu(leaves[0] @ leaves[1]) * (leaves[0] @ leaves[2])).sum().backward()
    for got, leaf in zip(grads, leaves):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, leaf.grad, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", ["sigmoid", "silu", "softplus", "bce_with_logits"])
def test_logistic_family_backward_is_finite_at_large_inputs(name: str):
    d, module = derived(name)
    inputs = [torch.tensor([[-100.0, -50.0, 0.0, 50.0, 100.0]])] * len(d.program.inputs)
    out, saved = getattr(module, f"{name}_forward")(*inputs)
    grads = getattr(module, f"{name}_backward")(None if out.dim() == 0 else torch.ones_like(out), saved)
    assert all(torch.isfinite(g).all() for g in grads), grads


# -- max over a middle dim ---------------------------------------------------------------------
def test_max_over_a_middle_dim_scatters_dout_to_the_argmax_the_forward_found():
    d, module = generated(max_middle)
    x = _randn(3, 5, 4)
    out, saved = module.max_middle_forward(x)
    with AtenOps() as ops:
        grad = module.max_middle_backward(torch.ones_like(out), saved).x
    assert ops.counts["scatter_"] == 1 and not ops.counts["max"] and not ops.counts["argmax"], ops.counts
    assert not re.search(r"one_hot|eye|== ", "\n".join(d.code.backward))
    leaf = x.clone().requires_grad_()
    leaf.max(1).values.sum().backward()
    assert torch.equal(grad, leaf.grad)


# -- PyTorch's conventions at kinks ------------------------------------------------------------
KINKS = {
    # name: (the op's body, PyTorch's version, values on the kink)
    "relu": ("apply(lambda u: sympy.Max(u, 0), x)", torch.relu, [0.0, -1.0, 2.0]),
    "clamp_min": ("apply(lambda u: sympy.Max(u, -0.5), x)", lambda t: torch.clamp_min(t, -0.5), [-0.5, 0.0]),
    "clamp_max": ("apply(lambda u: sympy.Min(u, 0.5), x)", lambda t: torch.clamp_max(t, 0.5), [0.5, 0.0]),
    "abs": ("apply(sympy.Abs, x)", torch.abs, [0.0, -2.0]),
    "maximum": ("apply(sympy.Max, x, 2 * x)", lambda t: torch.maximum(t, 2 * t), [0.0, 1.0]),
    "max_over_dim": ('x.max("d", keepdim=True) + 0 * x', lambda t: t.max(1, keepdim=True).values + 0 * t, [1.0]),
}


@pytest.mark.parametrize("name", list(KINKS))
def test_derivative_at_a_kink_is_pytorchs(name: str):
    body, torch_fn, values = KINKS[name]
    namespace = {"op": op, "apply": apply, "sympy": sympy}
    exec(f'@op(x="n d")\ndef kink(x):\n    out = {body}\n    return out\n', namespace)
    d = derive(namespace["kink"])
    module = load_module(render(d), "kink")
    x = torch.tensor([values * 2], dtype=torch.float64)  # every value twice: ties in the max too
    out, saved = module.kink_forward(x)
    g = torch.arange(1.0, out.numel() + 1, dtype=torch.float64).reshape(out.shape)
    leaf = x.clone().requires_grad_()
    torch_fn(leaf).backward(g)
    assert torch.equal(module.kink_backward(g, saved).x, leaf.grad), (module.kink_backward(g, saved).x, leaf.grad)
    assert torch.equal(module.kink_backward_steps(g, saved)["x"], leaf.grad)


def test_relu_of_an_unnamed_pre_activation_at_exact_zeros_follows_pytorch():
    _, module = generated(mlp_mse)
    x = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    W1 = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    b1 = torch.tensor([0.0, 1.0, -2.0])  # pre-activations 0 at (0, 0), (0, 1) and (0, 2)
    W2, b2, y = torch.ones(3, 2), torch.zeros(2), torch.zeros(2, 2)
    _, saved = module.mlp_mse_forward(x, W1, b1, W2, b2, y)
    assert (saved["pre1"] == 0).sum() >= 3
    grads = module.mlp_mse_backward(None, saved)
    leaves = [t.clone().requires_grad_() for t in (x, W1, b1, W2, b2, y)]
    ((F.relu(leaves[0] @ leaves[1] + leaves[2]) @ leaves[3] + leaves[4] - leaves[5]) ** 2).mean().backward()
    for got, leaf in zip(grads, leaves):
        assert torch.equal(got, leaf.grad)


@op(x="n d")
def sqrt_relu(x):
    """Its derivative is 1/(2 sqrt(relu(x))): infinite where the step is 0."""
    out = apply(lambda u: sympy.Max(u, 0), x) ** 0.5
    return out


@op(x="n i", W="i c", y="n c")
def hinge(x, W, y, lam=0.01):
    """A multi-output hinge loss with weight decay: the relu's mask is read by dW (through dmm1) and by dy."""
    out = apply(lambda u: sympy.Max(u, 0), 1 - y * (x @ W)).sum("c").mean("n") + lam * (W**2).sum("i").sum("c")
    return out


def test_a_mask_two_gradients_read_is_computed_once():
    d, module = generated(hinge)
    code = "\n".join(d.code.backward)
    assert code.count("torch.gt(") == 1, code
    g = torch.Generator().manual_seed(0)
    x, W, y = torch.randn(6, 4, generator=g), torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    _, saved = module.hinge_forward(x, W, y)
    leaves = [t.clone().requires_grad_() for t in (x, W, y)]
    (torch.relu(1 - leaves[2] * (leaves[0] @ leaves[1])).sum(1).mean() + 0.01 * (leaves[1] ** 2).sum()).backward()
    for got, leaf in zip(module.hinge_backward(None, saved), leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_a_step_beside_a_value_that_may_be_infinite_selects_instead_of_multiplying():
    d, module = generated(sqrt_relu)
    code = "\n".join(d.code.backward)
    assert "x <= 0, 0.0" in code and "torch.gt(" not in code, code  # a select: inf * 0 would be NaN
    x = torch.tensor([[-1.0, 0.0, 0.25, 4.0]], dtype=torch.float64)
    out, saved = module.sqrt_relu_forward(x)
    leaf = x.clone().requires_grad_()
    torch.relu(leaf).sqrt().backward(torch.ones_like(out))
    got = module.sqrt_relu_backward(torch.ones_like(out), saved).x
    assert torch.equal(got, leaf.grad), (got, leaf.grad)


def test_no_generated_module_splits_a_relu_tie_in_half():
    for path in (REPO / "generated").glob("*.py"):
        assert "heaviside" not in path.read_text(encoding="utf-8"), path.name


# -- kernels PyTorch vectorises ----------------------------------------------------------------
@pytest.mark.parametrize("name", OPS)
def test_no_fused_backward_kernel_broadcasts_two_operands_along_the_last_dim(name: str):
    """``torch.addcmul(a[:, None], b[:, None], x)`` runs element by element: ``torch.addcmul(a[:, None], y, z)``
    then ``.addcmul_(b[:, None], x)`` is two vectorised passes."""
    from derive.verify import default_sizes, example_inputs, random_grad_outputs

    d, module = derived(name)
    inputs = example_inputs(d.program, default_sizes(d.program), torch.float32)
    outs, saved = getattr(module, f"{name}_forward")(*inputs)
    with InnerBroadcasts() as kernels:
        getattr(module, f"{name}_backward")(random_grad_outputs(d.program, outs, 0), saved)
    assert not kernels.found, (kernels.found, "\n".join(d.code.backward))


@op(x="n", y="m n", w="n d")
def rows_over_a_row_norm(x, y, w):
    v0 = w.mean("d", keepdim=True)
    return apply(lambda u, v: u + v, w / (v0**2 + 1), x) * y.sum("m")


def test_a_sum_of_row_values_and_a_full_term_broadcasts_one_operand_per_kernel():
    """``a[:, None] + dv·b[:, None]`` is ``(dv * b[:, None]).add_(a[:, None])``, not ``torch.addcmul(a, dv, b)``."""
    d, module = generated(rows_over_a_row_norm)
    x, y, w = _randn(5, seed=1), _randn(3, 5, seed=2), _randn(5, 4, seed=3)
    out, saved = module.rows_over_a_row_norm_forward(x, y, w)
    with InnerBroadcasts() as kernels:
        grads = module.rows_over_a_row_norm_backward(_randn(5, 4, seed=4), saved)
    assert not kernels.found, (kernels.found, "\n".join(d.code.backward))
    leaves = [t.clone().requires_grad_() for t in (x, y, w)]
    (
        (leaves[2] / (leaves[2].mean(1, keepdim=True) ** 2 + 1) + leaves[0][:, None]) * leaves[1].sum(0)[:, None]
    ).backward(_randn(5, 4, seed=4))
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_a_scatter_writes_into_the_buffer_its_chain_made_without_copying_it():
    """The focal loss's dense part is a ``torch.mul`` the chain allocated: no ``.clone()``."""
    d, module = generated(focal)
    logits, target = _randn(6, 4, seed=1), torch.tensor([0, 3, 1, 2, 2, 0])
    _, saved = module.focal_forward(logits, target)
    with AtenOps() as ops:
        module.focal_backward(None, saved)
    assert ops.counts["clone"] == 0, "\n".join(d.code.backward)


def test_a_scalar_times_a_sum_with_one_full_factor_is_one_pass():
    """The focal loss's dense part is ``s1·(a·exp_z + b·exp_z)`` with rows ``a, b``: ``s1`` meets the
    rows before the one multiply by ``exp_z``, not in a ``.mul_(s1)`` pass of its own."""
    d, module = generated(focal)
    logits, target = _randn(6, 4, seed=1), torch.tensor([0, 3, 1, 2, 2, 0])
    _, saved = module.focal_forward(logits, target)
    with FullPasses(logits.numel()) as passes:
        (dlogits,) = module.focal_backward(None, saved)
    assert passes.ops == ["mul.Tensor", "scatter_add_.default"], (passes.ops, "\n".join(d.code.backward))
    leaf = logits.clone().requires_grad_()
    logp = F.log_softmax(leaf, 1).gather(1, target[:, None])[:, 0]
    (-((1 - logp.exp()) ** 2 * logp).mean()).backward()
    torch.testing.assert_close(dlogits, leaf.grad)


# -- each costly value once ---------------------------------------------------------------------
@op(pred="n d", y="n d")
def huber_of_a_difference(pred, y, delta=1.0):
    a = apply(sympy.Abs, pred - y)
    q = a - apply(lambda u: sympy.Max(u - delta, 0), a)
    loss = (q**2 / 2 + delta * (a - q)).mean("d").mean("n")
    return loss


def test_a_gradient_that_is_the_negative_of_another_is_one_pass_from_it():
    """For ``r = pred - y``, dy = -dpred: one negation, not a second chain of six passes."""
    d, module = generated(huber_of_a_difference)
    code = "\n".join(d.code.backward)
    assert re.search(r"^(dpred = -dy|dy = -dpred)$", code, re.M), code
    pred, y = _randn(4, 6, seed=1) * 2, _randn(4, 6, seed=2)
    _, saved = module.huber_of_a_difference_forward(pred, y)
    with FullPasses(pred.numel()) as passes:
        grads = module.huber_of_a_difference_backward(None, saved)
    assert len(passes.ops) <= 11, passes.ops  # 17 with a second chain
    leaves = [t.clone().requires_grad_() for t in (pred, y)]
    F.huber_loss(leaves[0], leaves[1]).backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def huber(u: sympy.Expr, beta: float) -> sympy.Expr:
    """The smooth L1 of ``u`` as a user writes it: ``u`` and ``|u|`` each more than once."""
    return sympy.Piecewise((u**2 / (2 * beta), sympy.Abs(u) < beta), (sympy.Abs(u) - beta / 2, True))


@op(x="n d", y="const n d")
def smooth_l1(x, y, beta=1.0):
    """F.smooth_l1_loss as a user writes it: x - y and |x - y| each written more than once."""
    loss = apply(lambda u: huber(u, beta), x - y).mean(("n", "d"))
    return loss


def _smooth_l1_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _randn(6, 8, seed=1) * 2, _randn(6, 8, seed=2)
    x[0, :4] = y[0, :4] + torch.tensor([1.0, -1.0, 0.0, 0.5])  # |x - y| at beta exactly, 0, inside
    return x, y


def test_a_value_one_expression_writes_twice_is_computed_once():
    """The forward's x - y (three times) and |x - y| (twice), the backward's x - y and y - x: once each."""
    _, module = generated(smooth_l1)
    x, y = _smooth_l1_inputs()
    with AtenOps() as forward:
        _, saved = module.smooth_l1_forward(x, y)
    with AtenOps() as backward:
        module.smooth_l1_backward(None, saved)
    for ops in (forward, backward):
        assert ops.counts["sub"] == 1 and ops.counts["abs"] + ops.counts["abs_"] <= 1, ops.counts


def test_the_huber_derivative_is_one_clamp_exact_at_its_switch_points():
    """``Piecewise((u/β, |u| < β), (sign(u), True))`` is ``clamp(u/β, -1, 1)``: one pass, no select,
    no sign and no comparison, and the same values at ``|u| = β`` and at 0."""
    d, module = generated(smooth_l1)
    code = "\n".join(d.code.backward)
    assert "div_(beta).clamp_(min=-1, max=1)" in code and not re.search(r"where|lerp|sign|abs", code), code
    x, y = _smooth_l1_inputs()
    out, saved = module.smooth_l1_forward(x, y)
    with AtenOps() as ops:
        (dx,) = module.smooth_l1_backward(None, saved)
    assert ops.counts["clamp_"] == 1 and ops.counts["sub"] == 1, ops.counts
    leaf = x.clone().requires_grad_()
    F.smooth_l1_loss(leaf, y).backward()
    torch.testing.assert_close(out, F.smooth_l1_loss(x, y))
    torch.testing.assert_close(dx, leaf.grad, rtol=1e-6, atol=1e-9)
    assert torch.equal(dx[0, :3] * x.numel(), torch.tensor([1.0, -1.0, 0.0]))  # the switch points' sides


@op(x="n d", y="const n d")
def quadratic_then_cosine(x, y):
    """A loss of ``u = x - y``, ``u²/2`` within 1 and ``1 - cos(u)`` beyond: its derivative selects
    between ``u`` and ``sin(u)``, both finite everywhere, and is no clamp."""
    loss = apply(lambda u: sympy.Piecewise((u**2 / 2, sympy.Abs(u) < 1), (1 - sympy.cos(u), True)), x - y)
    return loss.mean(("n", "d"))


def test_a_piecewise_of_two_finite_values_selects_by_a_lerp_exact_at_its_switch_points():
    """A bool mask makes ``torch.where`` a scalar loop on a CPU; a lerp on a 0/1 float mask is one
    vectorised pass, and exact: ``b + 0·(a - b)`` is ``b``, ``a - (a - b)·0`` is ``a``."""
    d, module = generated(quadratic_then_cosine)
    assert "torch.where" not in "\n".join(d.code.backward)
    x, y = _smooth_l1_inputs()
    _, saved = module.quadratic_then_cosine_forward(x, y)
    with AtenOps() as ops:
        (dx,) = module.quadratic_then_cosine_backward(None, saved)
    assert ops.counts["lerp_"] + ops.counts["lerp"] == 1 and ops.counts["where"] == 0, ops.counts
    leaf = x.clone().requires_grad_()
    u = leaf - y
    torch.where(u.abs() < 1, u**2 / 2, 1 - torch.cos(u)).mean().backward()
    torch.testing.assert_close(dx, leaf.grad, rtol=1e-6, atol=1e-9)
    at_switch = dx[0, :4] * x.numel()  # |u| = 1 takes the second branch; 0 and 0.5 the first
    torch.testing.assert_close(at_switch, torch.tensor([math.sin(1.0), -math.sin(1.0), 0.0, 0.5]), rtol=1e-6, atol=0)


@op(x="n d", y="n d")
def huber_minus_tanh(x, y, beta=1.0):
    """A helper's layer: x - y in a Piecewise and in a product with tanh(x - y)."""
    loss = apply(lambda a, b: huber(a - b, beta) + (b - a) * sympy.tanh(a - b), x, y).mean(("n", "d"))
    return loss


def test_a_gradient_the_negative_of_another_through_a_piecewise_is_one_pass_from_it():
    """dy's Piecewise is dx's with each branch negated: found once the branches are folded together."""
    d, module = generated(huber_minus_tanh)
    assert re.search(r"^(dx = -dy|dy = -dx)$", "\n".join(d.code.backward), re.M), d.code.backward
    x, y = _smooth_l1_inputs()
    _, saved = module.huber_minus_tanh_forward(x, y)
    dx, dy = module.huber_minus_tanh_backward(None, saved)
    leaves = [t.clone().requires_grad_() for t in (x, y)]
    u = leaves[0] - leaves[1]
    (torch.where(u.abs() < 1, u**2 / 2, u.abs() - 0.5) - u * torch.tanh(u)).mean().backward()
    torch.testing.assert_close(dx, leaves[0].grad)
    assert torch.equal(dy, -dx)


@op(x="n i", W="i h", b="h")
def leaky_layer(x, W, b, slope=0.1):
    out = apply(lambda u: sympy.Piecewise((u, u >= 0), (slope * u, True)), x @ W + b)
    return out


def test_a_bias_gradient_sums_the_gradient_its_layer_already_computed():
    """db = Σ_n dmm1: the select is computed once, for dmm1, and db sums it (a helper found it twice)."""
    d, module = generated(leaky_layer)
    code = "\n".join(d.code.backward)
    assert "db = dmm1.sum(0)" in code and code.count("lerp") == 1, code
    x, W, b, dout = _randn(16, 8, seed=1), _randn(8, 6, seed=2), _randn(6, seed=3), _randn(16, 6, seed=4)
    _, saved = module.leaky_layer_forward(x, W, b)
    grads = module.leaky_layer_backward(dout, saved)
    leaves = [t.clone().requires_grad_() for t in (x, W, b)]
    F.leaky_relu(leaves[0] @ leaves[1] + leaves[2], 0.1).backward(dout)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


@op(x="n d", y="n d")
def weighted_square(x, y):
    loss = apply(lambda a, b: sympy.Abs(a - b) * b, x, y).mean(("n", "d"))  # x - y inside: not a statement
    return loss


def test_a_value_two_gradients_compute_is_computed_once():
    """dx = sign(x - y)·y/M and dy = (|x - y| - sign(x - y)·y)/M: one x - y for both."""
    _, module = generated(weighted_square)
    x, y = _randn(6, 8, seed=1), _randn(6, 8, seed=2)
    _, saved = module.weighted_square_forward(x, y)
    with FullPasses(x.numel()) as passes:
        grads = module.weighted_square_backward(None, saved)
    assert [op for op in passes.ops if op.split(".")[0] in ("sub", "neg", "add")] == ["sub.Tensor"], passes.ops
    leaves = [t.clone().requires_grad_() for t in (x, y)]
    ((leaves[0] - leaves[1]).abs() * leaves[1]).mean().backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_a_branch_that_squares_a_value_keeps_where_so_float16_does_not_overflow_into_nan():
    """u**2/2 is inf in float16 at |u| = 362; a lerp would read it where the other branch is taken."""
    d, module = generated(smooth_l1)
    assert "torch.where" in "\n".join(d.code.forward)
    x = torch.tensor([[300.0, 0.5, -1000.0]], dtype=torch.float16)
    loss, _ = module.smooth_l1_forward(x, torch.zeros_like(x))
    u = x.float()
    want = torch.where(u.abs() < 1, u**2 / 2, u.abs() - 0.5).mean()
    assert loss.isfinite() and torch.isclose(loss.float(), want, rtol=1e-3), (loss, want)


@op(pred="n q", y="n q")
def pinball(pred, y, tau=0.9):
    """The quantile loss: its gradient's branches are the scalar dloss times numbers."""
    loss = apply(lambda u: sympy.Piecewise((tau * u, u >= 0), ((tau - 1) * u, True)), y - pred).mean(("n", "q"))
    return loss


def test_a_select_of_two_scalar_gradients_is_a_lerp():
    """dy is ``dloss·tau/M`` or ``dloss·(tau - 1)/M``: values of a 0-dim tensor, not numbers, so a lerp."""
    d, module = generated(pinball)
    assert "torch.where" not in "\n".join(d.code.backward), d.code.backward
    pred, y = _randn(4, 5, seed=1), _randn(4, 5, seed=2)
    y[0, :3] = pred[0, :3]  # the tie: u = 0 takes tau
    _, saved = module.pinball_forward(pred, y)
    dpred, dy = module.pinball_backward(None, saved)
    leaves = [t.clone().requires_grad_() for t in (pred, y)]
    u = leaves[1] - leaves[0]
    torch.where(u >= 0, 0.9 * u, -0.1 * u).mean().backward()
    torch.testing.assert_close(dpred, leaves[0].grad)
    torch.testing.assert_close(dy, leaves[1].grad)
    assert (dy[0, :3] > 0).all()


@op(x="n d")
def hard_sigmoid(x):
    out = apply(lambda u: sympy.Piecewise((0, u < -3), (1, u > 3), (u / 6 + sympy.Rational(1, 2), True)), x)
    return out


def test_a_piecewise_of_three_branches_nests_two_way_selects():
    """The first true condition wins: Select(Select(1, (u + 3)/6, u > 3), 0, u >= -3), float masks only."""
    d, module = generated(hard_sigmoid)
    assert "torch.where" not in "\n".join(d.code.forward), d.code.forward
    x = torch.tensor([[-4.0, -3.0, -1.5, 0.0, 1.5, 3.0, 4.0]])
    out, _ = module.hard_sigmoid_forward(x)
    torch.testing.assert_close(out, F.hardsigmoid(x))
    assert out[0, 1] == 0 and out[0, 5] == 1  # the switch points


@op(x="n d")
def row_gate(x, c=1.0):
    r = (x * x).mean("d", keepdim=True)
    out = x * apply(lambda s: sympy.Piecewise((c, s > c), (s, True)), r)
    return out


def test_a_branch_reading_a_forward_value_of_degree_two_keeps_where():
    """r = mean(x²) is inf in float16 at |x| = 300; a select that read it where c is taken would be NaN."""
    _, module = generated(row_gate)
    x = torch.full((2, 4), 300.0, dtype=torch.float16)
    out, _ = module.row_gate_forward(x)
    assert torch.equal(out, x), out  # r > c: the gate is c = 1


@op(x="n d")
def clip_above(x, lim=2.0):
    out = apply(lambda u: sympy.Piecewise((lim, u > lim), (u, True)), x)
    return out


def test_a_piecewise_with_a_number_branch_multiplies_by_the_complement_mask():
    """Zero gradient above ``lim``: ``dout * (x <= lim)`` as floats, in one comparison, at the tie as
    ``torch.clamp_max`` (which passes the gradient at ``x == lim``)."""
    d, module = generated(clip_above)
    assert d.code.backward == ["dx = torch.le(x, lim, out=torch.empty_like(x)).mul_(dout)"], d.code.backward
    x, dout = _randn(6, 8, seed=1) * 3, _randn(6, 8, seed=2)
    x[0, :2] = 2.0  # the tie
    out, saved = module.clip_above_forward(x)
    with AtenOps() as ops:
        (dx,) = module.clip_above_backward(dout, saved)
    assert ops.counts["where"] == 0, ops.counts
    leaf = x.clone().requires_grad_()
    torch.clamp_max(leaf, 2.0).backward(dout)
    assert torch.equal(out, torch.clamp_max(x, 2.0)) and torch.equal(dx, leaf.grad)


@op(a="n d", b="n d")
def larger_times(a, b):
    out = apply(lambda u, v: sympy.Piecewise((u * v, u > v), (u - v, True)), a, b)
    return out


def test_the_condition_two_selects_read_is_compared_once():
    """da and db select on the same ``a > b``: one mask, made in the buffer of ``a - b``."""
    _, module = generated(larger_times)
    a, b = _randn(6, 8, seed=1), _randn(6, 8, seed=2)
    b[0, :3] = a[0, :3]  # ties: the second branch
    dout = _randn(6, 8, seed=3)
    _, saved = module.larger_times_forward(a, b)
    with AtenOps() as ops:
        grads = module.larger_times_backward(dout, saved)
    assert ops.counts["sub"] == 1 and ops.counts["gt_"] == 1 and ops.counts["where"] == 0, ops.counts
    leaves = [t.clone().requires_grad_() for t in (a, b)]
    torch.where(leaves[0] > leaves[1], leaves[0] * leaves[1], leaves[0] - leaves[1]).backward(dout)
    for got, leaf in zip(grads, leaves):
        assert torch.equal(got, leaf.grad), (got, leaf.grad)


@op(x="n d")
def elu_written(x):
    out = apply(lambda u: sympy.Piecewise((u, u > 0), (sympy.exp(u) - 1, True)), x)
    return out


def test_an_exp_in_a_branch_is_taken_of_its_argument_clamped_to_the_branch_so_both_branches_lerp():
    """exp(100) is inf in float32, and a lerp would make ``inf·0`` NaN where that branch is not
    taken; in the branch, u <= 0, so the exp is of ``min(u, 0)``: one saved value, at most 1."""
    d, module = generated(elu_written)
    assert "torch.where" not in "\n".join(d.code.forward + d.code.backward), (d.code.forward, d.code.backward)
    assert "torch.exp(torch.clamp_max(x, 0))" in "\n".join(d.code.forward), d.code.forward
    assert sum(line.count("torch.exp(") for line in d.code.forward + d.code.backward) == 1  # computed once, saved
    x = torch.tensor([[100.0, -100.0, 0.0, 2.0, 89.0, 1e-30]])  # exp(89) is inf in float32
    out, saved = module.elu_written_forward(x)
    (dx,) = module.elu_written_backward(torch.ones_like(x), saved)
    leaf = x.clone().requires_grad_()
    F.elu(leaf).backward(torch.ones_like(x))
    assert torch.equal(out, F.elu(x)) and torch.equal(dx, leaf.grad), (out, dx)


@op(x="n d")
def exp_of_minus(x):
    out = apply(lambda u: sympy.Piecewise((u, u > 0), (sympy.exp(-u), True)), x)
    return out


@op(x="n d")
def exp_below_twelve(x):
    out = apply(lambda u: sympy.Piecewise((u, u > 12), (sympy.exp(u), True)), x)
    return out


@pytest.mark.parametrize(
    "the_op, reference",
    [
        (exp_of_minus, lambda t: torch.where(t > 0, t, torch.exp(-t))),
        (exp_below_twelve, lambda t: torch.where(t > 12, t, torch.exp(t))),
    ],
)
def test_an_exp_its_branch_does_not_keep_at_most_1_keeps_where(the_op, reference):
    """exp(-u) for u <= 0 has no bound, and exp(min(u, 12)) is inf in float16 (where u > 12 takes the
    other branch): the selects stay ``torch.where``, so the float16 forward is exact at 100."""
    d, module = generated(the_op)
    assert "torch.where" in "\n".join(d.code.forward + d.code.backward), (d.code.forward, d.code.backward)
    x = torch.tensor([[100.0, -3.0, 0.0, 2.0]])
    out, _ = getattr(module, f"{the_op.name}_forward")(x.half())
    assert torch.equal(out, reference(x.half())), out
    x[0, 0] = 50.0  # (autograd's own where is NaN where exp overflows in the branch not taken)
    _, saved = getattr(module, f"{the_op.name}_forward")(x)
    (dx,) = getattr(module, f"{the_op.name}_backward")(torch.ones_like(x), saved)
    leaf = x.clone().requires_grad_()
    reference(leaf).sum().backward()
    assert torch.equal(dx, leaf.grad), (dx, leaf.grad)


@op(s="n c", y="const n c")
def margin_hinge(s, y):
    loss = apply(lambda u: sympy.Max(u, 0), 1 - y * s).mean(("n", "c"))
    return loss


def test_a_step_of_a_value_the_code_computes_is_a_float_mask_made_in_place():
    """relu'(1 - y·s) compares ``y·s`` into its own fresh buffer: no bool mask, no ``where``."""
    _, module = generated(margin_hinge)
    s, y = _randn(8, 5, seed=1), torch.sign(_randn(8, 5, seed=2))
    s[0, 0] = y[0, 0]  # exactly at the kink: relu'(0) = 0
    _, saved = module.margin_hinge_forward(s, y)
    with AtenOps() as ops:
        (ds,) = module.margin_hinge_backward(None, saved)
    assert ops.counts["where"] + ops.counts["masked_fill_"] == 0, ops.counts
    assert sum(ops.counts[c] for c in ("gt_", "ge_", "lt_", "le_")) == 1, ops.counts
    leaf = s.clone().requires_grad_()
    torch.relu(1 - y * leaf).mean().backward()
    torch.testing.assert_close(ds, leaf.grad)


def test_gelu_backward_evaluates_tanh_once():
    _, module = derived("gelu")
    out, saved = module.gelu_forward(_randn(8, 4))
    with AtenOps() as ops:
        module.gelu_backward(torch.ones_like(out), saved)
    assert ops.counts["tanh"] + ops.counts["tanh_"] <= 1, ops.counts


class FullPasses(TorchDispatchMode):
    """The aten ops that make or update a tensor of ``numel`` elements: one pass over memory each."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.ops.append(func.__name__)
        return out


@op(x="n d")
def erf_gelu(x):
    out = apply(lambda u: u / 2 * (1 + sympy.erf(u / sympy.sqrt(2))), x)
    return out


def test_a_number_factor_of_a_sum_rides_on_the_sums_own_passes():
    """``(c·x·e + erf + 1)·dout/2``: the ``1/2`` goes onto ``c``, the ``alpha`` of ``erf`` and the constant
    term, not onto a last ``.mul_(1/2)`` pass over the whole buffer."""
    d, module = generated(erf_gelu)
    x, dout = _randn(64, 32, seed=1), _randn(64, 32, seed=2)
    _, saved = module.erf_gelu_forward(x)
    with FullPasses(x.numel()) as passes:
        (dx,) = module.erf_gelu_backward(dout, saved)
    # square, mul_, exp_, mul_(x), mul_(c/2), add_(erf, alpha), add_(1/2), mul_(dout): 9 with a last mul_(1/2)
    assert len(passes.ops) <= 8, (passes.ops, "\n".join(d.code.backward))
    leaf = x.clone().requires_grad_()
    F.gelu(leaf).backward(dout)
    torch.testing.assert_close(dx, leaf.grad, atol=1e-6, rtol=1e-5)


def test_the_tanh_gelu_backward_folds_its_constants():
    """sqrt(pi), 200000 and the overall factor of the simplified derivative are numbers on one pass each
    at most: no ``(c * t).mul_(k)`` or trailing ``.mul_(k)`` of the whole buffer."""
    d, module = derived("gelu")
    x, dout = _randn(64, 32, seed=1), _randn(64, 32, seed=2)
    _, saved = module.gelu_forward(x)
    with FullPasses(x.numel()) as passes:
        (dx,) = module.gelu_backward(dout, saved)
    assert len(passes.ops) <= 16, (passes.ops, "\n".join(d.code.backward))  # 21 before
    leaf = x.clone().requires_grad_()
    F.gelu(leaf, approximate="tanh").backward(dout)
    torch.testing.assert_close(dx, leaf.grad, atol=1e-6, rtol=1e-5)


@op(x="n d", gamma="d", beta="d")
def layernorm_inline(x, gamma, beta, eps=1e-5):
    return (x - x.mean("d", keepdim=True)) / sqrt(
        ((x - x.mean("d", keepdim=True)) ** 2).mean("d", keepdim=True) + eps
    ) * gamma + beta


def test_an_inline_layer_norm_backward_reads_the_forwards_row_sums_and_rsqrt():
    """Σ_d x and the rsqrt the forward computed inline are kept: no row sum of x, no variance again."""
    d, module = generated(layernorm_inline)
    x, gamma, beta = _randn(16, 8, seed=1), _randn(8, seed=2), _randn(8, seed=3)
    out, saved = module.layernorm_inline_forward(x, gamma, beta)
    assert {"sum_x", "pow_x"} <= set(saved), sorted(saved)
    code = "\n".join(d.code.backward)
    assert "x.sum(1)" not in code and "eps" not in code, code  # (eps + var)**-1 read as pow_x**2
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    F.layer_norm(leaves[0], (8,), leaves[1], leaves[2]).backward(torch.ones_like(out))
    for got, leaf in zip(module.layernorm_inline_backward(torch.ones_like(out), saved), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


@op(x="n d", y="j m")
def conv_inline(x, y):
    return (
        apply(
            lambda u: sympy.log(1 + sympy.exp(u)), ((x.pad("d", 0, 4).unfold("d", 3, 1, "j", dilation=2)) * y).sum("j")
        )
        * ((x.pad("d", 0, 4).unfold("d", 3, 1, "j", dilation=2)) * y).sum("j")
    ).sum("m")


def test_a_value_written_twice_inline_is_computed_once():
    """Two equal paddings, windows and contractions are one statement each; the forward reads it again."""
    d, module = generated(conv_inline)
    assert [s.name for s in d.program.statements] == ["pad1", "win1", "pre1", "out"]
    x, y = _randn(3, 5, seed=1), _randn(3, 4, seed=2)
    with AtenOps() as ops:
        module.conv_inline_forward(x, y)
    assert ops.counts["exp"] == 1 and ops.counts["log1p"] == 1 and ops.counts["constant_pad_nd"] == 1, ops.counts
    assert ops.counts["bmm"] + ops.counts["mm"] == 1, ops.counts  # the contraction once, read twice


@op(x="m n", y="n d", w="k d")
def named_then_retyped(x, y, w):
    v0 = x @ y
    v2 = v0 + w.sum("k")
    return v2, (x @ y) ** 2


def test_a_named_value_typed_again_inline_keeps_its_own_gradient():
    """The inline ``x @ y`` equals ``v0`` but is not ``v0``: dv0 is ``dv2`` alone, as autograd has it.
    (Two unnamed equal values do merge: test_a_value_written_twice_inline_is_computed_once.)"""
    d, module = generated(named_then_retyped)
    x, y, w = _randn(5, 4, seed=1), _randn(4, 3, seed=2), _randn(2, 3, seed=3)
    g = (_randn(5, 3, seed=4), _randn(5, 3, seed=5))
    _, saved = module.named_then_retyped_forward(x, y, w)
    steps = module.named_then_retyped_backward_steps(g, saved)
    with AtenOps() as ops:
        module.named_then_retyped_forward(x, y, w)
    assert ops.counts["mm"] == 1, ops.counts  # the forward still computes x @ y once
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    v0 = xr @ yr
    v0.retain_grad()
    torch.autograd.backward([v0 + w.sum(0), (xr @ yr) ** 2], list(g))
    torch.testing.assert_close(steps["v0"], v0.grad)
    torch.testing.assert_close(steps["x"], xr.grad)


@op(a="n c", b="n c")
def kl_of_softmaxes(a, b):
    la = a - a.max("c", keepdim=True)
    la = la - apply(sympy.log, apply(sympy.exp, la).sum("c", keepdim=True))
    lb = b - b.max("c", keepdim=True)
    lb = lb - apply(sympy.log, apply(sympy.exp, lb).sum("c", keepdim=True))
    return (apply(sympy.exp, la) * (la - lb)).sum("c").mean("n")


def test_terms_sharing_a_full_size_factor_update_the_buffer_once():
    """``X·a + X·b + X·c`` with row factors a, b, c is one ``addcmul_`` of X, not three passes."""
    d, module = generated(kl_of_softmaxes)
    a, b = _randn(16, 8, seed=1), _randn(16, 8, seed=2)
    _, saved = module.kl_of_softmaxes_forward(a, b)
    with AtenOps() as ops:
        grads = module.kl_of_softmaxes_backward(None, saved)
    assert ops.counts["addcmul_"] + ops.counts["addcmul"] <= 2, (ops.counts, "\n".join(d.code.backward))
    leaves = [t.clone().requires_grad_() for t in (a, b)]
    F.kl_div(
        F.log_softmax(leaves[1], 1), F.log_softmax(leaves[0], 1), reduction="batchmean", log_target=True
    ).backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-6, rtol=1e-5)


# -- the planner --------------------------------------------------------------------------------
def test_planner_contracts_a_four_factor_sum_without_a_rank_three_intermediate():
    n, i, h, o = sympy.symbols("n i h o", integer=True)
    operands = [frozenset({n, i}), frozenset({n, h}), frozenset({h, o}), frozenset({n, o})]
    fits = [{n, i}, {i, h}, {h, o}, {n, o}, {n, h}]
    chosen = planner.plan(
        operands, frozenset({n, o}), lambda a: planner.BIG ** len(a), lambda a: any(a <= f for f in fits)
    )
    assert chosen.admissible and chosen.largest == planner.BIG**2
    current = list(operands)
    for step in chosen.steps:
        current, result = planner.apply_step(current, step)
        assert len(result) <= 2


def test_relu_of_a_sum_inside_an_in_place_chain_keeps_the_whole_sum():
    """Found by the property tests: relu(a + b) in a fused chain once printed relu(a)."""

    @op(x="n d", y="d k", w="d")
    def relu_of_sum(x, y, w):
        out = (apply(lambda u: sympy.Max(u, 0), x.sum("n", keepdim=True) + x) + y.sum("k")) / (w**2 + 1)
        return out

    _, module = generated(relu_of_sum)
    x, y, w = (_randn(*s, seed=k).requires_grad_() for k, s in enumerate([(5, 6), (6, 7), (6,)]))
    out, saved = module.relu_of_sum_forward(x, y, w)
    g = _randn(5, 6, seed=9)
    grads = module.relu_of_sum_backward(g, saved)
    ((torch.relu(x.sum(0, keepdim=True) + x) + y.sum(1)) / (w**2 + 1)).backward(g)
    for got, leaf in zip(grads, (x, y, w)):
        torch.testing.assert_close(got, leaf.grad)


def test_a_gather_of_a_gather_scatters_its_gradient_with_one_index_put():
    """Found by the property tests: x[jdx, idx[jdx]]'s backward once built a D x D one-hot."""

    @op(x="n d", idx="int n", jdx="int d")
    def double_gather(x, idx, jdx):
        out = x.take(idx, "d").take(jdx, "n")
        return out

    _, module = generated(double_gather)
    x = _randn(3, 7).requires_grad_()
    idx, jdx = torch.tensor([6, 0, 6]), torch.tensor([0, 0, 2, 1, 2, 2, 0])
    out, saved = module.double_gather_forward(x, idx, jdx)
    with TensorSizes() as sizes:
        grads = module.double_gather_backward(torch.ones(7), saved)
    assert sizes.largest <= x.numel()
    x[torch.arange(3), idx][jdx].sum().backward()
    torch.testing.assert_close(grads.x, x.grad)


def test_a_max_read_at_gathered_positions_is_the_max_then_a_gather():
    """Found by the property tests: max_d x[n, d, argmax_k(...)] once gathered an N x D x D copy of x."""

    @op(x="n d k")
    def max_at_argmax(x):
        inner = x.sum("k", keepdim=True) * (x + x.max("d"))
        return inner.flatten("n", "d").max("k"), inner.flatten("n", "d")

    d, module = generated(max_at_argmax)
    x = _randn(3, 6, 3).double().requires_grad_()
    (out1, out2), saved = module.max_at_argmax_forward(x)
    g1, g2 = torch.randn(18, dtype=torch.float64), torch.randn(18, 3, dtype=torch.float64)
    with TensorSizes() as sizes:
        grads = module.max_at_argmax_backward((g1, g2), saved)
    assert sizes.largest <= x.numel()
    inner = x.sum(2, keepdim=True) * (x + x.max(1, keepdim=True).values)
    torch.autograd.backward([inner.flatten(0, 1).max(1).values, inner.flatten(0, 1)], [g1, g2])
    torch.testing.assert_close(grads.x, x.grad)


def test_the_chain_adds_a_second_contribution_through_a_flattened_dim():
    """Found by the property tests: a flatten's gradient accumulated onto another failed to lower."""

    @op(x="n d k")
    def flat_and_max(x):
        return x.flatten("d", "k").max("dk"), x.flatten("d", "k")

    d, module = generated(flat_and_max)
    x = _randn(2, 3, 4)
    _, saved = module.flat_and_max_forward(x)
    g1, g2 = _randn(2, seed=1), _randn(2, 12, seed=2)
    steps = module.flat_and_max_backward_steps((g1, g2), saved)
    leaf = x.clone().requires_grad_()
    torch.autograd.backward([leaf.flatten(1).max(1).values, leaf.flatten(1)], [g1, g2])
    torch.testing.assert_close(steps["x"], leaf.grad)


@op(x="n d")
def relu_minus(x):
    out = apply(lambda u: sympy.Max(u, 0), x) - x
    return out


def test_a_step_beside_a_subtraction_keeps_the_inputs_dtype():
    """relu(x) - x: its derivative H(x) - 1 once printed torch.where(x > 0, 1.0, 0.0), float32 always."""
    _, module = generated(relu_minus)
    x = torch.tensor([[-1.0, 0.0, 2.0]], dtype=torch.float16)
    out, saved = module.relu_minus_forward(x)
    dx = module.relu_minus_backward(torch.ones_like(out), saved).x
    assert dx.dtype == torch.float16
    assert torch.equal(dx, torch.tensor([[-1.0, -1.0, 0.0]], dtype=torch.float16))


@op(x="b c h w")
def global_max_pool(x):
    out = x.max("h").max("w")
    return out


@op(x="b t d")
def max_relu_max(x):
    out = apply(lambda u: sympy.Piecewise((u, u > 0), (u / 10, True)), x.max("t")).max("d")
    return out


@pytest.mark.parametrize("the_op", [global_max_pool, max_relu_max], ids=lambda o: o.name)
def test_a_max_of_a_max_puts_its_values_at_both_positions(the_op):
    """Two argmax deltas in one product, the inner position read at the outer one: one put_
    of dout's values, where a one-hot of the input's size per delta was multiplied out (2.3x
    autograd for a global max pool); exact against autograd, ties included."""
    d, module = generated(the_op)
    backward = "\n".join(d.code.backward)
    assert "put_(" in backward and "1.0)" not in backward, backward
    x = (
        torch.randint(0, 3, (2, 3, 4, 5)).double()
        if the_op is global_max_pool
        else torch.randint(-2, 3, (3, 4, 5)).double()
    )
    leaf = x.clone().requires_grad_()
    ref = leaf.max(2).values.max(2).values if the_op is global_max_pool else None
    if ref is None:
        m = leaf.max(1).values
        ref = torch.where(m > 0, m, m / 10).max(1).values
    g = torch.randn_like(ref)
    (want,) = torch.autograd.grad(ref, leaf, g)
    out, saved = getattr(module, f"{the_op.name}_forward")(x)
    assert torch.equal(out, ref.detach())
    assert torch.equal(getattr(module, f"{the_op.name}_backward")(g, saved).x, want)


@op(x="n d k")
def max_times_max_of_max(x):
    out = x.max("d") @ x.max("d").max("n")
    return out


@op(x="n d", idx="int k")
def max_of_a_gather(x, idx):
    out = x.take(idx, "d").max("k")
    return out


@op(x="n d", idx="int k")
def max_of_a_gather_in_a_divisor(x, idx):
    out = x.take(idx, "n") / (x.take(idx, "n").max("k", keepdim=True) ** 2 + 1)
    return out


@op(x="n d", y="j m", idx="int k")
def max_of_a_gathered_convolution(x, y, idx):
    conv = lambda: (x.pad("n", 0, 4).unfold("n", 3, 1, "j", dilation=2) * y).sum("j")  # noqa: E731
    return conv().take(idx, "n").max("m", keepdim=True) + conv().take(idx, "n"), conv()


@pytest.mark.parametrize(
    "the_op",
    [max_times_max_of_max, max_of_a_gather, max_of_a_gather_in_a_divisor, max_of_a_gathered_convolution],
    ids=lambda o: o.name,
)
def test_maxima_the_property_tests_found_scatter_values(the_op):
    """Found by the property tests' one-hot check: a delta beside a product of two
    (``(dact1 + dact2·δ(n, B))·δ(d, A)``), a position read at an argmax
    (``δ(d, idx[argmax_k x[n, idx[k]]])``), and a delta inside a sum it does not vary along
    (``Σ_k dout·out·δ(n, idx[argmax])``), and a max's position routing a sum over the positions'
    own indices (``Σ_k Σ_d win[idx[k], d, j]·δ(m, argmax[k, d])``), each multiplied a one-hot of the
    input's size."""
    d, module = generated(the_op)
    backward = "\n".join(d.code.backward)
    assert "1.0)" not in backward and any(f in backward for f in ("scatter", "put_(", "index_add_")), backward
    assert verify(d, module).ok


@op(x="n d")
def relu6_written_out(x):
    out = apply(lambda u: sympy.Min(sympy.Max(u, 0), 6), x)
    return out


def test_a_step_beside_another_reads_the_max_it_implies_as_its_argument():
    """relu6's derivative step(6 - max(x, 0))·step(x): beside step(x), max(x, 0) is x, so the
    backward compares x twice into one float mask, and makes no relu for it; exact against
    autograd through torch.clamp_max(torch.relu(x), 6), ties at 0 and 6 included."""
    d, module = generated(relu6_written_out)
    backward = "\n".join(d.code.backward)
    assert "relu" not in backward and "torch.le(x, 6, out=torch.empty_like(x))" in backward, backward
    x = torch.tensor([[-1.0, 0.0, 3.0, 6.0, 7.0]], dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    g = torch.arange(1.0, 6.0, dtype=torch.float64)[None]
    (want,) = torch.autograd.grad(torch.clamp_max(torch.relu(leaf), 6), leaf, g)
    out, saved = module.relu6_written_out_forward(x)
    assert torch.equal(module.relu6_written_out_backward(g, saved).x, want)


@op(x="n d", t="n d")
def bce_written_out(x, t):
    out = apply(lambda u, v: sympy.Max(u, 0) - u * v + sympy.log(1 + sympy.exp(-sympy.Abs(u))), x, t)
    return out


def test_a_step_summand_beside_a_division_is_a_float_comparison():
    """A backward that divides keeps bool masks in its products; a step that is a summand of its
    own multiplies nothing, so it is one comparison into floats of x's dtype, not
    torch.where(x > 0, 1.0, 0.0) (a scalar loop, in the default dtype)."""
    d, module = generated(bce_written_out)
    backward = "\n".join(d.code.backward)
    assert "torch.gt(x, 0, out=torch.empty_like(x))" in backward and "1.0, 0.0" not in backward, backward
    x = torch.tensor([[-2.0, 0.5, 3.0]], dtype=torch.float64)  # (at 0, relu'(0) = |u|'(0) = 0, as autograd's)
    t = torch.tensor([[0.25, 0.5, 1.0]], dtype=torch.float64)
    out, saved = module.bce_written_out_forward(x, t)
    dx = module.bce_written_out_backward(torch.ones_like(out), saved).x
    assert dx.dtype == torch.float64
    torch.testing.assert_close(dx, torch.sigmoid(x) - t)


@op(x="n d", y="d k", w="k")
def max_of_relu(x, y, w):
    out = apply(sympy.Max, apply(lambda u: sympy.Max(u, 0), x @ y + w), w.rename(k="s"))
    return out


def test_a_max_of_a_relu_at_a_double_tie_follows_pytorchs_nesting():
    """Found by a random hunt: inlined, SymPy flattened max(relu(p), w) to max(0, p, w), which at
    p = w = 0 sent half the gradient to p where torch.maximum(torch.relu(p), w) sends none."""
    d, module = generated(max_of_relu)
    assert [s.name for s in d.program.statements] == ["pre1", "act1", "out"]
    x, y, w = _randn(5, 3, seed=1).double(), _randn(3, 6, seed=2).double(), _randn(6, seed=3).double()
    x[4], w[4] = 0.0, 0.0  # pre1[4, 4] = 0 ties relu's kink and w[s=4] = 0 at once
    out, saved = module.max_of_relu_forward(x, y, w)
    g = _randn(*out.shape, seed=4).double()
    leaves = [t.clone().requires_grad_() for t in (x, y, w)]
    torch.maximum(torch.relu(leaves[0] @ leaves[1] + leaves[2])[:, :, None], leaves[2]).backward(g)
    for got, leaf in zip(module.max_of_relu_backward(g, saved), leaves):
        assert torch.equal(got, leaf.grad), (got, leaf.grad)


@op(x="d k", y="n d")
def scaled_by_column_sum(x, y):
    v = y @ (x.sum("d", keepdim=True) * x)
    return v, x.sum("d", keepdim=True) * x


def test_a_factor_shared_by_the_full_size_terms_divides_no_other_term():
    """dx = Σx·(dv' + dout2) + Σ(dv'·x) + Σ(dout2·x): Σx is read once for the first two terms, and the
    sums beside them are added as they are, not as ``(Σ(dv'·x)/Σx)·Σx`` (NaN where a column is 0)."""
    d, module = generated(scaled_by_column_sum)
    assert "1 / sum_x" not in "\n".join(d.code.backward), d.code.backward
    x = torch.zeros(3, 2, dtype=torch.float64).requires_grad_()
    y = torch.randn(4, 3, dtype=torch.float64).requires_grad_()
    grads = (torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    _, saved = module.scaled_by_column_sum_forward(x.detach(), y.detach())
    got = module.scaled_by_column_sum_backward(grads, saved)
    s = x.sum(0, keepdim=True)
    torch.autograd.backward([y @ (s * x), s * x], list(grads))
    torch.testing.assert_close(got.x, x.grad)
    torch.testing.assert_close(got.y, y.grad)


@op(x="n d")
def huber_of_relu(x):
    out = apply(lambda u: huber(u, 1.0), apply(lambda u: sympy.Max(u, 0), x))
    return out


def test_a_select_branch_that_is_a_step_is_a_float_mask_for_lerp():
    """huber'(relu(x)) selects between relu(x) and sign(relu(x)) = step(x): lerp reads floats only,
    so the step is compared into floats, not printed as a bool mask."""
    d, module = generated(huber_of_relu)
    assert "torch.lerp((x > 0)" not in "\n".join(d.code.backward), d.code.backward
    x = torch.tensor([[-2.0, 0.0, 0.5, 1.0, 3.0]])
    _, saved = module.huber_of_relu_forward(x)
    (dx,) = module.huber_of_relu_backward(torch.ones_like(x), saved)
    leaf = x.clone().requires_grad_()
    r = torch.relu(leaf)
    torch.where(r.abs() < 1, r**2 / 2, r.abs() - 0.5).sum().backward()
    assert torch.equal(dx, leaf.grad), (dx, leaf.grad)


@op(x="n d k")
def select_of_a_max_and_itself(x):
    out = apply(lambda u, v: sympy.Piecewise((2 * u - v, u > v), (u - v / 2, True)), x.max("d"), x.max("d"))
    out = out.mean("n").sum("k")
    return out


def test_a_select_of_two_numbers_keeps_the_dtype_of_its_values():
    """Its gradient holds selects of numbers only (``Piecewise((-1, m > m), (-1/2, True))``, from a
    random composition): printed ``torch.where(c, -1, -1/2)`` they were the default float32, which a
    float64 scatter refuses; as selects they collapse or read the dtype of their masks."""
    _, module = generated(select_of_a_max_and_itself)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    _, saved = module.select_of_a_max_and_itself_forward(x)
    (dx,) = module.select_of_a_max_and_itself_backward(torch.tensor(0.5, dtype=torch.float64), saved)
    leaf = x.clone().requires_grad_()
    m = leaf.max(1).values
    (torch.where(m > m, 2 * m - m, m - m / 2).mean(0).sum() * 0.5).backward()
    assert dx.dtype == torch.float64 and torch.equal(dx, leaf.grad), (dx, leaf.grad)


_PW = "sympy.Piecewise((2 * u - v, u > v), (u - v / 2, True))"
FOUND = {  # compositions the property tests found failing, with what was wrong
    # a factor shared by the scatter's terms was computed after the temporaries that read it
    "share_before_use": (
        '@op(x="n d", y="n d")\ndef comp(x, y):\n'
        f"    p = apply(lambda u, v: {_PW}, x, y)\n"
        '    return ((apply(lambda u, v: u + v, p.max("n", keepdim=True), p)) * x).sum("n")\n'
    ),
    # the max's value and the max call (values and indices) were cached under one key: `t1 ** 2`
    "max_call_key": (
        '@op(x="n d k")\ndef comp(x):\n'
        f'    return ((apply(lambda u, v: {_PW}, x.max("d"), x.max("d")))**2 + 1) ** -0.5\n'
    ),
    "max_call_key_abs": (
        '@op(x="n d k")\ndef comp(x):\n    m = lambda: x.max("d") - x.max("d")\n'
        '    u = apply(lambda u, v: u / (1 + v**2), apply(sympy.Abs, m()), m().max("n", keepdim=True))\n'
        "    return u, apply(sympy.Abs, m())\n"
    ),
    # a select of two numbers whose mask could not be floats printed torch.where(c, 1, 0): integers
    "select_of_numbers_on_a_gather": (
        '@op(x="n d", idx="int k")\ndef comp(x, idx):\n'
        '    v = apply(lambda u: sympy.Piecewise((1.5, u > 1.5), (u, True)), x.take(idx, "d")).sum("k").sum("n")\n'
        '    return v, x.take(idx, "d")\n'
    ),
    # Select(1, 0, mask) printed as the shared mask's name, which a chain then updated in place
    "select_that_is_a_shared_mask": (
        '@op(x="n d", y="j m")\ndef comp(x, y):\n'
        "    c = lambda: apply(lambda u: sympy.Piecewise((-1.5, u < -1.5), (1.5, u > 1.5), (u, True)), y)\n"
        '    return (c() / exp(y.sum("j", keepdim=True))).sum("j").sum("m") + x.sum("n").sum("d"), c()\n'
    ),
    # a divisor holding a scalar output (1 + out2()**2/D**2) was taken for a size and checked before
    # the forward computed out2
    "scalar_output_in_a_divisor": (
        '@op(x="d", y="d", w="d")\ndef comp(x, y, w):\n'
        '    return y / (x.mean("d", keepdim=True) ** 2 + 1) + w, x.sum("d")\n'
    ),
    # a select of two sizes' powers, torch.where(c, -1 / D, -(1 / 2) / D), was float32 in a float64 chain
    "select_of_sizes_in_a_float64_chain": (
        '@op(x="n d", y="d k")\ndef comp(x, y):\n'
        "    return (x * apply(lambda u, v: sympy.Piecewise((2 * u - v, u > v), (u - v / 2, True)), x,"
        ' y.mean("d").rename(k="s"))).sum("n"), y.mean("d")\n'
    ),
    # the argmax of a piecewise value substituted into the derivative's conditions: SymPy folded the
    # branches out of the argmax that binds their index (a wrong scatter, a crash)
    "piecewise_under_a_max": (
        '@op(x="n d", y="d k", w="k")\ndef comp(x, y, w):\n'
        "    elu = lambda: apply(lambda u: sympy.Piecewise((u, u > 0), (0.5 * (sympy.exp(u) - 1), True)), x @ y + w)\n"
        '    return ((x / (elu() ** 2 + 1)) @ w).apply(sympy.tanh), elu().max("n")\n'
    ),
    # a sum of a piecewise value compared in a condition: the same folding left a bound index free
    "piecewise_sum_in_a_condition": (
        '@op(x="n d")\ndef comp(x):\n'
        '    s = lambda: apply(lambda u: sympy.Piecewise((u, u > 0), (u / 2, True)), x).sum("n")\n'
        "    return apply(lambda u, v: sympy.Piecewise((u, u > v), (0, True)), x, s())\n"
    ),
    # a Piecewise of a 0-d value inlined into a condition: SymPy's folding crashed (KeyError)
    "piecewise_of_a_scalar_in_a_condition": (
        '@op(x="n")\ndef comp(x):\n'
        "    _v = apply(lambda u: sympy.Piecewise((u**2 / 2, abs(u) < 1), (abs(u) - 0.5, True)), x @ x)\n"
        "    return apply(lambda u, v: sympy.Piecewise((2 * u - v, u > v), (u - v / 2, True)), x, _v)\n"
    ),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_compositions_the_property_tests_found_verify(name: str, tmp_path):
    from derive.api import load_user_op

    path = tmp_path / "found.py"
    path.write_text("import sympy\nfrom derive import op, apply, exp\n\n" + FOUND[name])
    d = derive(load_user_op(path, "comp"))
    module = load_module(render(d), "comp")
    v = verify(d, module, exact=False)
    assert v.ok, v.failure()
    # verify runs the chain in float32, torch's default dtype: run both backwards in float64 too
    inputs = example_inputs(d.program, default_sizes(d.program), torch.float64)
    out, saved = module.comp_forward(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    seed = tuple(torch.ones_like(o) for o in outs) if d.program.several_outputs else torch.ones_like(out)
    for backward in (module.comp_backward, module.comp_backward_steps):
        grads = backward(seed, saved)
        values = grads._asdict().values() if hasattr(grads, "_asdict") else grads.values()
        assert all(g.dtype == torch.float64 for g in values if isinstance(g, torch.Tensor))


# -- a Piecewise that is a clamp -----------------------------------------------------------------
_U, _V = sympy.Symbol("u", real=True), sympy.Symbol("v", real=True)
_BETA = sympy.Symbol("beta", positive=True)


@pytest.mark.parametrize(
    "piecewise, clamp",
    [
        (
            sympy.Piecewise((_U / _BETA, sympy.Abs(_U) < _BETA), (sympy.sign(_U), True)),
            sympy.Min(1, sympy.Max(-1, _U / _BETA)),
        ),
        (sympy.Piecewise((2 * _U + 1, _U < 0.5), (2.0, True)), sympy.Min(2 * _U + 1, 2.0)),
        (sympy.Piecewise((3.0, _U >= 1), (3 * _U, True)), sympy.Min(3 * _U, 3)),
        (sympy.Piecewise((1 - 2 * _U, _U < 1), (-1, True)), sympy.Max(1 - 2 * _U, -1)),  # a negative slope
    ],
)
def test_a_linear_branch_held_at_its_bound_is_a_clamp(piecewise, clamp):
    """Exact wherever the branches meet at the bound, at the bound itself too."""
    got = saturated(piecewise)
    assert sympy.expand(got - clamp) == 0, got
    for u in (-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.5):
        point = {_U: u, _V: 0.25, _BETA: 1.0}
        assert float(got.subs(point)) == pytest.approx(float(piecewise.subs(point)), abs=1e-12)


@pytest.mark.parametrize(
    "piecewise",
    [
        sympy.Piecewise((2 * _U + 1, _U < 0.5), (1.0, True)),  # jumps at the bound
        sympy.Piecewise((_U**2, sympy.Abs(_U) < 1), (sympy.Abs(_U), True)),  # not linear
        sympy.Piecewise((_U, sympy.Abs(_U) < 1), (2 * sympy.sign(_U), True)),  # not the value at the bound
        sympy.Piecewise((_U, (_U > -1) & (_U < 2)), (0, True)),  # two bounds not ±c: two branches outside
        sympy.Piecewise((_U * _V, _U < 1), (_V, True)),  # held at the bound, but its slope is a value
    ],
)
def test_a_piecewise_that_is_no_clamp_is_left(piecewise):
    assert saturated(piecewise) == piecewise


def test_a_huber_derivative_is_exactly_one_beyond_its_bound_whatever_beta():
    """``clamp(u/β, -1, 1)``: u/β >= 1 for u >= β (a division is monotone), so beyond the bound the
    gradient is ±1 exactly, as the select gave; ``clamp(u, -β, β)·(1/β)`` was 0.99999994 at β = 41."""
    _, module = generated(smooth_l1)
    x = torch.tensor([[41.0, -41.0, 100.0, 3.0], [0.0, -0.5, 40.0, -1e6]])
    y = torch.zeros_like(x)
    _, saved = module.smooth_l1_forward(x, y, beta=41.0)
    (dx,) = module.smooth_l1_backward(torch.tensor(float(x.numel())), saved)  # dloss/(D·N) = 1 exactly
    assert dx[0, :3].tolist() == [1.0, -1.0, 1.0] and dx[1, 3] == -1.0
    assert dx[0, 3] == torch.tensor(3.0) / 41.0 and dx[1, 2] == torch.tensor(40.0) / 41.0


@op(x="n d")
def clip_both_ways(x):
    """A clip to [-1, 1] as a Piecewise of three branches: its derivative is a closed interval's mask."""
    return apply(lambda u: sympy.Piecewise((-1, u < -1), (1, u > 1), (u, True)), x)


def test_a_closed_interval_masks_by_one_clamp_and_takes_the_product_in_its_buffer():
    """Two comparisons and a product are three passes and two buffers; ``clamp(x, lo, hi).eq_(x)``
    two and one, and ``dout`` multiplies into it. 1 at the bounds, as ``torch.clamp``'s backward."""
    d, module = generated(clip_both_ways)
    assert d.code.backward == ["dx = torch.clamp(x, -1, 1).eq_(x).mul_(dout)"], d.code.backward
    x = torch.tensor([[-2.0, -1.0, -0.5, 0.0, 1.0, 1.5, float("nan")]])
    _, saved = module.clip_both_ways_forward(x)
    with AtenOps() as ops:
        (dx,) = module.clip_both_ways_backward(torch.full_like(x, 3.0), saved)
    assert sum(ops.counts[k] for k in ("empty_like", "empty", "clamp", "empty_strided")) <= 2, ops.counts
    assert dx.tolist() == [[0.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0]]
    leaf = x[:, :-1].clone().requires_grad_()
    torch.clamp(leaf, -1, 1).backward(torch.full_like(leaf, 3.0))
    assert torch.equal(dx[:, :-1], leaf.grad)


@op(x="n d")
def celu_written_out(x, alpha=1.0):
    """CELU as max(0, u) + min(0, alpha·(exp(u/alpha) - 1)): its derivative adds a bare step."""
    return apply(lambda u: sympy.Max(0, u) + sympy.Min(0, alpha * (sympy.exp(u / alpha) - 1)), x)


def test_a_step_added_to_float_values_is_a_float_mask():
    """``... .add_((x > 0))`` adds a bool tensor (a scalar loop with a type promotion on a CPU);
    the step compares into floats instead, in one pass."""
    d, module = generated(celu_written_out)
    code = "\n".join(d.code.backward)
    assert "torch.gt(x, 0, out=torch.empty_like(x))" in code and "(x > 0)" not in code, code
    x = torch.tensor([[-3.0, -1.0, 0.0, 0.5, 2.0]], dtype=torch.float64)
    _, saved = module.celu_written_out_forward(x)
    (dx,) = module.celu_written_out_backward(torch.ones_like(x), saved)
    leaf = x.clone().requires_grad_()
    F.celu(leaf).backward(torch.ones_like(x))
    torch.testing.assert_close(dx, leaf.grad)


def test_an_exp_beside_a_step_or_in_a_min_is_of_its_argument_clamped_to_where_it_counts():
    """``step(-u)·exp(u/α)`` is NaN where ``exp`` overflows and the step is 0 (``0·inf``): it reads
    ``exp(min(u, 0)/α)``, the same where the step is 1. The forward's ``min(0, α·(exp(u/α) - 1))``
    takes the same clamped ``exp``, which it keeps for the backward: one ``exp`` in all."""
    d, module = generated(celu_written_out)
    assert "torch.exp(" not in "\n".join(d.code.backward)
    x = torch.tensor([[-100.0, -1.0, 0.0, 1.0, 100.0]])
    with AtenOps() as ops:
        out, saved = module.celu_written_out_forward(x)
    assert ops.counts["exp"] + ops.counts["exp_"] == 1, ops.counts
    (dx,) = module.celu_written_out_backward(torch.ones_like(x), saved)
    leaf = x.clone().requires_grad_()
    want = F.celu(leaf)
    want.backward(torch.ones_like(x))
    torch.testing.assert_close(out, want.detach())
    torch.testing.assert_close(dx, leaf.grad)


@op(x="n d")
def leaky_written_with_max_and_min(x):
    """A leaky relu as max(u, 0) + 0.01·min(u, 0): its derivative is 0.01·step(-u) + step(u)."""
    return apply(lambda u: sympy.Max(u, 0) + 0.01 * sympy.Min(u, 0), x)


def test_a_sum_of_steps_is_float_masks_with_one_step_per_complementary_pair():
    """``step(-u)`` is ``1 - step(u)``, tie included: one comparison into floats, no bool arithmetic
    (which took about 8x as long as the float masks here), and PyTorch's values at 0."""
    d, module = generated(leaky_written_with_max_and_min)
    code = "\n".join(d.code.backward)
    assert re.fullmatch(
        r"dx = torch\.gt\(x, 0, out=torch\.empty_like\(x\)\)\.mul_\([^()]+\)\.add_\([^()]+\)\.mul_\(dout\)", code
    ), code
    x = torch.tensor([[-2.0, -0.0, 0.0, 0.5, 3.0]], dtype=torch.float64)
    _, saved = module.leaky_written_with_max_and_min_forward(x)
    (dx,) = module.leaky_written_with_max_and_min_backward(torch.ones_like(x), saved)
    leaf = x.clone().requires_grad_()
    F.leaky_relu(leaf, 0.01).backward(torch.ones_like(x))
    torch.testing.assert_close(dx, leaf.grad)


# -- found by a review: each rewrite only where it is exact -----------------------------------
_XE, _YE = sympy.Function("x")(_U), sympy.Function("y")(_U)  # tensor entries (the index is a stand-in)


@pytest.mark.parametrize(
    "piecewise",
    [
        sympy.Piecewise((_XE, (_XE < 1) & (_YE > 0)), (1, True)),  # an And bounds another value too
        sympy.Piecewise((1, (_XE > 1) | (_YE < 0)), (_XE, True)),  # and so does an Or
        sympy.Piecewise((_XE**2 / 2, _XE < _YE), (_XE * _YE - _YE**2 / 2, True)),  # a shift by y: x - y + y is not x
    ],
)
def test_a_piecewise_whose_clamp_would_not_be_exact_is_left(piecewise):
    assert saturated(piecewise) == piecewise


@op(x="n d")
def max_of_a_min(x, a=1.0, b=2.0):
    """max(b, min(a, x)): not torch.clamp(x, b, a), which is a where b > a."""
    return apply(lambda u: sympy.Max(b, sympy.Min(a, u)), x) * x


@op(x="n d")
def exp_of_abs_in_a_relu(x, a=1.0):
    """A step whose argument SymPy knows the sign of once the exp is gone: step(|u| + a) is 1."""
    return apply(lambda u: sympy.Max(0, sympy.exp(sympy.Abs(u) + a) - 1) * u, x)


@op(x="n d")
def min_of_an_exp_with_a_bound_off_zero(x):
    """min(0, 2·exp(u) - 2/3) is 0 for u > log(1/3); exp clamped there would be 2·exp(log(1/3)) - 2/3, not 0 in floats."""
    return apply(lambda u: sympy.Min(0, 2 * sympy.exp(u) - sympy.Rational(2, 3)), x)


@op(x="n d", y="n", z="d")
def masked_by_two_vectors(x, y, z):
    """A mask of y along n and one of z along d: their product is a new buffer, not one grown in place."""
    return apply(lambda u, a, b: sympy.Piecewise((u * u / 2, (a > 0) & (b > 0)), (0, True)), x, y, z)


def test_a_min_of_an_exp_bounded_off_zero_keeps_its_exact_zero():
    _, module = generated(min_of_an_exp_with_a_bound_off_zero)
    x = torch.tensor([[-3.0, -1.0, 0.0, 5.0]])
    out, _ = module.min_of_an_exp_with_a_bound_off_zero_forward(x)
    assert out[0, 2:].tolist() == [0.0, 0.0]


@op(x="n d")
def clip_to_a_parameter(x, b=1.0):
    """A clip to [-b, b]: a parameter's bound may not fit float16, so its mask is two comparisons."""
    return apply(lambda u: sympy.Piecewise((-b, u < -b), (b, u > b), (u, True)), x)


def test_a_closed_interval_with_a_parameter_bound_compares_and_takes_any_value_in_float16():
    d, module = generated(clip_to_a_parameter)
    assert "clamp(x, -b" not in "\n".join(d.code.backward), d.code.backward
    x = torch.tensor([[-2.0, 0.5, 3.0]], dtype=torch.float16)
    _, saved = module.clip_to_a_parameter_forward(x, b=1e5)
    (dx,) = module.clip_to_a_parameter_backward(torch.ones_like(x), saved)
    assert dx.tolist() == [[1.0, 1.0, 1.0]]


@op(x="n d k", y="n", z="d", w="k")
def masked_by_three_vectors(x, y, z, w):
    """Masks along n, d and k: each widens the product, so none is grown in place."""
    return apply(lambda u, a, b, c: sympy.Piecewise((u, (a > 0) & (b > 0) & (c > 0)), (0, True)), x, y, z, w)


@op(x="n d")
def steps_that_cancel(x):
    """max(u, 0) + min(u, 0) is u: its derivative step(u) + step(-u) is 1, still of x's shape."""
    return apply(lambda u: sympy.Max(u, 0) + sympy.Min(u, 0), x).sum(("n", "d"))


@op(x="n d")
def max_of_two_parameters(x, a=1.0, b=2.0):
    """max(u, a, b): both parameters bound it (the printer once dropped b)."""
    return apply(lambda u: sympy.Max(u, a, b), x)


@op(x="n d", w="d", v="d")
def sqrt_of_a_relu_times_x(x, w, v):
    """sqrt(relu(x·w))·v·x: over a common denominator, sqrt(h) + step·x/sqrt(h) was 0/0 (NaN) at h = 0."""
    return apply(lambda u: sympy.sqrt(sympy.Max(u, 0)), x * w) * v * x


@op(x="n d", y="n d", w="d")
def product_of_two_sqrt_relus(x, y, w):
    """The chain's gradient of each sqrt's argument is NaN where both are 0, autograd's too: no failure."""
    h = apply(lambda u: sympy.Max(u, 0), x * w)
    g = apply(lambda u: sympy.Max(u, 0), y * w)
    return apply(sympy.sqrt, h) * apply(sympy.sqrt, g) * x


@op(x="n d", idx="int k m")
def a_condition_over_m_beside_a_scatter_over_m(x, idx):
    """A property test's find: the scatter over (k, m) took in a step whose condition sums over
    its own m, and the lowering read that inner m as the outer one (dx was off by 161)."""

    def s():  # unnamed: written out at each use, as the property test wrote it
        return x.unfold("d", 1, 1, "j", dilation=1).sum("j")

    def v():
        return (s().take(idx, "n") * ((s().take(idx, "n") * s().take(idx, "n")) * s().take(idx, "n")).sum("k")).sum("m")

    return apply(lambda u, w: sympy.Piecewise((2 * u - w, u > w), (u - w / 2, True)), x, v()), s()


@op(y="k d", idx="int d")
def two_factors_read_at_one_gathered_row(y, idx):
    """Σ_d2 g[d2]·v0[idx[d2], d]·y[idx[d2], d]: both factors read at one position, so g is scattered
    once and contracted with v0·y, and the forward sums before it gathers (each factor had been given
    its own index, which no scatter could take: the gathered copies, D x D, outgrew y)."""
    v0 = y * y
    v1 = y.sum("k", keepdim=True)
    v2 = v1 * y
    return (v0 * v2).sum("d").take(idx, "k")


def test_factors_read_at_one_gathered_position_share_its_index():
    d, module = generated(two_factors_read_at_one_gathered_row)
    y, idx = _randn(3, 24, seed=1), torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(2))
    with TensorSizes() as forward:
        out, saved = module.two_factors_read_at_one_gathered_row_forward(y, idx)
    with TensorSizes() as backward:
        (dy,) = module.two_factors_read_at_one_gathered_row_backward(torch.ones_like(out), saved)
    # the op as written makes nothing larger than y (K x D): neither the forward nor the backward may
    assert forward.largest <= y.numel() and backward.largest <= y.numel(), (forward.largest_op, backward.largest_op)
    leaf = y.clone().requires_grad_()
    ((leaf * leaf) * (leaf.sum(0, keepdim=True) * leaf)).sum(1)[idx].sum().backward()
    torch.testing.assert_close(dy, leaf.grad)


@op(x="d", y="n d k", idx="int m d")
def clipped_squares_summed_then_gathered(x, y, idx):
    """Σ_k of a function of x - y, read at m gathered rows: the forward sums over k first (N x D),
    so dx must too, not read y at M x D x K gathered positions (M > N: larger than y)."""
    diff = x - y
    clipped = apply(lambda u: sympy.Piecewise((-1.5, u < -1.5), (1.5, u > 1.5), (u, True)), diff)
    return (y * clipped * y).sum("k")[idx].mean("m")


def test_a_function_read_at_gathered_rows_is_summed_before_it_is_gathered():
    d, module = generated(clipped_squares_summed_then_gathered)
    x, y = _randn(4, seed=1), _randn(5, 4, 6, seed=2) * 2
    idx = torch.randint(0, 5, (12, 4), generator=torch.Generator().manual_seed(3))
    with TensorSizes() as forward:
        out, saved = module.clipped_squares_summed_then_gathered_forward(x, y, idx)
    with TensorSizes() as backward:
        grads = module.clipped_squares_summed_then_gathered_backward(torch.ones_like(out), saved)
    assert backward.largest <= max(forward.largest, y.numel()), backward.largest_op
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    a, b = leaves
    (b * (a[:, None] - b).clamp(-1.5, 1.5) * b).sum(2)[idx, torch.arange(4)].mean(0).sum().backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


@op(x="n k", idx="int d m")
def max_of_a_sum_of_gathered_rows(x, idx):
    """max_k Σ_m x[idx[d, m], k]: the gather's position reads the summed m, so it is no position to
    take the max at first (that left m free: "free indices ['m'] left")."""
    return x.take(idx, "n").sum("m").max("k")


@op(x="n d", h="n d s", Wd="d e", bd="e", A="e s", B="n s", C="n s")
def selective_state_step(x, h, Wd, bd, A, B, C):
    """One selective state-space step: a softplus step size, exp(delta·A) decay of a renamed state."""
    delta = apply(lambda u: sympy.log(1 + sympy.exp(u)), x @ Wd + bd)
    h_new = exp(delta * A) * h.rename(d="e") + (delta * x.rename(d="e")) * B
    return (h_new * C).sum("s")


def test_a_kept_exp_is_read_through_a_renamed_dim_and_its_ratio_stays_bounded_beside_sums():
    """dh read exp(pre2) again though the forward kept it (pre2 is [n, e, s], dh's index is d, tied
    to e); dpre1's (Σ_s …)·e/(1 + e) kept the ratio, inf/inf past 88, because a sum stood beside it."""
    d, module = generated(selective_state_step)
    code = "\n".join(d.code.backward)
    assert "torch.exp(" not in code and ".exp_()" not in code, code
    assert "/ (exp_pre1 + 1)" not in code and ".div_(exp_pre1 + 1)" not in code, code
    assert verify(d, module).ok


@op(x="n d", alpha="1")
def celu_with_a_learnt_alpha(x, alpha):
    return apply(lambda u, a: sympy.Max(0, u) + sympy.Min(0, a * (sympy.exp(u / a) - 1)), x, alpha)


def test_an_exp_no_region_bounds_is_selected_not_multiplied_by_its_mask():
    """exp(u/a) with a tensor a: no region clamps it, and inf·0 was NaN at x = 100 in dx and
    dalpha (autograd: 1 and -1.2642); the exact check's point at a = 0 had crashed SymPy's Max."""
    d, module = generated(celu_with_a_learnt_alpha)
    assert verify(d, module).ok
    x, alpha = torch.tensor([[-100.0, -1.0, 0.5, 100.0]]), torch.tensor([1.0])
    _, saved = module.celu_with_a_learnt_alpha_forward(x, alpha)
    grads = module.celu_with_a_learnt_alpha_backward(torch.ones(1, 4), saved)
    leaves = [x.clone().requires_grad_(), alpha.clone().requires_grad_()]
    a = leaves[1]
    (F.relu(leaves[0]) + torch.clamp(a * (torch.exp(leaves[0].clamp(max=0) / a) - 1), max=0)).sum().backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


@op(s="n m")
def logsumexp_written_out(s):
    return (log(exp(s - s.max("m", keepdim=True)).sum("m")) + s.max("m")).mean("n")


def test_a_max_written_twice_is_taken_once():
    """The max inside the sum and the one added back are one max (their bound indices differ: the
    call's key had not renamed them, so the forward took s.amax(1) twice)."""
    d, _ = generated(logsumexp_written_out)
    assert sum(".amax(" in line or ".max(" in line for line in d.code.forward) == 1, d.code.forward


@op(x="d k")
def max_of_a_flattened_window(x):
    """The argmax over j of v[(d, k), j] read at (d, k): a reshape, not a gather (it printed an
    unsupported Pack index, and the backward crashed)."""
    v = x.pad("d", 0, 1).unfold("d", 2, 1, "j", dilation=1).flatten("d", "k")
    return v.max("j")


@pytest.mark.parametrize(
    "the_op",
    [
        max_of_a_flattened_window,
        max_of_a_sum_of_gathered_rows,
        a_condition_over_m_beside_a_scatter_over_m,
        sqrt_of_a_relu_times_x,
        product_of_two_sqrt_relus,
        max_of_a_min,
        exp_of_abs_in_a_relu,
        masked_by_two_vectors,
        masked_by_three_vectors,
        steps_that_cancel,
        max_of_two_parameters,
    ],
)
def test_compositions_the_reviews_found_verify(the_op):
    d, module = generated(the_op)
    assert verify(d, module).ok


def test_a_max_of_two_parameters_and_a_value_reads_both():
    _, module = generated(max_of_two_parameters)
    out, _ = module.max_of_two_parameters_forward(torch.tensor([[0.5, 1.5, 3.0]]))
    assert out.tolist() == [[2.0, 2.0, 3.0]]


@op(x="n d")
def soft_threshold(x, lam=0.5):
    """Soft thresholding by a parameter: its derivative is 1 outside [-lam, lam]."""
    return apply(lambda u: sympy.Piecewise((u - lam, u > lam), (u + lam, u < -lam), (0, True)), x)


def test_outside_an_interval_of_parameter_bounds_is_two_masks_that_never_overlap():
    """A parameter's bound may not fit float16, so no clamp: ``u < -lam`` plus ``u > lam`` into one
    buffer, where ``(1 - ge·le)·dout`` made four; the same values at the bounds and inside."""
    d, module = generated(soft_threshold)
    code = "\n".join(d.code.backward)
    assert code == (
        "dx = torch.lt(x, -lam, out=torch.empty_like(x)).add_(torch.gt(x, lam, out=torch.empty_like(x))).mul_(dout)"
    ), code
    x = torch.tensor([[-2.0, -0.5, -0.25, 0.0, 0.5, 0.75]], dtype=torch.float64)
    _, saved = module.soft_threshold_forward(x)
    (dx,) = module.soft_threshold_backward(torch.full_like(x, 3.0), saved)
    leaf = x.clone().requires_grad_()
    F.softshrink(leaf, 0.5).backward(torch.full_like(x, 3.0))
    assert torch.equal(dx, leaf.grad)


@op(x="n d")
def mish_written(x):
    out = x * apply(lambda u: sympy.tanh(sympy.log(1 + sympy.exp(u))), x)
    return out


def test_log_of_one_plus_a_value_is_log1p_exact_where_the_value_is_tiny():
    """``log(1 + exp(u))`` far below 0: ``1 + exp(-20)`` rounds to 1 in float32, ``log1p`` does not."""
    d, module = generated(mish_written)
    assert "torch.log1p(" in "\n".join(d.code.forward)
    x = torch.tensor([[-20.0, -10.0, -1.0, 0.0, 3.0]])
    out, _ = module.mish_written_forward(x)
    torch.testing.assert_close(out, F.mish(x), rtol=1e-6, atol=0)


def test_a_tensor_two_gradients_sum_alike_is_summed_once():
    """A group norm's ``dbeta`` sums dout over (n, s), and dx's einsum reads dout summed over s: one
    pass over dout (``r = dout.sum(3)``, ``dbeta = r.sum(0)``), and the same for ``dout * xhat``."""
    d = derive(group_norm)
    backward = "\n".join(d.code.backward)
    assert backward.count("dout.sum(") == 1 and re.search(r"dbeta = r\d+\.sum\(0\)", backward), backward
    module = load_module(render(d), "group_norm")
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    gamma, beta = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    want = F.group_norm(leaves[0].reshape(3, 8, 5), 2, leaves[1].reshape(-1), leaves[2].reshape(-1), 1e-5)
    dout = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    expected = torch.autograd.grad(want, leaves, dout.reshape(3, 8, 5))
    _, saved = module.group_norm_forward(x, gamma, beta)
    for got, w in zip(module.group_norm_backward(dout, saved), expected):
        torch.testing.assert_close(got, w)


def test_a_sum_is_not_shared_across_a_change_in_place():
    from derive.lowering.reductions import share_reductions

    lines = ["a = t.sum(1)", "t.mul_(2)", "b = t.sum(1)"]
    assert share_reductions(lines, lambda: "r1") == lines
    assert share_reductions(["a = t.sum(1)", "t = u * 2", "b = t.sum(1)"], lambda: "r1")[0] == "a = t.sum(1)"


def test_the_exp_of_a_log_softmax_is_read_from_the_exps_its_sum_took():
    """``exp(la)``, ``la = a - log(Σ exp(a))``, is ``exp(a)/Σ exp(a)``: one exp per softmax in the forward."""
    d, module = generated(kl_of_softmaxes)
    a, b = _randn(8, 5, seed=1) * 3, _randn(8, 5, seed=2) * 3
    with AtenOps() as ops:
        loss, _ = module.kl_of_softmaxes_forward(a, b)
    assert ops.counts["exp"] == 2, ops.counts
    want = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(loss, want)


@op(x="n d", gamma="d", beta="d", W="i d", b="d")
def prenorm_residual(x, gamma, beta, W, b, eps=1e-5):
    """x + Linear(LayerNorm(x)): the norm's d renamed onto the weight's i, which ties I to D."""
    diff = x - x.mean("d", keepdim=True)
    var = (diff**2).mean("d", keepdim=True)
    h = (diff * (var + eps) ** -0.5 * gamma + beta).rename(d="i")
    out = x + h @ W + b
    return out


def test_a_product_read_along_a_dim_and_along_the_dim_tied_to_it_is_computed_once():
    """dgamma sums ``dh·diff`` over n along d, dx over d read as i (tied to d by the rename): one value."""
    d, module = generated(prenorm_residual)
    backward = "\n".join(d.code.backward)
    assert len(re.findall(r"dh ?\* ?diff|diff ?\* ?dh", backward)) == 1, backward
    assert verify(d, module).ok


@op(x="n s", y="n s")
def softmax_of_a_sum(x, y):
    s = x + y
    p = exp(s) / exp(s).sum("s", keepdim=True)
    return p


def test_a_value_kept_out_of_an_earlier_statement_is_read_by_a_later_one():
    """``exp(s)`` is kept out of the sum's statement (``exp_s``): the softmax's own statement reads
    it, not a second ``torch.exp``."""
    d, module = generated(softmax_of_a_sum)
    x, y = _randn(6, 5, seed=1), _randn(6, 5, seed=2)
    with AtenOps() as ops:
        p, _ = module.softmax_of_a_sum_forward(x, y)
    assert ops.counts["exp"] == 1, ops.counts
    torch.testing.assert_close(p, torch.softmax(x + y, 1))


@op(E="v d", a="int n", p="int n", ng="int n")
def cosine_triplet(E, a, p, ng, margin=0.2):
    """A triplet loss on cosine similarities of gathered rows: 1/na stands in several terms of dE."""
    ea, ep, en = E[a], E[p], E[ng]
    na = sqrt((ea**2).sum("d"))
    cap = (ea * ep).sum("d") / (na * sqrt((ep**2).sum("d")))
    can = (ea * en).sum("d") / (na * sqrt((en**2).sum("d")))
    loss = apply(lambda u: sympy.Max(u, 0), can - cap + margin).mean("n")
    return loss


def test_a_factor_shared_by_terms_reads_the_value_computed_before():
    """A factor common to several terms (``_share``) that another formula computed already is read,
    not computed again: one ``1 / na``."""
    d, module = generated(cosine_triplet)
    backward = "\n".join(d.code.backward)
    assert len(re.findall(r"= 1 ?/ ?na$", backward, re.MULTILINE)) == 1, backward
    assert verify(d, module).ok


@op(logits="n c", idx="int n k")
def several_taken(logits, idx):
    """The sum of k gathered logits per row: logits' gradient is dout scattered k times a row."""
    out = logits.take(idx, "c").sum("k")
    return out


def test_a_factor_free_of_a_scatters_targets_is_scattered_not_multiplied_after():
    """``dout[n]·Σ_k δ(c, idx[n, k])`` scatters dout's values (one pass), not ones into a count
    tensor of the result's size that dout then multiplies (two passes, one more N x C tensor)."""
    d, module = generated(several_taken)
    backward = "\n".join(d.code.backward)
    assert backward.count("scatter_add_(") == 1 and "torch.full(" not in backward, backward
    logits = _randn(5, 7, seed=1).requires_grad_()
    idx = torch.tensor([[0, 0, 3], [6, 1, 1], [2, 2, 2], [5, 4, 3], [0, 6, 0]])
    dout = _randn(5, seed=2)
    logits.gather(1, idx).sum(1).backward(dout)
    _, saved = module.several_taken_forward(logits.detach(), idx)
    torch.testing.assert_close(module.several_taken_backward(dout, saved).logits, logits.grad)


@op(x="n d", w="d")
def named_like_temporaries(x, w, t1=2.0, t2=3.0, r1=1.5, r2=0.5, s1=1.25):
    """Parameters named as derive's temporaries are (t<k>, r<k>, s<k>): no temporary takes them."""
    out = r1 * t1 * exp(x * w) + (t2 * x).sum("d", keepdim=True) * s1 + r2 * w
    return out


def test_a_parameter_named_like_a_temporary_keeps_its_value():
    d, module = generated(named_like_temporaries)
    assert verify(d, module).ok


@op(x="n d", y="d k", w="d", idx="int j k")
def gathered_contraction(x, y, w, idx):
    return (((x * y) * w).sum("d")).take(idx, "n")


def test_a_contraction_gathered_along_its_result_is_summed_first_and_its_gradient_scattered_alone():
    """``out[j, k] = Σ_d x[idx[j, k], d]·y[d, k]·w[d]`` (found by the long property run): the forward
    had gathered x into a [J, K, D] copy and the backward scattered a [J, K, D] source, both larger
    than the op as written (its largest, ``x * y``, is [N, D, K]). Now the sum is one [K, N] matmul
    read at ``idx``, and ``dout`` alone is scattered into [K, N], then multiplied out."""
    d = derive(gathered_contraction)
    module = load_module(render(d, formatted=False), d.name)
    n, dd, k, j = 3, 8, 2, 8
    g = torch.Generator().manual_seed(0)
    x, y, w = torch.randn(n, dd, generator=g), torch.randn(dd, k, generator=g), torch.randn(dd, generator=g)
    idx = torch.randint(0, n, (j, k), generator=g)
    with TensorSizes() as forward:
        out, saved = module.gathered_contraction_forward(x, y, w, idx)
    with TensorSizes() as backward:
        module.gathered_contraction_backward(torch.randn_like(out), saved)
    as_written = n * dd * k
    assert forward.largest <= as_written and backward.largest <= as_written, (forward.largest_op, backward.largest_op)
    assert verify(d, module).ok


@op(C="v e", X="int n t", W="e o")
def bag_of_rows(C, X, W):
    return C[X].mean("t") @ W


def test_rows_gathered_in_bags_are_summed_by_embedding_bag_never_copied_out():
    """``C[X].mean("t")`` as written makes an [N, T, E] gather; counting it as a size the lowering may
    use (c1ce2f2) turned the bag into that copy, 20-40x slower. A gathered copy is weighed against
    the named tensors alone, and rows in bags go to ``F.embedding_bag``."""
    d = derive(bag_of_rows)
    source = render(d, formatted=False)
    forward = source[source.index("def bag_of_rows_forward(") : source.index("def bag_of_rows_backward(")]
    assert "embedding_bag" in forward and "C[X" not in forward
    module = load_module(source, d.name)
    n, t, e, v, o = 16, 8, 4, 50, 3
    C, W = torch.randn(v, e), torch.randn(e, o)
    X = torch.randint(0, v, (n, t))
    with TensorSizes() as sizes:
        module.bag_of_rows_forward(C, X, W)
    assert sizes.largest <= max(v * e, n * e, n * o), (sizes.largest, sizes.largest_op)
    assert verify(d, module).ok


@op(x="n d")
def max_of_flat_windows(x):
    return x.unfold("n", 1, 1, "j").flatten("n", "d").max("nd")


def test_a_value_at_a_position_is_scattered_not_a_one_hot_times_the_value():
    """``dout[j]·δ((n, d), argmax[j])`` (the long property run): a one-hot of the windows' size was
    made and multiplied by ``dout``; ``dout``'s values are now scattered at the argmax."""
    d = derive(max_of_flat_windows)
    backward = "\\n".join(d.code.backward)
    assert ", 1.0)" not in backward and ("scatter_(" in backward or ".put_(" in backward), backward
    assert verify(d, load_module(render(d, formatted=False), d.name)).ok


@op(x="n d k", y="n")
def scaled_max_of_flattened(x, y):
    return (x * y).flatten("d", "k").max("dk")


def test_a_value_read_at_a_flattened_argmax_is_gathered_not_summed_against_a_one_hot():
    """``Σ_d Σ_k x·δ((d, k), argmax)`` (CI's property run): the delta on a flattened position was
    not split into one per part, so ``dy`` summed ``x`` against an ``(N, D*K)`` one-hot."""
    d = derive(scaled_max_of_flattened)
    backward = "\n".join(d.code.backward)
    assert ", 1.0)" not in backward, backward
    assert verify(d, load_module(render(d, formatted=False), d.name)).ok


@op(q="n t d", k="n s d", v="n s e", table="r", rel="int t s")
def biased_attention(q, k, v, table, rel):
    """Attention with a learnt bias per relative position (T5), gathered from a table."""
    scores = q.matmul(k, over="d") + table[rel]
    p = exp(scores - scores.max("s", keepdim=True))
    p = p / p.sum("s", keepdim=True)
    out = p.matmul(v, over="s")
    return out


def test_dq_and_dk_of_attention_contract_the_one_scores_gradient_they_share():
    """``dq = Σ_s dp·p·k - r·Σ_s p·k`` is one contraction of ``(dp - r)·p``, which ``dk`` reads too:
    four matrix products in all, as autograd's, not six (a product with a vector, the table's
    ``Σ_n p·r``, is a reduction); and the two terms through the max's
    argmax, alike but for the name of their bound index, cancel in the formula shown."""
    d, module = generated(biased_attention)
    shown = d.formula("q")
    assert "argmax" not in shown, shown
    N, T, D, R = 2, 5, 3, 4
    args = [_randn(N, T, D, seed=1), _randn(N, T, D, seed=2), _randn(N, T, D, seed=3), _randn(R, seed=4)]
    rel = torch.randint(0, R, (T, T), generator=torch.Generator().manual_seed(5))
    _, saved = module.biased_attention_forward(*args, rel)
    with MatrixProducts() as products:
        grads = module.biased_attention_backward(_randn(N, T, D, seed=6), saved)
    assert len(products.shapes) == 4, products.shapes
    leaves = [a.clone().requires_grad_() for a in args]
    q, k, v, table = leaves
    out = torch.softmax(q @ k.transpose(1, 2) + table[rel], -1) @ v
    out.backward(_randn(N, T, D, seed=6))
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)
