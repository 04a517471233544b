"""Index expressions to vectorised PyTorch statements.

Each axis of a lowered value is labelled by an index symbol. Entries become tensor variables
(viewed without their size-1 axes); a sum of a product is evaluated pair by pair in the order
:mod:`.plan` finds cheapest (``@``, ``einsum``, ``.sum(dim)``), so no intermediate outgrows the
forward's tensors; a Kronecker delta that picks a position (a gather's or an argmax's) becomes a
scatter of values (``scatter_add_``, ``index_add_``), never a one-hot multiplied by anything;
the scalar shell is printed by :class:`.printer.TorchCodePrinter`. Sums, maxima and the costly
sub-expressions :mod:`.share` finds more than once are computed once, into temporaries.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import sympy

from ..errors import OpDefinitionError
from ..indexalg import (
    ArgMax,
    Dim,
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
    fresh_index,
    fresh_indices,
    is_entry,
    is_index,
    size_key,
    position_dim,
    rename_bound,
    substitute_indices,
    tensor_names,
)
from ..program import Layout, TensorInfo, is_window_index
from . import inplace
from . import plan as planner
from .finite import Finite
from .saturate import saturated
from .printer import PRINTER, Select, TorchCodePrinter, atom, is_constant, is_fresh, shape_tuple, size_code
from .share import (
    as_step,
    canonical_key,
    cheap_key,
    costly,
    factor_groups,
    flatten_sums,
    is_step,
    repeated_within,
    sub_products,
    shareable,
    up_to_factor,
)

Axes = tuple[sympy.Symbol, ...]


_MaxCall = sympy.Function("MaxCall")  # the key of ``body.max(axis)``, values and indices together


@dataclass(frozen=True)
class Val:
    """A lowered value: Python code and the index symbol labelling each axis."""

    code: str
    axes: Axes
    is_int: bool = False
    raw: tuple[str, tuple[sympy.Symbol | None, ...]] | None = None
    constant: bool = False  # a Python number (a value that cancelled): broadcasts, never indexed
    product: tuple[str, str] | None = None  # a matrix product ``left @ right`` of two 2-D operands


# A window's offsets (an axis of at most this fixed size) are looped over rather than copied into an einsum.
MAX_OFFSETS_LOOPED = 32
# a tensor or a view of one by offset (an outer loop's ``w.select(0, k1)``): read in a loop as it is
_VIEW = re.compile(r"[A-Za-z_]\w*(\.select\(\d+, \w+\))*")


def _number(val: Val) -> sympy.Expr:
    """A constant value (one that cancelled) as a SymPy number, so arithmetic on it folds; else a symbol."""
    try:
        return sympy.sympify(val.code)
    except (sympy.SympifyError, SyntaxError, TypeError):
        return sympy.Symbol(val.code)


@dataclass(frozen=True)
class Sharding:
    """A dim split across the processes of ``group``: its reductions all-reduce, its size is global."""

    dim: Dim

    @property
    def total(self) -> sympy.Symbol:
        """The global size (``N_all``); ``dim.size`` (``N``) stays the local one, for shapes."""
        return sympy.Symbol(f"{self.dim.size}_all", integer=True, positive=True)

    def global_sizes(self, e: sympy.Expr) -> sympy.Expr:
        """``e`` with the dim's size in arithmetic (a mean's ``1/N``) the global one."""
        return e.xreplace({self.dim.size: self.total})

    def reduces(self, indices: list[sympy.Symbol]) -> bool:
        return any(dim_of(i) == self.dim for i in indices)


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
    printer: TorchCodePrinter = PRINTER  # FAITHFUL for the forward and the chain: forms as written
    share: bool = True
    # dims of every forward tensor, as multisets of plain dims: an intermediate must fit in one
    admissible: list[Counter[str]] = field(default_factory=list)
    # the same for the named tensors alone (not the op's unnamed values as written): what a value
    # that a cheaper form avoids (a gathered copy, a scatter's source) is weighed against
    named_admissible: list[Counter[str]] | None = None
    # keys of costly sub-expressions (share.repeated) computed once, into temporaries
    repeated: set[sympy.Expr] = field(default_factory=set)
    # the rank of each temporary this lowerer made
    rank: dict[str, int] = field(default_factory=dict)
    # temporaries that hold a matrix product of two 2-D operands: name -> (left, right)
    products: dict[str, tuple[str, str]] = field(default_factory=dict)
    # a dim split across processes: reductions over it are all-reduced (None: one process)
    shard: Sharding | None = None
    # tensors whose gradients the backward returns (None: all): a gradient constant along its axes
    # is made at their full shape (a caller may write into it); another is an expanded view
    returned: frozenset[str] | None = None
    # the dim each integer input's values index (Program.index_dims): where a flattened one's parts are
    positions: dict[str, Dim] = field(default_factory=dict)
    # tensors finite wherever the inputs are (finite.finite_values): a Piecewise of them may select by lerp
    finite: Finite | None = None

    # -- public ------------------------------------------------------------------------------
    def assign(
        self,
        name: str,
        e: sympy.Expr,
        target: TensorInfo,
        accumulate: bool = False,
        comment: str = "",
        relaid: bool = False,
    ) -> None:
        """Emit ``name = e`` (or ``name = name + e``), laid out like ``target``.

        ``relaid``: ``target`` is already the layout ``e`` reads best (split or merged once; a
        second change would only undo the first).
        """
        e = _packed_deltas(e)
        # a pinned term that is a product of a sum, dout·(a + δ((d, k), p)·h), is split open
        own = set(target.indices)
        terms = [u for t in sympy.Add.make_args(e) for u in sympy.Add.make_args(_open_pinned(t, own))]
        pinned = [t for t in terms if _pins_flat(t, own)]
        if not relaid and pinned and len(pinned) < len(terms):
            # δ((d, k), p)·h + w[d]·g[k]: the pinned terms scatter on the flattened axis, the rest
            # (which reads d and k apart) is computed in the target's own layout and added
            self.assign(name, sympy.Add(*pinned), target, accumulate, comment)
            self.assign(name, sympy.Add(*(t for t in terms if not _pins_flat(t, own))), target, accumulate=True)
            return
        unflattened = None if relaid else (_unflattened(e, target) or _reflattened(e, target))
        if unflattened is not None:
            # e reads the parts of a flattened index on their own (y[nd.1]): compute with the parts
            # as axes of their own, then flatten them (row-major, as flatten does)
            temp = self.fresh_name("g") if accumulate else name
            self.assign(temp, *unflattened, comment=comment, relaid=True)
            shape = ", ".join("1" if d is None else size_code(d.size) for d in target.layout)
            self.lines.append(f"{temp} = {temp}.reshape({shape})")
            self.memo = {k: v for k, v in self.memo.items() if v[0] != temp}  # that name now holds the flat view
            if accumulate:
                self.lines.append(f"{name} = {name} + {temp}")
            return
        self.preferred = target.indices
        if not tensor_names(e) and not e.has(sympy.KroneckerDelta):
            # a constant (a gradient that cancelled to 0): a tensor of the target's shape
            shape = (
                shape_tuple(["1" if d is None else size_code(d.size) for d in target.layout]) if target.layout else "()"
            )
            value = self.lower(e).code  # a sum of a constant is the constant times the dim's size
            code = f"torch.full({shape}, {value}, dtype={self.ref}.dtype, device={self.ref}.device)"
            self.lines.append(f"{name} = {name} + {code}" if accumulate else f"{name} = {code}")
            return
        if target.dims and e.has(ISum) and e.has(sympy.KroneckerDelta):
            pulled = _deltas_out_of_sums(e)  # Σ_k f(k)·δ(n, p) = δ(n, p)·Σ_k f(k): a position to scatter at
            e = pulled if _positional_deltas(pulled, target.indices, self.layouts) else e
        if target.dims and _positional_deltas(e, target.indices, self.layouts):
            temp = self.fresh_name("g") if accumulate else name
            lines = self._scatter_values(temp, e, target)
            if lines:
                self.lines += ([f"# {comment}"] if comment else []) + lines
                if (
                    self.shard is not None and self.shard.dim not in target.dims and self.shard.reduces(_outer_sums(e))
                ):  # the scatter added this process's entries only
                    self.lines.append(f"{temp} = _all_reduce({temp}, group)")
                if accumulate:
                    self.lines.append(f"{name} = {name} + {temp}")
                return
        if self.fuse_arithmetic and not accumulate and target.dims and None not in target.layout:
            lines = self._fused_terms(name, e, target)
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
            shape = ", ".join("1" if d is None else size_code(d.size) for d in target.layout)
            return f"{atom(self.align(val, full, strip=False))}.expand({shape})"
        extra = set(val.axes) - set(want)
        if extra:
            raise OpDefinitionError(
                f"internal: free indices {sorted(map(str, extra))} left in gradient of {target.name}"
            )
        aligned = self.align(val, want, strip=False) if val.axes else val.code
        if val.constant and not target.layout:  # a value that cancelled: still a tensor
            return f"torch.full((), {aligned}, dtype={self.ref}.dtype, device={self.ref}.device)"
        if not val.axes and target.layout:  # a scalar (or a constant) at the target's full shape
            shape = shape_tuple(["1" if d is None else size_code(d.size) for d in target.layout])
            if self.returned is not None and target.name not in self.returned and not val.constant:
                return f"{atom(aligned)}.expand({shape})"
            return f"{atom(aligned)} * torch.ones({shape}, dtype={self.ref}.dtype, device={self.ref}.device)"
        if set(val.axes) != set(want):
            # the gradient of a broadcast is materialised at the tensor's full shape
            shape = ", ".join("1" if d is None else size_code(d.size) for d in target.layout)
            aligned = f"{atom(aligned)}.expand({shape})"
            return aligned if None not in target.layout else aligned
        if None in target.layout:
            idx = ", ".join("None" if d is None else ":" for d in target.layout)
            aligned = f"{atom(aligned)}[{idx}]"
        if not target.layout and val.axes:
            raise OpDefinitionError(f"internal: scalar {target.name} has axes")
        return aligned

    # -- fewer passes over memory --------------------------------------------------------------
    def _scatter_values(self, name: str, e: sympy.Expr, target: TensorInfo) -> list[str] | None:
        """``g + Σ_k h_k·δ(v_k, p_k)`` as ``g`` with each ``h_k`` scatter-added at position ``p_k`` along ``v_k``.

        ``p_k`` is a position: a gather's integer index or an argmax. So ``(probs - onehot)/n``
        becomes ``probs/n`` with ``-1/n`` added at the targets, and a max's gradient is ``dout``
        scattered to the argmax: no one-hot tensor is ever built. A product of deltas (a max of a
        max) is put at all its positions at once (:meth:`_put_at_positions`). None when ``e`` has
        no such delta.
        """
        picks = _positional_deltas(e, target.indices, self.layouts)
        if not picks:
            return None
        markers = {delta: sympy.Dummy(f"delta{k}") for k, (delta, _, _) in enumerate(picks)}
        linear = e.xreplace(markers)
        split = _delta_terms(linear, picks, markers)
        if split is None:
            return None
        g, singles, joints = split
        parts = [(v, p, substitute_indices(h, {v: p})) for h, ((_, v, p),) in singles]
        flat = TensorInfo(name, tuple(target.dims))
        out = name if None not in target.layout else f"{name}_"
        lines: list[str] = []
        known: dict[str, Val] = {}
        common = set.intersection(*(set(sympy.Mul.make_args(h)) for _, _, h in parts)) if parts else set()
        common = {f for f in common & set(sympy.Mul.make_args(g)) if not f.is_number}
        if common and g != 0:
            shared, stand_in = self._share(common, known)
            g = g / shared * stand_in
            parts = [(v, p, h / shared * stand_in) for v, p, h in parts]
        puts = [self._put_at_positions(out, h, group, flat) for h, group in joints]
        if any(put is None for put in puts):
            return None
        sizes = [size_code(d.size) for d in target.dims]
        if g == 0:
            dense = f"{self.ref}.new_zeros({shape_tuple(sizes)})"
        else:
            dense = self.to_layout(self._elementwise(g, known), flat)
            if atom(dense) == dense and not is_fresh(dense):
                dense = f"{dense}.clone()"  # never scatter into a saved value, a view or an expand
        lines.append(f"{out} = {dense}")
        for v, p, h in parts:
            axis = flat.indices.index(v)
            slots = tuple(sympy.Symbol("_one") if i == v else i for i in flat.indices)
            shape = shape_tuple(["1" if i == v else size_code(dim_of(i).size) for i in flat.indices])
            index = self.lower(p)
            index_code = self.align(index, slots, strip=False) if index.axes else index.code
            if len(index.axes) < len(slots) - 1 or not index.axes:
                index_code = f"{atom(index_code)}.expand{shape}"
            src = self._elementwise(h, known)
            if src.axes:
                src_code = f"{atom(self.align(src, slots, strip=False))}.expand{shape}"
            elif not src.constant and (tensor_names(h) or any(s.name.startswith("__val_") for s in h.free_symbols)):
                src_code = f"{atom(src.code)}.expand{shape}"  # (a value that cancelled is a number)
            else:
                src_code = f"torch.full({shape}, {src.code}, dtype={self.ref}.dtype, device={self.ref}.device)"
            # one position per line along v: into zeros a plain scatter_ writes what scatter_add_ would add
            method = "scatter_" if g == 0 and len(parts) == 1 and not joints else "scatter_add_"
            lines.append(f"{out}.{method}({axis}, {index_code}, {src_code})")
        lines += [put for put in puts if put is not None]
        if out != name:
            idx = ", ".join("None" if d is None else ":" for d in target.layout)
            lines.append(f"{name} = {out}[{idx}]")
        return lines

    def _put_at_positions(
        self,
        out: str,
        h: sympy.Expr,
        group: list[_Pick],
        flat: TensorInfo,
    ) -> str | None:
        """``out[…, p1, …, p2, …] += h`` for ``h·δ(v1, p1)·δ(v2, p2)…``, by one ``index_put_``: a
        position that reads another target's index is read at that target's position (a max of a
        max: ``δ(h, argmax_h x[h, w])·δ(w, argmax_w max_h x)``). None when a position or ``h``
        reads a target no delta pins."""
        targets = {v: p for _, v, p in group}
        if len(targets) < len(group):
            return None
        known: dict[sympy.Symbol, sympy.Expr] = {}
        while len(known) < len(targets):  # positions free of the other targets first, then those reading them
            ready = {v: substitute_indices(p, known) for v, p in targets.items() if v not in known}
            ready = {v: p for v, p in ready.items() if not free_indices(p) & (set(targets) - set(known))}
            if not ready:
                return None
            known.update(ready)
        batch = tuple(i for i in flat.indices if i not in targets)
        at = substitute_indices(h, known)
        if any(free_indices(x) - set(batch) for x in [at, *known.values()]):
            return None
        values = self._elementwise(at, {})

        def arange(a: sympy.Symbol) -> str:
            rng = f"torch.arange({size_code(dim_of(a).size)}, device={self.ref}.device)"
            return self.align(Val(rng, (a,)), batch, strip=False)

        positions = [
            self.align(self.lower(known[i]), batch, strip=False) if i in known else arange(i) for i in flat.indices
        ]
        if values.axes:
            src = self.align(values, batch, strip=False)
        elif values.constant or not tensor_names(at):
            src = f"torch.full((), {values.code}, dtype={self.ref}.dtype, device={self.ref}.device)"
        else:
            src = values.code
        return f"{out}.index_put_(({', '.join(positions)},), {src}, accumulate=True)"

    def _share(self, factors: set[sympy.Expr], known: dict[str, Val]) -> tuple[sympy.Expr, sympy.Symbol]:
        """Compute a factor common to several terms once, into a temporary ``s<k>``.

        Returns the factor and the stand-in symbol that replaces it (registered in ``known``). Its
        line is written at once, before any temporary that reads it.
        """
        shared = sympy.Mul(*sorted(factors, key=sympy.default_sort_key))
        key = canonical_key(shared)[0]
        val = self._cached(shared, self._elementwise) if key in self.memo else self._elementwise(shared)
        var = val.code if val.code.isidentifier() else self._temp(val.code, "s")  # a name is read as it is
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
        if any(len(sympy.Mul.make_args(F)) > 1 or F.args for F, _ in full_terms if not is_entry(F)):
            return None  # a full-size product or function per term: the in-place chain does better
        if any(free_indices(S) >= full for _, S in terms):
            return None  # "small" factors that span the target between them (gamma[d]·v[n]) are not small
        fused_cost = sum(_full_ops(F, full) + 1 for F, _ in full_terms)
        if fused_cost >= _full_ops(e, full):
            return None  # the expression as written makes no more passes over full-size tensors
        lines: list[str] = []
        known: dict[str, Val] = {}
        common = set.intersection(*(set(sympy.Mul.make_args(S)) for _, S in full_terms))
        common = {f for f in common if tensor_names(f)}
        if common and len(full_terms) > 1:
            shared, stand_in = self._share(common, known)
            full_terms = [(F, (S / shared) * stand_in) for F, S in full_terms]
            small = _read_through(small, common, shared, stand_in)
        small_code = self.align(self._elementwise(small, known), target.indices) if small != 0 else None
        inner = target.indices[-1] if target.indices else None
        first = full_terms[0][1]
        # torch.addcmul(small, F, S) with small and S both broadcast along the inner axis runs a scalar
        # loop: then F·S makes the buffer and small is added last
        last = (
            small_code is not None and _tensor_factor(first) and inner not in free_indices(small) | free_indices(first)
        )
        acc = None if last else small_code
        fresh = False
        for F, S in full_terms:
            f_code = self.align(self.lower(F), target.indices)
            tensor_factor = _tensor_factor(S)
            s_code = "" if S == 1 else self.align(self._elementwise(S, known), target.indices)
            if acc is None:
                acc = f"{atom(f_code)}.clone()" if S == 1 else f"{atom(f_code)} * {atom(s_code)}"
            elif S == 1:
                acc = f"{atom(acc)}.add_({f_code})" if fresh else f"torch.add({acc}, {f_code})"
            elif tensor_factor:
                acc = (
                    f"{atom(acc)}.addcmul_({f_code}, {s_code})"
                    if fresh
                    else f"torch.addcmul({acc}, {f_code}, {s_code})"
                )
            else:
                acc = (
                    f"{atom(acc)}.add_({f_code}, alpha={s_code})"
                    if fresh
                    else f"torch.add({acc}, {f_code}, alpha={s_code})"
                )
            fresh = True
        if last:
            acc = f"{atom(acc)}.add_({small_code})"  # type: ignore[arg-type]
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
    def align(self, val: Val, want: Axes, strip: bool = True, raw: bool = True) -> str:
        """View ``val`` so its axes line up with ``want`` for broadcasting.

        ``raw=False``: a tensor stored with leading size-1 axes (``mean`` of ``[1, D]``) is viewed
        without them, as every other value of its axes is (a chain may update a ``[D]`` buffer with it).
        """
        if not val.axes and (strip or val.constant):
            return val.code  # a scalar broadcasts as it is
        have = [a for a in want if a in val.axes]
        if val.raw is not None and list(val.axes) == have and (raw or val.raw[1][0] is not None):
            desired = [a if a in val.axes else None for a in want]
            raw_layout = list(val.raw[1])
            while strip and desired and desired[0] is None and len(desired) > len(raw_layout):
                desired.pop(0)
            if raw_layout == desired:
                return val.raw[0]
        code = val.code
        if list(val.axes) != have:
            perm = [val.axes.index(a) for a in have]
            code = f"{atom(code)}.T" if len(perm) == 2 else f"{atom(code)}.permute({', '.join(map(str, perm))})"
        slots = [":" if a in val.axes else "None" for a in want]
        while strip and slots and slots[0] == "None":
            slots.pop(0)
        if "None" in slots:
            while slots and slots[-1] == ":":
                slots.pop()
            code = f"{atom(code)}[{', '.join(slots)}]"
        elif not strip and len(slots) > len(val.axes) and val.axes:
            code = f"{atom(code)}[{', '.join(slots)}]"
        return code

    # -- lowering ----------------------------------------------------------------------------
    def lower(self, e: sympy.Expr) -> Val:
        if is_entry(e):
            return self._entry(e)
        if isinstance(e, ISum):
            return self._cached(e, self._sum)
        if isinstance(e, IMax):
            return self._max(e)
        if isinstance(e, ArgMax):
            return self._argmax(e)
        if isinstance(e, sympy.KroneckerDelta):
            return self._cached(e, self._delta)
        if isinstance(e, Flat):
            return self._flat_part(e)
        if e.is_Symbol and is_index(e):  # a position along its dim (a window's t*2 + k)
            return Val(f"torch.arange({size_code(dim_of(e).size)}, device={self.ref}.device)", (e,), True)
        if isinstance(e, sympy.Mul) and self.share and canonical_key(e)[0] in self.repeated:
            return self._cached(e, self._elementwise)  # a product a sum elsewhere reads too
        if isinstance(e, sympy.Mul) and self.share:
            return self._with_shared_part(e)
        return self._elementwise(e)

    def _values_at(self, e: sympy.Mul) -> Val | None:
        """``f·δ(v, p)`` with ``f`` free of ``v``: ``f``'s values put at position ``p`` along ``v`` (one
        ``scatter_`` of values), not a one-hot the size of ``v``'s axis times every position, then
        multiplied by ``f`` (a max over a flattened window's gradient, ``dout[j]·δ((n, d), argmax[j])``)."""
        deltas = [f for f in e.args if isinstance(f, sympy.KroneckerDelta)]
        if len(deltas) != 1:
            return None
        a, b = deltas[0].args
        pick, v = (a, b) if is_index(b) or _plain_pack(b) else (b, a)
        if not (is_index(v) or _plain_pack(v)) or is_index(pick) or is_window_index(pick):
            return None
        parts = tuple(v.args) if isinstance(v, Pack) else (v,)
        rest = e / deltas[0]
        if free_indices(rest) & set(parts) or not tensor_names(rest):
            return None
        position = self.lower(pick)
        if set(parts) & set(position.axes) or not free_indices(rest) <= set(position.axes) or not position.axes:
            return None
        lead = list(position.axes)
        sizes = [size_code(dim_of(x).size) for x in lead]
        values = self.lower(rest)
        src = self.align(values, tuple(lead), strip=False)
        if set(values.axes) != set(lead):
            src = f"{atom(src)}.expand({', '.join(sizes)})"
        axis = len(lead)
        flat = size_code(sympy.Mul(*(dim_of(i).size for i in parts)))
        code = (
            f"{self.ref}.new_zeros({shape_tuple(sizes + [flat])})"
            f".scatter_({axis}, {atom(position.code)}.unsqueeze({axis}), {atom(src)}.unsqueeze({axis}))"
        )
        if len(parts) > 1:
            code = f"{code}.reshape({', '.join(sizes + [size_code(dim_of(i).size) for i in parts])})"
        return Val(code, tuple(lead) + parts)

    def _scale_in_scatter(self, e: sympy.Mul) -> sympy.Expr | None:
        """``a[n]·Σ_k δ(c, idx[n, k])`` as ``Σ_k a[n]·δ(c, idx[n, k])``: the values scattered are ``a``'s,
        not ones scaled afterwards (a count tensor of the result's size, and one more pass over it).
        Only factors free of the scatter's target indices and of the summed one move in."""
        sums = [f for f in e.args if isinstance(f, ISum) and f.body.has(sympy.KroneckerDelta)]
        if len(sums) != 1:
            return None
        s = sums[0]
        others = [f for f in e.args if f is not s]
        deltas = s.body.atoms(sympy.KroneckerDelta)
        targets = {a for d in deltas for a in d.args if is_index(a)} & free_indices(s)  # where values land
        moved = [f for f in others if tensor_names(f) and not free_indices(f) & (targets | {s.var})]
        if not moved:
            return None
        rest = [f for f in others if f not in moved]
        return sympy.Mul(*rest) * ISum(sympy.Mul(*moved) * s.body, s.var)

    def _with_shared_part(self, e: sympy.Mul) -> Val:
        """``e`` as the largest part another formula computes too (computed once) times the rest."""
        for key, part in sub_products(e):
            if key in self.repeated:
                rest = list(e.args)
                for f in part:
                    rest.remove(f)
                shared = self._cached(sympy.Mul(*part), self._elementwise)
                stand_in = f"__val_{id(shared)}"
                return self._elementwise(sympy.Mul(*rest) * sympy.Symbol(stand_in), {stand_in: shared})
        return self._elementwise(e)

    def _flattened_dim(self, of: sympy.Basic) -> Dim | None:
        """The flattened dim ``of`` is a position in: an index's, an argmax's, a gathered position's."""
        dim = position_dim(of)
        if dim is None and is_entry(of) and entry_name(of) in self.positions:
            dim = self.positions[entry_name(of)]
        return dim

    def _all_parts_at(self, idx: tuple[sympy.Basic, ...], k: int) -> bool:
        """Whether ``idx[k:]`` starts with every coordinate of one flattened position in order
        (``f.0, f.1``: the axes merge into one, read at ``f``); with some missing (``y[j, nd.0]``, a
        tensor of ``n`` read along ``(n d)``) the coordinates are computed and gathered instead."""
        f = idx[k].args[0]
        dim = self._flattened_dim(f)
        if dim is None or not dim.parts:  # not known here: the axes merge as they stand
            return True
        return list(idx[k : k + len(dim.parts)]) == [Flat(f, p) for p in range(len(dim.parts))]

    def _flat_part(self, e: Flat) -> Val:
        """Coordinate ``p`` of positions in a flattened dim (``idx.1`` of ``idx`` into ``(n d)``): ``idx % D``."""
        of, p = e.args
        dim = self._flattened_dim(of)
        if dim is None:
            raise OpDefinitionError(f"cannot lower {e}: the flattened dim of {of} is not known")
        parts = dim.parts
        val = self.lower(of)
        stride = sympy.Mul(*(d.size for d in parts[int(p) + 1 :]))
        code = val.code if stride == 1 else f"{atom(val.code)} // {atom(size_code(stride))}"
        if int(p) > 0:
            code = f"{atom(code)} % {atom(size_code(parts[int(p)].size))}"
        return Val(code, val.axes, True)

    def fresh_name(self, hint: str = "t") -> str:
        """A name no tensor or temporary of this lowerer has: ``hint`` and a number."""
        self.counter += 1
        name = f"{hint}{self.counter}"
        while name in self.names:
            self.counter += 1
            name = f"{hint}{self.counter}"
        return name

    def _temp(self, code: str, hint: str = "t") -> str:
        name = self.fresh_name(hint)
        self.lines.append(f"{name} = {code}")
        return name

    def _cached(self, e: sympy.Expr, fn, like: sympy.Expr | None = None) -> Val:
        """``fn(e)`` once per canonical form of ``e`` (or of ``like``, an equal form with the same free
        indices), into a temporary that later reads share."""
        key, placeholders = canonical_key(e if like is None else like)
        if key in self.memo and self.share:
            code, axes = self.memo[key]
            back = {p: s for s, p in placeholders.items()}
            return Val(code, tuple(back[a] for a in axes))
        val = fn(e)
        if val.constant or (not val.axes and not tensor_names(e)):  # Σ_d 0, t1 - t1: a number, no temporary
            return Val(val.code, (), val.is_int, constant=True)
        name = val.code if val.code.isidentifier() else self._temp(val.code)
        self.memo[key] = (name, tuple(placeholders[a] for a in val.axes))
        self.rank[name] = len(val.axes)
        if val.product is not None and name != val.code:
            self.products[name] = val.product
        return Val(name, val.axes, val.is_int)

    def _entry(self, e: sympy.Expr) -> Val:
        name = entry_name(e)
        info = self.layouts[name]
        idx = entry_indices(e)
        code = name
        if None in info.layout:
            code = f"{name}[{', '.join('0' if d is None else ':' for d in info.layout)}]"
        if any(_resized(i, d) for i, d in zip(idx, info.dims)):  # read at a shifted or padded position
            windowed = self._windowed(code, info.dims, idx)
            if windowed is not None:
                return windowed
        if all(is_index(i) for i in idx):
            if len(set(idx)) != len(idx):
                return self._diagonal(e, code, [d for d in info.dims], list(idx), info.is_int)
            it = iter(idx)
            raw = (name, tuple(None if d is None else next(it) for d in info.layout))
            return Val(code, tuple(idx), info.is_int, raw if None in info.layout else None)
        return self._indexed(code, info, idx)

    def _diagonal(self, e: sympy.Expr, code: str, dims: list[Dim], idx: list[sympy.Basic], is_int: bool) -> Val:
        """An entry read with an index repeated (``v1[n, d, d]``, a saved outer product read where
        a rename met its source): ``Tensor.diagonal``, a view, once per repeat."""
        while len(set(idx)) != len(idx):
            a = next(k for k, i in enumerate(idx) if idx.index(i) != k)
            first = idx.index(idx[a])
            size = dim_of(idx[a]).size
            if not (dims[first].size == dims[a].size == size):
                raise OpDefinitionError(f"repeated index in {e} along dims of different sizes is not supported")
            code = f"{atom(code)}.diagonal(0, {first}, {a})"
            keep = [k for k in range(len(idx)) if k not in (first, a)]
            idx, dims = [idx[k] for k in keep] + [idx[first]], [dims[k] for k in keep] + [dims[first]]
        return Val(code, tuple(idx), is_int)

    def _indexed(self, code: str, info: TensorInfo, idx: tuple[sympy.Basic, ...]) -> Val:
        """Entries at compound, flattened or gathered indices: reshape, then advanced indexing."""
        windowed = self._windowed(code, info.dims, idx) if any(is_window_index(i) for i in idx) else None
        if windowed is not None:
            return windowed
        dims = info.dims
        # unflatten: an index Pack(t, e) on a flattened dim splits that axis
        shape: list[str] = []
        new_idx: list[sympy.Basic] = []
        new_dims: list[Dim] = []
        reshaped = False
        k = 0
        while k < len(idx):
            i, d = idx[k], dims[k]
            if isinstance(i, Pack):
                shape += [size_code(p.size) for p in d.parts]
                new_idx += list(i.args)
                new_dims += list(d.parts)
                reshaped = True
                k += 1
            elif isinstance(i, Flat) and int(i.args[1]) == 0 and self._all_parts_at(idx, k):
                f = i.args[0]  # an index of a flattened dim, or a gathered position in one
                n = 1
                while k + n < len(idx) and idx[k + n] == Flat(f, n):
                    n += 1
                shape.append(size_code(sympy.Mul(*(p.size for p in dims[k : k + n]))))
                new_idx.append(f)
                new_dims.append(dim_of(f) if is_index(f) else dims[k])  # a gathered position: never resized
                reshaped = True
                k += n
            else:
                shape.append(size_code(d.size))
                new_idx.append(i)
                new_dims.append(d)
                k += 1
        if reshaped:
            code = f"{atom(code)}.reshape({', '.join(shape)})"
        if any(_resized(i, d) for i, d in zip(new_idx, new_dims)):  # and a padding's part, read in range
            windowed = self._windowed(code, tuple(new_dims), tuple(new_idx))
            if windowed is not None:
                return windowed
        if all(is_index(i) for i in new_idx):
            return Val(code, tuple(new_idx), info.is_int)
        return self._gather(code, new_idx, info.is_int)

    def _windowed(self, code: str, dims: tuple[Dim, ...], idx: tuple[sympy.Basic, ...]) -> Val | None:
        """Entries at shifted or windowed positions as views: ``x[..., t - 4]`` is ``F.pad`` (zeros
        past the ends), ``x[..., t + 4]`` a ``narrow``, ``x[..., 2*t + k]`` an ``unfold``."""
        axes: list[sympy.Symbol] = []
        pads: dict[int, tuple[sympy.Expr, sympy.Expr]] = {}
        windows: list[tuple[int, _Window]] = []
        for axis, (i, d) in enumerate(zip(idx, dims)):
            if is_index(i) and not _resized(i, d):
                axes.append(i)
                continue
            shift, rest = i.as_coeff_Add()
            if is_index(rest) and shift.is_Integer:
                pads[axis] = (-shift, sympy.simplify(dim_of(rest).size + shift - d.size))
                axes.append(rest)
                continue
            window = _Window.of(i, d.size)
            if window is None:
                return None
            windows.append((axis, window))
            axes.append(window.positions)
        axes += [w.offsets for _, w in windows]
        if len(set(axes)) != len(axes):
            return None
        if pads:
            if all(x.is_number and x <= 0 for p in pads.values() for x in p):
                for axis, (left, _) in pads.items():
                    code = f"{atom(code)}.narrow({axis}, {-left}, {size_code(dim_of(axes[axis]).size)})"
            else:
                first = min(pads)
                amounts = [size_code(x) for axis in reversed(range(first, len(idx))) for x in pads.get(axis, (0, 0))]
                code = f"torch.nn.functional.pad({code}, ({', '.join(amounts)}))"
        for axis, w in windows:
            code = f"{atom(code)}.unfold({axis}, {size_code(w.span)}, {w.step})"
            if w.dilation != 1:
                code = f"{code}[..., ::{w.dilation}]"
        return Val(code, tuple(axes))

    def _gather(self, code: str, idx: list[sympy.Basic], is_int: bool) -> Val:
        """Advanced indexing: gathered axes take integer tensors, shared indices take aranges."""
        along = self._take_along(code, idx, is_int)
        if along is not None:
            return along
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
                rng = f"torch.arange({size_code(dim_of(i).size)}, device={base}.device)"
                parts.append(self.align(Val(rng, (i,)), tuple(lead_axes)))
            else:
                parts.append(self.align(self.lower(i), tuple(lead_axes)))
        parts += [":"] * len(tail)
        return Val(f"{atom(code)}[{', '.join(parts)}]", tuple(lead_axes) + tuple(tail), is_int)

    def _take_along(self, code: str, idx: list[sympy.Basic], is_int: bool) -> Val | None:
        """``x[n, t, p[n, t]]``: along one axis, a position per entry of the others, read by
        ``gather``, not by advanced indexing with an ``arange`` per other axis (5x slower on a CPU
        for a 2-D max pool's argmaxes, ``[N, H, W, C, 2]``)."""
        picked = [axis for axis, i in enumerate(idx) if not is_index(i)]
        plain = [i for i in idx if is_index(i)]
        if len(idx) < 3 or len(picked) != 1 or len(set(plain)) != len(plain):
            return None  # of a matrix, logprobs[arange(N), Yb] reads as the lecture writes it
        (axis,) = picked
        position = self.lower(idx[axis])
        if not position.axes or not set(position.axes) <= set(plain):
            return None
        slot = sympy.Dummy("slot")
        index = self.align(position, tuple(slot if a == axis else i for a, i in enumerate(idx)), strip=False)
        if set(position.axes) == set(plain):  # gather (take_along_dim broadcasts, at 5x its cost)
            return Val(f"{atom(code)}.gather({axis}, {index}).squeeze({axis})", tuple(plain), is_int)
        return Val(f"torch.take_along_dim({code}, {index}, {axis}).squeeze({axis})", tuple(plain), is_int)

    def _sum(self, e: ISum) -> Val:
        split = _split_flat_sums(e)
        if split != e:
            return self.lower(split)
        if e.var not in free_indices(e.body):  # a sum of something constant along the dim
            sharded = self.shard is not None and self.shard.reduces([e.var])
            return self.lower(e.body * (self.shard.total if self.shard and sharded else dim_of(e.var).size))
        indices, body = flatten_sums(e)
        shadowed = [i for i in indices if i in bound_indices(body)]
        if shadowed:  # Σ_m f·Σ_m g: the inner m renamed, so that no pass reads it as the outer one
            return self.lower(_unshadowed(body, indices))
        absent = [i for i in indices if i not in free_indices(body)]
        if absent:  # Σ_n Σ_d f(n) with f free of d: D·Σ_n f(n)
            inner = [i for i in indices if i not in absent]
            for i in reversed(inner):
                body = ISum(body, i)
            return self.lower(body * sympy.Mul(*(dim_of(i).size for i in absent)))
        saved_preference, self.preferred = self.preferred, ()
        try:
            val = self._sum_body(body, indices, saved_preference)
        finally:
            self.preferred = saved_preference
        if self.shard is not None and self.shard.reduces(indices):  # each process summed its own part
            return Val(f"_all_reduce({val.code}, group)", val.axes, val.is_int)
        return val

    def _sum_body(self, body: sympy.Expr, indices: list[sympy.Symbol], preferred: Axes) -> Val:
        ungathered = self._ungather(body, indices)
        if ungathered is not None:
            return ungathered
        scatter = (
            self._scatter_then_fold(body, indices)
            or self._index_put(body, indices, preferred)
            or self._scatter(body, indices)
            or self._scatter_shifted(body, indices)
            or self._fold(body, indices)
        )
        if scatter is not None:
            return scatter
        summed = frozenset(indices)
        for f in sympy.Mul.make_args(body):  # Σ (a·b + c·e)·x with a·b larger than any forward tensor
            if isinstance(f, sympy.Add) and not self._admissible(frozenset(free_indices(f))):
                rest = body / f
                return self.lower(sympy.Add(*(_summed(t * rest, indices) for t in f.args)))
        scalars, groups = factor_groups(body, summed)
        # factors of one layout multiply elementwise (once per function when several sums share them);
        # the groups contract pairwise, cheapest first
        vals = [
            self._cached(g, self._elementwise) if canonical_key(g)[0] in self.repeated else self.lower(g)
            for g in groups
        ]
        chosen = planner.plan([frozenset(v.axes) for v in vals], summed, self._weight, self._admissible)
        for step in chosen.steps:
            if isinstance(step, planner.Reduce):
                result = self._reduce(vals[step.operand], step.summed)
                vals = [v for k, v in enumerate(vals) if k != step.operand] + [result]
            else:
                result = self._pair(vals[step.left], vals[step.right], step.summed, preferred)
                vals = [v for k, v in enumerate(vals) if k not in (step.left, step.right)] + [result]
        (val,) = vals
        if scalars:
            return self._elementwise(sympy.Mul(*scalars) * sympy.Symbol(f"__val_{id(val)}"), {f"__val_{id(val)}": val})
        return val

    def _ungather(self, body: sympy.Expr, indices: list[sympy.Symbol]) -> Val | None:
        """A factor read at gathered positions, ``y[p, R]``, whose gathered copy would outgrow every
        forward tensor: read ``y`` itself and move the gather onto something smaller.

        Positions that depend on summed indices ``S``: ``Σ_S A[S]·y[p(S), R]`` is
        ``Σ_k y[k, R]·(Σ_S A[S]·δ(k, p(S)))``, the values of ``A`` scattered first (``index_add_``);
        positions that do not: ``Σ_S A[S]·y[p(B), S]`` is ``(Σ_S A[S]·y[k, S])`` read at ``k = p(B)``.
        """
        summed = set(indices)
        factors = list(sympy.Mul.make_args(body))
        wide = [f for f in factors if self._gathers(f) and not self._fits_named(frozenset(free_indices(f)))]
        if not wide:
            return None
        read_at_target = self._read_at_targets(body, summed)
        if read_at_target is not None:  # what no longer reads a summed index leaves the sum
            factors = sympy.Mul.make_args(read_at_target)
            inside = _summed(sympy.Mul(*(f for f in factors if free_indices(f) & summed)), indices)
            return self.lower(sympy.Mul(*(f for f in factors if not free_indices(f) & summed)) * inside)
        taken = set(free_indices(body)) | set(bound_indices(body)) | summed
        plain: list[sympy.Expr] = []
        picks: dict[sympy.Symbol, sympy.Expr] = {}
        moved: list[sympy.Expr] = []
        for f in wide:  # the moves below read a gathered tensor itself, or a function of such reads
            if is_entry(f):
                idx = list(entry_indices(f))
                dims = self.layouts[entry_name(f)].dims
                for j, i in enumerate(idx):
                    if self._position(i):  # read at the index another factor reads it at, or a fresh one
                        known = [k for k, p in picks.items() if p == i and dim_of(k) == dims[j] and k not in idx]
                        k = known[0] if known else fresh_index(dims[j], taken)
                        taken.add(k)
                        idx[j], picks[k] = k, i
                plain.append(entry(entry_name(f), idx))
                moved.append(f)
            elif (read_whole := self._read_whole(f, taken, picks)) is not None:
                plain.append(read_whole)
                moved.append(f)
        if not moved:
            return None
        others = [g for g in factors if not any(g is f for f in moved)]
        by_sum = set().union(*(free_indices(p) & summed for p in picks.values()))
        move = _Ungather(plain, others, picks, by_sum, indices)
        if by_sum:  # rows in bags read each gathered row once: never the count matrix of all rows
            # (or, what only the gathered rows sum over summed before they are gathered)
            return self._bag(move) or self._scatter_positions(move) or self._gather_last(move)
        return self._gather_last(move)

    def _read_whole(self, f: sympy.Expr, taken: set, picks: dict[sympy.Symbol, sympy.Expr]) -> sympy.Expr | None:
        """A function of reads at gathered positions (``step(v0[p, d])·y[p, d]**2``, the square of
        a sum of such reads, ``(Σ_j w[p, d, j]·y[j, d])**2``, a max of them) with each position
        ``p`` read at an index of its dim (recorded in ``picks``, shared by the factors); None when
        a position stands along two dims or depends on an index the function sums or maximises over."""
        if any(
            isinstance(n, (ISum, IMax)) and any(n.var in free_indices(i) for i in self._positions_in(n))
            for n in sympy.preorder_traversal(f)
        ):
            return None
        mine: dict[sympy.Expr, tuple[sympy.Symbol, Dim]] = {}
        for leaf in sympy.preorder_traversal(f):
            if not is_entry(leaf) or entry_name(leaf) not in self.layouts:
                continue
            for d, i in zip(self.layouts[entry_name(leaf)].dims, entry_indices(leaf)):
                if not self._position(i):
                    continue
                if i in mine and mine[i][1] != d:
                    return None
                if i not in mine:  # the index another factor reads this position at, or a fresh one
                    known = [k for k, p in picks.items() if p == i and dim_of(k) == d]
                    mine[i] = (known[0] if known else fresh_index(d, taken), d)
                    taken.add(mine[i][0])
        if not mine:
            return None
        whole = f.xreplace({p: k for p, (k, _) in mine.items()})
        if self._gathers(whole):
            return None
        picks.update({k: p for p, (k, _) in mine.items()})
        return whole

    def _positions_in(self, f: sympy.Expr) -> list[sympy.Basic]:
        """The gathered positions ``f`` reads tensors at."""
        return [i for e in sympy.preorder_traversal(f) if is_entry(e) for i in entry_indices(e) if self._position(i)]

    def _gathers(self, f: sympy.Expr) -> bool:
        """Whether ``f`` reads some tensor at gathered positions (``x[d, idx[m]]``, ``x[argmax, d] ** 2``)."""
        return any(
            is_entry(e) and any(self._position(i) for i in entry_indices(e)) for e in sympy.preorder_traversal(f)
        )

    def _read_at_targets(self, body: sympy.Expr, summed: set) -> sympy.Expr | None:
        """``f(x[n, p])·δ(d, p)`` is ``f(x[n, d])·δ(d, p)``: what is read at a position a delta routes
        to a result index reads that index instead (no gather), in any factor, a delta's own
        argmax too (``δ(d, argmax(x[idx[k], d2]))·δ(n, idx[k])``); None if nothing is."""
        targets: dict[sympy.Expr, sympy.Symbol] = {}
        factors = sympy.Mul.make_args(body)
        for f in factors:
            for v, p in (f.args, f.args[::-1]) if isinstance(f, sympy.KroneckerDelta) else ():
                if is_index(v) and v not in summed and self._position(p):
                    targets.setdefault(p, v)
        mapping: dict[sympy.Expr, sympy.Expr] = {}
        for e in sympy.preorder_traversal(body):
            if not is_entry(e) or e in mapping or entry_name(e) not in self.layouts:
                continue
            dims = self.layouts[entry_name(e)].dims
            idx = [
                targets[i] if i in targets and dim_of(targets[i]) == d else i for i, d in zip(entry_indices(e), dims)
            ]
            if idx != list(entry_indices(e)):
                mapping[e] = entry(entry_name(e), idx)
        if not mapping:
            return None
        return sympy.Mul(*(f.xreplace(mapping) for f in factors))

    def _position(self, i: sympy.Basic) -> bool:
        """An index that is a gathered position: an integer input's entry, or an argmax."""
        return isinstance(i, ArgMax) or (is_entry(i) and self.layouts[entry_name(i)].is_int)

    def _named(self, e: sympy.Expr, hint: str) -> sympy.Expr | None:
        """``e`` lowered into a temporary, as an entry of it (so an outer sum cannot merge it back); None
        if its value would outgrow every forward tensor."""
        if not self._admissible(frozenset(free_indices(e))):
            return None
        val = self.lower(e)
        name = val.code if val.code.isidentifier() else self._temp(val.code, hint)
        self.layouts[name] = TensorInfo(name, tuple(dim_of(a) for a in val.axes))
        return entry(name, val.axes)

    def _scatter_positions(self, move: _Ungather) -> Val | None:
        """``Σ_S A[S]·y[p(S), R]`` as ``Σ_k y[k, R]·(Σ_S A[S]·δ(k, p(S)))``: A scattered first."""
        plain, others, picks, by_sum, indices = move.plain, move.others, move.picks, move.by_sum, move.indices
        if any(free_indices(f) & by_sum for f in plain):
            return None
        inner = [g for g in others if free_indices(g) & by_sum]
        outer = [g for g in others if not free_indices(g) & by_sum]
        deltas = sympy.Mul(*(sympy.KroneckerDelta(k, p) for k, p in picks.items()))
        named = self._named(_summed(sympy.Mul(*inner) * deltas, [i for i in indices if i in by_sum]), "s")
        if named is None:
            return None
        rest = sympy.Mul(*outer, *plain) * named
        return self.lower(_summed(rest, [i for i in indices if i not in by_sum] + list(picks)))

    def _bag(self, move: _Ungather) -> Val | None:
        """``Σ_S w[B, S]·T[p[B, S], R]``, rows of ``T`` gathered in bags and summed (``x[idx].sum(1)``):
        ``F.embedding_bag``, which never holds the gathered rows (``B x S x R``) at once."""
        plain, others, picks, by_sum, indices = move.plain, move.others, move.picks, move.by_sum, move.indices
        if len(plain) != 1 or len(picks) != 1:
            return None
        (k, p), table = next(iter(picks.items())), plain[0]
        if not is_entry(table):
            return None
        bag = tuple(i for i in indices if i in by_sum)
        batch = tuple(sorted(free_indices(p) - by_sum, key=str))
        rows = tuple(i for i in entry_indices(table) if i != k)
        weights = [g for g in others if free_indices(g) & by_sum]
        outer = [g for g in others if not free_indices(g) & by_sum]
        if not all(is_index(i) for i in rows) or set(rows) & (set(batch) | by_sum):
            return None
        if any(not free_indices(g) <= set(batch) | by_sum for g in weights):
            return None
        if not self._admissible(frozenset(batch + rows)):
            return None

        def sizes(axes: tuple[sympy.Symbol, ...]) -> list[str]:
            return [size_code(dim_of(a).size) for a in axes]

        def flat2d(val: Val, lead: tuple[sympy.Symbol, ...], tail: tuple[sympy.Symbol, ...]) -> str:
            code = self.align(val, lead + tail, strip=False)
            if set(val.axes) != set(lead + tail):
                code = f"{atom(code)}.expand({', '.join(sizes(lead + tail))})"
            rows_code = size_code(sympy.Mul(*(dim_of(a).size for a in lead)))
            return f"{atom(code)}.reshape({rows_code}, -1)"

        positions = flat2d(self.lower(p), batch, bag)
        weight_code = ""
        if weights:
            weight_code = f", per_sample_weights={flat2d(self.lower(sympy.Mul(*weights)), batch, bag)}"
        gathered = self.lower(table)
        summed_rows = (
            f'torch.nn.functional.embedding_bag({positions}, {flat2d(gathered, (k,), rows)}, mode="sum"{weight_code})'
        )
        code = f"{summed_rows}.reshape({', '.join(sizes(batch + rows)) or '()'})"
        name = self._temp(code, "bag")
        self.layouts[name] = TensorInfo(name, tuple(dim_of(a) for a in batch + rows))
        rest = sympy.Mul(*outer) * entry(name, batch + rows)
        return self.lower(_summed(rest, [i for i in indices if i not in by_sum]))

    def _gather_last(self, move: _Ungather) -> Val | None:
        """``Σ_S A[S]·y[p(B), S]`` as ``(Σ_S A[S]·y[k, S])`` read at ``k = p(B)``: summed before gathered."""
        plain, others, picks, indices = move.plain, move.others, move.picks, move.indices
        batch = set().union(*(free_indices(p) for p in picks.values()))
        reads_sum = [g for g in others if free_indices(g) & set(indices)]
        # first the factors free of the positions' indices; else every factor that reads a summed
        # index, the positions' indices then kept as axes of the sum (Σ_d x[m, d]·y[d, k] for all
        # m, read at m = idx[j, k]: an [M, K] sum, not the gathered [J, K, D] copy)
        for inner in ([g for g in reads_sum if not free_indices(g) & batch], reads_sum):
            outer = [g for g in others if not any(g is f for f in inner)]
            # (never an index a position reads: it is read at the position, after the sum)
            inside = [s for s in indices if s not in move.by_sum and not any(s in free_indices(g) for g in outer)]
            if not inside:
                continue
            named = self._named(_summed(sympy.Mul(*plain, *inner), inside), "r")
            if named is None:
                continue
            rest = sympy.Mul(*outer) * substitute_indices(named, picks)
            return self.lower(_summed(rest, [i for i in indices if i not in inside]))
        return None

    # -- contraction steps ------------------------------------------------------------------------
    def _weight(self, axes: frozenset[sympy.Symbol]) -> int:
        """A size estimate without runtime sizes: every plain dim counts as ``BIG``."""
        return planner.BIG ** sum(len(_parts(i)) for i in axes)

    def _fits_named(self, axes: frozenset[sympy.Symbol]) -> bool:
        """Whether a value with these axes fits inside a named forward tensor (a gathered copy that
        does not is read another way: in bags, scattered first, summed before it is gathered)."""
        if self.named_admissible is None:
            return self._admissible(axes)
        need = Counter(p for i in axes for p in _parts(i))
        return any(not (need - have) for have in self.named_admissible)

    def _admissible(self, axes: frozenset[sympy.Symbol]) -> bool:
        """Whether a value with these axes fits inside some forward tensor (so it is never larger)."""
        need = Counter(p for i in axes for p in _parts(i))
        return not self.admissible or any(not (need - have) for have in self.admissible)

    def _reduce(self, val: Val, summed: frozenset[sympy.Symbol]) -> Val:
        dims = sorted(val.axes.index(i) for i in summed)
        axes = tuple(a for a in val.axes if a not in summed)
        if not axes:
            return Val(f"{atom(val.code)}.sum()", ())
        dim_text = str(dims[0]) if len(dims) == 1 else f"({', '.join(map(str, dims))})"
        return Val(f"{atom(val.code)}.sum({dim_text})", axes)

    def _pair(self, a: Val, b: Val, summed: frozenset[sympy.Symbol], preferred: Axes) -> Val:
        """``Σ_summed a·b`` as one product: elementwise, ``(a*b).sum``, ``@`` or ``einsum``."""
        known = {"__val_pair_a": a, "__val_pair_b": b}
        product = sympy.Symbol("__val_pair_a") * sympy.Symbol("__val_pair_b")
        if not summed or set(a.axes) == set(b.axes):
            val = self._elementwise(product, known)
            return self._reduce(val, summed) if summed else val
        batch = (set(a.axes) & set(b.axes)) - summed
        if not batch and len(summed) == 1 and len(a.axes) <= 2 and len(b.axes) <= 2:
            return self._matmul(a, b, next(iter(summed)), preferred)
        return self._per_offset(a, b, summed, preferred) or self._einsum(a, b, summed, preferred)

    def _per_offset(self, a: Val, b: Val, summed: frozenset[sympy.Symbol], preferred: Axes) -> Val | None:
        """``Σ_summed a·b`` one window offset at a time, where an axis of offsets (a fixed, small size)
        is all that keeps the pair from being a product and a sum (a depthwise conv, its weight's
        gradient): ``einsum`` would copy the window view into a ``bmm`` of one-row matrices. Each
        offset's slice is a view; the result is the offsets' sum, or their stack when kept."""
        for k in dict.fromkeys(a.axes + b.axes):
            size = dim_of(k).fixed
            if size is None or size > MAX_OFFSETS_LOOPED:
                continue
            rest_a, rest_b = ({x for x in v.axes if x != k} for v in (a, b))
            if not (rest_a <= rest_b or rest_b <= rest_a):
                continue  # a matrix product apart from the offsets (a conv): one einsum is faster
            written = len(self.lines)
            # an operand that is an expression is computed once, before the loop over the offsets
            a_once, b_once = (
                v if _VIEW.fullmatch(v.code) else replace(v, code=self._temp(v.code), raw=None, product=None)
                for v in (a, b)
            )
            var = self.fresh_name("k")
            a_k, b_k = (
                (
                    Val(f"{atom(v.code)}.select({v.axes.index(k)}, {var})", tuple(x for x in v.axes if x != k))
                    if k in v.axes
                    else v
                )
                for v in (a_once, b_once)
            )
            hoisted = len(self.lines)
            body = self._pair(a_k, b_k, summed - {k}, preferred)
            if len(self.lines) != hoisted:  # the body needed a temporary: it would sit outside the loop
                del self.lines[written:]
                continue
            if k in summed:
                return Val(f"sum({body.code} for {var} in range({size}))", body.axes)
            return Val(f"torch.stack([{body.code} for {var} in range({size})])", (k,) + body.axes)
        return None

    def _matmul(self, a: Val, b: Val, k: sympy.Symbol, preferred: Axes) -> Val:
        """``a @ b`` over ``k`` with transposes (matrix or vector on either side)."""
        free_a = [x for x in a.axes if x != k]
        free_b = [x for x in b.axes if x != k]
        if free_a and free_b and free_a[0] in preferred and free_b[0] in preferred:
            if preferred.index(free_a[0]) > preferred.index(free_b[0]):
                a, b, free_a, free_b = b, a, free_b, free_a
        left = a.code if len(a.axes) == 1 or a.axes[-1] == k else f"{atom(a.code)}.T"
        right = b.code if len(b.axes) == 1 or b.axes[0] == k else f"{atom(b.code)}.T"
        product = (atom(left), atom(right)) if len(a.axes) == len(b.axes) == 2 else None
        return Val(f"{atom(left)} @ {atom(right)}", tuple(free_a + free_b), product=product)

    def _einsum(self, a: Val, b: Val, summed: frozenset[sympy.Symbol], preferred: Axes) -> Val:
        out = [x for x in dict.fromkeys(a.axes + b.axes) if x not in summed]
        out.sort(key=lambda x: preferred.index(x) if x in preferred else len(preferred))
        letters = {s: chr(ord("a") + n) for n, s in enumerate(dict.fromkeys(a.axes + b.axes))}
        spec = (
            f"{''.join(letters[x] for x in a.axes)},{''.join(letters[x] for x in b.axes)}"
            f"->{''.join(letters[x] for x in out)}"
        )
        return Val(f'torch.einsum("{spec}", {a.code}, {b.code})', tuple(out))

    def _scatter(self, body: sympy.Expr, indices: list[sympy.Symbol]) -> Val | None:
        """``Σ_S f[B, S, R] δ(v, idx[B, S])``: ``f`` added into position ``idx`` along ``v``, no one-hot.

        With every index of ``idx`` summed (an embedding's backward) this is ``index_add_`` over
        the flattened index; with some shared by the result (``B``, a gather that keeps a batch
        dim) it is ``scatter_add_`` along ``v``. Summed indices ``idx`` lacks are summed out of
        ``f`` first, and an ``f`` constant along some of them is broadcast (``Σ_n δ(v, idx[n])``
        counts).
        """
        for f in sympy.Mul.make_args(body):
            if not isinstance(f, sympy.KroneckerDelta):
                continue
            for pick, v in (f.args, f.args[::-1]):
                argmax = isinstance(pick, ArgMax)  # a max's position, routed like a gathered one
                if not (is_index(v) and v not in indices and (argmax or self._gathered_position(pick))):
                    continue
                lead = () if argmax else tuple(entry_indices(pick.args[0] if isinstance(pick, Flat) else pick))
                if argmax or not all(is_index(i) for i in lead):  # a gather of a gather, idx[jdx[m, d]]: its axes
                    lead = self.lower(pick).axes
                summed = tuple(i for i in lead if i in indices)
                if not all(is_index(i) for i in lead) or not summed or len(set(lead)) != len(lead):
                    continue
                rest_expr = substitute_indices(body / f, {v: pick})  # f(v)·δ(v, p) = f(p)·δ(v, p)
                split = self._scatter_first(body / f, f, (v, pick), indices, summed)
                if split is not None:
                    return self.lower(split)
                for k in [i for i in indices if i not in lead]:
                    rest_expr = ISum(rest_expr, k)
                rest = self.lower(rest_expr)
                if v in rest.axes:
                    continue
                batch = tuple(i for i in lead if i not in indices)
                other = tuple(a for a in rest.axes if a not in lead)
                return self._scatter_add(pick, v, rest, rest_expr, batch, summed, other)
        return None

    def _scatter_then_fold(self, body: sympy.Expr, indices: list[sympy.Symbol]) -> Val | None:
        """``Σ_{S,k} A[S]·w[k]·δ(v, p[S] + k)``: windows read at gathered positions (``take`` of a
        pooled tensor) scatter ``A`` to ``p`` first, then add the windows back (``_fold``): one index
        per entry of ``A``, not one per entry and offset (``K`` times ``A``'s size)."""
        summed = set(indices)
        for f, pick, v in _routes(body):
            if v in summed or not isinstance(pick, sympy.Add):
                continue
            terms = sympy.Add.make_args(pick)
            at = [t for t in terms if self._position(t) or self._gathered_position(t)]
            moving = {i for t in terms if t not in at for i in free_indices(t)}
            if len(at) != 1 or not moving <= summed or moving & free_indices(at[0]):
                continue
            if not free_indices(at[0]) & (summed - moving):
                continue  # one position per result entry (a max's): put there, no scatter to sum
            if any(t.as_coeff_Mul()[1] == 1 or not is_index(t.as_coeff_Mul()[1]) for t in terms if t not in at):
                continue  # a constant shift (a padding's) would read before the start: not a window
            dim = dim_of(at[0].var) if isinstance(at[0], ArgMax) else self.positions.get(entry_name(at[0]))
            factors = sympy.Mul.make_args(body / f)
            if dim is None or dim.parts or any(v in free_indices(g) for g in factors):
                continue
            along = [g for g in factors if free_indices(g) & moving]
            scattered_part = [g for g in factors if not free_indices(g) & moving]
            if any(free_indices(g) & (summed - moving) for g in along):
                continue  # a factor of an offset and a scattered entry at once: no split
            q = fresh_index(dim, set(free_indices(body)) | set(bound_indices(body)) | summed | {v})
            inner = [i for i in indices if i not in moving]
            named = self._named(_summed(sympy.Mul(*scattered_part) * sympy.KroneckerDelta(q, at[0]), inner), "s")
            if named is None:
                continue
            folded = sympy.Mul(*along) * named * sympy.KroneckerDelta(v, pick.xreplace({at[0]: q}))
            return self.lower(_summed(folded, [i for i in indices if i in moving] + [q]))
        return None

    def _scatter_shifted(self, body: sympy.Expr, indices: list[sympy.Symbol]) -> Val | None:
        """``Σ_S f[B, S] δ(v, t + argmax[B, S])``: a max pool's values added back where each window's
        maximum was read (its window's start plus the argmax), one ``scatter_add_``, no window-sized
        buffer. Positions a padding added fall outside ``v``: the scatter runs on the padded length
        and keeps ``v``'s part."""
        for f, pick, v in _routes(body):
            if v in indices or not isinstance(pick, sympy.Add):
                continue
            bounds = _position_bounds(pick, self.positions)
            rest_expr = body / f
            if bounds is None or v in free_indices(rest_expr):
                continue
            lead = tuple(sorted(free_indices(pick), key=str))
            summed = tuple(i for i in lead if i in indices)
            if not summed:
                continue
            for k in [i for i in indices if i not in lead]:
                rest_expr = ISum(rest_expr, k)
            rest = self.lower(rest_expr)
            batch = tuple(i for i in lead if i not in indices)
            other = tuple(a for a in rest.axes if a not in lead)
            low, length = _span(pick, v, self.positions)
            padded = self._scatter_add(pick - low, v, rest, rest_expr, batch, summed, other, length)
            if low == 0 and length == size_code(dim_of(v).size):
                return padded
            axis = padded.axes.index(v)
            code = f"{atom(padded.code)}.narrow({axis}, {size_code(-low)}, {size_code(dim_of(v).size)})"
            return Val(code, padded.axes)
        return None

    def _gathered_position(self, e: sympy.Expr) -> bool:
        """An integer input's entry, or one coordinate of it in a flattened dim (``idx[n].1``)."""
        if isinstance(e, Flat):
            e = e.args[0]
        return is_entry(e) and self.layouts[entry_name(e)].is_int

    def _scatter_first(
        self,
        rest: sympy.Expr,
        delta: sympy.KroneckerDelta,
        route: tuple[sympy.Symbol, sympy.Expr],
        indices: list[sympy.Symbol],
        summed: Axes,
    ) -> sympy.Expr | None:
        """``Σ_{k,m} A[m]·B[k, m]·δ(v, idx[k])`` as ``Σ_m A[m]·(Σ_k B[k, m]·δ(v, idx[k]))`` when summing
        ``m`` before the scatter would make a value no forward tensor is as large as (``A`` and ``B``
        meeting over ``k``), or would read a factor of ``v`` at ``idx[k]`` into a copy that large
        (``Σ_{k,n} A[k, n]·w[n, v]·δ(v, idx[k])``: ``w`` is read at ``v`` after ``A`` is scattered)."""
        v, pick = route
        factors = sympy.Mul.make_args(rest)
        at_pick = [substitute_indices(g, {v: pick}) for g in factors]  # what the scatter would read
        before = free_indices(sympy.Mul(*at_pick)) - (set(indices) - set(summed))
        copies = [g for g in at_pick if self._gathers(g) and not self._fits_named(frozenset(free_indices(g)))]
        if self._fits_named(frozenset(before)) and not copies:
            return None
        result = free_indices(rest) - set(indices) - {v}
        # the factors that read a scattered index; else those of them that read no result index, the
        # indices they share with the others kept as axes of the scatter (Σ_{j,k} dout[j, k]·y[d, k]·
        # δ(n, idx[j, k]) scatters dout alone into [N, K], then one matmul with y)
        reads = [g for g in factors if free_indices(g) & set(summed)]
        keeps = [g for g in reads if not free_indices(g) & result]
        for inner in [reads] if len(reads) < len(factors) else [keeps]:
            outer = [g for g in factors if not any(g is f for f in inner)]
            over = [k for k in summed if not any(k in free_indices(g) for g in outer)]
            if not outer or not inner or not over:
                continue
            inside = [substitute_indices(g, {v: pick}) for g in inner]
            scattered = ISum(sympy.Mul(*inside) * delta, over[0])
            for k in over[1:]:
                scattered = ISum(scattered, k)
            if not self._admissible(frozenset(free_indices(scattered))):
                continue
            val = self.lower(scattered)  # named, so the outer sum cannot merge it back (flatten_sums)
            name = val.code if val.code.isidentifier() else self._temp(val.code, "s")
            self.layouts[name] = TensorInfo(name, tuple(dim_of(a) for a in val.axes))
            body: sympy.Expr = sympy.Mul(*outer) * entry(name, val.axes)
            for k in [i for i in indices if i not in over]:
                body = ISum(body, k)
            return body
        return None

    def _fold(self, body: sympy.Expr, indices: list[sympy.Symbol]) -> Val | None:
        """``Σ_{t,k} f[t, k, R] δ(v, 2*t + k)``: each window's values added back at the positions
        they were read from (col2im), no one-hot: a strided add of a view per offset ``k``
        (``_add_windows``) for ``t*step + k*dilation``, else one ``index_add_`` along ``v``."""
        summed = set(indices)
        several = self._fold_windows(body, indices)
        if several is not None:
            return several
        for f in sympy.Mul.make_args(body):
            if not isinstance(f, sympy.KroneckerDelta):
                continue
            for pick, v in (f.args, f.args[::-1]):
                if not (is_index(v) and v not in summed and is_window_index(pick) and free_indices(pick) <= summed):
                    continue
                lead = tuple(sorted(free_indices(pick), key=str))
                rest_expr = body / f
                for k in [i for i in indices if i not in lead]:
                    rest_expr = ISum(rest_expr, k)
                rest = self.lower(rest_expr)
                if v in rest.axes:
                    continue
                missing = tuple(i for i in lead if i not in rest.axes)
                if missing:  # constant along some window indices: each window position gets it (a count)
                    axes = rest.axes + missing
                    full = ", ".join(size_code(dim_of(a).size) for a in axes)
                    if not rest.axes and not tensor_names(rest_expr):  # a number: no tensor to expand
                        code = f"torch.full(({full},), {rest.code}, dtype={self.ref}.dtype, device={self.ref}.device)"
                    else:
                        code = f"{atom(self.align(rest, axes, strip=False))}.expand({full})"
                    rest = Val(code, axes)
                pos = min(rest.axes.index(i) for i in lead)
                others = [a for a in rest.axes if a not in lead]
                sizes = [size_code(dim_of(a).size) for a in others]
                strided = _strided_windows(pick, lead)
                if strided is not None and len(strided[1]) == 1:  # a strided add of a view per offset
                    (at, step), ((offset, dilation),) = strided
                    order = tuple(others[:pos]) + (at,) + tuple(others[pos:]) + (offset,)
                    shape = shape_tuple(sizes[:pos] + [size_code(dim_of(v).size)] + sizes[pos:])
                    factors = self._offset_factors(rest_expr, offset, set(rest.axes)) if not missing else None
                    src = ", ".join(self.align(f, order, strip=False) for f in factors or [rest])
                    count = size_code(dim_of(offset).size)
                    code = (
                        f"_add_windows({self.ref}.new_zeros({shape}), (({pos}, {step}, {dilation}, {count}),), {src})"
                    )
                    return Val(code, tuple(others[:pos]) + (v,) + tuple(others[pos:]))
                order = tuple(others[:pos]) + lead + tuple(others[pos:])
                src = f"{atom(self.align(rest, order, strip=False))}.reshape({', '.join(sizes[:pos] + ['-1'] + sizes[pos:])})"
                where = f"{atom(self.align(self.lower(pick), lead, strip=False))}.reshape(-1)"
                shape = shape_tuple(sizes[:pos] + [size_code(dim_of(v).size)] + sizes[pos:])
                code = f"{self.ref}.new_zeros({shape}).index_add_({pos}, {where}, {src})"
                return Val(code, tuple(others[:pos]) + (v,) + tuple(others[pos:]))
        return None

    def _fold_windows(self, body: sympy.Expr, indices: list[sympy.Symbol]) -> Val | None:
        """``Σ f[i, j, kh, kw, R] δ(h, i + kh) δ(w, j + kw)``: windows along several dims (a 2-D
        pool's or depthwise conv's) added back at once, one strided add of a view per pair of
        offsets (``_add_windows``), where one dim at a time made the first dims' windows whole."""
        summed = set(indices)
        windows: list[tuple[sympy.KroneckerDelta, sympy.Symbol, tuple, tuple]] = []
        for f in sympy.Mul.make_args(body):
            if not isinstance(f, sympy.KroneckerDelta):
                continue
            for pick, v in (f.args, f.args[::-1]):
                lead = tuple(sorted(free_indices(pick), key=str))
                if is_index(v) and v not in summed and is_window_index(pick) and set(lead) <= summed:
                    strided = _strided_windows(pick, lead)
                    if strided is not None:
                        windows.append((f, v, *strided))
                        break
        used = [i for _, _, at, offsets in windows for i in (at[0], *(k for k, _ in offsets))]
        several = len(windows) > 1 or any(len(offsets) > 1 for *_, offsets in windows)
        if not several or len(set(used)) != len(used) or len({v for _, v, _, _ in windows}) != len(windows):
            return None
        rest_expr = body / sympy.Mul(*(f for f, _, _, _ in windows))
        for k in [i for i in indices if i not in used]:
            rest_expr = ISum(rest_expr, k)
        looped = [(v, at, k, dilation) for _, v, at, offsets in windows for k, dilation in offsets]
        offsets = {k for _, _, k, _ in looped}
        factors = self._offset_factors(rest_expr, offsets, free_indices(rest_expr))
        vals = factors or [self.lower(rest_expr)]
        ordered = list(dict.fromkeys(a for f in vals for a in f.axes if a not in offsets))
        if not set(used) - offsets <= set(ordered) or {v for _, v, _, _ in windows} & set(ordered):
            return None
        at_of = {at[0]: v for _, v, at, _ in windows}
        out_axes = tuple(at_of.get(a, a) for a in ordered)
        order = tuple(ordered) + tuple(k for _, _, k, _ in looped)
        spec = ", ".join(
            f"({out_axes.index(v)}, {at[1]}, {dilation}, {size_code(dim_of(k).size)})" for v, at, k, dilation in looped
        )
        src = ", ".join(self.align(f, order, strip=False) for f in vals)
        shape = shape_tuple([size_code(dim_of(a).size) for a in out_axes])
        return Val(f"_add_windows({self.ref}.new_zeros({shape}), ({spec},), {src})", out_axes)

    def _offset_factors(
        self, e: sympy.Expr, offset: sympy.Symbol | set[sympy.Symbol], axes: set[sympy.Symbol]
    ) -> list[Val] | None:
        """A window's values ``e`` as the factor free of its ``offset`` times the factor along it
        (``dout[t]·w[k]``), each lowered apart, so the windows are added back one offset at a time and
        never made whole; None when ``e`` is not such a product (a sum, or every factor along ``offset``).
        Together the two factors still span ``axes``, so the windows keep their shape."""
        if isinstance(e, ISum) or not isinstance(e, sympy.Mul):
            return None
        offsets = offset if isinstance(offset, set) else {offset}
        along = [f for f in e.args if offsets & free_indices(f)]
        free = [f for f in e.args if not offsets & free_indices(f)]
        if not along or not free or not any(free_indices(f) for f in free):
            return None
        vals = [self.lower(sympy.Mul(*free)), self.lower(sympy.Mul(*along))]
        if set(vals[0].axes) | set(vals[1].axes) != axes:
            return None
        return vals

    def _index_put(self, body: sympy.Expr, indices: list[sympy.Symbol], preferred: Axes = ()) -> Val | None:
        """``Σ_S f[S, R] δ(v1, p1[S, B]) δ(v2, p2[S, B])…``: ``f`` added at positions ``(p1, p2, …)``.

        Two or more deltas route one summed entry to one position along several result dims (a
        gather of a gather: ``x[jdx, idx[jdx]]``; an argmax at gathered positions); one
        ``index_put_(..., accumulate=True)`` adds them all, with no one-hot over any pair of dims.
        A result dim ``B`` a position also depends on is indexed by its own ``arange``.
        """
        summed = set(indices)
        free = free_indices(body)
        routes: list[tuple[sympy.KroneckerDelta, sympy.Expr, sympy.Symbol]] = []
        for f in sympy.Mul.make_args(body):
            if not isinstance(f, sympy.KroneckerDelta):
                continue
            for pick, v in (f.args, f.args[::-1]):
                if not is_index(v) or v in summed or is_index(pick) or v in [r[2] for r in routes]:
                    continue
                if not free_indices(pick) & summed or v in free_indices(pick):
                    continue
                if (
                    isinstance(pick, ArgMax)
                    or self._gathered_position(pick)  # idx[m, d], or one coordinate of it, idx[m, d].1
                    or is_window_index(pick)  # a window's position, 2*t + k: routed like a gathered one
                    or _position_bounds(pick, self.positions) is not None  # a pooled maximum's, t + argmax
                ):
                    routes.append((f, pick, v))
                    break
        if len(routes) < 2 or all(is_window_index(pick) for _, pick, _ in routes):
            return None
        first = self._route_first(body, indices, routes)
        if first is not None:
            return first
        targets = tuple(v for _, _, v in routes)
        # a position read at another target (δ(m, argmax[d])·δ(n, idx[m, d])): that target's position
        known = {v: pick for _, pick, v in routes if not free_indices(pick) & set(targets)}
        routes = [(f, substitute_indices(pick, known) if v not in known else pick, v) for f, pick, v in routes]
        batch = tuple(dict.fromkeys(i for _, pick, _ in routes for i in sorted(free_indices(pick) - summed, key=str)))
        if set(batch) & set(targets) or not set(batch) <= free - set(targets):
            return None
        # f(v)·δ(v, p) = f(p)·δ(v, p): what the routed entry reads along a target, it reads at the position
        rest_expr = substitute_indices(body / sympy.Mul(*(f for f, _, _ in routes)), {v: p for _, p, v in routes})
        lead = tuple(dict.fromkeys(i for _, pick, _ in routes for i in sorted(free_indices(pick), key=str)))
        for k in [i for i in indices if i not in lead]:
            rest_expr = ISum(rest_expr, k)
        rest = self.lower(rest_expr)
        if set(targets) & set(rest.axes):
            return None
        other = tuple(a for a in rest.axes if a not in lead)
        # the values in their own layout (no copy), each position computed in it too
        full = tuple(rest.axes) + tuple(a for a in lead if a not in rest.axes)
        sizes = [size_code(dim_of(a).size) for a in full]
        if rest.axes:
            src = self.align(rest, full, strip=False)
            if not set(lead) <= set(rest.axes):
                src = f"{atom(src)}.expand{shape_tuple(sizes)}"
        else:
            src = f"torch.full({shape_tuple(sizes)}, {rest.code}, dtype={self.ref}.dtype, device={self.ref}.device)"
        # a position t + argmax may fall outside its target (or short of its end): a longer one, cut after
        spans = [_span(pick, v, self.positions) for _, pick, v in routes]
        # the buffer: one axis per target (its span), batch and other axis, in the order its reader wants
        axes = [
            (v, length, self.align(self.lower(pick - low), full, strip=False), low)
            for (_, pick, v), (low, length) in zip(routes, spans)
        ]
        for b in batch + other:
            rng = f"torch.arange({size_code(dim_of(b).size)}, device={self.ref}.device)"
            axes.append((b, size_code(dim_of(b).size), self.align(Val(rng, (b,)), full, strip=False), None))
        if {a for a, *_ in axes} <= set(preferred):
            axes.sort(key=lambda axis: preferred.index(axis[0]))
        lengths = [length for _, length, _, _ in axes]
        zeros = f"{self.ref}.new_zeros({shape_tuple(lengths)})"
        if self._admissible(frozenset(full)):
            # one flat position per entry: put_ adds along one index, where index_put_ with an index per
            # axis ran about 5x slower on a CPU; the aranges first, so their sum broadcasts small
            strides = ["*".join(atom(n) for n in lengths[k + 1 :]) for k in range(len(lengths))]
            flat = [f"{atom(c)} * {atom(stride)}" if stride else c for (_, _, c, _), stride in zip(axes, strides)]
            flat = sorted(flat, key=lambda term: term.startswith("torch.arange"), reverse=True)
            code = f"{zeros}.put_({' + '.join(flat)}, {src}, accumulate=True)"
        else:  # the flat positions would outgrow the forward: index_put_ broadcasts one index per axis
            code = f"{zeros}.index_put_(({', '.join(c for _, _, c, _ in axes)},), {src}, accumulate=True)"
        for axis, (v, length, _, low) in enumerate(axes):
            if low is not None and (length != size_code(dim_of(v).size) or low != 0):
                code = f"{code}.narrow({axis}, {size_code(-low)}, {size_code(dim_of(v).size)})"
        return Val(code, tuple(a for a, *_ in axes))

    def _route_first(
        self,
        body: sympy.Expr,
        indices: list[sympy.Symbol],
        routes: list[tuple[sympy.KroneckerDelta, sympy.Expr, sympy.Symbol]],
    ) -> Val | None:
        """One route's values scattered alone first, where all the routes' entries at once would
        outgrow every forward tensor: ``Σ_{k,j,n} c[k, n]·y[j]·δ(d, idx[k])·δ(p, j + n)`` scatters
        ``c`` over ``k`` into ``[D, N]``, then adds the windows back (not a ``[K, J, N]`` source).
        The route's position reads summed indices no other route's does; the scattered values keep the
        other indices they read as axes (``n`` above)."""
        summed = set(indices)
        lead = set().union(*(free_indices(pick) for _, pick, _ in routes))
        factors = [f for f in sympy.Mul.make_args(body) if not any(f is r[0] for r in routes)]
        if self._fits_named(frozenset(free_indices(sympy.Mul(*factors)) - (summed - lead))):
            return None
        for delta, pick, v in routes:
            own = free_indices(pick) & summed
            elsewhere = set().union(*(free_indices(p) for _, p, w in routes if w != v))
            inner = [g for g in factors if free_indices(g) & own]
            if not own or own & elsewhere or not inner:
                continue
            scattered = sympy.Mul(*inner) * delta
            for k in sorted(own, key=str):
                scattered = ISum(scattered, k)
            named = self._named(scattered, "s")
            if named is None:
                continue
            rest = sympy.Mul(*(g for g in factors if not any(g is f for f in inner)), named)
            rest *= sympy.Mul(*(d for d, _, w in routes if w != v))
            return self.lower(_summed(rest, [i for i in indices if i not in own]))
        return None

    def _scatter_add(
        self,
        pick: sympy.Expr,
        v: sympy.Symbol,
        rest: Val,
        rest_expr: sympy.Expr,
        batch: Axes,
        summed: Axes,
        other: Axes,
        length: str | None = None,
    ) -> Val:
        """``rest`` added at positions ``pick`` along ``v`` (``length`` positions, code; ``v``'s size by default)."""

        def sizes(axes: Axes) -> list[str]:
            return [size_code(dim_of(a).size) for a in axes]

        order = batch + summed + other
        index = self.lower(pick)
        if not set(batch + summed) <= set(rest.axes) and not self._admissible(frozenset(order)):
            # the source would be copied out to every position it is added at, larger than any forward
            # tensor: index_put_ broadcasts the positions and the values instead
            return self._put_broadcast(index, v, rest, not tensor_names(rest_expr), batch, summed, other)
        if not rest.axes and not tensor_names(rest_expr):
            src = f"torch.full({shape_tuple(sizes(order))}, {rest.code}, dtype={self.ref}.dtype, device={self.ref}.device)"
        else:
            src = self.align(rest, order, strip=False) if rest.axes else rest.code
            if not set(batch + summed) <= set(rest.axes):
                src = f"{atom(src)}.expand{shape_tuple(sizes(order))}"
        along = size_code(dim_of(v).size) if length is None else length
        zeros = f"{self.ref}.new_zeros({shape_tuple(sizes(batch) + [along] + sizes(other))})"
        if not batch:  # every index of idx summed: index_add_ over its flattened entries
            flat_src = f"{atom(src)}.reshape({', '.join(['-1'] + sizes(other))})"
            where = f"{atom(self.align(index, summed, strip=False))}.reshape(-1)"
            return Val(f"{zeros}.index_add_(0, {where}, {flat_src})", (v,) + other)
        idx = f"{atom(self.align(index, batch + summed, strip=False))}.reshape({', '.join(sizes(batch) + ['-1'])})"
        if other:
            idx = f"{idx}[{', '.join([':'] * (len(batch) + 1) + ['None'] * len(other))}].expand({', '.join(sizes(batch) + ['-1'] + sizes(other))})"
        flat_src = f"{atom(src)}.reshape({', '.join(sizes(batch) + ['-1'] + sizes(other))})"
        return Val(f"{zeros}.scatter_add_({len(batch)}, {idx}, {flat_src})", batch + (v,) + other)

    def _put_broadcast(
        self, index: Val, v: sympy.Symbol, rest: Val, constant: bool, batch: Axes, summed: Axes, other: Axes
    ) -> Val:
        """``out[B, index[B, S], R] += rest[B, S, R]`` by one ``index_put_`` whose positions and values
        broadcast over ``(B, S, R)``: nothing the size of that space is made."""
        space = batch + summed + other

        def arange(a: sympy.Symbol) -> str:
            rng = f"torch.arange({size_code(dim_of(a).size)}, device={self.ref}.device)"
            return self.align(Val(rng, (a,)), space, strip=False)

        positions = [arange(b) for b in batch] + [self.align(index, space, strip=False)] + [arange(o) for o in other]
        if rest.axes:
            values = self.align(rest, space, strip=False)
        elif constant:
            values = f"torch.full((), {rest.code}, dtype={self.ref}.dtype, device={self.ref}.device)"
        else:
            values = rest.code
        shape = shape_tuple([size_code(dim_of(a).size) for a in batch + (v,) + other])
        code = f"{self.ref}.new_zeros({shape}).index_put_(({', '.join(positions)},), {values}, accumulate=True)"
        return Val(code, batch + (v,) + other)

    def _max(self, e: IMax) -> Val:
        if e.var not in free_indices(e.body):  # the max along a dim of a value constant along it
            return self.lower(e.body)
        gathered = self._max_at_positions(e)
        if gathered is not None:
            return gathered
        call = self._max_call(e)
        return Val(f"{call.code}.values", call.axes)

    def _max_at_positions(self, e: IMax | ArgMax) -> Val | None:
        """``max_k x[n, k, p(n, d)]`` (or its argmax), read at gathered positions: the max at every
        position (the forward's size), then gathered at ``p``; never the max of a gathered copy of ``x``."""
        for leaf in sympy.preorder_traversal(e.body):
            if not is_entry(leaf):
                continue
            info = self.layouts[entry_name(leaf)]
            for d, p in zip(info.dims, entry_indices(leaf)):
                if is_index(p) or e.var in free_indices(p) or not free_indices(p):
                    continue
                if not free_indices(p) <= free_indices(e):
                    continue  # a position that reads an index summed inside the body (Σ_m x[idx[d, m], k])
                if (isinstance(p, Flat) and is_index(p.args[0])) or _plain_pack(p):
                    continue  # a part of a flattened index, or (d, k) in one (a reshape), not a gather
                k = fresh_index(d, free_indices(e) | bound_indices(e) | {e.var})
                inner = self.lower(type(e)(e.body.xreplace({p: k}), e.var))
                if k not in inner.axes:
                    return None
                name = inner.code if inner.code.isidentifier() else self._temp(inner.code)
                return self._gather(name, [p if a == k else a for a in inner.axes], inner.is_int)
        return None

    def _argmax(self, e: ArgMax) -> Val:
        gathered = self._max_at_positions(e)
        if gathered is not None:
            return gathered
        # the index PyTorch's max(dim) picks at a tie: the one autograd routes the gradient to
        call = self._max_call(e)
        return Val(f"{call.code}.indices", call.axes, True)

    def _max_call(self, e: IMax | ArgMax) -> Val:
        """``body.max(axis)`` computed once for a max and its argmax (values and indices).

        Cached under its own key: the max's value (``.values``) is cached under the ``IMax`` itself.
        """
        call = _MaxCall(IMax(e.body, e.var))
        # (a key sees no binder inside a call: the max's own index is named in it as any max of this
        # body over this dim would name it, the first of its dim the body does not use)
        own = fresh_index(dim_of(e.var), (free_indices(e.body) | bound_indices(e.body)) - {e.var})
        key = _MaxCall(IMax(e.body.xreplace({e.var: own}), own))
        return self._cached(call, lambda call: self._max_values_and_indices(call.args[0]), key)

    def _max_values_and_indices(self, e: IMax) -> Val:
        if dim_of(e.var).parts and _reads_by_part(e.body, e.var):
            return self._max_over_parts(e)
        body = self.lower(e.body)
        if e.var not in body.axes:  # constant along the max's dim (max_d x - max_d x is 0): broadcast it there
            axes = body.axes + (e.var,)
            sizes = shape_tuple([size_code(dim_of(a).size) for a in axes])
            if body.axes:
                body = Val(f"{atom(self.align(body, axes, strip=False))}.expand{sizes}", axes)
            else:
                body = Val(f"torch.full({sizes}, {body.code}, dtype={self.ref}.dtype, device={self.ref}.device)", axes)
        axis = body.axes.index(e.var)
        return Val(f"{atom(body.code)}.max({axis})", tuple(a for a in body.axes if a != e.var))

    def _max_over_parts(self, e: IMax) -> Val:
        """A max over a flattened dim whose body reads its parts apart (``max_nd y[nd.0, k]·x[nd, k]``):
        the body over the parts, broadcast to their sizes and viewed as one axis, then the max."""
        parts = fresh_indices(dim_of(e.var).parts, free_indices(e.body) | bound_indices(e.body) | {e.var})
        body = self.lower(substitute_indices(e.body, {e.var: Pack(*parts)}))
        rest = tuple(a for a in body.axes if a not in parts)
        order = rest + tuple(parts)
        sizes = [size_code(dim_of(a).size) for a in order]
        flat = f"{atom(self.align(body, order, strip=False))}.expand({', '.join(sizes)})"
        code = f"{flat}.reshape({', '.join(sizes[: len(rest)] + ['-1'])}).max({len(rest)})"
        return Val(code, rest)

    def _delta(self, e: sympy.KroneckerDelta) -> Val:
        a, b = e.args
        if is_index(a) and is_index(b):
            rows, cols = size_code(dim_of(a).size), size_code(dim_of(b).size)
            size = rows if rows == cols else f"{rows}, {cols}"  # a padded dim is longer: eye(D, D + 4)
            return Val(f"torch.eye({size}, dtype={self.ref}.dtype, device={self.ref}.device)", (a, b))
        pick, v = (a, b) if is_index(b) or _plain_pack(b) else (b, a)
        if not (is_index(v) or _plain_pack(v)):
            raise OpDefinitionError(f"cannot lower {e}")
        val = self.lower(pick)
        parts = tuple(v.args) if isinstance(v, Pack) else (v,)
        if set(parts) & set(val.axes):
            raise OpDefinitionError(f"cannot lower {e}")
        # a one-hot row per index, built by scatter (no data-dependent size checks, compile-friendly);
        # a position in a flattened dim (a max over it, pinned by parts one of which is summed) is a
        # one-hot over the flattened axis, then viewed with its parts as axes
        lead = [size_code(dim_of(a).size) for a in val.axes]
        flat = size_code(sympy.Mul(*(dim_of(i).size for i in parts)))
        axis = len(val.axes)
        code = f"{self.ref}.new_zeros({shape_tuple(lead + [flat])}).scatter_({axis}, {atom(val.code)}.unsqueeze({axis}), 1.0)"
        if len(parts) > 1:
            code = f"{code}.reshape({', '.join(lead + [size_code(dim_of(i).size) for i in parts])})"
        return Val(code, val.axes + parts)

    def _elementwise(self, e: sympy.Expr, known: dict[str, Val] | None = None, want: Axes = ()) -> Val:
        scattered = self._scale_in_scatter(e) if isinstance(e, sympy.Mul) and not known else None
        if scattered is not None:
            return self.lower(scattered)
        put = self._values_at(e) if isinstance(e, sympy.Mul) and not known else None
        if put is not None:
            return put
        known = dict(known or {})
        if self.fuse_arithmetic:  # the fused backward (the forward and the chain keep the forms as written)
            e = saturated(e)
        e = self._share_within(_selects(_fold_piecewise(e), self.finite), known)
        leaves: list[tuple[sympy.Expr, Val]] = []
        stand_ins: dict[sympy.Expr, sympy.Expr] = {}
        for leaf in self._leaves(e):
            if leaf.is_Symbol and leaf.name in known:
                leaves.append((leaf, known[leaf.name]))
            elif costly(leaf) or is_step(leaf) or shareable(leaf):  # computed more than once: once, into a temporary
                stand_in = sympy.Symbol(f"__val_c{self.counter}")
                self.counter += 1
                c, value = (1, leaf) if costly(leaf) or is_step(leaf) else up_to_factor(leaf)  # (y - x is -(x - y))
                known[stand_in.name] = self._cached(value, self._elementwise)
                stand_ins[leaf] = c * stand_in
                leaves.append((stand_in, known[stand_in.name]))
            else:
                leaves.append((leaf, self.lower(leaf)))
        e = _replace_elementwise(e, stand_ins)
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
        stand_in_axes = {leaf: v.axes for leaf, v in leaves if leaf.is_Symbol}
        chained = self.fuse_arithmetic and _full_ops(e, set(axes), stand_in_axes) > 1
        mapping = {
            leaf: (
                _number(v)
                if v.constant
                else sympy.Symbol(atom(self.align(v, tuple(axes), strip=not want, raw=not chained)))
            )
            for leaf, v in leaves
        }
        reduced = e.xreplace(mapping)
        if reduced.is_number:  # shared values that cancel (t1 - t1): a constant, no axes
            return Val(self.printer.doprint(reduced), (), constant=True)
        alive = [leaf for leaf, _ in leaves if mapping[leaf] in reduced.free_symbols]
        if len(alive) < len(leaves) and set(axes) - {a for leaf, v in leaves if leaf in alive for a in v.axes}:
            # t1 - (x + t1) is -x: the axes only t1 had are gone, so lower what is left on its own
            back = {mapping[leaf]: leaf for leaf in alive}
            return self._elementwise(reduced.xreplace(back), known, want)
        leaf_axes = {mapping[leaf]: frozenset(v.axes) for leaf, v in leaves}
        with self.printer.reading(leaf_axes):  # (a product of masks starts with one of the whole size)
            if chained:  # the fused backward: one fresh buffer, updated in place
                code = inplace.chain(e.xreplace(mapping), leaf_axes, self.printer, inner=axes[-1] if axes else None)
            else:
                code = self.printer.doprint(e.xreplace(mapping))
        lone = e.xreplace(mapping)
        mask = (
            self.printer.float_mask(*lone.args) if isinstance(lone, sympy.Heaviside) and len(lone.args) == 2 else None
        )
        if mask is not None:  # a mask of its own (shared by two gradients): floats in one pass
            code = mask
        elif _only_steps(e):  # (x > 0) is bool, 2*(x > 0) an integer: a float for matmuls, scatters and sums
            code = f"{atom(code)}.to({self.ref}.dtype)"
        return Val(code, tuple(axes))

    def _share_within(self, e: sympy.Expr, known: dict[str, Val]) -> sympy.Expr:
        """``e`` with each value it computes twice (``x - y`` in ``|x - y|`` and ``sign(y - x)``)
        computed once, into a temporary that ``known`` holds under a stand-in symbol."""
        if not self.share:
            return e
        while (found := repeated_within(e)) is not None:
            value, occurrences = found
            stand_in = sympy.Symbol(f"__val_w{self.counter}")
            self.counter += 1
            if any(s.name.startswith("__val_") for s in value.free_symbols):  # (their axes are not in its key)
                val = self._elementwise(value, known)
                if not (val.constant or val.code.isidentifier()):
                    val = Val(self._temp(val.code), val.axes, val.is_int)
                    self.rank[val.code] = len(val.axes)
            else:  # through the memo: another formula may need it too
                val = self._cached(value, self._elementwise)
            known[stand_in.name] = val
            e = _replace_elementwise(e, {node: c * stand_in for node, c in occurrences.items()})
        return e

    def _leaves(self, e: sympy.Expr, top: bool = True) -> list[sympy.Expr]:
        """``e``'s value leaves, with the repeated costly sub-expressions below the top kept whole."""
        return _value_leaves(e, self.repeated, top)

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
            for leaf in self._leaves(x, top=False):
                out |= set(leaves[leaf].axes) if leaf in leaves else set(known[leaf.name].axes)
            return out

        def rewrite(node: sympy.Expr) -> sympy.Expr:
            if not isinstance(node, sympy.Mul):
                return node
            small = [f for f in node.args if axes_of(f) != full]
            big = [f for f in node.args if axes_of(f) == full]
            if not big or len(small) < 2 or not any(axes_of(f) or self._leaves(f, top=False) for f in small):
                return node  # (a product of constants alone stays a number in the expression)
            val = self._elementwise(sympy.Mul(*small), known)
            stand_in = sympy.Symbol(f"__val_{len(known)}_{self.counter}")
            self.counter += 1
            known[stand_in.name] = val
            return sympy.Mul(*big, stand_in)

        return _bottom_up_expr(e, rewrite)


@dataclass(frozen=True)
class _Ungather:
    """A sum's factors read at gathered positions, read whole instead: ``y[k, R]`` for ``y[p, R]``
    (``plain``), the positions by their fresh index ``k`` (``picks``), the other factors, the summed
    indices, and those of them the positions depend on (``by_sum``)."""

    plain: list[sympy.Expr]
    others: list[sympy.Expr]
    picks: dict[sympy.Symbol, sympy.Expr]
    by_sum: set[sympy.Symbol]
    indices: list[sympy.Symbol]


def _read_through(e: sympy.Expr, common: set[sympy.Expr], shared: sympy.Expr, stand_in: sympy.Symbol) -> sympy.Expr:
    """``e`` with ``shared`` (the product of ``common``) read from its stand-in in the terms that
    have every one of those factors; the other terms as they are. Never ``term / shared``: a value
    that may be 0 divides nothing (``Σ dact·x / Σ x`` was NaN where every x is 0)."""

    def read(term: sympy.Expr) -> sympy.Expr:
        return (term / shared) * stand_in if common <= set(sympy.Mul.make_args(term)) else term

    return sympy.Add(*(read(t) for t in sympy.Add.make_args(sympy.expand(e)))) if e != 0 else e


def _routes(body: sympy.Expr):
    """Each delta factor of ``body`` read both ways round, ``(delta, pick, v)`` with ``v`` an index:
    ``δ(v, pick)`` routes the entry at ``pick`` to ``v``."""
    for f in sympy.Mul.make_args(body):
        if isinstance(f, sympy.KroneckerDelta):
            for pick, v in (f.args, f.args[::-1]):
                if is_index(v):
                    yield f, pick, v


def _summed(e: sympy.Expr, indices: list[sympy.Symbol]) -> sympy.Expr:
    """``Σ_{i1} Σ_{i2} … e``: nested sums, the first index innermost."""
    for i in indices:
        e = ISum(e, i)
    return e


def _position_bounds(pick: sympy.Expr, positions: dict[str, Dim]) -> tuple[sympy.Expr, sympy.Expr] | None:
    """The lowest and highest value of ``t + argmax_j(...)`` (integer multiples of indices and of one
    or more argmaxes or kept positions, plus a number) from the dims' sizes; None for any other
    expression, or one without a position (a window's own, which ``_fold`` adds back)."""
    low, high, argmax = sympy.S.Zero, sympy.S.Zero, False
    for term in sympy.Add.make_args(pick):
        coeff, part = term.as_coeff_Mul()
        if not coeff.is_integer:
            return None
        if part == 1:
            low, high = low + coeff, high + coeff
            continue
        if is_index(part):
            top = dim_of(part).size - 1
        elif isinstance(part, ArgMax) and is_index(part.var):
            top, argmax = dim_of(part.var).size - 1, True
        elif is_entry(part) and entry_name(part) in positions and not positions[entry_name(part)].parts:
            top, argmax = positions[entry_name(part)].size - 1, True
        elif isinstance(part, Flat) and is_entry(part.args[0]) and entry_name(part.args[0]) in positions:
            parts = positions[entry_name(part.args[0])].parts  # idx[m].0: a coordinate in a flattened dim
            if not parts:
                return None
            top, argmax = parts[int(part.args[1])].size - 1, True
        else:
            return None
        low, high = (low, high + coeff * top) if coeff > 0 else (low + coeff * top, high)
    return (low, high) if argmax else None


def _span(pick: sympy.Expr, v: sympy.Symbol, positions: dict[str, Dim]) -> tuple[sympy.Expr, str]:
    """The lowest position ``pick`` takes and (code) a length along ``v`` from there that holds every
    position and all of ``v`` (a tail no window reads): ``v``'s size for any other position."""
    bounds = _position_bounds(pick, positions)
    if bounds is None:
        return sympy.S.Zero, size_code(dim_of(v).size)
    low, high = bounds
    need, whole = sympy.expand(high - low + 1), sympy.expand(dim_of(v).size - low)
    if need == whole or sympy.simplify(whole - need).is_nonnegative:
        return low, size_code(whole)
    return low, f"max({size_code(need)}, {size_code(whole)})"


def _plain_pack(i: sympy.Basic) -> bool:
    """Whether ``i`` is a position in a flattened dim given by distinct plain indices, ``(n, d)``."""
    return isinstance(i, Pack) and all(is_index(x) for x in i.args) and len(set(i.args)) == len(i.args)


def _resized(i: sympy.Basic, d: Dim) -> bool:
    """Whether a plain index reads a dim of another length (a padding's ``x[dp]``, its backward's ``dpad[d]``)."""
    if not is_index(i) or d.parts or (d.derived is None and dim_of(i).derived is None):
        return False  # only a window or padding changes a length (a rename's tie does not)
    have, want = dim_of(i).size, d.size
    return have != want and sympy.expand(have - want) != 0


@dataclass(frozen=True)
class _Window:
    """A window read ``step*positions + dilation*offsets`` along a dim: ``Tensor.unfold``'s pattern."""

    positions: sympy.Symbol
    offsets: sympy.Symbol
    step: int
    dilation: int

    @property
    def span(self) -> sympy.Expr:
        return self.dilation * (dim_of(self.offsets).size - 1) + 1

    @staticmethod
    def of(i: sympy.Expr, size: sympy.Expr) -> _Window | None:
        """The window an index reads along a dim of ``size``, when it reads one exactly as unfold does."""
        terms = [t.as_coeff_Mul() for t in sympy.Add.make_args(i)]
        if len(terms) != 2 or not all(c.is_Integer and c > 0 and is_index(x) for c, x in terms):
            return None
        pairs = sorted((terms, terms[::-1]), key=lambda pair: dim_of(pair[1][1]).fixed is None)  # offsets: a fixed dim
        for (step, p), (dilation, k) in pairs:
            w = _Window(p, k, int(step), int(dilation))
            count = sympy.floor((size - w.span) / sympy.Integer(w.step)) + 1
            if sympy.simplify(count - dim_of(p).size) == 0:
                return w
        return None


def _outer_sums(e: sympy.Expr) -> list[sympy.Symbol]:
    """The indices summed at the top of ``e`` (of each term, of each factor), not inside a body."""
    if isinstance(e, ISum):
        return flatten_sums(e)[0]
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return [i for a in e.args for i in _outer_sums(a)]
    return []


def _reads_by_part(e: sympy.Basic, var: sympy.Symbol) -> bool:
    """Whether ``e`` reads the flattened index ``var`` other than as whole runs ``x[var.0, var.1]``."""
    if isinstance(e, Flat) and e.args[0] == var:
        return True
    if not is_entry(e):
        return any(_reads_by_part(a, var) for a in e.args)
    idx, n, k = entry_indices(e), len(dim_of(var).parts), 0
    while k < len(idx):
        if idx[k] == Flat(var, 0) and tuple(idx[k : k + n]) == tuple(Flat(var, p) for p in range(n)):
            k += n  # the whole flattened index: a reshape of this tensor reads it
        elif _reads_by_part(idx[k], var):
            return True
        else:
            k += 1
    return False


def _split_flat_sums(e: sympy.Expr) -> sympy.Expr:
    """Each ``Σ_f body`` as ``Σ_t Σ_e body[f := (t, e)]`` where the body reads ``f`` a part at a time.

    A part alone (``m[f.0]``: a value broadcast along the other parts) has no axis of the
    flattened dim to stand on; over the parts, every read is a plain or packed index.
    """
    if not isinstance(e, sympy.Basic) or not e.args or is_entry(e):
        return e
    e = e.func(*(_split_flat_sums(a) for a in e.args))
    if not isinstance(e, ISum) or not dim_of(e.var).parts or not _reads_by_part(e.body, e.var):
        return e
    parts = fresh_indices(dim_of(e.var).parts, free_indices(e.body) | bound_indices(e.body) | {e.var})
    body = substitute_indices(e.body, {e.var: Pack(*parts)})
    for part in reversed(parts):
        body = ISum(body, part)
    return body


def _unflattened(e: sympy.Expr, target: TensorInfo) -> tuple[sympy.Expr, TensorInfo] | None:
    """``e`` and ``target`` with each flattened index that ``e`` reads by parts split into its parts."""
    split = [
        i
        for i in target.indices
        if dim_of(i).parts and any(isinstance(f, Flat) and f.args[0] == i for f in sympy.preorder_traversal(e))
    ]
    if not split:
        return None
    layout: list[Dim | None] = []
    for d in target.layout:
        layout += list(d.parts) if d is not None and d.index() in split else [d]
    named = [d for d in layout if d is not None]
    if len(set(named)) != len(named):
        return None  # a part is also a dim of its own in the target: keep the flattened axis
    info = TensorInfo(target.name, tuple(layout), target.is_int)
    parts = iter(info.indices)
    mapping = {}
    for d in target.layout:
        if d is None:
            continue
        mapping[d.index()] = Pack(*[next(parts) for _ in d.parts]) if d.index() in split else next(parts)
    return substitute_indices(e, mapping), info


def _packed_deltas(e: sympy.Expr) -> sympy.Expr:
    """``δ(n, p.0)·δ(d, p.1)`` as ``δ((n, d), p)``: a position ``p`` in a flattened dim, pinned as one."""

    def rewrite(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Mul):
            return node
        pins: dict[sympy.Expr, dict[int, tuple[sympy.Expr, sympy.Expr]]] = {}
        for f in node.args:
            if isinstance(f, sympy.KroneckerDelta):
                for a, b in (f.args, f.args[::-1]):
                    if is_index(a) and isinstance(b, Flat) and not is_index(b.args[0]):
                        pins.setdefault(b.args[0], {})[int(b.args[1])] = (a, f)
                        break
        for p, parts in pins.items():
            if len(parts) > 1 and sorted(parts) == list(range(len(parts))):
                used = {f for _, f in parts.values()}
                rest = [f for f in node.args if f not in used]
                packed = sympy.KroneckerDelta(Pack(*(parts[i][0] for i in range(len(parts)))), p)
                return sympy.Mul(*rest, packed)
        return node

    if not isinstance(e, sympy.Basic) or not e.args or is_entry(e):
        return e
    return rewrite(e.func(*(_packed_deltas(a) for a in e.args)))


def _reads_part_alone(idx: tuple[sympy.Basic, ...], flat: sympy.Symbol, parts: int) -> bool:
    """Whether ``idx`` reads a part of ``flat`` other than in a whole run ``flat.0, flat.1, ...`` (a reshape)."""
    run = tuple(Flat(flat, p) for p in range(parts))
    for k, i in enumerate(idx):
        start = k - int(i.args[1]) if isinstance(i, Flat) else 0
        if isinstance(i, Flat) and i.has(flat) and (start < 0 or tuple(idx[start : start + parts]) != run):
            return True
    return False


def _open_pinned(term: sympy.Expr, own: set[sympy.Symbol]) -> sympy.Expr:
    """``c·(a + δ((d, k), p)·h)`` as ``c·a + c·δ((d, k), p)·h`` when only part of the sum is pinned."""
    if not _pins_flat(term, own) or not isinstance(term, sympy.Mul):
        return term
    opened = sympy.expand_mul(term, deep=False)
    return opened if any(not _pins_flat(t, own) for t in sympy.Add.make_args(opened)) else term


def _pins_flat(term: sympy.Expr, own: set[sympy.Symbol]) -> bool:
    """Whether ``term`` has a delta pinning several of the target's indices (``own``) as one position, ``δ((d, k), p)``."""
    return any(
        isinstance(a, Pack) and len(a.args) > 1 and all(i in own for i in a.args)
        for delta in term.atoms(sympy.KroneckerDelta)
        for a in delta.args
    )


def _reflattened(e: sympy.Expr, target: TensorInfo) -> tuple[sympy.Expr, TensorInfo] | None:
    """``e`` and ``target`` with adjacent dims merged where ``e`` pins them as one, ``δ((t, e), p)``.

    A max over a flattened dim routes its gradient to one position of the flattened axis: the
    scatter happens there, and the result is then viewed with the parts as axes again.
    """
    for delta in sympy.preorder_traversal(e):
        if not isinstance(delta, sympy.KroneckerDelta):
            continue
        for packed in delta.args:
            if not isinstance(packed, Pack) or not all(is_index(i) for i in packed.args):
                continue
            dims = [dim_of(i) for i in packed.args]
            positions = [target.layout.index(d) if d in target.layout else -1 for d in dims]
            if -1 in positions or positions != list(range(positions[0], positions[0] + len(dims))):
                continue
            if tuple(packed.args) != tuple(d.index() for d in dims):
                continue
            merged = Dim("".join(d.name for d in dims), parts=tuple(dims))
            layout = target.layout[: positions[0]] + (merged,) + target.layout[positions[-1] + 1 :]
            flat = merged.index()
            mapping = {d.index(): Flat(flat, p) for p, d in enumerate(dims)}
            merged_e = substitute_indices(e, mapping)
            if any(
                (isinstance(x, Pack) and x.has(flat))
                or (isinstance(x, sympy.KroneckerDelta) and any(isinstance(a, Flat) and a.has(flat) for a in x.args))
                or (is_entry(x) and _reads_part_alone(entry_indices(x), flat, len(dims)))
                for x in sympy.preorder_traversal(merged_e)
            ):  # a part also pinned alone or with a summed index, δ(d, argmax[n, k]), or read alone
                return None  # by another term (w[d]·dout[n, k]): one-hots instead
            return merged_e, TensorInfo(target.name, layout, target.is_int)
    return None


def _fold_piecewise(e: sympy.Expr) -> sympy.Expr:
    """``dout·Piecewise((1, c), (slope, True))`` as ``Piecewise((dout, c), (slope·dout, True))``.

    A piecewise with a branch of a plain number prints as ``torch.where`` of a Python float, whose
    dtype is the default one; folding the product into the branches keeps the tensor's dtype,
    costs no pass more, and leaves two tensor values that may select by a lerp (:func:`_selects`).
    """

    def constant_valued(f: sympy.Basic) -> bool:
        return isinstance(f, sympy.Piecewise) and any(not tensor_names(v) for v, _ in f.args)

    def fold(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Mul):
            return node
        pieces = [f for f in node.args if constant_valued(f)]
        if len(pieces) != 1:
            return node
        rest = sympy.Mul(*(f for f in node.args if f is not pieces[0]))
        return sympy.Piecewise(*((rest * v, c) for v, c in pieces[0].args))

    if not e.has(sympy.Piecewise):
        return e
    return _bottom_up_expr(e, fold)


def _selects(e: sympy.Expr, finite: Finite | None) -> sympy.Expr:
    """Each ``Piecewise((a, cond), (b, True))`` whose values may both be computed everywhere
    (:meth:`.finite.Finite.selectable`) as ``Select(a, b, step)``: a lerp on a float mask instead
    of ``torch.where`` on a bool one. A branch that is a number selects too, by arithmetic on
    the mask (``Select``'s printer). More branches nest: ``Select(a, Select(b, c, s2), s1)``."""

    def select(node: sympy.Expr) -> sympy.Expr:
        if not isinstance(node, sympy.Piecewise) or len(node.args) < 2 or node.args[-1].cond != sympy.true:
            return node
        (a, cond), rest = node.args[0], node.args[1:]
        b = rest[0].expr if len(rest) == 1 else select(sympy.Piecewise(*rest))  # the first true condition wins
        found = _condition_step(cond)
        if found is None:
            return node if len(rest) == 1 else sympy.Piecewise((a, cond), (b, True))
        if not all(_reads_no_tensor(v) or finite.selectable(v) for v in (a, b)):  # type: ignore[union-attr]
            return node if len(rest) == 1 else sympy.Piecewise((a, cond), (b, True))
        step, swapped = found
        if swapped:
            a, b = b, a
        if _reads_no_tensor(a) and isinstance(step, sympy.Heaviside):  # the number second: on the complement
            arg, tie = step.args
            return Select(b, a, sympy.Heaviside(-arg, 1 - tie))
        return Select(a, b, step)

    if finite is None or not e.has(sympy.Piecewise):
        return e
    return _bottom_up_expr(e, select)


def _condition_step(cond: sympy.Basic) -> tuple[sympy.Expr, bool] | None:
    """A select's condition as a step, and whether its branches swap; None if it is no comparison.

    One comparison is one step; an ``And`` of comparisons is the product of their steps; an ``Or``
    is the ``And`` of their negations with the branches swapped, since both multiply float masks.
    """
    step = as_step(cond)
    if step is not None:
        return step, False
    if not isinstance(cond, (sympy.And, sympy.Or)):
        return None
    parts = cond.args if isinstance(cond, sympy.And) else [sympy.Not(c) for c in cond.args]
    steps = [as_step(c) for c in parts]
    if any(s is None for s in steps):
        return None
    return sympy.Mul(*steps), isinstance(cond, sympy.Or)


def _reads_no_tensor(e: sympy.Expr) -> bool:
    """A number, size or parameter: no tensor, not even a scalar one (``dloss()`` has no free symbols)."""
    return is_constant(e) and not tensor_names(e)


def _only_steps(e: sympy.Expr) -> bool:
    """Whether ``e`` reads tensors only through steps (``Heaviside``): its code gives bool or int values."""
    return e.has(sympy.Heaviside, sympy.Piecewise, Select) and _steps_or_constants(e)


def _steps_or_constants(e: sympy.Expr) -> bool:
    if isinstance(e, sympy.Piecewise):  # its conditions read tensors; its values may be plain numbers
        return all(_steps_or_constants(value) for value, _ in e.args)
    if isinstance(e, Select):  # where its mask cannot be floats, torch.where(c, 1, 0) gives integers
        return all(_steps_or_constants(value) for value in e.args[:2])
    if isinstance(e, sympy.Heaviside) or not e.args:
        return not (e.is_Symbol and e.name.startswith("__val_"))
    if is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta)):
        return False
    if isinstance(e, sympy.Pow):  # 1/D, a size's power
        return _steps_or_constants(e.base) and _steps_or_constants(e.exp)
    return isinstance(e, (sympy.Mul, sympy.Add)) and all(_steps_or_constants(a) for a in e.args)


