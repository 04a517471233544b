"""Elementwise expressions evaluated with one fresh buffer: the first operation allocates, the rest update it in place.

``dout*(1/2 + erf(u)/2 + c*u*exp(-u**2/2))`` printed as a plain expression allocates a full-size
temporary for every operation, and on a CPU a fresh large buffer costs page faults on top of the
pass over memory. Printed as a chain, ``u.square().mul_(-0.5).exp_().mul_(u).mul_(c).add_(erf_u,
alpha=0.5).add_(0.5).mul_(dout)``, it allocates once. An update in place is used only on a buffer
the chain itself allocated (never on a saved value or an input), and only when the operand's axes
fit inside it (broadcasting never grows a buffer in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .printer import (
    PRINTER,
    Select,
    TorchCodePrinter,
    atom,
    comparison,
    is_conjunction,
    is_mask_step,
    is_name,
    split_masks,
)

# SymPy function -> (torch function, in-place method)
_UNARY = {
    sympy.exp: ("torch.exp", "exp_"),
    sympy.log: ("torch.log", "log_"),
    sympy.tanh: ("torch.tanh", "tanh_"),
    sympy.erf: ("torch.erf", "erf_"),
    sympy.sin: ("torch.sin", "sin_"),
    sympy.cos: ("torch.cos", "cos_"),
    sympy.Abs: ("torch.abs", "abs_"),
    sympy.sign: ("torch.sign", "sign_"),
}


@dataclass(frozen=True)
class Piece:
    """Code for a sub-expression: its axes, and whether it is a buffer the chain allocated."""

    code: str
    axes: frozenset[sympy.Symbol]
    fresh: bool = False
    tensor: bool = True  # False: a Python number, size or parameter


def chain(
    e: sympy.Expr,
    axes: dict[sympy.Symbol, frozenset[sympy.Symbol]],
    printer: TorchCodePrinter = PRINTER,
    inner: sympy.Symbol | None = None,
) -> str:
    """Code evaluating ``e`` whose leaves are the symbols of ``axes`` (code text as their names).

    ``inner`` is the result's innermost (contiguous) axis, when it has axes.
    """
    return _Chain(axes, printer, inner).emit(e).code


class _Chain:
    def __init__(
        self, axes: dict[sympy.Symbol, frozenset[sympy.Symbol]], printer: TorchCodePrinter, inner: sympy.Symbol | None
    ) -> None:
        self.axes = axes
        self.printer = printer
        self.inner = inner

    def _across_inner(self, pieces: tuple[Piece, ...], full: frozenset[sympy.Symbol]) -> int:
        """How many of ``pieces`` are tensors broadcast along the innermost axis of ``full`` (stride 0 there).

        PyTorch's CPU elementwise kernels vectorise the inner loop when at most one operand is
        broadcast along it; with two (``torch.addcmul(a[:, None], b[:, None], x)``) the loop runs
        element by element, about twice the time of the two passes ``(x * b).add_(a)``.
        """
        if self.inner is None or self.inner not in full:
            return 0
        return sum(1 for p in pieces if p.tensor and self.inner not in p.axes)

    def emit(self, e: sympy.Expr) -> Piece:
        if not (e.free_symbols & set(self.axes)):
            return Piece(self.printer.doprint(e), frozenset(), tensor=False)
        if e in self.axes:
            return Piece(e.name, self.axes[e])  # type: ignore[attr-defined]
        if is_mask_step(e) and self.printer.float_masks:  # a step among float values: 0/1 floats, one pass
            mask = self.printer.compare_into_floats(*e.args)
            if mask is not None:
                return Piece(mask, self._axes_of(e), fresh=True)
        if _steps_only(e) and self._float_steps(e):
            paired = _one_step_per_pair(e)  # 0.01·step(-x) + step(x) is 0.01 + 0.99·step(x): one mask
            if self._axes_of(paired) == self._axes_of(e):  # (step(x) + step(-x) is 1, of no axes)
                e = paired
            if not isinstance(e, (sympy.Add, sympy.Mul)):
                return self.emit(e)
        elif _steps_only(e):  # (x > 0) + 1 is a bool or integer tensor: no in-place float arithmetic on it
            return Piece(self.printer.doprint(e), self._axes_of(e), fresh=False)
        if isinstance(e, sympy.Add):
            return self._add(e)
        if isinstance(e, sympy.Mul):
            return self._mul(e)
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if type(e) in _UNARY:
            return self._unary(e.args[0], *_UNARY[type(e)])
        if isinstance(e, Select):
            return self._select(e)
        if isinstance(e, sympy.Max) and len(e.args) == 2 and 0 in e.args:
            (argument,) = (a for a in e.args if a != 0)  # Max(0, a): relu(a), however a is built
            return self._unary(argument, "torch.relu", "relu_")
        if isinstance(e, (sympy.Min, sympy.Max)):
            clamp = self._clamp(e)
            if clamp is not None:
                return clamp
        return Piece(self.printer.doprint(e), self._axes_of(e), fresh=False)  # compares, Max of values...

    def _float_steps(self, e: sympy.Expr) -> bool:
        """Whether ``e``, a sum or product of steps and numbers (``0.01·step(-x) + step(x)``), is
        computed in 0/1 float masks: each step compares into floats, so no bool arithmetic (a
        scalar loop, and a type promotion per operation, on a CPU) is left."""
        if not self.printer.float_masks or not isinstance(e, (sympy.Add, sympy.Mul)) or e.has(sympy.Piecewise, Select):
            return False
        steps = e.atoms(sympy.Heaviside)
        return all(is_mask_step(h) and self.printer.compare_into_floats(*h.args) is not None for h in steps)

    def _one_operation(self, e: sympy.Expr) -> bool:
        """``a + b``, ``1 - a``, ``c*a``, ``a*b``, ``a/b`` of values: printed as written (one new buffer anyway)."""
        operands = [a for a in e.args if a.free_symbols & set(self.axes)]
        if any(
            a not in self.axes
            and not (isinstance(a, sympy.Pow) and a.args[0] in self.axes and a.args[1] == -1)
            and a.as_coeff_Mul()[1] not in self.axes
            for a in operands
        ):
            return False
        constants = [a for a in e.args if not (a.free_symbols & set(self.axes))]
        scaled = [a for a in operands if a not in self.axes and a.as_coeff_Mul()[0] not in (1, -1)]
        return len(operands) + min(len(constants), 1) + len(scaled) <= 2

    def _axes_of(self, e: sympy.Expr) -> frozenset[sympy.Symbol]:
        out: frozenset[sympy.Symbol] = frozenset()
        for s in e.free_symbols & set(self.axes):
            out |= self.axes[s]  # type: ignore[index]
        return out

    # -- sums -------------------------------------------------------------------------------------
    def _add(self, e: sympy.Add) -> Piece:
        full = self._axes_of(e)
        if self._one_operation(e) or (
            any(_bare_step(t) for t in e.args) and any(t.could_extract_minus_sign() for t in e.args)
        ):  # one operation, or a mask next to a subtraction: the printer writes its 0/1 values
            return Piece(self.printer.doprint(e), full, fresh=True)
        constant = sympy.Add(*(t for t in e.args if not (t.free_symbols & set(self.axes))))
        collected = self._by_full_factor(e, full)
        if not isinstance(collected, sympy.Add):
            return self.emit(collected)  # one term left: X·(a + b)
        e = collected
        terms = [_Term(body, c, self._pair(body), self.emit(body)) for body, c in _terms(e, set(self.axes))]
        acc, axes, rest = self._start_sum(terms, full)
        for term in rest:
            acc = self._accumulate(acc, axes, term)
            axes |= term.piece.axes
        if constant != 0:
            acc = f"{atom(acc)}.add_({self.printer.doprint(constant)})"
        return Piece(acc, full, fresh=True)

    def _by_full_factor(self, e: sympy.Add, full: frozenset[sympy.Symbol]) -> sympy.Expr:
        """``X·a + X·b + X·c`` as ``X·(a + b + c)`` for a full-size value ``X`` and smaller ``a, b, c``:
        one pass over ``X`` (an ``addcmul_``), not one per term."""
        groups: dict[sympy.Expr, list[sympy.Expr]] = {}
        others: list[sympy.Expr] = []
        for t in e.args:
            big = [f for f in sympy.Mul.make_args(t) if f in self.axes and self.axes[f] == full]
            if len(big) == 1 and self._axes_of(t / big[0]) < full:
                groups.setdefault(big[0], []).append(t / big[0])
            else:
                others.append(t)
        if all(len(small) < 2 for small in groups.values()):
            return e
        collected = [x * sympy.Add(*small) for x, small in groups.items()]
        return sympy.Add(*others, *collected, evaluate=False) if others else sympy.Add(*collected, evaluate=False)

    def _start_sum(self, terms: list[_Term], full: frozenset[sympy.Symbol]) -> tuple[str, frozenset, list[_Term]]:
        """The first operation of a sum, the one that allocates: ideally it makes the full buffer at once."""
        for t in terms:  # a buffer this chain made already
            if t.piece.fresh and t.piece.axes == full and t.pair is None:
                rescaled = None if t.coefficient == 1 else self._scale_a_sum(t.coefficient * t.body)
                if t.coefficient == 1:
                    scaled = t.piece.code
                elif rescaled is not None:  # the coefficient rides on the passes of a sum inside the term
                    scaled = self.emit(rescaled).code
                else:
                    scaled = f"{atom(t.piece.code)}.mul_({self.printer.doprint(t.coefficient)})"
                return scaled, full, [u for u in terms if u is not t]
        pairs = [t for t in terms if t.pair is not None]
        # other + c·x·y: one addcmul, broadcasting the other (small, or a value) to full size
        starts = {
            (k, j): cost
            for k, t in enumerate(terms)
            for j, u in enumerate(terms)
            if (cost := self._addcmul_start(t, u, full)) is not None
        }
        if starts:
            k, j = min(starts, key=starts.__getitem__)
            t, u = terms[k], terms[j]
            x, y = t.pair  # type: ignore[misc]
            other = (
                u.piece.code
                if u.coefficient == 1
                else f"{atom(u.piece.code)} * {atom(self.printer.doprint(u.coefficient))}"
            )
            code = f"torch.addcmul({other}, {x.code}, {y.code}{_value(t.coefficient)})"
            return code, full, [v for v in terms if v is not t and v is not u]
        for t in pairs:  # c·x·y: the product makes the buffer
            x, y = t.pair  # type: ignore[misc]
            if x.axes | y.axes == full:
                code = f"{atom(x.code)} * {atom(y.code)}"
                code = code if t.coefficient == 1 else f"({code}).mul_({self.printer.doprint(t.coefficient)})"
                return code, full, [v for v in terms if v is not t]
        terms = sorted(terms, key=lambda t: t.piece.axes != full)
        first, rest = terms[0], terms[1:]
        if rest and first.coefficient == 1:
            second, rest = rest[0], rest[1:]
            if second.coefficient in (1, -1):
                code = f"{first.piece.code} {'+' if second.coefficient == 1 else '-'} {atom(second.piece.code)}"
            else:
                code = f"torch.add({first.piece.code}, {second.piece.code}{_alpha(second.coefficient)})"
            return code, first.piece.axes | second.piece.axes, rest
        return f"torch.mul({first.piece.code}, {self.printer.doprint(first.coefficient)})", first.piece.axes, rest

    def _addcmul_start(self, t: _Term, u: _Term, full: frozenset[sympy.Symbol]) -> int | None:
        """``torch.addcmul(u, *t.pair)`` as the sum's first operation: None if it cannot be, else how
        many operands it broadcasts along the inner axis (at most one: two make a scalar loop)."""
        if t.pair is None or u is t or not u.piece.tensor:
            return None
        if u.piece.axes == full and (u.coefficient != 1 or u.piece.fresh):
            return None  # a full-size other is used as it is, never scaled or taken from the chain
        x, y = t.pair
        if x.axes | y.axes | u.piece.axes != full:
            return None
        inner = self._across_inner((u.piece, x, y), full)
        return inner if inner < 2 else None

    def _pair(self, body: sympy.Expr) -> tuple[Piece, Piece] | None:
        """``x·y`` of two values the chain did not make (an ``addcmul`` operand pair), else None."""
        factors = sympy.Mul.make_args(body)
        if not isinstance(body, sympy.Mul) or len(factors) != 2 or any(f.as_base_exp()[1] == -1 for f in factors):
            return None
        if any(f.has(sympy.Piecewise) or _bare_step(f) for f in factors):
            return None  # a step prints as a bool mask: addcmul's own subtraction refuses bools
        x, y = (self.emit(f) for f in factors)
        # a buffer the chain made is updated in place instead, unless it is the smaller operand
        usable = (not x.fresh or x.axes < y.axes) and (not y.fresh or y.axes < x.axes)
        return (x, y) if usable and x.tensor and y.tensor else None

    def _accumulate(self, acc: str, axes: frozenset[sympy.Symbol], term: _Term) -> str:
        """``acc + c·term``: in place when it fits (``addcmul_`` for a product of two values)."""
        if not term.piece.axes <= axes:
            return f"{atom(acc)}.add({term.piece.code}{_alpha(term.coefficient)})"  # broadcasting grows it: new buffer
        if term.pair is not None:
            x, y = term.pair
            if self._across_inner((x, y), axes) == 2:  # both broadcast along the inner axis: their product is small
                return f"{atom(acc)}.add_({atom(x.code)} * {atom(y.code)}{_alpha(term.coefficient)})"
            return f"{atom(acc)}.addcmul_({x.code}, {y.code}{_value(term.coefficient)})"
        return f"{atom(acc)}.add_({term.piece.code}{_alpha(term.coefficient)})"

    # -- products ---------------------------------------------------------------------------------
    def _mul(self, e: sympy.Mul) -> Piece:
        full = self._axes_of(e)
        if self._one_operation(e):
            return Piece(self.printer.doprint(e), full, fresh=True)
        masks, rest = split_masks(e)
        if masks and rest.free_symbols & set(self.axes):
            r = self.emit(rest)
            if r.fresh and len(masks) == 1 and r.axes == full:  # zero where the step is 0, in place
                arg, tie = masks[0]
                mask = self.printer.float_mask(arg, tie)
                if mask is not None:
                    return Piece(f"{atom(r.code)}.mul_({mask})", full, True)
                return Piece(
                    f"{atom(r.code)}.masked_fill_({comparison(self.printer, arg, tie, negated=True)}, 0.0)", full, True
                )
            masked = self._times_mask(r, masks, full, self.printer.float_masks)
            if masked is not None:
                return masked
            return Piece(self.printer.doprint(e), full, fresh=True)  # torch.where(step, rest, 0.0)
        e = self._factor_sums(e, full)
        constant = sympy.Mul(*(f for f in e.args if not (f.free_symbols & set(self.axes))))
        scaled = self._scale_a_sum(e)
        if scaled is not None:
            return self.emit(scaled)
        numerators, denominators, factors = [], [], list(e.args)
        small = self._smaller_first(e, full)
        if small:
            numerators.append(self.emit(sympy.Mul(*small)))
            factors, constant = [f for f in factors if f not in small], sympy.S.One
        for f in factors:
            if not (f.free_symbols & set(self.axes)):
                continue
            base, exponent = f.as_base_exp()
            if exponent == -1:
                denominators.append(self.emit(base))
            else:
                numerators.append(self.emit(f))
        numerators.sort(key=lambda p: (not p.fresh, p.axes != full))
        if numerators and numerators[0].fresh and numerators[0].axes == full:
            acc, axes, rest = numerators[0].code, full, numerators[1:]
        elif len(numerators) >= 2:
            acc = f"torch.mul({numerators[0].code}, {numerators[1].code})"
            axes, rest = numerators[0].axes | numerators[1].axes, numerators[2:]
        elif numerators:
            if constant != 1:
                acc, constant = f"torch.mul({numerators[0].code}, {self.printer.doprint(constant)})", sympy.S.One
            elif denominators:
                d, denominators = denominators[0], denominators[1:]
                acc = f"torch.div({numerators[0].code}, {d.code})"
                axes, rest = numerators[0].axes | d.axes, []
                return self._finish_mul(acc, axes, rest, denominators, constant, full)
            else:
                return numerators[0]
            axes, rest = numerators[0].axes, []
        else:
            d, denominators = denominators[0], denominators[1:]
            acc, axes, rest = f"torch.reciprocal({d.code})", d.axes, []
            if constant != 1:
                acc, constant = f"{acc}.mul_({self.printer.doprint(constant)})", sympy.S.One
        return self._finish_mul(acc, axes, rest, denominators, constant, full)

    def _times_mask(
        self,
        value: Piece,
        steps: list[tuple[sympy.Expr, sympy.Expr]],
        full: frozenset,
        floats: bool,
        complement: bool = False,
    ) -> Piece | None:
        """``value`` times the product of ``steps`` (or its complement) into the steps' fresh float
        mask, when the mask spans the result (no new buffer for the product) and masks may be
        floats; None otherwise."""
        steps = sorted(steps, key=lambda s: -len(self._axes_of(s[0])))  # the first mask takes the others in place
        if not value.tensor or not steps or self._axes_of(steps[0][0]) != full:
            return None
        mask = self.printer.steps_into_floats(steps, complement) if floats else None
        if mask is None:
            return None
        if value.fresh and value.axes == full:
            return Piece(f"{atom(value.code)}.mul_({mask})", full, True)
        return Piece(f"{atom(mask)}.mul_({value.code})", full, True)

    def _factor_sums(self, e: sympy.Mul, full: frozenset[sympy.Symbol]) -> sympy.Expr:
        """``s·(X·a + X·b)`` as ``s·X·(a + b)`` for a full-size ``X``, so that ``s`` meets the small sum
        before the one pass over ``X`` (see :meth:`_by_full_factor`)."""
        factors: list[sympy.Expr] = []
        for f in e.args:
            collected = self._by_full_factor(f, full) if isinstance(f, sympy.Add) else f
            factors += sympy.Mul.make_args(collected) if isinstance(collected, sympy.Mul) else [collected]
        return sympy.Mul(*factors) if len(factors) > len(e.args) else e

    def _smaller_first(self, e: sympy.Mul, full: frozenset[sympy.Symbol]) -> list[sympy.Expr]:
        """The factors of ``e`` to multiply first, at their own size: those smaller than the result,
        numbers included, when two or more are and together they stay smaller.

        ``c·a[n]·x[n, d] / s[n]`` is ``(c·a/s)[n]·x``: one pass over the full size, where multiplying
        ``x`` first would make one pass per factor.
        """
        small = [f for f in e.args if self._axes_of(f) < full]
        tensors = [f for f in small if f.free_symbols & set(self.axes)]
        if len(small) < 2 or len(small) == len(e.args) or not tensors or not self._axes_of(sympy.Mul(*small)) < full:
            return []
        return small

    def _scale_a_sum(self, e: sympy.Expr) -> sympy.Expr | None:
        """``c·(a + 2·b + 1)·x`` as ``(c·a + 2c·b + c)·x`` for a number ``c``, when the sum's own passes
        can carry it.

        The number rides on an ``alpha``, a ``value`` or the constant term of the sum's chain, which
        saves the pass a final ``.mul_(c)`` would take. Only a number factor moves, so the value is
        the same.
        """
        if not isinstance(e, sympy.Mul):
            return None
        leaves = set(self.axes)
        constant = sympy.Mul(*(f for f in e.args if not (f.free_symbols & leaves)))
        if constant == 1 or not constant.is_number:
            return None
        sums = [
            f for f in e.args if isinstance(f, sympy.Add) and f.free_symbols & leaves and not self._one_operation(f)
        ]
        if not sums:
            return None
        absorbs = [t for t in sums[0].args if not (t.free_symbols & leaves) or _split_coefficient(t)[1] != 1]
        if not absorbs:
            return None
        others = [f for f in e.args if f is not sums[0] and f.free_symbols & leaves]
        return sympy.Mul(sympy.Add(*(constant * t for t in sums[0].args)), *others)

    def _finish_mul(
        self,
        acc: str,
        axes: frozenset[sympy.Symbol],
        rest: list[Piece],
        denominators: list[Piece],
        constant: sympy.Expr,
        full: frozenset[sympy.Symbol],
    ) -> Piece:
        for p in rest:
            acc = f"{atom(acc)}.mul_({p.code})" if p.axes <= axes else f"{atom(acc)}.mul({p.code})"
            axes |= p.axes
        for p in denominators:
            acc = f"{atom(acc)}.div_({p.code})" if p.axes <= axes else f"{atom(acc)}.div({p.code})"
            axes |= p.axes
        if constant != 1 and constant.is_Pow and constant.exp == -1:  # u/β divides: β/β is 1, β·(1/β) may not be
            acc = f"{atom(acc)}.div_({self.printer.doprint(constant.base)})"
        elif constant != 1:
            acc = f"{atom(acc)}.mul_({self.printer.doprint(constant)})"
        return Piece(acc, full, fresh=True)

    # -- powers and functions ---------------------------------------------------------------------
    def _pow(self, e: sympy.Pow) -> Piece:
        base, exponent = e.args
        if exponent.free_symbols & set(self.axes) or not (base.free_symbols & set(self.axes)):
            return Piece(self.printer.doprint(e), self._axes_of(e))
        b = self.emit(base)
        methods = {2: "square", -1: "reciprocal", sympy.S.Half: "sqrt", -sympy.S.Half: "rsqrt"}
        if exponent in methods:
            name = methods[exponent]
            return Piece(f"{atom(b.code)}.{name}_()" if b.fresh else f"torch.{name}({b.code})", b.axes, fresh=True)
        power = self.printer.doprint(exponent)
        return Piece(f"{atom(b.code)}.pow_({power})" if b.fresh else f"torch.pow({b.code}, {power})", b.axes, True)

    def _select(self, e: sympy.Expr) -> Piece:
        """``b.lerp_(a, mask)`` into ``b``'s buffer when the chain made it, else ``torch.lerp(b, a, mask)``."""
        a, b, step = e.args
        x, y, full = self.emit(a), self.emit(b), self._axes_of(e)
        steps = [s.args for s in step.args] if is_conjunction(step) else [step.args] if is_mask_step(step) else []
        if b == 0 and steps and not _bare_step(a):  # a·mask: no buffer for the product (a select's are floats)
            masked = self._times_mask(x, steps, full, floats=True)
            if masked is not None:
                return masked
        if a == 0 and is_conjunction(step) and not _bare_step(b):  # b outside an interval
            masked = self._times_mask(y, steps, full, floats=True, complement=True)
            if masked is not None:
                return masked
        ordered = sorted(steps, key=lambda s: -len(self._axes_of(s[0])))  # the widest mask first
        if is_conjunction(step) and self._axes_of(ordered[0][0]) == self._axes_of(step):
            mask = self.printer.steps_into_floats(ordered)
        else:
            mask = self.printer.select_mask(step)
        if mask is None or not (x.tensor and y.tensor) or _bare_step(a) or _bare_step(b):
            code = self.printer.doprint(e)  # (the printer's lerp reads steps as floats)
            return Piece(code, full, fresh=not is_name(code))  # Select(1, 0, mask) is the mask: a name
        if y.fresh and y.axes == full:
            return Piece(f"{atom(y.code)}.lerp_({x.code}, {mask})", full, True)
        return Piece(f"torch.lerp({y.code}, {x.code}, {mask})", full, True)

    def _clamp(self, e: sympy.Min | sympy.Max) -> Piece | None:
        """``Min(Max(a, lo), hi)``, ``Max(a, lo)`` or ``Min(a, hi)`` with number bounds as one clamp of
        ``a``, in place when the chain made ``a``'s buffer; None for an extremum of two values."""
        bounds: dict[type, sympy.Expr | None] = {sympy.Min: None, sympy.Max: None}
        # torch.clamp(a, lo, hi) is min(max(a, lo), hi): a max inside a min, never the other way
        # (max(min(a, hi), lo) is lo where lo > hi, and a parameter's order is the caller's)
        while isinstance(e, (sympy.Min, sympy.Max)) and bounds[type(e)] is None and bounds[sympy.Max] is None:
            constants = [a for a in e.args if not (a.free_symbols & set(self.axes))]
            values = [a for a in e.args if a.free_symbols & set(self.axes)]
            if len(values) != 1 or not constants:
                return None
            bounds[type(e)] = e.func(*constants)
            e = values[0]
        if isinstance(e, (sympy.Min, sympy.Max)):
            return None
        x = self.emit(e)
        low, high = (bounds[f] for f in (sympy.Max, sympy.Min))
        limits = ", ".join(
            f"{name}={self.printer.doprint(b)}" for name, b in (("min", low), ("max", high)) if b is not None
        )
        return Piece(
            f"{atom(x.code)}.clamp_({limits})" if x.fresh else f"torch.clamp({x.code}, {limits})", x.axes, True
        )

    def _unary(self, argument: sympy.Expr, function: str, method: str) -> Piece:
        x = self.emit(argument)
        return Piece(f"{atom(x.code)}.{method}()" if x.fresh else f"{function}({x.code})", x.axes, fresh=True)


