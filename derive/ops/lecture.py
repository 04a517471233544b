"""The lecture's whole network: a 2-layer MLP with batch norm and cross-entropy (LECTURE.md)."""

from ..tensor import exp, log, op, tanh


@op(
    sizes={"n": 32, "t": 3, "e": 10, "v": 27, "j": 64, "k": 27},
    C="v e",
    W1="(t e) j",
    b1="j",
    W2="j k",
    b2="k",
    bngain="1 j",
    bnbias="1 j",
    Xb="int n t",
    Yb="int n",
)
def makemore_mlp(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb, eps=1e-5):
    """Embedding, linear, batch norm, tanh, linear, cross-entropy; intermediates named as in the lecture."""
    emb = C[Xb]
    embcat = emb.flatten("t", "e")
    hprebn = embcat @ W1 + b1
    bnmeani = hprebn.mean("n", keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = bndiff2.sum("n", keepdim=True) / (hprebn.size("n") - 1)
    bnvar_inv = (bnvar + eps) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = tanh(hpreact)
    logits = h @ W2 + b2
    logit_maxes = logits.max("k", keepdim=True)
    norm_logits = logits - logit_maxes
    counts = exp(norm_logits)
    counts_sum = counts.sum("k", keepdim=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = log(probs)
    loss = -logprobs.take(Yb, "k").mean("n")
    return loss
