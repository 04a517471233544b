"""The printed derivation: forward program, chain rule, simplification, verification table.

Readable in a 100-column terminal (text), or as LaTeX / Markdown for notebooks and papers.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from . import notation
from .autodiff import grad_name
from .derivation import ChainStep, Derivation, Gradient
from .indexalg import free_indices
from .program import Statement, TensorInfo
from .verify import DOMAINS, Comparison, Verification

WIDTH = 100


@dataclass(frozen=True)
class Style:
    """How to typeset: expression printer, headings and math wrapping."""

    expr: Callable[[sympy.Basic], str]
    heading: Callable[[str], str]
    math: Callable[[str], str]


TEXT = Style(notation.text, lambda s: f"\n{s}\n{'─' * min(len(s), WIDTH)}", lambda s: s)
LATEX = Style(notation.latex, lambda s: f"\n% {s}", lambda s: f"\\[ {s} \\]")
MARKDOWN = Style(notation.latex, lambda s: f"\n### {s}\n", lambda s: f"$$ {s} $$")
STYLES = {"text": TEXT, "latex": LATEX, "markdown": MARKDOWN}


def _wrap(line: str, indent: int = 4) -> str:
    if len(line) <= WIDTH:
        return line
    return "\n".join(
        textwrap.wrap(line, WIDTH, subsequent_indent=" " * indent, break_long_words=True, break_on_hyphens=False)
    )


def _lhs(style: Style, info: TensorInfo, prefix: str = "") -> str:
    name = prefix + info.name
    return style.expr(sympy.Function(name)(*info.indices)) if info.indices else style.expr(sympy.Function(name)())


def _eq(style: Style, lhs: str, rhs: str, op: str = "=") -> str:
    if style is TEXT:
        return f"{lhs} {op} {rhs}"
    latex_op = {"=": "=", "+=": r"\;{+}{=}\;"}[op]
    return style.math(f"{lhs} {latex_op} {rhs}")


def _gathered_from(stmt: Statement) -> set[str]:
    """Tensors that ``stmt`` reads at an index given by an integer tensor."""
    from .indexalg import entry_indices, entry_name, is_entry

    return {
        entry_name(e)
        for e in sympy.preorder_traversal(stmt.expr)
        if is_entry(e) and any(is_entry(i) for i in entry_indices(e))
    }


def why(step: ChainStep) -> str:
    """Why the backward statement has the shape it has: sums, broadcasts, scatters."""
    stmt, target = step.contribution.source, step.contribution.target
    out_dims = set(stmt.target.dims)
    tdims = set(target.dims)
    reasons = []
    if target.name in _gathered_from(stmt):
        reasons.append("a gather in the forward is a scatter-add in the backward (repeated indices accumulate)")
    if stmt.kind == "max":
        reasons.append("a max passes its gradient to the argmax only")
    summed = sorted(d.name for d in out_dims - tdims)
    if stmt.kind == "contraction" and summed:
        reasons.append(f"a contraction: sum over {', '.join(summed)} with the other operand")
    elif summed:
        reasons.append(
            f"{target.name} was broadcast along {', '.join(summed)} in the forward, so the backward sums over it"
        )
    spread = sorted(d.name for d in tdims - out_dims if not d.parts)
    if spread and stmt.kind in ("sum", "max", "contraction"):
        reasons.append(
            f"{stmt.name} reduced {target.name} over {', '.join(spread)}, so d{stmt.name} is broadcast back along it"
        )
    return "; ".join(reasons)


def forward_section(d: Derivation, style: Style) -> list[str]:
    lines = [style.heading("1. Forward program, in index notation")]
    width = max((len(s.name) for s in d.program.statements), default=0)
    for s in d.program.statements:
        eq = _eq(style, _lhs(style, s.target), style.expr(s.expr))
        if style is TEXT:
            lines.append(_wrap(f"  {eq.ljust(width + 40)}  [{s.target.shape_text()}, {s.kind}]", 6))
        else:
            lines.append(eq)
    return lines


def chain_section(d: Derivation, style: Style) -> list[str]:
    lines = [style.heading("2. Chain rule, statement by statement (backward order)")]
    current = None
    for step in d.chain:
        c = step.contribution
        if c.source.name != current:
            current = c.source.name
            lines.append("")
            lines.append(
                _wrap(f"  {_eq(style, _lhs(style, c.source.target), style.expr(c.source.expr))}", 6)
                if style is TEXT
                else _eq(style, _lhs(style, c.source.target), style.expr(c.source.expr))
            )
        source_name = c.source.name.replace("_", r"\_")
        target_entry = style.expr(sympy.Function(c.target.name)(*c.indices))
        local_lhs = (
            f"∂{c.source.name}/∂{target_entry}"
            if style is TEXT
            else rf"\frac{{\partial \mathrm{{{source_name}}}}}{{\partial {target_entry}}}"
        )
        result = _eq(style, _lhs(style, c.target, "d"), style.expr(step.result), "+=")
        if style is TEXT:
            lines.append(_wrap(f"    local:  {local_lhs} = {style.expr(c.local)}", 12))
            lines.append(_wrap(f"    back:   {result}", 12))
            reason = why(step)
            if reason:
                lines.append(_wrap(f"    why:    {reason}", 12))
        else:
            lines.append(style.math(f"{local_lhs} = {style.expr(c.local)}"))
            lines.append(result)
    return lines


def fused_section(d: Derivation, style: Style) -> list[str]:
    lines = [style.heading("3. Fused gradients: the chain composed and simplified")]
    for g in d.gradients:
        lines += _fused_one(g, style)
        if style is TEXT:
            lines += [_wrap(f"    code:      {line}", 15) for line in _code_for(d, grad_name(g.wrt.name))]
    return lines


def _code_for(d: Derivation, name: str) -> list[str]:
    return code_for(d.code.backward, name)


def code_for(lines: list[str], name: str) -> list[str]:
    """The lines that assign ``name``, with the temporaries they read, in their order.

    Example:
        >>> code_for(["t1 = a * b", "t2 = c + 1", "dx = t1.sum(0)", "dy = t2", "dx = dx + 1"], "dx")
        ['t1 = a * b', 'dx = t1.sum(0)', 'dx = dx + 1']
    """
    import re

    assigned: dict[str, list[int]] = {}
    for k, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assigned.setdefault(line.split(" = ", 1)[0], []).append(k)
    wanted: set[int] = set()

    def visit(var: str) -> None:
        for k in assigned.get(var, []):
            if k not in wanted:
                wanted.add(k)
                for word in re.findall(r"\bt\d+\b", lines[k].split(" = ", 1)[1]):
                    visit(word)

    visit(name)
    return [lines[k] for k in sorted(wanted)]


def _fused_one(g: Gradient, style: Style) -> list[str]:
    lhs = _lhs(style, g.wrt, "d")
    lines = [""]
    raw = style.expr(g.raw)
    if style is TEXT:
        lines.append(f"  {lhs}")
        start = raw if len(raw) < 600 else raw[:600] + " …"
        lines.append(_wrap(f"    composed:  {start}", 15))
        for k, step in enumerate(g.steps, 1):
            lines.append(_wrap(f"    {k}. {step.rule}" + (f"  [{step.identity}]" if step.identity else ""), 8))
            lines.append(_wrap(f"       = {style.expr(step.result)}", 9))
        lines.append(_wrap(f"    result:    {lhs} = {style.expr(g.result)}", 15))
    else:
        lines.append(style.heading(f"d{g.wrt.name}"))
        for k, step in enumerate(g.steps, 1):
            lines.append(f"{k}. {step.rule}: {step.identity}" if style is MARKDOWN else f"% {k}. {step.rule}")
            lines.append(style.math(style.expr(step.result)))
        lines.append(_eq(style, lhs, style.expr(g.result)))
    return lines


def small_section(d: Derivation, style: Style, size: int = 2) -> list[str]:
    """Each fused gradient worked out entry by entry at small sizes, beside the general rule."""
    from .verify import concrete_entries

    sizes = d.program.tie(
        {dim.name: size + (1 if dim.name == d.program.dims[0].name else 0) for dim in d.program.size_dims}
    )
    size_text = ", ".join(f"{k}={v}" for k, v in sizes.items())
    lines = [style.heading(f"3b. The same gradients by hand, on a small index set ({size_text})")]
    for g in d.gradients:
        lines.append("")
        entries = concrete_entries(g.result, g.wrt, sizes)
        if style is TEXT:
            lines.append(_wrap(f"  general:  {_lhs(style, g.wrt, 'd')} = {style.expr(g.result)}", 12))
            for combo, value in entries:
                name = f"d{g.wrt.name}[{','.join(map(str, combo))}]" if combo else f"d{g.wrt.name}"
                lines.append(_wrap(f"    {name} = {style.expr(value)}", 8))
            continue
        lines.append(style.math(f"{_lhs(style, g.wrt, 'd')} = {style.expr(g.result)}"))
        for combo, value in entries:
            name = f"d{g.wrt.name}[{','.join(map(str, combo))}]" if combo else f"d{g.wrt.name}"
            lines.append(style.math(f"{notation.latex(sympy.Symbol(name))} = {style.expr(value)}"))
    return lines


def table(comparisons: list[Comparison]) -> list[str]:
    """The lecture's comparison table: name, shape ok, exact, approximate, max abs diff."""
    if not comparisons:
        return []
    width = max(12, max(len(c.name) for c in comparisons))
    out = [f"  {'gradient'.ljust(width)}  {'shape':>5}  {'exact':>5}  {'approx':>6}  {'max abs diff':>12}"]
    for c in comparisons:
        out.append(
            f"  {c.name.ljust(width)}  {_yes(c.shape_ok):>5}  {_yes(c.exact):>5}  {_yes(c.approx):>6}  {c.max_abs_diff:>12.3e}"
        )
    return out


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def verification_section(
    v: Verification, sizes: dict[str, int], style: Style, outputs: tuple[str, ...] = ()
) -> list[str]:
    size_text = ", ".join(f"{k}={n}" for k, n in sizes.items())
    where = "" if v.device == "cpu" else f" on {v.device}"
    lines = [style.heading(f"5. Verification against PyTorch autograd (float32{where}; {size_text})")]
    if v.domain != "real":  # the forward is not finite at normal inputs (a log or sqrt of one)
        lines.append(f"  float inputs drawn {DOMAINS[v.domain]}: the forward is not finite at standard normal ones")
    lines.append("  fused backward (NAME_backward):")
    lines += table(v.fused)
    if v.steps:
        lines.append("  atom-by-atom chain (NAME_backward_steps):")
        lines += table(v.steps)
        atoms = [c for c in v.steps if c.name not in outputs]
        lines.append(
            f"  bit-exact (torch.equal) with autograd through the op as written: "
            f"{sum(c.exact for c in atoms)} of {len(atoms)} atoms"
        )
    if v.gradcheck is not None:
        lines.append(
            f"  float64 gradcheck of the fused backward: {'passed' if v.gradcheck else 'FAILED ' + v.gradcheck_error}"
        )
    if v.exact:
        parts = ", ".join(f"{name}: {status}" for name, status in v.exact)
        lines.append(_wrap(f"  exact check (forward expanded at sizes 2-3, differentiated directly): {parts}", 4))
    if style is MARKDOWN:  # preformatted, or Markdown runs the table's lines together into one paragraph
        return [lines[0], "```text", *lines[1:], "```"]
    return lines


