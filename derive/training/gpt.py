"""A character-level transformer on the lecture's data, generated backward only (``derive train --model gpt``).

Token and position embeddings, pre-norm blocks (causal multi-head self-attention, then a GELU
MLP, each with its residual), a final layer norm and a linear head, cross-entropy. Every layer is
a catalogue op (``token_position_embedding``, ``attention_block``, ``mlp_block``, ``layernorm``,
``linear``, ``cross_entropy``), and the glue between them is views: the model is trained on the
next character at every position of each context (the targets are the context shifted by one,
then the example's label), and evaluated, like the other models, on the label alone. AdamW is
``torch.optim.AdamW`` on the generated gradients. Same interface as :mod:`.mlp`.
"""

from __future__ import annotations

from types import SimpleNamespace
from collections import namedtuple
from typing import Any

import torch
import torch.nn.functional as F

from generated import attention_block, cross_entropy, layernorm, linear, mlp_block, token_position_embedding

from .mlp import LECTURE_SEED, autograd_grads, sample_from

N_EMBD, N_HEAD, N_LAYER, BLOCK_SIZE = 64, 4, 2, 16
LN_EPS = 1e-5
LR = 1e-3
"""AdamW's learning rate (divided by 10 after half the steps, as for the other models)."""

_GENERATED = SimpleNamespace(
    embedding=token_position_embedding,
    attention=attention_block,
    mlp=mlp_block,
    layernorm=layernorm,
    linear=linear,
    cross_entropy=cross_entropy,
)
_ATTENTION = ("gamma", "beta", "Wq", "Wk", "Wv", "Wo", "bo")
_MLP = ("gamma", "beta", "W1", "b1", "W2", "b2")


def _names(n_layer: int) -> list[str]:
    blocks = [
        f"block{k}_{part}_{p}"
        for k in range(n_layer)
        for part, names in (("attn", _ATTENTION), ("mlp", _MLP))
        for p in names
    ]
    return ["tok", "pos", *blocks, "ln_gamma", "ln_beta", "head_W", "head_b"]


Params = namedtuple("Params", _names(N_LAYER))  # type: ignore[misc]
"""Embeddings; per block its attention's then its MLP's parameters; the final norm; the head."""


