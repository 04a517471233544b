"""The tutor: a person's hand-written backward graded atom by atom (python -m derive check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from derive import check
from derive.tutor import CheckUsageError, render

from .conftest import derive_cli

REPO = Path(__file__).resolve().parent.parent

# The lecture's exercise 1, solved as a person would: every atom by hand, in chain order.
LECTURE_SOLUTION = """
import torch
import torch.nn.functional as F


def backward(t):
    n = t.Xb.shape[0]
    g = {}
    g["logprobs"] = torch.zeros_like(t.logprobs)
    g["logprobs"][range(n), t.Yb] = -1.0 / n
    g["probs"] = (1.0 / t.probs) * g["logprobs"]
    g["counts_sum_inv"] = (t.counts * g["probs"]).sum(1, keepdim=True)
    g["counts"] = t.counts_sum_inv * g["probs"]
    g["counts_sum"] = (-t.counts_sum**-2) * g["counts_sum_inv"]
    g["counts"] += torch.ones_like(t.counts) * g["counts_sum"]
    g["norm_logits"] = t.counts * g["counts"]
    g["logits"] = g["norm_logits"].clone()
    g["logit_maxes"] = (-g["norm_logits"]).sum(1, keepdim=True)
    g["logits"] += F.one_hot(t.logits.max(1).indices, num_classes=t.logits.shape[1]) * g["logit_maxes"]
    g["h"] = g["logits"] @ t.W2.T
    g["W2"] = t.h.T @ g["logits"]
    g["b2"] = g["logits"].sum(0)
    g["hpreact"] = (1.0 - t.h**2) * g["h"]
    g["bngain"] = (t.bnraw * g["hpreact"]).sum(0, keepdim=True)
    g["bnraw"] = t.bngain * g["hpreact"]
    g["bnbias"] = g["hpreact"].sum(0, keepdim=True)
    g["bndiff"] = t.bnvar_inv * g["bnraw"]
    g["bnvar_inv"] = (t.bndiff * g["bnraw"]).sum(0, keepdim=True)
    g["bnvar"] = (-0.5 * (t.bnvar + 1e-5) ** -1.5) * g["bnvar_inv"]
    g["bndiff2"] = (1.0 / (n - 1)) * torch.ones_like(t.bndiff2) * g["bnvar"]
    g["bndiff"] += (2 * t.bndiff) * g["bndiff2"]
    g["hprebn"] = g["bndiff"].clone()
    g["bnmeani"] = (-g["bndiff"]).sum(0, keepdim=True)
    g["hprebn"] += 1.0 / n * (torch.ones_like(t.hprebn) * g["bnmeani"])
    g["embcat"] = g["hprebn"] @ t.W1.T
    g["W1"] = t.embcat.T @ g["hprebn"]
    g["b1"] = g["hprebn"].sum(0)
    g["emb"] = g["embcat"].view(t.emb.shape)
    g["C"] = torch.zeros_like(t.C)
    for k in range(t.Xb.shape[0]):
        for j in range(t.Xb.shape[1]):
            g["C"][t.Xb[k, j]] += g["emb"][k, j]
    return g
