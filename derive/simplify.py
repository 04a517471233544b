"""The simplifier: index-level rewrites applied to a fixed point, each one a named identity.

Rules are small functions ``Expr -> Expr``; :class:`Simplifier` applies them in order until
nothing changes and records every step that changed the expression, so the printed derivation can
say which identity it used. Identities about particular tensors (a centred value sums to zero, a
normalised row sums to one, a forward value already holds a sub-expression) are discovered from
the forward program's own statements, never from a list of ops.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import sympy

from .indexalg import (
    ArgMax,
    Flat,
    IMax,
    ISum,
    always_within,
    bound_indices,
    fresh_index,
    Pack,
    dim_of,
    entry,
    entry_indices,
    entry_name,
    free_indices,
    is_entry,
    is_index,
    may_read_past,
    position_dim,
    positions_in_range,
    substitute_indices,
    tensor_names,
)
from .program import Program, Statement


@dataclass(frozen=True)
class Step:
    """One rewrite of the derivation: the rule's name, the identity it used, and the result."""

    rule: str
    identity: str
    result: sympy.Expr


# -- sums and deltas --------------------------------------------------------------------------
def _distribute(e: sympy.Expr) -> sympy.Expr:
    """``(a + b)·c/(p·q) = a·c/(p·q) + b·c/(p·q)``: one level, numerator sums only.

    A denominator stays a product of its factors (``sympy.expand`` would multiply them out, and a
    product of factors over different indices would become one sum over all of them)."""
    if not isinstance(e, sympy.Mul):
        return e
    sums = [f for f in e.args if isinstance(f, sympy.Add)]
    if not sums:
        return e
    rest = sympy.Mul(*(f for f in e.args if not isinstance(f, sympy.Add)))
    return sympy.Add(*(rest * sympy.Mul(*terms) for terms in itertools.product(*(s.args for s in sums))))


def _delta_partner(f: sympy.Basic, k: sympy.Symbol) -> sympy.Basic | None:
    """For ``δ(k, e)`` with ``e`` free of ``k``, return ``e``."""
    if not isinstance(f, sympy.KroneckerDelta):
        return None
    a, b = f.args
    for x, y in ((a, b), (b, a)):
        if x == k and k not in free_indices(y) and not y.has(k):
            # δ(n, np) with np of a longer dim (a padding's) is 0 past n's end: no single term
            return None if may_read_past(y, dim_of(k)) else y
    return None


def _shift_partner(f: sympy.Basic, k: sympy.Symbol) -> sympy.Basic | None:
    """For ``δ(k + c, e)`` (a padding's shift), the ``e - c`` that ``k`` must be, when that is
    always inside ``k``'s range: the sum over ``k`` then has exactly one term."""
    if not isinstance(f, sympy.KroneckerDelta) or not (is_index(k) and f.has(k)):
        return None
    a, b = f.args
    for x, y in ((a, b), (b, a)):
        rest = x - k
        if rest.has(k) or y.has(k) or not (rest.is_Integer or rest == 0):
            continue
        value = y - rest
        if always_within(value, dim_of(k).size):
            return value
    return None


def _unpack_delta(f: sympy.Basic) -> list[sympy.Basic]:
    """``δ(f, (t, e))`` for an index ``f`` of a flattened dim is ``δ(f.0, t)·δ(f.1, e)``: one delta per part."""
    if isinstance(f, sympy.KroneckerDelta):
        for a, b in (f.args, f.args[::-1]):
            dim = position_dim(a)
            if isinstance(b, Pack) and dim is not None and len(dim.parts) == len(b.args):
                return [sympy.KroneckerDelta(Flat(a, p), part) for p, part in enumerate(b.args)]
    return [f]


def _compound_partner(factors: list[sympy.Basic], k: sympy.Symbol) -> tuple[sympy.Basic, list[sympy.Basic]] | None:
    """For a flattened dim's index ``k``: ``δ(k.0, b) δ(k.1, c)`` pins ``k`` to ``(b, c)``."""
    parts = dim_of(k).parts
    if not parts:
        return None
    found: dict[int, sympy.Basic] = {}
    used: list[sympy.Basic] = []
    for f in factors:
        if isinstance(f, sympy.KroneckerDelta):
            for x, y in (f.args, f.args[::-1]):
                if isinstance(x, Flat) and x.args[0] == k and not y.has(k):
                    found[int(x.args[1])] = y
                    used.append(f)
                    break
    if len(found) != len(parts):
        return None
    return Pack(*(found[p] for p in range(len(parts)))), used


def _interchange(factors: list[sympy.Basic], k: sympy.Symbol) -> sympy.Expr | None:
    """``Σ_k R(k)·Σ_v δ(v, k) B(v) = Σ_v B(v)·R(v)``: a sum over a padded range (``k``) meets the
    guard of a read inside the shorter range (``v``), which alone can absorb the delta."""
    for f in factors:
        if not isinstance(f, ISum):
            continue
        rest = sympy.Mul(*(g for g in factors if g is not f))
        if f.var in free_indices(rest) or rest.has(f.var):
            continue
        inner = sympy.Mul.make_args(f.body)
        for g in inner:
            if _delta_partner(g, k) == f.var:
                body = sympy.Mul(*(h for h in inner if h is not g))
                return ISum(substitute_indices(body * rest, {k: f.var}), f.var)  # δ(v, k): k is v throughout
        # the guard further in: Σ_k R(k)·Σ_n S(k, n)·Σ_v δ(v, k)·B = Σ_n Σ_v B·R(v)·S(v, n)
        deeper = _interchange([*inner, rest], k)
        if deeper is not None:
            return ISum(deeper, f.var)
    return None


def sum_term(term: sympy.Expr, k: sympy.Symbol) -> tuple[sympy.Expr, bool]:
    """``Σ_k`` of one product: eliminate a delta on ``k`` (True), or pull out what does not depend on ``k``."""
    factors = [g for f in sympy.Mul.make_args(term) for g in _unpack_delta(f)]
    term = sympy.Mul(*factors)
    for f in factors:
        partner = _delta_partner(f, k)
        if partner is None:
            partner = _shift_partner(f, k)
        if partner is not None:
            rest = sympy.Mul(*(g for g in factors if g is not f))
            return substitute_indices(rest, {k: partner}), True
    swapped = _interchange(factors, k)
    if swapped is not None:
        return swapped, True
    compound = _compound_partner(factors, k)
    if compound is not None:
        value, used = compound
        rest = sympy.Mul(*(g for g in factors if g not in used))
        return substitute_indices(rest, {k: value}), True
    inside = [f for f in factors if f.has(k)]
    outside = [f for f in factors if not f.has(k)]
    if not inside:
        return sympy.Mul(*outside) * dim_of(k).size, False
    return sympy.Mul(*outside) * ISum(sympy.Mul(*inside), k), False


