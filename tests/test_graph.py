"""The derivation as a picture: --graph FILE.svg (or .png), a Mermaid block in Markdown, wrong atoms in red."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from derive.graph import graph_of, layout, mermaid, picture

from .conftest import derive_cli, derived

REPO = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"


def _derive(*args: str) -> subprocess.CompletedProcess:
    return derive_cli(*args)


def _texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_batchnorm_graph_has_every_tensor_its_shape_and_its_gradient(tmp_path):
    path = tmp_path / "bn.svg"
    r = _derive("batchnorm", "--no-write", "--graph", str(path))
    assert r.returncode == 0, r.stderr
    texts = _texts(path)
    d, _ = derived("batchnorm")
    for t in list(d.program.inputs) + [s.target for s in d.program.statements]:
        assert f"{t.name}  [{t.shape_text()}]" in texts, t.name
    assert "dgamma[d] = Σ_n(dout[n, d]*xhat[n, d])" in texts  # a fused formula, as text
    root = ET.parse(path).getroot()
    assert len(list(root.iter(f"{SVG}line"))) == len(graph_of(d).edges)
    assert f"Graph: {path}" in r.stdout


def test_a_graph_that_cannot_be_drawn_is_a_usage_error_before_any_work(tmp_path, monkeypatch):
    r = _derive("batchnorm", "--graph", str(tmp_path / "bn.gif"), "--out", str(tmp_path / "gen"))
    assert r.returncode == 2 and "name the file .svg" in r.stderr and "Traceback" not in r.stderr
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    r = _derive("batchnorm", "--graph", str(tmp_path / "bn.png"), "--out", str(tmp_path / "gen"))
    assert r.returncode == 2 and "pip install 'derive[plot]'" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_png_is_the_same_layout_drawn_by_matplotlib(tmp_path):
    path = tmp_path / "bn.png"
    r = _derive("batchnorm", "--no-write", "--graph", str(path))
    assert r.returncode == 0, r.stderr
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    d, _ = derived("batchnorm")
    lay = layout(graph_of(d))
    assert (width, height) == (round(lay.width), round(lay.height))


def test_markdown_has_a_mermaid_block_with_every_edge():
    d, _ = derived("batchnorm")
    block = mermaid(graph_of(d))
    assert block.startswith("```mermaid\nflowchart TD") and block.endswith("```")
    for a, b in graph_of(d).edges:
        assert f"n_{a} --> n_{b}" in block
    r = _derive("batchnorm", "--no-write", "--no-verify", "--format", "markdown")
    assert block in r.stdout


def test_check_draws_the_wrong_atoms_red(tmp_path):
    solution = tmp_path / "mine.py"
    solution.write_text("def backward(t):\n    return {'b': t.dout.sum(0), 'x': -(t.dout @ t.W.T)}\n")
    path = tmp_path / "check.svg"
    r = _derive("check", "linear", "--against", str(solution), "--graph", str(path))
    assert r.returncode == 1, r.stderr
    root = ET.parse(path).getroot()
    red = {g.get("id") for g in root.iter(f"{SVG}g") if any(x.get("stroke") == "#c00" for x in g)}
    assert red == {"n_x"}


def test_a_notebook_shows_the_picture_as_svg():
    d, _ = derived("linear")
    assert picture(d)._repr_svg_().startswith("<svg ")


def test_the_readmes_picture_is_current():
    """examples/batchnorm.svg is what `make regenerate` draws today."""
    from derive.graph import svg

    d, _ = derived("batchnorm")
    assert (REPO / "examples" / "batchnorm.svg").read_text(encoding="utf-8") == svg(
        graph_of(d)
    ), "stale: run python -m derive batchnorm --no-write --no-verify -q --graph examples/batchnorm.svg"
