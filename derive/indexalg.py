"""Index algebra: named dims, index symbols and the index-level SymPy nodes (sums, max, deltas).

Every statement of a forward program, every adjoint and every fused gradient is one SymPy
expression over tensor entries such as ``x(n, d)``; these nodes are the only vocabulary beyond
SymPy's own scalar functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import sympy
from sympy.core.function import AppliedUndef

__all__ = [
    "ArgMax",
    "Dim",
    "Flat",
    "IMax",
    "ISum",
    "Pack",
    "always_within",
    "bound_indices",
    "dim_of",
    "entry",
    "entry_indices",
    "entry_name",
    "free_indices",
    "fresh_index",
    "fresh_indices",
    "position_dim",
    "size_key",
    "is_entry",
    "is_index",
    "may_read_past",
    "positions_in_range",
    "tensor_names",
]

_DIMS: dict[str, Dim] = {}
_TIES: dict[str, str] = {}
_SIZE_NAMES: dict[str, str] = (
    {}
)  # a size renamed because a tensor had its name: size_w -> w  # the op being derived: dim -> the dim whose size it must have


@dataclass(frozen=True)
class Dim:
    """A named dimension. ``parts`` is non-empty for a dim made by flattening others;
    ``size_of`` names the dim whose size a renamed dim has (``x.rename(t="s")``: ``S`` is ``T``);
    ``derived`` is the size of a dim a window or padding made from another (``T + 4``,
    ``floor((T - 3)/2) + 1``), and ``alias`` the name the user calls it by (``t``). ``size_name``
    replaces the size's usual name (``W`` for ``w``) when a tensor or parameter has that name."""

    name: str
    parts: tuple[Dim, ...] = field(default=())
    fixed: int | None = None
    size_of: str | None = None
    derived: sympy.Expr | None = None
    alias: str | None = None
    size_name: str | None = None

    @property
    def owns_size(self) -> bool:
        """Whether this dim has a size variable of its own (not flattened, fixed, renamed or derived)."""
        return not self.parts and self.fixed is None and self.size_of is None and self.derived is None

    @property
    def label(self) -> str:
        """The name the user calls this dim by."""
        return self.alias or self.name

    def __post_init__(self) -> None:
        _DIMS[self.name] = self
        if self.size_name:
            _SIZE_NAMES[self.size_name] = self.name

    @property
    def size(self) -> sympy.Expr:
        """The symbolic size: ``N`` for dim ``n``; a product for a flattened dim."""
        if self.fixed is not None:
            return sympy.Integer(self.fixed)
        if self.derived is not None:
            return self.derived
        if self.parts:
            return sympy.Mul(*(p.size for p in self.parts))
        if self.size_of is not None:
            return _DIMS[self.size_of].size
        return sympy.Symbol(self.size_name or self.name.upper(), integer=True, positive=True)

    def index(self, k: int = 0) -> sympy.Symbol:
        """The k-th index symbol ranging over this dim: ``n``, ``n2``, ``n3``..."""
        name = self.name if k == 0 else f"{self.name}{k + 1}"
        _DIMS[name] = self
        return sympy.Symbol(name, integer=True)

    def __repr__(self) -> str:
        return f"Dim({self.name!r})"


def use_dims(dims: Iterable[Dim], ties: Iterable[tuple[str, str]] = ()) -> None:
    """Make index symbols named after ``dims`` (``k``, ``k2``...) mean these dims again, and
    ``ties`` (``(s, t)``: dim ``s`` has ``t``'s size, checked at run time) the op's ties.

    Index symbols are found by name, so a later op with a dim of the same name but another size
    (``k`` of a window is 3, another op's ``k`` is ``K``) would change what an earlier
    derivation's symbols mean; checking that derivation afterwards calls this first.
    """
    _TIES.clear()
    _TIES.update(ties)
    for d in dims:
        for key in [k for k in _DIMS if k == d.name or (k.startswith(d.name) and k[len(d.name) :].isdigit())]:
            _DIMS[key] = d
        _DIMS[d.name] = d


def tied_size(sym: sympy.Basic) -> sympy.Expr:
    """The size of the dim index ``sym`` ranges over, as the dim it is tied to names it: an input's
    ``i`` renamed onto from ``d`` (``h.rename(d="i")`` beside ``W "i d"``) has ``D``."""
    name, seen = dim_of(sym).name, set()
    while name in _TIES and name not in seen:
        seen.add(name)
        name = _TIES[name]
    return _DIMS[name].size


def dim_of(sym: sympy.Basic) -> Dim:
    """The dim an index symbol ranges over."""
    return _DIMS[sym.name if isinstance(sym, sympy.Symbol) else str(sym)]


