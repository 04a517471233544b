"""derive: backward passes derived symbolically, simplified, generated as PyTorch code, verified.

Write an op's forward definition once; derive differentiates it with SymPy, simplifies the
gradient to the compact form a person would write, emits vectorised PyTorch code and checks it
against autograd.

Example:
    >>> import sympy
    >>> from derive import op, apply, derive
    >>> @op(x="n d")
    ... def softplus(x):
    ...     return apply(lambda u: sympy.log(1 + sympy.exp(u)), x)
    >>> d = derive(softplus)
    >>> print(d.formula("x"))
    dx[n, d] = (1 - 1/(exp(x[n, d]) + 1))*dout[n, d]
"""

import sys

from .derivation import Derivation, derive
from .errors import DeriveError, NotDifferentiableError, OpDefinitionError, UnknownOpError, VerificationError
from .ops import catalogue
from .tensor import Op, Tensor, apply, erf, exp, log, op, sqrt, tanh
from .tutor import check

__all__ = [
    "Derivation",
    "DeriveError",
    "NotDifferentiableError",
    "Op",
    "OpDefinitionError",
    "Tensor",
    "UnknownOpError",
    "VerificationError",
    "apply",
    "catalogue",
    "check",
    "derive",
    "erf",
    "exp",
    "log",
    "op",
    "show_in_notebooks",
    "sqrt",
    "tanh",
]
__version__ = "0.1.0"


def show_in_notebooks() -> bool:
    """In IPython or Jupyter, display a :class:`Derivation` as its Markdown report, maths typeset.

    Runs on ``import derive``; the record itself knows no printer (the report stage reads it).
    Returns whether a running IPython shell was found.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if shell is None:
        return False
    from .report import render

    shell.display_formatter.formatters["text/markdown"].for_type(Derivation, lambda d: render(d, "markdown"))
    return True


show_in_notebooks()
