"""Emission: render the generated module through Jinja2, format with black, write atomically."""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from .autodiff import grad_name
from .derivation import Derivation
from .errors import OutputPathError
from .lowering.code import values_only_maxes
from .lowering.printer import size_code
from .notation import text

if TYPE_CHECKING:
    import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _template_folder() -> Path:
    """The repository's templates/, or the installed copy (package ``derive_templates``)."""
    if (TEMPLATES / "module.py.j2").is_file():
        return TEMPLATES
    import importlib.util

    spec = importlib.util.find_spec("derive_templates")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("derive's templates are not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """One environment per process: it caches the compiled template (compiling costs ~50 ms)."""
    import jinja2  # here, not at import: a run whose module is cached never renders

    folder = _template_folder()
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        trim_blocks=True,
        lstrip_blocks=False,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


def _used(lines: list[str], keys: list[str]) -> list[str]:
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", "\n".join(lines)))
    return [k for k in keys if k in words]


def docstring(d: Derivation, kept: list[str] | None = None) -> str:
    """The module docstring: the forward program, the derived fused formulas, what the forward keeps."""
    lines = ["Forward, in index notation:"]
    for s in d.program.statements:
        lines.append(f"    {text(s.target.at())} = {text(s.expr)}")
    lines.append("")
    lines.append("Fused gradients (derived by SymPy, simplified by derive):")
    for g in d.gradients:
        lines.append(f"    {text(g.wrt.at()).replace(g.wrt.name, grad_name(g.wrt.name), 1)} = {text(g.result)}")
    if kept is not None:
        lines += ["", "Kept by the forward for the fused backward: " + (", ".join(kept) or "nothing") + "."]
        for name, equation, host in d.code.saved_values:
            if name in kept:
                lines.append(f"    {equation}: part of {host}, kept so the backward does not evaluate it again")
        lines.append("The backward recomputes anything else it needs from these.")
    return "\n".join(lines).replace("\\", "\\\\")


def _saved_names(d: Derivation) -> set[str]:
    return {name for name, _, _ in d.code.saved_values}


def _dims_text(info) -> str:
    return "[" + ", ".join("1" if d is None else str(d.size) for d in info.layout) + "]"


def prologue(d: Derivation) -> list[str]:
    """Input checks and size variables: wrong shapes or dtypes raise instead of broadcasting."""
    program = d.program
    name = program.name
    lines: list[str] = []
    floats = [t for t in program.inputs if not t.is_int]
    for t in program.inputs:
        lines.append(
            f"if {t.name}.dim() != {len(t.layout)}:\n"
            f'    raise ValueError(f"{name}: {t.name} must be {_dims_text(t)}, got shape {{tuple({t.name}.shape)}}")'
        )
        if t.is_int:
            lines.append(
                f"if {t.name}.dtype != torch.int64:\n"
                f'    raise TypeError(f"{name}: {t.name} must be an int64 index tensor, got {{{t.name}.dtype}}")'
            )
        elif t is not floats[0]:
            first = floats[0].name
            lines.append(
                f"if {t.name}.dtype != {first}.dtype:\n"
                f'    raise TypeError(f"{name}: {t.name} is {{{t.name}.dtype}} but {first} is {{{first}.dtype}}")'
            )
        else:
            lines.append(
                f"if not {t.name}.is_floating_point():\n"
                f'    raise TypeError(f"{name}: {t.name} must be a floating-point tensor, got {{{t.name}.dtype}}")'
            )
    for p in program.params:  # the derivation took them positive (Param.symbol)
        lines.append(
            f"if not {p.name} > 0:\n"
            f'    raise ValueError(f"{name}: {p.name} must be positive (derive derived it as a positive symbol), got {{{p.name}!r}}")'
        )
    defined = {var: src for var, src in d.code.sizes}
    lines += [f"{var} = {src}" for var, src in d.code.sizes]
    for t in program.inputs:
        for axis, dim in enumerate(t.layout):
            want = "1" if dim is None else str(dim.size).replace(" ", "")
            if dim is not None and defined.get(want) == f"{t.name}.shape[{axis}]":
                continue
            lines.append(
                f"if {t.name}.shape[{axis}] != {want}:\n"
                f'    raise ValueError(f"{name}: {t.name} must be {_dims_text(t)}{_size_values(t)}, got shape {{tuple({t.name}.shape)}}")'
            )
    for index, size in _index_ranges(program):  # x[-1] would read the last row, and its gradient fail
        lines.append(
            f"if {index}.device.type == 'cpu' and not _compiling() and {index}.numel():\n"
            f"    _low, _high = map(int, torch.aminmax({index}))  # one pass\n"
            f"    if not 0 <= _low <= _high < {size}:\n"
            f'        raise ValueError(f"{name}: {index} indexes a dim of size {size}={{{size}}}: its values must be '
            f'in [0, {size}), got [{{_low}}, {{_high}}]")'
        )
    dims = {dim.name: dim for dim in program.dims}
    for tied, partner in program.ties:
        # a window's count is its source's size in arithmetic (floor(T/2) for tw), not a variable
        a = size_code(dims[tied].size) if tied in dims else tied.upper()
        p_name = str(dims[partner].size_name or partner.upper()) if partner in dims else partner.upper()
        b = size_code(dims[partner].size) if partner in dims else p_name
        b_text = p_name if b == p_name else f"{p_name} = {b}"
        lines.append(
            f"if {a} != {b}:\n"
            f'    raise ValueError(f"{name}: dim {tied} is dim {partner} renamed, so {a} must equal {b_text}, got {a}={{{a}}}, {p_name}={{{b}}}")'
        )
    for dim in (x for x in program.dims if x.derived is not None and not x.derived.is_positive):
        size = size_code(dim.size)
        lines.append(
            f"if {size} < 1:\n"
            f'    raise ValueError(f"{name}: dim {dim.label} is too short for the window cut from it ({dim.name} would have {size} = {{{size}}} positions), got {_size_values_all(d)}")'
        )
    if d.code.shard is not None:  # sizes in arithmetic are the whole group's
        local, total = d.code.shard
        lines.append(f"{total} = _global_size({local}, group)")
    for denominator in _size_denominators(d):
        if d.code.shard is not None:
            denominator = re.sub(rf"\b{d.code.shard[0]}\b", d.code.shard[1], denominator)
        lines.append(
            f"if {denominator} == 0:\n"
            f'    raise ValueError(f"{name}: needs {denominator} != 0 (the formulas divide by it), got {_size_values_all(d)}")'
        )
    return lines


def _index_ranges(program) -> list[tuple[str, str]]:
    """Each integer input read whole as one index of a tensor (``x[n, idx[n]]``), and the size of the
    dim it indexes there, where that is one plain size (on a CPU: a check on the device would wait)."""
    import sympy

    from .indexalg import entry_indices, entry_name, is_entry

    ints = {t.name for t in program.inputs if t.is_int}
    found: dict[str, set[str]] = {}
    for stmt in program.statements:
        for e in sympy.preorder_traversal(stmt.expr):
            if not is_entry(e) or entry_name(e) not in program.tensors:
                continue
            layout = program.tensors[entry_name(e)].layout
            for axis, i in enumerate(entry_indices(e)):
                if is_entry(i) and entry_name(i) in ints and axis < len(layout) and layout[axis] is not None:
                    found.setdefault(entry_name(i), set()).add(size_code(layout[axis].size))
    return [(t, next(iter(sizes))) for t, sizes in sorted(found.items()) if len(sizes) == 1]


def _size_values(info) -> str:
    names = []
    for d in info.dims:
        for part in d.parts or (d,):
            if not part.size.is_number:  # a window's fixed size is in the shape itself (not "3=3")
                names.append(str(part.size))
    text = ", ".join(f"{n}={{{n}}}" for n in dict.fromkeys(names))
    return f" with {text}" if text else ""


def _size_values_all(d: Derivation) -> str:
    return ", ".join(f"{var}={{{var}}}" for var, _ in d.code.sizes)


def _size_denominators(d: Derivation) -> list[str]:
    """Size expressions such as ``N`` or ``N - 1`` that the forward or backward divides by (a mean
    over an empty batch would otherwise stop on Python's ZeroDivisionError)."""
    import sympy

    from .indexalg import tensor_names

    exprs = [s.expr for s in d.program.statements] + [g.result for g in d.gradients] + [c.result for c in d.chain]
    found: dict[str, None] = {}
    for e in exprs:
        for p in sorted(e.atoms(sympy.Pow), key=sympy.default_sort_key):  # a set: sorted, for one text
            base = p.base
            if (
                p.exp.is_negative
                and base.free_symbols
                and all(s.is_positive and s.is_integer for s in base.free_symbols)
                and not tensor_names(base)  # a scalar tensor's entry (out2()) has no free symbols
            ):
                found[size_code(base)] = None
    return list(found)


def render(d: Derivation, command: str | None = None, formatted: bool = True) -> str:
    """The generated module's source, black-formatted; byte-for-byte deterministic.

    ``formatted=False`` skips black (the same code, laid out by the template only): for checks that
    only run the module, where formatting is a third of the cost.
    """
    program, code = d.program, d.code
    out = program.tensors[program.output]
    params = [f"{p.name}={p.default!r}" for p in program.params]
    signature = ", ".join([t.name for t in program.inputs] + (["*"] + params if params else []))
    size_vars = [v for v, _ in code.sizes] + ([code.shard[1], "group"] if code.shard else [])
    keys = code.saved + size_vars + [p.name for p in program.params]
    seed_lines = _seed_lines(program, keys)
    # the forward keeps what the fused backward reads, plus the inputs (references, no copies)
    # so that the atom-by-atom chain can recompute what only it needs
    backward = code.backward + (code.in_blocks.lines if code.in_blocks else [])
    wanted = set(_used(backward, keys)) | {t.name for t in program.inputs} | set(size_vars)
    wanted |= {p.name for p in program.params} | ({out.name} if not out.layout else set())
    wanted |= set(program.outputs) if program.several_outputs else set()  # zeros for an unused one
    kept = [k for k in dict.fromkeys([t.name for t in program.inputs] + keys) if k in wanted]
    steps_only = [k for k in _used(code.backward_steps, keys) if k not in wanted]
    # _keep_all=True keeps every named intermediate too (what a learner compares, as in the lecture)
    keep_all = steps_only + [s.name for s in program.statements if s.name not in wanted and s.name not in steps_only]
    forward, keep_all_lines = values_only_maxes(code.forward, wanted | set(program.outputs))
    uses_math = any(re.search(r"\bmath\.", line) for line in code.forward + code.backward + code.backward_steps)
    every_line = code.forward + code.backward + code.backward_steps + (code.in_blocks.lines if code.in_blocks else [])
    uses_windows = any("_add_windows(" in line for line in every_line)
    checks = prologue(d)
    source = (
        _environment()
        .get_template("module.py.j2")
        .render(
            header=f"Generated by `{command or 'python -m derive ' + program.name}`. Do not edit: regenerate.",
            docstring=docstring(
                d, [k for k in _used(code.backward, keys) if k in program.tensors or k in _saved_names(d)]
            ),
            name=program.name,
            grads=[t.name for t in program.differentiable_inputs],
            signature=signature,
            forward_signature=", ".join(
                [t.name for t in program.inputs]
                + ["*"]
                + params
                + (["group=None"] if code.shard else [])
                + ["_keep_all=False"]
            ),
            shard=code.shard,
            prologue=checks,
            index_checks=any("_compiling()" in line for line in checks),
            annotated=", ".join(
                [f"{t.name}: torch.Tensor" for t in program.inputs]
                + [f"{p.name}: float = {float(p.default)!r}" for p in program.params]  # defaults in the schema
            ),
            n_inputs=len(program.inputs),
            param_names=[p.name for p in program.params],
            param_defaults=[repr(float(p.default)) for p in program.params],
            positional=", ".join([t.name for t in program.inputs] + [p.name for p in program.params]),
            # the differentiable function's: a sharded op's takes the process group too
            fn_signature=signature + ((", " if params else ", *, ") + "group=None" if code.shard else ""),
            fn_positional=", ".join(
                [t.name for t in program.inputs] + [p.name for p in program.params] + (["group"] if code.shard else [])
            ),
            fn_call_args=", ".join(
                [t.name for t in program.inputs]
                + [f"{p.name}={p.name}" for p in program.params]
                + (["group=group"] if code.shard else [])
            ),
            call_args=", ".join([t.name for t in program.inputs] + [f"{p.name}={p.name}" for p in program.params]),
            backward_returns=[f"grads.{t.name}" if t.differentiable else "None" for t in program.inputs]
            + ["None"] * len(program.params),
            fn_returns=[f"grads.{t.name}" if t.differentiable else "None" for t in program.inputs]
            + ["None"] * (len(program.params) + (1 if code.shard else 0)),
            forward=forward,
            keep_all_lines=keep_all_lines,
            saved=kept,
            steps_only=steps_only,
            keep_all=keep_all,
            uses_math=uses_math,
            uses_windows=uses_windows,
            recompute_args=", ".join(
                [f'saved["{t.name}"]' for t in program.inputs]
                + [f'{p.name}=saved["{p.name}"]' for p in program.params]
                + (['group=saved["group"]'] if code.shard else [])
            ),
            output=f"({', '.join(program.outputs)})" if program.several_outputs else program.output,
            several=program.several_outputs,
            grad_param="grad_outputs" if program.several_outputs else "grad_output",
            n_outputs=len(program.outputs),
            unpack=_used(code.backward, keys),
            backward_keys=_used(backward + [seed_lines], keys),  # (the seed lines check the shape)
            blocked=code.in_blocks,
            unpack_blocked=(
                [k for k in _used(code.in_blocks.lines, keys) if k not in code.in_blocks.rebound]
                if code.in_blocks
                else []
            ),
            unpack_steps=_used(code.backward_steps, keys),
            seed_lines=seed_lines,
            backward=code.backward,
            backward_steps=code.backward_steps,
            steps_outputs=code.steps_outputs,
        )
    )
    if not formatted:
        return source
    import black  # about 0.3 s to import: only when a module is rendered

    return black.format_str(source, mode=black.Mode(line_length=100))


def _saved_shape(layout) -> str:
    """Code for the shape of a tensor of ``layout``, its sizes read from ``saved`` (``(saved["N"], 1)``)."""
    parts = []
    for d in layout:
        if d is None:
            parts.append("1")
            continue
        code = size_code(d.size)
        for sym in sorted(d.size.free_symbols, key=str):
            code = re.sub(rf"\b{sym}\b", f'saved["{sym}"]', code)
        parts.append(code)
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


def _seed_lines(program, keys: list[str]) -> str:
    """The backward's first lines: the gradients the caller gives, one per output.

    A scalar output's may be None (1, a loss); with several outputs, None means that output is
    unused (a zero gradient). ``keys`` gains the outputs the lines read from ``saved``.
    """
    if not program.several_outputs:
        out = program.tensors[program.output]
        seed = program.seed_name(out.name)
        if out.layout:
            missing = f'raise ValueError("{program.name}: grad_output is required for a non-scalar output")'
            shape = _saved_shape(out.layout)
            check = (
                f"\n    _shape = {shape}\n    if tuple(grad_output.shape) != _shape:\n        raise ValueError("
                f"f\"{program.name}: grad_output must have the output's shape {{_shape}}, "
                f'got {{tuple(grad_output.shape)}}")'
            )
        else:
            missing = f'grad_output = torch.ones_like(saved["{out.name}"])'
            check = ""
            if out.name not in keys:
                keys.append(out.name)
        return f"    if grad_output is None:\n        {missing}{check}\n    {seed} = grad_output"
    seeds = [program.seed_name(o) for o in program.outputs]
    count, names = len(seeds), ", ".join(program.outputs)
    given = (
        "{type(grad_outputs).__name__}{f' of {len(grad_outputs)}' if isinstance(grad_outputs, (tuple, list)) else ''}"
    )
    lines = [
        f"    if not isinstance(grad_outputs, (tuple, list)) or len(grad_outputs) != {count}:\n"
        f'        raise ValueError(f"{program.name}: grad_outputs must be {count} gradients, one per output '
        f'({names}; None for an unused one), got {given}")',
        f"    {', '.join(seeds)} = grad_outputs",
    ]
    for o, seed in zip(program.outputs, seeds):
        lines.append(
            f'    if {seed} is None:  # {o} unused\n        {seed} = torch.zeros_like(saved["{o}"])\n'
            f'    elif tuple({seed}.shape) != tuple(saved["{o}"].shape):\n'
            f'        raise ValueError(f"{program.name}: the gradient of {o} must have its shape '
            f"{{tuple(saved['{o}'].shape)}}, got {{tuple({seed}.shape)}}\")"
        )
        if o not in keys:
            keys.append(o)
    return "\n".join(lines)


def write_atomic(path: Path, content: str | bytes) -> bool:
    """Write ``content`` (text, or bytes such as a PNG) to ``path`` via a temp file and rename; skip if
    unchanged. True if written."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.exists() and path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; a written file is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def writable_folder(out_dir: Path, option: str | None = None) -> Path:
    """``out_dir`` if it can be written (or created, by the write itself); else an
    :class:`OutputPathError` naming why.

    Checked before any work, so that a long derivation is not lost to a typo in ``--out``; nothing
    is created here, so a run that fails leaves no empty folder behind.
    ``option`` is how the message names the path (default ``--out DIR``).
    """
    label = option or f"--out {out_dir}"
    blocker = next((p for p in [out_dir, *out_dir.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputPathError(f"{label}: {blocker} is a file, not a folder")
    what = "write there" if blocker == out_dir else "create the folder"
    if blocker is None or not os.access(blocker, os.W_OK | os.X_OK):
        raise OutputPathError(f"{label}: cannot {what} (permission denied in {blocker})")
    try:  # a read-only file system, which os.access does not see for root
        tempfile.TemporaryFile(dir=blocker).close()
    except OSError as exc:
        raise OutputPathError(f"{label}: cannot {what} ({exc.strerror})") from None
    return out_dir


def output_path(out_dir: Path, name: str) -> Path:
    """``out_dir/name.py``, refusing names that would leave ``out_dir``."""
    if not name.isidentifier():
        raise OutputPathError(f"'{name}' is not a valid module name")
    path = (out_dir / f"{name}.py").resolve()
    if path.parent != out_dir.resolve():
        raise OutputPathError(f"output path {path} escapes {out_dir}")
    return path
