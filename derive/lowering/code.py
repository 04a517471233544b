"""The lowering stage as a whole: a program and its simplified gradients in, lines of torch code out.

Passes, in order: :mod:`.share` decides which forward values the backward reads (and which
costly sub-expressions repeat); :class:`.lowerer.Lowerer`, with the contraction planner of
:mod:`.plan`, prints the forward, the fused backward and the atom-by-atom chain.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import sympy

from ..autodiff import grad_name
from ..errors import OpDefinitionError
from ..indexalg import (
    ArgMax,
    Dim,
    IMax,
    ISum,
    dim_of,
    entry,
    entry_indices,
    entry_name,
    free_indices,
    is_entry,
    is_index,
    size_key,
    substitute_indices,
    tensor_names,
)
from ..notation import text
from ..program import Program, TensorInfo
from ..simplify import canonical_bound, recognize, stable_forward
from . import blocks, extrema, regions, share
from .finite import finite_values, may_overflow, stays_finite
from .lowerer import Lowerer, Sharding
from .printer import FAITHFUL, MASKING, PRINTER, size_code
from .reductions import share_reductions


@dataclass
class Code:
    """Lowered code of the generated module's three functions."""

    sizes: list[tuple[str, str]]
    forward: list[str]
    reference_forward: list[str]
    saved: list[str]
    backward: list[str]
    backward_steps: list[str]
    steps_outputs: list[str]
    # forward sub-expressions kept for the backward: (name, "name[i] = its value", the statement computing it)
    saved_values: list[tuple[str, str, str]] = field(default_factory=list)
    # sharded: (local size variable, global size variable), e.g. ("N", "N_all"); None when not
    shard: tuple[str, str] | None = None
    # the fused backward on blocks of rows (lowering.blocks), for a large batch on a CPU; None when
    # its batch cannot be cut
    in_blocks: InBlocks | None = None


@dataclass(frozen=True)
class InBlocks:
    """The fused backward's lines on blocks of rows, the names a block rebinds, and the code of the
    tensors along the batch it reads, whose bytes decide whether to cut the batch."""

    lines: list[str]
    rebound: list[str]
    probe: str


@dataclass(frozen=True)
class ChainTerm:
    """One contribution of the chain rule: ``d<target> += expr``, pushed back by statement ``source``."""

    target: TensorInfo
    source: str
    expr: sympy.Expr


def _values(e: sympy.Expr) -> sympy.Expr:
    return regions.clamped(extrema.as_extrema(_complements(e)))


def _complements(e: sympy.Expr) -> sympy.Expr:
    """``c - c/(1 + exp(v))`` (among other terms of a sum) as ``c/(1 + exp(-v))``: the same value,
    without the cancellation that makes it 0 in float32 below v = -17 (where it is c·exp(v)); bounded,
    as before."""

    def complement(node: sympy.Basic) -> sympy.Basic:
        if not isinstance(node, sympy.Add):
            return node
        number = next((a for a in node.args if a.is_Number), None)
        if number is None:
            return node
        for term in node.args:
            coeff, ratio = term.as_coeff_Mul()
            if coeff != -number or not (isinstance(ratio, sympy.Pow) and ratio.exp == -1):
                continue
            exps = [a for a in sympy.Add.make_args(ratio.base) if isinstance(a, sympy.exp)]
            if len(exps) == 1 and ratio.base - exps[0] == 1:
                return node - number - term + number / (1 + sympy.exp(-exps[0].args[0]))
        return node

    return e.replace(lambda n: isinstance(n, sympy.Add), complement) if e.has(sympy.exp) else e


