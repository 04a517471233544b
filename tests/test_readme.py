"""README.md's examples run as written, in the order a reader meets them.

:func:`test_readme_walkthrough` follows README.md from top to bottom in an empty folder, as a user
would: a ```python block whose first line names a file (``# my_ops.py``) is saved as that file, a
``python -m derive ...`` line of a ```bash block is run (in-process), and every other ```python
block is executed; a ``print(...)  # expected`` line must print what its comment says. The op file
is also derived with the public API, and the formula, catalogue and summary line that README.md
quotes are checked against derive.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from derive import api, catalogue, derive
from derive.cli import main as cli_main
from derive.verify import example_inputs

from .conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
FILE_COMMENT = re.compile(r"^#\s*(?P<name>[\w./-]+\.py)\s*$")


def fenced_blocks() -> list[tuple[str, str]]:
    """``(language, body)`` of README's fenced blocks, in order."""
    return [(m.group("lang"), m.group("body")) for m in FENCE.finditer(README)]


def file_name(body: str) -> str | None:
    """``my_ops.py`` for a python block that starts with ``# my_ops.py``: a file to save, not a snippet."""
    m = FILE_COMMENT.match(body.splitlines()[0]) if body.strip() else None
    return m.group("name") if m else None


def derive_commands(body: str) -> list[tuple[list[str], int]]:
    """``(argv after python -m derive, exit status)`` for the lines of a bash block that use README's files.

    Those derive an op from a file the README has shown, or ``check`` one; the status is 0 unless
    the line's comment says ``exits N``. ``train`` runs (minutes, and the lecture's data) are
    tested in test_train.py, the catalogue commands in test_cli.py.
    """
    out = []
    for line in body.splitlines():
        command, _, comment = line.partition("#")
        argv = shlex.split(command)
        status = re.search(r"\bexits (\d)", comment)
        if argv[:3] == ["python", "-m", "derive"] and len(argv) > 3 and (".py:" in argv[3] or argv[3] == "check"):
            out.append((argv[3:], int(status.group(1)) if status else 0))
    return out


