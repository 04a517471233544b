"""Which unnamed intermediates of a traced op become statements of their own.

A user may write a whole layer in one expression (``relu(x @ W1 + b1) @ W2``). Inlining every
unnamed node into its named consumer would hide the values a backward pass is built around: a
contraction recomputed in the backward costs a whole matmul, and an adjoint shared by several
inputs would be derived once per input. So an unnamed node gets a name of its own when

- it is a **contraction** (``x @ W``), unless it only feeds, through affine steps with constant
  coefficients, a node that becomes a statement anyway (``x @ W + b`` is one statement, as a
  person writes ``hprebn = embcat @ W1 + b1``);
- it is an **operand of a contraction** (its adjoint is the contraction's natural output, and the
  other operand's gradient contracts with its value), or of a padding (which reads zeros past the
  ends of a tensor: an inlined expression would pad only its entries);
- it is the argument of a **nonlinear** elementwise function and reads two or more differentiable
  tensors (the pre-activation ``x @ W1 + b1`` of a ReLU, the residual ``pred - y`` of a squared
  loss): its adjoint is then computed once, not once per input;
- it is **used twice** (a shared sub-expression held in a ``_``-prefixed local or a container);
- it is a **max (min) read by a max (min)**: inlined, SymPy would flatten the two into one, whose
  derivative at a double tie is not the nested one PyTorch gives;
- it is **piecewise and compared** by a condition of a ``Piecewise`` (``u > huber(s)``), or
  **piecewise under a max** (``elu(p).max("n")``, whose derivative reads ``elu'`` at the argmax):
  inlined, SymPy folds the inner ``Piecewise`` into the condition around it, out of the sum or
  argmax that binds its index (and for a scalar, fails);
- it is a **padding** (``x.pad("t", 4, 0)``): its reads past the ends are zeros, which only its
  own statement may hold; or a **window** (``x.unfold("t", 3, 1, "k")``): the forward holds it (a
  view, or the im2col a contraction needs) and the backward adds its adjoint back (col2im).

An unnamed ``rename`` is a view: it never becomes a statement, and its consumers count as its
operand's.

Everything else stays inlined, so the forward program reads as the user wrote it. The rules look
only at the traced graph's structure, never at which op it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy

if TYPE_CHECKING:
    from .tensor import Tensor

ROLES = {"contraction": "mm", "operand": "act", "argument": "pre", "shared": "tmp", "padded": "pad", "window": "win"}


def boundaries(results: list[Tensor]) -> dict[Tensor, str]:
    """The unnamed nodes reachable from ``results`` that become statements, each with its role."""
    nodes = _reachable(results)
    consumers: dict[int, list[Tensor]] = {id(n): [] for n in nodes}
    for n in nodes:
        for o in dict.fromkeys(n.operands):
            consumers[id(o)].append(n)
    for n in reversed(nodes):  # a rename is a view: its consumers are its operand's
        if n.kind == "rename" and n.name is None:
            (o,) = n.operands
            consumers[id(o)] = [u for u in consumers[id(o)] if u is not n] + consumers[id(n)]
    free = [n for n in nodes if n.name is None and n.kind not in ("input", "rename") and not n.is_int]
    chosen: dict[Tensor, str] = {}
    for n in free:
        users = consumers[id(n)]
        if n.kind == "pad":
            chosen[n] = "padded"
        elif n.kind == "window" and not any(u.kind == "contraction" for u in users):
            chosen[n] = "window"
        elif any(u.kind in ("contraction", "pad") for u in users):
            chosen[n] = "operand"  # a padding reads zeros past the ends of a tensor, not of an expression
        elif len(users) > 1:
            chosen[n] = "shared"
        elif any(_merges_into(u, n) or _compared(u, n, chosen) for u in users) or _maximized(n, users, chosen):
            chosen[n] = "operand"  # max(relu(p), w): inlined, SymPy would flatten it to max(0, p, w)
    leaves = _Leaves(chosen, consumers)
    for n in free:
        if n in chosen or n.kind == "contraction":
            continue
        if any(_nonlinear_in(u, n) for u in consumers[id(n)]) and len(leaves.targets(n)) >= 2:
            chosen[n] = "argument"
    for n in free:
        if n.kind == "contraction" and n not in chosen and not _absorbed(n, consumers, chosen):
            chosen[n] = "contraction"
    return {n: chosen[n] for n in nodes if n in chosen}  # in trace order


def synthetic_name(role: str, taken: set[str]) -> str:
    """``mm1``, ``pre2``...: the first name of the role's prefix not taken (nor its gradient's name)."""
    prefix = ROLES[role]
    k = 1
    while f"{prefix}{k}" in taken or f"d{prefix}{k}" in taken:
        k += 1
    return f"{prefix}{k}"


class _Leaves:
    """Differentiable tensors an unnamed node reads, looking through nodes that will not be boundaries.

    A boundary is an input, a node already chosen, or a named node the deriver cuts at: one that
    holds a contraction, or feeds one.
    """

    def __init__(self, chosen: dict[Tensor, str], consumers: dict[int, list[Tensor]]) -> None:
        self.chosen = chosen
        self.consumers = consumers
        self.memo: dict[int, frozenset[int]] = {}

    def targets(self, n: Tensor) -> frozenset[int]:
        if id(n) not in self.memo:
            out: set[int] = set()
            for o in n.operands:
                if not o.is_int and not o.const:
                    out |= {id(o)} if self._is_boundary(o) else self.targets(o)
            self.memo[id(n)] = frozenset(out)
        return self.memo[id(n)]

    def _is_boundary(self, o: Tensor) -> bool:
        if o.kind == "input" or o in self.chosen:
            return True
        feeds = any(u.kind == "contraction" for u in self.consumers[id(o)])
        return o.name is not None and (feeds or self._holds_contraction(o))

    def _holds_contraction(self, n: Tensor) -> bool:
        """Whether ``n``'s statement contains a contraction (itself, or through inlined operands)."""
        inlined = [o for o in n.operands if o.name is None and o not in self.chosen]
        return n.kind == "contraction" or any(self._holds_contraction(o) for o in inlined)


