"""Turn the measurements into Markdown tables (printed and written) and a JSON record."""

from __future__ import annotations

from typing import Any

RUNTIME_COLUMNS = [
    "op",
    "size",
    "shape",
    "eager",
    "compiled",
    "atoms",
    "native",
    "bound",
    "eager/atoms",
    "eager/native",
    "eager/bound",
    "compiled/native",
    "compile s",
]
MEMORY_COLUMNS = [
    "op",
    "size",
    "bwd I/O",
    "gen saved",
    "fused reads",
    "atoms saved",
    "native saved",
    "gen/atoms saved",
    "page faults/call",
    "max rel err",
]
DERIVATION_COLUMNS = [
    "op",
    "import",
    "trace",
    "differentiate",
    "simplify",
    "lower",
    "emit",
    "derive",
    "derive (CPU)",
    "import+derive",
]
STACK_COLUMNS = [
    "k",
    "trace",
    "differentiate",
    "simplify",
    "lower",
    "emit",
    "derive",
    "derive (CPU)",
    "t(k)/t(1) (CPU)",
    "linear would be",
    "lines",
]

COMPOSITION_COLUMNS = [
    "composition",
    "shapes",
    "derive",
    "autograd",
    "derive/autograd",
    "peak tensor (backward)",
    "largest tensor (forward)",
    "page faults/call",
    "max rel err",
]

GOALS = [
    ("fused backward >= 3x faster than autograd through the atoms", "eager/atoms", 1 / 3),
    ("eager fused backward within 1.5x of the native kernels", "eager/native", 1.5),
    ("compiled fused backward at or below native", "compiled/native", 1.0),
]


def fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_secs(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.3f}"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def _load(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


# -- runtime -------------------------------------------------------------------------------------
def runtime_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        t, q = r["time_s"], r["ratios"]
        rows.append(
            [
                r["op"],
                r["size"],
                r["shape"],
                fmt_time(t["eager"]),
                fmt_time(t["compiled"]) if t["compiled"] is not None else f"n/a ({r['compiled_error']})",
                fmt_time(t["atoms"]),
                fmt_time(t["native"]),
                fmt_time(t["bound"]),
                fmt_ratio(q["eager/atoms"]),
                fmt_ratio(q["eager/native"]),
                fmt_ratio(q["eager/bound"]),
                fmt_ratio(q["compiled/native"]),
                "n/a" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
            ]
        )
    return rows


def memory_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        b = r["bytes"]
        ratio = b["generated_saved"] / b["atoms_autograd_saved"] if b["atoms_autograd_saved"] else None
        errs = ", ".join(f"{k.split('_')[0]} {v:.1e}" for k, v in r["max_rel_err"].items())
        faults = _faults(r.get("page_faults_per_call") or {}, ("eager", "compiled", "atoms", "native"))
        rows.append(
            [
                r["op"],
                r["size"],
                fmt_bytes(b["backward_io"]),
                fmt_bytes(b["generated_saved"]),
                fmt_bytes(b["generated_read_by_fused"]),
                fmt_bytes(b["atoms_autograd_saved"]),
                fmt_bytes(b["native_autograd_saved"]),
                fmt_ratio(ratio),
                faults,
                errs,
            ]
        )
    return rows


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for text, key, limit in GOALS:
        vals = [(f"{r['op']}/{r['size']}", r["ratios"][key]) for r in results if r["ratios"][key] is not None]
        met = [c for c, v in vals if v <= limit]
        out.append(
            {
                "goal": text,
                "ratio": key,
                "limit": limit,
                "met": met,
                "missed": [c for c, v in vals if v > limit],
                "measured": len(vals),
            }
        )
    return out


# -- derivation ----------------------------------------------------------------------------------
def composition_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["name"],
            r["shape"],
            fmt_time(r["time_s"]["eager"]),
            fmt_time(r["time_s"]["autograd"]),
            fmt_ratio(r["ratio"]),
            f"{r['peak']:,} ({r['peak_op']})",
            f"{r['forward_largest']:,}",
            _faults(r.get("page_faults_per_call") or {}, ("eager", "autograd")),
            f"{r['max_rel_err']:.1e}",
        ]
        for r in results
    ]


def _faults(per_call: dict[str, float | None], order: tuple[str, ...]) -> str:
    """``12 / 0``: minor page faults per call of each timed function, in ``order`` (n/a if unmeasured)."""
    return " / ".join("n/a" if per_call.get(k) is None else f"{per_call[k]:.0f}" for k in order)


def derivation_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["name"], *(["n/a"] * 6), r["error"], "n/a", "n/a"])
            continue
        stages = (fmt_secs(r.get(s)) for s in ("trace", "differentiate", "simplify", "lower", "emit", "derive", "cpu"))
        out.append([r["name"], fmt_secs(r["import"]), *stages, fmt_secs(r["import"] + r["derive"])])
    return out


