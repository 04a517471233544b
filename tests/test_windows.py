"""Windows and padding: ``unfold`` and ``pad`` by dim name make convolutions; their backward is a
derived scatter-add (col2im), checked against ``torch.nn.functional.conv1d``."""

import re

import pytest
import torch
import torch.nn.functional as F

from derive import derive, op
from derive.emit import render
from derive.errors import OpDefinitionError
from derive.verify import TensorSizes, load_module, verify


@op(x="n t c", W="k c o", b="o")
def conv1d(x, W, b):
    """A conv1d, kernel 3, stride 1: windows of x contracted with W over offset and channel."""
    out = x.unfold("t", 3, 1, "k").matmul(W, over=("k", "c")) + b
    return out


@op(x="n t c", W="k c o", b="o")
def conv1d_stride2(x, W, b):
    out = x.unfold("t", 3, 2, "k").matmul(W, over=("k", "c")) + b
    return out


@op(x="n t c", W="k c o", b="o")
def causal_dilated(x, W, b):
    """WaveNet's causal dilated conv: pad the past, dilation 2; the output keeps dim t."""
    out = x.pad("t", 4, 0).unfold("t", 3, 1, "k", dilation=2).matmul(W, over=("k", "c")) + b
    return out


def _torch_conv(x, W, b, stride=1, dilation=1, left=0):
    """The same layer in PyTorch's layout: (N, C, T) input, (O, C, K) weight."""
    y = F.conv1d(F.pad(x.transpose(1, 2), (left, 0)), W.permute(2, 1, 0), b, stride=stride, dilation=dilation)
    return y.transpose(1, 2)


CASES = [
    (conv1d, {}),
    (conv1d_stride2, {"stride": 2}),
    (causal_dilated, {"dilation": 2, "left": 4}),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c[0].name)
def generated(request):
    the_op, conv_args = request.param
    d = derive(the_op)
    return d, load_module(render(d, formatted=False), the_op.name), conv_args


def test_windows_verify_against_autograd_gradcheck_and_exactly(generated):
    d, module, _ = generated
    v = verify(d, module)
    assert v.ok, v
    assert all(status == "exact" for _, status in v.exact)


@pytest.mark.parametrize("n,t,c,o", [(2, 9, 3, 4), (3, 16, 5, 2)])
def test_windows_match_torch_conv1d_forward_and_backward(generated, n, t, c, o):
    d, module, conv_args = generated
    g = torch.Generator().manual_seed(t)
    x, W, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((n, t, c), (3, c, o), (o,)))
    out, saved = getattr(module, f"{d.program.name}_forward")(x, W, b)
    leaves = [a.clone().requires_grad_() for a in (x, W, b)]
    want = _torch_conv(*leaves, **conv_args)
    torch.testing.assert_close(out, want.detach())
    dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, leaves, dout)
    got = getattr(module, f"{d.program.name}_backward")(dout, saved)
    for name, w in zip("x W b".split(), want_grads):
        torch.testing.assert_close(getattr(got, name), w, msg=name)


def test_the_backward_of_a_window_adds_views_back_no_copy_no_one_hot(generated):
    """col2im as one strided add of a view per window offset (``_add_windows``): no one-hot, no
    index tensor, and no copy of the windows (a permuted reshape for ``index_add_`` copied them)."""
    d, module, _ = generated
    source = render(d, formatted=False)
    backward = source[source.index(f"def {d.program.name}_backward(") :]
    backward = backward[: backward.index("\ndef ")]
    assert "_add_windows(" in backward and "scatter_(" not in backward and "index_add_" not in backward
    assert not re.search(r"^\s*(for|while) ", backward, re.MULTILINE)
    x, W, b = torch.randn(4, 40, 8), torch.randn(3, 8, 16), torch.randn(16)
    with TensorSizes() as forward:
        out, saved = getattr(module, f"{d.program.name}_forward")(x, W, b)
    with TensorSizes() as sizes:
        getattr(module, f"{d.program.name}_backward")(torch.randn_like(out), saved)
    assert sizes.largest <= max(forward.largest, x.numel())


