"""Affine layers."""

from ..tensor import op


@op(x="n i", W="i o", b="o")
def linear(x, W, b):
    """x @ W + b."""
    out = x @ W + b
    return out