def lower_program(
    program: Program,
    gradients: list[tuple[TensorInfo, sympy.Expr]],
    chain: list[ChainTerm],
    shard: Dim | None = None,
) -> Code:
    """Lower the forward statements, the fused gradients and the chain into torch code lines.

    With ``shard``, that dim is split across processes: every reduction over it becomes a local
    one plus an all-reduce, and its size in arithmetic is the global one (shapes stay local).
    The reference forward (autograd's, in one process) is lowered unsharded.
    """
    # autograd's forward: as written, but for a transcendental branch's value where it is not taken
    reference = tuple(replace(s, expr=regions.guarded(s.expr)) for s in program.statements)
    # values only, after differentiation: a Piecewise that is a clamp as one, exps and squares in
    # branches of values clamped to their regions
    program = replace(program, statements=tuple(replace(s, expr=_values(s.expr)) for s in program.statements))
    gradients = [(wrt, _values(e)) for wrt, e in gradients]
    chain = [replace(c, expr=_values(c.expr)) for c in chain]
    tensors = program.tensors
    layouts = _layouts(program)

    exprs = [e for _, e in gradients] + [c.expr for c in chain]
    saved_values, exprs = share.forward_values(program, exprs, set(layouts) | {p.name for p in program.params})
    fused = exprs[: len(gradients)]
    steps_exprs = exprs[len(gradients) :]
    for s in saved_values:
        layouts[s.name] = s.statement.target
    fits = _admissible(program)
    named_fits = _admissible(program, written=False)
    positions = program.index_dims
    for s in saved_values:  # a kept argmax is a position along the dim it maximised over
        if isinstance(s.statement.expr, ArgMax):
            positions[s.name] = dim_of(s.statement.expr.var)
    names = set(layouts) | {
        p.name for p in program.params
    }  # a temporary takes neither a tensor's nor a parameter's name

    sizes = _size_lines(program)
    ref = program.differentiable_inputs[0].name
    distributed = sharding(program, shard)
    finite = finite_values(program, [s.statement for s in saved_values])
    overflowing = frozenset(s.name for s in saved_values if may_overflow(s.statement.expr))
    fwd = Lowerer(
        layouts,
        ref=ref,
        names=names,
        single_assignment=True,
        admissible=fits,
        named_admissible=named_fits,
        positions=positions,
        printer=FAITHFUL,
        shard=distributed,
        finite=finite,
    )
    # the reference forward for autograd: every statement its own tensor (no shared temporaries,
    # or retain_grad on one name would collect the gradients of its look-alikes)
    plain = Lowerer(
        layouts,
        ref=ref,
        names=names,
        share=False,
        admissible=fits,
        named_admissible=named_fits,
        positions=positions,
        printer=FAITHFUL,
    )
    statements = list(program.statements)
    # the statements as written; a stabler form only when the op asks for it (@op(stable_forward=True))
    stabler = (lambda s: stable_forward(s, statements)) if program.stable_forward else None
    written = [s.expr if stabler is None else stabler(s) for s in statements]
    # a sum written twice inline is one value (Σ_j a·Σ_j2 a is (Σ_j a)**2), not a network of both
    written = [canonical_bound(e) for e in written]
    # a value an earlier statement holds, written again inside another ((x @ W) twice), is read, not
    # recomputed; a statement that is that value whole stays a tensor of its own (an output, say)
    read_again = [recognize(e, statements[:k], powers=False) for k, e in enumerate(written)]
    written = [e if is_entry(r) else r for e, r in zip(written, read_again)]
    forward = [share.host_expression(s.name, e, saved_values, stabler) for s, e in zip(statements, written)]
    forward = [  # a value kept out of an earlier statement is read where a later one holds it too
        share.read_earlier(e, saved_values, {s.name for s in statements[:k]}) for k, e in enumerate(forward)
    ]
    if distributed is not None:
        forward, fused, steps_exprs = (
            [distributed.global_sizes(e) for e in es] for es in (forward, fused, steps_exprs)
        )
    keeps = {
        stmt.name: [
            (s, value if distributed is None else distributed.global_sizes(value))
            for s, value in share.saved_in_order(saved_values, stmt.name, stabler)
        ]
        for stmt in statements
    }
    # the exp of a log-softmax the forward keeps, from the exps its sum took (one exp, not two)
    computed = share.exps_computed(forward)
    keeps = {
        name: [(s, share.exp_through_logs(value, statements, computed)) for s, value in values]
        for name, values in keeps.items()
    }
    fwd.repeated = share.repeated(forward + [value for values in keeps.values() for _, value in values])
    for stmt, expr in zip(statements, forward):
        for s, value in keeps[stmt.name]:
            fwd.assign(s.name, value, s.statement.target)
        fwd.assign(stmt.name, expr, stmt.target)
    for stmt in reference:
        plain.assign(stmt.name, stmt.expr, stmt.target)

    seed = program.seed_name(program.output)

    def backward_lowerer() -> Lowerer:
        return Lowerer(
            layouts,
            ref=seed,
            names=names,
            single_assignment=True,
            fuse_arithmetic=True,
            admissible=fits,
            named_admissible=named_fits,
            positions=positions,
            shard=distributed,
            printer=MASKING if all(stays_finite(e, overflowing) for e in fused) else PRINTER,
            finite=finite,
            returned=frozenset(t.name for t in program.differentiable_inputs),
        )

    reuses = [
        _reuse_of(e, wrt, [(w, f) for (w, _), f in zip(gradients[:k], fused)])
        for k, ((wrt, _), e) in enumerate(zip(gradients, fused))
    ]
    values = [
        blocks.Value(grad_name(wrt.name), e if reused is None else reused, wrt)
        for (wrt, _), e, reused in zip(gradients, fused, reuses)
    ]
    returned = {grad_name(t.name) for t in program.differentiable_inputs}
    reads = {v.name for v, reused in zip(values, reuses) if reused is not None}
    backward = _backward_lines(backward_lowerer(), values, frozenset(), returned, reads)
    blocking = None
    if distributed is None and not program.several_outputs:
        blocking = blocks.plan(values, layouts, _batch_dim(program, gradients), names | set(layouts), returned)
    in_blocks = None
    if blocking is not None:
        layouts.update(blocking.sums)  # the sums over the batch: tensors the sweeps after read
        names.update(blocking.sums)  # and names no temporary of theirs may take
        in_blocks = _blocked_lines(backward_lowerer, blocking, program, layouts, returned, reads)
    steps = Lowerer(
        layouts,
        ref=seed,
        names=names,
        admissible=fits,
        named_admissible=named_fits,
        positions=positions,
        printer=FAITHFUL,
        shard=distributed,
        returned=frozenset(t.name for t in program.differentiable_inputs),
    )
    steps.repeated = share.repeated(steps_exprs)
    assigned: set[str] = set()
    outputs = list(program.outputs)
    for o in program.outputs:  # an output statements read: its gradient starts as the one given
        if program.seed_name(o) != grad_name(o):
            steps.assign(grad_name(o), entry(program.seed_name(o), tensors[o].indices), tensors[o])
            assigned.add(grad_name(o))
    for c, e in zip(chain, steps_exprs):
        name = grad_name(c.target.name)
        steps.assign(name, e, c.target, accumulate=name in assigned, comment=f"{c.target.name} <- {c.source}")
        if name not in assigned:
            outputs.append(c.target.name)
        assigned.add(name)
    for t in program.differentiable_inputs:  # unused, or every path cancelled: a zero gradient
        if grad_name(t.name) not in assigned:
            steps.assign(grad_name(t.name), sympy.S.Zero, t, comment=f"{t.name}: no path to the output")
            outputs.append(t.name)

    needed: set[str] = set()
    for e in exprs:
        needed |= tensor_names(e)
    kept = [n for n in list(tensors) + [s.name for s in saved_values] if n in needed]
    described = [(s.name, f"{text(s.read)} = {text(s.original)}", s.host) for s in saved_values]
    return Code(
        sizes,
        fwd.lines,
        plain.lines,
        kept,
        backward,
        steps.lines,
        [o for o in tensors if o in outputs],
        described,
        None if distributed is None else (str(distributed.dim.size), str(distributed.total)),
        in_blocks,
    )


