"""Elementwise activations: each is only its forward definition."""

import sympy

from ..tensor import apply, op


@op(x="n d")
def tanh(x):
    """Hyperbolic tangent, elementwise."""
    out = apply(sympy.tanh, x)
    return out


@op(x="n d")
def sigmoid(x):
    """Logistic sigmoid, 1 / (1 + exp(-x))."""
    out = apply(lambda u: 1 / (1 + sympy.exp(-u)), x)
    return out


@op(x="n d")
def relu(x):
    """max(x, 0); its derivative at 0 follows PyTorch (0)."""
    out = apply(lambda u: sympy.Max(u, 0), x)
    return out


@op(x="n d")
def gelu(x):
    """GELU, tanh approximation (PyTorch's approximate='tanh')."""
    c = sympy.sqrt(2 / sympy.pi)
    out = apply(lambda u: u / 2 * (1 + sympy.tanh(c * (u + sympy.Rational(44715, 1000000) * u**3))), x)
    return out


@op(x="n d")
def silu(x):
    """x * sigmoid(x)."""
    out = apply(lambda u: u / (1 + sympy.exp(-u)), x)
    return out


@op(x="n d")
def softplus(x):
    """log(1 + exp(x))."""
    out = apply(lambda u: sympy.log(1 + sympy.exp(u)), x)
    return out