def dim_named_by_size(size: str) -> str:
    """The name of the dim whose size symbol is called ``size``: ``n`` for ``N``, ``w`` for ``size_w``."""
    return _SIZE_NAMES.get(size, size.lower())


def is_index(e: sympy.Basic) -> bool:
    """True for a plain index symbol (not a size, a parameter or a compound index)."""
    # the name first: printing a symbol, or asking its assumptions, costs far more
    return isinstance(e, sympy.Symbol) and e.name in _DIMS and e.is_integer is True and e.is_positive is None


def fresh_index(dim: Dim, avoid: Iterable[sympy.Basic]) -> sympy.Symbol:
    """The first index symbol of ``dim`` not in ``avoid``."""
    taken = set(avoid)
    k = 0
    while dim.index(k) in taken:
        k += 1
    return dim.index(k)


def fresh_indices(dims: Iterable[Dim], avoid: Iterable[sympy.Basic]) -> tuple[sympy.Symbol, ...]:
    """Distinct fresh index symbols, one per dim."""
    taken = set(avoid)
    out = []
    for d in dims:
        s = fresh_index(d, taken)
        taken.add(s)
        out.append(s)
    return tuple(out)


class _Bound(sympy.Function):
    """A node binding an index: ``args = (body, index)``."""

    nargs = 2

    @property
    def body(self) -> sympy.Expr:
        return self.args[0]

    @property
    def var(self) -> sympy.Symbol:
        return self.args[1]


class ISum(_Bound):
    """``Σ_k body``: the sum of ``body`` over the whole range of index ``k``."""

    def _sympystr(self, printer) -> str:
        return f"Σ_{printer._print(self.var)}({printer._print(self.body)})"

    def _latex(self, printer) -> str:
        return rf"\sum_{{{printer._print(self.var)}}} \left({printer._print(self.body)}\right)"


class IMax(_Bound):
    """``max_k body``: the maximum of ``body`` over index ``k``."""

    def _sympystr(self, printer) -> str:
        return f"max_{printer._print(self.var)}({printer._print(self.body)})"

    def _latex(self, printer) -> str:
        return rf"\max_{{{printer._print(self.var)}}} \left({printer._print(self.body)}\right)"


class ArgMax(_Bound):
    """``argmax_k body``: the (first) index where ``body`` is largest; an integer."""

    is_integer = True

    def _sympystr(self, printer) -> str:
        return f"argmax_{printer._print(self.var)}({printer._print(self.body)})"

    def _latex(self, printer) -> str:
        return rf"\operatorname{{argmax}}_{{{printer._print(self.var)}}} \left({printer._print(self.body)}\right)"


class Pack(sympy.Function):
    """The index of a flattened dim made from the indices of its parts: ``(t, e)``."""

    is_integer = True

    @classmethod
    def eval(cls, *args):
        # (f.0, f.1, ...) packs the parts of one flattened index back into it
        if args and all(isinstance(a, Flat) and a.args[0] == args[0].args[0] for a in args):
            if [int(a.args[1]) for a in args] == list(range(len(args))):
                return args[0].args[0]
        return None

    def _sympystr(self, printer) -> str:
        return "(" + ",".join(printer._print(a) for a in self.args) + ")"

    def _latex(self, printer) -> str:
        return "(" + ",".join(printer._print(a) for a in self.args) + ")"


class Flat(sympy.Function):
    """Coordinate ``p`` of an index ``f`` of a flattened dim: ``Flat(Pack(t, e), 0) = t``."""

    nargs = 2
    is_integer = True

    @classmethod
    def eval(cls, f, p):
        if isinstance(f, Pack):
            return f.args[int(p)]
        return None

    def _sympystr(self, printer) -> str:
        return f"{printer._print(self.args[0])}.{int(self.args[1])}"


def size_key(d: Dim) -> str:
    """What tells two plain dims' lengths apart: their size (a renamed dim has its source's)."""
    return str(d.size)


def position_dim(a: sympy.Basic) -> Dim | None:
    """The dim ``a`` is a position in, when it shows: an index of it, or an argmax over it."""
    if is_index(a):
        return dim_of(a)
    if isinstance(a, ArgMax):
        return dim_of(a.var)
    return None


_ENTRY_CLASSES: dict[str, type] = {}