def _backward_lines(
    bwd: Lowerer, values: list[blocks.Value], sums: frozenset[str], kept: set[str], reads: set[str]
) -> list[str]:
    """Lines computing ``values`` in order with ``bwd``; a name in ``sums`` is added to its value so far.

    A value named in ``reads`` is another gradient's entry (``dx = -dw``): read, not computed; what
    the other formulas share is computed once. Large temporaries are deleted after their last
    reader, but for the names in ``kept`` and ``sums``.
    """
    bwd.repeated = share.repeated(
        [v.expr for v in values if v.name not in reads], steps=bwd.printer is MASKING, cheap=True
    )
    for v in values:
        bwd.assign(v.name, v.expr, v.target, accumulate=v.name in sums)
    large = {n for n, r in bwd.rank.items() if r >= 2} | {v.name for v in values if len(v.target.dims) >= 2}
    ranks = {**{n: len(t.layout) for n, t in bwd.layouts.items()}, **bwd.rank}
    lines = share_reductions(fold_products(bwd.lines, bwd.products, ranks), lambda: bwd.fresh_name("r"))
    return release_dead(lines, large - kept - sums)


def _batch_dim(program: Program, gradients: list[tuple[TensorInfo, sympy.Expr]]) -> Dim | None:
    """The dim row blocks would cut: the output's first axis, or for a scalar output the first axis
    of the first gradient's input (a block of it is then contiguous); None where that axis is size 1."""
    out = program.tensors[program.output]
    for t in [out] + [wrt for wrt, _ in gradients]:
        if t.layout:
            return t.layout[0]
    return None


