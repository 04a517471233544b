"""Verification: generated code against PyTorch autograd, and the fused formulas exactly on small sizes.

Three independent checks:
- float32 comparison of every gradient (fused and chain) with autograd through the forward,
  reported as in LECTURE.md (shape, exact, approximate, max abs diff);
- float64 ``torch.autograd.gradcheck`` of the fused backward against finite differences;
- the exact check: the forward run entry by entry as scalar SymPy expressions at small sizes,
  differentiated by the scalar chain rule at a rational point, compared with the fused formulas.
"""

from __future__ import annotations

import math
import random
import re
import types
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from .autodiff import grad_name
from .derivation import Derivation
from .indexalg import (
    ArgMax,
    Flat,
    IMax,
    ISum,
    Pack,
    dim_named_by_size,
    dim_of,
    entry_indices,
    entry_name,
    is_entry,
    is_index,
    use_dims,
)
from .program import Program, TensorInfo, derived_size


@dataclass(frozen=True)
class Comparison:
    """One gradient compared with autograd."""

    name: str
    shape_ok: bool
    exact: bool
    approx: bool
    max_abs_diff: float
    finite: bool = field(default=True, repr=False)  # the generated value
    reference_finite: bool = field(default=True, repr=False)  # autograd's


@dataclass
class Verification:
    """All verification results for one op."""

    fused: list[Comparison] = field(default_factory=list)
    steps: list[Comparison] = field(default_factory=list)
    gradcheck: bool | None = None
    gradcheck_error: str = ""
    exact: list[tuple[str, str]] = field(default_factory=list)
    device: str = "cpu"
    domain: str = "real"  # where the float inputs were drawn (DOMAINS): the first where the forward is finite

    @property
    def ok(self) -> bool:
        compared = all(c.shape_ok and c.approx for c in self.fused + self.steps)
        exact = all(status != "FAILED" for _, status in self.exact)
        return compared and self.gradcheck is not False and exact

    @property
    def failure(self) -> str:
        """The first check that failed, in a few words ('' when all passed)."""
        for part, comparisons in (("fused backward", self.fused), ("chain", self.steps)):
            for c in comparisons:
                name = c.name.removesuffix(" (forward)")
                kind = part if name == c.name else "forward"
                if not c.shape_ok:
                    return f"{kind}: {name} has the wrong shape"
                if not c.approx:
                    at = f"at inputs drawn {DOMAINS[self.domain]}"
                    if not c.finite or (c.max_abs_diff != c.max_abs_diff and c.reference_finite):
                        return f"{kind}: {name} is not finite {at}"
                    if not c.reference_finite:  # autograd's where can make NaN from a branch it does not take
                        return f"{kind}: autograd's reference for {name} is not finite {at}, the generated one is"
                    return f"{kind}: {name} differs from autograd by up to {c.max_abs_diff:.3g} {at}"
        if self.gradcheck is False:
            return f"float64 gradcheck: {self.gradcheck_error}"
        failed = [name for name, status in self.exact if status == "FAILED"]
        return f"exact check failed for {', '.join(failed)}" if failed else ""


def load_module(source: str, name: str) -> types.ModuleType:
    """Execute generated source as a fresh module (what ``import generated.NAME`` would give).

    Example:
        >>> from derive import catalogue, derive
        >>> from derive.emit import render
        >>> module = load_module(render(derive(catalogue()["tanh"])), "tanh")
        >>> module.__name__, callable(module.tanh_backward)
        ('generated.tanh', True)
    """
    module = types.ModuleType(f"generated.{name}")
    exec(compile(source, f"<generated {name}>", "exec"), module.__dict__)
    return module


# -- inputs -----------------------------------------------------------------------------------
def default_sizes(program: Program, base: int = 4) -> dict[str, int]:
    """Distinct small sizes per plain dim (distinct sizes catch transposition bugs).

    Example:
        >>> from derive import catalogue
        >>> default_sizes(catalogue()["linear"].program())
        {'n': 4, 'i': 5, 'o': 6}
    """
    sizes: dict[str, int] = {}
    for k, d in enumerate(program.size_dims):
        sizes[d.name] = base + k
    return program.tie(sizes)


def index_ranges(program: Program) -> dict[str, str]:
    """For each integer input, the dim its values index (from the gathers that use it).

    Example:
        >>> from derive import catalogue
        >>> index_ranges(catalogue()["cross_entropy"].program()), index_ranges(catalogue()["embedding"].program())
        ({'target': 'c'}, {'X': 'v'})
    """
    return {name: d.name for name, d in program.index_dims.items()}


