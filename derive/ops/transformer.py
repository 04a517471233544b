"""A transformer's layers, each only its forward: embeddings, and pre-norm blocks with their residuals.

``derive train --model gpt`` composes them (with ``layernorm``, ``linear`` and ``cross_entropy``);
the layer norm inside each block is written out, as in ``layernorm``.
"""

import sympy

from ..tensor import apply, exp, op


@op(tok="v c", pos="t c", X="int n t")
def token_position_embedding(tok, pos, X):
    """Each token's row of ``tok`` plus its position's row of ``pos``."""
    out = tok[X] + pos
    return out


@op(x="n t c", gamma="c", beta="c", Wq="c h d", Wk="c h d", Wv="c h d", Wo="h d c", bo="c", mask="const t s")
def attention_block(x, gamma, beta, Wq, Wk, Wv, Wo, bo, mask, eps=1e-5):
    """x + multi-head self-attention of layernorm(x); ``mask`` is added to the scores (0 or -inf: causal)."""
    mean = x.mean("c", keepdim=True)
    diff = x - mean
    var = (diff**2).mean("c", keepdim=True)
    ln = gamma * diff * (var + eps) ** -0.5 + beta
    q = ln.matmul(Wq, over="c")
    k = ln.matmul(Wk, over="c").rename(t="s")
    v = ln.matmul(Wv, over="c").rename(t="s")
    scores = q.matmul(k, over="d") * q.size("d") ** -0.5 + mask
    p = exp(scores - scores.max("s", keepdim=True))
    att = p / p.sum("s", keepdim=True)
    y = att.matmul(v, over="s")
    out = x + y.matmul(Wo, over=("h", "d")) + bo
    return out


@op(x="n t c", gamma="c", beta="c", W1="c f", b1="f", W2="f c", b2="c")
def mlp_block(x, gamma, beta, W1, b1, W2, b2, eps=1e-5):
    """x + a GELU MLP of layernorm(x) (the erf GELU, as F.gelu)."""
    mean = x.mean("c", keepdim=True)
    diff = x - mean
    var = (diff**2).mean("c", keepdim=True)
    ln = gamma * diff * (var + eps) ** -0.5 + beta
    hidden = apply(lambda u: u / 2 * (1 + sympy.erf(u / sympy.sqrt(2))), ln.matmul(W1, over="c") + b1)
    out = x + hidden.matmul(W2, over="f") + b2
    return out
