"""Lowering: index expressions to vectorised PyTorch statements.

Each axis of a lowered value is labelled by an index symbol. Entries become tensor variables
(viewed without their size-1 axes), sums become ``.sum(dim)``, products summed over a shared index
become ``@`` or ``einsum``, deltas on an integer tensor become ``one_hot`` (or an ``index_add_``
scatter when the tensor's indices are all summed), and the scalar shell is printed by a subclass
of SymPy's own torch printer. Common sub-expressions are computed once, into temporaries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy
from sympy.printing.pytorch import TorchPrinter

from .errors import OpDefinitionError
from .indexalg import tensor_names
from .indexalg import (
    ArgMax,
    Dim,
    Flat,
    IMax,
    ISum,
    Pack,
    dim_of,
    entry_indices,
    entry_name,
    free_indices,
    is_entry,
    is_index,
)
from .program import Layout, TensorInfo

Axes = tuple[sympy.Symbol, ...]


class TorchCodePrinter(TorchPrinter):
    """SymPy's torch printer, with Python operators for powers and PyTorch's kink conventions."""

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        return expr.name

    def _print(self, expr, **kwargs) -> str:
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Rational and expr.is_real:
            return repr(float(expr))  # constants such as sqrt(2/pi) become Python floats
        return super()._print(expr, **kwargs)

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exp = expr.as_base_exp()
        b = self.parenthesize(base, sympy.printing.precedence.PRECEDENCE["Pow"])
        if exp == sympy.S.Half:
            return f"torch.sqrt({self._print(base)})"
        if exp == -1:
            return f"1 / {b}"
        if exp.is_Integer or exp.is_Rational or exp.is_Float:
            return f"{b} ** {self._print_exponent(exp)}"
        return f"{b} ** {self.parenthesize(exp, sympy.printing.precedence.PRECEDENCE['Pow'])}"

    def _print_exponent(self, exp: sympy.Expr) -> str:
        if exp.is_Integer and exp >= 0:
            return str(exp)
        if exp.is_Rational and not exp.is_Integer:
            return f"({float(exp)!r})"
        return f"({self._print(exp)})"

    def _print_Rational(self, expr: sympy.Rational) -> str:
        return f"{expr.p} / {expr.q}"

    def _print_Float(self, expr: sympy.Float) -> str:
        return repr(float(expr))

    def _print_Heaviside(self, expr: sympy.Expr) -> str:
        # PyTorch's conventions at a kink: relu'(0) = 0 (a value against a constant);
        # torch.maximum(x, y) splits the gradient evenly at a tie (two values)
        arg = expr.args[0]
        code = self._print(arg)
        ties_between_values = isinstance(arg, sympy.Add) and len([t for t in arg.args if not t.is_number]) >= 2
        if ties_between_values:
            return f"torch.heaviside({code}, torch.full_like({code}, 0.5))"
        return f"({code} > 0)"

    def _print_Max(self, expr: sympy.Expr) -> str:
        a, b = expr.args[0], sympy.Max(*expr.args[1:])
        if a.is_number and b.is_number:
            return repr(float(expr))
        if a.is_number or b.is_number:
            value, bound = (b, a) if a.is_number else (a, b)
            if bound == 0:
                return f"torch.relu({self._print(value)})"  # relu's gradient at 0 is 0, as derived
            return f"torch.clamp_min({self._print(value)}, {self._print(bound)})"
        return f"torch.maximum({self._print(a)}, {self._print(b)})"

    def _print_Min(self, expr: sympy.Expr) -> str:
        a, b = expr.args[0], sympy.Min(*expr.args[1:])
        if a.is_number:
            return f"torch.clamp_max({self._print(b)}, {self._print(a)})"
        if b.is_number:
            return f"torch.clamp_max({self._print(a)}, {self._print(b)})"
        return f"torch.minimum({self._print(a)}, {self._print(b)})"

    def _print_sign(self, expr: sympy.Expr) -> str:
        return f"torch.sign({self._print(expr.args[0])})"

    def _print_Abs(self, expr: sympy.Expr) -> str:
        return f"torch.abs({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr: sympy.Expr) -> str:
        raise OpDefinitionError(f"piecewise expression {expr} cannot be lowered; use Max/Min/Abs")


_PRINTER = TorchCodePrinter({"strict": False})


@dataclass(frozen=True)
class Val:
    """A lowered value: Python code and the index symbol labelling each axis."""

    code: str
    axes: Axes
    is_int: bool = False
    raw: tuple[str, tuple[sympy.Symbol | None, ...]] | None = None


@dataclass
class Lowerer:
    """Turns index expressions into lines of torch code, sharing temporaries between them."""

    layouts: dict[str, TensorInfo]
    ref: str
    lines: list[str] = field(default_factory=list)
    memo: dict[sympy.Expr, tuple[str, Axes]] = field(default_factory=dict)
    counter: int = 0
    names: set[str] = field(default_factory=set)
    preferred: Axes = ()
    single_assignment: bool = False
    fuse_arithmetic: bool = False
    share: bool = True

    # -- public ------------------------------------------------------------------------------
    def assign(self, name: str, e: sympy.Expr, target: TensorInfo, accumulate: bool = False, comment: str = "") -> None:
        """Emit ``name = e`` (or ``name = name + e``), laid out like ``target``."""
        self.preferred = target.indices
        if not tensor_names(e) and not e.has(sympy.KroneckerDelta):
            # a constant (a gradient that cancelled to 0): a tensor of the target's shape
            shape = (
                _shape_tuple(["1" if d is None else _size_code(d.size) for d in target.layout])
                if target.layout
                else "()"
            )
            value = _PRINTER.doprint(e)
            code = f"torch.full({shape}, {value}, dtype={self.ref}.dtype, device={self.ref}.device)"
            self.lines.append(f"{name} = {name} + {code}" if accumulate else f"{name} = {code}")
            return
        if self.fuse_arithmetic and not accumulate and target.dims and None not in target.layout:
            lines = self._sparse_delta(name, e, target) or self._fused_terms(name, e, target)
            if lines:
                self.lines += lines
                return
        if None in target.layout and not (is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta))):
            want = tuple(d.index() if d else sympy.Symbol(f"_one{k}") for k, d in enumerate(target.layout))
            val = self._elementwise(e, want=want)
            code = val.code if val.axes == want else self.to_layout(val, target)
        else:
            code = self.to_layout(self.lower(e), target)
        if self.single_assignment and not accumulate and self._rename_last_temp(code, name):
            return
        if comment:
            self.lines.append(f"# {comment}")
        self.lines.append(f"{name} = {name} + {code}" if accumulate else f"{name} = {code}")

    def to_layout(self, val: Val, target: TensorInfo) -> str:
        """Code for ``val`` in ``target``'s layout (named axes in order, size-1 axes restored)."""
        want = target.indices
        if None in target.layout and val.axes and set(val.axes) != set(want):
            full = tuple(d.index() if d else sympy.Symbol(f"_one{k}") for k, d in enumerate(target.layout))
            shape = ", ".join("1" if d is None else _size_code(d.size) for d in target.layout)
            return f"{_atom(self.align(val, full, strip=False))}.expand({shape})"
        extra = set(val.axes) - set(want)
        if extra:
            raise OpDefinitionError(
                f"internal: free indices {sorted(map(str, extra))} left in gradient of {target.name}"
            )
        aligned = self.align(val, want, strip=False) if val.axes else val.code
        if not val.axes and want:
            shape = _shape_tuple([_size_code(d.size) for d in target.dims])
            aligned = f"{aligned} * torch.ones({shape}, dtype={self.ref}.dtype, device={self.ref}.device)"
        elif set(val.axes) != set(want):
            # the gradient of a broadcast is materialised at the tensor's full shape
            shape = ", ".join("1" if d is None else _size_code(d.size) for d in target.layout)
            aligned = f"{_atom(aligned)}.expand({shape})"
            return aligned if None not in target.layout else aligned
        if None in target.layout:
            idx = ", ".join("None" if d is None else ":" for d in target.layout)
            aligned = f"{_atom(aligned)}[{idx}]"
        if not target.layout and val.axes:
            raise OpDefinitionError(f"internal: scalar {target.name} has axes")
        return aligned

    # -- fewer passes over memory --------------------------------------------------------------
    def _sparse_delta(self, name: str, e: sympy.Expr, target: TensorInfo) -> list[str] | None:
        """``g + h·δ(c, y[n])`` as a dense ``g`` plus ``h`` scatter-added at ``y``: no one-hot tensor.

        This is how ``(probs - onehot)/n`` becomes ``probs/n`` with ``-1/n`` added at the targets.
        """
        deltas = [d for d in _value_leaves(e) if isinstance(d, sympy.KroneckerDelta)]
        if len(deltas) != 1:
            return None
        delta = deltas[0]
        for v, pick in (delta.args, delta.args[::-1]):
            if is_index(v) and v in target.indices and is_entry(pick) and all(is_index(i) for i in entry_indices(pick)):
                break
        else:
            return None
        rest = tuple(i for i in target.indices if i != v)
        if tuple(entry_indices(pick)) != rest or not self.layouts[entry_name(pick)].is_int:
            return None
        marker = sympy.Dummy("delta")
        linear = e.xreplace({delta: marker})
        h = sympy.diff(linear, marker)
        if h.has(marker) or h == 0:
            return None
        g = linear.xreplace({marker: 0})
        at = _substitute_index(h, v, pick)
        lines: list[str] = []
        known: dict[str, Val] = {}
        common = {f for f in set(sympy.Mul.make_args(g)) & set(sympy.Mul.make_args(at)) if not f.is_number}
        if common and g != 0:
            shared, stand_in = self._share(common, lines, known)
            g, at = g / shared * stand_in, at / shared * stand_in
        axis = target.indices.index(v)
        if g == 0:
            dense = f"{self.ref}.new_zeros({_shape_tuple([_size_code(d.size) for d in target.dims])})"
        else:
            dense = self.to_layout(self._elementwise(g, known), target)
            if _atom(dense) == dense:
                dense = f"{dense}.clone()"  # never scatter into a saved forward value
        index = f"{_atom(self.lower(pick).code)}.unsqueeze({axis})"
        src_val = self._elementwise(at, known)
        src_shape = _shape_tuple(["1" if i == v else _size_code(dim_of(i).size) for i in target.indices])
        if src_val.axes:
            placeholder = tuple(sympy.Symbol("_one") if i == v else i for i in target.indices)
            src_code = self.align(src_val, placeholder, strip=False)
        else:
            src_code = src_val.code  # a 0-dim value expands to any shape directly
        lines.append(f"{name} = {dense}")
        lines.append(f"{name}.scatter_add_({axis}, {index}, {_atom(src_code)}.expand{src_shape})")
        return lines

    def _share(
        self, factors: set[sympy.Expr], lines: list[str], known: dict[str, Val]
    ) -> tuple[sympy.Expr, sympy.Symbol]:
        """Compute a factor common to several terms once, into a temporary ``s<k>``.

        Returns the factor and the stand-in symbol that replaces it (registered in ``known``).
        """
        shared = sympy.Mul(*sorted(factors, key=sympy.default_sort_key))
        val = self._elementwise(shared)
        var = self._temp(val.code, "s")
        lines.append(self.lines.pop())
        stand_in = sympy.Symbol(f"__val_{var}")
        known[stand_in.name] = Val(var, val.axes)
        return shared, stand_in

    def _fused_terms(self, name: str, e: sympy.Expr, target: TensorInfo) -> list[str] | None:
        """A sum of terms ``F·s`` (F full-size, s small) as one allocation and in-place ``addcmul_``.

        ``gamma·var_inv·(dout - xhat·S2/(N-1) - S1/N)`` becomes
        ``torch.addcmul(-a·S1/N, dout, a).addcmul_(xhat, -a·S2/(N-1))`` with ``a = gamma·var_inv``.
        """
        full = set(target.indices)
        expanded = sympy.expand(e, deep=False, power_base=False, power_exp=False, log=False, multinomial=False)
        terms = []
        for t in sympy.Add.make_args(expanded):
            factors = sympy.Mul.make_args(t)
            big = [f for f in factors if free_indices(f) >= full and not isinstance(f, (ISum, IMax))]
            terms.append((sympy.Mul(*big), sympy.Mul(*(f for f in factors if f not in big))))
        full_terms = [(F, S) for F, S in terms if F != 1]
        small = sympy.Add(*(S for F, S in terms if F == 1))
        if not full_terms or (len(full_terms) == 1 and small == 0):
            return None
        fused_cost = sum(_full_ops(F, full) + 1 for F, _ in full_terms)
        if fused_cost >= _full_ops(e, full):
            return None  # the expression as written makes no more passes over full-size tensors
        lines: list[str] = []
        known: dict[str, Val] = {}
        common = set.intersection(*(set(sympy.Mul.make_args(S)) for _, S in full_terms))
        common = {f for f in common if tensor_names(f)}
        if common and len(full_terms) > 1:
            shared, stand_in = self._share(common, lines, known)
            full_terms = [(F, (S / shared) * stand_in) for F, S in full_terms]
            small = sympy.expand(small / shared) * stand_in if small != 0 else small
        acc = self.align(self._elementwise(small, known), target.indices) if small != 0 else None
        fresh = False
        for F, S in full_terms:
            f_code = self.align(self.lower(F), target.indices)
            tensor_factor = bool(tensor_names(S)) or any(str(a).startswith("__val_") for a in S.free_symbols)
            s_code = "" if S == 1 else self.align(self._elementwise(S, known), target.indices)
            if acc is None:
                acc = f"{_atom(f_code)}.clone()" if S == 1 else f"{_atom(f_code)} * {_atom(s_code)}"
            elif S == 1:
                acc = f"{_atom(acc)}.add_({f_code})" if fresh else f"torch.add({acc}, {f_code})"
            elif tensor_factor:
                acc = (
                    f"{_atom(acc)}.addcmul_({f_code}, {s_code})"
                    if fresh
                    else f"torch.addcmul({acc}, {f_code}, {s_code})"
                )
            else:
                acc = (
                    f"{_atom(acc)}.add_({f_code}, alpha={s_code})"
                    if fresh
                    else f"torch.add({acc}, {f_code}, alpha={s_code})"
                )
            fresh = True
        lines.append(f"{name} = {acc}")
        return lines

    def _rename_last_temp(self, temp: str, name: str) -> bool:
        """``t1 = x.sum(0); dbeta = t1`` becomes ``dbeta = x.sum(0)`` (later uses read ``dbeta``)."""
        if not (
            temp.isidentifier() and self.lines and self.lines[-1].startswith(f"{temp} = ") and temp not in self.names
        ):
            return False
        self.lines[-1] = f"{name} = " + self.lines[-1][len(temp) + 3 :]
        self.memo = {k: ((name if code == temp else code), axes) for k, (code, axes) in self.memo.items()}
        return True

    # -- alignment ---------------------------------------------------------------------------
    def align(self, val: Val, want: Axes, strip: bool = True) -> str:
        """View ``val`` so its axes line up with ``want`` for broadcasting."""
        if not val.axes and strip:
            return val.code  # a scalar broadcasts as it is
        have = [a for a in want if a in val.axes]
        if val.raw is not None and list(val.axes) == have:
            desired = [a if a in val.axes else None for a in want]
            raw_layout = list(val.raw[1])
            while strip and desired and desired[0] is None and len(desired) > len(raw_layout):
                desired.pop(0)
            if raw_layout == desired:
                return val.raw[0]
        code = val.code
        if list(val.axes) != have:
            perm = [val.axes.index(a) for a in have]
            code = f"{_atom(code)}.T" if len(perm) == 2 else f"{_atom(code)}.permute({', '.join(map(str, perm))})"
        slots = [":" if a in val.axes else "None" for a in want]
        while strip and slots and slots[0] == "None":
            slots.pop(0)
        if "None" in slots:
            while slots and slots[-1] == ":":
                slots.pop()
            code = f"{_atom(code)}[{', '.join(slots)}]"
        elif not strip and len(slots) > len(val.axes) and val.axes:
            code = f"{_atom(code)}[{', '.join(slots)}]"
        return code

    # -- lowering ----------------------------------------------------------------------------
    def lower(self, e: sympy.Expr) -> Val:
        if is_entry(e):
            return self._entry(e)
        if isinstance(e, ISum):
            return self._cached(e, self._sum)
        if isinstance(e, IMax):
            return self._cached(e, self._max)
        if isinstance(e, ArgMax):
            return self._cached(e, self._argmax)
        if isinstance(e, sympy.KroneckerDelta):
            return self._cached(e, self._delta)
        if e.is_Symbol and is_index(e):
            raise OpDefinitionError(f"index {e} used as a value")
        return self._elementwise(e)

    def _temp(self, code: str, hint: str = "t") -> str:
        self.counter += 1
        name = f"{hint}{self.counter}"
        while name in self.names:
            self.counter += 1
            name = f"{hint}{self.counter}"
        self.lines.append(f"{name} = {code}")
        return name

    def _cached(self, e: sympy.Expr, fn) -> Val:
        order = _free_in_order(e)
        placeholders = {s: sympy.Symbol(f"_p{k}_{dim_of(s).name}", integer=True) for k, s in enumerate(order)}
        key = _rename_bound_canonically(e).xreplace(placeholders)
        if key in self.memo:
            code, axes = self.memo[key]
            back = {p: s for s, p in placeholders.items()}
            return Val(code, tuple(back[a] for a in axes))
        val = fn(e)
        name = val.code if val.code.isidentifier() else self._temp(val.code)
        self.memo[key] = (name, tuple(placeholders[a] for a in val.axes))
        return Val(name, val.axes, val.is_int)

    def _entry(self, e: sympy.Expr) -> Val:
        name = entry_name(e)
        info = self.layouts[name]
        idx = entry_indices(e)
        code = name
        if None in info.layout:
            code = f"{name}[{', '.join('0' if d is None else ':' for d in info.layout)}]"
        if all(is_index(i) for i in idx):
            if len(set(idx)) != len(idx):
                raise OpDefinitionError(f"repeated index in {e} (a diagonal) is not supported")
            it = iter(idx)
            raw = (name, tuple(None if d is None else next(it) for d in info.layout))
            return Val(code, tuple(idx), info.is_int, raw if None in info.layout else None)
        return self._indexed(code, info, idx)

    def _indexed(self, code: str, info: TensorInfo, idx: tuple[sympy.Basic, ...]) -> Val:
        """Entries at compound, flattened or gathered indices: reshape, then advanced indexing."""
        dims = info.dims
        # unflatten: an index Pack(t, e) on a flattened dim splits that axis
        shape: list[str] = []
        new_idx: list[sympy.Basic] = []
        reshaped = False
        k = 0
        while k < len(idx):
            i, d = idx[k], dims[k]
            if isinstance(i, Pack):
                shape += [_size_code(p.size) for p in d.parts]
                new_idx += list(i.args)
                reshaped = True
                k += 1
            elif isinstance(i, Flat) and int(i.args[1]) == 0:
                f = i.args[0]
                n = len(dim_of(f).parts)
                shape.append(_size_code(dim_of(f).size))
                new_idx.append(f)
                reshaped = True
                k += n
            else:
                shape.append(_size_code(d.size))
                new_idx.append(i)
                k += 1
        if reshaped:
            code = f"{_atom(code)}.reshape({', '.join(shape)})"
        if all(is_index(i) for i in new_idx):
            return Val(code, tuple(new_idx), info.is_int)
        return self._gather(code, new_idx, info.is_int)

    def _gather(self, code: str, idx: list[sympy.Basic], is_int: bool) -> Val:
        """Advanced indexing: gathered axes take integer tensors, shared indices take aranges."""
        match = re.match(r"[A-Za-z_][A-Za-z_0-9]*", code)
        base = match.group(0) if match else code  # the tensor's variable, for its device
        gathered = [self.lower(i) for i in idx if not is_index(i)]
        gather_axes: list[sympy.Symbol] = []
        for g in gathered:
            gather_axes += [a for a in g.axes if a not in gather_axes]
        first_plain_tail = len(idx)
        while (
            first_plain_tail > 0
            and is_index(idx[first_plain_tail - 1])
            and idx[first_plain_tail - 1] not in gather_axes
        ):
            first_plain_tail -= 1
        head = idx[:first_plain_tail]
        tail = [i for i in idx[first_plain_tail:]]
        lead_axes = list(gather_axes)
        for i in head:
            if is_index(i) and i not in lead_axes:
                lead_axes.append(i)
        parts = []
        for i in head:
            if is_index(i):
                rng = f"torch.arange({_size_code(dim_of(i).size)}, device={base}.device)"
                parts.append(self.align(Val(rng, (i,)), tuple(lead_axes)))
            else:
                parts.append(self.align(self.lower(i), tuple(lead_axes)))
        parts += [":"] * len(tail)
        return Val(f"{_atom(code)}[{', '.join(parts)}]", tuple(lead_axes) + tuple(tail), is_int)

    def _sum(self, e: ISum) -> Val:
        if e.var not in free_indices(e.body):
            return self.lower(e.body * dim_of(e.var).size)  # a sum of something constant along the dim
        indices, body = [], e
        while isinstance(body, ISum):
            indices.append(body.var)
            body = body.body
        saved_preference, self.preferred = self.preferred, ()
        try:
            return self._sum_body(body, indices, saved_preference)
        finally:
            self.preferred = saved_preference

    def _sum_body(self, body: sympy.Expr, indices: list[sympy.Symbol], preferred: Axes) -> Val:
        scatter = self._scatter(body, indices)
        if scatter is not None:
            return scatter
        factors = sympy.Mul.make_args(body)
        scalars = [f for f in factors if not (free_indices(f) & set(indices))]
        inner = [f for f in factors if free_indices(f) & set(indices)]
        val = self._contract(inner, indices, preferred) if len(inner) == 2 else None
        if val is None:
            summed = self.lower(sympy.Mul(*inner))
            dims = sorted(summed.axes.index(i) for i in indices)
            axes = tuple(a for a in summed.axes if a not in indices)
            dim_text = str(dims[0]) if len(dims) == 1 else f"({', '.join(map(str, dims))})"
            val = Val(
                (
                    f"{_atom(summed.code)}.sum({dim_text})"
                    if axes or len(dims) < len(summed.axes)
                    else f"{_atom(summed.code)}.sum()"
                ),
                axes,
            )
        if scalars:
            return self._elementwise(sympy.Mul(*scalars) * sympy.Symbol(f"__val_{id(val)}"), {f"__val_{id(val)}": val})
        return val

    def _contract(self, inner: list[sympy.Expr], indices: list[sympy.Symbol], preferred: Axes = ()) -> Val | None:
        a, b = self.lower(inner[0]), self.lower(inner[1])
        shared = set(a.axes) & set(b.axes)
        if set(indices) - shared or set(a.axes) == set(b.axes):
            return None
        out_axes = tuple(x for x in a.axes if x not in indices) + tuple(
            x for x in b.axes if x not in indices and x not in a.axes
        )
        if len(indices) == 1 and len(a.axes) == 2 and len(b.axes) == 2 and not (shared - set(indices)):
            k = indices[0]
            first = a.axes[1 - a.axes.index(k)]
            second = b.axes[1 - b.axes.index(k)]
            if first in preferred and second in preferred and preferred.index(first) > preferred.index(second):
                a, b = b, a
            left = a.code if a.axes[1] == k else f"{_atom(a.code)}.T"
            right = b.code if b.axes[0] == k else f"{_atom(b.code)}.T"
            return Val(f"{_atom(left)} @ {_atom(right)}", (a.axes[1 - a.axes.index(k)], b.axes[1 - b.axes.index(k)]))
        letters = {s: chr(ord("a") + n) for n, s in enumerate(dict.fromkeys(a.axes + b.axes))}
        spec = f"{''.join(letters[x] for x in a.axes)},{''.join(letters[x] for x in b.axes)}->{''.join(letters[x] for x in out_axes)}"
        return Val(f'torch.einsum("{spec}", {a.code}, {b.code})', out_axes)

    def _scatter(self, body: sympy.Expr, indices: list[sympy.Symbol]) -> Val | None:
        """``Σ_I f[I, R] δ(idx[I], v)`` with idx's indices all summed: an ``index_add_`` scatter."""
        for f in sympy.Mul.make_args(body):
            if not isinstance(f, sympy.KroneckerDelta):
                continue
            for pick, v in (f.args, f.args[::-1]):
                if (
                    is_entry(pick)
                    and is_index(v)
                    and v not in indices
                    and set(entry_indices(pick)) == set(indices)
                    and all(is_index(i) for i in entry_indices(pick))
                ):
                    rest = self.lower(body / f)
                    if v in rest.axes:
                        continue
                    lead = tuple(entry_indices(pick))
                    other = tuple(a for a in rest.axes if a not in lead)
                    src = (
                        self.align(Val(rest.code, rest.axes), lead + other, strip=False)
                        if set(lead) <= set(rest.axes)
                        else None
                    )
                    if src is None:
                        continue
                    other_sizes = [_size_code(dim_of(a).size) for a in other]
                    flat_idx = f"{entry_name(pick)}.reshape(-1)"
                    zeros = f"{self.ref}.new_zeros({_shape_tuple([_size_code(dim_of(v).size)] + other_sizes)})"
                    code = f"{zeros}.index_add_(0, {flat_idx}, {_atom(src)}.reshape({', '.join(['-1'] + other_sizes)}))"
                    return Val(code, (v,) + other)
        return None

    def _max(self, e: IMax) -> Val:
        body = self.lower(e.body)
        axis = body.axes.index(e.var)
        # .max(dim).values: autograd routes a tie to one index, like the derived argmax
        return Val(f"{_atom(body.code)}.max({axis}).values", tuple(a for a in body.axes if a != e.var))

    def _argmax(self, e: ArgMax) -> Val:
        body = self.lower(e.body)
        axis = body.axes.index(e.var)
        return Val(f"{_atom(body.code)}.argmax({axis})", tuple(a for a in body.axes if a != e.var), True)

    def _delta(self, e: sympy.KroneckerDelta) -> Val:
        a, b = e.args
        if is_index(a) and is_index(b):
            size = _size_code(dim_of(a).size)
            return Val(f"torch.eye({size}, dtype={self.ref}.dtype, device={self.ref}.device)", (a, b))
        pick, v = (a, b) if is_index(b) else (b, a)
        if not is_index(v):
            raise OpDefinitionError(f"cannot lower {e}")
        val = self.lower(pick)
        # a one-hot row per index, built by scatter (no data-dependent size checks, compile-friendly)
        shape = _shape_tuple([_size_code(dim_of(a).size) for a in val.axes] + [_size_code(dim_of(v).size)])
        axis = len(val.axes)
        code = f"{self.ref}.new_zeros({shape}).scatter_({axis}, {_atom(val.code)}.unsqueeze({axis}), 1.0)"
        return Val(code, val.axes + (v,))

    def _elementwise(self, e: sympy.Expr, known: dict[str, Val] | None = None, want: Axes = ()) -> Val:
        known = dict(known or {})
        leaves: list[tuple[sympy.Expr, Val]] = []
        for leaf in _value_leaves(e):
            if leaf.is_Symbol and leaf.name in known:
                leaves.append((leaf, known[leaf.name]))
            else:
                leaves.append((leaf, self.lower(leaf)))
        axes: list[sympy.Symbol] = []
        for _, v in sorted(leaves, key=lambda lv: -len(lv[1].axes)):
            axes += [a for a in v.axes if a not in axes]
        named = {a for a in want if not a.name.startswith("_one")}
        if want and set(axes) <= set(want) and named <= set(axes):
            axes = list(want)
        elif self.preferred:
            axes = [a for a in self.preferred if a in axes] + [a for a in axes if a not in self.preferred]
        regrouped = self._small_factors_first(e, dict(leaves), set(axes), known)
        if regrouped is not e:
            return self._elementwise(regrouped, known, want)
        # a leaf's code becomes a symbol the printer writes verbatim: parenthesise compound code
        mapping = {leaf: sympy.Symbol(_atom(self.align(v, tuple(axes), strip=not want))) for leaf, v in leaves}
        code = _PRINTER.doprint(e.xreplace(mapping))
        return Val(code, tuple(axes))

    def _small_factors_first(
        self, e: sympy.Expr, leaves: dict[sympy.Expr, Val], full: set[sympy.Symbol], known: dict[str, Val]
    ) -> sympy.Expr:
        """In a product of full-size and smaller factors, multiply the small ones together first.

        ``dloss * probs / N`` becomes ``probs * (dloss / N)``: one pass over the big tensor, not two.
        """
        if not full:
            return e

        def axes_of(x: sympy.Expr) -> set[sympy.Symbol]:
            out: set[sympy.Symbol] = set()
            for leaf in _value_leaves(x):
                out |= set(leaves[leaf].axes) if leaf in leaves else set(known[leaf.name].axes)
            return out

        def rewrite(node: sympy.Expr) -> sympy.Expr:
            if not isinstance(node, sympy.Mul):
                return node
            small = [f for f in node.args if axes_of(f) != full]
            big = [f for f in node.args if axes_of(f) == full]
            if not big or len(small) < 2:
                return node
            val = self._elementwise(sympy.Mul(*small), known)
            stand_in = sympy.Symbol(f"__val_{len(known)}_{self.counter}")
            self.counter += 1
            known[stand_in.name] = val
            return sympy.Mul(*big, stand_in)

        return _bottom_up_expr(e, rewrite)