def _index_high(program: Program, name: str, sizes: dict[str, int]) -> int:
    """One past the largest value integer input ``name`` may hold: the size of the dim it indexes (else 2)."""
    dims = program.index_dims
    return _dim_size(dims[name], sizes) if name in dims else 2


def _shape(info: TensorInfo, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(1 if d is None else _dim_size(d, sizes) for d in info.layout)


def _dim_size(d: Any, sizes: dict[str, int]) -> int:
    if d.fixed is not None:
        return int(d.fixed)
    if d.derived is not None:
        return derived_size(d, sizes)
    if d.size_of is not None:
        return sizes[d.size_of]
    if d.parts:
        out = 1
        for p in d.parts:
            out *= _dim_size(p, sizes)
        return out
    return sizes[d.name]


def usable_device(name: str) -> str:
    """``name`` as torch spells it, if a tensor can be made there; else a DeviceError naming why.

    Example:
        >>> usable_device("cpu")
        'cpu'
    """
    from .errors import DeviceError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name}: not a torch device name (cpu, cuda, cuda:1, mps, ...)") from None
    try:
        torch.ones(1, device=device).cpu()  # data must come back: the checks compare values
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DeviceError(f"--device {name}: torch cannot use it on this machine ({why})") from None
    return str(device)


# where float inputs are drawn, in the order tried: a forward that takes log or sqrt of an input is
# checked where it is finite (the description is what the report and errors print)
DOMAINS = {
    "real": "from a standard normal",
    "positive": "uniformly from (0.5, 2)",
    "unit": "uniformly from (0.1, 0.9)",
}


def example_inputs(
    program: Program,
    sizes: dict[str, int],
    dtype: torch.dtype,
    seed: int = 0,
    device: str = "cpu",
    domain: str = "real",
) -> list[torch.Tensor]:
    """Random inputs of the declared shapes, float ones drawn from ``domain`` (:data:`DOMAINS`);
    integer inputs within the range they index.

    Example:
        >>> from derive import catalogue
        >>> C, X = example_inputs(catalogue()["embedding"].program(), {"v": 5, "e": 3, "n": 2, "t": 4}, torch.float32)
        >>> tuple(C.shape), tuple(X.shape), X.dtype, 0 <= int(X.min()) <= int(X.max()) < 5
        ((5, 3), (2, 4), torch.int64, True)
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in program.inputs:
        shape = _shape(t, sizes)
        if t.is_int:
            high = _index_high(program, t.name, sizes)
            out.append(torch.randint(0, high, shape, generator=g).to(device))
        else:
            out.append(_draw(shape, g, domain).to(dtype=dtype, device=device))
    return out


def _draw(shape: tuple[int, ...], g: torch.Generator, domain: str) -> torch.Tensor:
    if domain == "positive":
        return 0.5 + 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    if domain == "unit":
        return 0.1 + 0.8 * torch.rand(shape, generator=g, dtype=torch.float64)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def input_domain(d: Derivation, sizes: dict[str, int], seed: int = 0) -> str:
    """The first of :data:`DOMAINS` where the forward, as written, is finite at random inputs, in
    float64 and in float32 (the dtypes the checks run in).

    ``log(rate)`` is NaN at half of all normal inputs: such an op is checked at positive ones;
    ``x**1000`` overflows float32 past 1.09, and is checked in (0.1, 0.9).
    """
    params = {p.name: p.default for p in d.program.params}
    forward = _forward_function(d)
    for domain in DOMAINS:  # at the sizes the comparisons draw and at the gradcheck's
        if all(
            _finite_forward(d, forward, params, at, seed, domain, dtype)
            for at in (sizes, gradcheck_sizes(d.program, sizes))
            for dtype in (torch.float64, torch.float32)
        ):
            return domain
    return "real"


def gradcheck_sizes(program: Program, sizes: dict[str, int]) -> dict[str, int]:
    """The smaller sizes gradcheck runs at (each dim at most 4; a window keeps two positions)."""
    return program.tie({k: min(v, 4) for k, v in sizes.items()})


def _finite_forward(
    d: Derivation,
    forward: Any,
    params: dict[str, float],
    sizes: dict[str, int],
    seed: int,
    domain: str,
    dtype: torch.dtype,
) -> bool:
    inputs = example_inputs(d.program, sizes, dtype, seed, domain=domain)
    with torch.no_grad():
        values = forward(*inputs, **params)
    outs = [values[o] for o in d.program.outputs]
    return all(torch.isfinite(o).all() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())


# -- memory: the no-blow-up invariant ---------------------------------------------------------
class TensorSizes:
    """Records the largest tensor any aten op creates inside the block (views and in-place results excluded).

    A backward must never create a tensor larger than the largest its forward made: that is how
    a rank-3 product standing in for a matmul shows up. Used as a context manager::

        with TensorSizes() as sizes:
            module.NAME_backward(grad, saved)
        sizes.largest, sizes.largest_op

    Example:
        >>> x = torch.randn(4, 3)
        >>> with TensorSizes() as sizes:
        ...     _ = (x[:, :, None] * x[:, None, :]).sum(0)  # an outer product, then a sum
        >>> sizes.largest, sizes.largest_op
        (36, 'mul')
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                returns = func._schema.returns
                results = out if isinstance(out, (tuple, list)) else (out,)
                for spec, value in zip(returns, results):
                    if isinstance(value, torch.Tensor) and spec.alias_info is None:
                        recorder._record(func.overloadpacket.__name__, value.numel())
                return out

        self._mode = _Mode()
        self.largest = 0
        self.largest_op = ""

    def _record(self, op: str, numel: int) -> None:
        if numel > self.largest:
            self.largest, self.largest_op = numel, op

    def __enter__(self) -> TensorSizes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


