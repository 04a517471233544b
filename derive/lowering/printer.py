"""The scalar shell of a lowered expression printed as torch code, and small code-text helpers.

SymPy's own torch printer does the work; this subclass prints powers with Python operators,
constants as floats, Max/Min as the kernels whose kink conventions :mod:`derive.kinks` follows,
and ``Heaviside(x, h0)`` with the tie value it carries.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import sympy
from sympy.core.function import AppliedUndef
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter
from sympy.printing.pytorch import TorchPrinter

from ..errors import OpDefinitionError
from ..notation import is_long


class Select(sympy.Function):
    """``Select(a, b, step)``: ``a`` where ``step`` (a ``Heaviside``, or a float 0/1 mask) is 1, else ``b``.

    The lowering writes a two-way ``Piecewise`` as one where both values stay finite
    (:mod:`.finite`): printed as ``torch.lerp(b, a, mask)``, which is exact for a 0/1 mask when
    ``a - b`` is finite, and on a CPU about ten times faster than ``torch.where`` on a bool mask.
    """

    nargs = 3

    @classmethod
    def eval(cls, a: sympy.Expr, b: sympy.Expr, step: sympy.Expr) -> sympy.Expr | None:
        """A step that became a number (its two sides turned out one value) picks its branch."""
        if step.is_number:
            return a if step == 1 else b
        return a if a == b else None


def is_tensor_code(symbol: sympy.Symbol) -> bool:
    """Whether a symbol the printer writes verbatim is a tensor's code (``x``, ``t1.values``,
    ``var[:, None]``): no assumptions, where a size or a parameter is positive."""
    return symbol.is_positive is None and bool(_TENSOR_CODE.fullmatch(symbol.name))


_TENSOR_CODE = re.compile(r"[A-Za-z_][\w.]*(\[[^\]]*\])?")


class TorchCodePrinter(TorchPrinter):
    """SymPy's torch printer, with Python operators for powers and PyTorch's kink conventions."""

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        return expr.name

    def _print(self, expr, **kwargs) -> str:
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Rational and expr.is_real:
            return repr(float(expr))  # constants such as sqrt(2/pi) become Python floats
        if isinstance(expr, sympy.Function) and expr.free_symbols and is_constant(expr):
            return _MATH.doprint(expr)  # a function of sizes and parameters: Python floats, not tensors
        return super()._print(expr, **kwargs)

    def _print_log(self, expr: sympy.log) -> str:
        """``torch.log1p(v)`` for ``log(1 + v)``: exact where ``v`` is tiny (a softplus far below 0),
        where ``1 + v`` rounds to 1 first."""
        arg = expr.args[0]
        if isinstance(arg, sympy.Add) and sympy.S.One in arg.args:
            return f"torch.log1p({self._print(arg - 1)})"
        return f"torch.log({self._print(arg)})"

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exp = expr.as_base_exp()
        b = self.parenthesize(base, PRECEDENCE["Pow"])
        if exp == sympy.S.Half:
            return f"{b} ** 0.5" if is_constant(base) else f"torch.sqrt({self._print(base)})"
        if exp == -1:
            return f"1 / {b}"
        if exp.is_Integer or exp.is_Rational or exp.is_Float:
            return f"{b} ** {self._print_exponent(exp)}"
        return f"{b} ** {self.parenthesize(exp, PRECEDENCE['Pow'])}"

    def _print_exponent(self, exp: sympy.Expr) -> str:
        if exp.is_Integer and exp >= 0:
            return str(exp)
        if exp.is_Rational and not exp.is_Integer:
            return f"({float(exp)!r})"
        return f"({self._print(exp)})"

    def _print_Rational(self, expr: sympy.Rational) -> str:
        """``p / q``, or for long ones (a float the user wrote, times another) the float that
        Python's ``p / q`` gives: int division is correctly rounded, so the value is the same."""
        if is_long(expr):
            return repr(expr.p / expr.q)
        return f"{expr.p} / {expr.q}"

    def _print_Float(self, expr: sympy.Float) -> str:
        return repr(float(expr))

    # a step times a value as a product with a 0/1 mask in the value's dtype (MaskingPrinter)
    float_masks = False

    def float_mask(self, arg: sympy.Expr, tie: sympy.Expr) -> str | None:
        """The step of ``arg`` as 0/1 floats (:meth:`compare_into_floats`), when masks are floats.

        On a CPU a comparison written to a float buffer is one vectorised pass; a bool mask, and
        ``torch.where`` on one, run scalar loops (several times slower). None when masks are bools.
        """
        return self.compare_into_floats(arg, tie) if self.float_masks else None

    def compare_into_floats(self, arg: sympy.Expr, tie: sympy.Expr) -> str | None:
        """The step of ``arg`` (1 where ``arg > 0``, or ``>= 0`` for ``tie`` 1) as 0/1 floats, in one pass.

        A named value ``u`` compares into a new buffer, ``torch.gt(u, c, out=torch.empty_like(u))``;
        a value the code computes compares in place, into the buffer it was computed in:
        ``torch.abs(t2).lt_(beta)``. None for code that may not be a buffer of its own (``x.sum(1)``).
        """
        if tie not in (0, 1):  # a step of 1/2 at the tie (torch.maximum's) is no comparison
            return None
        bound = -sympy.Add(*(t for t in sympy.Add.make_args(arg) if is_constant(t)))
        value = arg + bound
        name = "gt" if tie == 0 else "ge"
        if value.could_extract_minus_sign():  # -|u| > -beta is |u| < beta
            value, bound, name = -value, -bound, {"gt": "lt", "ge": "le"}[name]
        u = self._print(value)
        if _NAMED_VIEW.fullmatch(u):
            return f"torch.{name}({u}, {self._print(bound)}, out=torch.empty_like({u}))"
        if atom(u) != u or is_fresh(u):  # `a - b` and `torch.abs(a)` make new tensors
            return f"{atom(u)}.{name}_({self._print(bound)})"
        return None

    def steps_into_floats(self, steps: list[tuple[sympy.Expr, sympy.Expr]], complement: bool = False) -> str | None:
        """The product of steps ``(arg, tie)`` (or its complement, 1 minus it) as one fresh 0/1 float
        mask: each compared into floats, the first taking the others in place; a closed interval of a
        named value, ``lo <= u <= hi``, as ``torch.clamp(u, lo, hi).eq_(u)`` (two passes and one
        buffer, where two comparisons and a product take three and two), and outside it as
        ``.ne_(u)``, or where the clamp cannot be used (a parameter's bound), as ``u < lo`` plus
        ``u > hi``, two masks that never overlap. None where a step does not compare into floats
        (a complement: unless an interval)."""
        box = self._closed_interval(steps, "ne_" if complement else "eq_")
        if box is not None:
            return box
        if complement:
            if not _is_interval(steps):
                return None
            below, above = (self.compare_into_floats(-arg, 0) for arg, _ in steps)
            return None if below is None or above is None else f"{atom(below)}.add_({above})"
        steps = sorted(steps, key=lambda s: -len(self._axes_read(s[0])))
        masks = [self.compare_into_floats(arg, tie) for arg, tie in steps]
        if not masks or any(m is None for m in masks):
            return None
        code, axes = str(masks[0]), self._axes_read(steps[0][0])
        for (arg, _), mask in zip(steps[1:], masks[1:]):  # y[:, None] > 0 and z > 0: a new buffer
            more = self._axes_read(arg)
            code = f"{atom(code)}.mul_({mask})" if more <= axes else f"torch.mul({code}, {mask})"
            axes |= more
        return code

    leaf_axes: dict[sympy.Basic, frozenset] | None = None  # the axes of the symbols being printed, when known

    @contextlib.contextmanager
    def reading(self, leaf_axes: dict[sympy.Basic, frozenset]) -> Iterator[None]:
        """Within the block, the printer knows the axes of the symbols it prints (which mask is widest)."""
        saved, self.leaf_axes = self.leaf_axes, leaf_axes
        try:
            yield
        finally:
            self.leaf_axes = saved

    def _axes_read(self, e: sympy.Expr) -> frozenset:
        """The axes of the symbols ``e`` reads (empty where the printer was not told them)."""
        known = self.leaf_axes or {}
        return frozenset().union(*(known.get(s, frozenset()) for s in e.free_symbols))

    def _closed_interval(self, steps: list[tuple[sympy.Expr, sympy.Expr]], compare: str) -> str | None:
        """``torch.clamp(u, lo, hi).eq_(u)`` for the steps of ``u - lo`` and ``hi - u`` (``lo < hi``
        numbers, both 1 at the tie): 1 exactly where ``lo <= u <= hi``, 0 elsewhere and at NaN
        (``ne_``: the complement)."""
        if not _is_interval(steps):
            return None
        (a, _), (b, _) = steps
        width = sympy.expand(a + b)
        low = -sympy.Add(*(t for t in sympy.Add.make_args(a) if is_constant(t)))
        value = a + low
        if not all(b.is_number and abs(b) <= _HALF_MAX for b in (low, low + width)):
            return None  # torch.clamp refuses a bound its dtype cannot hold (a parameter's may be any)
        u = self._print(value)
        if is_constant(value) or not _NAMED_VIEW.fullmatch(u):
            return None
        return f"torch.clamp({u}, {self._print(low)}, {self._print(low + width)}).{compare}({u})"

    def select_mask(self, step: sympy.Expr) -> str | None:
        """A select's 0/1 float mask: its step compared into floats, a product of steps (an ``And``) as
        one mask (:meth:`steps_into_floats`), or a mask made already (a name)."""
        if isinstance(step, sympy.Heaviside):
            return self.compare_into_floats(*step.args)
        if is_conjunction(step):
            return self.steps_into_floats([s.args for s in step.args])
        return self._print(step)

    def _print_Select(self, expr: sympy.Expr) -> str:
        """``torch.lerp(b, a, mask)``: ``a`` where the step is 1, ``b`` where it is 0, exactly, in one
        pass; with a branch that is a number (lerp reads tensors only), ``a·mask + b·(1 - mask)``,
        exact too, and ``a * mask`` for ``b = 0``."""
        a, b, step = expr.args
        heaviside = isinstance(step, sympy.Heaviside)
        mask = self.select_mask(step)
        if mask is not None and (is_constant(a) or is_constant(b)):
            other = (
                self.compare_into_floats(-step.args[0], 1 - step.args[1])
                if heaviside
                else self.steps_into_floats([s.args for s in step.args], complement=True) or f"(1 - {atom(mask)})"
            )
            if b == 0 or other is not None:  # (parenthesised: a Select prints as an atom inside others)
                with self.steps_as_floats():
                    return f"({self._print(a * sympy.Symbol(mask) + b * sympy.Symbol(other or '0'))})"
            mask = None
        if mask is None:
            if heaviside:
                condition = comparison(self, *step.args)
            elif is_conjunction(step):
                condition = " & ".join(f"({comparison(self, *s.args)})" for s in step.args)
            else:
                condition = f"{atom(self._print(step))} > 0"
            return f"torch.where({condition}, {self._print(a)}, {self._numbers_typed(expr, b)})"
        with self.steps_as_floats():  # lerp reads floats only: a branch that is a step is a float mask
            return f"torch.lerp({self._print(b)}, {self._print(a)}, {mask})"

    def _print_Mul(self, expr: sympy.Mul) -> str:
        masks, rest = split_masks(expr)
        if not masks or is_constant(rest):
            return super()._print_Mul(expr)
        mask = self.steps_into_floats(masks) if self.float_masks else None
        if mask is not None:
            return f"{self.parenthesize(rest, PRECEDENCE['Mul'])} * {mask}"
        # a product with a step selects (PyTorch's threshold_backward does the same): no float mask
        condition = " & ".join(
            f"({comparison(self, arg, tie)})" if len(masks) > 1 else comparison(self, arg, tie) for arg, tie in masks
        )
        return f"torch.where({condition}, {self._print(rest)}, 0.0)"

    def _print_Add(self, expr: sympy.Add, order: str | None = None) -> str:
        # a step prints as a bool mask: 1 - H(x) as the complement mask (bool arithmetic refuses
        # `1 - mask`, and `mask + mask` would be a logical or)
        steps = [t for t in expr.args if isinstance(-t, sympy.Heaviside) and len((-t).args) > 1]
        if len(expr.args) == 2 and len(steps) == 1 and expr - steps[0] == 1:
            arg, tie = (-steps[0]).args
            if tie in (0, 1):
                return self._print(sympy.Heaviside(-arg, 1 - tie))
        if any(t.has(sympy.Heaviside) for t in expr.args):
            # a sum next to a mask: torch refuses `mask - t`, `mask + mask` is a logical or, and
            # `0.01 * mask` is in the default dtype (float32 beside float64 values): 0/1 values
            # compared into floats of the values' dtype
            with self.steps_as_floats():
                return super()._print_Add(expr, order)
        return super()._print_Add(expr, order)

    @contextlib.contextmanager
    def steps_as_floats(self) -> Iterator[None]:
        """Within the block, a step prints as a 0/1 float mask, not a bool one (for arithmetic and lerp)."""
        saved, self._float_steps = getattr(self, "_float_steps", False), True
        try:
            yield
        finally:
            self._float_steps = saved

    def _print_Heaviside(self, expr: sympy.Expr) -> str:
        # the tie value was chosen when differentiating (derive.kinks): relu 0, clamp 1, maximum 1/2
        arg, tie = expr.args[0], expr.args[1] if len(expr.args) > 1 else sympy.S.Half
        code = self._print(arg)
        if tie in (0, 1) and getattr(self, "_float_steps", False):
            # a step's own 0/1 value (a summand, a lerp's weight) multiplies nothing that may be
            # infinite: a comparison into floats, in the value's dtype, whether or not products
            # mask (where(..., 1.0, 0.0) is a scalar loop, in the default dtype)
            mask = self.compare_into_floats(arg, tie)
            if mask is not None:
                return mask
            named = sorted((s.name for s in arg.free_symbols if is_tensor_code(s)), key=len)
            if named:  # in a value's dtype (a float64 step beside float64 values, not the default float32)
                return f"({comparison(self, arg, tie)}).to({named[0]}.dtype)"
            return f"torch.where({comparison(self, arg, tie)}, 1.0, 0.0)"
        if tie in (0, 1):
            return f"({comparison(self, arg, tie)})"
        if tie == sympy.S.Half:
            return f"((torch.sign({code}) + 1) / 2)"
        raise OpDefinitionError(f"no PyTorch convention for a step of value {tie} at 0 in {expr}")

    def _print_Max(self, expr: sympy.Expr) -> str:
        return self._print_extremum(expr, "torch.maximum", "torch.clamp_min")

    relu_in_clamps = True  # min(max(v, 0), hi) as torch.clamp(v, 0, hi): one pass, the same values

    def _print_Min(self, expr: sympy.Expr) -> str:
        highs = [a for a in expr.args if is_constant(a)]
        inner = [a for a in expr.args if not is_constant(a)]
        if highs and len(inner) == 1 and isinstance(inner[0], sympy.Max):  # min(max(v, lo), hi): a clamp
            lows = [a for a in inner[0].args if is_constant(a)]
            values = [a for a in inner[0].args if not is_constant(a)]
            if lows and len(values) == 1 and (self.relu_in_clamps or sympy.Max(*lows) != 0):
                low, high = sympy.Max(*lows), sympy.Min(*highs)
                return f"torch.clamp({self._print(values[0])}, {self._print(low)}, {self._print(high)})"
        return self._print_extremum(expr, "torch.minimum", "torch.clamp_max")

    def _print_extremum(self, expr: sympy.Expr, between: str, clamp: str) -> str:
        bounds = [a for a in expr.args if is_constant(a)]
        values = [a for a in expr.args if not is_constant(a)]
        if not values:  # numbers and parameters (Python floats when the code runs): Python's max or min
            name = "max" if isinstance(expr, sympy.Max) else "min"
            return repr(float(expr)) if expr.is_number else f"{name}({', '.join(self._print(a) for a in expr.args)})"
        value = values[0] if len(values) == 1 else expr.func(*values)
        code = (
            self._print(value)
            if len(values) == 1
            else f"{between}({self._print(values[0])}, {self._print(expr.func(*values[1:]))})"
        )
        if not bounds:
            return code
        bound = expr.func(*bounds)
        if bound == 0 and between == "torch.maximum":
            return f"torch.relu({code})"  # relu'(0) = 0, as derived
        return f"{clamp}({code}, {self._print(bound)})"

    # SymPy's own table of torch equivalents, with the ones it lacks
    mapping = {**TorchPrinter.mapping, sympy.erfc: "torch.erfc", sympy.erfinv: "torch.erfinv"}
    _RECIPROCALS = {sympy.cot: sympy.tan, sympy.sec: sympy.cos, sympy.csc: sympy.sin}

    def _print_reciprocal(self, expr: sympy.Expr) -> str:
        """``cot``, ``sec``, ``csc`` as one over ``tan``, ``cos``, ``sin`` (torch has none of them)."""
        return f"(1 / {self._print(self._RECIPROCALS[type(expr)](*expr.args))})"

    _print_cot = _print_sec = _print_csc = _print_reciprocal

    def _print_sinc(self, expr: sympy.Expr) -> str:
        # SymPy's sinc is sin(u)/u; torch.sinc is the normalised sin(pi u)/(pi u)
        return f"torch.sinc({atom(self._print(expr.args[0]))} / math.pi)"

    def _print_polygamma(self, expr: sympy.Expr) -> str:
        order, arg = expr.args
        if not order.is_Integer:
            raise OpDefinitionError(f"{expr}: PyTorch's polygamma takes an integer order")
        return f"torch.special.polygamma({int(order)}, {self._print(arg)})"

    def _print_sign(self, expr: sympy.Expr) -> str:
        return f"torch.sign({self._print(expr.args[0])})"

    def _print_Abs(self, expr: sympy.Expr) -> str:
        return f"torch.abs({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr: sympy.Expr) -> str:
        """``torch.where`` nested in the order written: the first branch whose condition holds.

        Numbers in every branch (a derivative of pieces linear in ``u``, ``where(u < 0.5, 2, 0)``)
        take the dtype of a tensor the conditions read: ``torch.where`` of two Python ints is an
        int64 tensor, which an in-place ``add_`` of a float cannot update."""
        *branches, (last, cond) = expr.args
        code = (
            self._print(last)
            if cond == sympy.true
            else f"torch.where({self._print(cond)}, {self._print(last)}, torch.nan)"
        )
        if cond == sympy.true and all(v.is_number for v, _ in expr.args):
            code = self._numbers_typed(expr, last)
        for value, condition in reversed(branches):
            code = f"torch.where({self._print(condition)}, {self._print(value)}, {code})"
        return code

    def _numbers_typed(self, expr: sympy.Expr, value: sympy.Expr) -> str:
        """``value``, the last branch of a select whose branches are all numbers, as a 0-dim tensor of
        the dtype of a tensor ``expr`` reads: ``torch.where(c, 0, 2)`` would be int64 (no in-place
        ``add_`` of a float onto it), ``torch.where(c, 0.0, 2.0)`` the default dtype, not float64."""
        named = sorted((s.name for s in expr.free_symbols if is_tensor_code(s)), key=len)
        branches = [v for v, _ in expr.args] if isinstance(expr, sympy.Piecewise) else list(expr.args[:2])
        if not named or not all(v.is_number for v in branches):
            return self._print(value)
        return f"{named[0]}.new_tensor({float(value)!r})"

    def _print_Relational(self, expr: sympy.Expr) -> str:
        sides = [self._print(s) if s.is_number else atom(self._print(s)) for s in (expr.lhs, expr.rhs)]
        return f"{sides[0]} {expr.rel_op} {sides[1]}"

    def _print_And(self, expr: sympy.Expr) -> str:
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr: sympy.Expr) -> str:
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Not(self, expr: sympy.Expr) -> str:
        return f"~({self._print(expr.args[0])})"