def _blocked_lines(
    make: Callable[[], Lowerer],
    blocking: blocks.Blocking,
    program: Program,
    layouts: dict[str, TensorInfo],
    returned: set[str],
    reads: set[str],
) -> InBlocks | None:
    """The fused backward as sweeps over blocks of rows (:mod:`.blocks`).

    Each sweep is a loop over ``_row_blocks``: the tensors along the batch dim are read a block at
    a time, under their own names (so the lines inside are the backward's own), and the batch
    size's variable is the block's row count; ``N_all`` is the whole batch's.
    """
    dim, size = blocking.dim, size_code(blocking.dim.size)
    seed = program.seed_name(program.output)
    # a group's lines delete their own temporaries only: a value may be read by a later group
    returned = returned | {v.name for s in blocking.sweeps for v in s.values}
    returned |= {v.name for group in blocking.between for v in group}
    lines = [f"{size}_all = {size}"]
    rebound: set[str] = set()
    whole: dict[str, str] = {}  # a tensor along the batch -> the code of all its rows
    lines += _backward_lines(make(), list(blocking.between[0]), frozenset(), returned, reads)
    ones = next(name for name in ("ones", "ones_", "ones__") if name not in layouts)
    layouts[ones] = TensorInfo(ones, (dim,))
    for sweep, after in zip(blocking.sweeps, blocking.between[1:]):
        # a sum over a block's rows as a matrix-vector product with ones: on a CPU about twice as
        # fast as a column sum, and within a block's rows as accurate
        values = [replace(v, expr=_by_ones(v.expr, ones)) if v.name in sweep.sums else v for v in sweep.values]
        body = _backward_lines(make(), values, sweep.sums, returned | sweep.whole, reads)
        if any(re.search(rf"(?<![\w.]){ones}\b", line) for line in body):
            body.insert(0, f"{ones} = {seed}.new_ones({size})")
        body = _written_into_rows(body, sweep, dim, size)
        made = {v.name for v in sweep.values}
        read = sorted(
            {n for v in sweep.values for n in tensor_names(v.expr) if n not in made}
            & {n for n, t in layouts.items() if dim in t.dims and n not in blocking.sums},
            key=lambda n: (n != seed, n),
        )
        for n in read:
            whole.setdefault(n, "grad_output" if n == seed else f'saved["{n}"]')
        lines += [f"{v.name} = 0" for v in sweep.values if v.name in sweep.sums]
        lines += [f"{n}_all = None" for n in sorted(sweep.whole)]
        before, body = loop_invariant(body, set(read) | set(sweep.sums) | {size, "start"})
        lines += before
        lines.append(f"for start, {size} in _row_blocks({size}_all, {', '.join(whole[n] for n in read)}):")
        for n in read:
            lines.append(f"    {n} = {whole[n]}.narrow({layouts[n].layout.index(dim)}, start, {size})")
        lines += ["    " + line for line in body]
        for v in sweep.values:
            if v.name in sweep.whole:
                axis = v.target.layout.index(dim)
                lines.append(f"    {v.name}_all = _put_rows({v.name}_all, {v.name}, {axis}, start, {size}_all)")
        whole.update({n: f"{n}_all" for n in sweep.whole})
        rebound |= set(read)
        lines += _backward_lines(make(), list(after), frozenset(), returned, reads)
    lines += [f"{n} = {n}_all" for s in blocking.sweeps for n in sorted(s.whole)]
    given = [code for code in whole.values() if not code.endswith("_all")]  # the seed first
    if not given:
        return None  # nothing along the batch to read a block of
    return InBlocks([f"{seed} = grad_output"] + lines, sorted(rebound), ", ".join(given))


# torch functions that take ``out=``: a block's value whose chain starts with one is computed in
# the rows of its whole tensor, not copied there
_WITH_OUT = {
    "abs",
    "add",
    "addcdiv",
    "addcmul",
    "clamp",
    "div",
    "erf",
    "exp",
    "lerp",
    "log",
    "maximum",
    "minimum",
    "mul",
    "neg",
    "pow",
    "rsqrt",
    "sigmoid",
    "sign",
    "sqrt",
    "square",
    "sub",
    "tanh",
    "where",
}


def _written_into_rows(body: list[str], sweep: blocks.Sweep, dim: Dim, size: str) -> list[str]:
    """``body`` with the last line computing each value kept whole writing into its rows of it."""
    out = list(body)
    for v in sweep.values:
        if v.name not in sweep.whole:
            continue
        at = [k for k, line in enumerate(out) if line.startswith(f"{v.name} = ")]
        if at:
            rows = f"_rows_out({v.name}_all, {v.target.layout.index(dim)}, start, {size})"
            out[at[-1]] = f"{v.name} = {into(out[at[-1]][len(v.name) + 3 :], rows)}"
    return out


def into(code: str, out: str) -> str:
    """``code`` with the call that makes its buffer, the first of a chain of in-place methods, given
    ``out=``; ``code`` itself where that is no torch function that takes one.

    Example:
        >>> into("torch.addcmul(a, b, c).addcmul_(d, e).mul_(f)", "o")
        'torch.addcmul(a, b, c, out=o).addcmul_(d, e).mul_(f)'
        >>> into("(a * b).add_(c)", "o")
        '(a * b).add_(c)'
        >>> into("torch.where(m, a, 0.0).add_(b)", "o")
        'torch.where(m, a, 0.0).add_(b)'
    """
    tree = ast.parse(code, mode="eval")
    node = tree.body
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_"):
        node = node.func.value  # the receiver of an in-place method
    made = (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
        and node.func.attr in _WITH_OUT
        and not any(k.arg == "out" for k in node.keywords)
    )
    if not made or not isinstance(node, ast.Call):
        return code
    if getattr(node.func, "attr", "") == "where" and any(_number_literal(a) for a in node.args[1:]):
        return code  # torch.where(c, a, 0.0, out=...) is refused: with out=, both values must be tensors
    node.keywords.append(ast.keyword(arg="out", value=ast.parse(out, mode="eval").body))
    return ast.unparse(tree)


