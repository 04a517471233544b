"""Property tests (hypothesis): generated backward code against autograd on random shapes, values and ops.

Two properties, both in float64 with tight tolerances:

1. every catalogue op, at random sizes (1..7 per dim) and random finite values: the generated
   fused backward, the atom-by-atom chain and the differentiable wrapper agree with autograd run
   through the reference forward (``derive.verify.autograd_grads``); batch norm with Bessel's
   correction refuses N = 1 with a ValueError;
2. random small compositions of the op language (elementwise arithmetic with broadcasting by
   name, SymPy functions, sum/mean/max with or without keepdim, matmul, gathers, flatten, size-1
   axes, a scalar parameter) over 1-3 float inputs are derived end to end (``derive``,
   ``render``, ``load_module``); the fused backward and the chain agree with autograd, both
   through derive's reference forward and through this file's own torch evaluation of the same
   expression DAG. Each is written three ways: every intermediate a named local, one inline
   expression, or a mix.

Examples that overflow, or that sit within rounding of a kink or a tie (relu near 0, two nearly
equal entries in a max: a value computed two ways may fall on either side) are rejected; exact
ties and kinks have their own tests in section 3. Rejections are counted in the summary line. No op is filtered out for a known
deriver bug: there is none left.

3. regression tests for the bugs the properties found, each a minimal repro that runs (a bug found
   and not yet fixed would be a strict xfail: an XPASS fails, so the marker goes with the fix).

Profiles: ``ci`` (the default: derandomized, 150 compositions per style or construct, 50 for
the two 2-D window constructs, 1,750 in all, and 50 examples per catalogue op, no deadline), ``long``
(1,800, 600 for the 2-D windows, and 600 each, random) and
``dev`` (ci's examples, no shrinking), chosen with ``HYPOTHESIS_PROFILE=long``. The number of
compositions checked is printed at the end of the run, summed over the pytest-xdist workers
(``-s`` not needed), and recorded as hypothesis events (``--hypothesis-show-statistics``). A failing composition prints the
op's source: paste it into a file and run ``python -m derive FILE.py:comp`` to reproduce.
"""

from __future__ import annotations

import itertools
import math
import linecache
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import sympy
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import derive as derive_pkg
from derive import apply, derive, op
from derive.emit import render
from derive.verify import (
    TensorSizes,
    _dim_size,
    _forward_function,
    autograd_grads,
    default_sizes,
    example_inputs,
    in_row_blocks,
    index_ranges,
    load_module,
    verify,
)

from .conftest import COUNTS, OPS, derived

# -- profiles ----------------------------------------------------------------------------------
_COMMON: dict[str, Any] = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
# ci: deterministic (derandomize, and pyproject.toml pins hypothesis: a release draws its own
# sample) so CI never goes red on a newly explored example; the long
# profile explores at random and keeps failures in .hypothesis/ (gitignored) for replay.
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=300, **_COMMON)
# dev: ci's examples without shrinking, for a quick first look at a failure
settings.register_profile(
    "dev", max_examples=25, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate], **_COMMON
)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME if PROFILE_NAME in ("ci", "long", "dev") else "ci")
# DERIVE_TEST_DEVICE=cuda runs the random catalogue and composition checks (sections 1 and 2) on that
# device: the generated code, autograd and this file's own torch evaluation all run there
DEVICE = os.environ.get("DERIVE_TEST_DEVICE", "cpu")
# Per-test example counts are multiples of the profile's: catalogue examples are cheap (torch
# only, the derivation is cached), compositions cost a SymPy derivation each (~0.1-0.3 s); eleven
# composition tests at 6x the profile's examples and two at 2x are 1,750 compositions a CI run.
CATALOGUE_EXAMPLES = PROFILE.max_examples * 2
COMPOSITION_EXAMPLES = PROFILE.max_examples * 6
WINDOW_2D_EXAMPLES = PROFILE.max_examples * 2  # two constructs more at 6x would add half a minute
WINDOWS_2D = ["pool2d", "depthwise2d"]

RTOL, ATOL = 1e-7, 1e-9  # float64; ATOL is scaled by the size of the expected gradient


# -- shared helpers ----------------------------------------------------------------------------
class Rejected(Exception):
    """The example overflows, or sits within rounding of a kink or a tie: not a valid test point."""


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}, not a tensor"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != autograd's {tuple(want.shape)}"
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.to(want.dtype), want, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{what}: {m}")


def _shape(info: Any, sizes: dict[str, int]) -> tuple[int, ...]:
    out = []
    for d in info.layout:
        if d is None:
            out.append(1)
        else:
            n = 1
            for part in d.parts or (d,):
                n *= sizes[part.name]
            out.append(n)
    return tuple(out)


def _no_blow_up(what: str, sizes: TensorSizes, bound: int) -> None:
    """The invariant: no tensor a backward creates is larger than the largest its forward made."""
    assert sizes.largest <= bound, (
        f"{what} created a tensor of {sizes.largest} elements (by aten.{sizes.largest_op}); "
        f"the forward's largest has {bound}"
    )


def _largest_written(d: Any, inputs: list[torch.Tensor]) -> int:
    """The largest tensor the op as written makes (``program.written``) at these inputs' sizes."""
    sizes = {dim.name: n for t, x in zip(d.program.inputs, inputs) for dim, n in zip(t.layout, x.shape) if dim}
    return max(math.prod(_dim_size(x, sizes) for x in layout) for layout in d.program.written)


def _no_blow_up_at_larger_sizes(d: Any, module: Any) -> None:
    """The invariant again with every plain dim 6 to 9 long (a window keeps its length), in the
    order the dims appear and reversed: at the drawn sizes, 1 to 3, a copy of a window's ``K·E``
    values per position can still be smaller than the padded input the forward made, and an
    ``N x D x D`` value hides behind ``N x D x K`` while ``D <= K``. The bound counts every tensor
    of the forward as written (``program.written``). Sizes only: the values were checked at the
    drawn sizes."""
    p = d.program
    ascending = default_sizes(p, 6)
    for order in (ascending, dict(zip(ascending, reversed(ascending.values())))):
        sizes = p.tie(order)
        inputs = example_inputs(p, sizes, torch.float64, seed=1)
        params = {q.name: q.default for q in p.params}
        with TensorSizes() as forward_sizes:
            out, saved = getattr(module, f"{p.name}_forward")(*inputs, **params)
        outs = list(out) if p.several_outputs else [out]
        named = [v.numel() for v in _forward_function(d)(*inputs, **params).values() if isinstance(v, torch.Tensor)]
        as_written = [math.prod(_dim_size(x, sizes) for x in layout) for layout in p.written]
        bound = max([forward_sizes.largest] + [t.numel() for t in [*inputs, *outs]] + named + as_written)
        g: Any = tuple(torch.ones_like(o) for o in outs) if p.several_outputs else None
        if not p.several_outputs and out.dim():
            g = torch.ones_like(out)
        with TensorSizes() as sizes_made:
            getattr(module, f"{p.name}_backward")(g, saved)
        _no_blow_up(f"fused backward at sizes {sizes}", sizes_made, bound)


def _check_module(
    d: Any,
    module: Any,
    inputs: list[torch.Tensor],
    draw_grad: Callable[[tuple[int, ...]], torch.Tensor],
    as_written: int = 0,
) -> dict[str, torch.Tensor]:
    """Fused backward and chain against autograd through the reference forward; returns autograd's grads.

    ``as_written``: the largest tensor of the forward as the user wrote it, run op by op in torch
    (the generated forward may never build an intermediate the op names, ``(c * c).sum("k")``
    fused into one contraction; the backward may still need one that size).
    """
    name = d.program.name
    params = {p.name: p.default for p in d.program.params}
    with TensorSizes() as forward_sizes:
        out, saved = getattr(module, f"{name}_forward")(*inputs, **params)
    several = d.program.several_outputs
    outs = list(out) if several else [out]
    reference = _forward_function(d)(*inputs, **params)
    # named values the reference forward made (a window is a view of its source: not a tensor made)
    named = [v.numel() for v in reference.values() if isinstance(v, torch.Tensor) and v._base is None]
    written = max([as_written] + [o.numel() for o in outs] + [x.numel() for x in inputs] + named)
    if as_written:  # the generated forward makes nothing larger than the op as written does
        _no_blow_up("generated forward", forward_sizes, written)
    bound = max(forward_sizes.largest, written)
    for o_name, o in zip(d.program.outputs, outs):
        _close(f"forward output {o_name} vs reference forward", o, reference[o_name])
    if several:
        g: Any = tuple(draw_grad(tuple(o.shape)) for o in outs)
    else:
        g = None if out.dim() == 0 else draw_grad(tuple(out.shape))
    want = autograd_grads(d, inputs, g)
    for wrt, grad in want.items():  # sigmoid written 1/(1 + exp(-u)) at u = -800: inf/inf in autograd
        if not bool(grad.isfinite().all()):
            raise Rejected(f"autograd's reference for {wrt} is not finite")
    with TensorSizes() as sizes:
        fused = getattr(module, f"{name}_backward")(g, saved)._asdict()
    _no_blow_up("fused backward", sizes, bound)
    assert set(fused) == {t.name for t in d.program.differentiable_inputs}, sorted(fused)
    for k, v in fused.items():
        _close(f"fused d{k}", v, want[k])
    with TensorSizes() as sizes:  # a batch cut into blocks of rows, as a large one on a CPU is
        blocked = in_row_blocks(module, d.program, g, saved, rows=(1, 2))
    _no_blow_up("fused backward in blocks of rows", sizes, bound)
    for rows, grads in blocked:
        COUNTS[f"backwards checked in blocks of {rows} row(s)"] += 1
        for k, v in grads.items():
            _close(f"fused d{k} in blocks of {rows} row(s)", v, want[k])
    with TensorSizes() as sizes:
        steps = getattr(module, f"{name}_backward_steps")(g, saved)
    # the chain returns every named tensor's gradient, a window's at its full size (the window was a view)
    named_full = [v.numel() for v in reference.values() if isinstance(v, torch.Tensor)]
    _no_blow_up("atom-by-atom backward", sizes, max([bound] + named_full))
    missing = {t.name for t in d.program.differentiable_inputs} - set(steps)
    assert not missing, f"backward_steps has no gradient for {sorted(missing)}"
    for k, v in steps.items():
        if k in want:
            _close(f"chain d{k}", v, want[k])
    function = getattr(module, name, None)
    if callable(function):  # the differentiable wrapper: .backward() runs the fused backward
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        result = function(*leaves, **params)
        results = list(result) if several else [result]
        for r, o in zip(results, outs):
            _close(f"{name}(...) output", r.detach(), o)
        given = list(g) if several else [g]
        torch.autograd.backward(
            results, [torch.zeros_like(o) if s is None and several else s for o, s in zip(outs, given)]
        )
        for leaf, info in zip(leaves, d.program.inputs):
            if info.differentiable:
                _close(f"d{info.name} by {name}(...).backward()", leaf.grad, want[info.name])
    return want


def _floats(lo: float = -3.0, hi: float = 3.0) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


# == 1. the catalogue at random sizes and values ===============================================
BESSEL = {"batchnorm", "makemore_mlp"}  # divide by N - 1: the generated forward refuses N = 1


@pytest.mark.parametrize("name", OPS)
@settings(PROFILE, max_examples=CATALOGUE_EXAMPLES)
@given(data=st.data())
def test_catalogue_op_matches_autograd_at_random_sizes_and_values(name: str, data: st.DataObject):
    d, module = derived(name)
    program = d.program
    ranges = index_ranges(program)
    plain = [dim.name for dim in program.dims if not dim.parts]
    sizes = program.tie({dim: data.draw(st.integers(1, 7), label=f"size {dim}") for dim in plain})
    inputs = []
    for t in program.inputs:
        shape = _shape(t, sizes)
        if t.is_int:
            high = sizes[ranges[t.name]] if t.name in ranges else 2
            arr = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, high - 1)), label=t.name)
        else:
            arr = data.draw(hnp.arrays(np.float64, shape, elements=_floats(-4, 4)), label=t.name)
        inputs.append(torch.from_numpy(np.array(arr)).to(DEVICE))
    forward = getattr(module, f"{name}_forward")
    if name in BESSEL and sizes["n"] == 1:
        with pytest.raises(ValueError, match="N - 1|N-1"):
            forward(*inputs)
        COUNTS["catalogue N=1 refusals"] += 1
        return

    def draw_grad(shape: tuple[int, ...]) -> torch.Tensor:
        arr = data.draw(hnp.arrays(np.float64, shape, elements=_floats()), label="grad_output")
        return torch.from_numpy(np.array(arr)).to(DEVICE)

    _check_module(d, module, inputs, draw_grad)
    COUNTS["catalogue examples"] += 1