def split_masks(expr: sympy.Expr) -> tuple[list[tuple[sympy.Expr, sympy.Expr]], sympy.Expr]:
    """The steps ``Heaviside(x, 0)`` and ``Heaviside(x, 1)`` among a product's factors as ``(x, tie)``, and the rest."""
    masks, rest = [], []
    for f in sympy.Mul.make_args(expr):
        if is_mask_step(f):
            masks.append((f.args[0], f.args[1]))
        else:
            rest.append(f)
    return masks, sympy.Mul(*rest)


def _is_interval(steps: list[tuple[sympy.Expr, sympy.Expr]]) -> bool:
    """Whether ``steps`` are those of ``u - lo`` and ``hi - u``, both 1 at the tie, with ``hi - lo`` a
    positive constant: ``lo <= u <= hi``."""
    if len(steps) != 2 or any(tie != 1 for _, tie in steps):
        return False
    width = sympy.expand(steps[0][0] + steps[1][0])
    return is_constant(width) and bool(width.is_positive)


def is_mask_step(e: sympy.Basic) -> bool:
    """Whether ``e`` is one step that is 0 or 1 at its tie (a comparison, not ``torch.maximum``'s 1/2)."""
    return isinstance(e, sympy.Heaviside) and len(e.args) > 1 and e.args[1] in (0, 1)