def test_a_causal_conv_keeps_the_time_dim_so_a_residual_adds():
    @op(x="n t c", W="k c c2")
    def residual(x, W):
        h = x.pad("t", 2, 0).unfold("t", 3, 1, "k").matmul(W, over=("k", "c"))
        out = h.rename(c2="c") + x
        return out

    d = derive(residual)
    assert [dim.name for dim in d.program.tensors["out"].dims] == ["n", "t", "c"]
    assert verify(d, load_module(render(d, formatted=False), "residual")).ok


def test_a_window_longer_than_its_dim_is_refused_at_run_time_in_one_line(generated):
    d, module, conv_args = generated
    forward = getattr(module, f"{d.program.name}_forward")
    args = torch.randn(2, 1, 3), torch.randn(3, 3, 4), torch.randn(4)
    if conv_args.get("left"):  # the padding makes even one position long enough
        assert forward(*args)[0].shape == (2, 1, 4)
        return
    with pytest.raises(ValueError, match="too short for the window"):
        forward(*args)


def test_a_weight_whose_window_dim_has_another_length_is_refused(generated):
    d, module, _ = generated
    with pytest.raises(ValueError, match=r"W must be \[3, C, O\] with C=3, O=4, got") as caught:
        getattr(module, f"{d.program.name}_forward")(torch.randn(2, 9, 3), torch.randn(4, 3, 4), torch.randn(4))
    assert "3=3" not in str(caught.value)  # the window's fixed size is in the shape, not restated


@pytest.mark.parametrize(
    "body,message",
    [
        (lambda x: x.unfold("t", 0, 1, "k"), "size must be a positive integer"),
        (lambda x: x.unfold("t", 2, 1, "c"), "already has a dim 'c'"),
        (lambda x: x.unfold("c", 9, 1, "k"), None),  # a symbolic dim: checked at run time
        (lambda x: x.pad("t", -1, 0), "left must be a non-negative integer"),
        (lambda x: x.unfold("t", 2, 1, "k").sum("k") + x, "dim 't' has size"),
    ],
)
def test_bad_windows_are_one_line_errors_naming_the_line(body, message):
    @op(x="n t c")
    def f(x):
        out = body(x)
        return out

    if message is None:
        f.program()
        return
    with pytest.raises(OpDefinitionError, match=message) as info:
        f.program()
    assert "\n" not in str(info.value) and "test_windows.py" in str(info.value)


def test_padding_an_expression_pads_its_value_not_only_its_entries():
    """Found by the property tests: ``(x.sum("t", keepdim=True) - x).pad(...)`` had padded x alone."""

    @op(x="n t")
    def padded_expression(x):
        out = (x.sum("t", keepdim=True) - x).pad("t", 1, 2)
        return out

    d = derive(padded_expression)
    module = load_module(render(d, formatted=False), "padded_expression")
    x = torch.randn(3, 4, dtype=torch.float64)
    out, _ = module.padded_expression_forward(x)
    torch.testing.assert_close(out, F.pad(x.sum(1, keepdim=True) - x, (1, 2)))
    assert verify(d, module).ok


def test_two_windows_make_a_conv2d():
    """Nothing 2-D is special-cased: two unfolds and one contraction are F.conv2d, stride (1, 2)."""

    @op(x="n h w c", K="kh kw c o", b="o")
    def conv2d(x, K, b):
        out = x.unfold("h", 3, 1, "kh").unfold("w", 3, 2, "kw").matmul(K, over=("kh", "kw", "c")) + b
        return out

    d = derive(conv2d)
    module = load_module(render(d, formatted=False), "conv2d")
    g = torch.Generator().manual_seed(0)
    x, K, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((2, 7, 9, 3), (3, 3, 3, 4), (4,)))
    out, saved = module.conv2d_forward(x, K, b)
    leaves = [a.clone().requires_grad_() for a in (x, K, b)]
    want = F.conv2d(leaves[0].permute(0, 3, 1, 2), leaves[1].permute(3, 2, 0, 1), leaves[2], stride=(1, 2))
    want = want.permute(0, 2, 3, 1)
    torch.testing.assert_close(out, want.detach())
    dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for name, got, w in zip(
        "x K b".split(), module.conv2d_backward(dout, saved), torch.autograd.grad(want, leaves, dout)
    ):
        torch.testing.assert_close(got, w, msg=name)
    assert verify(d, module).ok