def always_within(e: sympy.Expr, size: sympy.Expr) -> bool:
    """Whether the affine index expression ``e`` lies in ``[0, size)`` for every value of its indices."""
    lo = hi = sympy.S.Zero
    for term in sympy.Add.make_args(sympy.expand(e)):
        coeff, rest = term.as_coeff_Mul()
        if rest == 1:
            lo, hi = lo + coeff, hi + coeff
        elif is_index(rest):
            top = coeff * (dim_of(rest).size - 1)
            lo, hi = (lo, hi + top) if coeff > 0 else (lo + top, hi)
        else:
            return False
    return bool(sympy.simplify(lo).is_nonnegative) and bool(sympy.simplify(size - 1 - hi).is_nonnegative)


def may_read_past(i: sympy.Basic, d: Dim) -> bool:
    """Whether the plain index ``i`` may point past the end of dim ``d``: ``v[np]`` read at a
    padding's position, where ``v`` has no entry (it reads 0 there)."""
    if not is_index(i) or d.parts or (d.derived is None and dim_of(i).derived is None):
        return False  # only a window or padding changes a length (a rename's tie does not)
    return not always_within(i, d.size)


def positions_in_range(match: dict[sympy.Wild, sympy.Basic], dims: dict[sympy.Wild, sympy.Symbol]) -> bool:
    """Whether every index wildcard is bound to a position its dim has: SymPy's ``match`` may solve
    ``2*j + n = n2`` with ``j = n2/2``, which is no entry of the statement."""
    for w, s in dims.items():
        v = match.get(w)
        if v is None or (is_index(v) and (dim_of(v) == dim_of(s) or tied_size(v) == tied_size(s))):
            continue  # unbound, or an index of the same dim (or of one tied to it: h.rename(d="e"))
        if not is_index(v) and (not all(is_index(a) for a in v.free_symbols) or tensor_names(v) or v.has(_Bound)):
            continue  # a gathered position (target[n], an argmax)
        if not (v.is_integer and always_within(v, dim_of(s).size)):
            return False
    return True


def entry(name: str, indices: Iterable[sympy.Basic] = ()) -> sympy.Expr:
    """The entry ``name(i, j, ...)`` of a named tensor at the given indices."""
    cls = _ENTRY_CLASSES.get(name)
    if cls is None:
        cls = _ENTRY_CLASSES[name] = sympy.Function(name)
    return cls(*indices)


def is_entry(e: sympy.Basic) -> bool:
    """True for a tensor entry ``x(i, j)``."""
    return isinstance(e, AppliedUndef)


def entry_name(e: sympy.Basic) -> str:
    return type(e).__name__


def entry_indices(e: sympy.Basic) -> tuple[sympy.Basic, ...]:
    return tuple(e.args)


def free_indices(e: sympy.Basic) -> set[sympy.Symbol]:
    """Index symbols that occur free (not bound by a sum, max or argmax) in ``e``."""
    if is_index(e):
        return {e}  # type: ignore[arg-type]
    if isinstance(e, _Bound):
        return free_indices(e.body) - {e.var}
    out: set[sympy.Symbol] = set()
    for a in e.args:
        out |= free_indices(a)
    return out


def bound_indices(e: sympy.Basic) -> set[sympy.Symbol]:
    """Index symbols bound anywhere inside ``e``."""
    out: set[sympy.Symbol] = set()
    if isinstance(e, _Bound):
        out.add(e.var)
    for a in e.args:
        out |= bound_indices(a)
    return out


def tensor_names(e: sympy.Basic) -> set[str]:
    """Names of the tensors whose entries ``e`` reads."""
    return {entry_name(a) for a in e.atoms(AppliedUndef)}


def rename_bound(e: sympy.Expr, avoid: set[sympy.Symbol]) -> sympy.Expr:
    """Rename bound indices of ``e`` that clash with ``avoid`` (capture-avoiding substitution)."""
    if not isinstance(e, sympy.Basic) or not e.args:
        return e
    if isinstance(e, _Bound):
        var = e.var
        body = e.body
        if var in avoid:
            new = fresh_index(dim_of(var), avoid | free_indices(body) | bound_indices(body))
            body = body.xreplace({var: new})
            var = new
        return type(e)(rename_bound(body, avoid | {var}), var)
    return e.func(*(rename_bound(a, avoid) for a in e.args))


def substitute_indices(e: sympy.Expr, mapping: dict[sympy.Symbol, sympy.Basic]) -> sympy.Expr:
    """Replace free indices by index expressions without capturing them in inner sums."""
    avoid: set[sympy.Symbol] = set()
    for v in mapping.values():
        avoid |= free_indices(v) if isinstance(v, sympy.Basic) else set()
    avoid |= set(mapping)
    return rename_bound(e, avoid).xreplace(mapping)