# -- autograd reference -----------------------------------------------------------------------
def _forward_function(d: Derivation) -> Any:
    """The forward statements exactly as written (the atom chain, no rewrites), returning every local."""
    program = d.program
    params = [f"{p.name}={p.default!r}" for p in program.params]
    args = ", ".join([t.name for t in program.inputs] + (["*"] + params if params else []))
    # ``v0 = x`` (a rename) aliases x: a view gives v0 a gradient of its own, as the op defines it
    lines = [re.sub(r"^(\w+) = ([A-Za-z_]\w*)$", r"\1 = \2.view_as(\2)", line) for line in d.code.reference_forward]
    body = [f"    {var} = {code}" for var, code in d.code.sizes] + [f"    {line}" for line in lines]
    source = f"def _forward({args}):\n" + "\n".join(body) + "\n    return dict(locals())\n"
    namespace: dict[str, Any] = {"torch": torch, "math": math}
    exec(compile(source, f"<forward {program.name}>", "exec"), namespace)
    return namespace["_forward"]


def autograd_grads(d: Derivation, inputs: list[torch.Tensor], grad_output: Any) -> dict[str, torch.Tensor]:
    """Autograd's gradient of every named tensor (``retain_grad`` on each intermediate).

    Example:
        >>> from derive import catalogue, derive
        >>> d = derive(catalogue()["cross_entropy"])
        >>> grads = autograd_grads(d, example_inputs(d.program, {"n": 4, "c": 5}, torch.float64), None)
        >>> float(grads["logits"].sum(1).abs().max()) < 1e-15  # each row of dlogits sums to zero
        True
    """
    program = d.program
    leaves = [x.detach().clone().requires_grad_(info.differentiable) for x, info in zip(inputs, program.inputs)]
    values = _forward_function(d)(*leaves)
    names = program.tensors
    for name, value in values.items():
        if name in names and isinstance(value, torch.Tensor) and value.requires_grad and not value.is_leaf:
            value.retain_grad()
    outs = [values[o] for o in program.outputs]
    seeds = _seeds(program, outs, grad_output)
    live = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]  # a constant output has no graph
    if live:
        torch.autograd.backward([o for o, _ in live], [s for _, s in live])
    grads = {}
    for name in names:
        value = values.get(name)
        if isinstance(value, torch.Tensor) and value.grad is not None:
            grads[name] = value.grad
    for x, info in zip(leaves, program.inputs):  # unused, or cancelled: autograd leaves it no .grad
        if info.differentiable and info.name not in grads:
            grads[info.name] = torch.zeros_like(x)
    for o, seed in zip(program.outputs, seeds):
        if program.seed_name(o) == grad_name(o):  # read by no statement: its gradient is the one given
            grads[o] = seed
    return grads


def _seeds(program: Program, outs: list[torch.Tensor], grad_output: Any) -> list[torch.Tensor]:
    """One gradient per output: a scalar's None is 1 (a loss); with several outputs None is 0 (unused)."""
    given = list(grad_output) if program.several_outputs else [grad_output]
    fill = torch.zeros_like if program.several_outputs else torch.ones_like
    return [fill(o) if g is None else g for o, g in zip(outs, given)]