@dataclass(frozen=True)
class _Term:
    """One term ``coefficient·body`` of a sum: its code, and its two factors when it is an addcmul pair."""

    body: sympy.Expr
    coefficient: sympy.Expr
    pair: tuple[Piece, Piece] | None
    piece: Piece


def _terms(e: sympy.Add, leaves: set[sympy.Symbol]) -> list[tuple[sympy.Expr, sympy.Expr]]:
    return [_split_coefficient(t) for t in e.args if t.free_symbols & leaves]


def _steps_only(e: sympy.Expr) -> bool:
    """Whether ``e`` reads values only through steps (``Heaviside(x) + 1``): its code is bool or integer."""
    steps = e.atoms(sympy.Heaviside, sympy.Piecewise)
    if not steps:
        return False
    # a select reads both its branches (with its step set to 1, Select(0, dout, 1) would be 0)
    branches = e.replace(lambda n: isinstance(n, Select), lambda n: _BRANCHES(*n.args[:2]))
    return not branches.xreplace({h: sympy.Integer(1) for h in steps}).free_symbols


_BRANCHES = sympy.Function("branches")


def _bare_step(e: sympy.Expr) -> bool:
    """Whether ``e`` holds a step outside a ``Select`` (whose mask prints as floats, not bools)."""
    return e.xreplace({s: sympy.Dummy() for s in e.atoms(Select)}).has(sympy.Heaviside)


