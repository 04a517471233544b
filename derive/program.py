"""The forward program: named tensors and statements in index form, the deriver's input."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .indexalg import (
    ArgMax,
    Dim,
    dim_named_by_size,
    Flat,
    IMax,
    ISum,
    entry,
    entry_indices,
    entry_name,
    is_entry,
    is_index,
    substitute_indices,
)

Layout = tuple[Dim | None, ...]


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor of the program: its layout (None marks a size-1 axis) and dtype kind."""

    name: str
    layout: Layout
    is_int: bool = False
    const: bool = False  # a float input that gets no gradient

    @property
    def differentiable(self) -> bool:
        return not self.is_int and not self.const

    @property
    def dims(self) -> tuple[Dim, ...]:
        """The named (semantic) dims, in layout order."""
        return tuple(d for d in self.layout if d is not None)

    @property
    def indices(self) -> tuple[sympy.Symbol, ...]:
        """Canonical index symbols, one per dim."""
        return tuple(d.index() for d in self.dims)

    def at(self, indices: tuple[sympy.Basic, ...] | None = None) -> sympy.Expr:
        """The entry of this tensor at ``indices`` (canonical ones by default)."""
        return entry(self.name, self.indices if indices is None else indices)

    def shape_text(self) -> str:
        """Human-readable shape such as ``N x D`` or ``1 x H``."""
        if not self.layout:
            return "scalar"
        return " x ".join("1" if d is None else str(d.size) for d in self.layout)


@dataclass(frozen=True)
class Statement:
    """``name[indices] = expr``: one forward statement in index notation."""

    target: TensorInfo
    expr: sympy.Expr
    source: str = ""

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def kind(self) -> str:
        """The statement's kind, for the printed derivation."""
        if self.expr.has(IMax):
            return "max"
        entries = _entries(self.expr)
        if any(any(is_entry(i) for i in e.args) for e in entries):
            return "gather"
        if any(any(is_window_index(i) for i in e.args) for e in entries):
            return "window"
        if self.expr.has(Flat):
            return "reshape"
        if self.expr.has(ISum):
            sums = [s for s in sympy.preorder_traversal(self.expr) if isinstance(s, ISum)]
            if any(len([f for f in sympy.Mul.make_args(s.body) if is_entry(f)]) > 1 for s in sums):
                return "contraction"
            return "sum"
        return "elementwise"

    def at(self, indices: tuple[sympy.Basic, ...]) -> sympy.Expr:
        """The statement's right-hand side with its free indices replaced by ``indices``."""
        mapping = dict(zip(self.target.indices, indices))
        return substitute_indices(self.expr, mapping)


def is_window_index(i: sympy.Basic) -> bool:
    """An index that is an affine expression of indices: a window's ``t*2 + k`` or a padding's ``t - 4``."""
    return (
        isinstance(i, (sympy.Add, sympy.Mul))
        and not i.has(Flat)
        and not any(is_entry(a) for a in sympy.preorder_traversal(i))
        and bool(i.free_symbols)
        and all(is_index(s) for s in i.free_symbols)
    )


def _names(e: sympy.Expr) -> set[str]:
    from .indexalg import tensor_names

    return tensor_names(e)


def _entries(e: sympy.Expr) -> set[sympy.Basic]:
    return {a for a in sympy.preorder_traversal(e) if is_entry(a)}


@dataclass(frozen=True)
class Param:
    """A scalar parameter kept symbolic (eps); a keyword argument of the generated code."""

    name: str
    default: float

    @property
    def symbol(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, positive=True)


