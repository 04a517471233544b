"""Readable index notation for expressions: ``x[n, d]``, ``Σ_n(...)``, ``δ(c, target[n])``."""

from __future__ import annotations

import re

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .indexalg import entry_indices, entry_name, is_entry

_CONCRETE_ENTRY = re.compile(r"^(\w+)\[([\d,]+)\]$")


class IndexStrPrinter(StrPrinter):
    """SymPy's str printer with tensor entries in brackets and deltas as δ."""

    def _print_Function(self, expr: sympy.Expr) -> str:
        if is_entry(expr):
            idx = entry_indices(expr)
            return entry_name(expr) + (f"[{', '.join(self._print(i) for i in idx)}]" if idx else "")
        return super()._print_Function(expr)

    def _print_KroneckerDelta(self, expr: sympy.Expr) -> str:
        return f"δ({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_Dummy(self, expr: sympy.Dummy) -> str:
        return expr.name


class IndexLatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer with tensor entries as subscripted names."""

    def _print_Function(self, expr: sympy.Expr, exp: str | None = None) -> str:
        if is_entry(expr):
            name = entry_name(expr).replace("_", r"\_")
            idx = entry_indices(expr)
            body = rf"\mathrm{{{name}}}" + (f"_{{{','.join(self._print(i) for i in idx)}}}" if idx else "")
            return f"{body}^{{{exp}}}" if exp else body
        return super()._print_Function(expr, exp)

    def _print_Symbol(self, expr: sympy.Symbol, style: str = "plain") -> str:
        # an entry at concrete indices, named like ``x[0,1]`` (the --small view): \mathrm{x}_{0,1}
        m = _CONCRETE_ENTRY.match(expr.name)
        if m:
            name = m.group(1).replace("_", r"\_")
            return rf"\mathrm{{{name}}}_{{{m.group(2)}}}"
        return super()._print_Symbol(expr, style)

    def _print_KroneckerDelta(self, expr: sympy.Expr, exp: str | None = None) -> str:
        body = rf"\delta_{{{self._print(expr.args[0])},{self._print(expr.args[1])}}}"
        return f"{body}^{{{exp}}}" if exp else body


_TEXT = IndexStrPrinter()
_LATEX = IndexLatexPrinter({"mul_symbol": "dot"})


def text(e: sympy.Basic) -> str:
    """One-line Unicode notation of an index expression (a long rational, from a float the user
    wrote, as that float)."""
    return _TEXT.doprint(e.xreplace(_long_rationals(e)))


def is_long(r: sympy.Rational) -> bool:
    """Whether ``r`` is too long to read as ``p/q`` (a float the user wrote, kept exact by apply)."""
    return max(len(str(abs(r.p))), len(str(r.q))) > 8


def _long_rationals(e: sympy.Basic) -> dict[sympy.Basic, sympy.Basic]:
    """Each long rational, mapped to a symbol named for its float value (Python's ``p / q``)."""
    return {r: (-1 if r < 0 else 1) * sympy.Symbol(repr(abs(r.p) / r.q)) for r in e.atoms(sympy.Rational) if is_long(r)}


def latex(e: sympy.Basic) -> str:
    """LaTeX notation of an index expression."""
    return _LATEX.doprint(e)