def stack_rows(summary: dict[str, Any]) -> list[list[str]]:
    out = []
    k0 = min(r["k"] for r in summary["rows"])
    for r in summary["rows"]:
        if "error" in r:
            out.append([str(r["k"]), *(["n/a"] * 5), r["error"], "n/a", "n/a", f"{r['k'] / k0:g}x", "n/a"])
            continue
        out.append(
            [
                str(r["k"]),
                *(fmt_secs(r.get(s)) for s in ("trace", "differentiate", "simplify", "lower", "emit", "derive", "cpu")),
                fmt_ratio(r.get("growth")),
                f"{r['k'] / k0:g}x",
                str(r["lines"]),
            ]
        )
    return out


def render(report: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    env = report["environment"]
    clock = (
        "wall (perf_counter)" if env.get("clock", "wall") == "wall" else "CPU time of the timing thread (thread_time)"
    )
    parts = [
        "# derive benchmarks",
        "",
        f"Command: `{env['command']}`  ",
        f"torch {env['torch']}, Python {env['python']}, {env['cpus']} CPUs, torch threads {env['threads']}, "
        f"device {env.get('device', 'cpu')}, "
        f"{env['mode']} mode ({env['rounds']} interleaved round(s) x "
        f"blocked_autorange(min_run_time={env['min_run_time']} s), clock: {clock}); "
        f"ran {env.get('elapsed_s', 0):.0f} s; 1-minute load average {_load(env.get('load_before'))} before, "
        f"{_load(env.get('load_after'))} after (other processes on the CPUs distort the timings).",
    ]
    results = report.get("runtime") or []
    if results:
        parts += [
            "",
            "## Backward time (median)",
            "",
            "eager/compiled: the generated fused backward; atoms: autograd through the generated atom chain; "
            "native: autograd through PyTorch's fused op; bound: max(time to stream the fused backward's "
            "read+write bytes with torch.add(out=), time of the GEMMs it must do). Ratios below 1 mean the "
            "generated backward is faster.",
            "",
            markdown(RUNTIME_COLUMNS, runtime_rows(results)),
            "",
            "Native counterparts: " + "; ".join(sorted({f"{r['op']}: {r['native']}" for r in results})) + ".",
            "",
            "## Memory kept for the backward (bytes beyond the inputs themselves)",
            "",
            "gen saved: tensors in the generated forward's `saved` (which also feeds `_backward_steps`); "
            "fused reads: those the fused backward reads; atoms/native saved: what autograd saves "
            "(saved_tensors_hooks) through the atom chain / the native op; bwd I/O: bytes the fused backward "
            "reads and writes (the bound's bytes). page faults/call: minor page faults per backward call, "
            "eager / compiled / atoms / native (each is a fresh 4 KiB page of a large temporary that the kernel maps "
            "and zeroes; it shows up as system time). max rel err: generated grads vs autograd through the atoms.",
            "",
            markdown(MEMORY_COLUMNS, memory_rows(results)),
            "",
            "## Goals",
            "",
        ]
        for g in report["goals"]:
            parts.append(
                f"- {g['goal']} ({g['ratio']} <= {g['limit']:.2f}): met {len(g['met'])}/{g['measured']}"
                + (f"; missed: {', '.join(g['missed'])}" if g["missed"] else "")
            )
    comps = report.get("compositions") or []
    if comps:
        parts += [
            "",
            "## User-style compositions: derive against autograd through PyTorch's own ops",
            "",
            "Each op is written only in the op language, as a user would (benchmarks/compositions.py), and "
            "derived in-process; derive: its fused backward (eager); autograd: `torch.autograd.grad` through "
            "the same computation in PyTorch's own ops (F.relu, F.layer_norm, F.gelu, torch.softmax...). "
            "peak tensor: the most elements of any tensor the generated backward creates (and the aten op "
            "that made it); it must not exceed the largest tensor of the forward. page faults/call: minor "
            "page faults per backward call after timing, derive / autograd (fresh pages of large "
            "temporaries, which the kernel maps and zeroes: they move timings between runs).",
            "",
            markdown(COMPOSITION_COLUMNS, composition_rows(comps)),
        ]
    deriv = report.get("derivation")
    if deriv:
        parts += [
            "",
            "## Derivation cost (seconds)",
            "",
            "import: `import derive` in a fresh interpreter (measured once, shown on every row); each op then "
            "derived from a cold SymPy cache; derive: trace+differentiate+simplify+lower+emit "
            "(`api.run(write=False, verify=False)`).",
            "",
            markdown(DERIVATION_COLUMNS, derivation_rows(deriv["ops"]["rows"])),
        ]
        stack = deriv.get("stack")
        if stack and stack.get("rows"):
            parts += [
                "",
                "## Derivation time of a stack of k x (linear, batch norm, tanh)",
                "",
                markdown(STACK_COLUMNS, stack_rows(stack)),
            ]
            if "growth" in stack:
                parts += [
                    "",
                    f"Growth (CPU time of the deriving process, which other processes on the machine do not inflate): "
                    f"t({stack['k_last']})/t({stack['k_first']}) = {stack['growth']:.1f}x for "
                    f"{stack['k_last'] // stack['k_first']}x the layers; exponent {stack['exponent']:.2f} overall, "
                    f"{stack.get('exponent_tail', stack['exponent']):.2f} over the last doubling: {stack['verdict']}.",
                ]
    return "\n".join(parts) + "\n"
