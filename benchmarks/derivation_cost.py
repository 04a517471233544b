"""What deriving costs: per-op stage timings and how derivation time grows with the size of an op.

Measurements run in fresh subprocesses (``python -m benchmarks.derivation_cost --worker ...``): one for
the catalogue, which times ``import derive`` once and clears SymPy's cache before each op (so each starts
cold, as ``python -m derive OP`` does), and one per k of the growth study.
Stages are the pipeline's own timings (trace, differentiate, simplify, lower) plus ``emit`` (rendering
the module), from ``derive.api.run(op, write=False, verify=False)``.

The growth study derives a stack of ``k`` layers ``h_i = tanh(batchnorm(h_{i-1} @ W_i + b_i))``. The
stacked op is generated as source with unique local names per layer (``z1, m1, ..., h1, z2, ...``)
because intermediates are named from the function's locals at return: a re-bound name would lose its
earlier tensor, which would then be inlined into later expressions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("trace", "differentiate", "simplify", "lower", "emit")


# -- the stacked op ------------------------------------------------------------------------------
def stack_source(k: int) -> tuple[str, dict[str, str]]:
    """Source of ``stack{k}`` and its ``@op`` dim specs: layer i maps dim d{i-1} to d{i}."""
    specs = {"x": "n d0"}
    args = ["x"]
    lines = []
    prev = "x"
    for i in range(1, k + 1):
        specs.update({f"W{i}": f"d{i - 1} d{i}", f"b{i}": f"d{i}", f"g{i}": f"d{i}", f"be{i}": f"d{i}"})
        args += [f"W{i}", f"b{i}", f"g{i}", f"be{i}"]
        lines += [
            f"z{i} = {prev} @ W{i} + b{i}",
            f"m{i} = z{i}.mean('n', keepdim=True)",
            f"c{i} = z{i} - m{i}",
            f"v{i} = (c{i} ** 2).mean('n', keepdim=True)",
            f"r{i} = (v{i} + eps) ** -0.5",
            f"xh{i} = c{i} * r{i}",
            f"y{i} = g{i} * xh{i} + be{i}",
            f"h{i} = tanh(y{i})",
        ]
        prev = f"h{i}"
    body = "".join(f"    {line}\n" for line in lines)
    doc = f'    """{k} x (linear, batch norm (biased), tanh)."""\n'
    src = f"def stack{k}({', '.join(args)}, eps=1e-5):\n{doc}{body}    return {prev}\n"
    return src, specs


def make_stack(k: int) -> Any:
    """The ``@op``-declared k-layer stack."""
    import derive

    src, specs = stack_source(k)
    namespace: dict[str, Any] = {"tanh": derive.tanh}
    exec(compile(src, f"<stack{k}>", "exec"), namespace)  # noqa: S102 - our own generated source
    return derive.op(**specs)(namespace[f"stack{k}"])


# -- workers (run inside a fresh interpreter) ----------------------------------------------------
def _derive_one(the_op: Any) -> dict[str, Any]:
    from derive import api

    t0, c0 = time.perf_counter(), time.process_time()
    result = api.run(the_op, write=False, verify=False)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    timings = {s: result.derivation.timings.get(s, 0.0) for s in STAGES}
    return {"name": result.derivation.name, **timings, "derive": total, "cpu": cpu, "lines": result.source.count("\n")}


def _worker(kind: str, arg: str) -> dict[str, Any]:
    """``ops NAME,NAME``: import once, then each op from a cold SymPy cache; ``stack K``: one k-stack."""
    t0 = time.perf_counter()
    import derive  # noqa: F401 - timed
    from derive import api

    imported = time.perf_counter() - t0
    if kind == "stack":
        return {"import": imported, **_derive_one(make_stack(int(arg)))}
    from sympy.core.cache import clear_cache

    rows = []
    for name in [n for n in arg.split(",") if n]:
        clear_cache()  # as in a fresh `python -m derive NAME`: nothing left over from the previous op
        try:
            rows.append({"import": imported, **_derive_one(api.resolve(name))})
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:160]})
    return {"import": imported, "rows": rows}


def measure(kind: str, arg: str, timeout: float) -> dict[str, Any]:
    """One worker in a subprocess; ``{"error": ...}`` if it failed or ran past ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "benchmarks.derivation_cost", "--worker", kind, arg]
    if timeout <= 0:
        return {"name": arg, "error": "skipped: out of time budget"}
    t0 = time.perf_counter()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"name": arg, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"name": arg, "error": tail[:160]}
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["process"] = wall
    return record


def catalogue_costs(ops: list[str], timeout: float = 300.0, progress: Any = None) -> dict[str, Any]:
    """Stage timings of each op, all in one fresh process (import measured there, once)."""
    if progress:
        progress(f"derivation cost: {len(ops)} op(s) in a fresh process")
    record = measure("ops", ",".join(ops), timeout)
    if "error" in record:
        return {"import": None, "process": None, "rows": [{"name": n, "error": record["error"]} for n in ops]}
    return record


def stack_growth(ks: list[int], timeout: float, progress: Any = None, deadline: float | None = None) -> dict[str, Any]:
    """Derivation time of the k-layer stack for each k, and the growth exponent log(t_k/t_1)/log(k).

    Each k runs in a fresh process, for at most ``timeout`` seconds and never past ``deadline``
    (a ``time.perf_counter()`` value).
    """
    rows = []
    for k in ks:
        if progress:
            progress(f"derivation cost: stack k={k}")
        left = timeout if deadline is None else min(timeout, deadline - time.perf_counter())
        row = measure("stack", str(k), left)
        row["k"] = k
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["k"] == min(ks)), None)
    for r in ok:  # from CPU time: the derivation is single-threaded, and CPU time ignores other processes
        r["growth"] = r["cpu"] / base["cpu"] if base else None
    summary: dict[str, Any] = {"rows": rows}
    if base and len(ok) > 1:
        last = max(ok, key=lambda r: r["k"])
        ratio_k = last["k"] / base["k"]
        summary["k_first"], summary["k_last"] = base["k"], last["k"]
        summary["growth"] = last["cpu"] / base["cpu"]
        summary["exponent"] = math.log(summary["growth"]) / math.log(ratio_k)
        # exponent from the last two points: the asymptotic trend
        prev = [r for r in ok if r["k"] < last["k"]]
        if prev:
            p = max(prev, key=lambda r: r["k"])
            summary["exponent_tail"] = math.log(last["cpu"] / p["cpu"]) / math.log(last["k"] / p["k"])
        summary["verdict"] = _verdict(summary["exponent_tail"] if "exponent_tail" in summary else summary["exponent"])
    return summary


def _verdict(exponent: float) -> str:
    if exponent < 1.25:
        return "about linear"
    if exponent < 1.75:
        return "super-linear (between linear and quadratic)"
    if exponent < 2.5:
        return "about quadratic"
    return "worse than quadratic"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ARG"), required=True, help="ops NAME,NAME | stack K")
    args = parser.parse_args(argv)
    print(json.dumps(_worker(*args.worker)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
