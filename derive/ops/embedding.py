"""Embedding lookup."""

from ..tensor import op


@op(C="v e", X="int n t")
def embedding(C, X):
    """Rows of C picked by an integer tensor X: emb[n, t, :] = C[X[n, t], :]."""
    emb = C[X]
    return emb