def split_sums(e: sympy.Expr) -> sympy.Expr:
    """Linearity of Σ and delta elimination, bottom-up: ``Σ_k δ(k, a) f(k) = f(a)``."""
    if not isinstance(e, sympy.Basic) or not e.args or is_entry(e):
        return e
    if isinstance(e, ISum) and dim_of(e.var).parts and e.body.has(Flat):
        return split_sums(_split_flat_sum(e))
    if isinstance(e, ISum):
        body = _distribute(split_sums(e.body))
        terms = []
        for t in sympy.Add.make_args(body):
            value, eliminated = sum_term(t, e.var)
            terms.append(split_sums(value) if eliminated else value)
        return sympy.Add(*terms)
    return e.func(*(split_sums(a) for a in e.args))


def _split_flat_sum(e: ISum) -> sympy.Expr:
    """``Σ_f g(f) = Σ_t Σ_e g((t, e))`` for an index ``f`` of a flattened dim."""
    from .indexalg import bound_indices, fresh_indices

    parts = fresh_indices(dim_of(e.var).parts, free_indices(e.body) | bound_indices(e.body) | {e.var})
    body = substitute_indices(e.body, {e.var: Pack(*parts)})
    for p in reversed(parts):
        body = ISum(body, p)
    return body


def canonical_bound(e: sympy.Expr, avoid: set[sympy.Symbol] | None = None) -> sympy.Expr:
    """Rename every bound index to the first free name of its dim, so equal sums look equal.

    ``Σ_n x[n, d]`` and ``Σ_n2 x[n2, d]`` become the same expression (and cancel); names already
    free in the whole expression are avoided so the printed formula stays unambiguous.
    """
    from .indexalg import bound_indices, fresh_index

    if avoid is None:
        avoid = free_indices(e)
    if not isinstance(e, sympy.Basic) or not e.args:
        return e
    if is_entry(e):  # an index may bind its own (k[n, argmax_s(scores[n, t, s]), d])
        if all(a.is_Symbol or a.is_Integer for a in e.args):
            return e
        return e.func(*(canonical_bound(a, avoid) for a in e.args))
    if isinstance(e, (ISum, IMax, ArgMax)):
        body = canonical_bound(e.body, avoid | {e.var})
        taken = avoid | (free_indices(body) - {e.var}) | (bound_indices(body) - {e.var})
        new = fresh_index(dim_of(e.var), taken)
        if new != e.var:
            if new in bound_indices(body):
                return type(e)(body, e.var)
            body = body.xreplace({e.var: new})
        return type(e)(body, new)
    return e.func(*(canonical_bound(a, avoid) for a in e.args))


# -- forward values ---------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _reads(stmt: Statement) -> frozenset[str]:
    return frozenset(tensor_names(stmt.expr))


@lru_cache(maxsize=4096)
def _pattern(stmt: Statement) -> tuple[sympy.Expr, list[sympy.Wild], dict[sympy.Wild, sympy.Symbol]]:
    """The statement's right-hand side with its indices (free and bound) turned into wildcards."""
    syms = sorted(
        free_indices(stmt.expr)
        | {s.var for s in sympy.preorder_traversal(stmt.expr) if isinstance(s, (ISum, IMax, ArgMax))}
        | set(stmt.target.indices),
        key=str,
    )
    wilds = {s: sympy.Wild(f"w_{s}") for s in syms}
    return stmt.expr.xreplace(wilds), [wilds[s] for s in stmt.target.indices], {w: s for s, w in wilds.items()}


def _as_entry(
    stmt: Statement,
    match: dict[sympy.Wild, sympy.Basic],
    wild_idx: list[sympy.Wild],
    dims: dict[sympy.Wild, sympy.Symbol],
) -> sympy.Expr | None:
    if any(w not in match for w in wild_idx) or not positions_in_range(match, dims):
        return None
    return entry(stmt.name, [match[w] for w in wild_idx])


def _match_product(node: sympy.Expr, pattern: sympy.Expr, powers: bool = True) -> tuple[dict, sympy.Expr] | None:
    """Find the factors of ``pattern`` among the factors of product ``node`` (powers count; see
    :func:`_covers` for ``powers``).

    Returns the wildcard bindings and the product of the factors left over, or None.
    """
    have: list[list] = [list(_base_exp(f)) for f in sympy.Mul.make_args(node)]
    binding: dict = {}
    for pf in sympy.Mul.make_args(pattern):
        pbase, pexp = _base_exp(pf)
        for slot in have:
            base, e = slot
            m = base.match(pbase.xreplace(binding))
            if m is None or not _covers(e, pexp, powers):
                continue
            binding.update(m)
            slot[1] = e - pexp
            break
        else:
            return None
    rest = sympy.Mul(*(b**e for b, e in have))
    return binding, rest


