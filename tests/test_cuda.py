"""The generated code on a CUDA device: every catalogue op and every benchmarked composition.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine:
``python -m pytest tests/test_cuda.py``; the random property tests run there too with
``DERIVE_TEST_DEVICE=cuda python -m pytest tests/test_properties.py -k random``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from derive import catalogue
from derive.verify import default_sizes, verify

from .conftest import OPS, derived, derive_cli

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _failures(v) -> list[str]:  # noqa: ANN001
    bad = [f"{c.name}: max abs diff {c.max_abs_diff:.3g}" for c in v.fused + v.steps if not (c.shape_ok and c.approx)]
    return bad + ([f"gradcheck: {v.gradcheck_error}"] if v.gradcheck is False else [])


@pytest.mark.parametrize("name", OPS)
def test_a_catalogue_op_agrees_with_autograd_on_cuda(name: str):
    """float32 fused backward and chain against autograd, and a float64 gradcheck, all on the GPU."""
    d, module = derived(name)
    sizes = d.program.tie({**default_sizes(d.program), **catalogue()[name].sizes})
    v = verify(d, module, sizes=sizes, exact=False, device="cuda")
    assert v.ok, _failures(v)


@pytest.mark.parametrize("name", OPS)
def test_a_catalogue_op_keeps_its_gradients_on_the_inputs_device(name: str):
    from derive.verify import example_inputs, random_grad_outputs

    d, module = derived(name)
    program = d.program
    inputs = example_inputs(program, program.tie(default_sizes(program)), torch.float32, device="cuda")
    out, saved = getattr(module, f"{name}_forward")(*inputs)
    grads = getattr(module, f"{name}_backward")(random_grad_outputs(program, out, 0), saved)
    assert {g.device.type for g in grads} == {"cuda"}


def test_the_benchmarked_compositions_agree_with_autograd_on_cuda():
    from benchmarks.compositions import COMPOSITIONS, generated

    for name in COMPOSITIONS:
        d, module = generated(name)
        v = verify(d, module, exact=False, device="cuda")
        assert v.ok, (name, _failures(v))


def test_the_cli_verifies_on_cuda():
    r = derive_cli("batchnorm", "--device", "cuda", "--no-write")
    assert r.returncode == 0, r.stderr
    assert "float32 on cuda" in r.stdout
