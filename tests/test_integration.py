"""Generated code in users' training code: autograd.Function wrappers, torch.compile, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from generated.batchnorm import batchnorm
from generated.cross_entropy import cross_entropy
from generated.linear import linear
from generated.tanh import tanh


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"W1": (8, 16), "b1": (16,), "gamma": (16,), "beta": (16,), "W2": (16, 5), "b2": (5,)}
    return {k: (torch.randn(s, generator=g) * 0.3).requires_grad_() for k, s in shapes.items()}


def _model_generated(p, x, y):
    h = tanh(batchnorm(linear(x, p["W1"], p["b1"]), p["gamma"], p["beta"]))
    return cross_entropy(linear(h, p["W2"], p["b2"]), y)


def _model_plain(p, x, y):
    hpre = x @ p["W1"] + p["b1"]
    mean = hpre.mean(0, keepdim=True)
    var = ((hpre - mean) ** 2).sum(0, keepdim=True) / (hpre.shape[0] - 1)
    h = torch.tanh(p["gamma"] * (hpre - mean) / torch.sqrt(var + 1e-5) + p["beta"])
    return F.cross_entropy(h @ p["W2"] + p["b2"], y)


def _train(model, steps: int = 2, compile_it: bool = False):
    p = _params()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
    fn = torch.compile(model, fullgraph=True) if compile_it else model
    losses = []
    for _ in range(steps):
        loss = fn(p, x, y)
        loss.backward()
        with torch.no_grad():
            for t in p.values():
                t -= 0.1 * t.grad
                t.grad = None
        losses.append(loss.item())
    return losses, p


def test_two_training_steps_through_the_wrappers_match_plain_autograd():
    ours, p_ours = _train(_model_generated)
    ref, p_ref = _train(_model_plain)
    assert ours == pytest.approx(ref, abs=1e-6)
    for k in p_ours:
        torch.testing.assert_close(p_ours[k], p_ref[k], atol=1e-6, rtol=1e-5)


def test_compiled_model_gives_the_same_gradients():
    ours, p_ours = _train(_model_generated, compile_it=True)
    ref, p_ref = _train(_model_plain)
    assert ours == pytest.approx(ref, abs=1e-5)
    for k in p_ours:
        torch.testing.assert_close(p_ours[k], p_ref[k], atol=1e-5, rtol=1e-4)


def test_double_backward_is_refused_clearly():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(tanh(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("changed", ["output", "input"])
def test_a_saved_tensor_changed_in_place_is_refused_as_by_autograd(changed: str):
    """The wrapper saves its tensors through save_for_backward: a backward after one of them was
    changed in place raises, as autograd's own does, instead of giving a wrong gradient."""
    x = torch.randn(4, 3, requires_grad=True)
    y = x * 1.0
    if changed == "output":
        out = tanh(y)  # tanh's backward reads its output
        out.mul_(2.0)
    else:
        out = linear(y, torch.randn(3, 5), torch.randn(5))  # linear's reads its input
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)]
)
def test_batchnorm_on_every_floating_dtype(dtype, tol):
    x = torch.randn(16, 8, dtype=torch.float64)
    gamma, beta = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    dout = torch.randn(16, 8, dtype=torch.float64)
    from generated.batchnorm import batchnorm_backward, batchnorm_forward

    _out, saved = batchnorm_forward(x.to(dtype), gamma.to(dtype), beta.to(dtype))
    got = batchnorm_backward(dout.to(dtype), saved)
    _, saved64 = batchnorm_forward(x, gamma, beta)
    want = batchnorm_backward(dout, saved64)
    assert got.x.dtype == dtype
    scale = want.x.abs().max()
    assert (got.x.double() - want.x).abs().max() / scale < tol


def test_non_contiguous_inputs():
    from generated.layernorm import layernorm_backward, layernorm_forward

    x = torch.randn(8, 6).T  # transposed: non-contiguous
    gamma = torch.randn(16)[::2]  # strided
    beta = torch.randn(8)
    _out, saved = layernorm_forward(x, gamma, beta)
    ref_x, ref_g, ref_b = (t.detach().clone().contiguous().requires_grad_() for t in (x, gamma, beta))
    F.layer_norm(ref_x, (8,), ref_g, ref_b, eps=1e-5).backward(torch.ones(6, 8))
    grads = layernorm_backward(torch.ones(6, 8), saved)
    torch.testing.assert_close(grads.x, ref_x.grad, atol=1e-5, rtol=1e-4)