def expected_prints(source: str) -> list[str]:
    """The comments after ``print(...)`` calls: what README.md says each prints."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+)$", source, re.M)]


def op_names(source: str) -> list[str]:
    """Functions decorated with ``@op(...)`` in a source file."""
    return re.findall(r"^@op\(.*?\)\s*\ndef (\w+)", source, re.S | re.M)


FILES = {
    name: body for lang, body in fenced_blocks() if lang == "python" and (name := file_name(body)) and "@op(" in body
}


@pytest.fixture
def reader_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working folder on ``sys.path`` (as the current folder is for ``python script.py``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:  # packages the README made here (my_generated, ...)
        module = sys.modules.get(name)
        if module is not None and str(getattr(module, "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_readme_walkthrough(reader_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    # torch.compile of the model example costs ~10 s on a CPU; compiling generated code is tested in
    # test_integration.py, so here the README's model runs eagerly (as its comment offers).
    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: model)
    ran = {"files": 0, "commands": 0, "snippets": 0}
    for k, (lang, body) in enumerate(fenced_blocks()):
        where = f"README.md block {k} ({lang}, starting {body.splitlines()[0][:60]!r})"
        if lang == "python" and file_name(body):
            (reader_folder / file_name(body)).write_text(body, encoding="utf-8")
            ran["files"] += 1
        elif lang == "python":
            with torch.random.fork_rng():
                exec(compile(body, f"<{where}>", "exec"), {"__name__": "__main__"})
            printed = [line.strip() for line in capsys.readouterr().out.splitlines()]
            for want in expected_prints(body):
                assert want in printed, f"{where}: README says {want!r}; it printed {printed}"
            ran["snippets"] += 1
        elif lang == "bash":
            for argv, expected in derive_commands(body):
                status = cli_main(argv)
                captured = capsys.readouterr()
                assert (
                    status == expected
                ), f"{where}: `python -m derive {shlex.join(argv)}` exited {status}: {captured.err}"
                if argv[0] == "check":  # the output README shows is what a reader gets
                    assert captured.out in README, f"{where}: README shows other output than:\n{captured.out}"
                ran["commands"] += 1
    assert ran["files"] and ran["commands"] and ran["snippets"] >= 2, ran


@pytest.mark.parametrize("filename", sorted(FILES))
def test_op_file_derives_verifies_and_writes_with_the_api(filename: str, tmp_path: Path):
    source = FILES[filename]
    path = tmp_path / filename
    path.write_text(source, encoding="utf-8")
    names = op_names(source)
    assert names, f"{filename} in README.md declares no @op function"
    for name in names:
        result = api.run(api.resolve(f"{path}:{name}"), out_dir=tmp_path / "out", spec=f"{filename}:{name}")
        assert result.verification is not None and result.verification.ok
        assert result.written and result.path == tmp_path / "out" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_readme_{name}", result.path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        program = result.derivation.program
        inputs = [
            x.requires_grad_() if t.differentiable else x
            for x, t in zip(example_inputs(program, result.sizes, torch.float64), program.inputs)
        ]
        out, saved = getattr(module, f"{name}_forward")(*inputs)
        if program.several_outputs:
            grads = getattr(module, f"{name}_backward")(tuple(torch.ones_like(o) for o in out), saved)
        else:
            grads = getattr(module, f"{name}_backward")(torch.ones_like(out) if out.dim() else None, saved)
        assert set(grads._fields) == {t.name for t in program.differentiable_inputs}
        outs = getattr(module, name)(*inputs)  # the differentiable function runs the fused backward
        sum(o.sum() for o in (outs if program.several_outputs else [outs])).backward()
        for x, t in zip(inputs, program.inputs):
            if t.differentiable:
                torch.testing.assert_close(x.grad, getattr(grads, t.name))


def test_quoted_batchnorm_formula_is_what_derive_finds():
    m = re.search(r"`(dx\[n, d\] = [^`]+)`", README)
    assert m, "README.md no longer quotes batchnorm's dx"
    assert derive(catalogue()["batchnorm"]).formula("x") == m.group(1)


def test_catalogue_section_names_every_op():
    section = README.split("## The catalogue", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+)`", section))
    assert named == set(
        catalogue()
    ), f"missing: {sorted(set(catalogue()) - named)}, unknown: {sorted(named - set(catalogue()))}"


def test_quiet_run_prints_the_summary_line_readme_shows(capsys: pytest.CaptureFixture):
    m = re.search(r"^\$ python -m derive (\w+) -q\n(.+)$", README, re.M)
    assert m, "README.md no longer shows a `-q` run"
    assert cli_main([m.group(1), "-q", "--no-write"]) == 0
    shown = re.escape(m.group(2)).replace(r"1\.9", r"[\d.]+").replace(r"\(\.\.\.\)", r"\(.+\)")
    assert re.fullmatch(shown, capsys.readouterr().out.strip())


def test_cli_reference_lists_every_option():
    from derive.cli import build_parser

    block = README.split("## CLI reference", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    actions = [
        a.option_strings for a in build_parser()._actions if a.option_strings and "--help" not in a.option_strings
    ]
    missing = [
        flags[-1]
        for flags in actions
        if not any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", block) for f in flags)
    ]
    assert not missing, f"README.md's CLI reference does not show {missing}"


def test_quoted_mlp_backward_is_what_derive_generates(tmp_path: Path):
    section = README.split("### A layer in one expression", 1)[1].split("\n## ", 1)[0]
    quoted = [body for lang, body in (m.groups() for m in FENCE.finditer(section)) if lang == "text"][0]
    path = tmp_path / "my_layers.py"
    path.write_text(FILES["my_layers.py"], encoding="utf-8")
    source = api.run(api.resolve(f"{path}:mlp_mse"), write=False, verify=False).source
    body = source.split("def mlp_mse_backward(", 1)[1].split("    dloss = grad_output\n", 1)[1]
    lines = [line[4:] for line in body.split("    return mlp_mse_Grads(", 1)[0].splitlines()]
    assert quoted.strip().splitlines() == lines


def test_quoted_row_block_loop_is_the_generated_layer_norms():
    section = README.split("### A large batch, a block of rows at a time", 1)[1].split("\n## ", 1)[0]
    quoted = [body for lang, body in (m.groups() for m in FENCE.finditer(section)) if lang == "text"][0]
    generated = (REPO / "generated" / "layernorm.py").read_text(encoding="utf-8")
    blocked = generated.split("def _layernorm_backward_in_blocks(", 1)[1]
    lines = [line[4:] for line in blocked.splitlines() if line.startswith("    ")]
    start = lines.index(quoted.splitlines()[0])
    assert lines[start : start + len(quoted.splitlines())] == quoted.splitlines()