def _value_leaves(e: sympy.Expr) -> list[sympy.Expr]:
    """Index-level leaves of an elementwise expression (entries, sums, deltas, placeholders)."""
    if is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta)):
        return [e]
    if e.is_Symbol and e.name.startswith("__val_"):
        return [e]
    out: list[sympy.Expr] = []
    for a in e.args:
        for leaf in _value_leaves(a):
            if leaf not in out:
                out.append(leaf)
    return out


def _bottom_up_expr(e: sympy.Expr, fn) -> sympy.Expr:  # noqa: ANN001
    """Apply ``fn`` to every elementwise node, children first (index-level leaves are kept whole)."""
    if is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta)) or not e.args:
        return e
    rebuilt = e.func(*(_bottom_up_expr(a, fn) for a in e.args))
    out = fn(rebuilt)
    return e if out == e else out


def _full_ops(e: sympy.Expr, full: set[sympy.Symbol]) -> int:
    """How many elementwise operations over full-size tensors evaluating ``e`` as written takes."""
    if is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta)) or not e.args:
        return 0
    own = 0
    if free_indices(e) >= full:
        own = len(e.args) - 1 if isinstance(e, (sympy.Add, sympy.Mul)) else 1
    return own + sum(_full_ops(a, full) for a in e.args)


