"""User-style compositions: layers written only in the op language, as a user would, from the README.

None of these is in the catalogue: they are what derive's lowering must handle well for code it
has never seen. Each case pairs the op with the same computation in PyTorch's own ops, whose
autograd backward is the reference, at sizes where the work dominates (>= 1024 rows, >= 256
features).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F

from derive import apply, exp, log, op

relu = lambda u: sympy.Max(u, 0)  # noqa: E731 - how a user writes it
silu = lambda u: u / (1 + sympy.exp(-u))  # noqa: E731
gelu = lambda u: u / 2 * (1 + sympy.erf(u / sympy.sqrt(2)))  # noqa: E731


@op(x="n i", W1="i h", b1="h", W2="h o", b2="o", y="n o")
def mlp_mse(x, W1, b1, W2, b2, y):
    """A two-layer ReLU MLP with a squared loss, in one expression."""
    loss = ((apply(relu, x @ W1 + b1) @ W2 + b2 - y) ** 2).mean("o").mean("n")
    return loss


@op(x="n i", W="i h", V="i h")
def gated(x, W, V):
    """A gated linear unit: silu(x @ W) * (x @ V)."""
    out = apply(silu, x @ W) * (x @ V)
    return out


@op(x="b t c")
def max_middle(x):
    """Max over a middle dim."""
    out = x.max("t")
    return out


@op(x="n d", gamma="d", beta="d")
def layernorm_gelu(x, gamma, beta, eps=1e-5):
    """Layer norm followed by the erf GELU, the norm written out."""
    mean = x.mean("d", keepdim=True)
    diff = x - mean
    var = (diff**2).mean("d", keepdim=True)
    xhat = diff * (var + eps) ** -0.5
    out = apply(gelu, gamma * xhat + beta)
    return out


@op(a="n c", b="n c")
def kl_softmax(a, b):
    """KL(softmax(a) || softmax(b)) per row, averaged: log-softmaxes written with exp, sum and log."""
    la = a - a.max("c", keepdim=True)
    la = la - log(exp(la).sum("c", keepdim=True))
    lb = b - b.max("c", keepdim=True)
    lb = lb - log(exp(lb).sum("c", keepdim=True))
    loss = (exp(la) * (la - lb)).sum("c").mean("n")
    return loss


@op(q="n d", k="m d", v="m e")
def attention(q, k, v):
    """Softmax attention written with broadcast-and-sum (no matmul in sight)."""
    s = (q * k).sum("d") * q.size("d") ** -0.5
    p = exp(s - s.max("m", keepdim=True))
    p = p / p.sum("m", keepdim=True)
    out = (p * v).sum("m")
    return out


@op(x="n d", y="const n d")
def smooth_l1(x, y, beta=1.0):
    """The smooth L1 loss as a Piecewise of x - y, |x - y| written twice."""
    huber = lambda u: sympy.Piecewise(
        (u**2 / (2 * beta), sympy.Abs(u) < beta), (sympy.Abs(u) - beta / 2, True)
    )  # noqa: E731
    loss = apply(huber, x - y).mean(("n", "d"))
    return loss


@op(x="n d")
def mish(x):
    """x · tanh(softplus(x)), written out."""
    out = apply(lambda u: u * sympy.tanh(sympy.log(1 + sympy.exp(u))), x)
    return out


@op(x="n d")
def elu(x, alpha=1.0):
    """The ELU as a Piecewise, exp(u) - 1 in its branch u <= 0."""
    out = apply(lambda u: sympy.Piecewise((u, u > 0), (alpha * (sympy.exp(u) - 1), True)), x)
    return out


@op(x="n d")
def hardtanh(x):
    """A clip to [-1, 1] as a Piecewise of three branches (its backward's condition is an Or)."""
    out = apply(lambda u: sympy.Piecewise((-1, u < -1), (1, u > 1), (u, True)), x)
    return out


@op(x="n d")
def hardswish(x):
    """The hardswish as a Piecewise: its middle branch u(u + 3)/6 squares."""
    out = apply(lambda u: sympy.Piecewise((0, u <= -3), (u, u >= 3), (u * (u + 3) / 6, True)), x)
    return out


@op(x="n d")
def celu(x, alpha=1.0):
    """The CELU written with max and min: max(0, u) + min(0, alpha·(exp(u/alpha) - 1))."""
    out = apply(lambda u: sympy.Max(0, u) + sympy.Min(0, alpha * (sympy.exp(u / alpha) - 1)), x)
    return out


@op(x="n d")
def leaky_mm(x):
    """A leaky relu written with max and min: max(u, 0) + 0.01·min(u, 0)."""
    out = apply(lambda u: sympy.Max(u, 0) + 0.01 * sympy.Min(u, 0), x)
    return out


@op(x="b t c", w="k c")
def depthwise_conv(x, w):
    """A depthwise conv over time (kernel 3, padded: a Mamba/ConvNeXt block's), as windows times weights."""
    out = (x.pad("t", 1, 1).unfold("t", 3, 1, "k") * w).sum("k")
    return out


@op(x="n h w c")
def max_pool2d(x):
    """A 2x2 max pool, stride 2, over the two spatial dims of a channels-last image."""
    out = x.unfold("h", 2, 2, "kh").unfold("w", 2, 2, "kw").max("kh").max("kw")
    return out


# -- the same computations in PyTorch's own ops ------------------------------------------------
def _mlp_mse(x, W1, b1, W2, b2, y):  # noqa: ANN001, ANN202
    return ((F.relu(x @ W1 + b1) @ W2 + b2 - y) ** 2).mean()


def _gated(x, W, V):  # noqa: ANN001, ANN202
    return F.silu(x @ W) * (x @ V)


def _max_middle(x):  # noqa: ANN001, ANN202
    return x.max(1).values


def _layernorm_gelu(x, gamma, beta, eps=1e-5):  # noqa: ANN001, ANN202
    return F.gelu(F.layer_norm(x, (x.shape[1],), gamma, beta, eps))


def _kl_softmax(a, b):  # noqa: ANN001, ANN202
    return F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), reduction="batchmean", log_target=True)