def _deltas_out_of_sums(e: sympy.Expr) -> sympy.Expr:
    """Each delta factor of a sum's body that does not read the summed index, moved out of the sum."""

    def pull(node: ISum) -> sympy.Expr:
        factors = sympy.Mul.make_args(node.body)
        out = [f for f in factors if isinstance(f, sympy.KroneckerDelta) and node.var not in free_indices(f)]
        if not out:
            return node
        return sympy.Mul(*out) * ISum(sympy.Mul(*(f for f in factors if f not in out)), node.var)

    return e.replace(lambda n: isinstance(n, ISum), pull)


def _unshadowed(body: sympy.Expr, indices: list[sympy.Symbol]) -> sympy.Expr:
    """``Σ_indices body`` with each sum inside ``body`` over one of ``indices`` (or over a free
    index) renamed to a fresh index: no pass then reads an inner ``m`` as the outer one."""
    body = rename_bound(body, set(indices) | free_indices(body))
    for i in reversed(indices):
        body = ISum(body, i)
    return body


_Pick = tuple[sympy.KroneckerDelta, sympy.Symbol, sympy.Expr]  # a delta, the axis it pins, the position


def _delta_terms(
    linear: sympy.Expr, picks: list[_Pick], markers: dict[sympy.KroneckerDelta, sympy.Symbol]
) -> tuple[sympy.Expr, list[tuple[sympy.Expr, list[_Pick]]], list[tuple[sympy.Expr, list[_Pick]]]] | None:
    """``linear`` (deltas replaced by markers) as ``g`` free of them, terms ``h·δ`` of one delta and
    terms ``h·δ1·δ2…`` of several, each with its deltas; None when a delta is squared.

    Where every term has one delta, each ``h`` is the derivative in its marker, as written."""
    by_marker = {markers[d]: (d, v, p) for d, v, p in picks}
    singles: list[tuple[sympy.Expr, list[_Pick]]] = [(sympy.diff(linear, markers[d]), [(d, v, p)]) for d, v, p in picks]
    if all(h != 0 and not h.free_symbols & set(by_marker) for h, _ in singles):
        return linear.xreplace({m: 0 for m in by_marker}), singles, []
    try:
        poly = sympy.Poly(linear, *by_marker)
    except sympy.PolynomialError:
        return None
    g = sympy.S.Zero
    singles = []
    joints: list[tuple[sympy.Expr, list[_Pick]]] = []
    for monom, coeff in poly.terms():
        used = [by_marker[m] for m, k in zip(by_marker, monom) if k]
        if any(k > 1 for k in monom):
            return None
        if not used:
            g += coeff
        else:
            (singles if len(used) == 1 else joints).append((coeff, used))
    return g, singles, joints