def _number_literal(node: ast.expr) -> bool:
    """``0.0``, ``-1``: a number written in the code (not a tensor)."""
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float))


def _by_ones(e: sympy.Expr, ones: str) -> sympy.Expr:
    """``Σ_n body`` as ``Σ_n ones[n]·body``: the planner contracts it with a vector of ones."""
    if not isinstance(e, ISum):
        return e
    return ISum(entry(ones, [e.var]) * e.body, e.var)


def loop_invariant(body: list[str], varying: set[str]) -> tuple[list[str], list[str]]:
    """``body`` (a loop's lines) split into the lines that read nothing ``varying`` (nor what such a
    line computes), to run once before the loop, and the rest, in order. A value changed in place
    or assigned twice in the loop varies; a ``del`` of a value computed before the loop is dropped.

    Example:
        >>> loop_invariant(["s1 = g * v", "t2 = x * s1", "del s1", "dx = t2.mul_(2)"], {"x"})
        (['s1 = g * v'], ['t2 = x * s1', 'dx = t2.mul_(2)'])
    """
    assigned = Counter(m.group(1) for line in body if (m := _ASSIGNMENT.fullmatch(line)))
    changed = {name for name in assigned if any(re.search(rf"\b{name}\.\w+_\(|out={name}\b", line) for line in body)}
    varying = set(varying) | changed | {name for name, count in assigned.items() if count > 1}
    before: list[str] = []
    inside: list[str] = []
    for line in body:
        m = _ASSIGNMENT.fullmatch(line)
        words = set(re.findall(r"[A-Za-z_]\w*", m.group(2) if m else line))
        if m and m.group(1) not in varying and not words & varying:
            before.append(line)
        elif m:
            varying.add(m.group(1))
            inside.append(line)
        else:
            inside.append(line)
    hoisted = {_ASSIGNMENT.fullmatch(line).group(1) for line in before}  # type: ignore[union-attr]
    return before, [line for line in inside if not (line.startswith("del ") and line[4:] in hoisted)]


def sharding(program: Program, dim: Dim | None) -> Sharding | None:
    """The sharding of ``dim``, refused (one line) where a process would need another's entries."""
    if dim is None:
        return None
    if dim not in program.size_dims:
        names = ", ".join(d.name for d in program.size_dims)
        raise OpDefinitionError(f"op '{program.name}' has no dim '{dim.name}' to shard; its dims: {names}")
    for stmt in program.statements:
        for leaf in sympy.preorder_traversal(stmt.expr):
            if isinstance(leaf, (IMax, ArgMax)) and dim_of(leaf.var) == dim:
                raise OpDefinitionError(
                    f"op '{program.name}': {stmt.name} takes a max over the sharded dim '{dim.name}' "
                    "(its argmax would be another process's entry); shard another dim"
                )
            if not is_entry(leaf):
                continue
            info = program.tensors[entry_name(leaf)]
            for d, i in zip(info.dims, entry_indices(leaf)):
                if dim in d.parts or (d == dim and not (is_index(i) and dim_of(i) == dim)):
                    raise OpDefinitionError(
                        f"op '{program.name}': {stmt.name} reads {info.name} along the sharded dim '{dim.name}' "
                        "at other positions (a gather, flatten or shift); shard another dim"
                    )
    return Sharding(dim)


def _layouts(program: Program) -> dict[str, TensorInfo]:
    """Every name a backward reads: forward tensors, their gradients ``d<name>``, the given seeds."""
    tensors = program.tensors
    layouts = dict(tensors)
    for t in list(tensors.values()):
        layouts[grad_name(t.name)] = TensorInfo(grad_name(t.name), t.layout, t.is_int)
    for o in program.outputs:
        layouts[program.seed_name(o)] = TensorInfo(program.seed_name(o), tensors[o].layout)
    return layouts


def lower_terms(program: Program, terms: list[tuple[str, sympy.Expr, TensorInfo]]) -> list[str]:
    """Lines computing each ``(name, expr, layout)`` into a variable of its own.

    The expressions read forward tensors and gradients by name (the chain's contributions, one at
    a time: the tutor weighs a person's gradient against them).
    """
    layouts = _layouts(program)
    ref = program.seed_name(program.outputs[0])
    lowerer = Lowerer(
        layouts,
        ref=ref,
        names=set(layouts),
        admissible=_admissible(program),
        named_admissible=_admissible(program, written=False),
        positions=program.index_dims,
        printer=FAITHFUL,
    )
    for name, e, target in terms:
        lowerer.assign(name, e, target)
    return lowerer.lines