def header(d: Derivation, style: Style) -> list[str]:
    program = d.program
    lines = [f"derive · {program.name}" if style is TEXT else f"% derive: {program.name}"]
    if program.doc:
        lines.append(f"  {program.doc.splitlines()[0]}")
    lines.append("")
    lines.append(
        "  inputs:  "
        + ", ".join(
            f"{t.name} [{t.shape_text()}{', int' if t.is_int else ''}{', const' if t.const else ''}]"
            for t in program.inputs
        )
    )
    if program.params:
        lines.append("  params:  " + ", ".join(f"{p.name} = {p.default!r} (kept symbolic)" for p in program.params))
    label = "outputs:" if program.several_outputs else "output: "
    shown = ", ".join(f"{o} [{program.tensors[o].shape_text()}]" for o in program.outputs)
    lines.append(f"  {label} {shown}")
    for note in d.notes:
        lines.append(_wrap(f"  note:    {note}", 11))
    if d.code.shard is not None:
        reductions = sharded_reductions(d)
        lines += [_wrap(f"  {'sharded:' if k == 0 else ''.ljust(8)} {line}", 11) for k, line in enumerate(reductions)]
    if style is MARKDOWN:
        return [f"## derive: {program.name}", "", "```text", *lines[1:], "```"]
    return lines