@pytest.mark.parametrize("pool", ["max", "mean", "overlapping max"])
def test_pooling_written_as_a_window_matches_torch(pool):
    """Written as a user would from the README, not tried while building windows: max pooling
    (stride 2, the argmax's gradient scattered back), padded average pooling, and a padded max
    pool whose windows overlap (each maximum added back at its window's start plus its argmax: no
    window-sized buffer, three times the input's size)."""

    @op(x="n t c")
    def pooled(x):
        if pool == "max":
            out = x.unfold("t", 2, 2, "k").max("k")
        elif pool == "mean":
            out = x.pad("t", 1, 1).unfold("t", 3, 1, "k").mean("k")
        else:
            windows = x.pad("t", 1, 1).unfold("t", 3, 1, "k")
            out = windows.max("k")
        return out

    d = derive(pooled)
    module = load_module(render(d, formatted=False), "pooled")
    x = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    if pool == "max":
        want = F.max_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
    elif pool == "overlapping max":  # zeros padded, as x.pad does (F.max_pool1d pads with -inf)
        want = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, 1).max(-1).values
    else:
        want = F.avg_pool1d(x.transpose(1, 2), 3, 1, padding=1, count_include_pad=True).transpose(1, 2)
    with TensorSizes() as forward:
        out, saved = module.pooled_forward(x.detach())
    torch.testing.assert_close(out, want.detach())
    dout = torch.randn(want.shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad(want, x, dout)
    with TensorSizes() as sizes:
        torch.testing.assert_close(module.pooled_backward(dout, saved).x, dx)
    # the mean's gradient, one value per window, is not copied once per offset
    assert sizes.largest <= max(forward.largest, x.numel()), (sizes.largest, sizes.largest_op)
    assert verify(d, module).ok


def test_a_window_count_renamed_for_a_weight_verifies_and_a_plain_name_gets_a_hint():
    """Pooled positions contracted with a weight over them: the weight's p is tied to the count of
    windows, floor(T/2) (the checks' sizes had no p: KeyError; the forward checked P against TW,
    undefined). Contracting over the plain t says what to write."""

    @op(x="n t c", W="p c o")
    def pooled_then_linear(x, W):
        out = x.unfold("t", 2, 2, "k").mean("k").rename(t="p").matmul(W, over=("p", "c"))
        return out

    d = derive(pooled_then_linear)
    module = load_module(render(d), "pooled_then_linear")
    assert verify(d, module).ok
    with pytest.raises(ValueError, match=r"P must equal TW = \(T//2\)"):
        module.pooled_then_linear_forward(torch.randn(2, 8, 3), torch.randn(3, 3, 5))

    @op(x="n t c", W="t c o")
    def over_the_plain_name(x, W):
        out = x.unfold("t", 2, 2, "k").mean("k").matmul(W, over=("t", "c"))
        return out

    with pytest.raises(OpDefinitionError, match=r"windows cut from 't'.*\.rename\(t=\"p\"\)"):
        over_the_plain_name.program()


def test_a_mean_over_a_strided_window_dim_divides_by_its_floor_sized_count():
    """The count of stride-2 windows is floor((T - 3)/2) + 1: a constant, not a function to
    differentiate (it was refused: "floor has no derivative"); printed as Python (``//``)."""

    @op(x="n t c")
    def strided_window_mean(x):
        out = x.unfold("t", 3, 2, "k").sum("k").mean("t")
        return out

    d = derive(strided_window_mean)
    module = load_module(render(d), "strided_window_mean")
    assert verify(d, module).ok
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    out, saved = module.strided_window_mean_forward(x.detach())
    want = x.unfold(1, 3, 2).sum(-1).mean(1)
    torch.testing.assert_close(out, want.detach())
    dout = torch.randn_like(out)
    (dx,) = module.strided_window_mean_backward(dout, saved)
    torch.testing.assert_close(dx, torch.autograd.grad(want, x, dout)[0])


@pytest.mark.parametrize("kernel", [5, 8])
def test_a_window_wider_than_four_verifies(kernel: int):
    """gradcheck runs at small sizes: a dim cut into windows of 5 or more is lengthened there to
    keep two windows (it was capped at 4, and an unpadded conv of kernel 5 failed its own check)."""

    @op(x="n t c", W="k c o", b="o")
    def wide_conv(x, W, b):
        out = x.unfold("t", kernel, 1, "k").matmul(W, over=("k", "c")) + b
        return out

    d = derive(wide_conv)
    v = verify(d, load_module(render(d, formatted=False), "wide_conv"))
    assert v.ok and v.gradcheck, v.failure


@pytest.mark.parametrize("dilation", [1, 2])
def test_a_depthwise_conv_loops_over_its_offsets_and_never_makes_the_windows(dilation: int):
    """A depthwise conv sums only its window's offsets, each channel apart: forward, input gradient
    and weight gradient go one offset at a time (a view per offset), never the windows' size (three
    times the input's) nor an einsum, which copied the window view into a ``bmm`` of one-row matrices."""

    @op(x="n t c", w="k c")
    def depthwise(x, w):
        return (x.pad("t", dilation, dilation).unfold("t", 3, 1, "k", dilation=dilation) * w).sum("k")

    d = derive(depthwise)
    source = render(d, formatted=False)
    assert "einsum" not in source[: source.index("def depthwise_backward_steps(")]
    module = load_module(source, "depthwise")
    n, t, c = 2, 11, 5
    x = torch.randn(n, t, c, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, c, dtype=torch.float64, requires_grad=True)
    want = F.conv1d(x.transpose(1, 2), w.T[:, None, :], padding=dilation, dilation=dilation, groups=c).transpose(1, 2)
    with TensorSizes() as forward:
        out, saved = module.depthwise_forward(x.detach(), w.detach())
    torch.testing.assert_close(out, want.detach())
    dout = torch.randn(want.shape, dtype=torch.float64)
    with TensorSizes() as sizes:
        got = module.depthwise_backward(dout, saved)
    for g, ref in zip(got, torch.autograd.grad(want, (x, w), dout)):
        torch.testing.assert_close(g, ref)
    padded = n * (t + 2 * dilation) * c
    assert max(forward.largest, sizes.largest) <= padded, (forward.largest_op, sizes.largest, sizes.largest_op)
    assert verify(d, module).ok


def test_a_depthwise_conv2d_loops_over_both_offsets():
    """Two windows, each offset a view: the loops nest (an outer offset's ``select`` is read in the
    inner loop as it is, not computed into a temporary outside it, which broke the nesting)."""

    @op(x="n h w c", k="kh kw c")
    def dw2d(x, k):
        win = x.pad("h", 1, 1).pad("w", 1, 1).unfold("h", 3, 1, "kh").unfold("w", 3, 1, "kw")
        return (win * k).sum(("kh", "kw"))

    d = derive(dw2d)
    source = render(d, formatted=False)
    assert "einsum" not in source[: source.index("def dw2d_backward_steps(")]
    module = load_module(source, "dw2d")
    x = torch.randn(2, 5, 6, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 3, 3, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(x.permute(0, 3, 1, 2), k.permute(2, 0, 1)[:, None], padding=1, groups=3).permute(0, 2, 3, 1)
    out, saved = module.dw2d_forward(x.detach(), k.detach())
    torch.testing.assert_close(out, want.detach())
    dout = torch.randn(want.shape, dtype=torch.float64)
    with TensorSizes() as sizes:
        got = module.dw2d_backward(dout, saved)
    for g, ref in zip(got, torch.autograd.grad(want, (x, k), dout)):
        torch.testing.assert_close(g, ref)
    # dx adds dout·k back a pair of offsets at a time into the padded input: never the windows of
    # one dim made whole (3x the input, as when each window dim was folded back alone)
    assert sizes.largest <= 2 * 7 * 8 * 3, (sizes.largest, sizes.largest_op)
    assert verify(d, module).ok


def _matches_torch(module, name: str, x: torch.Tensor, want: torch.Tensor) -> tuple[TensorSizes, TensorSizes]:
    """The generated forward and its dx against PyTorch's layer ``want`` of ``x`` (one input);
    returns the sizes the forward and the backward made."""
    with TensorSizes() as forward:
        out, saved = getattr(module, f"{name}_forward")(x.detach())
    torch.testing.assert_close(out, want.detach())
    dout = torch.randn(want.shape, dtype=torch.float64)
    with TensorSizes() as backward:
        (dx,) = getattr(module, f"{name}_backward")(dout, saved)
    torch.testing.assert_close(dx, torch.autograd.grad(want, x, dout)[0])
    return forward, backward


@pytest.mark.parametrize("kernel,step,pad", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_a_2d_max_pool_puts_dout_at_its_maxima_straight_into_the_input_gradient(kernel, step, pad):
    """``x.unfold("h", ...).unfold("w", ...).max("kh").max("kw")``: each window's maximum found by
    two argmaxes, the inner read at the outer (a gather), and ``dout`` added at the flat position
    of both in one ``put_`` into the (padded) input's gradient: no window-sized buffer (1.5x the
    input for overlapping windows), and no ``index_put_`` with an index per axis (5x slower)."""

    @op(x="n h w c")
    def pool2d(x):
        win = x.pad("h", pad, pad).pad("w", pad, pad).unfold("h", kernel, step, "kh").unfold("w", kernel, step, "kw")
        return win.max("kh").max("kw")

    d = derive(pool2d)
    backward = "\n".join(d.code.backward)
    assert "put_(" in backward and "index_put_" not in backward and "_add_windows" not in backward, backward
    module = load_module(render(d, formatted=False), "pool2d")
    x = torch.randn(2, 7, 6, 3, dtype=torch.float64, requires_grad=True)
    padded = F.pad(x.permute(0, 3, 1, 2), (pad,) * 4)  # zeros, as x.pad (F.max_pool2d pads with -inf)
    want = F.max_pool2d(padded, kernel, step).permute(0, 2, 3, 1)
    forward, sizes = _matches_torch(module, "pool2d", x, want)
    assert sizes.largest <= max(forward.largest, x.numel()), (sizes.largest, sizes.largest_op)
    assert verify(d, module).ok


@pytest.mark.parametrize("first,then", [("max", "sum"), ("sum", "max")])
def test_windows_reduced_unalike_fold_back_one_at_a_time(first, then):
    """A max along one offset and a sum along the other: each window's gradient is added back by
    its own scatter, as before windows of two dims were joined; joined, one ``put_`` at flat
    positions over the offsets ran 1.6-2.7x slower (review)."""

    @op(x="n h w c")
    def mixed(x):
        win = x.unfold("h", 3, 2, "kh").unfold("w", 3, 2, "kw")
        return getattr(getattr(win, first)("kw"), then)("kh")

    d = derive(mixed)
    assert any(line.startswith("dwin1 = ") for line in d.code.backward), d.code.backward
    module = load_module(render(d, formatted=False), "mixed")
    assert verify(d, module).ok


@pytest.mark.parametrize("first,second", [((3, 1, 1), (2, 1, 1)), ((3, 2, 1), (2, 1, 1)), ((2, 1, 2), (3, 2, 1))])
def test_two_windows_along_one_dim_add_their_offsets_back_without_making_the_windows(first, second):
    """A window of windows along one dim (an average of an average: ``x[t*s2*s1 + e*s1 + k*d1]``)
    sums back one strided view per pair of offsets; it expanded ``dout`` to the windows' size
    (``K·E`` times the input) for one ``index_add_`` (review)."""
    (k1, s1, d1), (k2, s2, d2) = first, second

    @op(x="n t c")
    def pool_of_pool(x):
        inner = x.unfold("t", k1, s1, "k", dilation=d1)
        return inner.unfold("t", k2, s2, "e", dilation=d2).sum("k").sum("e")

    d = derive(pool_of_pool)
    backward = "\n".join(d.code.backward)
    assert "_add_windows(" in backward and "index_add_" not in backward, backward
    module = load_module(render(d, formatted=False), "pool_of_pool")
    x = torch.randn(2, 19, 3, dtype=torch.float64, requires_grad=True)
    inner = F.conv1d(x.transpose(1, 2), torch.ones(3, 1, k1, dtype=x.dtype), stride=s1, dilation=d1, groups=3)
    want = F.conv1d(inner, torch.ones(3, 1, k2, dtype=x.dtype), stride=s2, dilation=d2, groups=3).transpose(1, 2)
    _, sizes = _matches_torch(module, "pool_of_pool", x, want)
    assert sizes.largest <= x.numel(), (sizes.largest, sizes.largest_op)
    assert verify(d, module).ok
