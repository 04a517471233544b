"""The op language: symbolic tensors with named dims; calling an op records its forward program.

An op is a plain Python function decorated with :func:`op`, whose inputs are declared by dim
names. Elementwise arithmetic broadcasts by name, any SymPy scalar function applies elementwise,
reductions and contractions name their dim, and ``take`` gathers with an integer tensor.
Python variable names inside the op become the names of the intermediates.

Example:
    >>> import sympy
    >>> from derive import op, apply
    >>> @op(x="n d")
    ... def softplus(x):
    ...     return apply(lambda u: sympy.log(1 + sympy.exp(u)), x)
    >>> softplus.program().statements[0].name
    'out'
"""

from __future__ import annotations

import functools
import inspect
import linecache
import keyword
import re
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sympy

from .errors import NotDifferentiableError, OpDefinitionError
from .indexalg import Dim, Flat, IMax, ISum, entry, fresh_index
from .materialize import boundaries, synthetic_name
from .program import Layout, Param, Program, Statement, TensorInfo

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_NO_DERIVATIVE = (sympy.floor, sympy.ceiling, sympy.sign, sympy.frac, sympy.Heaviside, sympy.DiracDelta)


@functools.lru_cache(maxsize=None)
def _in_package(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_PACKAGE_DIR)


def _in_library(filename: str) -> bool:
    """Whether ``filename`` is derive's, SymPy's or torch's: a user's line is found past them
    (``sympy.exp(x)`` and ``F.relu(x)`` reach derive through their frames)."""
    if _in_package(filename):
        return True
    for name in ("sympy", "torch"):
        module = sys.modules.get(name)
        if module is not None and module.__file__ and filename.startswith(str(Path(module.__file__).parent)):
            return True
    return False


def _user_line() -> str:
    """``file:line: code`` of the innermost caller outside the derive package.

    Read with ``linecache``: ``inspect.getframeinfo`` scans every loaded module for each call
    (about 14 ms with torch and sympy loaded), which made tracing an op slower than deriving it.
    """
    frame = sys._getframe(1)
    while frame is not None and _in_library(frame.f_code.co_filename):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    return f"{Path(filename).name}:{lineno}: {linecache.getline(filename, lineno).strip()}"


class _NotASymPyValue(OpDefinitionError, sympy.SympifyError):
    """A derive tensor handed to SymPy: a user's mistake to SymPy's function calls, and to its
    arithmetic the sign to try the other operand's method."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.expr, self.base_exc = message, None

    def __str__(self) -> str:
        return str(self.args[0])


class _Trace:
    """The recording in progress: every tensor created, in order."""

    def __init__(self, op_name: str) -> None:
        self.op_name = op_name
        self.nodes: list[Tensor] = []
        self.bound: set[sympy.Basic] = set()  # indices bound so far in the statement being built
        self.ties: dict[str, str] = {}  # input dim -> the dim whose size it must have (by a rename)
        self.windows: dict[str, int] = {}  # input dim -> the window length it holds (by an unfold)
        self.code: Any = None  # the op function's code object, whose frame holds the names
        self.frame: Any = None  # that function's running frame, found when it makes its first tensor

    def record(self, node: Tensor) -> None:
        """Add a node; the first one made inside the op's function finds that function's frame."""
        self.nodes.append(node)
        frame = sys._getframe(2) if self.frame is None and self.code is not None else None
        while frame is not None and frame.f_code is not self.code:
            frame = frame.f_back
        self.frame = self.frame or frame

    def bind(self, d: Dim, idx: dict[Dim, sympy.Basic]) -> sympy.Symbol:
        """A new bound index for dim ``d``, unused anywhere in the statement (no shadowing)."""
        k = fresh_index(d, _all_symbols(idx) | self.bound)
        self.bound.add(k)
        return k

    def renamed(self, d: Dim, new: str) -> Dim:
        """The dim ``new`` with ``d``'s size: one the op already has (an input's dim is tied to ``d``'s size)."""
        owner = self.root(str(d.size_of or d.name))
        for x in (x for n in self.nodes for x in n.dims if x.name == new):
            if self.root(str(x.size_of or x.name)) == owner:
                return x
            if not x.owns_size:
                raise self.error(f"rename to {new!r}: the op already has a dim '{new}' of another size")
            self.ties[self.root(x.name)] = owner
            return x
        return Dim(new, size_of=owner)

    def window_dim(self, name: str, size: int) -> Dim:
        """The dim of a window's offsets: one of the op's when it has that name (a conv weight's
        ``k``, whose size must then be ``size``), else a new dim of fixed size."""
        for x in (x for n in self.nodes for x in n.dims if x.name == name):
            if x.fixed == size:
                return x
            if x.owns_size and self.windows.get(name, size) == size:
                self.windows[name] = size  # the op is traced again with this dim's size fixed
                return x
            raise self.error(f"unfold: dim '{name}' has size {x.size}, not the window's {size}")
        return Dim(name, fixed=size)

    def derived_dim(self, d: Dim, size: sympy.Expr, suffix: str) -> Dim:
        """The dim a window or padding makes from ``d``: ``d`` itself when the size is unchanged, a
        dim of the op with that size when there is one (a causal conv keeps ``t``), else a new one
        called ``d``'s name plus ``suffix``, which the user still calls by ``d``'s name."""
        size = sympy.simplify(size)
        dims = [d] + [x for n in self.nodes for x in n.dims if x.label == d.label]
        for x in dims:
            if sympy.simplify(x.size - size) == 0:
                return x
        taken = {x.name for n in self.nodes for x in n.dims}
        name = d.name + suffix
        while name in taken:
            name += suffix
        return Dim(name, derived=size, alias=d.label)

    def root(self, name: str) -> str:
        """The dim whose size ``name``'s size is, following ties."""
        while name in self.ties:
            name = self.ties[name]
        return name

    def error(self, message: str, source: str | None = None) -> OpDefinitionError:
        where = source if source is not None else _user_line()
        suffix = f" (at {where})" if where else ""
        return OpDefinitionError(f"op '{self.op_name}': {message}{suffix}")