def _substitute_index(e: sympy.Expr, v: sympy.Symbol, value: sympy.Expr) -> sympy.Expr:
    from .indexalg import substitute_indices

    return substitute_indices(e, {v: value})


def _rename_bound_canonically(e: sympy.Expr, depth: int = 0) -> sympy.Expr:
    """Bound indices renamed by nesting depth, so alpha-equivalent sums share one key."""
    if isinstance(e, (ISum, IMax, ArgMax)):
        new = sympy.Symbol(f"_b{depth}_{dim_of(e.var).name}", integer=True)
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


def _shape_tuple(sizes: list[str]) -> str:
    """``(N, K)`` or ``(N,)``: a shape literal black keeps on one line."""
    return f"({sizes[0]},)" if len(sizes) == 1 else f"({', '.join(sizes)})"


def _size_code(size: sympy.Expr) -> str:
    return _PRINTER.doprint(size).replace(" ", "")


def _atom(code: str) -> str:
    """Parenthesise code unless it is already an atom (a name, call or subscript)."""
    depth = 0
    for ch in code:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch in " +-*/@<>":
            return f"({code})"
    return code


def size_variables(dims: tuple[Dim, ...]) -> list[str]:
    """Names of the size variables generated code defines (plain dims only)."""
    return [str(d.size) for d in dims if not d.parts and d.fixed is None]


__all__ = ["Layout", "Lowerer", "TorchCodePrinter", "Val", "size_variables"]
