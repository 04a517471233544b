"""Normalisations and softmax-family ops."""

from ..tensor import exp, log, op


@op(sizes={"n": 32, "d": 64}, x="n d", gamma="d", beta="d")
def batchnorm(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm with Bessel's correction (the lecture's)."""
    mean = x.mean("n", keepdim=True)
    diff = x - mean
    var = (diff**2).sum("n", keepdim=True) / (x.size("n") - 1)
    var_inv = (var + eps) ** -0.5
    xhat = diff * var_inv
    out = gamma * xhat + beta
    return out


@op(x="n d", gamma="d", beta="d")
def batchnorm_biased(x, gamma, beta, eps=1e-5):
    """Batch norm with the biased variance, as F.batch_norm(training=True)."""
    mean = x.mean("n", keepdim=True)
    diff = x - mean
    var = (diff**2).mean("n", keepdim=True)
    var_inv = (var + eps) ** -0.5
    xhat = diff * var_inv
    out = gamma * xhat + beta
    return out


@op(x="n d", gamma="d", beta="d")
def layernorm(x, gamma, beta, eps=1e-5):
    """Layer norm over the last dim, as F.layer_norm."""
    mean = x.mean("d", keepdim=True)
    diff = x - mean
    var = (diff**2).mean("d", keepdim=True)
    var_inv = (var + eps) ** -0.5
    xhat = diff * var_inv
    out = gamma * xhat + beta
    return out


@op(x="n d", gamma="d")
def rmsnorm(x, gamma, eps=1e-6):
    """RMS norm over the last dim, as torch.nn.functional.rms_norm."""
    ms = (x**2).mean("d", keepdim=True)
    rms_inv = (ms + eps) ** -0.5
    xhat = x * rms_inv
    out = gamma * xhat
    return out


@op(x="n d")
def softmax(x):
    """Softmax over the last dim, with max subtraction for stability."""
    maxes = x.max("d", keepdim=True)
    e = exp(x - maxes)
    total = e.sum("d", keepdim=True)
    out = e / total
    return out


@op(x="n d")
def log_softmax(x):
    """Log-softmax over the last dim."""
    maxes = x.max("d", keepdim=True)
    shifted = x - maxes
    e = exp(shifted)
    total = e.sum("d", keepdim=True)
    out = shifted - log(total)
    return out


@op(x="n d")
def logsumexp(x):
    """log Σ exp over the last dim."""
    maxes = x.max("d", keepdim=True)
    e = exp(x - maxes)
    total = e.sum("d", keepdim=True)
    out = log(total) + maxes
    return out