def is_conjunction(step: sympy.Expr) -> bool:
    """Whether ``step`` is a product of comparisons' steps (an ``And``), each 0 or 1 at its tie."""
    return isinstance(step, sympy.Mul) and all(is_mask_step(s) for s in step.args)


def comparison(printer: TorchCodePrinter, arg: sympy.Expr, tie: sympy.Expr, negated: bool = False) -> str:
    """``u > c`` for a step of ``u - c`` that is 0 at the tie, ``u >= c`` for one that is 1 (or the opposite)."""
    bound = sympy.S.Zero
    if isinstance(arg, sympy.Add):
        bound = -sympy.Add(*(t for t in arg.args if is_constant(t)))
        arg = sympy.Add(*(t for t in arg.args if not is_constant(t)))
    op = {(0, False): ">", (1, False): ">=", (0, True): "<=", (1, True): "<"}[(int(tie), negated)]
    return f"{printer._print(arg)} {op} {printer._print(bound)}"


def is_constant(e: sympy.Expr) -> bool:
    """Free of tensor values: numbers, scalar parameters and sizes (all positive symbols here). An
    entry of a 0-dim tensor (``v()``) has no free symbols, and is still a tensor value."""
    return all(s.is_positive for s in e.free_symbols) and not e.has(AppliedUndef)