def test_batch_of_one_works_where_the_maths_allows():
    from generated.layernorm import layernorm_forward

    out, _ = layernorm_forward(torch.randn(1, 5), torch.ones(5), torch.zeros(5))
    assert out.shape == (1, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cross_entropy_on_cuda():
    logits = torch.randn(32, 27, device="cuda", requires_grad=True)
    y = torch.randint(0, 27, (32,), device="cuda")
    cross_entropy(logits, y).backward()
    ref = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_relu_at_zero_follows_pytorch():
    from generated.relu import relu_backward, relu_forward

    x = torch.tensor([[-1.0, 0.0, 2.0]], requires_grad=True)
    torch.relu(x).sum().backward()
    _, saved = relu_forward(x.detach())
    assert torch.equal(relu_backward(torch.ones(1, 3), saved).x, x.grad)


def test_batchnorm_with_a_constant_feature_stays_finite():
    from generated.batchnorm import batchnorm_backward, batchnorm_forward

    x = torch.randn(8, 3)
    x[:, 1] = 2.5  # zero variance in one column
    out, saved = batchnorm_forward(x, torch.ones(3), torch.zeros(3))
    grads = batchnorm_backward(torch.randn(8, 3), saved)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_empty_batch_for_elementwise_ops():
    from generated.tanh import tanh_backward, tanh_forward

    out, saved = tanh_forward(torch.randn(0, 4))
    assert tanh_backward(torch.ones(0, 4), saved).x.shape == (0, 4)


def test_custom_ops_pass_opcheck_and_compile_without_graph_breaks():
    import generated.batchnorm as bn
    import generated.cross_entropy as ce

    bn.register_custom_op()
    ce.register_custom_op()
    args = (
        torch.randn(6, 4, requires_grad=True),
        torch.rand(4, requires_grad=True),
        torch.randn(4, requires_grad=True),
        1e-5,
    )
    torch.library.opcheck(torch.ops.derive.batchnorm.default, args)
    # the parameters' defaults are in the schema: eps may be left out, as in the Python function
    torch.testing.assert_close(torch.ops.derive.batchnorm(*args[:3]), torch.ops.derive.batchnorm(*args))
    x, g, b, _ = (a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    y = torch.randint(0, 4, (6,))
    loss = torch.compile(
        lambda x, g, b: torch.ops.derive.cross_entropy(torch.ops.derive.batchnorm(x, g, b, 1e-5), y), fullgraph=True
    )(x, g, b)
    loss.backward()
    ref = [a.detach().clone().requires_grad_() for a in (x, g, b)]
    mean, var = ref[0].mean(0), ref[0].var(0)
    F.cross_entropy(ref[1] * (ref[0] - mean) / torch.sqrt(var + 1e-5) + ref[2], y).backward()
    for got, want in zip((x, g, b), ref):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4)


def test_a_custom_op_of_a_name_another_module_registered_is_refused(tmp_path):
    """A user's ``linear`` registered after the catalogue's replaced ``torch.ops.derive.linear``
    silently, and a second call with another namespace returned the first op."""
    import importlib.util
    import shutil

    import generated.linear as catalogue_linear

    op = catalogue_linear.register_custom_op()
    assert catalogue_linear.register_custom_op() is op
    shutil.copy(catalogue_linear.__file__, tmp_path / "linear.py")
    spec = importlib.util.spec_from_file_location("users_linear", tmp_path / "linear.py")
    users = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(users)
    with pytest.raises(RuntimeError, match="registered already"):
        users.register_custom_op()
    assert "users_ns::linear" in str(users.register_custom_op("users_ns"))


def test_an_input_may_be_called_ctx():
    """The wrapper's own context is `_ctx`: `ctx`, natural for a context vector, is the user's."""
    from derive import apply, derive, op
    from derive.emit import render
    from derive.verify import load_module

    @op(q="n d", ctx="n d")
    def gate(q, ctx):
        out = apply(lambda u, v: u * v / (1 + v**2), q, ctx)
        return out

    module = load_module(render(derive(gate)), "gate")
    q, c = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    module.gate(q, c).sum().backward()
    q0, c0 = q.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    (q0 * c0 / (1 + c0**2)).sum().backward()
    torch.testing.assert_close(q.grad, q0.grad)
    torch.testing.assert_close(c.grad, c0.grad)