def _positional_deltas(e: sympy.Expr, indices: tuple[sympy.Symbol, ...], layouts: dict[str, TensorInfo]) -> list[_Pick]:
    """Deltas ``δ(v, p)`` among the elementwise leaves of ``e`` that pin axis ``v`` to a position ``p``.

    ``p`` is an integer tensor's entry (a gather) or an argmax, over other axes of the target, or
    an integer tensor's entry at such positions (``idx[argmax_k x[n, idx[k]]]``, a max of a gather).
    """

    def positional(p: sympy.Expr) -> bool:
        if isinstance(p, ArgMax):
            return True
        return (
            is_entry(p)
            and layouts[entry_name(p)].is_int
            and all(is_index(i) or positional(i) for i in entry_indices(p))
        )

    out = []
    for leaf in _value_leaves(e):
        if not isinstance(leaf, sympy.KroneckerDelta):
            continue
        for v, p in (leaf.args, leaf.args[::-1]):
            if is_index(v) and v in indices and positional(p) and free_indices(p) <= set(indices) - {v}:
                out.append((leaf, v, p))
                break
    return out


def _strided_windows(
    pick: sympy.Expr, lead: tuple[sympy.Symbol, ...]
) -> tuple[tuple[sympy.Symbol, int], tuple[tuple[sympy.Symbol, int], ...]] | None:
    """``((t, step), ((k, dilation), ...))`` for a window position ``t*step + k*dilation + ...`` read
    along one dim (two windows on one dim add their offsets: ``t + k + e``), the offsets the indices
    of fewer values (looped over); None for another form."""
    if len(lead) < 2:
        return None
    coefficients = [pick.coeff(i) for i in lead]
    if not all(c.is_Integer and c > 0 for c in coefficients) or sympy.expand(
        pick - sum(c * i for c, i in zip(coefficients, lead))
    ):
        return None
    (a, ca), *offsets = sorted(zip(lead, coefficients), key=lambda ic: (_fixed_size(ic[0]), str(ic[0])), reverse=True)
    return (a, int(ca)), tuple((b, int(cb)) for b, cb in offsets)