# == 2. random compositions of the op language =================================================
DIMS = ("n", "d", "k", "m")
FLOAT_LAYOUTS = [
    ("n", "d"),
    ("d",),
    ("n",),
    ("d", "k"),
    ("k", "d"),
    ("n", "k"),
    ("k",),
    ("n", "d", "k"),
    ("m", "n"),
    (None, "d"),  # declared "1 d": a size-1 axis
]
FLAT = {"dk": ("d", "k"), "nd": ("n", "d")}  # x.flatten("d", "k") has dim "dk"; an input declares it "(d k)"
RENAMES = {"r": "d", "s": "k"}  # x.rename(d="r"): a rename to r is always of d (so R is D)
FLAT_LAYOUTS = [("dk",), ("n", "dk")]  # only next to an input that declares d and k (their sizes)
WINDOW = "j"  # x.pad("d", l, r).unfold("d", J, 1, "j", dilation=g) with l + r = g*(J - 1): d keeps its size
WINDOW2 = "e"  # a second window's offsets, along another dim: a 2-D pool or depthwise conv
PARAM = ("alpha", 0.75)  # a scalar parameter: a symbol in the derivation, a keyword in the code
FLOAT_NAMES = ("x", "y", "w")
INT_NAMES = ("idx", "jdx")
MAX_DIMS = 3


@dataclass(eq=False)
class Node:
    """One node of a random expression DAG; ``layout`` mirrors derive's (names, None = size-1 axis)."""

    kind: str  # input, unary, binary, reduce, matmul, gather
    layout: tuple[str | None, ...]
    args: tuple["Node", ...] = ()
    fn: Any = None  # the Fn name (unary, binary) or the reduction (sum, mean, max)
    template: str = ""
    dim: str = ""
    keepdim: bool = False
    name: str = ""  # inputs and int indices
    is_int: bool = False

    def named(self) -> tuple[str, ...]:
        return tuple(x for x in self.layout if x is not None)


@dataclass(frozen=True)
class Fn:
    """A scalar function: how the op language spells it ({a}, {b} are operands) and torch's version."""

    name: str
    templates: tuple[str, ...]
    torch_fn: Callable[..., torch.Tensor]
    kink: Callable[..., torch.Tensor] | None = None  # distance from a non-differentiable point


UNARY = [
    Fn("tanh", ("tanh({a})", "apply(sympy.tanh, {a})", "{a}.apply(lambda u: sympy.tanh(u))"), torch.tanh),
    Fn("exp", ("exp({a})", "apply(sympy.exp, {a})"), torch.exp),
    Fn("sin", ("apply(sympy.sin, {a})", "{a}.apply(sympy.sin)"), torch.sin),
    Fn("cos", ("apply(lambda u: sympy.cos(u), {a})",), torch.cos),
    Fn(
        "softplus",
        ("apply(lambda u: sympy.log(1 + sympy.exp(u)), {a})", "log(1 + exp({a}))"),
        lambda t: torch.log(1 + torch.exp(t)),
    ),
    Fn("square", ("{a}**2", "apply(lambda u: u**2, {a})", "{a} * {a}"), lambda t: t**2),
    Fn("cube", ("{a}**3",), lambda t: t**3),
    Fn("sigmoid", ("apply(lambda u: 1 / (1 + sympy.exp(-u)), {a})", "1 / (1 + exp(-{a}))"), torch.sigmoid),
    Fn("logsq", ("log(1 + {a}**2)", "apply(lambda u: sympy.log(1 + u**2), {a})"), lambda t: torch.log(1 + t**2)),
    Fn(
        "rsqrt",
        ("({a}**2 + 1) ** -0.5", "1 / sqrt({a}**2 + 1)", "apply(lambda u: (1 + u**2) ** sympy.Rational(-1, 2), {a})"),
        lambda t: (t**2 + 1) ** -0.5,
    ),
    Fn("erf", ("erf({a})",), torch.erf),
    Fn("neg", ("-{a}",), lambda t: -t),
    Fn("scale", ("{a} * 2.5", "2.5 * {a}"), lambda t: t * 2.5),
    Fn("quarter", ("{a} / 4",), lambda t: t / 4),
    Fn("shift", ("{a} + 1.5", "1.5 + {a}"), lambda t: t + 1.5),
    Fn("rsub", ("3 - {a}",), lambda t: 3 - t),
    Fn("param_scale", ("{a} * alpha", "alpha * {a}"), lambda t: t * PARAM[1]),
    Fn("param_tanh", ("apply(lambda u: sympy.tanh(alpha * u), {a})",), lambda t: torch.tanh(PARAM[1] * t)),
    # a power with a symbolic exponent: SymPy's derivative divides by the base, 0/0 at an exact 0
    Fn("param_pow", ("apply(lambda u: sympy.Abs(u) ** (alpha + 1), {a})",), lambda t: t.abs() ** (PARAM[1] + 1)),
    Fn("relu", ("apply(lambda u: sympy.Max(u, 0), {a})",), torch.relu, kink=lambda t: t.abs()),
    # a branch that is a number: a float mask times the other, inside whatever product reads it
    Fn(
        "clip_pw",
        ("apply(lambda u: sympy.Piecewise((1.5, u > 1.5), (u, True)), {a})",),
        lambda t: torch.where(t > 1.5, 1.5, t),
        kink=lambda t: (t - 1.5).abs(),
    ),
    # a clip at two bounds: its backward's condition is an Or, selected by a product of two float masks
    Fn(
        "clip2_pw",
        ("apply(lambda u: sympy.Piecewise((-1.5, u < -1.5), (1.5, u > 1.5), (u, True)), {a})",),
        lambda t: torch.where(t < -1.5, -1.5, torch.where(t > 1.5, 1.5, t)),
        kink=lambda t: (t.abs() - 1.5).abs(),
    ),
    # an ELU: exp(u) overflows where u > 88 (the branch not taken), so its exp is of min(u, 0)
    Fn(
        "elu_pw",
        ("apply(lambda u: sympy.Piecewise((u, u > 0), (0.5 * (sympy.exp(u) - 1), True)), {a})",),
        lambda t: torch.where(t > 0, t, 0.5 * (torch.exp(t) - 1)),
        kink=lambda t: t.abs(),
    ),
    # sqrt(u + 1) is NaN where u < -1, in the branch not taken: autograd's reference reads it at max(u, 0)
    Fn(
        "sqrt_pw",
        ("apply(lambda u: sympy.Piecewise((sympy.sqrt(u + 1) - 1, u > 0), (u / 2, True)), {a})",),
        lambda t: torch.where(t > 0, torch.sqrt(t.clamp_min(0) + 1) - 1, t / 2),
        kink=lambda t: t.abs(),
    ),
    # two finite branches (selected by a lerp on a float mask), |u| written twice (computed once)
    Fn(
        "huber",
        ("apply(lambda u: sympy.Piecewise((u**2 / 2, sympy.Abs(u) < 1), (sympy.Abs(u) - 0.5, True)), {a})",),
        lambda t: torch.where(t.abs() < 1, t**2 / 2, t.abs() - 0.5),
    ),
    # a Huber of width alpha: its derivative is clamp(u, -alpha, alpha)/alpha (derive.lowering.saturate)
    Fn(
        "param_huber",
        (
            "apply(lambda u: sympy.Piecewise((u**2 / (2 * alpha), sympy.Abs(u) < alpha),"
            " (sympy.Abs(u) - alpha / 2, True)), {a})",
        ),
        lambda t: torch.where(t.abs() < PARAM[1], t**2 / (2 * PARAM[1]), t.abs() - PARAM[1] / 2),
        kink=lambda t: (t.abs() - PARAM[1]).abs(),
    ),
    # a linear branch held at its value beyond a bound (continuous: one clamp), and one that jumps
    # there (no clamp: the other branch is not the linear one's value at the bound)
    Fn(
        "ramp_pw",
        ("apply(lambda u: sympy.Piecewise((2 * u + 1, u < 0.5), (2.0, True)), {a})",),
        lambda t: torch.where(t < 0.5, 2 * t + 1, 2.0),
        kink=lambda t: (t - 0.5).abs(),
    ),
    Fn(
        "jump_pw",
        ("apply(lambda u: sympy.Piecewise((2 * u + 1, u < 0.5), (1.0, True)), {a})",),
        lambda t: torch.where(t < 0.5, 2 * t + 1, 1.0),
        kink=lambda t: (t - 0.5).abs(),
    ),
    # a CELU written with max and min: its derivative's step of alpha·(1 - exp(u/alpha)) compares u
    Fn(
        "param_celu",
        ("apply(lambda u: sympy.Max(0, u) + sympy.Min(0, alpha * (sympy.exp(u / alpha) - 1)), {a})",),
        lambda t: torch.relu(t) + torch.clamp_max(PARAM[1] * (torch.exp(t / PARAM[1]) - 1), 0),
        kink=lambda t: t.abs(),
    ),
    # a leaky relu written with max and min: steps of u and -u, one mask in floats
    Fn(
        "leaky_mm",
        ("apply(lambda u: sympy.Max(u, 0) + 0.01 * sympy.Min(u, 0), {a})",),
        lambda t: torch.relu(t) + 0.01 * torch.clamp_max(t, 0),
        kink=lambda t: t.abs(),
    ),
    Fn("abs", ("apply(sympy.Abs, {a})",), torch.abs, kink=lambda t: t.abs()),
    Fn(
        "clamp_min",
        ("apply(lambda u: sympy.Max(u, -0.5), {a})",),
        lambda t: torch.clamp_min(t, -0.5),
        kink=lambda t: (t + 0.5).abs(),
    ),
    Fn(
        "clamp_max",
        ("apply(lambda u: sympy.Min(u, 0.5), {a})",),
        lambda t: torch.clamp_max(t, 0.5),
        kink=lambda t: (t - 0.5).abs(),
    ),
]
# the functions a layer applies to its pre-activation
ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus", "abs", "clamp_min", "square", "erf", "huber", "elu_pw")
BINARY = [
    Fn("add", ("{a} + {b}", "apply(lambda u, v: u + v, {a}, {b})"), lambda a, b: a + b),
    Fn("sub", ("{a} - {b}",), lambda a, b: a - b),
    Fn("mul", ("{a} * {b}", "apply(lambda u, v: u * v, {a}, {b})"), lambda a, b: a * b),
    Fn("div", ("{a} / ({b}**2 + 1)", "apply(lambda u, v: u / (1 + v**2), {a}, {b})"), lambda a, b: a / (b**2 + 1)),
    Fn("div_exp", ("{a} / exp({b})",), lambda a, b: a / torch.exp(b)),
    Fn("div_tanh", ("{a} / (2 + tanh({b}))",), lambda a, b: a / (2 + torch.tanh(b))),
    Fn("mul_tanh", ("apply(lambda u, v: u * sympy.tanh(v), {a}, {b})",), lambda a, b: a * torch.tanh(b)),
    Fn(
        "hypot1",
        ("apply(lambda u, v: sympy.sqrt(1 + u**2 + v**2), {a}, {b})",),
        lambda a, b: torch.sqrt(1 + a**2 + b**2),
    ),
    Fn("max2", ("apply(sympy.Max, {a}, {b})",), torch.maximum, kink=lambda a, b: (a - b).abs()),
    # a jump where a == b, its condition comparing two values: a mask of their difference
    Fn(
        "select",
        ("apply(lambda u, v: sympy.Piecewise((2 * u - v, u > v), (u - v / 2, True)), {a}, {b})",),
        lambda a, b: torch.where(a > b, 2 * a - b, a - b / 2),
        kink=lambda a, b: (a - b).abs(),
    ),
]
FNS = {f.name: f for f in UNARY + BINARY}