class FaithfulPrinter(TorchCodePrinter):
    """Prints products and powers in the forms a person writes and autograd differentiates.

    ``x**-1`` stays a power and ``c * Σx`` with ``c = 1/(N - 1)`` stays a multiplication by the
    reciprocal (the op language's ``mean`` is exactly that): the same float operations as the
    user's program, so the forward and the atom-by-atom chain can agree with autograd bit for bit.
    ``min(max(v, 0), hi)`` stays a relu then a ``clamp_max``: autograd's relu'(0) is 0, as derive
    takes it, where ``torch.clamp(v, 0, hi)`` passes the gradient at 0 (SymPy folds a hardtanh of
    a relu, ``min(max(max(v, 0), -1.5), 1.5)``, into that form).
    """

    relu_in_clamps = False

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exp = expr.as_base_exp()
        if exp.is_negative and exp.is_Rational and not is_constant(base):
            return f"{self.parenthesize(base, PRECEDENCE['Pow'])} ** {self._print_exponent(exp)}"
        return super()._print_Pow(expr, rational)

    def _print_Mul(self, expr: sympy.Mul) -> str:
        masks, _ = split_masks(expr)
        coefficient, factors = expr.as_coeff_mul()
        sizes = [f for f in factors if is_constant(f)]
        values = [f for f in factors if not is_constant(f)]
        if masks or not values or not any(f.is_Pow and f.exp.is_negative for f in expr.args):
            return super()._print_Mul(expr)
        scale = sympy.Mul(coefficient, *sizes)
        # a / b stays a division (as written, and as autograd divides); a lone b**-1 stays a power
        divisors = [f for f in values if f.is_Pow and f.exp == -1] if len(values) > 1 else []
        numerators = [f for f in values if f not in divisors] or [sympy.S.One]
        body = " * ".join(self.parenthesize(f, PRECEDENCE["Mul"]) for f in numerators)
        body += "".join(f" / {self.parenthesize(f.base, PRECEDENCE['Mul'])}" for f in divisors)
        if scale == 1:
            return body
        if scale == -1:
            return f"-{body}"
        return f"({self._print(scale)}) * {body}"