def _fixed_size(i: sympy.Symbol) -> int:
    """0 for a dim of symbolic size; else minus its size (a smaller fixed size sorts later)."""
    size = dim_of(i).size
    return -int(size) if size.is_Integer else 0


def _value_leaves(e: sympy.Expr, repeated: set[sympy.Expr] | None = None, top: bool = True) -> list[sympy.Expr]:
    """Index-level leaves of an elementwise expression (entries, sums, deltas, placeholders).

    A costly sub-expression whose key is in ``repeated`` is a leaf too, unless it is ``e`` itself.
    """
    if is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta, Flat)):
        return [e]
    if e.is_Symbol and (e.name.startswith("__val_") or is_index(e)):
        return [e]
    if repeated and not top and (costly(e) or is_step(e)) and canonical_key(e)[0] in repeated:
        return [e]
    if repeated and not top and shareable(e) and cheap_key(e) in repeated:
        return [e]
    out: list[sympy.Expr] = []
    for a in e.args:
        for leaf in _value_leaves(a, repeated, False):
            if leaf not in out:
                out.append(leaf)
    return out


def _replace_elementwise(e: sympy.Expr, mapping: dict[sympy.Expr, sympy.Expr]) -> sympy.Expr:
    """``e.xreplace(mapping)`` that leaves index-level leaves (sums, entries...) untouched inside."""
    if e in mapping:
        return mapping[e]
    if not mapping or is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta)) or not e.args:
        return e
    return e.func(*(_replace_elementwise(a, mapping) for a in e.args))


