"""``python -m benchmarks``: time generated backwards against autograd and native kernels; cost of deriving.

Writes ``results.md`` and ``results.json`` to ``--out`` (default ``benchmarks/results/``) and prints the
Markdown tables. ``--quick`` is a smoke run (small sizes, one short round, no torch.compile, k <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from . import cases as cases_mod
from . import compositions as compositions_mod
from . import derivation_cost, tables

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _names(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    names = [n for part in text.split(",") for n in [part.strip()] if n]
    if allowed is not None:
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="fast smoke run: small sizes, 1 short round, no compile, k in 1,2"
    )
    p.add_argument(
        "--ops",
        type=lambda t: _names(t, cases_mod.OPS, "op"),
        default=list(cases_mod.OPS),
        help=f"comma-separated, from {','.join(cases_mod.OPS)} (default all)",
    )
    p.add_argument(
        "--sizes", type=lambda t: _names(t, cases_mod.SIZES, "size"), default=None, help="small,large (quick: small)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.md and results.json")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads (default: all CPUs)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3; quick 1)")
    p.add_argument(
        "--min-run-time", type=float, default=None, help="blocked_autorange min_run_time, s (default 0.15; quick 0.02)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile (default on; quick off)",
    )
    p.add_argument("--runtime", action=argparse.BooleanOptionalAction, default=True, help="backward timings and memory")
    p.add_argument(
        "--compositions",
        type=lambda t: _names(t, tuple(compositions_mod.COMPOSITIONS), "composition"),
        default=None,
        help="user-style compositions to time against autograd (default all; --compositions '' for none)",
    )
    p.add_argument("--derivation", action=argparse.BooleanOptionalAction, default=True, help="derivation cost")
    p.add_argument(
        "--derive-ops",
        type=lambda t: _names(t, None, "op"),
        default=None,
        help="catalogue ops whose derivation is timed (default: the whole catalogue; quick: --ops)",
    )
    p.add_argument(
        "--stack",
        type=lambda t: [int(k) for k in _names(t, None, "k")],
        default=None,
        help="k values for the layer-stack growth study (default 1,2,4,8,16; quick 1,2; empty to skip)",
    )
    p.add_argument("--stack-timeout", type=float, default=300.0, help="seconds allowed to derive one stack")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter latency (default); cpu: thread_time of the timing thread, robust to other "
        "processes sharing the CPUs (forces --threads 1)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device the inputs live on and the backwards run on, e.g. cuda (default cpu; "
        "on a GPU the clock is wall time read after torch.cuda.synchronize())",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run; the stack study stops at it (default 540; quick 50)",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.sizes = args.sizes or (["small"] if q else list(cases_mod.SIZES))
    args.rounds = args.rounds or (1 if q else 3)
    args.min_run_time = args.min_run_time or (0.02 if q else 0.15)
    args.compile = (not q) if args.compile is None else args.compile
    args.stack = args.stack if args.stack is not None else ([1, 2] if q else [1, 2, 4, 8, 16])
    args.budget = args.budget or (50.0 if q else 540.0)
    if args.device != "cpu":
        from derive.errors import DeriveError
        from derive.verify import usable_device

        try:
            usable_device(args.device)
        except DeriveError as exc:
            p.error(str(exc))
    if args.device != "cpu" and args.clock == "cpu":
        p.error(f"--clock cpu times CPU work; kernels on --device {args.device} need the default wall clock")
    if args.clock == "cpu" and args.threads != 1:
        _progress("--clock cpu times one thread: using --threads 1")
        args.threads = 1
    return args


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _device_name(device: str) -> str:
    """``cpu``, or the device with its model: ``cuda (NVIDIA H200)``."""
    import torch

    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from . import runtime

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    env = {
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in (args.argv or [])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "mode": "quick" if args.quick else "full",
        "rounds": args.rounds,
        "min_run_time": args.min_run_time,
        "compile": args.compile,
        "clock": args.clock,
        "device": _device_name(args.device),
        "load_before": _load(),
    }
    if env["load_before"] is not None and env["load_before"] > 0.5:
        _progress(
            f"warning: 1-minute load average {env['load_before']:.2f} before starting: other work shares the CPUs"
            + ("; wall-clock timings will be noisy (try --clock cpu)" if args.clock == "wall" else "")
        )
    _progress(f"torch {torch.__version__}, torch.set_num_threads({args.threads}) -> {torch.get_num_threads()} threads")
    report: dict[str, Any] = {"environment": env}
    if args.runtime:
        cfg = runtime.Config(
            threads=args.threads,
            rounds=args.rounds,
            min_run_time=args.min_run_time,
            compile=args.compile,
            clock=args.clock,
            device=args.device,
        )
        results = []
        for case in cases_mod.cases(args.ops, args.sizes):
            _progress(f"backward: {case.label} ({case.shape})")
            results.append(runtime.run_case(case, cfg))
        report["runtime"] = results
        report["goals"] = tables.goals(results)
    names = list(compositions_mod.COMPOSITIONS) if args.compositions is None else args.compositions
    if names:
        cfg = runtime.Config(
            threads=args.threads,
            rounds=args.rounds,
            min_run_time=args.min_run_time,
            clock=args.clock,
            device=args.device,
        )
        report["compositions"] = []
        for name in names:
            _progress(f"composition: {name}")
            shapes = compositions_mod.SMALL[name] if args.quick else None
            report["compositions"].append(runtime.run_composition(name, cfg, shapes))
    if args.derivation:
        from derive import catalogue

        names = args.derive_ops or ([o for o in args.ops if o in catalogue()] if args.quick else list(catalogue()))
        report["derivation"] = {
            "ops": derivation_cost.catalogue_costs(names, progress=_progress),
            "stack": (
                derivation_cost.stack_growth(
                    args.stack, args.stack_timeout, progress=_progress, deadline=start + args.budget
                )
                if args.stack
                else None
            ),
        }
    env["elapsed_s"] = time.perf_counter() - start
    env["load_after"] = _load()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    report = run(args)
    text = tables.render(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    print(text)
    _progress(
        f"wrote {args.out / 'results.md'} and {args.out / 'results.json'} ({report['environment']['elapsed_s']:.0f} s)"
    )
    return 0
