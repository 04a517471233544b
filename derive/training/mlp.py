"""The lecture's network (LECTURE.md): parameters, one training step, evaluation and sampling.

A training step's gradients come only from the generated modules, in one of two ways:

* ``layers`` (default): what a user of derive writes: the forward of ``generated.embedding``,
  ``linear``, ``batchnorm``, ``tanh``, ``linear`` and ``cross_entropy``, then each one's fused
  ``*_backward`` in reverse order, the gradient of one layer's input feeding the next backward;
* ``network``: ``generated.makemore_mlp``, the whole network and loss as one op, one fused backward.

:func:`autograd_step` is the same network written in plain PyTorch with ``loss.backward()``; it
exists only to check the generated gradients and to compare speed.

Example:
    >>> params, g = init_params(vocab_size=27, n_hidden=200)
    >>> sum(p.numel() for p in params)
    12297
    >>> X, Y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
    >>> loss, grads = generated_step(params, X, Y)
    >>> ref_loss, ref_grads = autograd_step(params, X, Y)
    >>> max_abs_difference(grads, ref_grads)[0] < 1e-6
    True
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from generated import batchnorm, cross_entropy, embedding, linear, makemore_mlp, tanh

_GENERATED = SimpleNamespace(
    embedding=embedding, linear=linear, batchnorm=batchnorm, tanh=tanh, cross_entropy=cross_entropy
)

BN_EPS = 1e-5
"""Batch norm's epsilon, as in the lecture."""

LECTURE_SEED = 2147483647
"""The lecture's ``torch.Generator`` seed; sampling uses ``seed + 10`` (2147483657)."""


class Params(NamedTuple):
    """The seven parameters in the lecture's order (also the order of ``makemore_mlp_Grads``).

    A gradient of the network is a ``Params`` too: one tensor per parameter, of the same shape.
    """

    C: torch.Tensor
    W1: torch.Tensor
    b1: torch.Tensor
    W2: torch.Tensor
    b2: torch.Tensor
    bngain: torch.Tensor
    bnbias: torch.Tensor


class BatchNormStats(NamedTuple):
    """Mean and unbiased variance of the pre-activations (1 x n_hidden), used at evaluation."""

    mean: torch.Tensor
    var: torch.Tensor