"""

MISTAKES = {
    # Bessel's correction forgotten: 1/n where the forward divides by n - 1
    "(1.0 / (n - 1)) * torch.ones_like(t.bndiff2)": "(1.0 / n) * torch.ones_like(t.bndiff2)",
    # the path from bndiff2 into bndiff left out
    'g["bndiff"] += (2 * t.bndiff) * g["bndiff2"]': "pass",
    # b1 broadcast over the batch, not summed over it
    'g["b1"] = g["hprebn"].sum(0)': 'g["b1"] = g["hprebn"]',
}


def _file(tmp_path: Path, text: str, name: str = "solution.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _with(*mistakes: str) -> str:
    text = LECTURE_SOLUTION
    for m in mistakes:
        assert m in text
        text = text.replace(m, MISTAKES[m])
    return text


def test_the_lectures_correct_solution_passes_every_atom(tmp_path):
    g = check("makemore_mlp", _file(tmp_path, LECTURE_SOLUTION))
    assert g.ok and len(g.rows) == 26, render(g)
    assert [r.name for r in g.rows][:3] == ["logprobs", "probs", "counts_sum_inv"]  # chain order


def test_classic_mistakes_are_named_and_what_follows_from_them_is_marked(tmp_path):
    g = check("makemore_mlp", _file(tmp_path, _with(*MISTAKES)))
    rows = {r.name: r for r in g.rows}
    assert not g.ok
    assert rows["bndiff2"].diagnosis == "factor" and "(N - 1)/N" in rows["bndiff2"].detail
    assert "Bessel" in rows["bndiff2"].detail
    assert rows["bndiff"].diagnosis == "missing contribution" and "bndiff2" in rows["bndiff"].detail
    assert rows["b1"].diagnosis == "shape" and "sum over n" in rows["b1"].detail
    assert g.roots == ["bndiff2", "bndiff", "b1"]
    for later in ("hprebn", "embcat", "emb", "C", "W1"):
        assert rows[later].diagnosis == "follows", (later, rows[later])
    assert "follows from dhprebn" in rows["W1"].detail
    assert all(rows[n].ok for n in ("logprobs", "h", "bnvar", "W2", "bngain"))


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_alone_is_the_only_root(tmp_path, mistake):
    g = check("makemore_mlp", _file(tmp_path, _with(mistake)))
    assert len(g.roots) == 1, render(g)


def test_the_command_line_prints_a_cmp_table_and_exits_1_on_a_wrong_gradient(tmp_path):
    path = _file(tmp_path, _with(*MISTAKES))
    r = subprocess.run(
        [sys.executable, "-m", "derive", "check", "makemore_mlp", "--against", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    table = {line.split()[0]: line for line in r.stdout.splitlines() if line.split() and " (" in line}
    assert " ok " in table["logprobs"] and " WRONG " in table["bndiff2"] and " WRONG " in table["hprebn"]
    assert "dbndiff2[n, j] += dbnvar[j]/(N - 1)" in r.stdout  # the right formula
    assert "code: dbndiff2 = " in r.stdout  # and its code line


def test_a_flipped_sign_and_a_transpose_are_named():
    g = check("linear", lambda t: {"W": (t.x.T @ t.dout).T, "x": -(t.dout @ t.W.T), "b": t.dout.sum(0)})
    rows = {r.name: r for r in g.rows}
    assert rows["b"].ok and rows["x"].diagnosis == "sign" and rows["W"].diagnosis == "transposed"
    assert "code: t2 = x.T @ dout" in render(g)


def test_the_outputs_own_gradient_is_graded_too():
    """``{"out": t.dout}`` crashed (float32 ``dout`` against float64 gradients in ``allclose``)."""
    g = check("linear", lambda t: {"out": t.dout, "b": t.dout.sum(0)})
    assert [r.ok for r in g.rows] == [True, True], render(g)


def test_a_gradient_with_no_pattern_says_where_it_differs():
    g = check("linear", lambda t: {"b": t.dout.sum(0) + (t.dout.sum(0) > 0).double()})
    assert g.rows[0].diagnosis == "differs" and "largest difference at [" in g.rows[0].detail


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "no such file"),
        ("x = 1\n", "defines no function backward(t)"),
        ("def backward(t):\n    return {'nope': t.x}\n", "'nope' is not a tensor of linear with a gradient"),
        ("def backward(t):\n    return {'x': 1.0}\n", "not a tensor"),
        ("def backward(t):\n    return [t.x]\n", "must return a dict"),
        (
            "def backward(t):\n\n    return {'x': t.xx}\n",
            "no tensor 'xx' in this op; did you mean x? (at solution.py:3)",
        ),
        ("def backward(t):\n    return {'x': 1 / 0}\n", "ZeroDivisionError: division by zero (at solution.py:2)"),
        ("def backward(t):\n    return {}\n", "returned no gradients"),  # it printed "all 0 right"
    ],
)
def test_usage_errors_are_one_line_with_exit_2(tmp_path, text, message):
    path = tmp_path / "solution.py"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CheckUsageError, match=None) as info:
        check("linear", path)
    assert message in str(info.value) and "\n" not in str(info.value)
    r = derive_cli("check", "linear", "--against", str(path))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