def _base_exp(f: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """``f`` as base and exponent, an ``exp`` whole: SymPy writes ``exp(x)`` as ``E**x``, whose
    exponent would have to match as a number."""
    base, e = f.as_base_exp()
    return (f, sympy.S.One) if base is sympy.E else (base, e)


def _covers(have: sympy.Expr, need: sympy.Expr, powers: bool = True) -> bool:
    """Whether a power ``B**have`` holds a factor ``B**need``, leaving a power of the same sign.

    ``B**-1.5`` holds ``B**-0.5`` (leaving ``B**-1``) as ``B**3`` holds ``B``; ``B**-1`` does not hold ``B``.
    Without ``powers`` (the atom-by-atom chain, which keeps ``B**-2`` as autograd does) a negative
    power is taken only as the whole of ``B**have`` or more.

        >>> _covers(sympy.Rational(-3, 2), sympy.Rational(-1, 2)), _covers(sympy.S(3), sympy.S(1))
        (True, True)
        >>> _covers(sympy.S(-1), sympy.S(1)), _covers(sympy.Rational(1, 2), sympy.S(1))
        (False, False)
    """
    rest = have - need
    if not rest.is_number:
        return False
    if powers and need.is_number and need < 0:
        return bool(have.is_number and rest <= 0)
    return bool(rest >= 0) and (have.is_number and have > 0) == (need.is_number and need > 0)


def recognize(e: sympy.Expr, statements: list[Statement], powers: bool = True) -> sympy.Expr:
    """Replace sub-expressions that a forward statement already computed by that statement's value.

    With ``powers``, other powers of a computed power's base are rewritten through it too
    (``B**-2`` as ``v**2`` for ``v = B**-1``); the atom-by-atom chain keeps ``B**-2`` as autograd does.
    """
    for stmt in reversed(statements):
        if is_entry(stmt.expr) or stmt.expr.is_Atom:
            continue
        if not _reads(stmt) <= tensor_names(e):
            continue  # a match needs every tensor the statement reads: skip the costly matcher
        full, wild_idx, dims = _pattern(stmt)
        coeff, pat = _split_coefficient(full)

        def swap(
            node: sympy.Expr,
            pat: sympy.Expr = pat,
            coeff: sympy.Expr = coeff,
            stmt: Statement = stmt,
            wild_idx: list = wild_idx,
            dims: dict = dims,
        ) -> sympy.Expr:
            if isinstance(node, sympy.Mul):
                found = _match_product(node, pat, powers)
                if found is not None:
                    new = _as_entry(stmt, found[0], wild_idx, dims)
                    if new is not None:
                        return new * found[1] / coeff
                return node
            if isinstance(pat, sympy.Mul):
                return node
            m = node.match(pat)
            if m is not None:
                new = _as_entry(stmt, m, wild_idx, dims)
                if new is not None:
                    return new / coeff
            return node

        e = _bottom_up(e, swap)
        e = _rewrite_powers(e, stmt) if powers else e
    return e


def exps_of_forward_values(e: sympy.Expr, statements: list[Statement]) -> sympy.Expr:
    """``exp(z)/S`` read as ``exp(v)`` for a forward value ``v = z - log(S)`` (a log-softmax): the
    exp of a difference of logs is a ratio, which the forward computed as one value.

    The softmax beside a log-softmax then cancels against ``exp(v)``, as a person would write it.
    Only where the forward computes ``exp(v)`` itself: otherwise the backward would evaluate a new
    ``exp`` where it can divide the forward's ``exp(z)`` by ``S``.
    """
    for stand_in, stmt in _exp_ratios(tuple(statements)):
        found = recognize(e, [stand_in])
        if found != e:
            e = found.replace(
                lambda n, name=stand_in.name: is_entry(n) and entry_name(n) == name,
                lambda n, stmt=stmt: sympy.exp(entry(stmt.name, list(entry_indices(n)))),
            )
    return e


@lru_cache(maxsize=64)
def _exp_ratios(statements: tuple[Statement, ...]) -> list[tuple[Statement, Statement]]:
    """For each forward value ``v = z - log(S)`` whose exp the forward computes: a stand-in
    statement ``exp(z)/S`` (computed once per program, not once per rule application)."""
    exps = {
        entry_name(n.args[0])
        for stmt in statements
        for n in sympy.preorder_traversal(stmt.expr)
        if isinstance(n, sympy.exp) and is_entry(n.args[0])
    }
    out = []
    for stmt in statements:
        if stmt.name not in exps or not (isinstance(stmt.expr, sympy.Add) and stmt.expr.has(sympy.log)):
            continue
        ratio = sympy.expand(sympy.exp(stmt.expr))  # exp(z - log S) = exp(z)/S
        if ratio.has(sympy.log) or not isinstance(ratio, sympy.Mul):
            continue
        out.append((Statement(replace(stmt.target, name=f"_exp_of_{stmt.name}"), ratio, stmt.source), stmt))
    return out


def _split_coefficient(pat: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """``Σx / N`` -> ``(1/N, Σx)``: a definition's constant factor, so ``Σx`` is seen as ``N·mean``."""
    if not isinstance(pat, sympy.Mul):
        return sympy.S.One, pat
    const = [f for f in pat.args if not tensor_names(f) and not f.has(ISum)]
    core = [f for f in pat.args if f not in const]
    if not core:
        return sympy.S.One, pat
    return sympy.Mul(*const), sympy.Mul(*core)


def _rewrite_powers(e: sympy.Expr, stmt: Statement) -> sympy.Expr:
    """With ``v = B**p`` computed forward, write ``B**q`` as ``v**(q/p)`` (e.g. ``(var+eps)**-1.5 = v**3``)."""
    if not isinstance(stmt.expr, sympy.Pow) or not stmt.expr.exp.is_number:
        return e
    base_pat, wild_idx, dims = _pattern(Statement(stmt.target, stmt.expr.base))
    p = stmt.expr.exp

    def swap(node: sympy.Expr) -> sympy.Expr:
        if isinstance(node, sympy.Pow) and node.exp.is_number:
            base, q = node.base, node.exp
        elif is_entry(stmt.expr.base) and is_entry(node):
            base, q = node, sympy.S.One
        else:
            return node
        m = base.match(base_pat)
        if m is None:
            return node
        new = _as_entry(stmt, m, wild_idx, dims)
        ratio = sympy.nsimplify(q / p)
        # (B**p)**m == B**(p*m) only for integer m: never take roots of a forward value
        return node if new is None or not ratio.is_integer else new**ratio

    return _bottom_up(e, swap)


def combine_powers(e: sympy.Expr) -> sympy.Expr:
    """``x**p / x = x**(p - 1)``: powers of one base combine where an exponent is symbolic.

    SymPy differentiates ``x**p`` to ``p*x**p/x``, which is 0/0 at ``x = 0`` where the derivative
    ``p*x**(p - 1)`` is a number (0 for ``p = 2``): the focal loss's ``(1 - pt)**gamma`` at a
    confident row. Numeric exponents are left to SymPy, which combines them already. A power of a
    product of nonnegative factors splits first where one of them is another factor's base.
    """

    def combine(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Mul):
            return node
        exponents: dict[sympy.Expr, list[sympy.Expr]] = {}
        others = []
        bases = {f.as_base_exp()[0] for f in node.args}
        for f in node.args:
            if f.is_number or isinstance(f, sympy.exp):
                others.append(f)
                continue
            for g in _split_power(f, bases):
                if g.is_number or isinstance(g, sympy.exp):
                    others.append(g)
                else:
                    base, exponent = g.as_base_exp()
                    exponents.setdefault(base, []).append(exponent)
        if not any(len(x) > 1 and not all(k.is_number for k in x) for x in exponents.values()):
            return node
        return sympy.Mul(*others, *(base ** sympy.Add(*x) for base, x in exponents.items()))

    return _bottom_up(e, combine)


def _split_power(f: sympy.Expr, bases: set[sympy.Expr]) -> list[sympy.Expr]:
    """``(a·b)**p`` as ``a**p · b**p`` when the product's factors are nonnegative and one of them is a
    base in ``bases`` (so it combines: ``(c·|u|)**p / |u|`` is ``c**p · |u|**(p - 1)``); else ``[f]``."""
    base, exponent = f.as_base_exp()
    if not isinstance(base, sympy.Mul) or exponent.is_number or not (set(base.args) & bases):
        return [f]
    if not all(b.is_nonnegative or isinstance(b, (sympy.exp, sympy.Abs)) for b in base.args):
        return [f]  # (a·b)**p is a**p · b**p only where a and b are not negative
    return [b**exponent for b in base.args]


def drop_implied_steps(e: sympy.Expr) -> sympy.Expr:
    """``Max(a, 0)**k · Heaviside(a) = Max(a, 0)**k`` for a number ``k > 0``: where the step is 0
    (``a < 0``), and at ``a = 0`` whatever its tie value, the max is 0 already. The squared hinge's
    ``2·relu(a)·step(a)`` needs no mask beside its relu.
    """

    def drop(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Mul):
            return node
        zero_below = set()
        for f in node.args:
            base, k = f.as_base_exp()
            if isinstance(base, sympy.Max) and len(base.args) == 2 and 0 in base.args and k.is_number and k > 0:
                zero_below |= {a for a in base.args if a != 0}
        kept = [f for f in node.args if not (isinstance(f, sympy.Heaviside) and f.args[0] in zero_below)]
        return sympy.Mul(*kept) if len(kept) < len(node.args) else node

    return _bottom_up(e, drop)


def steps_in_their_region(e: sympy.Expr) -> sympy.Expr:
    """Beside ``step(a - c)``, another step reads ``max(a, c)`` as ``a`` and ``min(a, c)`` as ``c``
    (``step(c - a)`` the other way): where the first step is 0 the product is 0 whatever the second
    is, and both are finite. relu6's ``step(6 - max(x, 0))·step(x)`` is ``step(6 - x)·step(x)``, two
    comparisons of ``x``, not one of a relu made for it."""

    def known(step: sympy.Heaviside) -> dict[sympy.Expr, sympy.Expr]:
        arg = step.args[0]
        c = -sympy.Add(*(t for t in sympy.Add.make_args(arg) if t.is_number))
        a = arg + c
        if a.is_number:
            return {}
        if a.could_extract_minus_sign():  # step(c' - a'): a' <= c'
            return {sympy.Min(-a, -c): -a, sympy.Max(-a, -c): -c}
        return {sympy.Max(a, c): a, sympy.Min(a, c): c}

    def rewrite(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Mul):
            return node
        steps = [f for f in node.args if isinstance(f, sympy.Heaviside)]
        if len(steps) < 2:
            return node
        out = list(node.args)
        for s in steps:
            rules = known(s)
            out = [f if f is s or not isinstance(f, sympy.Heaviside) else f.xreplace(rules) for f in out]
        return sympy.Mul(*out) if out != list(node.args) else node

    return _bottom_up(e, rewrite)


def plain_step_arguments(e: sympy.Expr) -> sympy.Expr:
    """``step(c·w) = step(w)`` for a positive constant ``c``, and ``step(a - exp(v)) = step(log(a) - v)``
    for a positive constant ``a`` (``exp`` is increasing): the same 0, 1 and tie points, so the
    mask compares the value itself. A CELU's ``step(α·(1 - exp(u/α)))`` is ``step(-u)``: one
    comparison, not three passes."""

    def plain(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Heaviside) or not tensor_names(node.args[0]):
            return node
        coefficient, arg = sympy.factor_terms(node.args[0]).as_coeff_Mul()
        rest = node.args[1:]
        scale = [f for f in sympy.Mul.make_args(arg) if _positive_constant(f)]
        arg = sympy.sign(coefficient) * sympy.Mul(*(f for f in sympy.Mul.make_args(arg) if not _positive_constant(f)))
        scale += [abs(coefficient)] if abs(coefficient) != 1 else []
        constant = sympy.Add(*(t for t in sympy.Add.make_args(arg) if not tensor_names(t)))
        exps = [t for t in sympy.Add.make_args(arg) if tensor_names(t)]
        if len(exps) == 1 and isinstance(exps[0], sympy.exp) and _positive_constant(-constant):
            arg = exps[0].args[0] - sympy.log(-constant)  # exp(v) - a
        elif len(exps) == 1 and isinstance(-exps[0], sympy.exp) and _positive_constant(constant):
            arg = sympy.log(constant) - (-exps[0]).args[0]  # a - exp(v)
        elif not scale:
            return node
        step = sympy.Heaviside(arg, *rest)  # (a number where SymPy knows the sign of arg)
        return plain(step) if isinstance(step, sympy.Heaviside) else step

    return _bottom_up(e, plain) if e.has(sympy.Heaviside) else e


def _positive_constant(f: sympy.Expr) -> bool:
    """A number or scalar parameter known to be positive (no tensor read)."""
    return not tensor_names(f) and bool(f.is_positive)


def hyperbolic_ratios(e: sympy.Expr) -> sympy.Expr:
    """``sinh(a)**k / cosh(a)**k = tanh(a)**k``: log(cosh(r))'s derivative is one bounded function,
    not a ratio of two that overflow (inf/inf at |r| > 89 in float32)."""

    def ratio(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Mul):
            return node
        powers = dict(f.as_base_exp() for f in node.args)
        for base, k in powers.items():
            if isinstance(base, sympy.sinh) and powers.get(sympy.cosh(*base.args)) == -k:
                return node / (base**k * sympy.cosh(*base.args) ** -k) * sympy.tanh(*base.args) ** k
        return node

    return _bottom_up(e, ratio)


def _bottom_up(e: sympy.Expr, fn: Callable[[sympy.Expr], sympy.Expr]) -> sympy.Expr:
    if isinstance(e, sympy.Basic) and e.args and not is_entry(e):
        e = e.func(*(_bottom_up(a, fn) for a in e.args))
    return fn(e) if isinstance(e, sympy.Expr) else e


def _cost(e: sympy.Expr) -> int:
    return int(sympy.count_ops(e)) + len([a for a in sympy.preorder_traversal(e) if is_entry(a)])


def _nested_sum(s: ISum) -> tuple[list[sympy.Symbol], sympy.Expr]:
    """``Σ_a g[a]·Σ_b f[a, b]`` as ``([a, b], g·f)``: the indices of the sums nested in ``s`` (alone or
    beside factors), outermost first, and the product under them all."""
    summed: list[sympy.Symbol] = []
    body: sympy.Expr = s
    while True:
        if isinstance(body, ISum):
            summed.append(body.var)
            body = body.body
            continue
        inner = [f for f in sympy.Mul.make_args(body) if isinstance(f, ISum)]
        if len(inner) != 1 or not isinstance(body, sympy.Mul):
            return summed, body
        others = [f for f in body.args if f is not inner[0]]
        if inner[0].var in free_indices(sympy.Mul(*others)):
            return summed, body
        summed.append(inner[0].var)
        body = sympy.Mul(*others, inner[0].body)


def absorb_into_sums(e: sympy.Expr, statements: list[Statement]) -> sympy.Expr:
    """``c · Σ_k f(k)`` -> ``Σ_k (c · f(k))`` when that forms a forward value inside the sum.

    ``v · Σ_n diff·g`` becomes ``Σ_n xhat·g`` because the forward pass computed ``xhat = diff·v``;
    the factor ``c`` must not depend on ``k``. A power moves in whole units, or in the fractional
    powers the forward's statements take (``(var+eps)**-1.5`` moves ``(var+eps)**-0.5`` in).
    """
    powers = _exponents(tuple(statements))

    def rewrite(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Mul):
            return node
        for _ in range(8):
            changed = False
            factors = list(node.args)
            for s_pos, s in enumerate(factors):
                if not isinstance(s, ISum):
                    continue
                for f_pos, f in enumerate(factors):
                    if f_pos == s_pos or not tensor_names(f):
                        continue
                    base, exp = f.as_base_exp()
                    summed, body = _nested_sum(s)  # Σ_c Σ_s: a value normalised over two dims
                    if not exp.is_number or set(summed) & free_indices(base):
                        continue
                    for unit in _units(exp, powers):
                        candidate = recognize(body * base**unit, statements)
                        if _cost(candidate) < _cost(body * base**unit):
                            rest = [g for i, g in enumerate(factors) if i not in (s_pos, f_pos)]
                            for var in reversed(summed):
                                candidate = ISum(candidate, var)
                            node = sympy.Mul(*rest, base ** (exp - unit), candidate)
                            changed = True
                            break
                    if changed:
                        break
                if changed:
                    break
            if not changed or not isinstance(node, sympy.Mul):
                break
        return node

    return _bottom_up(e, rewrite)


def bounded_exponentials(e: sympy.Expr) -> sympy.Expr:
    """Ratios of ``E = exp(v)`` to powers of ``1 + E`` written as polynomials in the bounded ``s = 1/(1 + E)``.

    ``E/(1 + E)**2 = s·(1 - s)``: where ``E`` overflows (``v`` beyond 88 in float32) the left side
    is ``inf/inf`` and the right side is exact. Applied to each elementwise part in which ``1 + E``
    divides, and kept only when every ``E`` goes (no ``1/s`` is left).
    """

    def rewrite(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, (sympy.Add, sympy.Mul, sympy.Pow)):
            return node
        if node.has(ISum, IMax, sympy.KroneckerDelta):  # sums are values here: (Σ_s a·b)·e/(1 + e)
            masked, back = _reductions_masked(node)
            if masked.has(ISum, IMax, sympy.KroneckerDelta):
                return node
            return rewrite(masked).xreplace(back)
        for E in sorted(node.atoms(sympy.exp), key=sympy.default_sort_key):
            if not any(_divides(p, E) for p in node.atoms(sympy.Pow)):
                continue
            s = sympy.Dummy("s")
            masked, back = _exps_of_sums_masked(node.xreplace(_through_s(node, E, s)))
            candidate = sympy.factor(sympy.cancel(sympy.together(masked))).xreplace(back)
            _, denominator = sympy.fraction(candidate)
            if denominator.has(s) or candidate.has(E):
                continue
            candidate = candidate.xreplace({s: 1 / (1 + E)})
            bounded = not node.xreplace({1 + E: 1 / s}).has(E)  # a part below was rewritten already
            if bounded and _cost(candidate) > _cost(node):
                continue  # factor() multiplied it out (mish's tanh terms): longer, and it cancels
            node = candidate
        return node

    return _bottom_up(e, rewrite)


def _reductions_masked(e: sympy.Expr) -> tuple[sympy.Expr, dict[sympy.Expr, sympy.Expr]]:
    """``e`` with each sum, max and δ a stand-in (the outermost ones), and the map back."""
    table: dict[sympy.Expr, sympy.Expr] = {}

    def mask(node: sympy.Expr) -> sympy.Expr:
        if isinstance(node, (ISum, IMax, sympy.KroneckerDelta)):
            return table.setdefault(node, sympy.Dummy(f"r{len(table)}", real=True))
        if not node.args or is_entry(node):
            return node
        return node.func(*(mask(a) for a in node.args))

    masked = mask(e)
    return masked, {v: k for k, v in table.items()}


def _through_s(node: sympy.Expr, E: sympy.Expr, s: sympy.Symbol) -> dict[sympy.Expr, sympy.Expr]:
    """``E = exp(v)`` as ``(1 - s)/s``, and each ``exp(k·v)`` of ``node`` (k an integer) as its k-th
    power: ``exp(2x)/(1 + exp(x))²`` is ``(1 - s)²``, where it had kept ``exp(2x)``, inf/inf past 44."""
    v = E.args[0]
    out: dict[sympy.Expr, sympy.Expr] = {E: (1 - s) / s}
    for a in node.atoms(sympy.exp):
        k = sympy.cancel(a.args[0] / v)
        if a != E and k.is_integer:
            out[a] = ((1 - s) / s) ** k
    return out


def _exps_of_sums_masked(e: sympy.Expr) -> tuple[sympy.Expr, dict[sympy.Expr, sympy.Expr]]:
    """``e`` with each ``exp(a + b)`` a positive stand-in (SymPy would split it in two, one of
    which may overflow), and the map back; an exp of one term stays, so ``exp(2x)`` still meets
    ``exp(x)`` as its square where :func:`bounded_exponentials` writes ``exp(x)`` through ``s``."""
    sums = sorted((a for a in e.atoms(sympy.exp) if isinstance(a.args[0], sympy.Add)), key=sympy.default_sort_key)
    table = {a: sympy.Dummy(f"exp{k}", positive=True) for k, a in enumerate(sums)}
    return e.xreplace(table), {v: k for k, v in table.items()}


def _exps_masked(e: sympy.Expr) -> tuple[sympy.Expr, dict[sympy.Expr, sympy.Expr]]:
    """``e`` with its exps as powers of positive stand-ins, one per argument up to a rational factor
    (``exp(x)``, ``exp(-x)``, ``exp(2x)`` are ``E``, ``1/E``, ``E²``), and the map back.

    SymPy's rational functions split ``exp(a - b)`` into ``exp(a)·exp(-b)``, which overflows where
    the whole is finite (``exp(s·ct - zmax)`` at s = 100), and take a lone ``exp(-v)`` for a
    denominator: ``x·exp(-x²/2) + c`` over it is ``(x + c·exp(x²/2))·exp(-x²/2)``, NaN past |x| = 13
    in a GELU's derivative. A stand-in keeps each argument whole, and a lone exp is its own unit
    (``exp(-x²/2)`` is ``E``, no denominator), while ``exp(x)`` beside ``exp(-x)`` still cancel."""
    units: dict[sympy.Expr, list[sympy.Expr]] = {}
    for a in sorted(e.atoms(sympy.exp), key=sympy.default_sort_key):
        coeff, rest = a.args[0].as_coeff_Mul()
        if rest.could_extract_minus_sign():
            coeff, rest = -coeff, -rest
        units.setdefault(rest, []).append(coeff)
    table: dict[sympy.Expr, sympy.Expr] = {}
    back: dict[sympy.Expr, sympy.Expr] = {}
    for k, (rest, coeffs) in enumerate(units.items()):
        step = min(
            coeffs, key=lambda c: (abs(c), bool(c.is_negative))
        )  # the unit: the smallest power, positive if it may be
        unit = sympy.Dummy(f"exp{k}", positive=True)
        back[unit] = sympy.exp(step * rest)
        for c in coeffs:
            table[sympy.exp(c * rest)] = unit ** (c / step)
    return e.xreplace(table), back


def _exp_over_one_plus_exp(e: sympy.Expr) -> bool:
    """Whether ``e`` divides by ``1 + E`` (``E = exp(v)``) and reads ``E`` elsewhere: ``E/(1 + E)``,
    inf/inf where ``E`` overflows, the form :func:`bounded_exponentials` rewrites."""
    s = sympy.Dummy("s")
    return any(
        any(_divides(p, E) for p in e.atoms(sympy.Pow)) and e.xreplace({1 + E: 1 / s}).has(E)
        for E in e.atoms(sympy.exp)
    )


def _divides(p: sympy.Pow, E: sympy.Expr) -> bool:
    """``p`` is ``(1 + E)**-k`` (or ``(E + 1)**-k``)."""
    return p.exp.is_negative and isinstance(p.base, sympy.Add) and set(p.base.args) == {sympy.S.One, E}


def _guarded_division(term: sympy.Expr) -> bool:
    """``step(a)·g/d``: a division the printed code guards by its step (``where(a > 0, g/d, 0)``, 0
    where ``d`` is 0 as autograd's is). Over a common denominator the step would guard only the
    numerator, and ``0/0`` is NaN: ``sqrt(h) + step(u)·x/sqrt(h)`` at ``h = relu(u) = 0``."""
    factors = sympy.Mul.make_args(term)
    stepped = any(f.has(sympy.Heaviside, sympy.Piecewise) for f in factors)
    return stepped and any(isinstance(f, sympy.Pow) and f.exp.is_negative and tensor_names(f.base) for f in factors)


def combine_fractions(e: sympy.Expr) -> sympy.Expr:
    """Put elementwise sub-expressions (no sums inside) over a common denominator when that is shorter."""

    def rewrite(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Add) or node.has(ISum, IMax, sympy.KroneckerDelta):
            return node
        if any(_guarded_division(t) for t in node.args):
            return node
        best = node
        masked, back = _exps_masked(node)
        for candidate in (sympy.together(masked).xreplace(back), sympy.cancel(sympy.together(masked)).xreplace(back)):
            if (
                _cost(candidate) < _cost(best)
                and tensor_names(sympy.fraction(candidate)[1])  # (over a number: no shorter to compute)
                and not (_exp_over_one_plus_exp(candidate) and not _exp_over_one_plus_exp(node))
            ):
                best = candidate  # (never back to the ratio bounded_exponentials took apart: they would take turns)
        return best

    return _bottom_up(e, rewrite)


def stable_forward(stmt: Statement, statements: list[Statement]) -> sympy.Expr:
    """A forward statement rewritten so ``log`` never sees an underflowing product or an overflowing exp.

    ``log(counts·counts_sum_inv)`` with ``counts = exp(norm_logits)`` becomes
    ``norm_logits - log(counts_sum)``: the same value, finite for logits of ±1e4. The rewrite is
    kept only when it removes an ``exp`` from under a ``log``, or bounds it: ``log(1 + exp(v))``
    becomes ``max(v, 0) + log(1 + exp(-|v|))``.
    """
    logs = [a for a in sympy.preorder_traversal(stmt.expr) if isinstance(a, sympy.log)]
    if not logs:
        return stmt.expr
    defs = {s.name: s for s in statements if not s.expr.has(ISum, IMax)}
    memo: dict[str, bool] = {}

    def feeds_exp(name: str) -> bool:
        """Whether the (elementwise) definition of ``name`` has an exp in it, directly or inside."""
        if name not in memo:
            memo[name] = False
            stmt_ = defs.get(name)
            memo[name] = stmt_ is not None and (
                stmt_.expr.has(sympy.exp) or any(feeds_exp(n) for n in tensor_names(stmt_.expr))
            )
        return memo[name]

    expr = stmt.expr
    for lg in logs:
        inlined = lg.args[0]
        for _ in range(len(defs)):
            targets = {e for e in inlined.atoms(sympy.core.function.AppliedUndef) if feeds_exp(entry_name(e))}
            if not targets:
                break
            inlined = inlined.xreplace({e: defs[entry_name(e)].at(entry_indices(e)) for e in targets})
        if not inlined.has(sympy.exp):
            continue
        expanded = sympy.expand_log(sympy.log(inlined), force=True)
        if any(isinstance(a, sympy.log) and a.args[0].has(sympy.exp) for a in sympy.preorder_traversal(expanded)):
            expanded = _softplus(inlined)
            if expanded is None:
                continue
        expr = expr.xreplace({lg: expanded})
    return expr


def _softplus(argument: sympy.Expr) -> sympy.Expr | None:
    """``log(1 + exp(v))`` as ``max(v, 0) + log(1 + exp(-|v|))``: the same value, finite for any ``v``
    (``exp(800)`` is inf in float32 and float64 alike); None for another argument."""
    if not isinstance(argument, sympy.Add) or len(argument.args) != 2 or 1 not in argument.args:
        return None
    (power,) = (a for a in argument.args if a != 1)
    if not isinstance(power, sympy.exp):
        return None
    v = power.args[0]
    return sympy.Max(v, 0) + sympy.log(1 + sympy.exp(-sympy.Abs(v)))


# -- identities of sums over forward values ----------------------------------------------------
def _function_of_an_entry(e: sympy.Expr) -> sympy.Expr | None:
    """The entry ``v[..]`` when ``e`` is ``f(v[..])`` for a function ``f`` of one argument."""
    if isinstance(e, sympy.Function) and len(e.args) == 1 and is_entry(e.args[0]):
        return e.args[0]
    return None


@dataclass
class SumIdentities:
    """``Σ_k v[.., k, ..]`` or ``Σ_k f(v[.., k, ..])`` for a forward value ``v``: found by expanding
    ``v`` one level.

    A value centred by its own mean sums to zero; a row divided by its own sum sums to one; so does
    the exp of a log-softmax, ``Σ_c exp(z[c] - log Σ_c' exp(z[c']))``.
    """

    program: Program
    found: dict[str, str] = field(default_factory=dict)

    def __call__(self, e: sympy.Expr) -> sympy.Expr:
        return _bottom_up(e, self._rewrite)

    def _rewrite(self, node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, ISum):
            return node
        summed, inner = _nested_sum(node)  # Σ_c Σ_s v[n, c, s]: a value centred over two dims at once
        value_of = inner if is_entry(inner) else _function_of_an_entry(inner)
        if value_of is None:
            return node
        name = entry_name(value_of)
        stmt = self.program.definitions.get(name)
        if stmt is None:
            return node
        body = inner.xreplace({value_of: stmt.at(entry_indices(value_of))})
        expanded = body if is_entry(inner) else sympy.expand(body)  # exp(a - b) = exp(a)/exp(b)
        for var in reversed(summed):
            expanded = ISum(expanded, var)
        value = simplify_plain(expanded, self.program)
        if value.is_number:
            from .notation import text

            indices = list(entry_indices(value_of))
            if all(var in indices for var in summed):  # state the identity on the tensor's own indices
                canonical = ",".join(str(stmt.target.indices[indices.index(var)]) for var in summed)
                self.found[name] = f"Σ_{canonical} {text(stmt.target.at())} = {value}"
            else:
                self.found[name] = f"{text(node)} = {value}"
            return value
        return node


def simplify_plain(e: sympy.Expr, program: Program) -> sympy.Expr:
    """Sums, deltas and forward values to a fixed point (no sum identities)."""
    statements = list(program.statements)
    for _ in range(12):
        new = canonical_bound(recognize(combine_powers(split_sums(e)), statements))
        new = sympy.expand(new, deep=False, power_base=False, power_exp=False, log=False, multinomial=False)
        if new == e:
            break
        e = new
    return e


@lru_cache(maxsize=64)
def _exponents(statements: tuple[Statement, ...]) -> frozenset[sympy.Expr]:
    """The exponents of the powers the forward's statements take (once per program)."""
    return frozenset(
        p.exp for stmt in statements for p in sympy.preorder_traversal(stmt.expr) if isinstance(p, sympy.Pow)
    )


def _units(exp: sympy.Expr, powers: frozenset[sympy.Expr]) -> list[sympy.Expr]:
    """The parts of a power ``B**exp`` that may move into a sum: one whole unit of its sign, then
    each fractional power of the forward's statements that ``exp`` covers.

        >>> _units(sympy.S(-2), frozenset()), _units(sympy.Rational(-3, 2), frozenset({sympy.Rational(-1, 2), sympy.S(2)}))
        ([-1], [-1, -1/2])
    """
    whole = [sympy.sign(exp)] if abs(exp) >= 1 else []
    parts = [p for p in powers if p.is_number and not p.is_integer and _covers(exp, p)]
    return whole + sorted(parts, key=lambda p: -abs(p))


class Simplifier:
    """Applies the rules to a fixed point and keeps a log of what each one did."""

    def __init__(self, program: Program, identities: bool = True):
        self.program = program
        self.sums = SumIdentities(program)
        statements = list(program.statements)
        self.rules: list[tuple[str, str, Callable[[sympy.Expr], sympy.Expr]]] = [
            ("split sums", "Σ_k δ(k,a)·f(k) = f(a);  Σ_k (a+b) = Σ_k a + Σ_k b;  Σ_k c·f(k) = c·Σ_k f(k)", split_sums),
            ("combine powers", "x^p / x = x^(p-1): no division by a base that may be 0", combine_powers),
            ("hyperbolic ratios", "sinh(a)/cosh(a) = tanh(a): bounded, where the ratio overflows", hyperbolic_ratios),
            (
                "drop implied steps",
                "max(a, 0)^k · step(a) = max(a, 0)^k: the max is 0 where the step is",
                drop_implied_steps,
            ),
            (
                "plain step arguments",
                "step(c·w) = step(w) for c > 0;  step(a - exp(v)) = step(log(a) - v) for a > 0: exp increases",
                plain_step_arguments,
            ),
            (
                "steps in their region",
                "step(a)·step(b - max(a, 0)) = step(a)·step(b - a): the max is a where the first step is 1",
                steps_in_their_region,
            ),
            (
                "bounded exponentials",
                "e/(1+e) = 1 - 1/(1+e): ratios of exponentials written with the bounded 1/(1+e), which never overflows",
                bounded_exponentials,
            ),
            (
                "reuse forward values",
                "a sub-expression the forward pass computed is replaced by its name",
                lambda x: recognize(x, statements, powers=identities),
            ),
            (
                "exps of forward values",
                "exp(z)/S = exp(v) for a forward value v = z - log(S): a softmax read through its log-softmax",
                lambda x: exps_of_forward_values(x, statements),
            ),
            (
                "absorb into sums",
                "c·Σ_k f(k) = Σ_k c·f(k) when c·f is a forward value",
                lambda x: absorb_into_sums(x, statements),
            ),
        ]
        if identities:
            self.rules.append(("sum identities", "", self.sums))
        self.rules.append(
            ("combine fractions", "a/(a+b) style rational simplification of elementwise parts", combine_fractions)
        )

    def run(self, e: sympy.Expr) -> tuple[sympy.Expr, list[Step]]:
        steps: list[Step] = []
        for _ in range(12):
            before = e
            for name, identity, rule in self.rules:
                self.sums.found.clear()
                new = canonical_bound(rule(e))
                if new != e:
                    text = identity or "; ".join(self.sums.found.values())
                    steps.append(Step(name, text, new))
                    e = new
            if e == before:
                break
        cancelled = cancel_deltas(e)
        if cancelled != e:
            e = cancelled
            steps.append(Step("cancel δ terms", "a·(b - δ) + a·δ = a·b: products over δ terms distributed", e))
        dropped = drop_zero_delta_terms(e, self.program.statements)
        if dropped != e:
            e = dropped
            steps.append(Step("δ terms that sum to 0", "δ·(1 - (e + S)/p) = 0 where the forward defined p = e + S", e))
        for _ in range(2):  # collecting factors may bring sums over one index side by side
            merged = merge_sums(e)
            if merged != e:
                e = merged
                steps.append(Step("merge sums", _MERGE, e))
            collected = _collect(e)
            if collected == e:
                break
            e = collected
            steps.append(Step("collect", "factor common factors out of sums of terms", e))
        return e, steps


def _surface_deltas(e: sympy.Expr) -> sympy.Expr:
    """Products distributed over the sums that hold a δ, so every δ term stands at the top level."""
    if isinstance(e, sympy.Add):
        return sympy.Add(*(_surface_deltas(t) for t in e.args))
    if not isinstance(e, sympy.Mul):
        return e
    factors = [_surface_deltas(f) for f in e.args]
    for k, (f, was) in enumerate(zip(factors, e.args)):
        if isinstance(f, sympy.Add) and _deltas(was):  # a sum that held a δ, cancelled or not
            rest = sympy.Mul(*factors[:k], *factors[k + 1 :])
            return sympy.Add(*(_surface_deltas(rest * t) for t in f.args))
    return sympy.Mul(*factors)


def _deltas(e: sympy.Expr) -> list[sympy.KroneckerDelta]:
    """The δ factors of ``e`` outside any sum or function: one entry per occurrence."""
    if isinstance(e, sympy.KroneckerDelta):
        return [e]
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return [d for a in e.args for d in _deltas(a)]
    return []


def cancel_deltas(e: sympy.Expr, most_terms: int = 64) -> sympy.Expr:
    """``-C·(p - δ) - C·δ = -C·p``: δ terms that cancel once the products over them are distributed.

    The max subtracted for a stable softmax leaves ``δ(c, argmax)`` terms that cancel only when
    expanded; left in, each is a one-hot of the input's size. ``e`` is returned unchanged unless
    distributing removes a δ (and stays within ``most_terms`` terms).
    """
    before = _deltas(e)
    if not before:
        return e
    flat = _surface_deltas(e)
    if len(sympy.Add.make_args(flat)) > most_terms:
        return e
    after = _deltas(flat)
    return flat if len(set(after)) < len(set(before)) or len(after) < len(before) else e


def drop_zero_delta_terms(e: sympy.Expr, statements: tuple[Statement, ...], most_terms: int = 64) -> sympy.Expr:
    """The terms at one δ whose coefficients add up to 0 once the forward values they divide by are
    written out, dropped: ``δ(c, argmax)·(1 - exp(a - m)/p - Σ_c exp(x - m)/p)`` with
    ``p = exp(a - m) + Σ_c exp(x - m)``. Left in, each is a scatter of exact zeros (and rounding)."""
    if not _deltas(e):
        return e
    flat = _surface_deltas(e)
    terms = sympy.Add.make_args(flat)
    if len(terms) > most_terms:
        return e
    groups: dict[tuple, list[sympy.Expr]] = {}
    for t in terms:
        groups.setdefault(tuple(sorted(_deltas(t), key=sympy.default_sort_key)), []).append(t)
    zero = [
        key
        for key, ts in groups.items()
        if key and _is_zero(sympy.Add(*(t.xreplace({d: 1 for d in key}) for t in ts)), statements)
    ]
    if not zero:
        return e
    return sympy.Add(*(t for key, ts in groups.items() if key not in zero for t in ts))


def _is_zero(coefficient: sympy.Expr, statements: tuple[Statement, ...]) -> bool:
    """Whether ``coefficient`` is 0 with each forward value it divides by written out one level, in
    terms of the values before it (``p``'s inline max read as the ``m`` the coefficient reads)."""
    written: dict[sympy.Expr, sympy.Expr] = {}
    divisors = [p.base for p in coefficient.atoms(sympy.Pow) if p.exp.is_negative]
    for a in {a for b in divisors for a in b.atoms(sympy.core.function.AppliedUndef)}:
        k = next((k for k, s in enumerate(statements) if is_entry(a) and s.name == entry_name(a)), None)
        if k is None:
            continue
        stmt = statements[k]
        expr = recognize(stmt.expr, list(statements[:k]))
        written[a] = substitute_indices(expr, dict(zip(stmt.target.indices, entry_indices(a))))
    if not written:
        return False
    masked, _ = _exps_masked(canonical_bound(coefficient.xreplace(written)))
    return sympy.cancel(sympy.together(masked)) == 0


_MERGE = "c·Σ_k f + d·Σ_k g = Σ_k (c·f + d·g): a difference per entry, summed once (no sums that cancel)"


def merge_sums(e: sympy.Expr) -> sympy.Expr:
    """``c1·Σ_k f1 + c2·Σ_k f2 = Σ_k (c1·f1 + c2·f2)``, factored, where ``c1``, ``c2`` read no index
    the sums do not: a difference taken entry by entry, then summed once.

    Splitting sums finds shared reductions, but ``Σ_t dout·x - mu·Σ_t dout`` subtracts two large sums
    that cancel (float32 loses every digit when ``|mu|`` dwarfs the spread of ``x``; a swish's
    ``Σ dout·out·x - Σ dout·out²`` where ``out ≈ x``), where ``Σ_t dout·(x - mu)`` does not. Applied
    to every sum of terms, outermost first, until nothing merges.
    """
    for _ in range(8):
        merged = _bottom_up(e, _merge_terms)
        if merged == e:
            return e
        e = merged
    return e


def _merge_terms(e: sympy.Expr) -> sympy.Expr:
    if not isinstance(e, sympy.Add):
        return e
    groups: dict[tuple, list[tuple[sympy.Expr, ISum]]] = {}
    rest = []
    for t in e.args:
        s = _mergeable_sum(t)
        if s is None:
            rest.append(t)
            continue
        groups.setdefault((dim_of(s.var), frozenset(free_indices(s))), []).append((t / s, s))
    if all(len(g) == 1 for g in groups.values()):
        return e
    for group in groups.values():
        if len(group) == 1:
            rest.append(group[0][0] * group[0][1])
            continue
        taken = set().union(*(free_indices(c * s) | bound_indices(c * s) for c, s in group))
        var = fresh_index(dim_of(group[0][1].var), taken)
        body = sympy.factor_terms(sympy.Add(*(c * substitute_indices(s.body, {s.var: var}) for c, s in group)))
        if _elementwise_difference(body):
            rest.append(ISum(body, var))
        else:
            rest += [c * s for c, s in group]
    return sympy.Add(*rest)


def _mergeable_sum(term: sympy.Expr) -> ISum | None:
    """The sum of ``term`` that its other factors could move into without it reading more indices
    (``Σ_s k·p`` in ``Σ_s(dp·p)·Σ_s(k·p)``, whose other factor reads no ``d``); the one reading most."""
    sums = [f for f in sympy.Mul.make_args(term) if isinstance(f, ISum) and not f.body.has(sympy.KroneckerDelta)]
    fits = [s for s in sums if free_indices(term / s) <= free_indices(s)]
    return max(fits, key=lambda s: (len(free_indices(s)), sympy.default_sort_key(s)), default=None)


def _elementwise_difference(body: sympy.Expr) -> bool:
    """Whether a merged body is a common factor that reads a tensor times sums over its own entries
    (``dout·(x - mu)``): merged, the sum stays one pass over the common factor. Sums of different
    products (``Wk·dk + Wq·dq``, matrix products) stay apart."""
    factors = sympy.Mul.make_args(body)
    common = [f for f in factors if not isinstance(f, sympy.Add)]
    differences = [f for f in factors if isinstance(f, sympy.Add)]
    spans = set().union(*(free_indices(f) for f in common))
    return (
        bool(tensor_names(sympy.Mul(*common)))
        and any(tensor_names(f) for f in differences)  # (1 - 1/D)·Σ x is a scale: no difference to take
        and all(free_indices(f) <= spans for f in differences)
    )


def _collect(e: sympy.Expr) -> sympy.Expr:
    """Combine like terms and factor common factors out of a sum (keeps sums unexpanded)."""
    return _tidy_signs(_common_powers(sympy.factor_terms(_combine_scalar_multiples(e))))


def _common_powers(e: sympy.Expr) -> sympy.Expr:
    """A base every term divides by, factored out at its smallest power: ``a/sqrt(v) + b/v`` is
    ``(a + b/sqrt(v))/sqrt(v)``, one scale of the whole sum (``factor_terms`` leaves it alone).
    Only a base that reads a tensor (``eps + var[n]``): a size or a parameter stays a coefficient.
    """
    if not isinstance(e, sympy.Add):
        return e
    powers = [dict(_negative_powers(t)) for t in e.args]
    common = set(powers[0]).intersection(*powers[1:])
    if not common:
        return e
    scale = sympy.Mul(*(base ** max(p[base] for p in powers) for base in sorted(common, key=sympy.default_sort_key)))
    return sympy.Mul(scale, sympy.Add(*(t / scale for t in e.args)), evaluate=False)


def _negative_powers(term: sympy.Expr) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """``(base, exponent)`` of each factor of ``term`` that divides by a base that reads a tensor."""
    return [
        f.as_base_exp()
        for f in sympy.Mul.make_args(term)
        if isinstance(f, sympy.Pow) and f.exp.is_number and f.exp < 0 and tensor_names(f.base)
    ]


def _combine_scalar_multiples(e: sympy.Expr) -> sympy.Expr:
    """``(1 - eps)·p + eps·p = p``: terms whose tensor parts agree add their scalar coefficients.

    SymPy combines ``2·p + 3·p`` itself, but not terms whose coefficients are parameters or sizes.
    """
    if not isinstance(e, sympy.Add):
        return e
    groups: dict[sympy.Expr, list[sympy.Expr]] = {}
    for t in e.args:
        scalar = sympy.Mul(*(f for f in sympy.Mul.make_args(t) if not tensor_names(f) and not free_indices(f)))
        groups.setdefault(t / scalar, []).append(scalar)
    if all(len(scalars) == 1 for scalars in groups.values()):
        return e
    return sympy.Add(*(sympy.factor_terms(sympy.Add(*scalars)) * rest for rest, scalars in groups.items()))


def _tidy_signs(e: sympy.Expr) -> sympy.Expr:
    """``-(-a + b)·c`` reads better as ``(a - b)·c``: absorb a leading minus into a sum factor."""
    if isinstance(e, sympy.Add):
        return sympy.Add(*(_tidy_signs(t) for t in e.args))
    if not isinstance(e, sympy.Mul):
        return e
    coeff, rest = e.as_coeff_mul()
    adds = [f for f in rest if isinstance(f, sympy.Add)]
    if coeff.is_negative and len(adds) == 1:
        flipped = sympy.Add(*(-t for t in adds[0].args))
        others = [f for f in rest if f is not adds[0]]
        return sympy.Mul(-coeff, flipped, *others)
    return e


__all__ = ["Flat", "Simplifier", "Step", "recognize", "simplify_plain", "split_sums", "tensor_names"]