@dataclass(frozen=True)
class Program:
    """A traced forward op: inputs, parameters, statements in order, and the outputs' names."""

    name: str
    inputs: tuple[TensorInfo, ...]
    params: tuple[Param, ...]
    statements: tuple[Statement, ...]
    outputs: tuple[str, ...]
    doc: str = ""
    ties: tuple[tuple[str, str], ...] = ()  # (s, t): input dim s renamed from t, so S must equal T
    stable_forward: bool = False  # compute log(exp-products) in the stabler rewritten form
    # the dims of every tensor the op as written makes, unnamed ones too: what a generated
    # intermediate may span (never larger than the forward the user wrote)
    written: tuple[tuple[Dim, ...], ...] = ()

    @property
    def output(self) -> str:
        """The first (usually the only) output."""
        return self.outputs[0]

    @property
    def several_outputs(self) -> bool:
        return len(self.outputs) > 1

    def seed_name(self, output: str) -> str:
        """The name of the gradient the caller gives for ``output``: ``dout``, or ``dc_given`` when
        statements read ``c`` too (then ``dc`` is that plus what flows back from them)."""
        read = any(output in _names(s.expr) for s in self.statements)
        return f"d{output}_given" if read else f"d{output}"

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        out = {t.name: t for t in self.inputs}
        out.update({s.name: s.target for s in self.statements})
        return out

    @property
    def definitions(self) -> dict[str, Statement]:
        return {s.name: s for s in self.statements}

    @property
    def differentiable_inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.inputs if t.differentiable)

    @property
    def dims(self) -> tuple[Dim, ...]:
        """Every dim that appears, inputs first, in order of appearance."""
        seen: dict[str, Dim] = {}
        for t in list(self.inputs) + [s.target for s in self.statements]:
            for d in t.dims:
                for part in d.parts or (d,):
                    seen.setdefault(part.name, part)
                seen.setdefault(d.name, d)
        return tuple(seen.values())

    @property
    def index_dims(self) -> dict[str, Dim]:
        """For each integer input, the dim its values index (from the gathers that read it), a
        flattened one included: ``x[idx.0, idx.1]`` reads ``idx`` as a position in ``(n d)``."""
        out: dict[str, Dim] = {}
        parts: dict[str, dict[int, Dim]] = {}
        tensors = self.tensors
        for stmt in self.statements:
            for e in sympy.preorder_traversal(stmt.expr):
                if not is_entry(e) or entry_name(e) not in tensors:
                    continue
                src = tensors[entry_name(e)]
                for pos, i in enumerate(entry_indices(e)):
                    if is_entry(i):
                        out[entry_name(i)] = src.dims[pos]
                    elif isinstance(i, Flat) and is_entry(i.args[0]):
                        parts.setdefault(entry_name(i.args[0]), {})[int(i.args[1])] = src.dims[pos]
        for name, by_part in parts.items():
            if name not in out:
                dims = tuple(by_part[p] for p in sorted(by_part))
                out[name] = Dim("".join(d.name for d in dims), parts=dims)
        return out

    @property
    def size_dims(self) -> tuple[Dim, ...]:
        """The dims with a size of their own, the sizes verification and generated code choose."""
        tied = {s for s, _ in self.ties}
        return tuple(d for d in self.dims if d.owns_size and d.name not in tied)

    def tie(self, sizes: dict[str, int]) -> dict[str, int]:
        """``sizes`` with every tied dim given its partner's size, lengthened where needed so that
        every window or padding made from a dim has at least two positions."""
        ties = dict(self.ties)

        def root(name: str) -> str:
            return root(ties[name]) if name in ties else name

        by_name = {d.name: d for d in self.dims}

        def size_of(name: str, sizes: dict[str, int]) -> int | None:
            """A plain dim's given size, or a window's count from its source's (None if neither)."""
            dim = by_name.get(name)
            if name in sizes or dim is None or dim.derived is None:
                return sizes.get(name)
            return derived_size(dim, sizes)

        def tied(sizes: dict[str, int]) -> dict[str, int]:
            partners = {s: size_of(root(s), sizes) for s in ties}
            return {**sizes, **{s: n for s, n in partners.items() if n is not None}}

        sizes = tied(sizes)
        derived = [d for d in self.dims if d.derived is not None]
        for _ in range(256):
            short = [d for d in derived if derived_size(d, sizes) < 2]
            if not short:
                break
            for d in short:
                for sym in d.derived.free_symbols:  # type: ignore[union-attr]
                    sizes[root(dim_named_by_size(sym.name))] += 1
            sizes = tied(sizes)
        return sizes


def derived_size(d: Dim, sizes: dict[str, int]) -> int:
    """The size of a window's or padding's dim at concrete sizes of the plain dims."""
    assert d.derived is not None
    return int(d.derived.xreplace({s: sympy.Integer(sizes[dim_named_by_size(s.name)]) for s in d.derived.free_symbols}))


__all__ = ["ArgMax", "Layout", "Param", "Program", "Statement", "TensorInfo", "derived_size", "is_window_index"]
