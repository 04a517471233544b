"""The tutor: grade a person's hand-written backward against the derivation, atom by atom.

A person writes ``backward(t)`` as in the lecture: ``t`` holds every input and named intermediate
of the op's forward on one example batch (``t.logprobs``, ``t.bndiff``, ``t.Xb``), and it returns
``{name: gradient of the loss w.r.t. that tensor}`` for any subset of the names. Each gradient is
compared with autograd's (the lecture's ``cmp``) and, when wrong, weighed against the derivation's
chain: a wrong shape, a constant factor, a sign, a transpose, a missing path, or a mistake that
only follows from a wrong gradient further up the chain.
"""

from __future__ import annotations

import itertools
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .autodiff import grad_name
from .derivation import ChainStep, Derivation
from .errors import DeriveError
from .indexalg import tensor_names
from .notation import text
from .program import Program
from .report import code_for
from .tensor import Op
from .userfile import import_file
from .verify import _forward_function, autograd_grads, default_sizes, example_inputs, random_grad_outputs

RTOL, ATOL = 1e-5, 1e-8  # torch.allclose's defaults, as the lecture's cmp uses them


class CheckUsageError(DeriveError):
    """The file to grade cannot be used: missing, no ``backward``, or it returns something else."""


@dataclass
class Row:
    """One graded gradient: the lecture's cmp columns, and a diagnosis when it is wrong."""

    name: str
    shape: tuple[int, ...]
    ok: bool
    exact: bool
    approx: bool
    max_diff: float
    diagnosis: str = ""  # shape, factor, sign, transposed, missing contribution, follows, differs
    detail: str = ""
    right: list[str] = field(default_factory=list)  # the correct formula(s) and code line(s)


@dataclass
class Grading:
    """A person's backward graded against one op, rows in chain order (from the loss back)."""

    op: str
    source: str
    sizes: dict[str, int]
    rows: list[Row]
    derivation: Derivation = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def roots(self) -> list[str]:
        """The wrong gradients that do not merely follow from another wrong one."""
        return [r.name for r in self.rows if not r.ok and r.diagnosis != "follows"]


# -- loading the person's file ------------------------------------------------------------------
def load_backward(path: Path) -> Callable[[Any], Any]:
    """The ``backward`` function of ``path``; a one-line error when there is none."""
    if not path.is_file():
        raise CheckUsageError(f"no such file: {path}")
    if path.suffix != ".py":
        raise CheckUsageError(f"cannot import {path} (expected a .py file defining backward(t))")
    try:
        module = import_file(path, "_derive_check_")
    except Exception as exc:
        raise CheckUsageError(f"{path} failed to import: {_one_line(exc, path)}") from None
    fn = getattr(module, "backward", None)
    if not callable(fn):
        raise CheckUsageError(f"{path} defines no function backward(t)")
    return fn  # type: ignore[no-any-return]


def _one_line(exc: BaseException, path: Path | None) -> str:
    """``TypeError: ... (at solution.py:12)``: the traceback's last line and the person's line."""
    message = traceback.format_exception_only(type(exc), exc)[-1].strip()
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if path is not None and Path(f.filename).resolve() == path.resolve()]
    return message + (f" (at {path.name}:{mine[-1].lineno})" if mine and path is not None else "")


# -- the example batch and the right answers ----------------------------------------------------
@dataclass
class _Batch:
    d: Derivation
    sizes: dict[str, int]
    values: dict[str, Any]  # every local of the forward as written: tensors, sizes, temporaries
    correct: dict[str, torch.Tensor]  # autograd's gradient of every named tensor
    seeds: dict[str, torch.Tensor]  # the output gradients given (``dout``), by seed name


def _batch(d: Derivation, sizes: dict[str, int] | None, seed: int) -> _Batch:
    program = d.program
    sizes = program.tie(sizes or {**default_sizes(program), **d.op.sizes})
    inputs = example_inputs(program, sizes, torch.float64, seed)
    params = {p.name: p.default for p in program.params}
    values = _forward_function(d)(*inputs, **params)
    outs = [values[o] for o in program.outputs]
    given = random_grad_outputs(program, outs if program.several_outputs else outs[0], seed)
    given = list(given) if program.several_outputs else [given]
    grads = [torch.ones_like(o) if g is None else g.to(o.dtype) for o, g in zip(outs, given)]
    correct = autograd_grads(d, inputs, tuple(grads) if program.several_outputs else given[0])
    for t, x in zip(program.inputs, inputs):
        if not t.is_int and t.name not in correct:
            correct[t.name] = torch.zeros_like(x)  # unused: autograd leaves it without a gradient
    seeds = {program.seed_name(o): g for o, g in zip(program.outputs, grads)}
    return _Batch(d, sizes, values, correct, seeds)