def random_grad_outputs(program: Program, outs: Any, seed: int) -> Any:
    """Random output gradients (None for a single scalar output: the loss), shaped like ``outs``, on their device."""
    gen = torch.Generator().manual_seed(seed + 1)
    if not program.several_outputs:
        return None if outs.dim() == 0 else torch.randn(outs.shape, generator=gen).to(outs.device)
    return tuple(torch.randn(o.shape, generator=gen).to(o.device) for o in outs)


FLOAT32_ATOL = 1e-5
"""float32 agreement with autograd: absolute, in units of the gradient's largest entry (at least 1)."""


def _scale(want: torch.Tensor) -> float:
    """The size of a gradient's largest entry, at least 1: float32 rounding grows with it."""
    return max(1.0, float(want.abs().max())) if want.numel() else 1.0


def compare(
    name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 1e-5, nan_agrees: bool = False
) -> Comparison:
    """Shape, exact equality, allclose and max abs difference, as in the lecture's ``cmp``.

    ``nan_agrees``: a NaN where ``want`` has one counts as agreement (an intermediate's gradient).

    Example:
        >>> compare("x", torch.ones(3), torch.ones(3) + 1e-7, atol=1e-6)
        Comparison(name='x', shape_ok=True, exact=False, approx=True, max_abs_diff=1.19...e-07)
    """
    shape_ok = tuple(got.shape) == tuple(want.shape)
    if not shape_ok:
        return Comparison(name, False, False, False, float("inf"))
    got_, want_ = got.to(want.dtype), want
    diff = (got_ - want_).abs().max().item() if got_.numel() else 0.0
    equal = bool(torch.equal(got_, want_))
    close = bool(torch.allclose(got_, want_, rtol=rtol, atol=atol, equal_nan=nan_agrees))
    finite = bool(got_.isfinite().all()) or close  # (an inf both sides give is no failure)
    return Comparison(name, True, equal, close, diff, finite, bool(want_.isfinite().all()) or close)


