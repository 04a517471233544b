"""Losses, written as atom chains (their fused gradients are derived, never typed)."""

import sympy

from ..tensor import exp, log, op


@op(sizes={"n": 32, "c": 27}, stable_forward=True, logits="n c", target="int n")
def cross_entropy(logits, target):
    """Mean cross-entropy, as the lecture's atoms (max subtraction included).

    A loss must stay finite for any logits: ``stable_forward`` computes ``log(probs)`` as
    ``norm_logits - log(counts_sum)``, which cannot underflow (the derivation notes it)."""
    logit_maxes = logits.max("c", keepdim=True)
    norm_logits = logits - logit_maxes
    counts = exp(norm_logits)
    counts_sum = counts.sum("c", keepdim=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = log(probs)
    loss = -logprobs.take(target, "c").mean("n")
    return loss


@op(x="n d", y="n d")
def mse_loss(x, y):
    """Mean squared error over all elements."""
    diff = x - y
    loss = (diff**2).sum("d").sum("n") / (x.size("n") * x.size("d"))
    return loss


@op(z="n d", y="n d")
def bce_with_logits(z, y):
    """Binary cross-entropy on logits, mean over all elements (stable softplus form)."""
    per = (1 - y) * z + log(1 + exp(-z))
    loss = per.sum("d").sum("n") / (z.size("n") * z.size("d"))
    return loss


__all__ = ["bce_with_logits", "cross_entropy", "mse_loss", "sympy"]
