"""Lowering: simplified index expressions to vectorised PyTorch code, in three passes.

- :mod:`.plan`: the order of a contraction's pairwise steps (no intermediate outgrows the forward);
- :mod:`.share`: forward values the backward reads, costly sub-expressions computed once;
- :mod:`.printer` and :mod:`.lowerer`: torch code for each statement (matmuls, scatters of
  values, PyTorch's kink conventions).

:func:`lower_program` runs them for one op.
"""

from .code import ChainTerm, Code, lower_program, lower_terms
from .lowerer import Lowerer, Val, size_variables
from .printer import TorchCodePrinter

__all__ = ["ChainTerm", "Code", "Lowerer", "TorchCodePrinter", "Val", "lower_program", "lower_terms", "size_variables"]
