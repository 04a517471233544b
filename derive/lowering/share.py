"""Sharing: costly values computed once, and forward values the backward reads instead of recomputing.

Two passes over the simplified formulas, before any code is printed:

- :func:`forward_values` finds costly sub-expressions of forward statements (a transcendental
  such as the ``exp(-a)`` inside a sigmoid, a non-integer power) that a gradient needs too. The
  forward then computes each into a tensor of its own and keeps it for the backward, which reads
  it instead of evaluating the function again. ``exp(-u)`` is also recognised as ``1/exp(u)``.
- :func:`repeated` finds costly sub-expressions that occur more than once among the formulas of
  one backward; the lowering computes each once, into a temporary.
- :func:`repeated_within` finds any value one elementwise expression computes twice (the
  ``x - y`` of ``|x - y|`` and of ``sign(y - x)``); the lowering computes it once.

Sub-expressions are compared up to the names of their indices (:func:`canonical_key`), so the
``exp(a[n, h])`` of ``da[n, h]`` and the ``exp(a[n, h2])`` under ``Σ_h2`` of ``dx`` are one value.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import sympy

from ..indexalg import (
    ArgMax,
    Flat,
    IMax,
    ISum,
    Pack,
    bound_indices,
    dim_of,
    entry,
    entry_indices,
    entry_name,
    free_indices,
    is_entry,
    positions_in_range,
    substitute_indices,
    tensor_names,
    tied_size,
)
from ..program import Program, Statement, TensorInfo

_CHEAP = (sympy.Max, sympy.Min, sympy.Abs, sympy.sign, sympy.Heaviside, sympy.KroneckerDelta)
_INDEX_LEVEL = (ISum, IMax, ArgMax, Flat, Pack)


@dataclass(frozen=True)
class SavedValue:
    """A sub-expression of forward statement ``host`` computed into a tensor of its own."""

    statement: Statement
    host: str
    # the sub-expression as it stands in the host (its indices may be bound there)
    original: sympy.Expr

    read: sympy.Expr  # the saved tensor's entry that replaces ``original`` in the host

    @property
    def name(self) -> str:
        return self.statement.name


def costly(e: sympy.Basic) -> bool:
    """A transcendental function, a non-integer power, or the reciprocal of a sum that holds one
    (a sigmoid's ``1/(1 + exp(-x))``): worth computing once."""
    if is_entry(e) or isinstance(e, _INDEX_LEVEL) or not tensor_names(e):
        return False
    if isinstance(e, sympy.Pow):
        if not e.exp.is_integer:
            return True
        return bool(e.exp < 0) and isinstance(e.base, sympy.Add) and any(costly(a) for a in e.base.args)
    return isinstance(e, sympy.Function) and not isinstance(e, _CHEAP)


def forward_values(
    program: Program, expressions: list[sympy.Expr], taken: set[str]
) -> tuple[list[SavedValue], list[sympy.Expr]]:
    """Costly forward sub-expressions the ``expressions`` need, and the expressions reading them instead.

    Example:
        >>> from derive import catalogue, derive
        >>> d = derive(catalogue()["silu"])  # out = x/(1 + exp(-x))
        >>> saved, (dx,) = forward_values(d.program, [d.gradient("x").result], set(d.program.tensors))
        >>> [(s.name, s.host, str(s.statement.expr)) for s in saved], str(dx)
        ([('inv_x', 'out', '1/(1 + exp(-x(n, d)))')], '(-out(n, d) + x(n, d) + 1)*dout(n, d)*inv_x(n, d)')
    """
    saved: list[SavedValue] = []
    names = set(taken)
    for stmt in program.statements:
        for sub in _costly_parts(stmt.expr, frozenset(stmt.target.indices)):
            value = _as_statement(sub, stmt, names)
            if value is None:
                continue
            rewritten = [_read_saved(e, value) for e in expressions]
            if rewritten != expressions:
                expressions = rewritten
                saved.append(SavedValue(value, stmt.name, sub, entry(value.name, _ordered_free(sub, stmt))))
                names.add(value.name)
    return saved, expressions


def host_expression(
    host: str, expr: sympy.Expr, saved: list[SavedValue], written: Callable[[Statement], sympy.Expr] | None = None
) -> sympy.Expr:
    """Forward statement ``host``'s right-hand side reading the values saved out of it.

    ``written``: the form the forward computes values in (the stabler one), as in :func:`saved_in_order`.
    """
    mapping = {s.original: s.read for s in saved if s.host == host}
    if written is not None:  # the saved value in the form the host's expression now has it
        mapping |= {written(replace(s.statement, expr=s.original)): s.read for s in saved if s.host == host}
    expr = expr.xreplace(mapping)
    for s, _ in reversed(saved_in_order(saved, host)):  # the same value read at other indices (a bound one)
        expr = _read_saved(expr, s.statement)
    return expr


def read_earlier(e: sympy.Expr, saved: list[SavedValue], before: set[str]) -> sympy.Expr:
    """``e`` reading the values saved out of the statements in ``before`` (computed already)
    where it holds them: ``p = exp(s)/Σ exp(s)`` reads the ``exp_s`` its sum's statement kept."""
    for value in saved:
        if value.host in before:
            e = _read_saved(e, value.statement)
    return e


def exp_through_logs(e: sympy.Expr, statements: list[Statement], computed: set[sympy.Expr]) -> sympy.Expr:
    """``exp(v)`` of a forward value ``v = a - log(b)`` (a log-softmax) as ``exp(a)/b`` where the
    forward computes ``exp(a)`` anyway (inside ``b = Σ exp(a)``; ``computed`` holds the keys of the
    exps it computes): the softmax from the exps already taken, not from a second exp."""
    definitions = {s.name: s for s in statements}

    def swap(node: sympy.Expr) -> sympy.Expr:
        arg = node.args[0] if isinstance(node, sympy.exp) else None
        if arg is None or not is_entry(arg) or entry_name(arg) not in definitions:
            return node
        value = definitions[entry_name(arg)].expr
        if not any(isinstance(t, sympy.log) or (-t).func is sympy.log for t in sympy.Add.make_args(value)):
            return node
        through = sympy.exp(definitions[entry_name(arg)].at(entry_indices(arg)))
        exps = through.atoms(sympy.exp)
        if through.has(sympy.log) or not exps or any(canonical_key(x)[0] not in computed for x in exps):
            return node
        return through

    return _bottom_up(e, swap)


def exps_computed(expressions: Iterable[sympy.Expr]) -> set[sympy.Expr]:
    """Keys of the exps ``expressions`` compute (:func:`exp_through_logs` reads them)."""
    return {canonical_key(x)[0] for e in expressions for x in e.atoms(sympy.exp)}


def saved_in_order(
    saved: list[SavedValue], host: str, written: Callable[[Statement], sympy.Expr] | None = None
) -> list[tuple[SavedValue, sympy.Expr]]:
    """The values saved out of forward statement ``host``, innermost first, each with its right-hand
    side reading the ones before it (``log(1 + exp_p)``, not a second ``exp(p)``).

    ``written``: the form the forward computes a value in (the stabler one, when the op asks for it).
    """
    mine = sorted((s for s in saved if s.host == host), key=lambda s: _size(s.original))
    out: list[tuple[SavedValue, sympy.Expr]] = []
    for k, s in enumerate(mine):
        expr = s.statement.expr if written is None else written(s.statement)
        for inner in reversed(mine[:k]):  # the larger first: log(1 + exp(p)) before its exp(p)
            expr = _read_saved(expr, inner.statement)
        out.append((s, expr))
    return out


def _size(e: sympy.Expr) -> int:
    return sum(1 for _ in sympy.preorder_traversal(e))


def is_step(e: sympy.Basic) -> bool:
    """A step of a tensor value (``Heaviside(x)``): a comparison, one pass, into a 0/1 mask."""
    return isinstance(e, sympy.Heaviside) and bool(tensor_names(e))


def as_step(cond: sympy.Basic) -> sympy.Expr | None:
    """``u > v`` as ``Heaviside(u - v, 0)``, ``u >= v`` as ``Heaviside(u - v, 1)`` (and ``<``, ``<=``)."""
    if isinstance(cond, (sympy.StrictGreaterThan, sympy.GreaterThan)):
        return sympy.Heaviside(cond.lhs - cond.rhs, int(isinstance(cond, sympy.GreaterThan)))
    if isinstance(cond, (sympy.StrictLessThan, sympy.LessThan)):
        return sympy.Heaviside(cond.rhs - cond.lhs, int(isinstance(cond, sympy.LessThan)))
    return None


def repeated(expressions: Iterable[sympy.Expr], steps: bool = False, cheap: bool = False) -> set[sympy.Expr]:
    """Keys (:func:`canonical_key`) of values computed twice or more: costly sub-expressions, and the
    products of one layout that several sums multiply out (``dout*xhat`` for both dgamma and dx),
    or that one formula is whole and another sums (``dpre`` and ``db = Σ_n dpre``).

    With ``cheap``, any operation two formulas compute (``x - y`` in dx and dy), so the fused
    backward computes it once; the atom-by-atom chain keeps autograd's forms instead.

    With ``steps``, a step used twice too (a relu's mask read by two gradients, or the condition
    of two selects): where the code multiplies by masks, one mask serves both; where it selects
    with ``torch.where`` (a value that may be infinite), each select keeps its own comparison.
    """
    expressions = list(expressions)
    counts: Counter[sympy.Expr] = Counter()
    sums: set[sympy.Expr] = set()
    if cheap:  # a product part of which another formula computes too (dout·mask in dx and dw)
        counts.update({key: 2 for key in common_products(_products(expressions))})
    for e in expressions:
        if isinstance(e, sympy.Mul) and tensor_names(e):  # a gradient that another sums (dpre and db)
            counts[canonical_key(e)[0]] += 1
        if cheap:  # a value two formulas compute (x - y in dx and dy), counted once a formula
            counts.update({cheap_key(n) for n in _nodes_above_leaves(e) if n is not e and _cheap(n)})
        for node in sympy.preorder_traversal(e):
            step = as_step(node.args[0].cond) if steps and isinstance(node, sympy.Piecewise) else None
            if step is not None and is_step(step):  # a select's condition, read as a mask
                counts[canonical_key(step)[0]] += 1
            if costly(node) or (steps and is_step(node)):
                counts[canonical_key(node)[0]] += 1
            elif isinstance(node, ISum) and canonical_key(node)[0] not in sums:  # an equal sum is computed once
                sums.add(canonical_key(node)[0])
                indices, body = flatten_sums(node)
                for group in factor_groups(body, frozenset(indices))[1]:
                    if isinstance(group, sympy.Mul):
                        counts[canonical_key(group)[0]] += 1
    return {k for k, n in counts.items() if n > 1}


MAX_SHARED_FACTORS = 6  # a product with more factors of its layout is not searched for shared parts


def sub_products(p: sympy.Expr) -> list[tuple[sympy.Expr, tuple[sympy.Expr, ...]]]:
    """``(key, factors)`` of each product of two or more factors of ``p`` that read values along all
    of ``p``'s indices (a part of ``p`` that costs passes of its size), the largest first."""
    free = free_indices(p)
    full = [f for f in sympy.Mul.make_args(p) if _reads_values(f) and free_indices(f) == free]
    if not 2 <= len(full) <= MAX_SHARED_FACTORS:
        return []
    return [
        (canonical_key(sympy.Mul(*part))[0], part)
        for r in range(len(full), 1, -1)
        for part in itertools.combinations(full, r)
    ]


def common_products(products: Iterable[sympy.Expr]) -> set[sympy.Expr]:
    """Keys of the largest products of one layout that two or more of ``products`` hold as parts:
    ``relu6(x·w)``'s ``dx = dout·mask·w`` and ``dw = Σ_n dout·mask·x`` share ``dout·mask``,
    which computed once saves a pass per factor to each other reader."""
    holders: dict[sympy.Expr, set[int]] = {}
    size: dict[sympy.Expr, int] = {}
    for k, p in enumerate(products):
        for key, part in sub_products(p):
            holders.setdefault(key, set()).add(k)
            size[key] = len(part)
    shared = {key: ks for key, ks in holders.items() if len(ks) > 1}
    return {
        key
        for key, ks in shared.items()
        if not any(size[other] > size[key] and ks <= others for other, others in shared.items())
    }


def _products(expressions: list[sympy.Expr]) -> list[sympy.Expr]:
    """The products of one layout the lowering computes: formulas that are products, and the
    factor groups of their sums (each distinct sum once)."""
    out: list[sympy.Expr] = []
    sums: set[sympy.Expr] = set()
    for e in expressions:
        if isinstance(e, sympy.Mul):
            out.append(e)
        for node in sympy.preorder_traversal(e):
            if isinstance(node, ISum) and canonical_key(node)[0] not in sums:
                sums.add(canonical_key(node)[0])
                indices, body = flatten_sums(node)
                out += [g for g in factor_groups(body, frozenset(indices))[1] if isinstance(g, sympy.Mul)]
    return out


def repeated_within(e: sympy.Expr) -> tuple[sympy.Expr, dict[sympy.Expr, sympy.Expr]] | None:
    """The smallest value elementwise expression ``e`` computes twice or more, up to a constant
    factor, with the factor of each occurrence (``{node: c}``, node = c·value); None if there is none.

    In eager code every operation is one pass over full-size operands, so a value written twice
    costs two passes where a temporary costs one. ``x - y`` and ``2*y - 2*x`` are one value. The
    smallest first, so a value inside two larger ones serves both, and a larger one repeated whole
    is found on the next call, once the smaller ones in it read their temporaries; but a value
    that occurs only inside copies of one larger repeated value is left to that one.

    Example:
        >>> x, y = sympy.Function("x")(sympy.Symbol("n")), sympy.Function("y")(sympy.Symbol("n"))
        >>> value, occurrences = repeated_within(sympy.Abs(x - y) ** 2 + sympy.sign(y - x))
        >>> value, sorted(occurrences.values())
        (x(n) - y(n), [-1, 1])
    """
    counts: Counter[sympy.Expr] = Counter(n for n in _nodes_above_leaves(e) if n is not e and shareable(n))
    groups: dict[sympy.Expr, dict[sympy.Expr, sympy.Expr]] = {}
    for node in counts:
        c, value = up_to_factor(node)
        groups.setdefault(value, {})[node] = c
    total = {v: sum(counts[n] for n in nodes) for v, nodes in groups.items()}
    found = [(v, nodes) for v, nodes in groups.items() if total[v] > 1]

    def inside(nodes: dict[sympy.Expr, sympy.Expr], within: dict[sympy.Expr, sympy.Expr]) -> int:
        return sum(counts[w] * sum(1 for m in _nodes_above_leaves(w) if m in nodes) for w in within)

    # a value only ever inside one larger repeated value is shared with it (tanh(a·x) twice: not a·x)
    found = [
        (v, nodes) for v, nodes in found if not any(w != v and inside(nodes, within) == total[v] for w, within in found)
    ]
    if not found:
        return None
    value, nodes = min(found, key=lambda vn: (_size(vn[0]), sympy.default_sort_key(vn[0])))
    if sum(counts[n] for n, c in nodes.items() if c.could_extract_minus_sign()) * 2 > sum(counts[n] for n in nodes):
        value, nodes = -value, {n: -c for n, c in nodes.items()}  # the sign most occurrences have
    return value, nodes


def _nodes_above_leaves(e: sympy.Basic) -> Iterable[sympy.Basic]:
    """Every node of an elementwise expression, down to (not into) its index-level leaves."""
    yield e
    if is_entry(e) or isinstance(e, _INDEX_LEVEL + (sympy.KroneckerDelta,)):
        return
    for a in e.args:
        yield from _nodes_above_leaves(a)


def shareable(node: sympy.Basic) -> bool:
    """An operation on tensor values that is a pass of its own: not a leaf, a number, or ``c·x``."""
    if not isinstance(node, sympy.Expr) or is_entry(node) or isinstance(node, _INDEX_LEVEL) or node.is_Atom:
        return False
    if isinstance(node, sympy.KroneckerDelta) or not _reads_values(node):
        return False
    if isinstance(node, sympy.Mul):  # a scale of one value rides on the operation that reads it
        valued = [f for f in node.args if _reads_values(f)]
        return len(valued) > 1 or not (is_entry(valued[0]) or valued[0].is_Atom)
    return True


def _cheap(node: sympy.Basic) -> bool:
    """A shareable operation that no other rule of :func:`repeated` counts (not costly, not a step)."""
    return shareable(node) and not costly(node) and not is_step(node)


def cheap_key(node: sympy.Expr) -> sympy.Expr:
    """The key of a cheap value up to a number: ``x - y`` and ``y - x`` share one."""
    return canonical_key(up_to_factor(node)[1])[0]


def _reads_values(e: sympy.Basic) -> bool:
    """Whether ``e`` reads a tensor: an entry, or a temporary's stand-in (``__val_...``)."""
    return bool(tensor_names(e)) or any(s.name.startswith("__val_") for s in e.free_symbols)


def up_to_factor(node: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """``node`` as ``c·value``, ``c`` a rational: a product without its number (``-s*y`` is ``-1·s*y``),
    a sum with its content and sign made canonical."""
    if isinstance(node, sympy.Mul):
        c, rest = node.as_coeff_Mul()
        return (c, rest) if c.is_Rational and isinstance(rest, sympy.Mul) else (sympy.S.One, node)
    if not isinstance(node, sympy.Add):
        return sympy.S.One, node
    c, value = node.primitive()
    if value.could_extract_minus_sign():
        c, value = -c, -value
    return c, value


def factor_groups(body: sympy.Expr, summed: frozenset[sympy.Symbol]) -> tuple[list[sympy.Expr], list[sympy.Expr]]:
    """A sum's body as the factors free of the summed indices and the products of factors sharing a layout."""
    scalars: list[sympy.Expr] = []
    groups: dict[frozenset[sympy.Symbol], list[sympy.Expr]] = {}
    for f in sympy.Mul.make_args(body):
        free = free_indices(f)
        if free & summed:
            groups.setdefault(frozenset(free), []).append(f)
        else:
            scalars.append(f)
    return scalars, [sympy.Mul(*fs) for fs in groups.values()]


def flatten_sums(e: ISum) -> tuple[list[sympy.Symbol], sympy.Expr]:
    """``Σ_m a[m]·Σ_k b[m, k]`` as the single sum ``Σ_{m,k} a[m]·b[m, k]``: one tensor network to plan.

    Nested sums that stand as factors of the body join the outer sum when their index is free
    nowhere else in the product, so the planner sees every factor and may pick any order. Sums
    of a delta join first: ``Σ_n s[n]·Σ_k δ(d, idx[n, k])`` is a scatter of ``s`` only once its
    ``k`` is outer (left nested, it is a count matrix the size of ``n × d``).
    """
    indices, body = [e.var], e.body
    while True:
        factors = list(sympy.Mul.make_args(body))
        for k, f in sorted(enumerate(factors), key=lambda kf: not kf[1].has(sympy.KroneckerDelta)):
            others = factors[:k] + factors[k + 1 :]
            if isinstance(f, ISum) and f.var not in indices and not any(f.var in free_indices(g) for g in others):
                indices.append(f.var)
                body = sympy.Mul(*others, f.body)
                break
        else:
            return indices, body


def canonical_key(e: sympy.Expr) -> tuple[sympy.Expr, dict[sympy.Symbol, sympy.Symbol]]:
    """``e`` with bound indices renamed by depth and free ones by order of appearance.

    Returns the key and the map from ``e``'s free indices to the placeholders that replaced them.
    """
    order = _free_in_order(e)
    placeholders = {s: sympy.Symbol(f"_p{k}_{_extent(s)}", integer=True) for k, s in enumerate(order)}
    return _rename_bound_canonically(e).xreplace(placeholders), placeholders


# -- helpers ----------------------------------------------------------------------------------
def _costly_parts(e: sympy.Expr, own: frozenset[sympy.Symbol]) -> list[sympy.Expr]:
    """Costly proper sub-expressions, outermost first (a statement that is one is its own value).

    A max over a dim also yields its argmax (``max(dim)`` returns both): the position a max's
    gradient is scattered to, which the backward would otherwise find again. A reduction over
    the statement's own indices (the ``Σ_d x[n, d]`` of a mean written inline) is a pass over its
    operands, and no larger than the statement: worth keeping too.
    """
    out: list[sympy.Expr] = []
    for node in sympy.preorder_traversal(e):
        if isinstance(node, IMax):
            if not tensor_names(node.body):  # the max of a value that cancelled (x - x): no position
                continue
            node = ArgMax(node.body, node.var)
        elif node is e or not (costly(node) or _reduction(node, own)):
            continue
        if node not in out:
            out.append(node)
    return out


def _reduction(node: sympy.Basic, own: frozenset[sympy.Symbol]) -> bool:
    """A sum of tensor values whose free indices are all the statement's own (none bound outside it)."""
    return isinstance(node, ISum) and bool(tensor_names(node)) and free_indices(node) <= own


def _ordered_free(sub: sympy.Expr, stmt: Statement) -> tuple[sympy.Symbol, ...]:
    """``sub``'s free indices: the statement's own first (in its order), then bound ones as they appear."""
    free = free_indices(sub)
    own = [i for i in stmt.target.indices if i in free]
    return tuple(own + [i for i in _free_in_order(sub) if i not in own])


def _as_statement(sub: sympy.Expr, stmt: Statement, names: set[str]) -> Statement | None:
    """``name[canonical indices] = sub``, or None when two of its indices range over one dim."""
    indices = _ordered_free(sub, stmt)
    dims = tuple(dim_of(i) for i in indices)
    if len(set(dims)) != len(dims):
        return None
    info = TensorInfo(_name_for(sub, names), dims, is_int=isinstance(sub, ArgMax))
    return Statement(info, substitute_indices(sub, dict(zip(indices, info.indices))), stmt.source)


def _name_for(sub: sympy.Expr, names: set[str]) -> str:
    """``exp_x``, ``tanh_h``, ``inv_x`` (a reciprocal)...: the function and the first tensor it reads, made unique."""
    if isinstance(sub, sympy.Pow):
        head = "inv" if sub.exp == -1 else "pow"
    else:
        head = "sum" if isinstance(sub, ISum) else type(sub).__name__.lower()
    base = f"{head}_{sorted(tensor_names(sub))[0]}"
    name, k = base, 2
    while name in names or f"d{name}" in names:
        name, k = f"{base}{k}", k + 1
    return name


def _read_saved(e: sympy.Expr, value: Statement) -> sympy.Expr:
    """Occurrences of ``value``'s expression in ``e`` (at any indices) replaced by its entries."""
    wild = {i: sympy.Wild(f"w_{i}") for i in value.target.indices}
    bound = {i: sympy.Wild(f"w_{i}") for i in bound_indices(value.expr)}
    pattern = value.expr.xreplace({**wild, **bound})
    binders = {w: i for i, w in {**wild, **bound}.items()}
    inverse = sympy.exp(-pattern.args[0]) if isinstance(pattern, sympy.exp) else None
    # v = B**p saved: another power B**q is v**(q/p) when that ratio is an integer (no roots taken)
    base = pattern.base if isinstance(pattern, sympy.Pow) and pattern.exp.is_number else None

    def read(m: dict | None, power: sympy.Expr) -> sympy.Expr | None:
        if m is None or not all(w in m for w in wild.values()) or not positions_in_range(m, binders):
            return None
        return entry(value.name, [m[wild[i]] for i in value.target.indices]) ** power

    def swap(node: sympy.Expr) -> sympy.Expr:
        for pat, power in ((pattern, 1), (inverse, -1)):
            if pat is not None and isinstance(node, type(pat)):
                found = read(node.match(pat), power)
                if found is not None:
                    return found
        if base is not None and isinstance(node, sympy.Pow) and node.exp.is_number and node.exp != pattern.exp:
            ratio = sympy.nsimplify(node.exp / pattern.exp)
            found = read(node.base.match(base), ratio) if ratio.is_integer else None
            if found is not None:
                return found
        return node

    return _bottom_up(e, swap)


def _bottom_up(e: sympy.Expr, fn) -> sympy.Expr:  # noqa: ANN001
    """``fn`` applied to every node, innermost first; an entry's indices too (an argmax read as a position)."""
    if isinstance(e, sympy.Basic) and e.args:
        args = tuple(_bottom_up(a, fn) for a in e.args)
        if args != e.args:
            e = e.func(*args)
    return fn(e) if isinstance(e, sympy.Expr) and not is_entry(e) else e


def _extent(index: sympy.Symbol) -> str:
    """The size of ``index``'s dim, by which keys name it: a dim renamed from another (``h``'s ``i``
    from ``x``'s ``d``) has its size, and a value read along either is the same value."""
    return str(tied_size(index))


def _rename_bound_canonically(e: sympy.Expr, depth: int = 0) -> sympy.Expr:
    """Bound indices renamed by nesting depth, so alpha-equivalent sums share one key."""
    if isinstance(e, (ISum, IMax, ArgMax)):
        new = sympy.Symbol(f"_b{depth}_{_extent(e.var)}", integer=True)
        inner = _rename_bound_canonically(e.body, depth + 1)  # inner binders first: shadowing is safe
        return type(e)(inner.xreplace({e.var: new}), new)
    if not e.args or is_entry(e):
        return e
    return e.func(*(_rename_bound_canonically(a, depth) for a in e.args))


def _free_in_order(e: sympy.Expr) -> list[sympy.Symbol]:
    free = free_indices(e)
    out: list[sympy.Symbol] = []
    for a in sympy.preorder_traversal(e):
        if a in free and a not in out:
            out.append(a)  # type: ignore[arg-type]
    return out


__all__ = [
    "SavedValue",
    "as_step",
    "canonical_key",
    "costly",
    "exp_through_logs",
    "exps_computed",
    "factor_groups",
    "flatten_sums",
    "forward_values",
    "host_expression",
    "repeated",
    "read_earlier",
    "repeated_within",
    "sub_products",
    "shareable",
    "up_to_factor",
    "cheap_key",
    "saved_in_order",
]