def _reuse_of(e: sympy.Expr, wrt: TensorInfo, earlier: list[tuple[TensorInfo, sympy.Expr]]) -> sympy.Expr | None:
    """An earlier gradient of the same layout that ``e`` equals or is the negative of, as (minus)
    its entry at ``wrt``'s indices: ``dy = -dpred`` for ``r = pred - y`` is one pass, not a second
    chain, and ``dx = dw`` for ``w + x`` none.

    Example:
        >>> n = Dim("n", sympy.Symbol("N", positive=True, integer=True))
        >>> a, b = TensorInfo("a", (n,)), TensorInfo("b", (n,))
        >>> (i,) = a.indices
        >>> str(_reuse_of(-(2 + entry("x", [i])) * entry("g", [i]), b, [(a, (entry("x", [i]) + 2) * entry("g", [i]))]))
        '-da(n)'
    """
    if sympy.count_ops(e) > 200:
        return None  # a large formula: not worth expanding to compare
    expanded: sympy.Expr | None = None  # e expanded once, for every earlier gradient it meets
    for w, f in earlier:
        if w.dims != wrt.dims or w.is_int:
            continue
        f = sympy.expand(substitute_indices(f, dict(zip(w.indices, wrt.indices))))
        expanded = expanded if expanded is not None else sympy.expand(e)
        for sign in (-1, 1):
            total = expanded - sign * f  # (sums of expanded terms: like terms cancel as they are added)
            if total != 0 and total.has(sympy.Piecewise):  # branches that cancel under the same conditions
                total = sympy.expand(sympy.piecewise_fold(total))
            if total == 0:
                return sign * entry(grad_name(w.name), list(wrt.indices))
    return None


_ASSIGNMENT = re.compile(r"(\w+) = (.+)")


def _summed_names(code: str) -> list[str] | None:
    """The names ``code`` adds up, written ``a + b + c`` or as a chain ``(a + b).add_(c)``; else None.

    Example:
        >>> _summed_names("(t7 + t8).add_(t9)"), _summed_names("t3 + t4"), _summed_names("t3 * t4")
        (['t7', 't8', 't9'], ['t3', 't4'], None)
    """
    if re.fullmatch(r"\w+(?: \+ \w+)+", code):
        return code.split(" + ")
    chain = re.fullmatch(r"\((\w+(?: \+ \w+)+)\)((?:\.add_\(\w+\))+)", code)
    if chain is None:
        return None
    return chain.group(1).split(" + ") + re.findall(r"\.add_\((\w+)\)", chain.group(2))


def fold_products(lines: list[str], products: dict[str, tuple[str, str]], ranks: dict[str, int]) -> list[str]:
    """Matrix products (``products``: temporary -> operands) computed into the buffer of the line that
    reads them, so the product needs no buffer of its own and the line no pass of its own.

    - A sum: ``dx = t3 + t4`` after ``t4 = g @ W.T`` becomes ``dx = t3.addmm_(g, W.T)``. The first
      term is updated in place only when it is itself a product; otherwise ``torch.addmm`` starts a
      fresh buffer from it (a tensor of at most two dims, by ``ranks``: not a size, and broadcast to
      the product's shape as ``+`` would).
    - A number times it: ``dk = t4 / D**0.5`` after ``t4 = ds.T @ q`` becomes
      ``dk = (ds.T @ q).div_(D**0.5)``. The factor reads no tensor (no name ``ranks`` knows).

    A product folds only where that line is its only reader and its operands are not rebound or
    changed in place in between.

    Example:
        >>> fold_products(["t3 = a @ V.T", "t4 = b @ W.T", "dx = t3 + t4"], {"t3": ("a", "V.T"), "t4": ("b", "W.T")}, {"t3": 2, "t4": 2})
        ['t3 = a @ V.T', 'dx = t3.addmm_(b, W.T)']
        >>> fold_products(["t4 = b @ W.T", "dx = dout + t4"], {"t4": ("b", "W.T")}, {"t4": 2, "dout": 2})
        ['dx = torch.addmm(dout, b, W.T)']
        >>> fold_products(["t4 = ds.T @ q", "dk = t4 / D**0.5"], {"t4": ("ds.T", "q")}, {"t4": 2, "ds": 2, "q": 2})
        ['dk = (ds.T @ q).div_(D**0.5)']
        >>> fold_products(["t4 = a @ b", "dk = t4 * g"], {"t4": ("a", "b")}, {"t4": 2, "g": 1})
        ['t4 = a @ b', 'dk = t4 * g']
    """
    out = list(lines)
    for k, line in enumerate(lines):
        match = _ASSIGNMENT.fullmatch(line)
        if match is None:
            continue
        code = _accumulated(out, k, match.group(2), products, ranks)
        code = code if code is not None else _scaled(out, k, match.group(2), products, ranks)
        if code is not None:
            out[k] = f"{match.group(1)} = {code}"
    return [line for line in out if line]