def _attention(q, k, v):  # noqa: ANN001, ANN202
    return torch.softmax(q @ k.T / q.shape[1] ** 0.5, 1) @ v


def _smooth_l1(x, y, beta=1.0):  # noqa: ANN001, ANN202
    return F.smooth_l1_loss(x, y, beta=beta)


def _mish(x):  # noqa: ANN001, ANN202
    return F.mish(x)


def _elu(x, alpha=1.0):  # noqa: ANN001, ANN202
    return F.elu(x, alpha)


def _hardtanh(x):  # noqa: ANN001, ANN202
    return F.hardtanh(x)


def _hardswish(x):  # noqa: ANN001, ANN202
    return F.hardswish(x)


def _celu(x, alpha=1.0):  # noqa: ANN001, ANN202
    return F.celu(x, alpha)


def _leaky_mm(x):  # noqa: ANN001, ANN202
    return F.leaky_relu(x, 0.01)


def _depthwise_conv(x, w):  # noqa: ANN001, ANN202
    return F.conv1d(x.transpose(1, 2), w.T[:, None, :], padding=1, groups=x.shape[2]).transpose(1, 2)


def _max_pool2d(x):  # noqa: ANN001, ANN202
    return F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


@dataclass(frozen=True)
class Composition:
    """One benchmarked composition: the op, its PyTorch twin, and input shapes by input name."""

    name: str
    op: object
    torch_fn: Callable[..., torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    params: tuple[tuple[str, float], ...] = ()

    @property
    def shape_text(self) -> str:
        return " ".join(f"{k}={'x'.join(map(str, s))}" for k, s in self.shapes.items())

    def inputs(self, g: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(s, generator=g) for s in self.shapes.values()]


COMPOSITIONS = {
    c.name: c
    for c in [
        Composition(
            "mlp_mse",
            mlp_mse,
            _mlp_mse,
            {"x": (1024, 256), "W1": (256, 256), "b1": (256,), "W2": (256, 64), "b2": (64,), "y": (1024, 64)},
        ),
        Composition("gated", gated, _gated, {"x": (1024, 256), "W": (256, 512), "V": (256, 512)}),
        Composition("max_middle", max_middle, _max_middle, {"x": (256, 64, 256)}),
        Composition(
            "layernorm_gelu",
            layernorm_gelu,
            _layernorm_gelu,
            {"x": (2048, 1024), "gamma": (1024,), "beta": (1024,)},
            (("eps", 1e-5),),
        ),
        Composition("kl_softmax", kl_softmax, _kl_softmax, {"a": (2048, 1024), "b": (2048, 1024)}),
        Composition("attention", attention, _attention, {"q": (1024, 64), "k": (1024, 64), "v": (1024, 64)}),
        Composition("smooth_l1", smooth_l1, _smooth_l1, {"x": (2048, 1024), "y": (2048, 1024)}, (("beta", 1.0),)),
        Composition("mish", mish, _mish, {"x": (2048, 1024)}),
        Composition("elu", elu, _elu, {"x": (2048, 1024)}, (("alpha", 1.0),)),
        Composition("hardtanh", hardtanh, _hardtanh, {"x": (2048, 1024)}),
        Composition("hardswish", hardswish, _hardswish, {"x": (2048, 1024)}),
        Composition("celu", celu, _celu, {"x": (2048, 1024)}, (("alpha", 1.0),)),
        Composition("leaky_mm", leaky_mm, _leaky_mm, {"x": (2048, 1024)}),
        Composition("depthwise_conv", depthwise_conv, _depthwise_conv, {"x": (32, 512, 256), "w": (3, 256)}),
        Composition("max_pool2d", max_pool2d, _max_pool2d, {"x": (16, 64, 64, 64)}),
    ]
}
SMALL = {  # --quick: the same ops at small sizes
    "mlp_mse": {"x": (64, 16), "W1": (16, 16), "b1": (16,), "W2": (16, 8), "b2": (8,), "y": (64, 8)},
    "gated": {"x": (64, 16), "W": (16, 32), "V": (16, 32)},
    "max_middle": {"x": (8, 6, 16)},
    "layernorm_gelu": {"x": (64, 32), "gamma": (32,), "beta": (32,)},
    "kl_softmax": {"a": (64, 32), "b": (64, 32)},
    "attention": {"q": (32, 8), "k": (32, 8), "v": (32, 8)},
    "smooth_l1": {"x": (64, 32), "y": (64, 32)},
    "mish": {"x": (64, 32)},
    "elu": {"x": (64, 32)},
    "hardtanh": {"x": (64, 32)},
    "hardswish": {"x": (64, 32)},
    "celu": {"x": (64, 32)},
    "leaky_mm": {"x": (64, 32)},
    "depthwise_conv": {"x": (2, 16, 8), "w": (3, 8)},
    "max_pool2d": {"x": (2, 8, 6, 4)},
}


@functools.lru_cache(maxsize=None)
def generated(name: str):  # noqa: ANN201
    """The derivation and the generated module of a composition (derived in-process, not written)."""
    from derive import derive
    from derive.emit import render
    from derive.verify import load_module

    d = derive(COMPOSITIONS[name].op)
    return d, load_module(render(d), name)


__all__ = ["COMPOSITIONS", "SMALL", "Composition", "generated"]
