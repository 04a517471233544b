"""Row blocks: a fused backward that streams a large batch through the cache, a block of rows at a time.

Eager PyTorch makes one pass over memory per operation, so a backward of eight elementwise
passes over a 4096x1024 batch reads it from memory eight times. Done on blocks of rows that fit
in the cache, each pass after a block's first reads the cache instead. This module plans that:
which dim the blocks cut (the batch dim, ``n``), and in which sweep over the blocks each value
is computed.

- A sum over ``n`` (``dgamma[d] = Σ_n dout[n, d]·xhat[n, d]``) is a partial sum per block, added
  up; a value that reads the whole sum waits for the next sweep (batch norm's ``dx`` reads the
  sums of ``dout`` and ``dout·xhat`` over the batch: two sweeps).
- A gradient along ``n`` is computed block by block, into its rows of the whole.
- Any other value (a gradient that reads only whole sums) is computed between the sweeps, once
  the sums it reads are whole.

The generated backward cuts the batch only on a CPU, and only where its tensors along ``n``
outgrow the last-level cache (``CACHE_BYTES``): below it the plain code's passes read the cache.

Blocking is planned only for a backward that sums over the batch: a column sum of a batch larger
than the cache (``dout.sum(0)``) is the slowest pass of the plain code, and as partial sums of
blocks it reads the cache. A backward with no such sum computes each row apart in a few passes
whose first reads come from memory either way; there, measured on a CPU, blocks saved nothing and
writing each block into the whole cost a pass (log-softmax: 1.5 ms plain, 2.1 ms in blocks).
It is also planned only where it is exact and cheap: every tensor along ``n`` is read at its own
row (no gather, shift or window along it), nothing takes a max along it, and every sum over it
is a reduction of one operand's rows, not a matrix product (``x.T @ dh`` over the batch stays one
``@``). The plan changes no formula: it only says where each is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..indexalg import (
    ArgMax,
    Dim,
    Flat,
    IMax,
    ISum,
    Pack,
    dim_of,
    entry,
    entry_indices,
    entry_name,
    free_indices,
    is_entry,
    is_index,
    substitute_indices,
    tensor_names,
)
from ..program import TensorInfo
from .share import canonical_key


@dataclass(frozen=True)
class Value:
    """``name = expr``, laid out like ``target``."""

    name: str
    expr: sympy.Expr
    target: TensorInfo


@dataclass(frozen=True)
class Sweep:
    """One pass over the blocks: its values in order; those named in ``sums`` are added up over blocks,
    those in ``whole`` (along the batch) kept whole for the caller or a later sweep."""

    values: tuple[Value, ...]
    sums: frozenset[str]
    whole: frozenset[str]  # values along the batch written whole, a block's rows at a time


@dataclass(frozen=True)
class Blocking:
    """Where each value of a fused backward is computed when the batch dim ``dim`` is cut into blocks.

    In ``sweeps`` and ``after``, the size of ``dim`` in arithmetic (a mean's ``1/N``) is ``total``,
    the whole batch's; ``dim.size`` itself is a block's row count (shapes).
    """

    dim: Dim
    total: sympy.Symbol
    sweeps: tuple[Sweep, ...]
    # values free of the batch dim, computed between the sweeps: ``between[k]`` after the k-th
    # (before the first for k = 0), once the sums they read are whole
    between: tuple[tuple[Value, ...], ...]
    sums: dict[str, TensorInfo] = field(default_factory=dict)  # every sum over the batch: its layout


def plan(
    values: list[Value],
    layouts: dict[str, TensorInfo],
    dim: Dim | None,
    taken: set[str],
    returned: set[str],
) -> Blocking | None:
    """The sweeps of ``values`` (a fused backward, each value after those it reads) over blocks of
    ``dim``; None where blocking would not be exact or would cut a matrix product. ``taken``: names
    in use; ``returned``: the values the backward returns (a value along the batch is kept whole
    only if returned or read by a later sweep).

    Example:
        >>> n, d = Dim("n"), Dim("d")
        >>> x, g = TensorInfo("x", (n, d)), TensorInfo("g", (d,))
        >>> i, j = n.index(), d.index()
        >>> dg = Value("dg", ISum(entry("dout", [i, j]) * entry("x", [i, j]), i), g)
        >>> dx = Value("dx", entry("dout", [i, j]) * entry("g", [j]) / n.size, x)
        >>> b = plan([dg, dx], {"x": x, "g": g, "dout": TensorInfo("dout", (n, d))}, n, set(), {"dg", "dx"})
        >>> [[v.name for v in s.values] for s in b.sweeps], str(b.sweeps[0].values[1].expr)
        ([['dg', 'dx']], 'dout(n, d)*g(d)/N_all')
    """
    if dim is None or not dim.owns_size or not _blockable(values, layouts, dim):
        return None
    total = sympy.Symbol(f"{dim.size}_all", integer=True, positive=True)
    found: dict[sympy.Expr, tuple[str, tuple[sympy.Symbol, ...]]] = {}
    sums: dict[str, TensorInfo] = {}
    bodies: dict[str, sympy.Expr] = {}
    names = set(taken) | {v.name for v in values}
    # a gradient that is one sum over the batch is that sum, named after the gradient (unless the
    # sum reads another over the batch: hoisting that one changes its key, and it gets a name)
    for v in values:
        if (
            _over(v.expr, dim)
            and set(free_indices(v.expr)) == set(v.target.indices)
            and not any(_over(s, dim) for s in sympy.preorder_traversal(v.expr.body))
        ):
            key, placeholders = canonical_key(v.expr)
            if key not in found:
                found[key] = (v.name, tuple(placeholders[i] for i in v.target.indices))
                sums[v.name] = TensorInfo(v.name, v.target.layout)
    sweep_of: dict[str, int] = {}  # a sum's or a value's along the batch; for others, the sweep they follow
    placed: list[Value] = []  # sums and values along the batch, each after what it reads
    after: list[Value] = []
    done: set[str] = set(sums)  # values whole once their sweep ends (sums, values free of the batch)
    for v in values:
        known = set(bodies)
        e = _hoist(v.expr, dim, found, sums, bodies, names)
        if e is None:
            return None
        for name in [s for s in bodies if s not in known]:  # inner sums first: in the order found
            sweep_of[name] = _sweep(bodies[name], sweep_of, done)
            done.add(name)
            placed.append(Value(name, bodies[name].xreplace({dim.size: total}), sums[name]))
        if v.name in sums:
            continue  # the gradient is a sum placed above
        v = Value(v.name, e.xreplace({dim.size: total}), v.target)
        if dim in v.target.dims:
            sweep_of[v.name] = _sweep(v.expr, sweep_of, done)
            placed.append(v)
        else:  # after the sweeps of what it reads
            sweep_of[v.name] = _sweep(v.expr, sweep_of, done) - 1
            done.add(v.name)
            after.append(v)
    if not sums:
        return None  # rows computed apart in a few passes: blocks save nothing (module docstring)
    count = max([sweep_of[v.name] for v in placed], default=0)
    sweeps = []
    for k in range(1, count + 1):
        inner = tuple(v for v in placed if sweep_of[v.name] == k)
        later = [v.expr for v in placed if sweep_of[v.name] > k] + [v.expr for v in after if sweep_of[v.name] >= k]
        read = set().union(*map(tensor_names, later))
        whole = frozenset(v.name for v in inner if v.name not in sums and (v.name in returned or v.name in read))
        sweeps.append(Sweep(inner, frozenset(v.name for v in inner if v.name in sums), whole))
    between = tuple(tuple(v for v in after if min(sweep_of[v.name], count) == k) for k in range(count + 1))
    return Blocking(dim, total, tuple(sweeps), between, sums)


def _sweep(e: sympy.Expr, sweep_of: dict[str, int], done: set[str]) -> int:
    """The first sweep that can compute ``e``: after the sweeps that make whole the sums and values
    free of the batch it reads (``done``), in or after those of the values along the batch it reads."""
    read = tensor_names(e)
    return max([1] + [sweep_of[n] + (n in done) for n in read if n in sweep_of])


def _over(e: sympy.Expr, dim: Dim) -> bool:
    return isinstance(e, ISum) and dim_of(e.var) == dim


def _read(e: sympy.Expr, sums: dict[str, TensorInfo]) -> set[str]:
    return {name for name in tensor_names(e) if name in sums}


def _hoist(
    e: sympy.Expr,
    dim: Dim,
    found: dict[sympy.Expr, tuple[str, tuple[sympy.Symbol, ...]]],
    sums: dict[str, TensorInfo],
    bodies: dict[str, sympy.Expr],
    names: set[str],
) -> sympy.Expr | None:
    """``e`` with every sum over ``dim`` read from a tensor of its own (recorded in ``sums`` with
    its ``bodies``), innermost first; None where a sum is a matrix product over the batch."""
    if not e.args or is_entry(e):
        return e
    args = [_hoist(a, dim, found, sums, bodies, names) for a in e.args]
    if any(a is None for a in args):
        return None
    e = e.func(*args) if args != list(e.args) else e
    if not _over(e, dim):
        return e
    if not _reduction(e):
        return None
    key, placeholders = canonical_key(e)
    if key not in found:
        name = _fresh(names)
        order = tuple(placeholders.values())
        found[key] = (name, order)
    name, order = found[key]
    if name not in bodies:
        back = {p: s for s, p in placeholders.items()}
        own = tuple(back[p] for p in order)
        layout = sums.get(name) or TensorInfo(name, tuple(dim_of(s) for s in own))
        if len(set(layout.dims)) < len(layout.dims):
            return None  # a sum over the batch along two axes of one dim: no layout of its own
        sums[name] = layout
        # the body as a value at the sum's own layout's indices
        bodies[name] = substitute_indices(e, dict(zip(own, layout.indices)))
    back = {p: s for s, p in placeholders.items()}
    return entry(name, [back[p] for p in order])


def _fresh(names: set[str]) -> str:
    k = 1
    while f"s{k}_all" in names or f"s{k}" in names:
        k += 1
    names.add(f"s{k}")
    return f"s{k}"


def _reduction(s: ISum) -> bool:
    """A sum whose body has an operand that spans all of its indices: one pass over that operand's
    rows, not a contraction of two operands (a matrix product is one ``@`` over the whole batch)."""
    wanted = free_indices(s.body)
    return any(is_entry(a) and wanted <= set(entry_indices(a)) for a in sympy.preorder_traversal(s.body))


def _blockable(values: list[Value], layouts: dict[str, TensorInfo], dim: Dim) -> bool:
    """Every tensor along ``dim`` read at its own row and no other axis read at an index of
    ``dim``; no max, gather, delta or flattening anywhere; no other dim sized by ``dim``'s size."""
    size = dim.size
    for v in values:
        if v.expr.has(sympy.KroneckerDelta, IMax, ArgMax, Pack, Flat) or not _indices_only_at_entries(v.expr, dim):
            return False
        dims = list(v.target.dims)
        if dims.count(dim) > 1:
            return False
        for node in sympy.preorder_traversal(v.expr):
            if isinstance(node, ISum):
                dims.append(dim_of(node.var))
            if not is_entry(node):
                continue
            info = layouts.get(entry_name(node))
            if info is None or info.is_int or len(info.dims) != len(node.args) or info.dims.count(dim) > 1:
                return False  # (a tensor along the batch twice: a block of one axis is not one of both)
            dims += info.dims
            for d, i in zip(info.dims, entry_indices(node)):
                if (d == dim) != (is_index(i) and dim_of(i) == dim):
                    return False
        if any(d != dim and (size in d.size.free_symbols or dim in d.parts) for d in dims):
            return False
    return True


def _indices_only_at_entries(e: sympy.Expr, dim: Dim) -> bool:
    """No index of ``dim`` in arithmetic or a condition (``n < 3``, ``n + 1``): only as an entry's
    index or a sum's variable."""
    if is_entry(e):
        return True
    if is_index(e):
        return dim_of(e) != dim
    if isinstance(e, ISum):
        return _indices_only_at_entries(e.body, dim)
    return all(_indices_only_at_entries(a, dim) for a in e.args)