def broadcast_layout(layouts: list[tuple[str | None, ...]]) -> tuple[str | None, ...]:
    """The documented rule: by name; the operand holding every dim sets the order (derive/tensor.py)."""
    names: list[str] = []
    for lay in sorted(layouts, key=lambda lay: -len([x for x in lay if x is not None])):
        for x in lay:
            if x is not None and x not in names:
                names.append(x)
    for lay in layouts:
        if {x for x in lay if x is not None} == set(names):
            return lay
    return tuple(names)


@dataclass
class Composition:
    """A random op: its inputs, its expression DAG and the sizes to run it at."""

    sizes: dict[str, int]
    inputs: list[Node]
    root: Node
    style: str  # named, inline or mixed
    names: dict[int, str] = field(default_factory=dict)  # node id -> local variable name
    source: str = ""
    second: Node | None = None  # a second output (the op returns two tensors)

    def nodes(self) -> list[Node]:
        """Every node reachable from the root, children first."""
        seen: dict[int, Node] = {}

        def walk(n: Node) -> None:
            if id(n) in seen:
                return
            for a in n.args:
                walk(a)
            seen[id(n)] = n

        walk(self.root)
        if self.second is not None:
            walk(self.second)
        return list(seen.values())


def _rendered(c: Composition, n: Node) -> str:
    if n.kind == "input":
        return n.name
    if id(n) in c.names:
        return c.names[id(n)]
    return "(" + _expression(c, n) + ")"


def _expression(c: Composition, n: Node) -> str:
    args = [_rendered(c, a) for a in n.args]
    if n.kind in ("unary", "binary"):
        return n.template.format(a=args[0], b=args[1] if len(args) > 1 else "")
    if n.kind == "reduce":
        kd = ", keepdim=True" if n.keepdim else ""
        return f'{args[0]}.{n.fn}("{n.dim}"{kd})'
    if n.kind == "matmul":
        return f"{args[0]} @ {args[1]}"
    if n.kind == "gather":
        return n.template.format(a=args[0], i=args[1], c=n.dim)
    if n.kind == "flatten":
        return f'{args[0]}.flatten("{FLAT[n.dim][0]}", "{FLAT[n.dim][1]}")'
    if n.kind == "rename":
        return f'{args[0]}.rename({n.dim}="{n.fn}")'
    if n.kind == "window":
        left, right, size, dilation = n.fn
        padded = f'{args[0]}.pad("{n.dim}", {left}, {right})' if left or right else args[0]
        return f'{padded}.unfold("{n.dim}", {size}, 1, "{n.layout[-1]}", dilation={dilation})'
    raise AssertionError(n.kind)


def render_source(c: Composition) -> str:
    """The op's Python source: each named node is a local, the others are inlined temporaries."""
    floats = [i for i in c.inputs if not i.is_int]
    ints = [i for i in c.inputs if i.is_int]
    spelled = {None: "1", **{flat: f"({a} {b})" for flat, (a, b) in FLAT.items()}}
    specs = [f'{i.name}="{" ".join(spelled.get(x, x) for x in i.layout)}"' for i in floats] + [
        f'{i.name}="int {" ".join(i.named())}"' for i in ints
    ]
    args = [i.name for i in floats + ints]
    if any(n.kind == "unary" and n.fn.startswith("param") for n in c.nodes()):
        args.append(f"{PARAM[0]}={PARAM[1]}")
    lines = [f"@op({', '.join(specs)})", f"def comp({', '.join(args)}):"]
    for n in c.nodes():
        if id(n) in c.names:
            lines.append(f"    {c.names[id(n)]} = {_expression(c, n)}")
    returned = c.names[id(c.root)] if id(c.root) in c.names else _expression(c, c.root)
    if c.second is not None:
        returned += f", {_rendered(c, c.second)}"
    lines.append(f"    return {returned}")
    return "\n".join(lines) + "\n"


_NAMESPACE = {
    "op": op,
    "apply": apply,
    "sympy": sympy,
    "tanh": derive_pkg.tanh,
    "exp": derive_pkg.exp,
    "log": derive_pkg.log,
    "sqrt": derive_pkg.sqrt,
    "erf": derive_pkg.erf,
}
_SOURCES = itertools.count()


def build_op(source: str) -> Any:
    """Execute an op's source (registered with linecache so derive can quote its lines)."""
    filename = f"<composition {next(_SOURCES)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(_NAMESPACE)
    exec(compile(source, filename, "exec"), namespace)
    return [v for v in namespace.values() if isinstance(v, derive_pkg.Op)][-1]


# -- the torch evaluation of a DAG, independent of derive -------------------------------------
def _align(t: torch.Tensor, layout: tuple[str | None, ...], target: tuple[str | None, ...]) -> torch.Tensor:
    names = [x for x in layout if x is not None]
    t = t.reshape([s for s, x in zip(t.shape, layout) if x is not None])
    tnamed = [x for x in target if x is not None]
    t = t.permute(sorted(range(len(names)), key=lambda i: tnamed.index(names[i])))
    sizes = dict(zip(sorted(names, key=tnamed.index), t.shape))
    return t.reshape([sizes.get(x, 1) if x is not None else 1 for x in target])


def _gap_ok(gap: torch.Tensor, scale: torch.Tensor) -> bool:
    """Far from a kink, or exactly on it (a tie both sides compute exactly); not within rounding of it."""
    return bool(((gap == 0) | (gap > 1e-9 * (1 + scale.abs()))).all())


