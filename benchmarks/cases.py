"""What is benchmarked: each case is one generated op at one size, with its native PyTorch counterpart.

A case builds its inputs from a seeded generator and knows
- the generated module (``generated/NAME.py``) whose forward/backward are timed,
- which inputs are differentiable (the order of ``NAME_Grads``),
- the native fused PyTorch function that computes the same thing (for autograd through it),
- the GEMMs its backward must do, if any (for the lower bound).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

OPS = ("cross_entropy", "batchnorm", "batchnorm_biased", "layernorm", "log_softmax", "makemore_mlp")
SIZES = ("small", "large")


@dataclass
class Inputs:
    """Positional inputs of ``NAME_forward`` (tensors), keyword params, and which inputs get gradients."""

    args: list[torch.Tensor]
    diff: list[int]
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class Case:
    op: str
    size: str
    shape: str
    make: Callable[[torch.Generator], Inputs]
    native: Callable[..., torch.Tensor]
    native_note: str = ""
    # (m, k, n) of each matrix product the backward must compute: they bound it from below too
    gemms: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def module(self) -> Any:
        return importlib.import_module(f"generated.{self.op}")

    @property
    def label(self) -> str:
        return f"{self.op}/{self.size}"


# -- inputs --------------------------------------------------------------------------------------
def _randn(g: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale + shift


def _logits_case(n: int, c: int) -> Callable[[torch.Generator], Inputs]:
    def make(g: torch.Generator) -> Inputs:
        return Inputs([_randn(g, n, c, scale=2.0), torch.randint(0, c, (n,), generator=g)], [0])

    return make


def _norm_case(n: int, d: int) -> Callable[[torch.Generator], Inputs]:
    def make(g: torch.Generator) -> Inputs:
        x = _randn(g, n, d, scale=3.0, shift=0.5)
        gamma = _randn(g, d, scale=0.1, shift=1.0)
        beta = _randn(g, d, scale=0.1)
        return Inputs([x, gamma, beta], [0, 1, 2], {"eps": 1e-5})

    return make


def _x_case(n: int, d: int) -> Callable[[torch.Generator], Inputs]:
    def make(g: torch.Generator) -> Inputs:
        return Inputs([_randn(g, n, d, scale=2.0)], [0])

    return make


def _mlp_case(n: int, t: int, e: int, v: int, j: int, k: int) -> Callable[[torch.Generator], Inputs]:
    """The lecture's parameters (LECTURE.md, non-zero initialisation) at any size."""

    def make(g: torch.Generator) -> Inputs:
        C = _randn(g, v, e)
        W1 = _randn(g, t * e, j) * (5 / 3) / (t * e) ** 0.5
        b1 = _randn(g, j) * 0.1
        W2 = _randn(g, j, k) * 0.1
        b2 = _randn(g, k) * 0.1
        bngain = 1 + 0.1 * _randn(g, 1, j)
        bnbias = 0.1 * _randn(g, 1, j)
        Xb = torch.randint(0, v, (n, t), generator=g)
        Yb = torch.randint(0, k, (n,), generator=g)
        return Inputs([C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb], [0, 1, 2, 3, 4, 5, 6], {"eps": 1e-5})

    return make


# -- native counterparts -------------------------------------------------------------------------
def native_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def native_batchnorm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps)


def native_layernorm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[1],), gamma, beta, eps)


def native_log_softmax(x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(x, dim=1)


def native_mlp(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb, eps: float = 1e-5) -> torch.Tensor:  # noqa: ANN001
    """The lecture's network with PyTorch's fused kernels (embedding, addmm, batch_norm, cross_entropy)."""
    emb = F.embedding(Xb, C)
    embcat = emb.view(emb.shape[0], -1)
    hprebn = torch.addmm(b1, embcat, W1)
    hpreact = F.batch_norm(hprebn, None, None, bngain.view(-1), bnbias.view(-1), training=True, eps=eps)
    h = torch.tanh(hpreact)
    logits = torch.addmm(b2, h, W2)
    return F.cross_entropy(logits, Yb)


BESSEL = "F.batch_norm uses the biased variance; this op is Bessel-corrected (same cost, different values)"
MLP_NOTE = "embedding+addmm+F.batch_norm (biased var; lecture is Bessel)+tanh+addmm+F.cross_entropy"


def _mlp_gemms(n: int, t: int, e: int, j: int, k: int) -> list[tuple[int, int, int]]:
    # dh = dlogits @ W2.T, dW2 = h.T @ dlogits, dembcat = dhprebn @ W1.T, dW1 = embcat.T @ dhprebn
    return [(n, k, j), (j, n, k), (n, j, t * e), (t * e, n, j)]


# sizes: (small, large)
_LOGITS = {"small": (32, 27), "large": (4096, 1000)}
_ND = {"small": (32, 64), "large": (4096, 1024)}
# makemore: n, block (t), n_embd (e), vocab (v), hidden (j), classes (k)
_MLP = {"small": (32, 3, 10, 27, 200, 27), "large": (2048, 8, 24, 1000, 512, 1000)}


def make_case(op: str, size: str) -> Case:
    if op == "cross_entropy":
        n, c = _LOGITS[size]
        return Case(op, size, f"n={n} classes={c}", _logits_case(n, c), native_cross_entropy, "F.cross_entropy")
    if op in ("batchnorm", "batchnorm_biased"):
        n, d = _ND[size]
        note = "F.batch_norm(training=True)" + (f"; {BESSEL}" if op == "batchnorm" else " (same formula)")
        return Case(op, size, f"{n}x{d}", _norm_case(n, d), native_batchnorm, note)
    if op == "layernorm":
        n, d = _ND[size]
        return Case(op, size, f"{n}x{d}", _norm_case(n, d), native_layernorm, "F.layer_norm")
    if op == "log_softmax":
        n, d = _ND[size]
        return Case(op, size, f"{n}x{d}", _x_case(n, d), native_log_softmax, "F.log_softmax")
    if op == "makemore_mlp":
        n, t, e, v, j, k = _MLP[size]
        shape = f"n={n} block={t} embd={e} vocab={v} hidden={j} classes={k}"
        return Case(op, size, shape, _mlp_case(n, t, e, v, j, k), native_mlp, MLP_NOTE, _mlp_gemms(n, t, e, j, k))
    raise KeyError(f"unknown benchmark op '{op}' (choose from {', '.join(OPS)})")


def cases(ops: list[str], sizes: list[str]) -> list[Case]:
    return [make_case(op, size) for op in ops for size in sizes]
