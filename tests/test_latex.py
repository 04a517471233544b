"""``--format latex|markdown|json`` output, checked by real consumers.

Every display (``\\[ ... \\]`` in LaTeX, ``$$ ... $$`` in Markdown) is rendered to a PNG by
matplotlib's mathtext, a strict parser of a subset of LaTeX math: a construct it does not know, or a
brace out of place, fails here instead of in the user's notebook or paper. JSON must parse.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import re
import sys
import types

import pytest

import derive as derive_pkg
from derive import api, catalogue, derive
from derive.cli import main as cli_main
from derive.notation import text
from derive.report import render

OPS = ["batchnorm", "cross_entropy"]
DISPLAY = {"latex": re.compile(r"^\\\[ (.*) \\\]$"), "markdown": re.compile(r"^\$\$ (.*) \$\$$")}
PNG = b"\x89PNG"


@functools.lru_cache(maxsize=None)
def printed(op: str, fmt: str) -> str:
    """What ``python -m derive OP --format FMT --no-write`` prints (run in-process, once per session)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main([op, "--format", fmt, "--no-write"])
    assert status == 0, err.getvalue()
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def derivation(op: str):
    return derive(catalogue()[op])


def displays(op: str, fmt: str) -> list[str]:
    found = [m.group(1) for line in printed(op, fmt).splitlines() if (m := DISPLAY[fmt].match(line.strip()))]
    assert found, f"no math displays in the {fmt} output of {op}"
    return found


@functools.lru_cache(maxsize=None)
def render_error(math: str) -> str | None:
    """``None`` if mathtext typesets ``math`` to a PNG, else its parse error (each display rendered once).

    Skips the calling test when matplotlib is not installed (it is in the ``test`` extra).
    """
    mathtext = pytest.importorskip("matplotlib.mathtext")
    buf = io.BytesIO()
    try:
        mathtext.math_to_image(f"${math}$", buf, dpi=40, format="png")
    except ValueError as exc:
        return str(exc).strip().splitlines()[-1]
    return None if buf.getvalue().startswith(PNG) else "no PNG written"


def unrenderable(maths: list[str]) -> list[str]:
    """One line per display mathtext rejects: its parse error, then the display."""
    return [f"{error}\n      in: {math[:200]}" for math in maths if (error := render_error(math))]


@pytest.mark.parametrize("fmt", ["latex", "markdown"])
@pytest.mark.parametrize("op", OPS)
def test_every_display_renders_with_mathtext(op: str, fmt: str):
    maths = displays(op, fmt)
    failures = unrenderable(maths)
    assert not failures, f"{len(failures)} of {len(maths)} displays do not render:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("fmt", ["latex", "markdown"])
@pytest.mark.parametrize("op", OPS)
def test_subscripts_are_subscripts(op: str, fmt: str):
    r"""An escaped ``\_`` is for underscores inside names (``\mathrm{var\_inv}``) only.

    ``\_{d\_{2}}`` typesets a literal "_d_2" instead of a subscript, and ``\\_`` is a line break
    followed by a stray ``_``; mathtext accepts the first silently, so both are looked for here.
    """
    bad = [m for m in displays(op, fmt) if r"\_{" in m or "\\\\_" in m]
    assert not bad, f"{len(bad)} displays escape a subscript, e.g. {bad[0][:200]}"


@pytest.mark.parametrize("small", [False, True], ids=["", "small"])
@pytest.mark.parametrize("op", OPS)
def test_latex_output_pastes_into_a_tex_file(op: str, small: bool, tmp_path):
    """Outside the displays only comments (header, file written, verification table); ``--small`` included."""
    result = api.run(api.resolve(op), out_dir=tmp_path)
    if small and "small" not in inspect.signature(api.report_text).parameters:
        pytest.skip("no --small section in this version")
    out = api.report_text(result, "latex", small=True) if small else api.report_text(result, "latex")
    stray = [line for line in out.splitlines() if line.strip() and not line.lstrip().startswith(("%", "\\["))]
    assert not stray, f"{len(stray)} lines are neither a display nor a % comment, e.g. {stray[:3]}"
    maths = [m.group(1) for line in out.splitlines() if (m := DISPLAY["latex"].match(line.strip()))]
    failures = unrenderable(maths)
    assert not failures, f"{len(failures)} of {len(maths)} displays do not render:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("op", OPS)
def test_latex_shows_each_fused_gradient_as_an_equation(op: str):
    maths = displays(op, "latex")
    for g in derivation(op).gradients:
        lhs = "\\mathrm{d%s}" % g.wrt.name.replace("_", "\\_")
        assert any(m.startswith(lhs) and " = " in m for m in maths), f"no display of d{g.wrt.name} = ..."


def _notebook_markdown(d) -> str:
    """What a Jupyter notebook displays for ``d``: the Markdown formatter derive registers in IPython."""
    registered: dict = {}

    class Formatter:
        def for_type(self, cls, fn):
            registered[cls] = fn

    class Shell:
        display_formatter = types.SimpleNamespace(formatters={"text/markdown": Formatter()})

    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: Shell()  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "IPython", fake)
        assert derive_pkg.show_in_notebooks()
    return registered[type(d)](d)


@pytest.mark.parametrize("op", OPS)
def test_markdown_has_headings_and_is_what_a_notebook_shows(op: str):
    out = printed(op, "markdown")
    headings = [line for line in out.splitlines() if line.startswith("#")]
    assert any("Forward program" in h for h in headings) and any("Fused gradients" in h for h in headings)
    d = derivation(op)
    notebook = _notebook_markdown(d)
    assert notebook == render(d, "markdown")
    assert not unrenderable([m.group(1) for line in notebook.splitlines() if (m := DISPLAY["markdown"].match(line))])


@pytest.mark.parametrize("op", OPS)
def test_json_parses_and_agrees_with_the_derivation(op: str):
    record = json.loads(printed(op, "json"))
    d = derivation(op)
    assert record["op"] == op
    assert [g["wrt"] for g in record["gradients"]] == [g.wrt.name for g in d.gradients]
    assert [g["formula"] for g in record["gradients"]] == [text(g.result) for g in d.gradients]
    assert [t["name"] for t in record["inputs"]] == [t.name for t in d.program.inputs]
    assert record["verification"]["ok"] is True
    assert record["generated"] is None  # --no-write
    assert record["timings"]["total"] > 0
