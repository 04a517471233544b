"""Reverse mode: the atom-by-atom chain of every op matches autograd for every named tensor."""

import pytest
import torch

from derive.verify import autograd_grads, compare, default_sizes, example_inputs

from .conftest import derived


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_chain_matches_autograd_for_every_named_tensor(op_name, dtype, atol):
    d, module = derived(op_name)
    sizes = default_sizes(d.program)
    inputs = example_inputs(d.program, sizes, dtype, seed=3)
    out, saved = getattr(module, f"{op_name}_forward")(*inputs)
    g = None if out.dim() == 0 else torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    want = autograd_grads(d, inputs, g)
    steps = getattr(module, f"{op_name}_backward_steps")(g, saved)
    # rounding grows with the gradient's size: atol is in units of its largest entry (at least 1)
    bad = [
        c
        for c in (
            compare(n, steps[n], want[n], atol=atol * max(1.0, float(want[n].abs().max()))) for n in steps if n in want
        )
        if not c.approx
    ]
    assert not bad, bad


def test_every_differentiable_input_gets_a_step(op_name):
    d, _module = derived(op_name)
    names = {c.contribution.target.name for c in d.chain}
    assert {t.name for t in d.program.differentiable_inputs} <= names


def test_max_routes_the_gradient_to_the_argmax():
    d, _ = derived("cross_entropy")
    (step,) = [
        c
        for c in d.chain
        if c.contribution.source.name == "norm_logits" and c.contribution.target.name == "logit_maxes"
    ]
    back = next(c for c in d.chain if c.contribution.source.name == "logit_maxes")
    assert "argmax" in str(back.result) and "dnorm_logits" in str(step.result)


def test_embedding_backward_accumulates_repeated_indices():
    _, module = derived("embedding")
    C = torch.randn(5, 3)
    X = torch.tensor([[1, 1], [1, 4]])
    out, saved = module.embedding_forward(C, X)
    grads = module.embedding_backward(torch.ones_like(out), saved)
    assert grads.C[1].tolist() == [3.0, 3.0, 3.0] and grads.C[0].tolist() == [0.0, 0.0, 0.0]