def _accumulated(
    out: list[str], k: int, rhs: str, products: dict[str, tuple[str, str]], ranks: dict[str, int]
) -> str | None:
    """``rhs``, a sum of names, with its products accumulated by ``addmm``; their lines blanked."""
    terms = _summed_names(rhs)
    if terms is None or len(set(terms)) < len(terms):
        return None
    folded = [t for t in terms if t in products and _foldable(out, t, k, products[t])]
    rest = [t for t in terms if t not in folded]
    if not folded or len(rest) > 1 or (rest and ranks.get(rest[0], 3) > 2) or (not rest and len(folded) < 2):
        return None
    base, in_place = (rest[0], False) if rest else (folded.pop(0), True)
    code = base
    for t in folded:
        left, right = products[t]
        code = f"{code}.addmm_({left}, {right})" if in_place else f"torch.addmm({code}, {left}, {right})"
        in_place = True
        out[_definition(out, t)] = ""
    return code


def _scaled(
    out: list[str], k: int, rhs: str, products: dict[str, tuple[str, str]], ranks: dict[str, int]
) -> str | None:
    """``rhs``, a product times a number, as the product scaled in place; its line blanked."""
    scaled = _scaled_name(rhs)
    if scaled is None:
        return None
    name, sign, factor = scaled
    if name not in products or not _foldable(out, name, k, products[name]):
        return None
    if "[" in factor or any(ident in ranks for ident in re.findall(r"[A-Za-z_]\w*", factor)):
        return None
    left, right = products[name]
    out[_definition(out, name)] = ""
    return f"({left} @ {right}).{'div_' if sign == '/' else 'mul_'}({factor})"


def _scaled_name(code: str) -> tuple[str, str, str] | None:
    """``(name, "*" or "/", factor)`` where ``code`` is ``name * factor``, ``factor * name`` or
    ``name / factor`` at its top level (parsed, so ``t4 * 2 + 1`` is no such product); else None.

    Example:
        >>> _scaled_name("t4 / D**0.5"), _scaled_name("2 * t4"), _scaled_name("t4 * 2 + 1")
        (('t4', '/', 'D**0.5'), ('t4', '*', '2'), None)
    """
    try:
        tree = ast.parse(code, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.BinOp) or not isinstance(tree.op, (ast.Mult, ast.Div)):
        return None
    sign = "*" if isinstance(tree.op, ast.Mult) else "/"
    if isinstance(tree.left, ast.Name):
        return tree.left.id, sign, ast.get_source_segment(code, tree.right) or ""
    if sign == "*" and isinstance(tree.right, ast.Name):
        return tree.right.id, sign, ast.get_source_segment(code, tree.left) or ""
    return None


_MAX_CALL = re.compile(r"(\w+) = (.+)\.max\((\d+)\)")
_INDICES = re.compile(r"(\w+) = (\w+)\.indices(.*)")


def values_only_maxes(forward: list[str], kept: set[str]) -> tuple[list[str], list[str]]:
    """The forward with ``amax`` where it needs a max's values alone, and the lines ``_keep_all`` adds.

    ``t1 = x.max(1)`` computes values and indices, about ten times the work of ``x.amax(1)`` on a
    CPU. Where the indices feed only a name that neither the forward nor ``kept`` (what the fused
    backward reads) uses, the forward takes ``amax`` and the atom-by-atom chain's argmax is taken
    again, as before, when ``_keep_all`` asks for it.

    Example:
        >>> values_only_maxes(["t1 = x.max(1)", "i_x = t1.indices", "m = t1.values[:, None]", "y = x - m"], {"y"})
        (['t1 = x.amax(1)', 'm = t1[:, None]', 'y = x - m'], ['i_x = x.max(1).indices'])
        >>> values_only_maxes(["t1 = x.max(1)", "t2 = t1.values.max(1)", "y = t2.values"], {"y"})[0]
        ['t1 = x.amax(1)', 't2 = t1.amax(1)', 'y = t2']
    """
    out, extra = list(forward), []
    for k in range(len(out)):
        call = _MAX_CALL.fullmatch(out[k])  # as an earlier max left it (a max of a max reads its values)
        if call is None:
            continue
        temp, body, axis = call.groups()
        if temp in kept:
            continue
        readers = [j for j, other in enumerate(out) if j != k and re.search(rf"\b{temp}\b", other)]
        picks = {j: m for j in readers if (m := _INDICES.fullmatch(out[j])) is not None and m.group(2) == temp}
        if any(re.search(rf"\b{temp}\b(?!\.values\b)", out[j]) for j in readers if j not in picks):
            continue  # the indices (or the pair) are read by another forward line
        names = {m.group(1) for m in picks.values()}
        if names & kept or any(
            re.search(rf"\b{n}\b", out[j]) for n in names for j in range(len(out)) if j not in picks
        ):
            continue  # the fused backward or the forward itself reads the argmax
        for j in readers:
            if j in picks:
                extra.append(f"{picks[j].group(1)} = {body}.max({axis}).indices{picks[j].group(3)}")
                out[j] = ""
            else:
                out[j] = re.sub(rf"\b{temp}\.values\b", temp, out[j])
        out[k] = f"{temp} = {body}.amax({axis})"
    return [line for line in out if line], extra


