"""The hierarchical model that follows the lecture (makemore part 5, "WaveNet"), generated backward only.

A context of 8 characters is embedded, then fused two neighbours at a time, level by level: each
level views consecutive pairs as one row (``FlattenConsecutive(2)``), then a linear layer, batch
norm over every row of the batch and tanh; after three levels one row per example is left, and a
linear layer gives the logits. Every layer is a catalogue op (``embedding``, ``linear``,
``batchnorm``, ``tanh``, ``cross_entropy``); the glue between them is views. Same interface as
:mod:`.mlp` (``init_params``, ``STEPS``, ``calibrate``, ``evaluate``, ``sample``), which
``derive train --model wavenet`` uses.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .mlp import _GENERATED, BN_EPS, LECTURE_SEED, autograd_grads, sample_from

LEVELS = 3
BLOCK_SIZE = 2**LEVELS
N_EMBD, N_HIDDEN = 24, 128


class Params(NamedTuple):
    """Embedding; per level a linear layer (W, b) and batch norm (gamma, beta); the output layer."""

    C: torch.Tensor
    W1: torch.Tensor
    b1: torch.Tensor
    gamma1: torch.Tensor
    beta1: torch.Tensor
    W2: torch.Tensor
    b2: torch.Tensor
    gamma2: torch.Tensor
    beta2: torch.Tensor
    W3: torch.Tensor
    b3: torch.Tensor
    gamma3: torch.Tensor
    beta3: torch.Tensor
    Wout: torch.Tensor
    bout: torch.Tensor


def _level(params: Params, k: int) -> tuple[torch.Tensor, ...]:
    """``(W, b, gamma, beta)`` of level ``k`` (0-based)."""
    return tuple(params[1 + 4 * k : 5 + 4 * k])


def init_params(
    vocab_size: int,
    n_embd: int = N_EMBD,
    n_hidden: int = N_HIDDEN,
    block_size: int = BLOCK_SIZE,
    seed: int = LECTURE_SEED,
) -> tuple[Params, torch.Generator]:
    """Kaiming-style linear layers (gain 5/3 for tanh), batch norm at 1 and 0, the output layer scaled
    by 0.1 (as in the lecture); one generator seeded with ``seed`` draws them, then the batches."""
    if block_size != BLOCK_SIZE:
        raise ValueError(f"wavenet fuses pairs {LEVELS} times: its context is {BLOCK_SIZE}, got {block_size}")
    g = torch.Generator().manual_seed(seed)
    params: list[torch.Tensor] = [torch.randn((vocab_size, n_embd), generator=g)]
    fan_in = 2 * n_embd
    for _ in range(LEVELS):
        params += [
            torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / fan_in**0.5,
            torch.zeros(n_hidden),
            torch.ones(n_hidden),
            torch.zeros(n_hidden),
        ]
        fan_in = 2 * n_hidden
    params += [torch.randn((n_hidden, vocab_size), generator=g) * 0.1 / n_hidden**0.5, torch.zeros(vocab_size)]
    return Params(*params), g


def parameter_count(
    vocab_size: int, n_embd: int = N_EMBD, n_hidden: int = N_HIDDEN, block_size: int = BLOCK_SIZE
) -> int:
    """Number of parameters.

    >>> parameter_count(27)
    76963
    """
    levels = (2 * n_embd + 3) * n_hidden + (LEVELS - 1) * (2 * n_hidden + 3) * n_hidden
    return vocab_size * n_embd + levels + (n_hidden + 1) * vocab_size


def _pairs(h: torch.Tensor) -> torch.Tensor:
    """``(B, T, C)`` as rows of two neighbours, ``(B * T/2, 2C)``: FlattenConsecutive(2), flattened."""
    return h.reshape(h.shape[0] * (h.shape[1] // 2), 2 * h.shape[2])


def layer_step(params: Params, Xb: torch.Tensor, Yb: torch.Tensor, modules: Any = None) -> tuple[torch.Tensor, Params]:
    """Loss and gradients composing the generated modules: each forward, then each backward in reverse."""
    m = modules or _GENERATED
    B = Xb.shape[0]
    h, emb_saved = m.embedding.embedding_forward(params.C, Xb)
    levels = []
    for k in range(LEVELS):
        W, b, gamma, beta = _level(params, k)
        pre, linear_saved = m.linear.linear_forward(_pairs(h), W, b)
        normed, bn_saved = m.batchnorm.batchnorm_forward(pre, gamma, beta, eps=BN_EPS)
        act, tanh_saved = m.tanh.tanh_forward(normed)
        levels.append((h.shape, linear_saved, bn_saved, tanh_saved))
        h = act.view(B, h.shape[1] // 2, -1)
    logits, out_saved = m.linear.linear_forward(h.view(B, -1), params.Wout, params.bout)
    loss, ce_saved = m.cross_entropy.cross_entropy_forward(logits, Yb)

    d_out = m.linear.linear_backward(m.cross_entropy.cross_entropy_backward(None, ce_saved).logits, out_saved)
    dh = d_out.x
    level_grads: list[torch.Tensor] = []
    for shape, linear_saved, bn_saved, tanh_saved in reversed(levels):
        d_tanh = m.tanh.tanh_backward(dh.reshape(-1, dh.shape[-1]), tanh_saved)
        d_bn = m.batchnorm.batchnorm_backward(d_tanh.x, bn_saved)
        d_linear = m.linear.linear_backward(d_bn.x, linear_saved)
        level_grads = [d_linear.W, d_linear.b, d_bn.gamma, d_bn.beta] + level_grads
        dh = d_linear.x.reshape(shape)
    d_emb = m.embedding.embedding_backward(dh, emb_saved)
    return loss, Params(*([d_emb.C] + level_grads + [d_out.W, d_out.b]))


def _network(params: Params, X: torch.Tensor, stats: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
    """The forward in plain PyTorch: batch statistics (``stats`` None: returned) or the given ones."""
    h = params.C[X]
    used = []
    for k in range(LEVELS):
        W, b, gamma, beta = _level(params, k)
        pre = _pairs(h) @ W + b
        mean, var = (pre.mean(0), pre.var(0, unbiased=True)) if stats is None else stats[k]
        used.append((mean, var))
        h = torch.tanh(gamma * (pre - mean) * (var + BN_EPS) ** -0.5 + beta).view(X.shape[0], h.shape[1] // 2, -1)
    return h.view(X.shape[0], -1) @ params.Wout + params.bout, used


def reference_loss(params: Params, Xb: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """The same network in plain PyTorch, for autograd (comparison only)."""
    return F.cross_entropy(_network(params, Xb, None)[0], Yb)


def autograd_step(params: Params, Xb: torch.Tensor, Yb: torch.Tensor) -> tuple[torch.Tensor, Params]:
    """Loss and gradients by ``loss.backward()`` through :func:`reference_loss`."""
    return autograd_grads(reference_loss, params, Xb, Yb)  # type: ignore[no-any-return]


STEPS = {"layers": layer_step, "autograd": autograd_step}


@torch.no_grad()
def calibrate(params: Params, X: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each level's batch-norm mean and unbiased variance over all of ``X``, level after level."""
    return _network(params, X, None)[1]  # type: ignore[no-any-return]


@torch.no_grad()
def evaluate(params: Params, stats: list[tuple[torch.Tensor, torch.Tensor]], X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean cross-entropy over a whole split, batch norm in inference mode."""
    return float(F.cross_entropy(_network(params, X, stats)[0], Y))


def sample(
    params: Params, stats: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, count: int, seed: int
) -> list[list[int]]:
    """``count`` names, as :func:`.mlp.sample` draws them."""
    return sample_from(lambda X: _network(params, X, stats)[0], block_size, count, seed)


DEFAULTS = SimpleNamespace(n_embd=N_EMBD, n_hidden=N_HIDDEN, block_size=BLOCK_SIZE, lr=0.1)
