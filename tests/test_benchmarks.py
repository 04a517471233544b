"""Smoke test of the benchmark harness: quick mode, one tiny op; checks the report's shape, never timings."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("torch")

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
]
DERIVATION_COLUMNS = ["op", "import", "trace", "differentiate", "simplify", "lower", "emit"]
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


def _header(markdown: str, first: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no table starting with column '{first}' in:\n{markdown}")


def test_quick_run_writes_tables(tmp_path, capsys):
    from benchmarks.cli import main

    argv = ["--quick", "--ops", "log_softmax", "--no-compile", "--stack", "1", "--out", str(tmp_path)]
    rc = main(argv + ["--compositions", "mlp_mse,max_middle"])
    assert rc == 0
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert md in capsys.readouterr().out

    runtime_header = _header(md, "op")
    for col in RUNTIME_COLUMNS:
        assert col in runtime_header
    rows = [line for line in md.splitlines() if line.startswith("| log_softmax | small")]
    assert rows, md
    assert any(len(r.strip().strip("|").split("|")) == len(runtime_header) for r in rows)
    for col in DERIVATION_COLUMNS[1:]:
        assert col in md
    assert "| k |" in md

    report = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    (case,) = report["runtime"]
    assert case["op"] == "log_softmax" and case["size"] == "small"
    assert set(case["time_s"]) >= {"eager", "compiled", "atoms", "native", "bound"}
    assert case["time_s"]["compiled"] is None and case["compiled_error"] == "skipped"
    assert set(case["ratios"]) >= {"eager/atoms", "eager/native", "eager/bound", "compiled/native"}
    assert set(case["bytes"]) >= {"generated_saved", "atoms_autograd_saved", "native_autograd_saved"}
    assert case["max_rel_err"]["eager_vs_atoms"] < 1e-4  # the generated backward is the right one
    assert [r["name"] for r in report["derivation"]["ops"]["rows"]] == ["log_softmax"]
    assert [r["k"] for r in report["derivation"]["stack"]["rows"]] == [1]
    assert report["environment"]["threads"] >= 1
    assert [c["name"] for c in report["compositions"]] == ["mlp_mse", "max_middle"]
    for c in report["compositions"]:
        assert c["peak"] <= c["forward_largest"], c  # the no-blow-up invariant, measured
        assert c["max_rel_err"] < 1e-4
    assert _header(md, "composition") == COMPOSITION_COLUMNS


def test_startup_report_states_both_medians_their_ratio_and_the_machine():
    from benchmarks.startup import report

    text = report({"bare": [3.0, 2.0, 4.0], "derive": [3.3, 3.6, 3.0]})
    assert "| 3.00 |" in text and "| 3.30 |" in text and "3 interleaved runs" in text
    assert text.endswith("derive batchnorm / bare import: 1.10x") and "CPUs" in text


@pytest.mark.parametrize("argv", [["--device", "bogus"], ["--device", "meta"]])
def test_a_device_torch_cannot_use_is_a_usage_error(argv, capsys):
    from benchmarks.cli import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and f"--device {argv[1]}:" in capsys.readouterr().err