def evaluate(c: Composition, values: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Every node's value (by ``id``) by plain torch ops; raises Rejected at kinks, ties and overflows."""
    memo: dict[int, torch.Tensor] = {}
    for n in c.nodes():
        a = [memo[id(x)] for x in n.args]
        if n.kind == "input":
            v = values[n.name]
        elif n.kind == "unary":
            fn = FNS[n.fn]
            if fn.kink is not None and not _gap_ok(fn.kink(a[0]), a[0]):
                raise Rejected(f"kink of {fn.name}")
            v = fn.torch_fn(a[0])
        elif n.kind == "binary":
            fn = FNS[n.fn]
            x, y = (_align(t, s.layout, n.layout) for t, s in zip(a, n.args))
            if fn.kink is not None and not _gap_ok(fn.kink(x, y), x.abs() + y.abs()):
                raise Rejected(f"kink of {fn.name}")
            v = fn.torch_fn(x, y)
        elif n.kind == "reduce":
            axis = n.args[0].layout.index(n.dim)
            if n.fn == "sum":
                v = a[0].sum(axis, keepdim=n.keepdim)
            elif n.fn == "mean":
                v = a[0].mean(axis, keepdim=n.keepdim)
            else:
                if a[0].shape[axis] > 1:
                    top2 = a[0].detach().topk(2, dim=axis).values
                    if not _gap_ok(top2.select(axis, 0) - top2.select(axis, 1), top2.select(axis, 0)):
                        raise Rejected("tie in a max")
                v = a[0].max(axis, keepdim=n.keepdim).values
        elif n.kind == "flatten":
            i = n.args[0].layout.index(FLAT[n.dim][0])
            v = a[0].flatten(i, i + 1)
        elif n.kind == "rename":
            v = a[0].view_as(a[0])  # its own node, so a named rename gets its own gradient
        elif n.kind == "window":
            left, right, size, dilation = n.fn
            axis = n.args[0].layout.index(n.dim)
            padded = torch.nn.functional.pad(a[0].movedim(axis, -1), (left, right)).movedim(-1, axis)
            v = padded.unfold(axis, dilation * (size - 1) + 1, 1)[..., ::dilation]
        elif n.kind == "matmul":
            v = torch.tensordot(a[0], a[1], dims=([a[0].dim() - 1], [0]))
        elif n.kind == "gather":
            src, src_layout = a[0], n.args[0].layout
            idx = a[1]
            names = [x for x in src_layout if x is not None]
            src = src.reshape([s for s, x in zip(src.shape, src_layout) if x is not None])
            rank = len(n.layout)
            index = []
            for name in names:
                if name == n.dim:
                    index.append(idx.reshape(list(idx.shape) + [1] * (rank - idx.dim())))
                else:
                    shape = [1] * rank
                    shape[n.layout.index(name)] = c.sizes[name]
                    index.append(torch.arange(c.sizes[name], device=src.device).reshape(shape))
            v = src[tuple(index)]
        else:
            raise AssertionError(n.kind)
        if v.is_floating_point() and not bool((v.abs() < 1e6).all()):
            raise Rejected("overflow")
        memo[id(n)] = v
    return memo


# -- the strategy ------------------------------------------------------------------------------
@st.composite
def compositions(
    draw: st.DrawFn, style: str, first: str = "", max_steps: int = 8 if PROFILE_NAME == "long" else 5
) -> Composition:
    """A random op; ``first`` starts it with a given construct (its inputs chosen so it applies)."""
    sizes = {d: draw(st.integers(1, 7), label=f"size {d}") for d in DIMS}
    sizes.update({flat: sizes[a] * sizes[b] for flat, (a, b) in FLAT.items()})
    sizes.update({new: sizes[old] for new, old in RENAMES.items()})
    sizes[WINDOW] = draw(st.integers(1, 3), label="window length")
    inputs: list[Node] = []
    if first:
        inputs = [Node("input", layout, name=FLOAT_NAMES[i]) for i, layout in enumerate(FIRST_INPUTS[first])]
    else:
        for i in range(draw(st.integers(1, 3), label="float inputs")):
            choices = FLOAT_LAYOUTS + (FLAT_LAYOUTS if any({"d", "k"} <= set(x.layout) for x in inputs) else [])
            inputs.append(Node("input", draw(st.sampled_from(choices)), name=FLOAT_NAMES[i]))
    pool: list[Node] = list(inputs)
    ints: list[Node] = []
    if first:
        pool.append(_first(draw, first, pool, ints, sizes))
    steps = draw(st.integers(0 if first else 1, max_steps), label="steps")
    for _ in range(steps):
        kinds = ["unary", "binary", "reduce", "reduce_keepdim", "matmul", "gather", "flatten", "layer", "contract"]
        kinds += ["rename", "window"]
        kind = draw(st.sampled_from(kinds))
        node = _make(draw, kind, pool, ints, sizes)
        if node is None:  # not applicable to this pool: an elementwise function always is
            node = _make(draw, "unary", pool, ints, sizes)
        pool.append(node)
    root = pool[-1]
    if draw(st.booleans(), label="reduce to a scalar"):
        for d in root.named():
            root = Node(
                "reduce",
                tuple(x for x in root.layout if x != d),
                (root,),
                fn=draw(st.sampled_from(["sum", "mean"])),
                dim=d,
            )
    seconds = [p for p in pool if p.kind != "input" and p is not root]
    second = draw(st.sampled_from(seconds)) if seconds and draw(st.booleans(), label="two outputs") else None
    comp = Composition(sizes, [], root, style, second=second)
    reached = {id(n) for n in comp.nodes()}
    for inp in inputs:  # every input reaches the output: fold the unreached ones in
        if id(inp) in reached:
            continue
        t = inp
        for d in inp.named():
            if d not in root.named():
                t = Node("reduce", tuple(x for x in t.layout if x != d), (t,), fn="sum", dim=d)
        fn = FNS[draw(st.sampled_from(["add", "mul", "div"]))]
        root = Node(
            "binary",
            broadcast_layout([root.layout, t.layout]),
            (root, t),
            fn=fn.name,
            template=draw(st.sampled_from(fn.templates)),
        )
    comp.root = root
    comp.inputs = inputs + [i for i in ints if id(i) in {id(n) for n in comp.nodes()}]
    # unused integer inputs are left out of the op: derive needs every dim's size from an input
    named_ok = {"named": 1.0, "inline": 0.0, "mixed": 0.5}[style]
    k = 0
    for n in comp.nodes():
        if n.kind == "input":
            continue
        if n is comp.root and style != "inline":
            comp.names[id(n)] = "out" if draw(st.booleans(), label="root named out") else f"v{k}"
        elif named_ok == 1.0 or (named_ok > 0 and draw(st.booleans(), label="named")):
            comp.names[id(n)] = f"v{k}"
        k += 1
    comp.source = render_source(comp)
    return comp


FIRST_INPUTS = {
    "layer": [("n", "d"), ("d", "k"), ("k",)],  # activation(x @ W + b)
    "contract": [("n", "d"), ("d", "k"), ("d",)],  # (x * y * w).sum("d"): three factors
    "middle_max": [("n", "d", "k")],  # x.max("d"): a max over a middle dim
    "conv": [("n", "d"), (WINDOW, "m")],  # a padded window of x contracted with a weight over j
    "depthwise": [("n", "d"), (WINDOW, "d")],  # each d's window with its own weights: summed over j alone
    "pool": [("n", "d")],  # a padded window of x reduced over its offsets j: sum, mean or max pooling
    "pool2d": [("n", "d", "k")],  # windows along d and k (or d twice), reduced over both offsets (j, e)
    "depthwise2d": [("n", "d", "k"), (WINDOW, WINDOW2, "n")],  # each n's 2-D window with its own weights
    "shared": [("n", "d"), ("d", "k"), ("d", "k")],  # f(x @ W) op (x @ V): x's gradient sums two matmuls
    "select": [("n", "d"), ("n", "d")],  # a Piecewise of two inputs: linear branches, a lerp both ways
}


def _first(draw: st.DrawFn, first: str, pool: list[Node], ints: list[Node], sizes: dict[str, int]) -> Node:
    if first in ("conv", "depthwise"):
        x, w = pool
        window = _make(draw, "window", [x], ints, sizes)
        assert window is not None
        product = Node(
            "binary", broadcast_layout([window.layout, w.layout]), (window, w), fn="mul", template="{a} * {b}"
        )
        return Node("reduce", tuple(a for a in product.layout if a != WINDOW), (product,), fn="sum", dim=WINDOW)
    if first in ("pool2d", "depthwise2d"):  # one window of two dims: its gradient is never made whole
        sizes[WINDOW2] = draw(st.integers(1, 3), label="second window length")  # (drawn here alone, so
        # that adding the 2-D constructs left every other construct's derandomized examples as they were)
        first_window = _window(draw, pool[0], "d", WINDOW, sizes)
        # the second along k (a 2-D window), or along d again (a window of windows: a pool of a pool)
        window = _window(
            draw, first_window, draw(st.sampled_from(["k", "d"]), label="second window's dim"), WINDOW2, sizes
        )
        how = draw(st.sampled_from(["sum", "mean", "max"])) if first == "pool2d" else "sum"
        if first == "depthwise2d":
            window = Node(
                "binary",
                broadcast_layout([window.layout, pool[1].layout]),
                (window, pool[1]),
                fn="mul",
                template="{a} * {b}",
            )
        inner = Node("reduce", tuple(a for a in window.layout if a != WINDOW), (window,), fn=how, dim=WINDOW)
        return Node("reduce", tuple(a for a in inner.layout if a != WINDOW2), (inner,), fn=how, dim=WINDOW2)
    if first == "pool":  # the gradient of a sum or mean is one value per window: not copied per offset
        window = _make(draw, "window", pool, ints, sizes)
        assert window is not None
        how = draw(st.sampled_from(["sum", "mean", "max"]))
        return Node("reduce", tuple(a for a in window.layout if a != WINDOW), (window,), fn=how, dim=WINDOW)
    if first == "shared":
        x, w, v = pool
        fn = FNS[draw(st.sampled_from(ACTIVATIONS))]
        act = Node("unary", ("n", "k"), (Node("matmul", ("n", "k"), (x, w)),), fn=fn.name, template=fn.templates[0])
        how = FNS[draw(st.sampled_from(["add", "sub", "mul"]))]
        pair = (act, Node("matmul", ("n", "k"), (x, v)))
        return Node("binary", ("n", "k"), pair, fn=how.name, template=draw(st.sampled_from(how.templates)))
    if first == "select":
        x, y = pool
        fn = FNS[draw(st.sampled_from(["select", "huber", "clip_pw", "clip2_pw", "elu_pw"]))]
        if fn.name != "select":  # of x - y: a Huber (linear branches backward, a square forward), a clip
            diff = Node("binary", ("n", "d"), (x, y), fn="sub", template="{a} - {b}")
            return Node("unary", ("n", "d"), (diff,), fn=fn.name, template=fn.templates[0])
        return Node("binary", ("n", "d"), (x, y), fn=fn.name, template=fn.templates[0])
    if first == "middle_max":
        x = pool[0]
        return Node("reduce", ("n", "k"), (x,), fn="max", dim="d")
    if first == "contract":
        x, y, w = pool
        product = Node("binary", ("n", "d", "k"), (x, y), fn="mul", template="{a} * {b}")
        product = Node("binary", ("n", "d", "k"), (product, w), fn="mul", template="{a} * {b}")
        return Node("reduce", ("n", "k"), (product,), fn="sum", dim="d")
    x, w, b = pool
    pre = Node("binary", ("n", "k"), (Node("matmul", ("n", "k"), (x, w)), b), fn="add", template="{a} + {b}")
    fn = FNS[draw(st.sampled_from(ACTIVATIONS))]
    return Node("unary", pre.layout, (pre,), fn=fn.name, template=draw(st.sampled_from(fn.templates)))


def _window(draw: st.DrawFn, a: Node, d: str, offsets: str, sizes: dict[str, int]) -> Node:
    """``a``'s padded, dilated window along ``d`` (which keeps its size), its offsets the dim ``offsets``."""
    dilation = draw(st.integers(1, 2), label="dilation")
    span = dilation * (sizes[offsets] - 1)
    left = draw(st.integers(0, span), label="left padding")
    return Node("window", a.layout + (offsets,), (a,), fn=(left, span - left, sizes[offsets], dilation), dim=d)


def _make(draw: st.DrawFn, kind: str, pool: list[Node], ints: list[Node], sizes: dict[str, int]) -> Node | None:
    if kind == "unary":
        a = draw(st.sampled_from(pool))
        fn = draw(st.sampled_from(UNARY))
        return Node("unary", a.layout, (a,), fn=fn.name, template=draw(st.sampled_from(fn.templates)))
    if kind == "binary":
        a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        if len(set(a.named()) | set(b.named())) > MAX_DIMS:
            return None
        fn = draw(st.sampled_from(BINARY))
        if fn.name == "sub" and a is b:  # x - x is 0 to SymPy: max(u, x - x) is a relu, with relu's kink
            return None
        return Node(
            "binary",
            broadcast_layout([a.layout, b.layout]),
            (a, b),
            fn=fn.name,
            template=draw(st.sampled_from(fn.templates)),
        )
    if kind in ("reduce", "reduce_keepdim"):
        cands = [p for p in pool if p.named()]
        if not cands:
            return None
        a = draw(st.sampled_from(cands))
        d = draw(st.sampled_from(a.named()))
        how = draw(st.sampled_from(["sum", "mean", "max"]))
        if kind == "reduce":
            return Node("reduce", tuple(x for x in a.layout if x != d), (a,), fn=how, dim=d)
        # keepdim: the reduced tensor meets a tensor holding dim d, like x - x.max("d", keepdim=True)
        red = Node("reduce", tuple(None if x == d else x for x in a.layout), (a,), fn=how, dim=d, keepdim=True)
        partners = [p for p in pool if d in p.named() and set(a.named()) <= set(p.named())]
        other = draw(st.sampled_from(partners))
        fn = FNS[draw(st.sampled_from(["add", "sub", "mul", "div", "div_exp"]))]
        pair = (other, red) if fn.name.startswith("div") or draw(st.booleans()) else (red, other)
        return Node(
            "binary",
            broadcast_layout([pair[0].layout, pair[1].layout]),
            pair,
            fn=fn.name,
            template=draw(st.sampled_from(fn.templates)),
        )
    if kind == "matmul":
        pairs = [
            (a, b)
            for a in pool
            for b in pool
            if a.layout
            and b.layout
            and a.layout[-1] is not None
            and a.layout[-1] == b.layout[0]
            and len(set(a.named()[:-1]) | set(b.named()[1:])) == len(a.named()) - 1 + len(b.named()) - 1
            and len(a.named()) + len(b.named()) - 2 <= MAX_DIMS
        ]
        if not pairs:
            return None
        a, b = draw(st.sampled_from(pairs))
        return Node("matmul", a.layout[:-1] + b.layout[1:], (a, b))
    if kind == "layer":  # activation(a @ b + bias): the pre-activation unnamed unless the style names it
        mm = _make(draw, "matmul", pool, ints, sizes)
        if mm is None:
            return None
        biases = [p for p in pool if p.named() and set(p.named()) <= set(mm.named())]
        pre = mm
        if biases:
            bias = draw(st.sampled_from(biases))
            pre = Node("binary", broadcast_layout([mm.layout, bias.layout]), (mm, bias), fn="add", template="{a} + {b}")
        fn = FNS[draw(st.sampled_from(ACTIVATIONS))]
        return Node("unary", pre.layout, (pre,), fn=fn.name, template=draw(st.sampled_from(fn.templates)))
    if kind == "contract":  # (a * b * c).sum(d): a contraction of several factors as the user may write it
        d = draw(st.sampled_from(DIMS))
        holders = [p for p in pool if d in p.named()]
        if not holders:
            return None
        factors = [draw(st.sampled_from(holders)) for _ in range(draw(st.integers(2, 3)))]
        if len({x for f in factors for x in f.named()}) > MAX_DIMS:
            return None
        product = factors[0]
        for f in factors[1:]:
            product = Node(
                "binary", broadcast_layout([product.layout, f.layout]), (product, f), fn="mul", template="{a} * {b}"
            )
        return Node("reduce", tuple(x for x in product.layout if x != d), (product,), fn="sum", dim=d)
    if kind == "rename":
        pairs = [(p, new) for p in pool for new, old in RENAMES.items() if old in p.named() and new not in p.named()]
        if not pairs:
            return None
        a, new = draw(st.sampled_from(pairs))
        old = RENAMES[new]
        return Node("rename", tuple(new if x == old else x for x in a.layout), (a,), fn=new, dim=old)
    if kind == "window":  # a padded, dilated window along a dim that keeps its size ("same" padding)
        cands = [(p, d) for p in pool for d in p.named() if d in DIMS and WINDOW not in p.named()]
        if not cands:
            return None
        a, d = draw(st.sampled_from(cands))
        if len(a.named()) + 1 > MAX_DIMS and len(pool) > 1:
            return None
        return _window(draw, a, d, WINDOW, sizes)
    if kind == "flatten":
        cands = [
            (p, flat)
            for p in pool
            for flat, pair in FLAT.items()
            for i in range(len(p.layout) - 1)
            if p.layout[i : i + 2] == pair and flat not in p.layout  # a second "nd" is refused
        ]
        if not cands:
            return None
        a, flat = draw(st.sampled_from(cands))
        i = a.layout.index(FLAT[flat][0])
        return Node("flatten", a.layout[:i] + (flat,) + a.layout[i + 2 :], (a,), dim=flat)
    if kind == "gather":
        cands = [p for p in pool if p.named()]
        if not cands:
            return None
        src = draw(st.sampled_from(cands))
        c = draw(st.sampled_from(src.named()))
        reuse = [i for i in ints if i.dim == c]
        if reuse and draw(st.booleans()):
            idx = draw(st.sampled_from(reuse))
        elif len(ints) < len(INT_NAMES):
            others = [x for x in DIMS if x != c]
            rank = draw(st.integers(1, 2))
            layout = tuple(draw(st.permutations(others))[:rank])
            idx = Node("input", layout, name=INT_NAMES[len(ints)], is_int=True, dim=c)
            ints.append(idx)
        else:
            return None
        rest = tuple(x for x in src.layout if x is not None and x != c and x not in idx.layout)
        if len(idx.layout) + len(rest) > MAX_DIMS:
            return None
        templates = ['{a}.take({i}, "{c}")'] + (["{a}[{i}]"] if src.layout[0] == c else [])
        return Node("gather", idx.layout + rest, (src, idx), template=draw(st.sampled_from(templates)), dim=c)
    raise AssertionError(kind)


def _values(draw: st.DrawFn, c: Composition) -> dict[str, torch.Tensor]:
    out = {}
    for i in c.inputs:
        shape = tuple(1 if x is None else c.sizes[x] for x in i.layout)
        if i.is_int:
            arr = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, c.sizes[i.dim] - 1)), label=i.name)
        else:
            # distinct multiples of 1/256: no near-ties between inputs; exact ties are then placed on purpose
            grid = st.integers(-512, 512).map(lambda k: k / 256)
            arr = np.array(draw(hnp.arrays(np.float64, shape, elements=grid, unique=True), label=i.name))
            if arr.size and draw(st.booleans(), label=f"ties in {i.name}"):
                flat = arr.reshape(-1)
                spots = draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=3), label="tie spots")
                flat[spots] = draw(st.sampled_from([0.0, -0.5, 0.5, float(flat.max())]), label="tie value")
                event("exact ties in the inputs")
        out[i.name] = torch.from_numpy(np.array(arr)).to(DEVICE)
    return out