Step = Callable[[Params, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, Params]"]
"""A training step: (params, Xb, Yb) -> (loss, gradients)."""


def init_params(
    vocab_size: int, n_embd: int = 10, n_hidden: int = 200, block_size: int = 3, seed: int = LECTURE_SEED
) -> tuple[Params, torch.Generator]:
    """The lecture's initialisation; returns the parameters and the generator that then draws batches.

    A ``torch.Generator`` seeded with ``seed`` draws C, W1, b1, W2, b2 in this order; bngain and
    bnbias come from the global generator, which the lecture leaves unseeded (hence its two
    different runs): here ``torch.manual_seed(seed)`` seeds it first, so a run is reproducible.
    """
    g = torch.Generator().manual_seed(seed)
    fan_in = n_embd * block_size
    C = torch.randn((vocab_size, n_embd), generator=g)
    W1 = torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / fan_in**0.5
    b1 = torch.randn(n_hidden, generator=g) * 0.1
    W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1
    b2 = torch.randn(vocab_size, generator=g) * 0.1
    torch.manual_seed(seed)
    bngain = torch.randn((1, n_hidden)) * 0.1 + 1.0
    bnbias = torch.randn((1, n_hidden)) * 0.1
    return Params(C, W1, b1, W2, b2, bngain, bnbias), g


def parameter_count(vocab_size: int, n_embd: int = 10, n_hidden: int = 200, block_size: int = 3) -> int:
    """Number of parameters: C, W1, b1, W2, b2, bngain, bnbias.

    >>> parameter_count(27, n_hidden=64), parameter_count(27, n_hidden=200)
    (4137, 12297)
    """
    return vocab_size * n_embd + (n_embd * block_size + 1) * n_hidden + (n_hidden + 1) * vocab_size + 2 * n_hidden


LAYERS = ("embedding", "linear", "batchnorm", "tanh", "cross_entropy")
"""The catalogue ops :func:`generated_step` composes."""


def generated_step(params: Params, Xb: torch.Tensor, Yb: torch.Tensor) -> tuple[torch.Tensor, Params]:
    """Loss and gradients by composing the generated per-layer modules (forward, then backward in reverse).

    The only glue is reshaping at the boundaries: ``emb`` (n x block x embd) is viewed as ``embcat``
    (n x block*embd) and back, and the lecture's 1 x n_hidden bngain/bnbias as the [n_hidden]
    gamma/beta of ``generated.batchnorm`` and back.
    """
    return layer_step(params, Xb, Yb)


def layer_step(
    params: Params, Xb: torch.Tensor, Yb: torch.Tensor, modules: Any = None, group: Any = None
) -> tuple[torch.Tensor, Params]:
    """:func:`generated_step` with other modules of the same ops, e.g. ones sharded over the batch
    (``derive --shard n``), whose forwards take ``group``: then this process's rows give the whole
    batch's loss and gradients."""
    m = modules or _GENERATED
    g = {} if group is None else {"group": group}
    C, W1, b1, W2, b2, bngain, bnbias = params
    emb, emb_saved = m.embedding.embedding_forward(C, Xb, **g)
    embcat = emb.view(emb.shape[0], -1)
    hprebn, l1_saved = m.linear.linear_forward(embcat, W1, b1, **g)
    hpreact, bn_saved = m.batchnorm.batchnorm_forward(hprebn, bngain.view(-1), bnbias.view(-1), eps=BN_EPS, **g)
    h, tanh_saved = m.tanh.tanh_forward(hpreact, **g)
    logits, l2_saved = m.linear.linear_forward(h, W2, b2, **g)
    loss, ce_saved = m.cross_entropy.cross_entropy_forward(logits, Yb, **g)

    d_ce = m.cross_entropy.cross_entropy_backward(None, ce_saved)
    d_l2 = m.linear.linear_backward(d_ce.logits, l2_saved)
    d_tanh = m.tanh.tanh_backward(d_l2.x, tanh_saved)
    d_bn = m.batchnorm.batchnorm_backward(d_tanh.x, bn_saved)
    d_l1 = m.linear.linear_backward(d_bn.x, l1_saved)
    d_emb = m.embedding.embedding_backward(d_l1.x.view(emb.shape), emb_saved)
    grads = Params(
        C=d_emb.C,
        W1=d_l1.W,
        b1=d_l1.b,
        W2=d_l2.W,
        b2=d_l2.b,
        bngain=d_bn.gamma.view_as(bngain),
        bnbias=d_bn.beta.view_as(bnbias),
    )
    return loss, grads


def generated_network_step(params: Params, Xb: torch.Tensor, Yb: torch.Tensor) -> tuple[torch.Tensor, Params]:
    """Loss and gradients from ``generated.makemore_mlp``: the whole network's fused backward."""
    loss, saved = makemore_mlp.makemore_mlp_forward(*params, Xb, Yb, eps=BN_EPS)
    return loss, Params(*makemore_mlp.makemore_mlp_backward(None, saved))


def reference_loss(params: Params, Xb: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """The same network in plain PyTorch (the lecture's exercise-4 forward), for autograd."""
    C, W1, b1, W2, b2, bngain, bnbias = params
    embcat = C[Xb].view(Xb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    mean = hprebn.mean(0, keepdim=True)
    var = hprebn.var(0, keepdim=True, unbiased=True)
    hpreact = bngain * (hprebn - mean) * (var + BN_EPS) ** -0.5 + bnbias
    logits = torch.tanh(hpreact) @ W2 + b2
    return F.cross_entropy(logits, Yb)


def autograd_step(params: Params, Xb: torch.Tensor, Yb: torch.Tensor) -> tuple[torch.Tensor, Params]:
    """Loss and gradients by ``loss.backward()`` through :func:`reference_loss` (comparison only)."""
    return autograd_grads(reference_loss, params, Xb, Yb)


def autograd_grads(loss_fn: Callable[..., torch.Tensor], params: Any, Xb: torch.Tensor, Yb: torch.Tensor) -> Any:
    """``loss_fn``'s loss and gradients by ``loss.backward()``, as the same NamedTuple as ``params``.

    Parameters that already require grad (an autograd training run) are used as they are; otherwise
    (a check inside a generated run) detached copies are.
    """
    kind = type(params)
    with torch.enable_grad():
        leaves = params if params[0].requires_grad else kind(*(p.detach().requires_grad_() for p in params))
        for p in leaves:
            p.grad = None
        loss = loss_fn(leaves, Xb, Yb)
        loss.backward()
    return loss.detach(), kind(*(p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves))


STEPS: dict[str, Step] = {"layers": generated_step, "network": generated_network_step, "autograd": autograd_step}
DEFAULTS = SimpleNamespace(n_embd=10, n_hidden=200, block_size=3, lr=0.1)
"""The lecture's sizes (exercise 4)."""
"""Training steps by name: the two generated ones and the autograd reference."""


def max_abs_difference(grads: Any, reference: Any) -> tuple[float, str]:
    """The largest absolute difference between two gradients, and the parameter where it occurs."""
    diffs = {name: (a - b).abs().max().item() for name, a, b in zip(type(grads)._fields, grads, reference)}
    worst = max(diffs, key=diffs.__getitem__)
    return diffs[worst], worst


def sgd_update(params: Any, grads: Any, lr: float) -> None:
    """``p -= lr * grad`` for every parameter, in place."""
    for p, grad in zip(params, grads):
        p.sub_(grad, alpha=lr)


def hidden_preactivation(params: Params, X: torch.Tensor) -> torch.Tensor:
    """``embcat @ W1 + b1`` for every row of ``X``: what batch norm normalises."""
    return params.C[X].view(X.shape[0], -1) @ params.W1 + params.b1


def calibrate(params: Params, X: torch.Tensor) -> BatchNormStats:
    """Batch norm's mean and unbiased variance over all of ``X`` (the whole training set)."""
    hprebn = hidden_preactivation(params, X)
    return BatchNormStats(hprebn.mean(0, keepdim=True), hprebn.var(0, keepdim=True, unbiased=True))


def logits_at_inference(params: Params, stats: BatchNormStats, X: torch.Tensor) -> torch.Tensor:
    """The network's logits with batch norm using the calibrated statistics."""
    hprebn = hidden_preactivation(params, X)
    hpreact = params.bngain * (hprebn - stats.mean) * (stats.var + BN_EPS) ** -0.5 + params.bnbias
    return torch.tanh(hpreact) @ params.W2 + params.b2


@torch.no_grad()
def evaluate(params: Params, stats: BatchNormStats, X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean cross-entropy over a whole split, batch norm in inference mode."""
    return F.cross_entropy(logits_at_inference(params, stats, X), Y).item()


@torch.no_grad()
def sample(
    params: Params, stats: BatchNormStats, block_size: int, count: int, seed: int, max_length: int = 50
) -> list[list[int]]:
    """``count`` token sequences, each up to and including the end token 0 (or ``max_length`` tokens).

    One ``torch.Generator`` seeded with ``seed`` draws every token with ``torch.multinomial``, as in the
    lecture (seed 2147483657).
    """
    return sample_from(lambda X: logits_at_inference(params, stats, X), block_size, count, seed, max_length)


@torch.no_grad()
def sample_from(
    logits_of: Callable[[torch.Tensor], torch.Tensor], block_size: int, count: int, seed: int, max_length: int = 50
) -> list[list[int]]:
    """:func:`sample` for any model, given its logits at inference for a batch of contexts."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        context = [0] * block_size
        out: list[int] = []
        while len(out) < max_length:
            probs = F.softmax(logits_of(torch.tensor([context])), dim=1)
            token = int(torch.multinomial(probs, num_samples=1, generator=g).item())
            context = context[1:] + [token]
            out.append(token)
            if token == 0:
                break
        samples.append(out)
    return samples