def _bottom_up_expr(e: sympy.Expr, fn) -> sympy.Expr:  # noqa: ANN001
    """Apply ``fn`` to every elementwise node, children first (index-level leaves are kept whole)."""
    if is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta)) or not e.args:
        return e
    rebuilt = e.func(*(_bottom_up_expr(a, fn) for a in e.args))
    out = fn(rebuilt)
    return e if out == e else out


def _tensor_factor(S: sympy.Expr) -> bool:
    """Whether the small factor ``S`` of a fused term reads a tensor (else it is a number or parameter)."""
    return bool(tensor_names(S)) or any(str(a).startswith("__val_") for a in S.free_symbols)


def _full_ops(e: sympy.Expr, full: set[sympy.Symbol], stand_ins: dict[sympy.Symbol, Axes] | None = None) -> int:
    """How many elementwise operations over full-size tensors evaluating ``e`` as written takes
    (``stand_ins``: the axes of the temporaries ``e`` reads by symbol)."""
    if is_entry(e) or isinstance(e, (ISum, IMax, ArgMax, sympy.KroneckerDelta)) or not e.args:
        return 0
    own = 0
    stand_ins = stand_ins or {}
    axes = set(free_indices(e)).union(*(stand_ins[s] for s in e.free_symbols if s in stand_ins))
    if axes >= full:
        own = len(e.args) - 1 if isinstance(e, (sympy.Add, sympy.Mul)) else 1
    return own + sum(_full_ops(a, full, stand_ins) for a in e.args)


def _parts(index: sympy.Symbol) -> tuple[str, ...]:
    """The sizes of the plain dims an index ranges over (several for a flattened dim), by which
    values are compared: a renamed dim (``rename(d="r")``) is as long as its source."""
    d = dim_of(index)
    return tuple(size_key(p) for p in (d.parts or (d,)))


def size_variables(dims: tuple[Dim, ...]) -> list[str]:
    """Names of the size variables generated code defines (plain dims only)."""
    return [str(d.size) for d in dims if d.owns_size]


__all__ = ["Layout", "Lowerer", "Val", "size_variables"]