def _block(params: Any, k: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``(attention parameters, MLP parameters)`` of block ``k``."""
    per = len(_ATTENTION) + len(_MLP)
    block = params[2 + k * per : 2 + (k + 1) * per]
    return tuple(block[: len(_ATTENTION)]), tuple(block[len(_ATTENTION) :])


def init_params(
    vocab_size: int,
    n_embd: int = N_EMBD,
    n_hidden: int = 4 * N_EMBD,
    block_size: int = BLOCK_SIZE,
    seed: int = LECTURE_SEED,
) -> tuple[Any, torch.Generator]:
    """GPT-2's initialisation: weights N(0, 0.02) (the residual projections scaled by 1/sqrt(2 layers)),
    biases 0, norms 1 and 0; one generator seeded with ``seed`` draws them, then the batches."""
    if n_embd % N_HEAD:
        raise ValueError(f"gpt: {N_HEAD} heads must divide the embedding width, got {n_embd}")
    g = torch.Generator().manual_seed(seed)
    head = n_embd // N_HEAD

    def normal(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    residual = 0.02 / (2 * N_LAYER) ** 0.5
    values = [normal(vocab_size, n_embd), normal(block_size, n_embd)]
    for _ in range(N_LAYER):
        values += [torch.ones(n_embd), torch.zeros(n_embd)]
        values += [normal(n_embd, N_HEAD, head) for _ in range(3)]
        values += [normal(N_HEAD, head, n_embd, scale=residual), torch.zeros(n_embd)]
        values += [torch.ones(n_embd), torch.zeros(n_embd)]
        values += [normal(n_embd, n_hidden), torch.zeros(n_hidden), normal(n_hidden, n_embd, scale=residual)]
        values += [torch.zeros(n_embd)]
    values += [torch.ones(n_embd), torch.zeros(n_embd), normal(n_embd, vocab_size), torch.zeros(vocab_size)]
    return Params(*values), g


def parameter_count(
    vocab_size: int, n_embd: int = N_EMBD, n_hidden: int = 4 * N_EMBD, block_size: int = BLOCK_SIZE
) -> int:
    """Number of parameters.

    >>> parameter_count(27)
    104219
    """
    block = 4 * n_embd + 4 * n_embd * n_embd + n_embd + 2 * n_embd * n_hidden + n_hidden + n_embd
    return (vocab_size + block_size) * n_embd + N_LAYER * block + 2 * n_embd + (n_embd + 1) * vocab_size


def causal_mask(T: int) -> torch.Tensor:
    """0 where a position may attend (itself and the past), -inf after it: a const input of the blocks."""
    return torch.full((T, T), float("-inf")).triu(1)


def targets(Xb: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """The next character at every position of each context: the context shifted by one, then the label."""
    return torch.cat([Xb[:, 1:], Yb[:, None]], dim=1)


def layer_step(params: Any, Xb: torch.Tensor, Yb: torch.Tensor, modules: Any = None) -> tuple[torch.Tensor, Any]:
    """Loss (every position) and gradients composing the generated modules: each forward, then each backward in reverse."""
    m = modules or _GENERATED
    B, T = Xb.shape
    mask = causal_mask(T)
    h, emb_saved = m.embedding.token_position_embedding_forward(params.tok, params.pos, Xb)
    saved = []
    for k in range(N_LAYER):
        attn, mlp = _block(params, k)
        h, attn_saved = m.attention.attention_block_forward(h, *attn, mask, eps=LN_EPS)
        h, mlp_saved = m.mlp.mlp_block_forward(h, *mlp, eps=LN_EPS)
        saved.append((attn_saved, mlp_saved))
    rows = h.reshape(B * T, -1)
    normed, ln_saved = m.layernorm.layernorm_forward(rows, params.ln_gamma, params.ln_beta, eps=LN_EPS)
    logits, head_saved = m.linear.linear_forward(normed, params.head_W, params.head_b)
    loss, ce_saved = m.cross_entropy.cross_entropy_forward(logits, targets(Xb, Yb).reshape(-1))

    d_head = m.linear.linear_backward(m.cross_entropy.cross_entropy_backward(None, ce_saved).logits, head_saved)
    d_ln = m.layernorm.layernorm_backward(d_head.x, ln_saved)
    dh = d_ln.x.reshape(h.shape)
    block_grads: list[torch.Tensor] = []
    for attn_saved, mlp_saved in reversed(saved):
        d_mlp = m.mlp.mlp_block_backward(dh, mlp_saved)
        d_attn = m.attention.attention_block_backward(d_mlp.x, attn_saved)
        dh = d_attn.x
        block_grads = [getattr(d_attn, p) for p in _ATTENTION] + [getattr(d_mlp, p) for p in _MLP] + block_grads
    d_emb = m.embedding.token_position_embedding_backward(dh, emb_saved)
    grads = [d_emb.tok, d_emb.pos, *block_grads, d_ln.gamma, d_ln.beta, d_head.W, d_head.b]
    return loss, Params(*grads)


def _network(params: Any, X: torch.Tensor) -> torch.Tensor:
    """The same model in plain PyTorch (F.layer_norm, softmax attention, F.gelu): logits at every position."""
    T = X.shape[1]
    h = params.tok[X] + params.pos[:T]
    mask = causal_mask(T)
    for k in range(N_LAYER):
        (g1, b1, Wq, Wk, Wv, Wo, bo), (g2, b2, W1, c1, W2, c2) = _block(params, k)
        ln = F.layer_norm(h, (h.shape[-1],), g1, b1, LN_EPS)
        q, key, v = (torch.einsum("ntc,chd->nhtd", ln, W) for W in (Wq, Wk, Wv))
        att = torch.softmax(q @ key.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask, dim=-1)
        h = h + torch.einsum("nhtd,hdc->ntc", att @ v, Wo) + bo
        ln = F.layer_norm(h, (h.shape[-1],), g2, b2, LN_EPS)
        h = h + F.gelu(ln @ W1 + c1) @ W2 + c2
    return F.layer_norm(h, (h.shape[-1],), params.ln_gamma, params.ln_beta, LN_EPS) @ params.head_W + params.head_b


def reference_loss(params: Any, Xb: torch.Tensor, Yb: torch.Tensor) -> torch.Tensor:
    """The training loss in plain PyTorch, for autograd (comparison only)."""
    logits = _network(params, Xb)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets(Xb, Yb).reshape(-1))


def autograd_step(params: Any, Xb: torch.Tensor, Yb: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Loss and gradients by ``loss.backward()`` through :func:`reference_loss`."""
    return autograd_grads(reference_loss, params, Xb, Yb)  # type: ignore[no-any-return]


STEPS = {"layers": layer_step, "autograd": autograd_step}


def optimizer(params: Any) -> Any:
    """AdamW (torch.optim's) on the given tensors: ``update(grads, lr)`` sets ``.grad`` and steps."""
    opt = torch.optim.AdamW(list(params), lr=LR, weight_decay=0.01)

    def update(grads: Any, lr: float) -> None:
        for p, grad in zip(params, grads):
            p.grad = grad
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    return update


def calibrate(params: Any, X: torch.Tensor) -> None:
    """Nothing to recalibrate: layer norm has no running statistics."""
    return None


@torch.no_grad()
def evaluate(params: Any, stats: None, X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean cross-entropy of the label (the last position's prediction) over a whole split, in chunks."""
    total = 0.0
    for start in range(0, X.shape[0], 4096):
        logits = _network(params, X[start : start + 4096])[:, -1]
        total += float(F.cross_entropy(logits, Y[start : start + 4096], reduction="sum"))
    return total / X.shape[0]


def sample(params: Any, stats: None, block_size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` names, as :func:`.mlp.sample` draws them (from the last position's logits)."""
    return sample_from(lambda X: _network(params, X)[:, -1], block_size, count, seed)


DEFAULTS = SimpleNamespace(n_embd=N_EMBD, n_hidden=4 * N_EMBD, block_size=BLOCK_SIZE, lr=LR)
