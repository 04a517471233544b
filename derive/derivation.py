"""The pipeline's record: trace → differentiate → simplify → lower, for one op.

:func:`derive` returns a :class:`Derivation` holding the forward program, the atom-by-atom chain,
the fused gradients with the simplification steps that produced them, and the lowered code of
the forward, fused backward and chain backward. Emission, verification and the report read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sympy

from .autodiff import Contribution, chain_steps, fused_adjoints, grad_name
from .errors import OpDefinitionError
from .indexalg import free_indices, substitute_indices, use_dims
from .lowering import ChainTerm, Code, lower_program
from .program import Program, TensorInfo
from .simplify import Simplifier, Step, canonical_bound
from .tensor import Op


@dataclass(frozen=True)
class Gradient:
    """The fused gradient of the op's output w.r.t. one input or one boundary intermediate."""

    wrt: TensorInfo
    raw: sympy.Expr
    steps: tuple[Step, ...]
    result: sympy.Expr


@dataclass(frozen=True)
class ChainStep:
    """One simplified contribution of the chain rule: ``d<target> += expr``."""

    contribution: Contribution
    result: sympy.Expr


@dataclass
class Derivation:
    """Everything derived for one op, in pipeline order."""

    op: Op
    program: Program
    chain: list[ChainStep]
    gradients: list[Gradient]
    code: Code
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.program.name

    def gradient(self, wrt: str) -> Gradient:
        """The fused gradient w.r.t. the tensor called ``wrt``."""
        for g in self.gradients:
            if g.wrt.name == wrt:
                return g
        raise KeyError(wrt)

    def formula(self, wrt: str) -> str:
        """``dx[n, d] = ...``: the fused gradient w.r.t. ``wrt`` in index notation."""
        from .notation import text

        g = self.gradient(wrt)
        return f"{text(g.wrt.at()).replace(g.wrt.name, grad_name(g.wrt.name), 1)} = {text(g.result)}"


def _canonical(e: sympy.Expr, at: tuple[sympy.Symbol, ...], target: TensorInfo) -> sympy.Expr:
    """Rename the free indices ``at`` of a gradient to the target's canonical indices."""
    return canonical_bound(substitute_indices(e, dict(zip(at, target.indices))))


def derive(the_op: Op | str, shard: str | None = None) -> Derivation:
    """Run the pipeline on one op (or a catalogue name, or ``PATH.py:FUNCTION``); ``shard`` names a
    dim split across processes (see ``lower_program``).

    Example:
        >>> from derive.ops import catalogue
        >>> d = derive(catalogue()["tanh"])
        >>> [g.wrt.name for g in d.gradients]
        ['x']
    """
    if isinstance(the_op, str):
        from .api import resolve  # the api stage runs this one: imported when a name is given

        the_op = resolve(the_op)
    if not isinstance(the_op, Op):
        what = "a plain function: decorate it with @op(...)" if callable(the_op) else f"a {type(the_op).__name__}"
        raise OpDefinitionError(f"derive() takes an op, a catalogue name or 'PATH.py:FUNCTION', not {what}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    program = the_op.program()
    use_dims(program.dims, program.ties)  # index symbols are found by name: this op's dims, not another op's
    timings["trace"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    contributions = chain_steps(program)
    raw = [(a.wrt, a.expr, a.at) for a in fused_adjoints(program)]
    timings["differentiate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    local = Simplifier(program, identities=False)
    chain = [ChainStep(c, _canonical(local.run(c.expr)[0], c.indices, c.target)) for c in contributions]
    gradients = []
    for wrt, expr, at in raw:
        simplifier = Simplifier(program)
        result, steps = simplifier.run(expr)
        steps = [Step(s.rule, s.identity, _canonical(s.result, at, wrt)) for s in steps]
        gradients.append(Gradient(wrt, _canonical(expr, at, wrt), tuple(steps), _canonical(result, at, wrt)))
    timings["simplify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sharded = None
    if shard is not None:
        sharded = next((dim for dim in program.size_dims if dim.name == shard), None)
        if sharded is None:
            names = ", ".join(dim.name for dim in program.size_dims)
            raise OpDefinitionError(f"op '{program.name}' has no dim '{shard}' to shard; its dims: {names}")
    code = lower_program(
        program,
        [(g.wrt, g.result) for g in gradients],
        [ChainTerm(c.contribution.target, c.contribution.source.name, c.result) for c in chain],
        sharded,
    )
    timings["lower"] = time.perf_counter() - t0
    return Derivation(the_op, program, chain, gradients, code, timings, kink_notes(program) + stability_notes(program))


_KINKS = {
    sympy.Max: "Max is not differentiable where its arguments tie: PyTorch's convention is used "
    "(relu'(0) = 0: the gradient goes to neither side at a tie with 0)",
    sympy.Min: "Min is not differentiable where its arguments tie: PyTorch's convention is used (0 at a tie)",
    sympy.Abs: "Abs is not differentiable at 0: PyTorch's subgradient sign(0) = 0 is used",
}


def kink_notes(program: Program) -> list[str]:
    """Which non-differentiable points the op has, and the convention used there."""
    notes = []
    for kind, text in _KINKS.items():
        if any(s.expr.has(kind) for s in program.statements):
            notes.append(text)
    return notes


def stability_notes(program: Program) -> list[str]:
    """Statements a stabler forward would compute differently, and how to ask for it."""
    from .notation import text
    from .simplify import stable_forward

    statements = list(program.statements)
    notes = []
    for s in statements:
        stable = stable_forward(s, statements)
        if stable != s.expr:
            done = "computes" if program.stable_forward else "can compute"
            notes.append(
                f"{s.name} = {text(s.expr)} is not finite for inputs of large magnitude (log(0) or an exp "
                "that overflows); "
                f"the forward {done} it as {text(stable)}"
                + ("" if program.stable_forward else " with @op(stable_forward=True)")
            )
    return notes


__all__ = ["ChainStep", "Code", "Derivation", "Gradient", "derive", "free_indices"]
