"""Contraction planning: the order in which a sum of a product is evaluated, pair by pair.

``Σ_{n,o} x[n,i]·m[n,h]·W2[h,o]·d[n,o]`` can be evaluated in many orders; multiplying everything
out first makes a rank-4 tensor, while contracting pairwise never exceeds rank 2. The planner
sees only the axes (index symbols) of each operand and which indices are summed, and returns
pairwise steps: an index used by one operand alone is summed out of it at once; then the pair
whose contraction costs least is contracted, until one operand is left.

Cost is judged without the runtime sizes: every dim counts as equally large, so an operand's size
is ``BIG ** rank``. A step whose result is *admissible* (its dims fit inside some tensor of the
forward, so it can never be larger than the forward's largest tensor) always beats one whose result
is not; among admissible orders, fewer multiply-adds win, then smaller intermediates. For up to
``EXHAUSTIVE`` operands every order is tried; beyond that the cheapest pair is taken greedily.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import sympy

Axes = frozenset[sympy.Symbol]
BIG = 1024
EXHAUSTIVE = 5


@dataclass(frozen=True)
class Reduce:
    """Sum operand ``operand`` over ``summed`` (indices no other operand nor the result has)."""

    operand: int
    summed: Axes


@dataclass(frozen=True)
class Contract:
    """Multiply operands ``left`` and ``right`` and sum over ``summed``; the result replaces both."""

    left: int
    right: int
    summed: Axes


Step = Reduce | Contract


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    admissible: bool
    flops: int
    largest: int


def plan(operands: list[Axes], summed: Axes, weight: Callable[[Axes], int], admissible: Callable[[Axes], bool]) -> Plan:
    """The cheapest order of pairwise steps reducing ``operands`` to one, summing out ``summed``.

    Indices refer to the working list: a step's result is appended at the end and its operands
    removed (the lower position first), as :func:`apply_step` does.

    Example:
        >>> n, i, h = sympy.symbols("n i h", integer=True)
        >>> p = plan([frozenset({n, i}), frozenset({n, h})], frozenset({n}), lambda a: BIG ** len(a), lambda a: True)
        >>> p.steps
        (Contract(left=0, right=1, summed=frozenset({n})),)
    """
    start = _reductions(list(operands), summed)
    if len(operands) > EXHAUSTIVE:
        return _greedy(list(operands), summed, weight, admissible)
    best: Plan | None = None
    for candidate in _orders(list(operands), summed, weight, admissible, start):
        if best is None or _key(candidate) < _key(best):
            best = candidate
    assert best is not None
    return best


def apply_step(operands: list[Axes], step: Step, summed: Axes = frozenset()) -> tuple[list[Axes], Axes]:
    """The working list after ``step`` and the axes of its result."""
    if isinstance(step, Reduce):
        result = operands[step.operand] - step.summed
        rest = [a for k, a in enumerate(operands) if k != step.operand]
    else:
        result = (operands[step.left] | operands[step.right]) - step.summed
        rest = [a for k, a in enumerate(operands) if k not in (step.left, step.right)]
    return rest + [result], result


def _key(p: Plan) -> tuple[bool, int, int]:
    return (not p.admissible, p.flops, p.largest)


def _reductions(operands: list[Axes], summed: Axes) -> list[Reduce]:
    """Indices summed that only one operand has: sum them out of it before anything else."""
    out = []
    for k, axes in enumerate(operands):
        alone = frozenset(i for i in axes & summed if not any(i in o for j, o in enumerate(operands) if j != k))
        if alone:
            out.append(Reduce(k, alone))
    return out


def _contractible(operands: list[Axes], left: int, right: int, summed: Axes) -> Axes:
    """Summed indices the pair holds and no other operand needs."""
    others = [o for k, o in enumerate(operands) if k not in (left, right)]
    return frozenset(i for i in (operands[left] | operands[right]) & summed if not any(i in o for o in others))


def _orders(
    operands: list[Axes],
    summed: Axes,
    weight: Callable[[Axes], int],
    admissible: Callable[[Axes], bool],
    pending: list[Reduce],
    steps: tuple[Step, ...] = (),
    ok: bool = True,
    flops: int = 0,
    largest: int = 0,
):
    """Every order of steps (reductions first), with its cost, as :class:`Plan` records."""
    if pending:
        step = pending[0]
        before = operands[step.operand]
        operands, result = apply_step(operands, step, summed)
        shift = [Reduce(r.operand - (1 if r.operand > step.operand else 0), r.summed) for r in pending[1:]]
        yield from _orders(
            operands,
            summed,
            weight,
            admissible,
            shift,
            steps + (step,),
            ok and admissible(result),
            flops + weight(before),
            max(largest, weight(result)),
        )
        return
    if len(operands) == 1:
        yield Plan(steps, ok, flops, largest)
        return
    for left, right in itertools.combinations(range(len(operands)), 2):
        pair = Contract(left, right, _contractible(operands, left, right, summed))
        union = operands[left] | operands[right]
        rest, result = apply_step(operands, pair, summed)
        yield from _orders(
            rest,
            summed,
            weight,
            admissible,
            _reductions(rest, summed),
            steps + (pair,),
            ok and admissible(result),
            flops + weight(union),
            max(largest, weight(result)),
        )


def _greedy(
    operands: list[Axes], summed: Axes, weight: Callable[[Axes], int], admissible: Callable[[Axes], bool]
) -> Plan:
    steps: list[Step] = []
    ok, flops, largest = True, 0, 0
    while True:
        pending = _reductions(operands, summed)
        if pending:
            step: Step = pending[0]
            flops += weight(operands[pending[0].operand])
        elif len(operands) == 1:
            return Plan(tuple(steps), ok, flops, largest)
        else:
            pairs = []
            for left, right in itertools.combinations(range(len(operands)), 2):
                contract = Contract(left, right, _contractible(operands, left, right, summed))
                result = apply_step(operands, contract, summed)[1]
                union = operands[left] | operands[right]
                pairs.append(((not admissible(result), weight(union), weight(result)), contract))
            cost, step = min(pairs, key=lambda p: p[0])
            flops += cost[1]
        operands, result = apply_step(operands, step, summed)
        ok, largest = ok and admissible(result), max(largest, weight(result))
        steps.append(step)


__all__ = ["BIG", "Contract", "Plan", "Reduce", "apply_step", "plan"]