class Tensors(types.SimpleNamespace):
    """``t`` in ``backward(t)``: an attribute per tensor; a missing one says which there are."""

    def __getattr__(self, name: str) -> Any:
        import difflib

        names = list(vars(self))
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}?" if near else f"t has {', '.join(names)}"
        raise AttributeError(f"no tensor '{name}' in this op; {hint}")


def tensors_for_person(batch: _Batch) -> Tensors:
    """``t``: every input and named intermediate (detached copies), and ``t.dout`` for a non-scalar output."""
    program = batch.d.program
    t = {name: batch.values[name].detach().clone() for name in program.tensors if name in batch.values}
    for o, g in zip(program.outputs, batch.seeds.values()):
        if g.dim() > 0:
            t[grad_name(o)] = g.clone()
    return Tensors(**t)


# -- the chain's contributions, numerically -----------------------------------------------------
class _Contributions:
    """Each chain step's contribution to its target, evaluated from any set of upstream gradients."""

    def __init__(self, batch: _Batch):
        from .lowering import lower_terms

        d = batch.d
        self.batch = batch
        self.steps: list[ChainStep] = list(d.chain)
        terms = [(f"_c{k}", s.result, s.contribution.target) for k, s in enumerate(self.steps)]
        self.code = compile("\n".join(lower_terms(d.program, terms)), f"<chain of {d.name}>", "exec")

    def evaluate(self, grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        b = self.batch
        names = {grad_name(k): v for k, v in grads.items()}
        namespace: dict[str, Any] = {"torch": torch, **b.values, **names, **b.seeds}
        with torch.no_grad():
            exec(self.code, namespace)
        return [namespace[f"_c{k}"] for k in range(len(self.steps))]

    def into(self, name: str, values: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """``(source statement, contribution)`` for every step that pushes gradient into ``name``."""
        return [
            (s.contribution.source.name, v.expand(self.batch.correct[name].shape) if v.dim() else v)
            for s, v in zip(self.steps, values)
            if s.contribution.target.name == name
        ]


# -- grading ------------------------------------------------------------------------------------
def check(
    the_op: Op | str, against: Path | str | Callable[[Any], Any], sizes: dict[str, int] | None = None, seed: int = 0
) -> Grading:
    """Grade ``against`` (a file defining ``backward(t)``, or the function) on one example batch.

    Example:
        >>> g = check("linear", lambda t: {"b": t.dout.sum(0), "W": (t.x.T @ t.dout).T})
        >>> [(r.name, r.ok, r.diagnosis) for r in g.rows]
        [('W', False, 'transposed'), ('b', True, '')]
    """
    from .api import derive_op, resolve

    op_value = resolve(the_op) if isinstance(the_op, str) else the_op
    path = Path(against) if isinstance(against, (str, Path)) else None
    backward = load_backward(path) if path is not None else against
    assert callable(backward)
    d = derive_op(op_value)
    batch = _batch(d, sizes, seed)
    given = _call(backward, tensors_for_person(batch), d.program, path, list(batch.correct))
    chain = _Contributions(batch)
    usable = {k: v for k, v in given.items() if v.shape == batch.correct[k].shape}
    grader = _Grader(batch, chain, chain.evaluate(batch.correct), chain.evaluate({**batch.correct, **usable}))
    for name in _chain_order(d.program):
        if name in given:
            grader.rows[name] = grader.grade(name, given[name])
    source = str(path) if path is not None else getattr(backward, "__name__", "backward")
    return Grading(d.name, source, batch.sizes, list(grader.rows.values()), d)


def _call(
    backward: Callable[[Any], Any], t: Any, program: Program, path: Path | None, graded: list[str]
) -> dict[str, torch.Tensor]:
    try:
        result = backward(t)
    except Exception as exc:
        raise CheckUsageError(f"backward(t) raised {_one_line(exc, path)}") from None
    if not isinstance(result, dict):
        raise CheckUsageError(
            f"backward(t) must return a dict from tensor name to gradient, not {type(result).__name__}"
        )
    names = [n for n in program.tensors if n in graded]  # float tensors with a gradient (not int, not const)
    if not result:  # nothing graded would pass
        raise CheckUsageError(f"backward(t) returned no gradients: return a dict with some of {', '.join(names)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in result.items():
        if key not in names:
            import difflib

            near = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; its tensors: {', '.join(names)}"
            raise CheckUsageError(f"'{key}' is not a tensor of {program.name} with a gradient{hint}")
        if not isinstance(value, torch.Tensor):
            raise CheckUsageError(f"the gradient given for '{key}' is a {type(value).__name__}, not a tensor")
        out[key] = value.detach().to(torch.float64)
    return out


def _chain_order(program: Program) -> list[str]:
    """From the output back: statements in reverse, then the inputs."""
    return [s.name for s in reversed(program.statements)] + [t.name for t in program.inputs]


@dataclass
class _Grader:
    """Grades gradients in chain order against the right ones and the chain's contributions.

    ``right`` and ``theirs`` are the chain's contributions evaluated from the right upstream
    gradients and from the person's; ``rows`` are the gradients graded so far (upstream ones first).
    """

    batch: _Batch
    chain: _Contributions
    right: list[torch.Tensor]
    theirs: list[torch.Tensor]
    rows: dict[str, Row] = field(default_factory=dict)

    def grade(self, name: str, got: torch.Tensor) -> Row:
        d, want = self.batch.d, self.batch.correct[name].to(torch.float64)  # the output's own: dout's dtype
        if got.shape != want.shape:
            diagnosis, detail = _shape_diagnosis(name, got, want, d)
            return Row(name, tuple(got.shape), False, False, False, float("nan"), diagnosis, detail, _right(d, name))
        diff = float((got - want).abs().max()) if got.numel() else 0.0
        exact = bool(torch.equal(got, want))
        if torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            return Row(name, tuple(got.shape), True, exact, True, diff)
        diagnosis, detail = self.diagnose(name, got, want)
        return Row(name, tuple(got.shape), False, exact, False, diff, diagnosis, detail, _right(d, name))

    def diagnose(self, name: str, got: torch.Tensor, want: torch.Tensor) -> tuple[str, str]:
        """The first pattern that explains a wrong gradient of the right shape."""
        chain, program = self.chain, self.batch.d.program
        upstream_wrong = [src for src, _ in chain.into(name, self.right) if src in self.rows and not self.rows[src].ok]
        if upstream_wrong:
            from_theirs = sum((v for _, v in chain.into(name, self.theirs)), torch.zeros_like(want))
            if _close(got, from_theirs):
                listed = ", ".join(f"d{s}" for s in dict.fromkeys(upstream_wrong))
                return "follows", f"follows from {listed}: right given your {listed}; fix that first"
        if _close(got, -want):
            return "sign", "the sign is flipped"
        if got.dim() == 2 and got.shape[0] == got.shape[1] and _close(got, want.T):
            return "transposed", "it is the transpose of the right gradient"
        factor = _factor(got, want)
        if factor is not None:
            return "factor", _name_factor(factor, program, self.batch.sizes)
        parts = chain.into(name, self.right)
        for k in range(1, len(parts)):
            for kept in itertools.combinations(range(len(parts)), k):
                partial = sum((parts[i][1] for i in kept), torch.zeros_like(want))
                if _close(got, partial):
                    missing = [parts[i][0] for i in range(len(parts)) if i not in kept]
                    stmts = {s.name: s for s in program.statements}
                    paths = "; ".join(f"{m} = {text(stmts[m].expr)}" for m in missing)
                    return (
                        "missing contribution",
                        f"the path through {paths} is missing (d{name} sums every use of {name})",
                    )
        return "differs", _where(name, got, want, program)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL))


def _factor(got: torch.Tensor, want: torch.Tensor) -> float | None:
    norm = float((want * want).sum())
    if norm == 0.0:
        return None
    r = float((got * want).sum()) / norm
    return r if r != 0.0 and _close(got, r * want) else None


def _name_factor(r: float, program: Program, sizes: dict[str, int]) -> str:
    """``off by a factor 0.96875 = (N - 1)/N``, naming simple expressions of the dims' sizes."""
    candidates: list[tuple[float, str]] = [(2.0, "2"), (0.5, "1/2"), (-2.0, "-2"), (-0.5, "-1/2")]
    for dim in program.size_dims:
        n, s = sizes[dim.name], str(dim.size)
        candidates += [(float(n), s), (1 / n, f"1/{s}")]
        if n > 1:
            candidates += [((n - 1) / n, f"({s} - 1)/{s}"), (n / (n - 1), f"{s}/({s} - 1)")]
    for value, label in candidates:
        if abs(r - value) <= 1e-9 * max(1.0, abs(value)):
            bessel = " (Bessel's correction: the forward divides by N - 1, not N)" if "- 1" in label else ""
            return f"off by a factor {r:.6g} = {label}{bessel}"
    return f"off by a constant factor {r:.6g}"


def _shape_diagnosis(name: str, got: torch.Tensor, want: torch.Tensor, d: Derivation) -> tuple[str, str]:
    shape = f"shape {tuple(got.shape)}, but {name} is {tuple(want.shape)}"
    if got.numel() == want.numel() and _close(got.reshape(want.shape), want):
        return "shape", f"{shape}: the right values; keep the size-1 axes (keepdim=True) or reshape"
    if got.dim() == 2 and want.dim() == 2 and got.shape == want.T.shape and _close(got.T, want):
        return "transposed", f"{shape}: it is the transpose of the right gradient"
    info = d.program.tensors[name]
    readers = [s for s in d.program.statements if name in tensor_names(s.expr)]
    broadcast = sorted({dim.name for s in readers for dim in s.target.dims} - {dim.name for dim in info.dims})
    if got.numel() > want.numel() and broadcast:
        dims = ", ".join(broadcast)
        return "shape", f"{shape}: a broadcast in the forward is a sum over {dims} in the backward"
    return "shape", shape


def _where(name: str, got: torch.Tensor, want: torch.Tensor, program: Program) -> str:
    diff = (got - want).abs()
    flat = int(diff.reshape(-1).argmax()) if diff.numel() else 0
    at = list(torch.unravel_index(torch.tensor(flat), want.shape)) if want.dim() else []
    dims = [("·" if dim is None else dim.index().name) for dim in program.tensors[name].layout]
    where = ", ".join(f"{k}={int(i)}" for k, i in zip(dims, at))
    return f"largest difference at [{where}]: {float(got.reshape(-1)[flat]):.6g}, right {float(want.reshape(-1)[flat]):.6g}"


def _right(d: Derivation, name: str) -> list[str]:
    """The chain's formula for ``d<name>`` (one line per contribution) and the code that computes it."""
    out = []
    for step in d.chain:
        c = step.contribution
        if c.target.name == name:
            lhs = text(c.target.at()).replace(name, grad_name(name), 1)
            out.append(f"{lhs} += {text(step.result)}    (from {c.source.name})")
    return out + [f"code: {line}" for line in code_for(d.code.backward_steps, grad_name(name))]


# -- the report ---------------------------------------------------------------------------------
def render(g: Grading) -> str:
    """The cmp-like table (one line per gradient, starting with its name), then each wrong one explained."""
    sizes = ", ".join(f"{k}={v}" for k, v in g.sizes.items())
    width = max([8] + [len(r.name) for r in g.rows])
    lines = [
        f"derive check {g.op} --against {g.source}: one example batch ({sizes}), float64, in chain order",
        "",
        f"{'name'.ljust(width)}  {'shape':<14} {'grade':5}  {'exact':5}  {'approx':6}  {'max diff':>9}  diagnosis",
    ]
    for r in g.rows:
        verdict = "ok" if r.ok else "WRONG"
        diff = "-" if r.max_diff != r.max_diff else f"{r.max_diff:.2e}"
        lines.append(
            f"{r.name.ljust(width)}  {str(r.shape):<14} {verdict:5}  {str(r.exact):5}  {str(r.approx):6}  {diff:>9}  {r.diagnosis}"
        )
    wrong = [r for r in g.rows if not r.ok]
    if not wrong:
        lines += ["", f"all {len(g.rows)} gradient(s) right."]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"{len(wrong)} of {len(g.rows)} wrong; start with {', '.join('d' + n for n in g.roots) or 'the first'}:",
    ]
    for r in wrong:
        lines.append("")
        lines.append(f"d{r.name}: {r.diagnosis}: {r.detail}")
        if r.diagnosis != "follows":
            lines += [f"  right: {line}" if not line.startswith("code: ") else f"  {line}" for line in r.right]
    return "\n".join(lines) + "\n"