def check_composition(c: Composition, values: dict[str, torch.Tensor], grad_seed: int) -> None:
    """Derive the op end to end; fused and chain backward against autograd, twice over."""
    # the independent reference: this file's own torch evaluation of the DAG (cheap, so first)
    leaves = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in values.items()}
    memo = evaluate(c, leaves)  # may raise Rejected
    expected = memo[id(c.root)]
    for node_id in c.names:
        if memo[node_id].requires_grad and node_id != id(c.root):
            memo[node_id].retain_grad()
    gen = torch.Generator().manual_seed(grad_seed)

    def randn(shape: Any) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(expected.device)

    g: Any = None if expected.dim() == 0 else randn(expected.shape)
    if c.second is None:
        expected.backward(g)
    else:  # two outputs: each gets a gradient, or the second none (unused: None, i.e. zero)
        second = memo[id(c.second)]
        g = (randn(expected.shape), None)
        if grad_seed % 3:
            g = (g[0], randn(second.shape))
        torch.autograd.backward([expected, second], [g[0], torch.zeros_like(second) if g[1] is None else g[1]])
    for leaf in leaves.values():  # 1/(1 + exp(-u)) at u = -800: inf inside, NaN out of autograd
        if leaf.grad is not None and not bool(leaf.grad.isfinite().all()):
            raise Rejected("autograd's gradient is not finite")

    the_op = build_op(c.source)
    d = derive(the_op)
    module = load_module(render(d, formatted=False), "comp")  # black: tested on the catalogue
    code = "\n".join(d.code.forward + d.code.backward)
    if "torch.lerp(" in code or ".lerp_(" in code:
        COUNTS["compositions with a select by lerp"] += 1
    if "torch.exp(torch.clamp_max(" in code:
        COUNTS["compositions with an exp clamped to its branch"] += 1
    if re.search(r"\.mul_\(torch\.(gt|ge|lt|le)\(", code):
        COUNTS["compositions selecting by a product of float masks (And, Or)"] += 1
    if re.search(r"\.(gt|ge|lt|le)_\(", code):
        COUNTS["compositions comparing into floats in place"] += 1
    if re.search(r"clamp\(\w+, [^,()]+, [^,()]+\)\.(eq|ne)_\(", code):
        COUNTS["compositions masking a closed interval by a clamp"] += 1
    if re.search(r"clamp_?\(.*(min|max)=", code):
        COUNTS["compositions with a branch clamped (a Piecewise as a clamp)"] += 1
    # a max's or a gather's gradient is its values scattered (item 4): no one-hot of two or more
    # dims, the size of an input, is made to be multiplied (one along a single dim may be)
    for shape in _ONE_HOT.findall("\n".join(d.code.backward)):
        assert "," not in shape.strip().rstrip(","), f"a one-hot of shape ({shape}) in:\n" + "\n".join(d.code.backward)
        COUNTS["compositions with a one-hot along one dim"] += 1
    inputs = [values[t.name] for t in d.program.inputs]

    out, _ = module.comp_forward(*inputs)
    # every value of the DAG, and what the op as written makes besides (a padding before a window)
    as_written = max([v.numel() for v in memo.values()] + [_largest_written(d, inputs)])
    if c.second is None:
        _close("generated forward vs torch evaluation", out, expected.detach())
        _check_module(d, module, inputs, lambda shape: g, as_written)
    else:
        _close("generated forward vs torch evaluation", out[0], expected.detach())
        _close("generated second output vs torch evaluation", out[1], memo[id(c.second)].detach())
        given = iter(g)
        _check_module(d, module, inputs, lambda shape: next(given), as_written)
    _no_blow_up_at_larger_sizes(d, module)
    fused = module.comp_backward(g, module.comp_forward(*inputs)[1])._asdict()
    for name, leaf in leaves.items():
        if leaf.is_floating_point():
            _close(f"fused d{name} vs torch evaluation", fused[name], leaf.grad)
    steps = module.comp_backward_steps(g, module.comp_forward(*inputs)[1])
    for node_id, name in c.names.items():
        if node_id not in (id(c.root), id(c.second)) and memo[node_id].grad is not None:
            if name not in steps and not memo[node_id].grad.any():
                continue  # v - v: derive proves this gradient is identically 0 and skips the intermediate
            assert name in steps, f"backward_steps has no gradient for the intermediate {name}"
            _close(f"chain d{name} vs torch evaluation", steps[name], memo[node_id].grad)


_ONE_HOT = re.compile(r"new_zeros\(\(([^()]*)\)\)\.scatter_\([^()]*(?:\([^()]*\))?[^()]*, 1\.0\)")


def _run_composition(data: st.DataObject, style: str, first: str = "") -> None:
    c = data.draw(compositions(style, first), label="composition")
    note(c.source)
    values = _values(data.draw, c)
    seed = data.draw(st.integers(0, 2**16), label="grad seed")
    try:
        check_composition(c, values, seed)
    except Rejected as why:
        event(f"rejected: {why}")
        COUNTS[f"compositions rejected ({why})"] += 1
        assume(False)
    event(f"DAG size: {len(c.nodes())} nodes, {len(c.inputs)} inputs")
    for n in c.nodes():
        event(f"node: {n.kind}" + (f" {n.fn}" if n.kind in ("reduce",) else ""))
    COUNTS[f"compositions checked ({first or style})"] += 1


@pytest.mark.parametrize("style", ["named", "inline", "mixed"])
@settings(PROFILE, max_examples=COMPOSITION_EXAMPLES)
@given(data=st.data())
def test_random_composition_matches_autograd(style: str, data: st.DataObject):
    _run_composition(data, style)


@pytest.mark.parametrize("first", [f for f in FIRST_INPUTS if f not in WINDOWS_2D])
@settings(PROFILE, max_examples=COMPOSITION_EXAMPLES)
@given(data=st.data())
def test_random_composition_built_on_a_given_construct_matches_autograd(first: str, data: st.DataObject):
    """Compositions that start with a layer on an unnamed ``x @ W + b``, a 3-factor contraction, a
    max over a middle dim or an input read by two matmuls, all inline (derive decides what to
    name), then random steps."""
    _run_composition(data, "inline", first)


@pytest.mark.parametrize("first", WINDOWS_2D)
@settings(PROFILE, max_examples=WINDOW_2D_EXAMPLES)
@given(data=st.data())
def test_random_composition_built_on_a_2d_window_matches_autograd(first: str, data: st.DataObject):
    """Compositions that start with a 2-D pool or depthwise conv (windows along two dims, whose
    gradient is added back a pair of offsets at a time), then random steps: a third of the other
    constructs' examples, to keep the suite's time (``long`` explores more)."""
    _run_composition(data, "inline", first)


KINKED = [f.name for f in UNARY if f.kink is not None]
JOINS = ("{a} * {b}", "{a} + {b}", "{a} - {b}", "apply(sympy.Max, {a}, {b})")


@settings(PROFILE, max_examples=PROFILE.max_examples)
@given(fn=st.sampled_from(KINKED), join=st.sampled_from(JOINS), seed=st.integers(0, 10_000))
def test_the_exact_check_passes_a_kinked_function_of_two_inputs_at_any_draw(fn: str, join: str, seed: int):
    """The exact check draws rationals, some 0 or equal: an entry at a kink (relu of x·w where
    w = 0) is drawn again, not compared with SymPy's own convention there (Heaviside(0) = 1/2)."""
    from derive.verify import exact_check

    inner = join.format(a="x", b="w")
    body = FNS[fn].templates[0].format(a=f"({inner})")
    source = f'@op(x="n d", w="d")\ndef kinked(x, w, alpha=0.75):\n    out = {body}\n    return out\n'
    note(source)
    statuses = dict(exact_check(derive(build_op(source)), seed=seed))
    assert "FAILED" not in statuses.values(), statuses
    COUNTS["kinked functions checked exactly"] += 1


# == 3. regression tests: bugs the properties found (minimal repros) ===========================
# Each is strict: when the bug is fixed the test XPASSes, fails, and its marker must go.
def _generated(source: str) -> tuple[Any, Any]:
    the_op = build_op(source)
    d = derive(the_op)
    return d, load_module(render(d, formatted=False), the_op.name)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# Fixed: a constant output had no autograd graph for the reference, and a sum of a constant was
# printed as `Σ_n(0)` into the forward. Kept as regressions.
@pytest.mark.parametrize("body", ["out = x - x", 'out = (x - x).sum("n")', 'out = x.sum("n").sum("d") * 0'])
def test_a_constant_output_lowers_to_working_code(body: str):
    d, module = _generated(f'@op(x="n d")\ndef const_out(x):\n    {body}\n    return out\n')
    x = _x(3, 2)
    out, saved = module.const_out_forward(x)
    assert isinstance(out, torch.Tensor) and not out.any()
    want = _check_module(d, module, [x], lambda shape: _x(*shape, seed=1))
    assert not want["x"].any()


# Fixed in 2a65aec (constants were lowered to `0[None, None] * torch.ones(...)`, a TypeError): kept as regressions.
def test_a_gradient_that_cancels_to_zero_lowers_to_working_code():
    source = """
@op(x="n d")
def centred_sum(x):
    centred = x - x.mean("n", keepdim=True)
    out = centred.sum("n")
    return out
"""
    d, module = _generated(source)
    assert d.formula("x") == "dx[n, d] = 0"
    want = _check_module(d, module, [_x(4, 3)], lambda shape: _x(*shape, seed=1))
    assert want["x"].abs().max() < 1e-12


def test_an_unused_input_gets_a_zero_gradient():
    d, module = _generated('@op(x="n d", w="d")\ndef unused(x, w):\n    out = tanh(x)\n    return out\n')
    out, saved = module.unused_forward(_x(2, 3), _x(3, seed=2))
    grads = module.unused_backward(torch.ones_like(out), saved)
    assert torch.equal(grads.w, torch.zeros(3, dtype=torch.float64))


def test_three_nested_sums_over_one_dim_in_one_statement_lower():
    d, module = _generated(
        '@op(x="d")\ndef nested(x):\n    out = (x * (x * x.sum("d")).sum("d")).sum("d")\n    return out\n'
    )
    x = _x(3)
    _check_module(d, module, [x], lambda shape: _x(*shape, seed=1))
    # out = Σx · Σx · Σx: d out/dx_i = 3 (Σx)^2
    torch.testing.assert_close(
        module.nested_backward(None, module.nested_forward(x)[1]).x,
        3 * x.sum() ** 2 * torch.ones(3, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('v0 = x.sum("k")\n    v1 = v0.take(idx, "d")', id="summed-dim"),
        # k is both summed upstream and shared with idx: dx = K*Σ_k2(dv1[k2]*δ(d, idx[k2])) + dv1[k]*δ(d, idx[k])
        pytest.param('v0 = x.sum("k", keepdim=True)\n    v1 = (v0 + x).take(idx, "d")', id="summed-and-shared-dim"),
    ],
)
def test_a_gather_whose_index_dim_was_summed_in_its_source(body: str):
    source = f'@op(x="d k", idx="int k")\ndef gathered(x, idx):\n    {body}\n    return v1\n'
    d, module = _generated(source)
    x, idx = _x(3, 2), torch.tensor([2, 0])
    _check_module(d, module, [x, idx], lambda shape: torch.ones(shape, dtype=torch.float64))


