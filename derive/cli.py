"""The command line: a thin layer of argparse over the public API."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from . import api
from .errors import DeriveError

if TYPE_CHECKING:
    from .derivation import Derivation

DESCRIPTION = """\
Derive, simplify, generate and verify the backward pass of a tensor op.

derive differentiates the op's forward definition with SymPy, simplifies the gradient to
the compact form a person would write, writes vectorised PyTorch code to generated/NAME.py
and checks it against PyTorch autograd."""

EPILOG = """\
examples:
  python -m derive batchnorm              derivation, generated/batchnorm.py, verification
  python -m derive my_ops.py:softplus     the same for an op in your own file
  python -m derive --list                 the catalogue
  python -m derive --check                exit 1 if generated/ is stale
  python -m derive cross_entropy --format json | jq .gradients
  python -m derive train --steps 2000     train the lecture's MLP with generated code only
  python -m derive check makemore_mlp --against my_backward.py
                                          grade a hand-written backward, atom by atom

where the time goes: importing torch and SymPy is most of a run (about 3 s on a 2-core VM);
deriving, verifying and printing batchnorm add about 0.5 s, split by stage in the summary line.
python -m benchmarks.startup measures it.

exit status: 0 ok, 1 verification failed, generated/ stale or check found a wrong gradient,
2 usage error."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="derive", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("op", nargs="?", help="a catalogue op (see --list) or PATH.py:FUNCTION")
    parser.add_argument("--list", action="store_true", help="list the catalogue, one op per line")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 and name the files if generated/ (or --out DIR, your own ops) is stale",
    )
    parser.add_argument("--all", action="store_true", help="regenerate every catalogue op into the output folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="write generated code here (default: derive's generated/ for a catalogue op, ./generated/ in the "
        "current folder for PATH.py:FUNCTION)",
    )
    parser.add_argument(
        "--format", choices=["text", "latex", "markdown", "json"], default="text", help="how to print the derivation"
    )
    parser.add_argument("--latex", action="store_true", help="same as --format latex")
    parser.add_argument(
        "--small", action="store_true", help="also work each gradient out entry by entry on a small index set"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the autograd and exact checks")
    parser.add_argument("--no-write", action="store_true", help="derive and verify without writing a file")
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="DEV",
        help="run the autograd checks and gradcheck on this torch device, e.g. cuda (default: cpu)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    parser.add_argument(
        "--shard",
        metavar="DIM",
        help="DIM is split across processes: every reduction over it all-reduces on the module's group= "
        "(needs --out or --no-write: generated/ holds the single-process modules)",
    )
    parser.add_argument(
        "--graph",
        type=Path,
        metavar="FILE.svg",
        help="also draw the forward program as a graph, tensors with shapes and gradient formulas: SVG (no "
        "dependency), or PNG when the name ends .png (needs matplotlib: pip install 'derive[plot]')",
    )
    return parser


def graph_target(path: Path) -> Path:
    """``--graph``'s file, checked before any work: an .svg (or, with matplotlib, .png) in a folder that can be written."""
    import importlib.util

    from .emit import writable_folder
    from .errors import OutputPathError

    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise OutputPathError(f"--graph {path}: name the file .svg (no dependency) or .png (needs matplotlib)")
    if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise OutputPathError(
            f"--graph {path}: PNG is drawn by matplotlib, which is not installed "
            "(pip install 'derive[plot]'); or name the file .svg"
        )
    if path.is_dir():
        raise OutputPathError(f"--graph {path}: is a folder; name an .svg or .png file")
    writable_folder(path.parent, option=f"--graph {path}")
    return path


def write_graph(path: Path, d: Derivation, wrong: frozenset[str] = frozenset()) -> None:
    """The derivation's graph, as SVG or PNG by the file's suffix, written atomically."""
    from .emit import write_atomic
    from .graph import graph_of, png, svg

    g = graph_of(d)
    write_atomic(path, png(g, wrong) if path.suffix.lower() == ".png" else svg(g, wrong))


def _progress(message: str) -> None:
    """A transient status line on an interactive terminal."""
    print(f"\r\033[K… {message}", end="" if message else "\n", file=sys.stderr, flush=True)


def process_age() -> float | None:
    """Seconds since this process started (Linux), so reported times include imports."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def closest(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def entry() -> None:
    """``python -m derive`` and the ``derive`` script: run :func:`main`, exit with its status."""
    import gc

    # torch's and SymPy's modules are millions of objects that live as long as the process:
    # frozen, no collection walks them again (each full one would), nor the last one at exit
    gc.freeze()
    status = main()
    gc.freeze()  # and what the derivation made: the exit's collection would take about 1 s
    sys.exit(status)


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Entry point of ``python -m derive`` and the ``derive`` script; returns the exit status."""
    started = started if started is not None else time.perf_counter()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "train":
        from .training.train import main as train_main

        return train_main(args_list[1:])
    if args_list and args_list[0] == "check":
        return check_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return _run(args, parser, started)
    except DeriveError as exc:
        print(f"derive: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("derive: interrupted; generated/ unchanged", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python -m derive batchnorm | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


CHECK_DESCRIPTION = """\
Grade a hand-written backward pass against derive's derivation, atom by atom.

FILE.py defines backward(t). t holds every input and named intermediate of OP's forward on one
example batch (t.logprobs, t.bndiff, t.Xb, ... for makemore_mlp; t.dout, the output's gradient,
when the output is not a scalar loss). backward returns {name: your gradient of the loss w.r.t.
that tensor} for any of the names. Each is compared with autograd as the lecture's cmp does; a
wrong one is diagnosed (shape, factor, sign, transposed, missing contribution, or following from
a wrong gradient upstream) and shown with the right formula and its code."""

CHECK_EPILOG = """\
example FILE.py:
  def backward(t):
      dlogits = t.probs.clone()
      ...
      return {"logits": dlogits, "W2": t.h.T @ dlogits}

exit status: 0 every gradient right, 1 any wrong, 2 usage error."""


def check_main(argv: Sequence[str]) -> int:
    """``python -m derive check OP --against FILE.py``: the tutor."""
    parser = argparse.ArgumentParser(
        prog="derive check",
        description=CHECK_DESCRIPTION,
        epilog=CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("op", help="a catalogue op (see derive --list) or PATH.py:FUNCTION")
    parser.add_argument("--against", required=True, type=Path, metavar="FILE.py", help="the file defining backward(t)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example batch (default 0)")
    parser.add_argument(
        "--graph", type=Path, metavar="FILE.svg", help="also draw the forward graph (.svg or .png), wrong atoms in red"
    )
    args = parser.parse_args(list(argv))
    from .tutor import check, render

    try:
        if args.graph is not None:
            graph_target(args.graph)
        grading = check(args.op, args.against, seed=args.seed)
    except DeriveError as exc:
        print(f"derive check: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    print(render(grading), end="")
    if args.graph is not None:
        wrong = frozenset(r.name for r in grading.rows if not r.ok)
        write_graph(args.graph, grading.derivation, wrong)
        print(f"Graph: {args.graph} (wrong gradients in red)")
    return 0 if grading.ok else 1


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, started: float) -> int:
    modes = [flag for flag, on in (("--list", args.list), ("--check", args.check), ("--all", args.all)) if on]
    if len(modes) > 1 or (modes and args.op):
        parser.print_usage(sys.stderr)
        asked = " and ".join(modes + ([f"the op {args.op}"] if args.op else []))
        print(f"derive: error: {asked} ask for different runs: give one", file=sys.stderr)
        return 2
    if args.list:
        for name, op in api.catalogue().items():
            first = (op.doc.splitlines() or [""])[0]
            print(f"{name:18s} {first}")
        return 0
    if args.check:
        stale = api.check(args.out)
        for line in stale:
            print(line)
        folder = "generated/" if args.out is None else f"{args.out}/"
        if stale:
            fix = (
                "run: python -m derive --all"
                if args.out is None or args.out.resolve() == api.default_out().resolve()
                else f"regenerate each with the command in its first line, with --out {args.out}"
            )
            print(f"derive: {folder} is stale ({len(stale)} file(s)); {fix}", file=sys.stderr)
            return 1
        print(f"{folder} is current")
        return 0
    if args.latex and args.format not in ("text", "latex"):
        parser.print_usage(sys.stderr)
        print(f"derive: error: --latex and --format {args.format} ask for two formats: give one", file=sys.stderr)
        return 2
    if args.graph is not None:
        graph_target(args.graph)
    if args.shard and args.out is None and not args.no_write:
        print(
            "derive: error: --shard writes a distributed module: name its folder with --out DIR "
            "(generated/ holds the single-process ones), or pass --no-write",
            file=sys.stderr,
        )
        return 2
    if args.op and ":" in args.op and args.out is None and not args.no_write:
        args.out = Path("generated")  # the user's folder: derive's own generated/ holds the catalogue alone
        if args.out.resolve() == api.default_out().resolve():
            print(
                "derive: error: generated/ here is derive's own catalogue folder (its --check would fail on "
                f"{args.op}): write your op elsewhere with --out DIR",
                file=sys.stderr,
            )
            return 2
    if args.out is not None and (args.all or (args.op and not args.no_write)):
        from .emit import writable_folder

        writable_folder(args.out)
    if args.all:
        written = api.generate_all(args.out, progress=lambda msg: print(msg, file=sys.stderr))
        print(f"{len(written)} file(s) rewritten")
        return 0
    if not args.op:
        parser.print_usage(sys.stderr)
        print("derive: error: name an op (see --list) or PATH.py:FUNCTION", file=sys.stderr)
        return 2
    fmt = "latex" if args.latex else args.format
    from .verify import usable_device

    device = "cpu" if args.device == "cpu" or args.no_verify else usable_device(args.device)
    the_op = api.resolve(args.op)
    spec = args.op if ":" in args.op else None
    progress = _progress if sys.stderr.isatty() else None
    result = api.run(
        the_op,
        out_dir=args.out,
        write=not args.no_write,
        verify=not args.no_verify,
        spec=spec,
        progress=progress,
        shard=args.shard,
        device=device,
    )
    if progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    age = process_age()
    total = age if age is not None else time.perf_counter() - started
    if fmt == "json":
        print(json.dumps(api.to_json(result, total), indent=2))
    elif not args.quiet:
        print(api.report_text(result, fmt, small=args.small), end="")
    if args.graph is not None:
        write_graph(args.graph, result.derivation)
        if fmt == "text" and not args.quiet:
            print(f"Graph: {args.graph}")
    if fmt != "json":
        print(("% " if fmt == "latex" else "") + api.summary_line(result, total))
    return 0 if result.verification is None or result.verification.ok else 1
