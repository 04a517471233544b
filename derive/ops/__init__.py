"""The catalogue: every op here is only its forward definition."""

from __future__ import annotations

from ..tensor import Op
from . import activations, embedding, lecture, linear, losses, normalisation, transformer

_MODULES = (linear, activations, embedding, losses, normalisation, lecture, transformer)


def catalogue() -> dict[str, Op]:
    """All catalogue ops by name, in a stable order.

    Example:
        >>> "batchnorm" in catalogue()
        True
    """
    ops: dict[str, Op] = {}
    for module in _MODULES:
        for value in vars(module).values():
            if isinstance(value, Op):
                ops[value.name] = value
    return ops