def test_the_chain_keeps_the_argmax_factor_of_every_term():
    source = """
@op(x="n")
def scaled_by_max(x):
    out = tanh(x / exp(x.max("n", keepdim=True)))
    return out
"""
    d, module = _generated(source)
    x = torch.tensor([0.3, 0.5, -0.2], dtype=torch.float64)
    _check_module(d, module, [x], lambda shape: _x(*shape, seed=1))


def test_a_sum_inside_a_statement_that_shadows_its_free_index():
    source = """
@op(x="n d")
def shadowed(x):
    v = x + (x.sum("d", keepdim=True) + x).sum("d", keepdim=True)
    out = 2 * v
    return out
"""
    d, module = _generated(source)
    x = _x(2, 3)
    _check_module(d, module, [x], lambda shape: _x(*shape, seed=1))


@pytest.mark.parametrize("body", ['out = x.flatten("t", "e") * w', 'out = x.flatten("t", "e") @ w'])
def test_an_input_with_a_flattened_dim_meets_an_inline_flatten(body: str):
    d, module = _generated(f'@op(x="n t e", w="(t e)")\ndef flat_scale(x, w):\n    {body}\n    return out\n')
    x, w = _x(2, 3, 4), _x(12, seed=2)
    _check_module(d, module, [x, w], lambda shape: _x(*shape, seed=1))


def test_a_max_over_a_flattened_dim():
    d, module = _generated('@op(x="t e")\ndef flat_max(x):\n    out = x.flatten("t", "e").max("te")\n    return out\n')
    x = _x(2, 3)
    _check_module(d, module, [x], lambda shape: _x(*shape, seed=1))


def test_a_sum_over_a_flattened_dim_that_reads_one_part_alone():
    """``max_d(x[nd.0, d, k])`` inside ``Σ_nd``: a value broadcast along d, summed over (n, d)."""
    d, module = _generated(
        '@op(x="n d k")\ndef comp(x):\n'
        '    out = (x * x.max("d", keepdim=True)).flatten("n", "d").mean("nd").mean("k")\n    return out\n'
    )
    _check_module(d, module, [_x(3, 4, 5)], lambda shape: _x(*shape, seed=1))


def test_an_argmax_at_gathered_positions_scatters_its_values_with_no_one_hot():
    """Two deltas, one an argmax that also depends on a result dim (k): one put_, no N·M·K·N one-hot."""
    d, module = _generated(
        '@op(x="n d k", idx="int n m")\ndef comp(x, idx):\n'
        '    out = (x / exp(x.max("n", keepdim=True))).take(idx, "d")\n    return out\n'
    )
    idx = torch.randint(0, 6, (3, 6), generator=torch.Generator().manual_seed(0))
    _check_module(d, module, [_x(3, 6, 5), idx], lambda shape: _x(*shape, seed=1))
    assert "put_(" in "\n".join(d.code.backward)


def test_an_argmax_the_forward_saved_is_read_where_the_backward_uses_it_as_a_position():
    """x[argmax[d, n], :] in the backward reads the saved argmax; the forward's matmul and max are not redone."""
    d, module = _generated(
        '@op(x="n d", y="d k", w="d", idx="int d n")\ndef comp(x, y, w, idx):\n'
        '    out = (((x * y) * w).sum("d").max("n")).take(idx, "k")\n    return out\n'
    )
    _check_module(d, module, [_x(3, 4), _x(4, 2, seed=1), _x(4, seed=2), _ints(2, 4, 3)], lambda s: _x(*s, seed=3))
    backward = "\n".join(d.code.backward)
    assert "argmax_" in backward and ".max(" not in backward, backward


def test_one_coordinate_of_a_gathered_flat_position_scatters_its_values_with_no_one_hot():
    """Σ_n dout[n]·δ(d, idx[n].1): idx's coordinate along d is idx % D, and dout is added there (no N x D one-hot)."""
    d, module = _generated(
        '@op(x="n d", idx="int n")\ndef comp(x, idx):\n'
        '    out = (x.sum("n", keepdim=True) * x).flatten("n", "d").take(idx, "nd")\n    return out\n'
    )
    _check_module(d, module, [_x(3, 4), _ints(12, 3)], lambda shape: _x(*shape, seed=1))
    backward = "\n".join(d.code.backward)
    assert "% D" in backward and "scatter_(" not in backward, backward


@pytest.mark.parametrize("body", ["out = tanh(x) + 0 * w", "out = x + (3 - w) + w"], ids=["unused", "cancelled"])
def test_verify_handles_an_input_with_zero_gradient(body: str):
    d, module = _generated(f'@op(x="n d", w="n d")\ndef zero_grad(x, w):\n    {body}\n    return out\n')
    x, w = _x(2, 3), _x(2, 3, seed=2)
    assert not autograd_grads(d, [x, w], torch.ones(2, 3, dtype=torch.float64))["w"].any()
    assert verify(d, module, exact=False).ok


def test_a_flatten_of_an_inline_expression():
    d, module = _generated(
        '@op(x="n d", y="d")\ndef flat_sum(x, y):\n    out = (x + y).flatten("n", "d")\n    return out\n'
    )
    _check_module(d, module, [_x(2, 3), _x(3, seed=2)], lambda shape: _x(*shape, seed=1))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('out = y.flatten("n", "d").take(idx, "nd")', id="inline"),  # was: KeyError 'idx(m)'
        pytest.param('f = y.flatten("n", "d")\n    out = f.take(idx, "nd")', id="named"),  # was: invalid Python
    ],
)
def test_a_gather_along_a_flattened_dim(body: str):
    d, module = _generated(f'@op(y="n d", idx="int m")\ndef flat_take(y, idx):\n    {body}\n    return out\n')
    y, idx = _x(2, 3), torch.tensor([5, 0, 5, 2])
    _check_module(d, module, [y, idx], lambda shape: _x(*shape, seed=1))


def test_a_keepdim_sum_of_a_statement_that_holds_a_keepdim_sum():
    source = """
@op(x="n d", w="n d")
def sum_of_sums(x, w):
    v1 = x.sum("d", keepdim=True) + x
    out = v1.sum("d", keepdim=True) + w
    return out
"""
    d, module = _generated(source)
    x = _x(2, 3)
    _check_module(d, module, [x, _x(2, 3, seed=2)], lambda shape: _x(*shape, seed=1))


@pytest.mark.parametrize("body", ["out = tanh(x) + 0 * w", "out = x + (3 - w) + w"], ids=["unused", "cancelled"])
def test_backward_steps_has_every_input(body: str):
    d, module = _generated(f'@op(x="n d", w="n d")\ndef zero_steps(x, w):\n    {body}\n    return out\n')
    out, saved = module.zero_steps_forward(_x(2, 3), _x(2, 3, seed=2))
    steps = module.zero_steps_backward_steps(torch.ones_like(out), saved)
    assert set(steps) >= {"x", "w"}, sorted(steps)
    assert not steps["w"].any()


def test_a_named_rename_of_an_input_gets_its_own_autograd_gradient():
    """``v0 = x.rename(k="s")`` is ``v0 = x`` in the forward: the autograd reference must not alias them."""
    source = '@op(x="d k", w="1 d")\ndef alias(x, w):\n    v0 = x.rename(k="s")\n    v3 = v0 + w\n    return v3, x.flatten("d", "k")\n'
    d, module = _generated(source)
    x = _x(2, 3)
    want = _check_module(d, module, [x, _x(1, 2, seed=2)], lambda shape: _x(*shape, seed=1))
    assert "v0" in want


@pytest.mark.parametrize(
    "second",
    [
        pytest.param('v2 = x.sum("d")\n    out = v1 * v2', id="two-equal-statements"),
        pytest.param('out = v1 * x.sum("d")', id="a-statement-equal-to-a-temporary"),
    ],
)
def test_an_intermediate_equal_to_another_expression_gets_its_own_autograd_gradient(second: str):
    source = f'@op(x="d k")\ndef shared(x):\n    v0 = x.sum("d")\n    v1 = tanh(v0)\n    {second}\n    return out\n'
    d, module = _generated(source)
    x, dout = _x(2, 3), _x(3, seed=1)
    _, saved = module.shared_forward(x)
    steps = module.shared_backward_steps(dout, saved)
    v0 = x.sum(0)
    expected_dv0 = (1 - torch.tanh(v0) ** 2) * v0 * dout  # d(tanh(v0) * v0)/dv0 along the tanh path only
    torch.testing.assert_close(steps["v0"], expected_dv0)  # the generated chain is right ...
    # ... and so is autograd's reference: each statement is its own tensor there (no shared temporary)
    torch.testing.assert_close(autograd_grads(d, [x], dout)["v0"], expected_dv0)
    assert verify(d, module, exact=False).ok


# Fixed in 2a65aec, kept as regressions: at kinks and ties the generated code and verify's autograd reference
# follow PyTorch's conventions (relu'(0) was 1 in the reference through clamp_min; Max(x, y) at a tie gave 0 to
# both sides; x.max(dim) routed to the first argmax while the reference's amax split the gradient).
def test_relu_gradient_at_zero_agrees_with_the_autograd_reference():
    d, module = derived("relu")
    x = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    out, saved = module.relu_forward(x)
    g = torch.ones_like(out)
    generated = module.relu_backward(g, saved).x
    assert generated.tolist() == [[0.0, 1.0, 0.0]]  # torch.relu's convention
    torch.testing.assert_close(autograd_grads(d, [x], g)["x"], generated)


def test_elementwise_max_of_two_tensors_at_a_tie_agrees_with_the_autograd_reference():
    d, module = _generated('@op(x="n d", y="n d")\ndef vmax(x, y):\n    out = apply(sympy.Max, x, y)\n    return out\n')
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    _check_module(d, module, [x, y], lambda shape: torch.ones(shape, dtype=torch.float64))


def test_max_reduction_at_a_tie_agrees_with_the_autograd_reference():
    d, module = _generated('@op(x="n d")\ndef rowmax(x):\n    out = x.max("d")\n    return out\n')
    x = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    _check_module(d, module, [x], lambda shape: torch.ones(shape, dtype=torch.float64))


# Fixed in 2a65aec, kept as a regression: a name the generated code uses is refused with OpDefinitionError
# (the symptoms it had before are listed).
@pytest.mark.parametrize(
    "name, symptom",
    [
        ("torch", "UnboundLocalError in the generated forward"),
        ("saved", "TypeError in the generated forward"),
        ("grad_output", "RuntimeError (expand) in the generated backward"),
        ("dx", "silently wrong gradients: the intermediate's gradient and input x's share the name dx"),
        ("dout", "wrong gradients and shapes: the seed dout and the intermediate's gradient share a name"),
        ("named_Grads", "TypeError: the NamedTuple class is shadowed"),
    ],
)
def test_an_intermediate_may_take_any_identifier_or_is_refused_cleanly(name: str, symptom: str):
    source = f"""
@op(x="n d", w="d")
def named(x, w):
    {name} = tanh(x * w)
    h = {name}.sum("n")
    out = h * w
    return out
"""
    try:
        d, module = _generated(source)
    except derive_pkg.OpDefinitionError:
        return  # refusing the name with a clear message is fine
    assert verify(d, module, exact=False).ok, symptom


# Fixed: the forward's max over a flattened dim read one part of it alone (now broadcast over
# the parts, then viewed as one axis), and the backward pinned a part with a summed index (a
# one-hot over the flattened axis, reshaped). Kept as a regression.
def test_a_max_over_a_flattened_dim_of_a_max_lowers():
    d, module = _generated(
        '@op(x="n d k")\ndef comp(x):\n'
        '    out = (x.sum("n", keepdim=True) + x * x.max("d")).flatten("n", "d").max("nd")\n    return out\n'
    )
    x = _x(2, 3, 4).requires_grad_()
    out, saved = module.comp_forward(x.detach())
    grads = module.comp_backward(torch.ones(4, dtype=torch.float64), saved)
    (x.sum(0, keepdim=True) + x * x.max(1, keepdim=True).values).flatten(0, 1).max(0).values.sum().backward()
    torch.testing.assert_close(grads.x, x.grad)