def _definition(lines: list[str], name: str) -> int:
    return next(k for k, line in enumerate(lines) if line.startswith(f"{name} = "))


def _foldable(lines: list[str], name: str, at: int, operands: tuple[str, str]) -> bool:
    """Whether ``name``'s product can move to line ``at``: read only there, operands unchanged since."""
    readers = [
        k for k, line in enumerate(lines) if re.search(rf"\b{name}\b", line) and not line.startswith(f"{name} = ")
    ]
    if readers != [at]:
        return False
    start = _definition(lines, name)
    idents = set(re.findall(r"[A-Za-z_]\w*", " ".join(operands))) - {"T"}
    for line in lines[start + 1 : at]:
        for ident in idents:
            if line.startswith(f"{ident} = ") or re.search(rf"\b{ident}\b(\.\w+_\(|\[[^\]]*\]\s*=)", line):
                return False
    return True


def release_dead(lines: list[str], names: set[str]) -> list[str]:
    """``del t`` after the last line that reads each large temporary ``t`` of ``names``.

    A freed buffer is what the next allocation of its size gets back; two large buffers freed
    together at the end may instead go back to the operating system, and every page of the next
    call's buffers is then faulted in again (on the CPU that costs more than the arithmetic).

    Example:
        >>> release_dead(["t1 = x * y", "a = t1.sum(0)", "b = t1 @ w", "dx = b * 2", "dy = a * 3"], {"t1", "b"})
        ['t1 = x * y', 'a = t1.sum(0)', 'b = t1 @ w', 'del t1', 'dx = b * 2', 'del b', 'dy = a * 3']
    """
    last: dict[str, int] = {}
    for k, line in enumerate(lines):
        for name in names:
            if re.search(rf"\b{name}\b", line):
                last[name] = k
    out: list[str] = []
    for k, line in enumerate(lines):
        out.append(line)
        dead = [n for n, at in last.items() if at == k < len(lines) - 1 and not line.startswith(f"{n} = ")]
        out += [f"del {n}" for n in sorted(dead)]
    return out


def _admissible(program: Program, written: bool = True) -> list[Counter[str]]:
    """The dims of every forward tensor (as written: unnamed ones too, unless not ``written``) as
    multisets of plain dims: what an intermediate may span.

    Besides the named tensors, the body of every max: the forward holds it whole to take its max
    (at every position of a dim it reads at gathered positions: the max of ``y[d, idx[n]]`` over
    ``d`` is the max over ``d`` of all of ``y``, then gathered).
    """

    def plain(dims: list[Dim]) -> Counter[str]:
        return Counter(size_key(p) for d in dims for p in (d.parts or (d,)))

    out = [plain(list(t.dims)) for t in program.tensors.values()]
    out += [plain(list(d)) for d in program.written] if written else []
    tensors = program.tensors
    for s in program.statements:
        for node in sympy.preorder_traversal(s.expr):
            if isinstance(node, (IMax, ArgMax)):
                axes: list[Dim] = [
                    dim_of(i) for i in free_indices(node.body) if not _only_in_positions(i, node.body, tensors)
                ]
                gathered: list[Dim] = []  # each dim read at gathered positions counts once
                for e in sympy.preorder_traversal(node.body):
                    if is_entry(e) and entry_name(e) in tensors:
                        dims = tensors[entry_name(e)].dims
                        gathered += [
                            d
                            for i, d in zip(entry_indices(e), dims)
                            if not is_index(i) and free_indices(i) and d not in gathered
                        ]
                out.append(plain(axes + gathered))
    return out


def _only_in_positions(i: sympy.Symbol, body: sympy.Expr, tensors: dict[str, TensorInfo]) -> bool:
    """Whether index ``i`` occurs in ``body`` only inside gathered positions (``idx[n]`` in ``y[d, idx[n]]``):
    the integer tensor's own entry ``idx[n]`` is a position, not an axis of the max's body."""
    for e in sympy.preorder_traversal(body):
        position = entry_name(e) in tensors and tensors[entry_name(e)].is_int if is_entry(e) else False
        if is_entry(e) and not position and i in entry_indices(e):
            return False
    return True


def _size_lines(program: Program) -> list[tuple[str, str]]:
    """``(N, "x.shape[0]")`` for each plain dim, read from the first input that has it."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for t in program.inputs:
        for axis, d in enumerate(t.layout):
            if d is None:
                continue
            parts = d.parts or (d,)
            if len(parts) == 1 and d.owns_size and d.name not in seen:
                seen.add(d.name)
                out.append((str(d.size), f"{t.name}.shape[{axis}]"))
    missing = [d.name for d in program.size_dims if d.name not in seen]
    if missing:
        raise OpDefinitionError(f"op '{program.name}': dims {missing} are not in any input, so their size is unknown")
    return out


__all__ = ["ChainTerm", "Code", "lower_program", "lower_terms", "sharding", "values_only_maxes"]