def autograd_function(module: types.ModuleType, program: Program, params: dict[str, float]) -> Any:
    """A ``torch.autograd.Function`` using the generated forward and fused backward."""
    name = program.name
    fwd = getattr(module, f"{name}_forward")
    bwd = getattr(module, f"{name}_backward")
    grads_fields = [t.name for t in program.differentiable_inputs]

    class Generated(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: torch.Tensor) -> Any:  # type: ignore[override]
            out, saved = fwd(*inputs, **params)
            ctx.saved = saved
            return out

        @staticmethod
        def backward(ctx: Any, *grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
            grads = bwd(grad if program.several_outputs else grad[0], ctx.saved)._asdict()
            return tuple(grads[t.name] if t.name in grads_fields else None for t in program.inputs)

    return Generated


def verify(
    d: Derivation,
    module: types.ModuleType,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    exact: bool = True,
    device: str = "cpu",
) -> Verification:
    """Run all three checks on a generated module; the autograd checks run on ``device`` (``"cuda"``, ...).

    Example:
        >>> from derive import catalogue, derive
        >>> from derive.emit import render
        >>> d = derive(catalogue()["linear"])
        >>> v = verify(d, load_module(render(d), "linear"))
        >>> v.ok, v.gradcheck, v.exact
        (True, True, [('x', 'exact'), ('W', 'exact'), ('b', 'exact')])
    """
    program = d.program
    use_dims(program.dims)
    sizes = program.tie(sizes or default_sizes(program))
    result = Verification(device=device, domain=input_domain(d, sizes, seed))
    inputs = example_inputs(program, sizes, torch.float32, seed, device, result.domain)
    params = {p.name: p.default for p in program.params}
    out, saved = getattr(module, f"{program.name}_forward")(*inputs, **params)
    g = random_grad_outputs(program, out, seed)
    want = autograd_grads(d, inputs, g)
    reference = _forward_function(d)(*inputs, **params)
    for name, value in zip(program.outputs, out if program.several_outputs else [out]):
        result.fused.append(
            compare(f"{name} (forward)", value, reference[name], atol=FLOAT32_ATOL * _scale(reference[name]))
        )
    fused = getattr(module, f"{program.name}_backward")(g, saved)._asdict()
    for name, got in fused.items():
        result.fused.append(compare(name, got, want[name], atol=FLOAT32_ATOL * _scale(want[name])))
    for rows, blocked in in_row_blocks(module, program, g, saved):
        for name, got in blocked.items():
            label = f"{name} (blocks of {rows} row{'s' if rows > 1 else ''})"
            result.fused.append(compare(label, got, want[name], atol=FLOAT32_ATOL * _scale(want[name])))
    steps = getattr(module, f"{program.name}_backward_steps")(g, saved)
    input_names = {t.name for t in program.inputs}
    for name in _ordered(program, steps):
        if name in want:  # an intermediate's gradient may be NaN where autograd's is (0·inf at a kink)
            atol = FLOAT32_ATOL * _scale(want[name])
            result.steps.append(compare(name, steps[name], want[name], atol=atol, nan_agrees=name not in input_names))
    result.gradcheck, result.gradcheck_error = _gradcheck(module, program, sizes, params, seed, device, result.domain)
    if exact:
        result.exact = exact_check(d, domain=result.domain)
    return result


def in_row_blocks(
    module: types.ModuleType, program: Program, grad_output: Any, saved: dict[str, Any], rows: tuple[int, ...] = (1, 3)
) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """The fused backward's gradients with its batch cut into blocks of each of ``rows`` rows, on any
    device and size (the module's ``ROWS_PER_BLOCK``); none where the module has no row blocks."""
    if not hasattr(module, "ROWS_PER_BLOCK"):
        return []
    backward = getattr(module, f"{program.name}_backward")
    out = []
    before = vars(module)["ROWS_PER_BLOCK"]  # a user's setting, put back afterwards
    try:
        for k in rows:
            vars(module)["ROWS_PER_BLOCK"] = k
            out.append((k, backward(grad_output, saved)._asdict()))
    finally:
        vars(module)["ROWS_PER_BLOCK"] = before
    return out


def _ordered(program: Program, steps: dict[str, torch.Tensor]) -> list[str]:
    order = [s.name for s in reversed(program.statements)] + [t.name for t in program.inputs]
    return [n for n in order if n in steps]


def _gradcheck(
    module: types.ModuleType,
    program: Program,
    sizes: dict[str, int],
    params: dict[str, float],
    seed: int,
    device: str = "cpu",
    domain: str = "real",
) -> tuple[bool, str]:
    fn = autograd_function(module, program, params)
    inputs = example_inputs(program, gradcheck_sizes(program, sizes), torch.float64, seed, device, domain)
    inputs = [x.requires_grad_(info.differentiable) for x, info in zip(inputs, program.inputs)]
    try:
        ok = torch.autograd.gradcheck(lambda *xs: fn.apply(*xs), tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4)
        return bool(ok), ""
    except Exception as exc:  # gradcheck raises with the mismatching Jacobians
        return False, str(exc).splitlines()[0]


# -- the exact check ----------------------------------------------------------------------------
class _Interpreter:
    """Evaluates index expressions at concrete small sizes into scalar SymPy expressions."""

    def __init__(
        self,
        sizes: dict[str, int],
        params: dict[sympy.Symbol, sympy.Expr],
        point: dict[sympy.Symbol, sympy.Expr] | None = None,
    ):
        self.sizes = sizes
        self.params = params
        self.values: dict[str, dict[tuple[int, ...], sympy.Expr]] = {}
        # integer inputs -> the (flattened) dim their values index: the parts of a gathered position
        self.index_dims: dict[str, Any] = {}
        # with a point, a max over a dim is the entry that is largest there: the same value and the
        # same derivative (away from ties), without a Max of many symbolic terms to differentiate
        self.point = point

    def size(self, sym: sympy.Symbol) -> int:
        return _dim_size(dim_of(sym), self.sizes)

    def index(self, e: sympy.Basic, env: dict[sympy.Symbol, int]) -> int:
        if is_index(e):
            return env[e]  # type: ignore[index]
        if isinstance(e, Flat):
            f, p = self.index(e.args[0], env), int(e.args[1])
            of = e.args[0]
            parts = (
                self.index_dims[entry_name(of)] if is_entry(of) else dim_of(of.var if isinstance(of, ArgMax) else of)
            ).parts
            coords = []
            for part in reversed(parts):
                coords.append(f % _dim_size(part, self.sizes))
                f //= _dim_size(part, self.sizes)
            return list(reversed(coords))[p]
        if isinstance(e, Pack):
            value = 0
            for a in e.args:
                value = value * self.size(a) + self.index(a, env)  # type: ignore[arg-type]
            return value
        value = self.eval(e, env)
        return int(value) if value.is_Integer else value  # symbolic: an integer input's entry (``--small``)

    def eval(self, e: sympy.Expr, env: dict[sympy.Symbol, int]) -> sympy.Expr:
        if is_entry(e):
            idx = tuple(self.index(i, env) for i in entry_indices(e))
            table = self.values[entry_name(e)]
            if any(isinstance(i, int) and i < 0 for i in idx) or (not isinstance(table, _Entries) and idx not in table):
                return sympy.S.Zero  # a read past a padded end
            return table[idx]
        if isinstance(e, ISum):
            return sympy.Add(*(self.eval(e.body, {**env, e.var: v}) for v in range(self.size(e.var))))
        if isinstance(e, IMax):
            candidates = [self.eval(e.body, {**env, e.var: v}) for v in range(self.size(e.var))]
            if self.point is None:
                return sympy.Max(*candidates)
            values = [sympy.N(c.xreplace(self.point), 30) for c in candidates]
            return candidates[values.index(max(values))]
        if isinstance(e, ArgMax):
            vals = [self.eval(e.body, {**env, e.var: v}) for v in range(self.size(e.var))]
            nums = [float(v.xreplace(self.point) if self.point is not None else v) for v in vals]
            return sympy.Integer(nums.index(max(nums)))
        if isinstance(e, (Flat, Pack)):  # a position inside an index expression: ``j + argmax.0``
            at = self.index(e, env)
            return sympy.Integer(at) if isinstance(at, int) else at
        if isinstance(e, sympy.KroneckerDelta):
            a, b = self.index(e.args[0], env), self.index(e.args[1], env)
            if isinstance(a, int) and isinstance(b, int):
                return sympy.S.One if a == b else sympy.S.Zero
            return sympy.KroneckerDelta(a, b)
        if e.is_Symbol:
            if is_index(e):
                return sympy.Integer(env[e])  # type: ignore[index]
            if e in self.params:
                return self.params[e]
            if e.is_positive and e.is_integer:
                return sympy.Integer(self.sizes[dim_named_by_size(e.name)])
            return e
        if not e.args:
            return e
        return e.func(*(self.eval(a, env) for a in e.args))

    def fill(self, info: TensorInfo, expr: sympy.Expr) -> None:
        table: dict[tuple[int, ...], sympy.Expr] = {}
        for combo in _product([self.size(i) for i in info.indices]):
            table[combo] = self.eval(expr, dict(zip(info.indices, combo)))
        self.values[info.name] = table


class _SymbolTable(dict):
    """Entries of tensors as plain symbols named like ``x[0,1]``, created on first use."""

    def __missing__(self, name: str) -> dict:
        table = _Entries(name)
        self[name] = table
        return table


class _Entries(dict):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __missing__(self, idx: tuple[int, ...]) -> sympy.Symbol:
        sym = sympy.Symbol(f"{self.name}[{','.join(map(str, idx))}]" if idx else self.name, real=True)
        self[idx] = sym
        return sym


def concrete_entries(
    expr: sympy.Expr, target: TensorInfo, sizes: dict[str, int], limit: int = 6
) -> list[tuple[tuple[int, ...], sympy.Expr]]:
    """The first entries of ``target = expr`` at concrete small sizes, in terms of other tensors' entries.

    This is the by-hand view of a gradient: ``dW[0,1] = dout[0,1]*x[0,0] + dout[1,1]*x[1,0]``.

    Example:
        >>> from derive import catalogue, derive
        >>> g = derive(catalogue()["linear"]).gradient("W")
        >>> for combo, value in concrete_entries(g.result, g.wrt, {"n": 2, "i": 2, "o": 2}, limit=2):
        ...     print(combo, value)
        (0, 0) dout[0,0]*x[0,0] + dout[1,0]*x[1,0]
        (0, 1) dout[0,1]*x[0,0] + dout[1,1]*x[1,0]
    """
    interp = _Interpreter(sizes, {})
    interp.values = _SymbolTable()
    out = []
    for combo in _product([interp.size(i) for i in target.indices])[:limit]:
        out.append((combo, interp.eval(expr, dict(zip(target.indices, combo)))))
    return out


def _product(sizes: list[int]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for s in sizes:
        out = [c + (v,) for c in out for v in range(s)]
    return out


ENTRIES_CHECKED = 8  # per input, at most: a spot check, the formula is one expression for every entry
DIGITS = 80  # working precision of values that are not rational


def _number(e: sympy.Expr) -> sympy.Expr:
    """``e`` as a number: exact while rational or a short algebraic form, else ``DIGITS`` digits."""
    if e.is_Rational or (not e.has(sympy.Float, sympy.Function) and sympy.count_ops(e) <= 24):
        return e
    return sympy.N(e, DIGITS)


class _Scalars:
    """The forward at small sizes as a straight-line program of scalars, for scalar reverse mode.

    Every entry of a statement is a symbol defined by a small expression in earlier entries, with
    its value at a rational point; derivatives are then SymPy's of those small expressions, chained
    entry by entry: independent of the index-level derivation being checked, and linear in the
    program's size (differentiating the fully expanded loss instead grows with its depth).
    """

    def __init__(
        self,
        program: Program,
        sizes: dict[str, int],
        params: dict[sympy.Symbol, sympy.Expr],
        rng: random.Random,
        domain: str = "real",
    ):
        self.values: dict[sympy.Symbol, sympy.Expr] = {}
        self.definitions: list[tuple[sympy.Symbol, sympy.Expr]] = []
        self.at_kink = False  # some entry sits where its definition is not differentiable
        self.interp = _Interpreter(sizes, params, self.values)
        self.interp.index_dims = program.index_dims
        for t in program.inputs:
            table: dict[tuple[int, ...], sympy.Expr] = {}
            high = _index_high(program, t.name, sizes)
            for combo in _product([self.interp.size(i) for i in t.indices]):
                if t.is_int:
                    table[combo] = sympy.Integer(rng.randrange(high))
                else:
                    table[combo] = self._symbol(t.name, combo, _rational(rng, domain))
            self.interp.values[t.name] = table
        for stmt in program.statements:
            self._define(stmt.target, stmt.expr)

    def _symbol(self, name: str, combo: tuple[int, ...], value: sympy.Expr) -> sympy.Symbol:
        sym = sympy.Symbol(f"{name}_{'_'.join(map(str, combo))}", real=True)
        self.values[sym] = value
        return sym

    def _define(self, target: TensorInfo, expr: sympy.Expr) -> None:
        table: dict[tuple[int, ...], sympy.Expr] = {}
        for combo in _product([self.interp.size(i) for i in target.indices]):
            local = self.interp.eval(expr, dict(zip(target.indices, combo)))
            try:
                value = _number(local.xreplace(self.values))
            except (ValueError, TypeError):  # Max(0, nan) at a pole (u/a at a = 0): SymPy cannot compare
                value = sympy.nan
            if local.free_symbols & self.values.keys():
                table[combo] = sym = self._symbol(target.name, combo, value)
                self.definitions.append((sym, local))
                self.at_kink = self.at_kink or _singular(value) or _at_kink(local, self.values)
            else:  # a constant (or an index such as an argmax): folded
                table[combo] = value
        self.interp.values[target.name] = table

    def table(self, name: str) -> dict[tuple[int, ...], sympy.Expr]:
        return self.interp.values[name]

    def adjoints(self, seeds: dict[str, dict[tuple[int, ...], sympy.Expr]]) -> dict[sympy.Symbol, sympy.Expr]:
        """d(sum of seed * output entry)/d(every entry symbol), by the scalar chain rule."""
        adjoint: dict[sympy.Symbol, sympy.Expr] = {}
        for o, seed_values in seeds.items():
            for combo, entry in self.table(o).items():
                if entry in self.values:
                    adjoint[entry] = adjoint.get(entry, sympy.S.Zero) + seed_values[combo]
        for sym, local in reversed(self.definitions):
            a = adjoint.get(sym, sympy.S.Zero)
            if a == 0:
                continue
            for u in local.free_symbols & self.values.keys():
                partial = _number(sympy.diff(local, u).xreplace(self.values))
                adjoint[u] = _number(adjoint.get(u, sympy.S.Zero) + a * partial)
        return adjoint


def _ties(e: sympy.Basic) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """Pairs of values whose equality is a kink of ``e``: the arguments of a max or min, a
    comparison's two sides, and 0 beside the argument of an abs, sign or step."""
    pairs: list[tuple[sympy.Expr, sympy.Expr]] = []
    for f in e.atoms(sympy.Max, sympy.Min):
        pairs += [(a, b) for k, a in enumerate(f.args) for b in f.args[k + 1 :]]
    for r in e.atoms(sympy.core.relational.Relational):
        pairs.append((r.lhs, r.rhs))
    for f in e.atoms(sympy.Abs, sympy.sign, sympy.Heaviside):
        pairs.append((f.args[0], sympy.S.Zero))
    return pairs


def _at_kink(local: sympy.Expr, values: dict[sympy.Symbol, sympy.Expr]) -> bool:
    """Whether ``local`` is at a kink where its symbols take ``values``: there SymPy's derivative
    takes its own convention (Heaviside(0) = 1/2), not PyTorch's, which the formulas follow."""
    for a, b in _ties(local):
        gap = _number((a - b).xreplace(values))
        if _singular(gap):  # a pole inside (u/a at a = 0): no point to compare at
            return True
        if gap == 0 or (gap.is_number and abs(sympy.N(gap, 60)) < sympy.Float(10) ** -50):
            return True
    return False


def _singular(value: sympy.Expr) -> bool:
    """Whether an entry's value at the drawn point is infinite or undefined (``x / y`` at ``y = 0``)."""
    return bool(value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo))


KINK_REDRAWS = 8  # points drawn at most before the exact check runs at one on a kink


def _rational(rng: random.Random, domain: str) -> sympy.Rational:
    """A rational input value in ``domain`` (:data:`DOMAINS`), with a denominator of 7 to 13."""
    if domain == "real":
        return sympy.Rational(rng.randint(-30, 30), rng.randint(7, 13))
    q = rng.randint(7, 13)
    if domain == "positive":
        return sympy.Rational(rng.randint(q // 2 + 1, 2 * q - 1), q)
    return sympy.Rational(rng.randint(1, q - 1), q)


def exact_check(d: Derivation, size: int = 2, seed: int = 0, domain: str = "real") -> list[tuple[str, str]]:
    """Run the forward at small sizes entry by entry, differentiate the scalars directly, compare.

    Returns ``(input, status)`` where status is ``exact`` (equal as rational numbers),
    ``equal to 50 digits`` (transcendental values at a rational point), or ``FAILED``.

    Example:
        >>> from derive import catalogue, derive
        >>> exact_check(derive(catalogue()["linear"]))
        [('x', 'exact'), ('W', 'exact'), ('b', 'exact')]
    """
    program = d.program
    use_dims(program.dims)
    rng = random.Random(seed)
    plain = list(program.size_dims)
    # distinct sizes catch transpositions; with many dims all 2 keep the expansion small
    sizes = program.tie({dim.name: size + (k % 2 if len(plain) < 4 else 0) for k, dim in enumerate(plain)})
    params = {p.symbol: sympy.Rational(1, 10) for p in program.params}
    for _ in range(KINK_REDRAWS):  # a point off every kink and pole: there the derivative is one number
        scalars = _Scalars(program, sizes, params, rng, domain)
        seeds = {}
        for o in program.outputs:
            out = program.tensors[o]
            seeds[o] = {
                c: sympy.Rational(rng.randint(-9, 9), 7)
                for c in _product([scalars.interp.size(i) for i in out.indices])
            }
        if scalars.at_kink:
            continue
        direct = scalars.adjoints(seeds)
        if not any(_singular(v) for v in direct.values()):  # (sqrt(x) at x = 0: an infinite slope)
            break
    else:  # every point drawn sat on a kink or a pole: compare at the last (a kink's FAILED is then real)
        direct = scalars.adjoints(seeds)

    numeric = _Interpreter(sizes, params)
    numeric.index_dims = scalars.interp.index_dims
    for name, table in scalars.interp.values.items():
        numeric.values[name] = {k: v.xreplace(scalars.values) for k, v in table.items()}
    for o, seed_values in seeds.items():
        numeric.values[program.seed_name(o)] = seed_values
    for g in d.gradients:
        numeric.fill(TensorInfo(grad_name(g.wrt.name), g.wrt.layout), g.result)

    results = []
    for t in program.differentiable_inputs:
        status = "exact"
        entries = list(scalars.table(t.name).items())
        if len(entries) > ENTRIES_CHECKED:
            entries = sorted(rng.sample(entries, ENTRIES_CHECKED))
        for combo, sym in entries:
            want, got = direct.get(sym, sympy.S.Zero), numeric.values[grad_name(t.name)][combo]
            diff = want - got
            if diff.is_Rational and not (want.has(sympy.Float) or got.has(sympy.Float)):
                if diff != 0:
                    status = "FAILED"
            elif _singular(want) or _singular(got):  # a pole at every point drawn: not comparable
                status = "FAILED" if _singular(want) != _singular(got) else status
            elif abs(sympy.N(diff, 60)) > sympy.Float(10) ** -50:
                status = "FAILED"
            elif status == "exact":
                status = "equal to 50 digits"
        results.append((t.name, status))
    return results