# Fixed: found by running ~4,000 random compositions beyond the CI sample. Each repro runs the
# fused backward, the chain and the wrapper against autograd, and the no-blow-up bound.
def _ints(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(2))


REPROS = {
    "a padding read past the end of an intermediate (dx summed the padded positions)": (
        'v0 = x.max("n", keepdim=True)\n    v1 = x + v0\n    out = v1.pad("n", 0, 2).unfold("n", 3, 1, "j")\n'
        '    v3 = x.flatten("n", "d")\n    return out, v3',
        '@op(x="n d")\ndef comp(x):\n',
        lambda: [_x(4, 3)],
    ),
    "a padding read through a flatten (dx of the padded shape)": (
        'v1 = x.flatten("n", "d").pad("k", 0, 2).unfold("k", 2, 1, "j", dilation=2)\n'
        '    out = v1.sum("nd").mean("k").sum("j") * y.sum("n").sum("d") * w.sum("d")\n    return out, v1',
        '@op(x="n d k", y="n d", w="d")\ndef comp(x, y, w):\n',
        lambda: [_x(4, 3, 5), _x(4, 3, seed=1), _x(3, seed=2)],
    ),
    "a max whose body reads a flattened index as a run (taken for a gather: invalid Python)": (
        'return (y.max("n", keepdim=True) + y).flatten("d", "k").mean("n").sum("dk") + x.sum("k"), (y * y).sum("n")',
        '@op(x="k", y="n d k")\ndef comp(x, y):\n',
        lambda: [_x(5), _x(3, 2, 5, seed=1)],
    ),
    "a window of one offset at dilation 2 (matched as win[0, k, n/2])": (
        'return x.max("d").unfold("n", 1, 1, "j", dilation=2).mean("n").sum("k").sum("j"), x + x.max("d").max("n", keepdim=True)',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(3, 4, 5)],
    ),
    "a sum of a value constant along the summed dim (the forward lost a factor D)": (
        'return (x + x.mean("d", keepdim=True) - x + 1.5).sum("n").mean("d").sum("k"), x + x.mean("d", keepdim=True) - x',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(2, 3, 4)],
    ),
    "an output that cancels to 0 beside another (an int, not a tensor)": (
        'return x.sum("k") - x.sum("k"), x.max("d")',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(2, 3, 4)],
    ),
    "a size-1 output that cancels to 0 (0[None])": (
        'return ((x**2 + 1) ** -0.5).sum("d") - ((x**2 + 1) ** -0.5).sum("d")',
        '@op(x="1 d")\ndef comp(x):\n',
        lambda: [_x(1, 3)],
    ),
    "a gather of a gather (a one-hot of D x D per entry)": (
        'return x[idx].take(jdx, "k")',
        '@op(x="d", idx="int k", jdx="int m d")\ndef comp(x, idx, jdx):\n',
        lambda: [_x(6), _ints(6, 4), _ints(4, 3, 6)],
    ),
    "a routed entry that reads its target too (y[m, idx]·δ(m, argmax))": (
        'v1 = x.rename(d="r") / 4\n    v4 = (y**3).max("m").take(idx, "n")\n    return v1, v4',
        '@op(x="k d", y="m n", idx="int m d")\ndef comp(x, y, idx):\n',
        lambda: [_x(2, 3), _x(4, 5, seed=1), _ints(5, 4, 3)],
    ),
    "a gathered conv squared (summed before its scatter: larger than any forward tensor)": (
        'c = (x.pad("n", 0, 2).unfold("n", 3, 1, "j") * y).sum("j").take(idx, "d")\n    return (c * c).sum("k")',
        '@op(x="n d", y="j m", idx="int k")\ndef comp(x, y, idx):\n',
        lambda: [_x(4, 3), _x(3, 2, seed=1), torch.tensor([2, 0, 2, 1, 1])],
    ),
    "a shared value that cancels and takes an axis with it (t1 - (x + t1) lost k)": (
        'return (x * y * w).sum("d") - (x + (x * y * w).sum("d"))',
        '@op(x="n d", y="d k", w="d")\ndef comp(x, y, w):\n',
        lambda: [_x(2, 5), _x(5, 3, seed=1), _x(5, seed=2)],
    ),
    "one minus a step (bool arithmetic: `1 - mask`, addcmul of a mask)": (
        'return x - apply(lambda u: sympy.Min(u, 0.5), x), x.max("d")',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(2, 3, 4)],
    ),
    "a relu of a gathered max, then a mean (masked_fill_ in place on a scalar)": (
        'return apply(lambda u: sympy.Max(u, 0), x.max("d")[idx]).mean("k"), x.max("d")[idx]',
        '@op(x="n d k", idx="int k")\ndef comp(x, idx):\n',
        lambda: [_x(3, 4, 5), _ints(3, 5)],
    ),
    "a step plus one (an integer tensor multiplied in place by a float)": (
        'return (x + apply(lambda u: sympy.Max(u, 0), x)).sum("m").sum("n"), x + apply(lambda u: sympy.Max(u, 0), x)',
        '@op(x="n m")\ndef comp(x):\n',
        lambda: [_x(3, 4)],
    ),
    "a step minus a value (torch refuses `mask - t`)": (
        'h = apply(lambda u: sympy.Max(u, -0.5), 1.5 + x / exp(x.mean("n", keepdim=True)))\n'
        '    return h.rename(d="r").sum("n").mean("r").sum("k")',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(3, 4, 2)],
    ),
    "a max over a flattened dim and a max over one of its parts (cannot lower a delta of dk.0)": (
        'return x.flatten("d", "k").max("dk", keepdim=True) - x.flatten("d", "k"), '
        'apply(lambda u, v: sympy.sqrt(1 + u**2 + v**2), x.max("d"), x.max("d"))',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(2, 3, 4)],
    ),
    "a sum of gathered values times a count of the same positions (a one-hot count matrix n x d)": (
        'return x.take(idx, "d").sum("k", keepdim=True) * x.take(idx, "d")',
        '@op(x="1 d", idx="int n k")\ndef comp(x, idx):\n',
        lambda: [_x(1, 7), _ints(7, 3, 2)],
    ),
    "a sum of a difference that cancels, then broadcast (`0[None, None]` in the forward)": (
        'return (x - x).sum("d", keepdim=True) + x',
        '@op(x="1 d")\ndef comp(x):\n',
        lambda: [_x(1, 3)],
    ),
    "a scalar sum of two equal maxima subtracted (the forward returned the int 0)": (
        'return (x.max("d") - x.max("d")).sum("n").sum("k")',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(4, 4, 1)],
    ),
    "a scalar mean of two equal contractions subtracted (the forward returned the float 0.0)": (
        'return (((x * y) * w).sum("d") - ((x * y) * w).sum("d")).mean("n").sum("k")',
        '@op(x="n d", y="d k", w="d")\ndef comp(x, y, w):\n',
        lambda: [_x(3, 5), _x(5, 4, seed=1), _x(5, seed=2)],
    ),
    "a max of a value that cancelled (its argmax had no tensor to be named after)": (
        'return apply(lambda u, v: u / (1 + v**2), x, (x - x).max("d", keepdim=True)).sum("n").sum("d").sum("k")',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(3, 4, 2)],
    ),
    "a padded gather read through a window (a square eye against the longer padded dim)": (
        'v2 = apply(lambda u: sympy.Min(u, 0.5), -x).take(idx, "k")\n'
        '    return v2.pad("d", 0, 4).unfold("d", 3, 1, "j", dilation=2).sum("d").mean("n").mean("j")',
        '@op(x="k", idx="int d n")\ndef comp(x, idx):\n',
        lambda: [_x(2), _ints(2, 7, 1)],
    ),
    "a relu's select in row blocks (torch.where(c, a, 0.0) given out=, which torch refuses)": (
        "v1 = apply(lambda u: sympy.log(1 + sympy.exp(u)), y @ w)\n"
        "    return apply(lambda u: sympy.Max(u, 0), x @ v1 + w)",
        '@op(x="k d", y="d k", w="k")\ndef comp(x, y, w):\n',
        lambda: [_x(3, 4), _x(4, 3, seed=1), _x(3, seed=2)],
    ),
    "a leaky relu of a max over a dim (0.01 * mask was float32 beside float64 values)": (
        'return (y + apply(lambda u: sympy.Max(u, 0) + 0.01 * sympy.Min(u, 0), x.max("n"))).sum("j").sum("m").sum("d")',
        '@op(x="n d", y="j m")\ndef comp(x, y):\n',
        lambda: [_x(3, 4), _x(2, 5, seed=1)],
    ),
    "a max over a flattened dim beside a term reading its parts apart (`arange(D*K).1`)": (
        'return y.flatten("d", "k").max("dk"), ((x * y) * w).sum("d")',
        '@op(x="n d", y="d k", w="d")\ndef comp(x, y, w):\n',
        lambda: [_x(6, 3), _x(3, 3, seed=1), _x(3, seed=2)],
    ),
    "a gather from a flattened input beside a term reading one part (a one-hot k x n x dk)": (
        'out = x.flatten("d", "k")[idx].mean("k").sum("n")\n    return out, apply(sympy.sin, x.mean("d"))',
        '@op(x="d k", idx="int k n")\ndef comp(x, idx):\n',
        lambda: [_x(2, 4), _ints(8, 4, 3)],
    ),
    "a gather from a flattened max, its sum beside a count of the same positions (a one-hot m x k x dk)": (
        'return apply(sympy.Max, w, w.flatten("d", "k")).take(idx, "dk").sum("m").sum("k").sum("d") + x.sum("d")'
        ' + y.sum("d"), apply(sympy.Max, w, w.flatten("d", "k"))',
        '@op(x="1 d", y="d", w="d k", idx="int m k")\ndef comp(x, y, w, idx):\n',
        lambda: [_x(1, 2), _x(2, seed=1), _x(2, 2, seed=2), _ints(4, 7, 2)],
    ),
    "window positions a value does not depend on (a one-hot d x j x d instead of a col2im)": (
        'v0 = x.unfold("d", 1, 1, "j", dilation=1)\n'
        '    v3 = apply(lambda u, v: u * v, x.max("d", keepdim=True), x).unfold("d", 1, 1, "j", dilation=2)\n'
        '    return (v0 / exp(v3.mean("j", keepdim=True))).mean("d").mean("j"), v0',
        '@op(x="d")\ndef comp(x):\n',
        lambda: [_x(5)],
    ),
    "one coordinate of a gathered position in a flattened dim (idx.1 printed as is: invalid Python)": (
        'return (x.sum("n", keepdim=True) - x).flatten("n", "d").take(idx, "nd")',
        '@op(x="n d", idx="int n")\ndef comp(x, idx):\n',
        lambda: [_x(3, 4), _ints(12, 3)],
    ),
    "a saved outer product read on its diagonal where a rename met its source (refused as a diagonal)": (
        'v1 = x * x.rename(d="r")\n    v2 = v1 * x\n    return v2.sum("n")',
        '@op(x="n d")\ndef comp(x):\n',
        lambda: [_x(3, 4)],
    ),
    "a contraction's argmax read at gathered positions (a D x N x D gather, the forward's matmul redone)": (
        'return (((x * y) * w).sum("d").max("n")).take(idx, "k")',
        '@op(x="n d", y="d k", w="d", idx="int d n")\ndef comp(x, y, w, idx):\n',
        lambda: [_x(3, 4), _x(4, 2, seed=1), _x(4, seed=2), _ints(2, 4, 3)],
    ),
    "rows gathered by more positions than there are rows (y[idx] of M x D with M > K)": (
        'return apply(sympy.Abs, (y @ (x.sum("d", keepdim=True) - w)) + y.max("d"))[idx]',
        '@op(x="d", y="k d", w="d", idx="int m")\ndef comp(x, y, w, idx):\n',
        lambda: [_x(2), _x(3, 2, seed=1), _x(2, seed=2), _ints(3, 7)],
    ),
    "an argmax at gathered positions routing a second gather (a one-hot D x N)": (
        'g = y.take(idx, "n")\n    return apply(lambda u, v: u / (1 + v**2), g.max("m", keepdim=True) - g, x.sum("n"))',
        '@op(x="m n", y="m n", idx="int m d")\ndef comp(x, y, idx):\n',
        lambda: [_x(2, 6), _x(2, 6, seed=1), _ints(6, 2, 3)],
    ),
    "windows of a gather whose gradient is a count of window positions (1.expand(...): invalid Python)": (
        'v1 = x[idx].unfold("k", 1, 1, "j", dilation=2)\n    return v1.sum("d").sum("k").sum("j")',
        '@op(x="n k", idx="int d")\ndef comp(x, idx):\n',
        lambda: [_x(3, 4), _ints(3, 5)],
    ),
    "rows gathered in bags and summed, both ways (a K x D x D gather, a copied-out scatter source)": (
        'return (((x * y) * w).sum("d")).take(idx, "n").sum("k").sum("d")',
        '@op(x="n d", y="d k", w="d", idx="int k d")\ndef comp(x, y, w, idx):\n',
        lambda: [_x(2, 7), _x(7, 1, seed=1), _x(7, seed=2), _ints(2, 1, 7)],
    ),
    "a factor read at the position a delta routes to (x[n, idx[j + m]] gathered, an M x J x N copy)": (
        'v0 = x * x\n    return v0.sum("n")[idx].unfold("m", 1, 1, "j", dilation=1).sum("m").mean("j")',
        '@op(x="n d", idx="int m")\ndef comp(x, idx):\n',
        lambda: [_x(4, 4), _ints(4, 5)],
    ),
    "a kept [1, K] mean updating a [K] buffer in place (a broadcast shape error)": (
        'v0 = y.mean("n", keepdim=True)\n    v2 = (y / exp(v0)).max("n", keepdim=True)\n'
        "    v6 = apply(lambda u, v: u * sympy.tanh(v), y / exp(v0), apply(lambda u, v: u + v, y, v2))"
        '.mean("n").sum("k")\n'
        '    return v6 + x.sum("n").sum("d").sum("k")',
        '@op(x="n d k", y="n k")\ndef comp(x, y):\n',
        lambda: [_x(4, 2, 6), _x(4, 6, seed=1)],
    ),
    "a power of a factor read at the position a delta routes to (x[d, idx[m]] ** 2, an M x D copy)": (
        'v1 = (x * x) * x\n    v2 = v1.sum("d")\n    v3 = v2[idx]\n    return v3 @ v3',
        '@op(x="d k", idx="int m")\ndef comp(x, idx):\n',
        lambda: [_x(6, 4), _ints(4, 7)],
    ),
    "a forward value matched inside a window of length 1 at an offset out of range (a wrong dx)": (
        'return apply(lambda u, v: u / (1 + v**2), apply(lambda u, v: u * v, (y * y).sum("k")'
        '.unfold("d", 1, 1, "j", dilation=1), (alpha * (y * y).sum("k")).mean("d", keepdim=True)), x.sum("k"))',
        '@op(x="k d", y="k d")\ndef comp(x, y, alpha=0.75):\n',
        lambda: [_x(4, 5), _x(4, 5, seed=1)],
    ),
    "a sum of a quotient by factors on two indices (the denominator multiplied out: N x D x D)": (
        'return log(1 + exp(x)).sum("d", keepdim=True) / (2 + tanh(y))',
        '@op(x="n d", y="n d")\ndef comp(x, y):\n',
        lambda: [_x(3, 5), _x(3, 5, seed=1)],
    ),
    "a value written twice, once flattened (the second output read the flattened name)": (
        'return ((x.unfold("n", 1, 1, "j") * y).sum("j")).flatten("n", "d"), (x.unfold("n", 1, 1, "j") * y).sum("j")',
        '@op(x="n d", y="j m")\ndef comp(x, y):\n',
        lambda: [_x(3, 2), _x(1, 4, seed=1)],
    ),
    "an exp of a 0-dim value in a branch (its entry v4() had no free symbols: taken for a number)": (
        'v4 = y @ (y + (y.sum("dk", keepdim=True) + y).sum("dk", keepdim=True))\n'
        '    return apply(lambda u: sympy.Piecewise((u, u > 0), (0.5 * (sympy.exp(u) - 1), True)), v4) + x.sum("n")',
        '@op(x="n d k", y="(d k)")\ndef comp(x, y):\n',
        lambda: [_x(2, 7, 7), torch.full((49,), 0.6, dtype=torch.float64)],
    ),
    "a select between two copies of one max (the value scattered to its argmax cancelled to the number 0)": (
        'return tanh(x), apply(lambda u, v: sympy.Piecewise((u * v, u > v), (u - v, True)), x.max("d"), x.max("d"))',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(2, 3, 4)],
    ),
    "a max over a flattened dim read by a factor free of it (dy summed x against an (N, D*K) one-hot)": (
        'return (x * y).flatten("d", "k").max("dk")',
        '@op(x="n d k", y="n")\ndef comp(x, y):\n',
        lambda: [_x(2, 3, 4), _x(2, seed=1)],
    ),
    "a window's sum gathered, then contracted (its windows copied out at the gathered rows, K x N x J)": (
        'return (((x.pad("n", 1, 1).unfold("n", 2, 1, "j", dilation=2) * y).sum("j")).take(idx, "d")'
        ' @ (x.pad("n", 1, 1).unfold("n", 2, 1, "j", dilation=2) * y).sum("j")).mean("k").sum("d")',
        '@op(x="n d", y="j d", idx="int k")\ndef comp(x, y, idx):\n',
        lambda: [_x(3, 4), _x(2, 4, seed=1), torch.tensor([0, 3, 3, 1, 2])],
    ),
    "a sum written six times inline, its dim renamed (the forward contracted windows with windows: 3x the op's)": (
        'a = lambda: (x.pad("n", 0, 1).unfold("n", 2, 1, "j") * y).sum("j")  # unnamed each time\n'
        '    return ((a() * a() * a()).sum("m") * (a() * a() * a()).sum("m")).sum("n").rename(d="r")',
        '@op(x="n d", y="j m")\ndef comp(x, y):\n',
        lambda: [_x(4, 2), _x(2, 6, seed=1)],
    ),
    "a sqrt branch of a sum's terms (autograd's reference was NaN where the branch is not taken)": (
        'return apply(lambda u: sympy.Piecewise((sympy.sqrt(u + 1) - 1, u > 0), (u / 2, True)), x + x.sum("n", keepdim=True))',
        '@op(x="n d")\ndef comp(x):\n',
        lambda: [_x(6, 5) - 1.5],
    ),
    "a hardtanh of a relu of a max over padded windows (the reference folded the relu into a clamp: gradient 1 at 0)": (
        'm = lambda: apply(lambda u: sympy.Max(u, 0), x.pad("d", 0, 2).unfold("d", 3, 1, "j").max("j"))\n'
        '    return apply(lambda u: sympy.Piecewise((-1.5, u < -1.5), (1.5, u > 1.5), (u, True)), m()).sum("d")',
        '@op(x="n d")\ndef comp(x):\n',
        lambda: [_x(3, 5) - 2.0],
    ),
    "a derivative that is numbers on both sides of a break (torch.where(c, 0, 2): int64, then add_ of a float)": (
        "f = lambda u: sympy.Piecewise((2 * u + 1, u < 0.5), (2.0, True))\n"
        '    return (x.max("d") + apply(f, x.max("d")).sum("n", keepdim=True)).mean("n").sum("k")',
        '@op(x="n d k")\ndef comp(x):\n',
        lambda: [_x(3, 4, 5)],
    ),
    "a sum over a sum of two products of a matrix and a batch (a·b + c·e made whole: N x D x D)": (
        'h = lambda: (x * y * w).sum("d")\n' '    return (((y * y) * h()).sum("k") * h() * x).sum("n"), tanh(w @ y)',
        '@op(x="n d", y="d k", w="d")\ndef comp(x, y, w):\n',
        lambda: [_x(2, 5), _x(5, 3, seed=1), _x(5, seed=2)],
    ),
    "a sum of windowed sums gathered (the sums' rows copied out at every gathered position, K x M x D)": (
        'h = lambda: (x.pad("n", 0, 2).unfold("n", 2, 1, "j", dilation=2) * y).sum("j")\n'
        '    return (h() * y * h()).sum("d").take(idx, "n")',
        '@op(x="n d", y="j d", idx="int k m")\ndef comp(x, y, idx):\n',
        lambda: [_x(2, 3), _x(2, 3, seed=1), torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]])],
    ),
    "a 2-D window's contraction flattened, one factor along the flat dim's first part only (y[j, e, nd.0])": (
        'win = x.pad("d", 0, 4).unfold("d", 3, 1, "j", dilation=2).pad("k", 0, 2).unfold("k", 2, 1, "e", dilation=2)\n'
        '    return (alpha * (win * y).sum("j").sum("e").flatten("n", "d")).take(idx, "k")',
        '@op(x="n d k", y="j e n", idx="int d")\ndef comp(x, y, idx, alpha=0.75):\n',
        lambda: [_x(2, 3, 4), _x(3, 2, 2, seed=1), torch.tensor([3, 0, 1])],
    ),
    "a row sum read at gathered rows beside other gathered reads (the rows copied out whole, D x K x K)": (
        'return (((x * y) * ((y * ((x + y).sum("k", keepdim=True))).take(idx, "n"))).sum("d"))'
        '.pad("k", 0, 1).unfold("k", 2, 1, "j")',
        '@op(x="1 d", y="n d k", idx="int d k")\ndef comp(x, y, idx):\n',
        lambda: [_x(1, 3), _x(2, 3, 4, seed=1), torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]])],
    ),
    "a sum of a max over a middle dim, gathered by an index whose dim is the summed one (x.max(d).sum(k).take)": (
        'return x.max("d").sum("k").take(idx, "n")',
        '@op(x="n d k", idx="int k m")\ndef comp(x, idx):\n',
        lambda: [_x(2, 3, 5), torch.tensor([[0, 1], [1, 1], [0, 0], [1, 0], [0, 1]])],
    ),
    "a window's mean gathered (an index per gathered entry and offset, M x J x N)": (
        'return ((x.pad("d", 1, 0).unfold("d", 2, 1, "j")).mean("j")).take(idx, "d")',
        '@op(x="n d", idx="int m n")\ndef comp(x, idx):\n',
        lambda: [_x(3, 4), torch.tensor([[0, 3, 1], [2, 2, 0], [1, 0, 3], [3, 3, 3], [0, 1, 2]])],
    ),
}