def _reachable(results: list[Tensor]) -> list[Tensor]:
    """Nodes the ``results`` depend on, in trace (topological) order."""
    seen: dict[int, Tensor] = {}
    stack = list(results)
    while stack:
        t = stack.pop()
        if id(t) not in seen:
            seen[id(t)] = t
            stack.extend(t.operands)
    order = {id(n): k for k, n in enumerate(results[0].trace.nodes)}
    return sorted(seen.values(), key=lambda n: order[id(n)])


def _shell(consumer: Tensor, operand: Tensor) -> tuple[sympy.Expr, sympy.Symbol] | None:
    """The consumer's scalar function with every dummy bound to ``operand`` replaced by one symbol."""
    if consumer.kind != "elementwise" or consumer.body is None:
        return None
    u = sympy.Dummy("u", real=True)
    mapping = {d: u for d, o in zip(consumer.dummies, consumer.operands) if o is operand}
    return consumer.body.xreplace(mapping), u


def _nonlinear_in(consumer: Tensor, operand: Tensor) -> bool:
    """Whether an elementwise consumer's second derivative in ``operand`` is not zero."""
    shell = _shell(consumer, operand)
    return shell is not None and sympy.diff(shell[0], shell[1], 2) != 0


def _merges_into(consumer: Tensor, operand: Tensor) -> bool:
    """Whether ``operand`` is a max (min) read directly by a max (min) of ``consumer``.

    SymPy flattens ``Max(Max(p, 0), w)`` into ``Max(0, p, w)``, whose derivative at a double tie
    is not the nested one PyTorch gives (``torch.maximum(torch.relu(p), w)`` at ``p = w = 0``
    sends nothing to ``p``). A statement of its own keeps the nesting.
    """
    body = operand.body if operand.kind == "elementwise" else None
    shell = _shell(consumer, operand)
    if body is None or shell is None or not isinstance(body, (sympy.Max, sympy.Min)):
        return False
    outer, u = shell
    return any(isinstance(f, type(body)) and u in f.args for f in sympy.preorder_traversal(outer))


def _compared(consumer: Tensor, operand: Tensor, chosen: dict[Tensor, str]) -> bool:
    """Whether a piecewise ``operand`` is read by a condition of a ``Piecewise`` in ``consumer``.

    SymPy folds a ``Piecewise`` inside a condition into the conditions around it, and that fails
    for a value with no free symbols (a 0-d tensor's entry); a statement of its own is compared.
    """
    shell = _shell(consumer, operand)
    if shell is None or not _holds_piecewise(operand, chosen):
        return False
    outer, u = shell
    return any(u in c.free_symbols for p in outer.atoms(sympy.Piecewise) for _, c in p.args)


def _maximized(n: Tensor, users: list[Tensor], chosen: dict[Tensor, str]) -> bool:
    """Whether a piecewise ``n`` is the operand of a max: its argmax is a position the derivative
    substitutes into ``Piecewise`` conditions, where SymPy would fold ``n``'s branches out of it."""
    return any(u.kind == "max" for u in users) and _holds_piecewise(n, chosen)


def _holds_piecewise(n: Tensor, chosen: dict[Tensor, str]) -> bool:
    """Whether ``n``'s inlined expression has a ``Piecewise`` (in it, or in operands and reductions
    inlined into it)."""
    if n.kind == "input" or n.name is not None or n in chosen:
        return False
    inlined = [o for o in n.operands if o.name is None and o not in chosen]
    own = n.kind == "elementwise" and n.body is not None and n.body.has(sympy.Piecewise)
    return own or any(_holds_piecewise(o, chosen) for o in inlined)


def _affine_in(consumer: Tensor, operand: Tensor) -> bool:
    """Whether an elementwise consumer is ``c·operand + rest`` with ``c`` free of every tensor."""
    shell = _shell(consumer, operand)
    if shell is None:
        return False
    slope = sympy.diff(shell[0], shell[1])
    return not (slope.free_symbols & set(consumer.dummies)) and not slope.has(shell[1])


def _absorbed(n: Tensor, consumers: dict[int, list[Tensor]], chosen: dict[Tensor, str]) -> bool:
    """Whether contraction ``n`` flows through affine steps into a node that is a statement anyway."""
    current = n
    while True:
        users = consumers[id(current)]
        if len(users) != 1 or not _affine_in(users[0], current):
            return False
        current = users[0]
        if current.name is not None or current in chosen:
            return True
