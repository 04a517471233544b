"""Reverse mode in SymPy: index-aware derivatives of statements, adjoints statement by statement.

The one differentiation rule is SymPy's ``diff`` on the scalar shell of an expression; the index
bookkeeping (an entry's derivative is a product of Kronecker deltas, a sum's derivative is the sum
of derivatives, a max routes to its argmax) is general and knows nothing of any particular op.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .indexalg import (
    ArgMax,
    IMax,
    ISum,
    bound_indices,
    dim_of,
    entry,
    entry_indices,
    entry_name,
    free_indices,
    fresh_index,
    fresh_indices,
    is_entry,
    may_read_past,
    rename_bound,
    tensor_names,
)
from .kinks import tie_values
from .program import Program, Statement, TensorInfo

_LEAVES = (ISum, IMax, ArgMax)


def grad_name(name: str) -> str:
    """The name of the adjoint (gradient) of tensor ``name``: ``dx`` for ``x``."""
    return f"d{name}"


class Differentiator:
    """Derivatives with respect to one tensor's entry ``wrt(at)``.

    With ``definitions`` the derivative is total (it goes through named intermediates by their
    forward definitions); without, it is the partial derivative of one statement.
    """

    def __init__(self, wrt: str, at: tuple[sympy.Symbol, ...], definitions: dict[str, Statement] | None = None):
        self.wrt = wrt
        self.at = at
        self.defs = definitions or {}
        self.memo: dict[sympy.Expr, sympy.Expr] = {}
        self._deps: dict[str, bool] = {}

    def depends(self, e: sympy.Expr) -> bool:
        """Whether ``e`` reads ``wrt``, directly or through the definitions."""
        return any(self._name_depends(n) for n in tensor_names(e))

    def _name_depends(self, name: str) -> bool:
        if name == self.wrt:
            return True
        if name not in self._deps:
            self._deps[name] = False
            stmt = self.defs.get(name)
            self._deps[name] = stmt is not None and self.depends(stmt.expr)
        return self._deps[name]

    def __call__(self, e: sympy.Expr) -> sympy.Expr:
        if e not in self.memo:
            # a bound index named like one of ``at`` would capture it (δ(k, at) inside Σ_k): rename it
            safe = rename_bound(e, set(self.at)) if bound_indices(e) & set(self.at) else e
            self.memo[e] = self._derive(safe) if self.depends(e) else sympy.S.Zero
        return self.memo[e]

    def _derive(self, e: sympy.Expr) -> sympy.Expr:
        if is_entry(e):
            if entry_name(e) == self.wrt:
                return sympy.Mul(*(sympy.KroneckerDelta(i, w) for i, w in zip(entry_indices(e), self.at)))
            return self._through_definition(e)
        if isinstance(e, ISum):
            inner = self(e.body)
            return sympy.S.Zero if inner == 0 else ISum(inner, e.var)
        if isinstance(e, IMax):
            k = e.var
            return ISum(sympy.KroneckerDelta(k, ArgMax(e.body, k)) * self(e.body), k)
        return self._chain_rule(e)

    def _through_definition(self, e: sympy.Expr) -> sympy.Expr:
        """An intermediate's entry, differentiated through its definition. Read past its end (a
        padding's ``v[np]``) it is 0 there: ``v[np] = Σ_n δ(n, np) v[n]``, so ``n`` stays in range."""
        stmt = self.defs[entry_name(e)]
        taken = free_indices(e) | bound_indices(stmt.expr) | set(stmt.target.indices) | set(self.at)
        guards: list[tuple[sympy.Symbol, sympy.Basic]] = []
        at: list[sympy.Basic] = []
        for i, d in zip(entry_indices(e), stmt.target.dims):
            if may_read_past(i, d):
                k = fresh_index(d, taken | {g for g, _ in guards})
                guards.append((k, i))
                i = k
            at.append(i)
        result = self(stmt.at(tuple(at)))
        for k, i in reversed(guards):
            result = ISum(sympy.KroneckerDelta(k, i) * result, k) if result != 0 else result
        return result

    def _chain_rule(self, e: sympy.Expr) -> sympy.Expr:
        """Differentiate the scalar shell with ``sympy.diff`` and chain into each index-level leaf."""
        leaves = _leaves(e)
        dummies = {leaf: sympy.Dummy(f"v{k}", real=True) for k, leaf in enumerate(leaves)}
        shell = e.xreplace(dummies)
        back = {u: leaf for leaf, u in dummies.items()}
        ties = tie_values(shell, set(dummies.values()))
        total = sympy.S.Zero
        for leaf, u in dummies.items():
            inner = self(leaf)
            if inner != 0:
                total += sympy.diff(shell, u).xreplace(ties).xreplace(back) * inner
        return total