_HALF_MAX = 65504  # the largest float16: a bound torch.clamp takes in every floating dtype
_NAMED_VIEW = re.compile(r"[A-Za-z_]\w*(\[(\s*(:|None|0)\s*,?)*\])?")  # pre1, var[:, None]; not x[idx]


class MaskingPrinter(TorchCodePrinter):
    """Prints a value times a step as a product with a float mask (fast on a CPU; see ``float_mask``).

    ``where(u > 0, g, 0)`` is 0 where ``g`` is infinite and ``g * mask`` is NaN there, so this
    printer is for backwards whose values stay finite (``code.stays_finite``).
    """

    float_masks = True


PRINTER = TorchCodePrinter({"strict": False})
MASKING = MaskingPrinter({"strict": False})
FAITHFUL = FaithfulPrinter({"strict": False})
_MATH = PythonCodePrinter({"standard": "python3", "strict": False})


def shape_tuple(sizes: list[str]) -> str:
    """``(N, K)`` or ``(N,)``: a shape literal black keeps on one line."""
    return f"({sizes[0]},)" if len(sizes) == 1 else f"({', '.join(sizes)})"


def size_code(size: sympy.Expr) -> str:
    """A size expression as Python: ``floor((T - 3)/2) + 1`` prints as ``(T-3)//2+1``."""
    floors = {f: sympy.Symbol(f"__floor{k}") for k, f in enumerate(sympy.sympify(size).atoms(sympy.floor))}
    text = PRINTER.doprint(sympy.sympify(size).xreplace(floors)).replace(" ", "")
    for f, stand_in in floors.items():
        num, den = sympy.fraction(sympy.together(f.args[0]))
        text = text.replace(stand_in.name, f"({atom(size_code(num))}//{atom(size_code(den))})")
    return text