@pytest.mark.parametrize("what", list(REPROS))
def test_a_composition_the_hunt_found(what: str):
    body, header, inputs = REPROS[what]
    d, module = _generated(f"{header}    {body}\n")
    given = inputs()
    _check_module(d, module, given, lambda shape: _x(*shape, seed=3), _largest_written(d, given))
    _no_blow_up_at_larger_sizes(d, module)
    for shape in _ONE_HOT.findall("\n".join(d.code.backward)):  # none along two dims (item 4)
        assert "," not in shape.strip().rstrip(","), "\n".join(d.code.backward)


def test_a_gather_of_a_contraction_with_a_pooled_factor_makes_nothing_larger_than_its_forward():
    """``Σ_{k,m} dout[k, m, n]·x[n, idx[k, m], k2]·δ(p, j + idx[k, m])``: ``x`` read at the position
    the delta routes to is read at ``p - j`` (dout alone scattered, then its windows added back), not
    gathered into a ``[K, M, N, K]`` copy (found by the pool2d construct; 1-D here)."""
    d, module = _generated(
        '@op(x="n d k", idx="int k m")\ndef comp(x, idx):\n'
        '    out = (x * x.pad("d", 0, 2).unfold("d", 3, 1, "j").sum("j")).sum("k").take(idx, "d")\n'
        "    return out\n"
    )
    idx = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    _check_module(d, module, [_x(3, 5, 4), idx], lambda shape: _x(*shape, seed=1))