def _leaves(e: sympy.Expr) -> list[sympy.Expr]:
    """The maximal index-level sub-expressions (entries, sums, max) of an expression."""
    if is_entry(e) or isinstance(e, _LEAVES):
        return [e]
    out: list[sympy.Expr] = []
    for a in e.args:
        for leaf in _leaves(a):
            if leaf not in out:
                out.append(leaf)
    return out


def adjoint_of(
    output: sympy.Expr, out_indices: tuple[sympy.Symbol, ...], diff: Differentiator, seed: sympy.Expr
) -> sympy.Expr:
    """``Σ_out seed[out] · ∂output[out]/∂wrt[at]``: the vector-Jacobian product in index form."""
    body = seed * diff(output)
    for i in reversed(out_indices):
        body = ISum(body, i)
    return body


@dataclass(frozen=True)
class Contribution:
    """One term of the atom-by-atom chain: what statement ``source`` adds to ``d<target>``."""

    target: TensorInfo
    source: Statement
    local: sympy.Expr
    expr: sympy.Expr
    indices: tuple[sympy.Symbol, ...]


def chain_steps(program: Program) -> list[Contribution]:
    """The atom-by-atom backward: statements in reverse, each pushing gradient to what it reads."""
    tensors = program.tensors
    steps: list[Contribution] = []
    reached = set(program.outputs)
    for stmt in reversed(program.statements):
        if stmt.name not in reached:
            continue
        for name in sorted(tensor_names(stmt.expr), key=lambda n: _order(program, n)):
            target = tensors[name]
            if not target.differentiable:
                continue
            at = fresh_indices(target.dims, _all_indices(program))
            diff = Differentiator(name, at)
            local = diff(stmt.expr)
            if local == 0:
                continue
            seed = entry(grad_name(stmt.name), stmt.target.indices)
            steps.append(Contribution(target, stmt, local, adjoint_of(stmt.expr, stmt.target.indices, diff, seed), at))
            reached.add(name)
    return steps


def cut_tensors(program: Program) -> list[str]:
    """Tensors whose adjoint the fused backward materialises, output first.

    Contractions, what windows and contractions read (a padding), windows a contraction reads (a
    convolution's), and layers (statements reading two or more of the op's inputs) are natural
    boundaries: they get named adjoints (``dlogits``, ``dh``), and everything between two boundaries
    (a loss, a normalisation, a pool's window) is differentiated as one expression and simplified.
    A pool's window is a view, and its adjoint would be the window's size, larger than the input.
    """
    inputs = {t.name for t in program.differentiable_inputs}
    cuts = set(program.outputs) | inputs
    windows = {s.name for s in program.statements if s.kind == "window"}
    unfolds = {s.name for s in program.statements if s.kind == "window" and _unfolds(s)}
    joined = {s.name for s in program.statements if s.name in unfolds and _reduced_alike(program, s)}
    elementwise = {s.name for s in program.statements if s.kind == "contraction" and _sums_offsets_only(s)}
    contracted = {
        n
        for s in program.statements
        if s.kind == "contraction"
        for n in tensor_names(s.expr)
        if not (s.name in elementwise and n in windows)
    }
    for stmt in program.statements:
        reads = tensor_names(stmt.expr)
        if stmt.name in elementwise:
            reads -= windows  # each window's values are read once, where they are: no adjoint of their own
        if stmt.kind in ("contraction", "window"):
            # (a padding a window reads among them; not a window another window reads, where both
            # offsets are reduced alike: one window of two dims, x[2i + kh, 2j + kw], never made)
            cuts |= reads - unfolds if stmt.name in joined else reads
            if stmt.kind == "contraction" or stmt.name in contracted:
                cuts.add(stmt.name)  # a window only a contraction reads: a pool's is never made
        elif len(reads & inputs) >= 2 and reads - inputs - {t.name for t in program.inputs}:
            cuts.add(stmt.name)  # a layer: parameters meet activations (gamma * xhat + beta)
    order = [t.name for t in program.inputs] + [s.name for s in program.statements]
    varying = _reads_an_input(program) | set(program.outputs)
    return [n for n in reversed(order) if n in cuts and n in varying and not program.tensors[n].is_int]