def atom(code: str) -> str:
    """Parenthesise code unless it is already an atom (a name, call or subscript)."""
    depth = 0
    for ch in code:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch in " +-*/@<>=":
            return f"({code})"
    return code


# torch functions that always return a new tensor (never a view or an input): what a chain starts with
_ALLOCATING = frozenset(
    "add sub mul div addcmul addcdiv exp log erf tanh sigmoid square sqrt rsqrt reciprocal pow abs sign "
    "relu neg where maximum minimum clamp lerp".split()
)


def is_name(code: str) -> bool:
    """Whether ``code`` only reads a tensor by name (``t2``, ``(t2)``, ``var[:, None]``): nothing it allocated.

    Example:
        >>> is_name("(t2)"), is_name("var[:, None]"), is_name("(t2*x)"), is_name("x[idx]")
        (True, True, False, False)
    """
    while code.startswith("(") and code.endswith(")") and atom(code[1:-1]) == code[1:-1]:
        code = code[1:-1]
    return _NAMED_VIEW.fullmatch(code) is not None


def is_fresh(code: str) -> bool:
    """Whether an atom's value is a tensor it allocated: its last operation is an in-place method
    (``torch.mul(a, b).mul_(c)``) or a torch function that always allocates (``torch.mul(a, b)``).

    Generated code updates in place only a buffer it allocated itself, so such a value needs no
    copy before anything writes into it.

    Example:
        >>> is_fresh("torch.mul(a, b).mul_(c)"), is_fresh("torch.mul(a[:, None], b)"), is_fresh("x.mul_(c)[:, None]")
        (True, True, False)
        >>> is_fresh("x"), is_fresh("x.expand(3, 4)"), is_fresh("torch.mul(a, b)[:, None]")
        (False, False, False)
    """
    if atom(code) != code or not code.endswith(")"):
        return False
    depth = 0
    for k in range(len(code) - 1, -1, -1):
        depth += {")": 1, "]": 1, "(": -1, "[": -1}.get(code[k], 0)
        if depth == 0:
            name = code[:k].rsplit(".", 1)
            if len(name) != 2 or not name[1].isidentifier():
                return False
            return name[1].endswith("_") or (name[0] == "torch" and name[1] in _ALLOCATING)
    return False


__all__ = [
    "MASKING",
    "PRINTER",
    "Select",
    "TorchCodePrinter",
    "atom",
    "is_fresh",
    "is_constant",
    "shape_tuple",
    "size_code",
    "split_masks",
]