def sharded_reductions(d: Derivation) -> list[str]:
    """What a sharded op all-reduces: each reduction over the split dim, where the code computes it."""
    import re

    local, total = d.code.shard or ("", "")
    from .indexalg import dim_named_by_size

    out = [f"{dim_named_by_size(local)} is split across the processes of `group`; {total} is its size over all of them"]
    for part, lines in (("forward", d.code.forward), ("backward", d.code.backward)):
        found = [line for line in lines if "_all_reduce(" in line]
        out.append(f"{part}: {len(found)} all-reduce(s)" + (":" if found else ""))
        out += [f"  {re.sub(r'_all_reduce', 'all_reduce', line)}" for line in found]
    return out


def render(
    d: Derivation,
    style_name: str = "text",
    verification: Verification | None = None,
    sizes: dict[str, int] | None = None,
    written: str = "",
    small: bool = False,
) -> str:
    """The whole derivation as one string."""
    style = STYLES[style_name]
    lines = header(d, style)
    lines += forward_section(d, style)
    if style is MARKDOWN:  # the program as a graph: GitHub and Jupyter draw Mermaid blocks
        from .graph import graph_of, mermaid

        lines += ["", mermaid(graph_of(d)), ""]
    lines += chain_section(d, style)
    lines += fused_section(d, style)
    if small:
        lines += small_section(d, style)
    lines.append(style.heading("4. Generated code"))
    lines.append(f"  {written}" if written else "  (not written)")
    if verification is not None:
        lines += verification_section(verification, sizes or {}, style, d.program.outputs)
    if style is LATEX:  # all but the displays as % comments, so the output pastes into a .tex file
        lines = [
            line if not line.strip() or line.lstrip().startswith(("%", "\\[")) else f"% {line}"
            for line in "\n".join(lines).splitlines()
        ]
    return "\n".join(lines) + "\n"


def timings_line(timings: dict[str, float], total: float) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in timings.items())
    return f"Took {total:.2f} s in all, imports included ({parts} s)."


__all__ = ["Statement", "free_indices", "grad_name", "render", "table", "timings_line", "why"]
