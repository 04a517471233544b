"""The reference problem (LECTURE.md): the lecture's network, tensors and shapes, every gradient."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from derive.verify import autograd_grads, compare

from .conftest import SHARED_NAMES, derived

ATOMS = [
    "logprobs",
    "probs",
    "counts_sum_inv",
    "counts_sum",
    "counts",
    "norm_logits",
    "logit_maxes",
    "logits",
    "h",
    "W2",
    "b2",
    "hpreact",
    "bngain",
    "bnbias",
    "bnraw",
    "bnvar_inv",
    "bnvar",
    "bndiff2",
    "bndiff",
    "bnmeani",
    "hprebn",
    "embcat",
    "W1",
    "b1",
    "emb",
    "C",
]


def lecture_batch(n_hidden: int = 64):
    """Parameters initialised as LECTURE.md says, and one batch of 32 (names.txt when present)."""
    g = torch.Generator().manual_seed(2147483647)
    C = torch.randn((27, 10), generator=g)
    W1 = torch.randn((30, n_hidden), generator=g) * (5 / 3) / (30**0.5)
    b1 = torch.randn(n_hidden, generator=g) * 0.1
    W2 = torch.randn((n_hidden, 27), generator=g) * 0.1
    b2 = torch.randn(27, generator=g) * 0.1
    bngain = torch.randn((1, n_hidden)) * 0.1 + 1.0
    bnbias = torch.randn((1, n_hidden)) * 0.1
    if SHARED_NAMES.exists():
        words = SHARED_NAMES.read_text().split()
        random.seed(42)
        random.shuffle(words)
        stoi = {ch: i + 1 for i, ch in enumerate(sorted(set("".join(words))))}
        stoi["."] = 0
        X, Y = [], []
        for w in words[: int(0.8 * len(words))]:
            ctx = [0, 0, 0]
            for ch in w + ".":
                X.append(ctx)
                Y.append(stoi[ch])
                ctx = ctx[1:] + [stoi[ch]]
        Xtr, Ytr = torch.tensor(X), torch.tensor(Y)
    else:
        Xtr, Ytr = torch.randint(0, 27, (1000, 3), generator=g), torch.randint(0, 27, (1000,), generator=g)
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    return [C, W1, b1, W2, b2, bngain, bnbias, Xtr[ix], Ytr[ix]]


def test_loss_equals_pytorch_cross_entropy():
    _, module = derived("makemore_mlp")
    inputs = lecture_batch()
    loss, saved = module.makemore_mlp_forward(*inputs, _keep_all=True)
    assert abs(loss.item() - F.cross_entropy(saved["logits"], inputs[-1]).item()) < 1e-6


def test_all_26_gradients_of_exercise_1_match_autograd():
    d, module = derived("makemore_mlp")
    inputs = lecture_batch()
    _loss, saved = module.makemore_mlp_forward(*inputs)
    want = autograd_grads(d, inputs, None)
    got = module.makemore_mlp_backward_steps(None, saved)
    rows = [compare(name, got[name], want[name], atol=1e-6) for name in ATOMS]
    assert all(r.shape_ok and r.approx for r in rows), [r for r in rows if not r.approx]


@pytest.mark.parametrize("name", ["C", "W1", "b1", "W2", "b2", "bngain", "bnbias"])
def test_fused_parameter_gradients_match_autograd(name):
    d, module = derived("makemore_mlp")
    inputs = lecture_batch()
    _, saved = module.makemore_mlp_forward(*inputs)
    want = autograd_grads(d, inputs, None)
    got = module.makemore_mlp_backward(None, saved)._asdict()
    assert got[name].shape == want[name].shape
    assert (got[name] - want[name]).abs().max() < 1e-6


def test_exercise_2_dlogits_rows_sum_to_zero():
    _d, module = derived("cross_entropy")
    logits, y = torch.randn(32, 27, dtype=torch.float64), torch.randint(0, 27, (32,))
    _, saved = module.cross_entropy_forward(logits, y)
    assert module.cross_entropy_backward(None, saved).logits.sum(1).abs().max() < 1e-15


def lecture_forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb):
    """The forward of LECTURE.md written as the lecture writes it, every atom retaining its grad."""
    n = Xb.shape[0]
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / (n - 1) * (bndiff2).sum(0, keepdim=True)
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdims=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Yb].mean()
    atoms = dict(locals())
    for name in ATOMS[:9] + ATOMS[11:12] + ATOMS[14:22] + ATOMS[24:25]:  # the intermediates
        atoms[name].retain_grad()
    return loss, atoms


UPSTREAM_OF_TANH = ATOMS[:11]  # logprobs ... b2: the atoms the lecture's hand formulas make exact


def test_the_chain_is_bit_exact_with_autograd_through_the_lectures_own_code_upstream_of_tanh():
    """LECTURE.md's bar is `torch.equal`; derive's forward and chain use the lecture's operations."""
    _, module = derived("makemore_mlp")
    inputs = lecture_batch()
    leaves = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    loss, atoms = lecture_forward(*leaves)
    loss.backward()
    _, saved = module.makemore_mlp_forward(*inputs)
    got = module.makemore_mlp_backward_steps(None, saved)
    exact = [name for name in ATOMS if torch.equal(got[name].reshape(atoms[name].shape), atoms[name].grad)]
    assert set(UPSTREAM_OF_TANH) <= set(exact), sorted(set(UPSTREAM_OF_TANH) - set(exact))
    print(f"bit-exact with the lecture's autograd: {len(exact)} of {len(ATOMS)}")