def _unfolds(stmt: Statement) -> bool:
    """A window statement that reads windows (``x[2*t + k]``), not only shifted positions (a padding)."""
    entries = [e for e in sympy.preorder_traversal(stmt.expr) if is_entry(e)]
    return any(len(free_indices(i)) >= 2 for e in entries for i in e.args)


def _reduced_alike(program: Program, window: Statement) -> bool:
    """Whether every reader of ``window`` reduces all its offsets by one kind of reduction: a sum
    over them (a depthwise conv, an average pool, a conv), or a max whose one reader takes the max
    over the rest (a max pool). Mixed (a max along one offset, a sum along the other), each window's
    gradient is added back alone, by the faster scatter of each."""
    offsets = {d for d in window.target.layout if d is not None and d.fixed is not None}
    readers = [s for s in program.statements if window.name in tensor_names(s.expr)]
    return bool(readers) and all(_chain_reduces(program, r, offsets) for r in readers)


def _chain_reduces(program: Program, node: Statement, offsets: set) -> bool:
    covered: set = set()
    kind = None
    while True:
        sums = {dim_of(s.var) for s in sympy.preorder_traversal(node.expr) if isinstance(s, ISum)}
        maxes = {dim_of(m.var) for m in sympy.preorder_traversal(node.expr) if isinstance(m, IMax)}
        if bool(sums) == bool(maxes) or (kind is not None and kind != bool(sums)):
            return False  # neither, both, or another kind than before
        kind = bool(sums)
        covered |= (sums | maxes) & offsets
        if offsets <= covered:
            return True
        after = [s for s in program.statements if node.name in tensor_names(s.expr)]
        if len(after) != 1:
            return False
        node = after[0]


def _sums_offsets_only(stmt: Statement) -> bool:
    """A contraction that sums only windows' offsets (dims of a fixed size): a depthwise conv,
    ``Σ_k win[t, c, k]·w[k, c]``. Its windows' adjoint would be the size of the windows, and is
    added back offset by offset instead (``_add_windows`` of ``dout[t, c]·w[k, c]``)."""
    sums = [s for s in sympy.preorder_traversal(stmt.expr) if isinstance(s, ISum)]
    return all(dim_of(s.var).fixed is not None for s in sums)


def _reads_an_input(program: Program) -> set[str]:
    """The differentiable inputs and the statements that read one, directly or through others.

    Any other value (``(1 - alpha)*y + alpha/C`` of a constant ``y``) is a constant of the op: its
    gradient is never needed, and the forward need not keep what only that gradient would read.
    """
    out = {t.name for t in program.differentiable_inputs}
    for stmt in program.statements:
        if tensor_names(stmt.expr) & out:
            out.add(stmt.name)
    return out


@dataclass(frozen=True)
class FusedAdjoint:
    """The adjoint of a boundary tensor as one index expression (not yet simplified)."""

    wrt: TensorInfo
    expr: sympy.Expr
    at: tuple[sympy.Symbol, ...]


def fused_adjoints(program: Program) -> list[FusedAdjoint]:
    """Adjoints of the boundary tensors in reverse order, each differentiated through its region."""
    cuts = cut_tensors(program)
    region = {n: s for n, s in program.definitions.items() if n not in cuts}
    avoid = _all_indices(program)
    out: list[FusedAdjoint] = []
    for name in cuts:
        if name in program.outputs and program.seed_name(name) == grad_name(name):
            continue  # the caller gives this gradient
        wrt = program.tensors[name]
        at = fresh_indices(wrt.dims, avoid)
        diff = Differentiator(name, at, region)
        total = entry(program.seed_name(name), at) if name in program.outputs else sympy.S.Zero
        for consumer in cuts:
            stmt = program.definitions.get(consumer)
            if stmt is None or not diff.depends(stmt.expr):
                continue
            seed = entry(grad_name(consumer), stmt.target.indices)
            total += adjoint_of(stmt.expr, stmt.target.indices, diff, seed)
        out.append(FusedAdjoint(wrt, total, at))
    return out


def _all_indices(program: Program) -> set[sympy.Symbol]:
    """Every index symbol used anywhere in the program, so new ones never capture or clash."""
    out: set[sympy.Symbol] = set()
    for stmt in program.statements:
        out |= free_indices(stmt.expr) | bound_indices(stmt.expr) | set(stmt.target.indices)
    for t in program.inputs:
        out |= set(t.indices)
    return out


def _order(program: Program, name: str) -> int:
    names = [t.name for t in program.inputs] + [s.name for s in program.statements]
    return names.index(name)