def _one_step_per_pair(e: sympy.Expr) -> sympy.Expr:
    """``e`` with ``step(-w)`` written ``1 - step(w)`` where ``e`` reads both (ties ``1 - t`` and
    ``t``): the same 0/1 values, tie included, and one comparison fewer. Not at NaN: there both
    comparisons are false, so ``1 - step(w)`` is 1 where ``step(-w)`` was 0 (PyTorch's
    ``leaky_relu`` backward, too, gives the slope's value at NaN)."""
    steps = sorted((h for h in e.atoms(sympy.Heaviside) if is_mask_step(h)), key=sympy.default_sort_key)
    for h in steps:
        for g in steps:
            if h.args[0] == -g.args[0] and h.args[1] == 1 - g.args[1]:
                # keep the step whose coefficient stays positive: no subtraction beside a mask
                ways = (sympy.expand(e.xreplace({h: 1 - g})), sympy.expand(e.xreplace({g: 1 - h})))
                return _one_step_per_pair(min(ways, key=lambda w: (_subtractions(w), sympy.default_sort_key(w))))
    return e


def _subtractions(e: sympy.Expr) -> int:
    return sum(1 for t in sympy.Add.make_args(e) if t.could_extract_minus_sign())


def _value(coefficient: sympy.Expr) -> str:
    return "" if coefficient == 1 else f", value={PRINTER.doprint(coefficient)}"


def _split_coefficient(term: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """``-2*sqrt(pi)*x*y`` -> ``(x*y, -2*sqrt(pi))``: the numeric coefficient of a term and the rest."""
    factors = sympy.Mul.make_args(term)
    return sympy.Mul(*(f for f in factors if not f.is_number)), sympy.Mul(*(f for f in factors if f.is_number))


def _alpha(coefficient: sympy.Expr) -> str:
    return "" if coefficient == 1 else f", alpha={PRINTER.doprint(coefficient)}"


__all__ = ["chain"]