@dataclass(eq=False)
class Tensor:
    """A symbolic tensor: a layout of named dims and a rule giving its entry at any indices."""

    trace: _Trace
    layout: Layout
    build: Callable[[dict[Dim, sympy.Basic]], sympy.Expr]
    is_int: bool = False
    name: str | None = None
    source: str = ""
    materialized: bool = False
    operands: tuple[Tensor, ...] = field(default=())
    kind: str = "elementwise"  # input, elementwise, sum, max, contraction, gather, reshape, window, pad
    const: bool = False  # an input declared "const ...": no gradient flows to it
    body: sympy.Expr | None = None  # elementwise: the scalar function of ``dummies``, one per operand
    dummies: tuple[sympy.Symbol, ...] = field(default=())

    def __post_init__(self) -> None:
        self.trace.record(self)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """A torch function cannot read a symbolic tensor: say what to write instead."""
        found = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, Tensor)]
        name = getattr(func, "__name__", str(func))
        message = (
            f"torch.{name} cannot take a derive tensor: inside an op, write the function with derive's "
            "exp, log, tanh, sqrt or erf, or apply(f, x) with a SymPy function f"
        )
        raise found[0].trace.error(message) if found else OpDefinitionError(message)

    def _sympy_(self) -> sympy.Expr:
        """A SymPy function cannot take a symbolic tensor either (``sympy.exp(x)``): say what to write.

        The error is a ``SympifyError`` too, so SymPy arithmetic (``alpha * x`` with a parameter
        ``alpha``) gives way to the tensor's own (``Tensor.__rmul__``), as for any foreign type."""
        raise _NotASymPyValue(
            str(
                self.trace.error(
                    "a SymPy function cannot take a derive tensor: inside an op, write derive's exp, log, tanh, "
                    "sqrt or erf, or apply(f, x) with the SymPy function f"
                )
            )
        )

    # -- structure -------------------------------------------------------------------------
    @property
    def dims(self) -> tuple[Dim, ...]:
        return tuple(d for d in self.layout if d is not None)

    def dim(self, name: str) -> Dim:
        """The dim called ``name`` (an error naming the dims there are otherwise)."""
        for d in self.dims:
            if d.name == name:
                return d
        for d in self.dims:
            if d.alias == name:
                return d
        have = ", ".join(d.name for d in self.dims) or "none"
        kept = (
            "; a keepdim=True reduction leaves a size-1 axis with no name, which broadcasts but is not"
            " reduced again: reduce without keepdim"
            if None in self.layout
            else ""
        )
        raise self.trace.error(f"{self._label()} has no dim '{name}' (its dims: {have}){kept}")

    def size(self, name: str) -> sympy.Expr:
        """The symbolic size of dim ``name``, e.g. ``N``; usable in arithmetic."""
        return self.dim(name).size

    def ref(self, idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
        """This tensor's entry at ``idx``: a named entry when materialised, its rule otherwise."""
        if self.materialized:
            return entry(self.name or "?", [idx[d] for d in self.dims])
        return self.build(idx)

    def _label(self) -> str:
        return f"tensor '{self.name}'" if self.name else "a tensor"

    # -- elementwise -------------------------------------------------------------------------
    def _binary(self, other: Any, fn: Callable[[sympy.Expr, sympy.Expr], sympy.Expr], swap: bool = False) -> Tensor:
        if isinstance(other, Tensor):
            return apply(fn, other, self) if swap else apply(fn, self, other)
        try:
            const = sympy.sympify(other)
        except (sympy.SympifyError, TypeError):
            raise self.trace.error(f"cannot combine {self._label()} with {type(other).__name__}") from None
        if swap:
            return apply(lambda u: fn(const, u), self)
        return apply(lambda u: fn(u, const), self)

    def __add__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a + b)

    def __radd__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a + b, swap=True)

    def __sub__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a - b)

    def __rsub__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a - b, swap=True)

    def __mul__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a * b)

    def __rmul__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a * b, swap=True)

    def __truediv__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a / b)

    def __rtruediv__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a / b, swap=True)

    def __pow__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a**b)

    def __rpow__(self, o: Any) -> Tensor:
        return self._binary(o, lambda a, b: a**b, swap=True)

    def __neg__(self) -> Tensor:
        return apply(lambda u: -u, self)

    def apply(self, fn: Callable[..., sympy.Expr]) -> Tensor:
        """Apply a SymPy scalar function elementwise: ``x.apply(sympy.tanh)``."""
        return apply(fn, self)

    # -- reductions ------------------------------------------------------------------------
    def _reduce(self, name: str, node: type, keepdim: bool) -> Tensor:
        d = self.dim(name)
        self._require_float("reduce")
        layout = (
            tuple((None if x == d else x) for x in self.layout) if keepdim else tuple(x for x in self.layout if x != d)
        )

        def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
            k = self.trace.bind(d, idx)
            return node(self.ref({**idx, d: k}), k)

        kind = "max" if node is IMax else "sum"
        return Tensor(self.trace, layout, build, source=_user_line(), operands=(self,), kind=kind)

    def sum(self, dim: str | tuple[str, ...], keepdim: bool = False) -> Tensor:
        """Sum over dim ``dim``, or over each of several (``x.sum(("t", "d"))``); ``keepdim`` leaves
        a size-1 axis in the place of each."""
        out = self
        for name in self._reduced(dim, "sum"):
            out = out._reduce(name, ISum, keepdim)
        return out

    def max(self, dim: str, keepdim: bool = False) -> Tensor:
        """Maximum over dim ``dim``; its gradient goes to the argmax."""
        if isinstance(dim, (tuple, list)):
            first = dim[0] if dim else "t"
            raise self.trace.error(
                f'max takes one dim; a max over several is a max of maxes: x.max("{first}").max(...)'
            )
        return self._reduce(dim, IMax, keepdim)

    def mean(self, dim: str | tuple[str, ...], keepdim: bool = False) -> Tensor:
        """Mean over dim ``dim``, or over several: the sum divided by the dims' sizes."""
        count = sympy.Mul(*(self.size(name) for name in self._reduced(dim, "mean")))
        return self.sum(dim, keepdim) * (1 / count)

    def _reduced(self, dim: str | tuple[str, ...], what: str) -> tuple[str, ...]:
        """The dims a reduction names: one, or a non-empty tuple of them."""
        names = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if not names:
            raise self.trace.error(f'{what} needs at least one dim name, e.g. x.{what}("n")')
        return names

    # -- contraction, gather, reshape -------------------------------------------------------
    def __matmul__(self, other: Tensor) -> Tensor:
        """Contract the one dim both tensors share, wherever it stands: ``x "n i" @ w "o i"`` is ``"n o"``."""
        if not isinstance(other, Tensor):
            raise self.trace.error(f"cannot matmul {self._label()} with {type(other).__name__}")
        shared = [d for d in self.dims if d in other.dims]
        if len(shared) != 1:
            names = ", ".join(f"'{d.name}'" for d in shared)
            detail = (
                f'share dims {names}: say which to contract, e.g. a.matmul(b, over="{shared[-1].name}")'
                if shared
                else f"share no dim to contract over ({self._label()} has {_quoted(self)}; {other._label()} has {_quoted(other)})"
            )
            raise self.trace.error(f"matmul: {self._label()} and {other._label()} {detail}")
        return self.matmul(other, over=shared[0].name)

    def matmul(self, other: Tensor, over: str | tuple[str, ...]) -> Tensor:
        """Contract the dims ``over`` (one name or several) with ``other``; other shared dims are batch dims.

        ``q "b n d"``, ``k "b m d"``: ``q.matmul(k, over="d")`` is ``"b n m"``.
        """
        if not isinstance(other, Tensor):
            raise self.trace.error(f"cannot matmul {self._label()} with {type(other).__name__}")
        self._require_float("matmul")
        other._require_float("matmul")
        names = (over,) if isinstance(over, str) else tuple(over)
        for side in (self, other):
            missing = [n for n in names if n not in {d.name for d in side.dims}]
            if missing:
                have = ", ".join(d.name for d in side.dims) or "none"
                windowed = [d for d in side.dims if d.alias == missing[0]]
                hint = (
                    f"; its '{windowed[0].name}' is the windows cut from '{missing[0]}', a dim of another size:"
                    f' rename it (.rename({missing[0]}="p")) and give the other tensor that dim p'
                    if windowed
                    else ""
                )
                raise self.trace.error(
                    f"matmul over {missing[0]!r}: {side._label()} has no such dim (its dims: {have}){hint}"
                )
        contracted = [self.dim(n) for n in names]
        batch = [d for d in self.dims if d in other.dims and d not in contracted]
        layout = tuple(x for x in self.layout if x not in contracted) + tuple(
            x for x in other.layout if x is not None and x not in contracted and x not in batch
        )

        def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
            inner = dict(idx)
            bound = []
            for d in contracted:
                k = self.trace.bind(d, inner)
                inner[d] = k
                bound.append(k)
            body = self.ref(inner) * other.ref(inner)
            for k in reversed(bound):
                body = ISum(body, k)
            return body

        return Tensor(self.trace, layout, build, source=_user_line(), operands=(self, other), kind="contraction")

    def take(self, index: Tensor, dim: str) -> Tensor:
        """Gather along ``dim`` with integer ``index``; dims shared with ``index`` are matched by name.

        ``C.take(X, "v")`` picks embedding rows (``C[X]``); ``logp.take(y, "c")`` picks one
        entry per row (``logp[range(n), y]``).
        """
        d = self.dim(dim)
        if not isinstance(index, Tensor) or not index.is_int:
            raise self.trace.error(f"gather from {self._label()} needs an integer index tensor (declare it 'int ...')")
        shared = set(index.dims)
        layout = index.layout + tuple(x for x in self.layout if x is not None and x != d and x not in shared)

        def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
            picked = index.ref({k: v for k, v in idx.items() if k in shared})
            return self.ref({**idx, d: picked})

        return Tensor(self.trace, layout, build, source=_user_line(), operands=(self, index), kind="gather")

    def __getitem__(self, index: Tensor) -> Tensor:
        """``C[X]``: gather rows along the first dim."""
        if not self.layout or self.layout[0] is None:
            raise self.trace.error(f"{self._label()} has no leading named dim to index")
        return self.take(index, self.layout[0].name)

    def flatten(self, *names: str) -> Tensor:
        """Merge adjacent dims into one (``emb.flatten("t", "e")`` is ``emb.view(n, -1)``)."""
        dims = tuple(self.dim(n) for n in names)
        pos = [self.layout.index(d) for d in dims]
        if pos != list(range(pos[0], pos[0] + len(pos))) or len(dims) < 2:
            raise self.trace.error(f"flatten needs two or more adjacent dims of {self._label()}, got {names}")
        merged = product_dim(*dims)
        if merged in self.layout:
            raise self.trace.error(
                f"flatten{names}: {self._label()} already has a dim '{merged.name}' (an earlier flatten of the"
                f" same dims); rename one of them first"
            )
        layout = self.layout[: pos[0]] + (merged,) + self.layout[pos[-1] + 1 :]

        def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
            f = idx[merged]
            return self.ref({**idx, **{d: Flat(f, p) for p, d in enumerate(dims)}})

        return Tensor(self.trace, layout, build, source=_user_line(), operands=(self,), kind="reshape")

    def rename(self, **names: str) -> Tensor:
        """The same tensor with dims renamed, sizes unchanged: ``x.rename(t="s")``.

        Self-attention compares positions ``t`` with positions ``s`` of one sequence; a square
        weight ``U "j k"`` applies to ``h.rename(k="j")``. The backward renames back.
        """
        mapping: dict[Dim, Dim] = {}
        for old, new in names.items():
            d = self.dim(old)
            _check_identifier(self.trace.op_name, "dim name", new)
            if d.parts or d.fixed is not None:
                raise self.trace.error(f"rename {old}={new!r}: only a plain dim can be renamed")
            if new in {x.name for x in self.dims if x != d}:
                raise self.trace.error(f"rename {old}={new!r}: {self._label()} already has a dim '{new}'")
            mapping[d] = self.trace.renamed(d, new)
        layout = tuple(None if x is None else mapping.get(x, x) for x in self.layout)

        def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
            return self.ref({**idx, **{old: idx[new] for old, new in mapping.items()}})

        return Tensor(
            self.trace, layout, build, is_int=self.is_int, source=_user_line(), operands=(self,), kind="rename"
        )

    def unfold(self, dim: str, size: int, step: int, new: str, dilation: int = 1) -> Tensor:
        """Sliding windows along ``dim``, PyTorch's ``Tensor.unfold`` by name: ``dim`` becomes the
        window positions and a new dim ``new`` of length ``size`` is added last; the entry at
        position ``t``, offset ``k`` is ``x[..., t*step + k*dilation, ...]``.

        ``x "n t c"``: ``x.unfold("t", 3, 1, "k").matmul(W, over=("k", "c"))`` is a conv1d.
        """
        d = self.dim(dim)
        for what, value in (("size", size), ("step", step), ("dilation", dilation)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise self.trace.error(f"unfold {dim!r}: {what} must be a positive integer, got {value!r}")
        _check_identifier(self.trace.op_name, "dim name", new)
        if new in {x.label for x in self.dims}:
            raise self.trace.error(f"unfold {dim!r}: {self._label()} already has a dim '{new}'")
        span = dilation * (size - 1) + 1
        if d.size.is_number and span > d.size:
            raise self.trace.error(f"unfold {dim!r}: a window spans {span} positions but dim '{d.label}' has {d.size}")
        positions = self.trace.derived_dim(d, sympy.floor((d.size - span) / sympy.Integer(step)) + 1, "w")
        k = self.trace.window_dim(new, size)
        layout = tuple(positions if x == d else x for x in self.layout) + (k,)

        def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
            return self.ref({**idx, d: idx[positions] * step + idx[k] * dilation})

        return Tensor(self.trace, layout, build, source=_user_line(), operands=(self,), kind="window")

    def pad(self, dim: str, left: int, right: int) -> Tensor:
        """Zero-pad ``dim`` with ``left`` entries before and ``right`` after (``F.pad`` by name).

        ``x.pad("t", 4, 0).unfold("t", 3, 1, "k", dilation=2)`` is a causal dilated window.
        """
        d = self.dim(dim)
        for what, value in (("left", left), ("right", right)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise self.trace.error(f"pad {dim!r}: {what} must be a non-negative integer, got {value!r}")
        self._require_float("pad")
        padded = self.trace.derived_dim(d, d.size + left + right, "p")
        layout = tuple(padded if x == d else x for x in self.layout)

        def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
            return self.ref({**idx, d: idx[padded] - left})  # out of range reads zero

        return Tensor(self.trace, layout, build, source=_user_line(), operands=(self,), kind="pad")

    def _require_float(self, what: str) -> None:
        if self.is_int:
            raise self.trace.error(f"{what} of integer {self._label()}: only gathers may use integer tensors")


def _quoted(t: Tensor) -> str:
    return ", ".join(f"'{d.name}'" for d in t.dims) or "no dims"


def product_dim(*dims: Dim) -> Dim:
    """The dim made by flattening ``dims`` (written ``(t e)`` in an input spec)."""
    return Dim("".join(d.name for d in dims), parts=tuple(dims))


def _all_symbols(idx: dict[Dim, sympy.Basic]) -> set[sympy.Basic]:
    """Every index symbol in use at ``idx`` (free or bound), so a new bound index avoids them all."""
    from .indexalg import bound_indices

    out: set[sympy.Basic] = set()
    for v in idx.values():
        out |= v.free_symbols | bound_indices(v)
    return out


def _broadcast(tensors: list[Tensor]) -> Layout:
    """The layout of an elementwise result: by name; the operand holding every dim sets the order."""
    names: list[Dim] = []
    for t in sorted(tensors, key=lambda t: -len(t.dims)):
        for d in t.dims:
            clash = next((x for x in names if x.label == d.label and x != d), None)
            if clash is not None:
                raise t.trace.error(
                    f"dim '{d.label}' has size {clash.size} on one side and {d.size} on the other"
                    " (a window or padding changed it)"
                )
            if d not in names:
                names.append(d)
    for t in tensors:
        if set(t.dims) == set(names):
            return t.layout
    return tuple(names)


def apply(fn: Callable[..., Any], *tensors: Tensor) -> Tensor:
    """Apply a scalar function elementwise, broadcasting the tensors by dim name.

    ``fn`` takes SymPy scalars and returns a SymPy expression: ``sympy.tanh``,
    ``lambda a, b: a * b``, ``lambda u: sympy.log(1 + sympy.exp(u))``.
    """
    trace = tensors[0].trace
    for t in tensors:
        t._require_float("elementwise arithmetic")
    dummies = [sympy.Dummy(f"u{k}", real=True) for k in range(len(tensors))]
    try:
        body = sympy.sympify(fn(*dummies))
    except (TypeError, sympy.SympifyError, AttributeError) as exc:
        raise trace.error(f"elementwise function failed on symbols: {exc}") from None
    if not isinstance(body, sympy.Expr):
        raise trace.error(f"elementwise function returned {type(body).__name__}, not a SymPy expression")
    body = body.xreplace({f: sympy.Rational(repr(float(f))) for f in body.atoms(sympy.Float)})
    for f in body.atoms(sympy.core.function.AppliedUndef):
        raise trace.error(f"elementwise function uses {f}, an undefined SymPy function: derive cannot differentiate it")
    if body.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise trace.error(f"the expression is infinite or undefined ({body}: a division by zero?)")
    for f in body.atoms(sympy.Function):
        if isinstance(f, _NO_DERIVATIVE) and f.has(*dummies):  # (a size's floor is a constant)
            raise NotDifferentiableError(
                f"op '{trace.op_name}': {type(f).__name__} has no derivative (it is piecewise constant)"
                f" (at {_user_line()})"
            )
    for p in body.atoms(sympy.Piecewise):
        if p.args[-1].cond != sympy.true and sympy.simplify(sympy.Or(*(c for _, c in p.args))) != sympy.true:
            shown = p.xreplace(dict(zip(dummies, _parameter_symbols(fn, len(dummies)))))
            raise trace.error(
                f"{shown} has no value where none of its conditions holds (NaN there): end it with (value, True)"
            )
    missing = _without_torch_code(body, dummies)
    if missing:
        raise trace.error(f"elementwise function uses {missing}, which has no PyTorch function derive can write")
    layout = _broadcast(list(tensors))

    def build(idx: dict[Dim, sympy.Basic]) -> sympy.Expr:
        return body.xreplace({u: t.ref(idx) for u, t in zip(dummies, tensors)})

    return Tensor(trace, layout, build, source=_user_line(), operands=tuple(tensors), body=body, dummies=tuple(dummies))


def _parameter_symbols(fn: Callable[..., Any], count: int) -> list[sympy.Symbol]:
    """Symbols named as ``fn``'s parameters (``lambda u, v: ...``), to show its expression as written."""
    try:
        names = list(inspect.signature(fn).parameters)[:count]
    except (TypeError, ValueError):
        names = []
    names += [f"u{k}" for k in range(len(names), count)]
    return [sympy.Symbol(n) for n in names]


def _without_torch_code(body: sympy.Expr, dummies: list[sympy.Dummy]) -> str | None:
    """The first function of ``body`` or of its derivatives that derive cannot print as torch code
    (``LambertW``, ``besselj``, ``gamma``: no torch kernel), or None."""
    symbols = tuple(sympy.Symbol(f"u{k}", real=True) for k in range(len(dummies)))
    return _unprintable(body.xreplace(dict(zip(dummies, symbols))), symbols)


@functools.lru_cache(maxsize=256)
def _unprintable(body: sympy.Expr, symbols: tuple[sympy.Symbol, ...]) -> str | None:
    """:func:`_without_torch_code` of one function as written, once per function (a layer applies its
    activation many times; each apply has fresh dummies, so the cache sees it with plain symbols)."""
    import torch

    from .lowering.printer import PRINTER

    for e in [body] + [sympy.diff(body, u) for u in symbols if body.has(u)]:
        try:
            code = PRINTER.doprint(e)
        except (NotImplementedError, OpDefinitionError) as exc:
            return f"{e} ({exc})"
        if "Not supported" in code:  # SymPy's printer lists what it could not print, as comments
            return ", ".join(
                dict.fromkeys(line.strip("# ") for line in code.splitlines()[1:] if line.startswith("  #"))
            )
        for name in re.findall(r"\btorch(?:\.\w+)+", code):
            owner: Any = torch
            for part in name.split(".")[1:]:
                owner = getattr(owner, part, None)
            if owner is None:
                return f"{name} (not in this PyTorch)"
    return None


def _elementwise(fn: Callable[..., sympy.Expr]) -> Callable[[Any], Any]:
    def wrapped(x: Any) -> Any:
        """A tensor's entries mapped by ``fn``; a number, size or parameter mapped alone
        (``sqrt(q.size("d"))`` is the scalar ``sqrt(D)``)."""
        return apply(fn, x) if isinstance(x, Tensor) else fn(sympy.sympify(x))

    wrapped.__name__ = getattr(fn, "__name__", "fn")
    wrapped.__doc__ = (
        f"Elementwise ``{wrapped.__name__}`` (SymPy's), e.g. ``{wrapped.__name__}(x)``; "
        f"of a number or size, that number's."
    )
    return wrapped


tanh = _elementwise(sympy.tanh)
exp = _elementwise(sympy.exp)
log = _elementwise(sympy.log)
sqrt = _elementwise(sympy.sqrt)
erf = _elementwise(sympy.erf)


# -- input specs and tracing ------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """A declared input: ``"n d"``, ``"1 h"`` (size-1 axis), ``"int n t"``, ``"(t e) h"``, ``"const n m"``.

    ``int``: an integer tensor (gather indices); ``const``: a float tensor that gets no gradient
    (a mask, a fixed table).
    """

    name: str
    layout: Layout
    is_int: bool
    const: bool = False

    @staticmethod
    def parse(op_name: str, name: str, text: str, taken: Collection[str] = ()) -> InputSpec:
        """Read ``text``; a dim whose size would be called by a name in ``taken`` (a weight ``W``
        beside a width ``w``) gets ``size_w`` instead."""
        if not isinstance(text, str):
            raise OpDefinitionError(
                f"op '{op_name}': input '{name}' spec {text!r} is not a string: write its dims as one, like 'n d'"
            )
        if text.count("(") != text.count(")"):
            raise OpDefinitionError(f"op '{op_name}': input '{name}' spec '{text}' has an unclosed '('")
        words = text.replace("(", " ( ").replace(")", " ) ").split()
        is_int = bool(words) and words[0] == "int"
        const = bool(words) and words[0] == "const"
        words = words[1:] if is_int or const else words
        meant = _keyword_meant(words[0]) if words else None
        if meant is not None:  # "Int n", "ints n t", or "const int n"
            raise OpDefinitionError(
                f"op '{op_name}': input '{name}' spec '{text}': '{words[0]}' reads as the keyword '{meant}', "
                + (
                    "but an input is int or const, not both"
                    if is_int or const
                    else f"which is written '{meant}' (lower case, first); a dim cannot have that name"
                )
            )
        layout: list[Dim | None] = []
        group: list[Dim] | None = None
        for w in words:
            if w == "(":
                group = []
            elif w == ")":
                if not group or len(group) < 2:
                    raise OpDefinitionError(
                        f"op '{op_name}': input '{name}' spec '{text}': '( )' needs two or more dims"
                    )
                layout.append(product_dim(*group))
                group = None
            elif w == "1":
                layout.append(None)
            elif w.isidentifier() and not keyword.iskeyword(w) and w.isascii():
                (group if group is not None else layout).append(Dim(w, size_name=_size_name(w, taken)))
            else:
                ascii_hint = "" if w.isascii() else " (ASCII letters, digits and _)"
                raise OpDefinitionError(
                    f"op '{op_name}': input '{name}' spec '{text}': '{w}' is not a dim name{ascii_hint}"
                )
        names = [d.name for d in layout if d is not None]
        if len(set(names)) != len(names):
            raise OpDefinitionError(f"op '{op_name}': input '{name}' spec '{text}' repeats a dim")
        if len({n.upper() for n in names}) != len(names):  # the size of n is N: n and N would share one
            raise OpDefinitionError(
                f"op '{op_name}': input '{name}' spec '{text}' has dims that differ only in case; their sizes "
                "would share one name: rename one"
            )
        return InputSpec(name, tuple(layout), is_int, const)


_KEYWORD_SPELLINGS = {"int": "int", "ints": "int", "integer": "int", "integers": "int", "const": "const"}
_KEYWORD_SPELLINGS |= {"consts": "const", "constant": "const", "constants": "const", "cosnt": "const", "cnst": "const"}


def _keyword_meant(word: str) -> str | None:
    """The spec keyword (``int``, ``const``) a first word was probably meant to be (``Int``, ``ints``,
    ``constant``, or the other keyword right after one); None for a plain dim name."""
    return _KEYWORD_SPELLINGS.get(word.lower())


def _size_name(dim: str, taken: Collection[str]) -> str | None:
    """None for the usual size name (``N`` for ``n``); ``size_n`` when a parameter is called ``N``."""
    if dim.upper() not in taken:
        return None
    name = f"size_{dim}"
    while name in taken:
        name += "_"
    return name


@dataclass
class Op:
    """A forward op: a Python function plus the dims of its inputs. ``program()`` traces it."""

    fn: Callable[..., Any]
    specs: dict[str, str]
    name: str
    sizes: dict[str, int] = field(default_factory=dict)
    stable_forward: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def program(self) -> Program:
        """Trace the op into its forward program."""
        return trace_op(self)


def op(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    sizes: dict[str, int] | None = None,
    stable_forward: bool = False,
    **specs: str,
) -> Callable[[Callable[..., Any]], Op]:
    """Declare a forward op; each keyword names an input and its dims.

    ``sizes`` optionally gives example dim sizes used when verifying (``{"n": 32}``).
    ``stable_forward=True`` lets the generated forward compute ``log`` of a product of
    exponentials in a rewritten form that cannot underflow (the printed derivation says where);
    by default the forward computes exactly what the op says.

    Example:
        >>> from derive import op
        >>> @op(x="n d", w="d")
        ... def scale(x, w):
        ...     return x * w
        >>> [t.name for t in scale.program().inputs]
        ['x', 'w']
    """

    if callable(fn):  # written @op with no parentheses: no input has dims
        raise OpDefinitionError(
            f"op '{getattr(fn, '__name__', fn)}': @op needs the dims of each input, like @op(x=\"n d\")"
        )

    def wrap(fn: Callable[..., Any]) -> Op:
        return Op(fn, dict(specs), fn.__name__, dict(sizes or {}), stable_forward)

    return wrap


def _check_identifier(op_name: str, what: str, name: str) -> None:
    if not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise OpDefinitionError(f"op '{op_name}': {what} '{name}' is not a valid Python identifier")


def trace_op(the_op: Op, fixed: dict[str, int] | None = None) -> Program:
    """Run the op on symbolic inputs and turn what it built into a :class:`Program`.

    An input dim that an ``unfold`` uses for its window offsets (a conv weight's ``k``) has the
    window's length: the op is traced again with that dim's size ``fixed``.
    """
    name = the_op.name
    _check_identifier(name, "op name", name)
    if name.startswith("__"):  # generated/__init__.py is the package's own
        raise OpDefinitionError(f"op '{name}': a name starting with '__' is reserved (the module would be {name}.py)")
    sig = inspect.signature(the_op.fn)
    trace = _Trace(name)
    args: list[Any] = []
    inputs: list[TensorInfo] = []
    params: list[Param] = []
    unknown = set(the_op.specs) - set(sig.parameters)
    if unknown:
        raise OpDefinitionError(f"op '{name}': @op declares {sorted(unknown)} but the function has no such parameter")
    for p in sig.parameters.values():
        _check_identifier(name, "parameter", p.name)
        if p.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY):
            raise OpDefinitionError(
                f"op '{name}': parameter '{p.name}' is {'variadic' if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else 'keyword-only'}; "
                "declare each input and parameter as a plain positional parameter"
            )
        if p.name in the_op.specs:
            spec = InputSpec.parse(name, p.name, the_op.specs[p.name], taken=sig.parameters)
            if fixed:
                layout = tuple(Dim(d.name, fixed=fixed[d.name]) if d and d.name in fixed else d for d in spec.layout)
                spec = InputSpec(spec.name, layout, spec.is_int, spec.const)
            t = Tensor(
                trace,
                spec.layout,
                lambda idx: sympy.S.Zero,
                is_int=spec.is_int,
                name=p.name,
                materialized=True,
                kind="input",
                const=spec.const,
            )
            args.append(t)
            inputs.append(TensorInfo(p.name, spec.layout, spec.is_int, spec.const))
        elif p.default is not inspect.Parameter.empty and isinstance(p.default, (int, float)):
            if not p.default > 0:  # SymPy would read sqrt(s**2) as s, and derive a step of s*u as one of u
                raise OpDefinitionError(
                    f"op '{name}': parameter '{p.name}' defaults to {p.default!r}, but scalar parameters must be "
                    f"positive (derive treats them as positive symbols); write a negative one as -{p.name}"
                )
            param = Param(p.name, float(p.default))
            params.append(param)
            args.append(param.symbol)
        else:
            raise OpDefinitionError(
                f"op '{name}': input '{p.name}' has no dims declared in @op(...) and no numeric default"
            )
    declared = {p.name for t in inputs for d in t.layout if d is not None for p in (d.parts or (d,))}
    if len({n.upper() for n in declared}) != len(declared):  # the size of n is N: n and N would share one
        raise OpDefinitionError(
            f"op '{name}': dims {sorted(declared)} include two that differ only in case; their sizes would share "
            "one name: rename one"
        )
    result, local_names = _run_capturing_locals(trace, the_op.fn, args)
    results = list(result) if isinstance(result, (tuple, list)) and result else [result]
    for r in results:
        if not isinstance(r, Tensor):
            raise OpDefinitionError(f"op '{name}': returned {type(r).__name__}, not a tensor (or a tuple of tensors)")
        if r.is_int:
            raise OpDefinitionError(f"op '{name}': returns an integer tensor; nothing to differentiate")
        if r.kind == "input":
            raise OpDefinitionError(f"op '{name}': returns its input '{r.name}' unchanged; nothing to differentiate")
    if len({id(r) for r in results}) != len(results):
        raise OpDefinitionError(f"op '{name}': returns the same tensor twice")
    if not any(not (t.is_int or t.const) for t in inputs):
        raise OpDefinitionError(
            f"op '{name}': every input is 'int' or 'const', so nothing gets a gradient; declare one as a plain float input"
        )
    if trace.windows and not fixed:
        return trace_op(the_op, trace.windows)
    return _build_program(the_op, trace, inputs, params, results, local_names)


def _run_capturing_locals(trace: _Trace, fn: Callable[..., Any], args: list[Any]) -> tuple[Any, dict[str, Any]]:
    """Call ``fn`` and read its local variables at return (they name the intermediates).

    The frame is found by the first tensor ``fn`` makes, not by a profile or trace hook, so a
    profiler, debugger or coverage tool running derive keeps working.
    """
    trace.code = getattr(fn, "__code__", None)
    result = fn(*args)
    captured = dict(trace.frame.f_locals) if trace.frame is not None else {}
    trace.frame = None  # a frame holds its locals alive
    return result, captured


def _build_program(
    the_op: Op,
    trace: _Trace,
    inputs: list[TensorInfo],
    params: list[Param],
    results: list[Tensor],
    local_names: dict[str, Any],
) -> Program:
    input_names = {t.name for t in inputs}
    for var, value in local_names.items():
        if isinstance(value, Tensor) and value.name is None and var not in input_names and not var.startswith("_"):
            value.name = var
    taken = input_names | {p.name for p in params} | {n.name for n in trace.nodes if n.name}
    for k, r in enumerate(results, start=1):
        if r.name is None:
            first = "out" if len(results) == 1 and "out" not in taken else f"out{k}"
            r.name = (
                first if first not in taken else next(f"out{j}" for j in range(k, k + 99) if f"out{j}" not in taken)
            )
            taken.add(r.name)
    roles = boundaries(results)
    used = set(input_names)
    statements: list[Statement] = []
    computed: dict[tuple[Any, sympy.Expr], str] = {}  # (layout, right-hand side) -> the statement's name
    for node in trace.nodes:
        if node.materialized or (node.name is None and node not in roles):
            continue
        if node.name is not None:
            if node.name in used:
                raise trace.error(f"two tensors are both called '{node.name}'", node.source)
            _check_identifier(the_op.name, "tensor name", node.name)
            used.add(node.name)
            if not any(_reaches(r, node) for r in results):
                continue
        if node.is_int:
            raise trace.error(f"integer intermediate '{node.name}' is not supported", node.source)
        trace.bound = {d.index() for d in node.dims}
        expr = node.build({d: d.index() for d in node.dims})
        if node.name is None:  # a statement derive makes: one it made already (written twice) is reused
            node.name = computed.get((node.layout, expr)) or synthetic_name(roles[node], taken)
            taken.add(node.name)
            if node.name in used:
                node.materialized = True
                continue
            used.add(node.name)
            # only unnamed values merge: a named tensor's gradient is through its own uses alone
            computed.setdefault((node.layout, expr), node.name)
        statements.append(Statement(TensorInfo(node.name, node.layout), expr, node.source))
        node.materialized = True
    _check_size_names(the_op.name, trace, inputs, params)
    program = Program(
        the_op.name,
        tuple(inputs),
        tuple(params),
        tuple(statements),
        tuple(str(r.name) for r in results),
        the_op.doc,
        tuple(trace.ties.items()),
        the_op.stable_forward,
        tuple(dict.fromkeys(n.dims for n in trace.nodes)),
    )
    _check_generated_names(program)
    return program


_GENERATED_NAMES = {
    "torch",
    "math",
    "itertools",
    "NamedTuple",
    "saved",
    "grad_output",
    "grads",
    "_ctx",
    "register_custom_op",
}


def _check_generated_names(program: Program) -> None:
    """Names the generated module uses itself, and gradient names ``d<name>``, must not be taken."""
    op = program.name
    if op in _GENERATED_NAMES or op == "typing":  # the function would hide the module its own code uses
        raise OpDefinitionError(
            f"op '{op}': the name is taken by a module the generated code uses (its function or file would "
            "hide it); rename the op"
        )
    taken = {f"{op}_Grads", f"{op}_forward", f"{op}_backward", f"{op}_backward_steps", f"{op}_Function", op}
    taken |= _GENERATED_NAMES
    tensors = [t.name for t in program.inputs] + [s.name for s in program.statements]
    for name in tensors + [p.name for p in program.params]:
        if not name.isascii():
            raise OpDefinitionError(
                f"op '{op}': the name '{name}' is not ASCII (letters, digits and _), as the generated code's "
                "names must be; rename that tensor or parameter"
            )
        if name in taken or name.startswith("_"):
            raise OpDefinitionError(
                f"op '{op}': the name '{name}' is used by the generated code itself; rename that tensor or parameter"
            )
    for name in tensors:
        if f"d{name}" in tensors or f"d{name}_given" in tensors:
            raise OpDefinitionError(
                f"op '{op}': tensor 'd{name}' has the name derive gives the gradient of '{name}'; rename it"
            )


def _check_size_names(op_name: str, trace: _Trace, inputs: list[TensorInfo], params: list[Param]) -> None:
    """A dim's size symbol (``N`` for dim ``n``) must not share a name with a tensor or parameter."""
    names = {t.name for t in inputs} | {p.name for p in params} | {n.name for n in trace.nodes if n.name}
    for t in inputs:
        for d in t.dims:
            for part in d.parts or (d,):
                if str(part.size) in names:
                    raise OpDefinitionError(
                        f"op '{op_name}': dim '{part.name}' has size '{part.size}', which is also the name of a "
                        f"tensor or parameter; rename one of them"
                    )


def _reaches(result: Tensor, node: Tensor) -> bool:
    stack, seen = [result], set()
    while stack:
        t = stack.pop()
        if t is node:
            return True
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.extend(t.operands)
    return False
