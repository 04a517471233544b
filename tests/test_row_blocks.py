"""Row blocks: a large batch on a CPU goes through the fused backward a block of rows at a time.

Each block's passes after its first read the cache, not memory. The blocked backward must give the
plain one's gradients for any block size (a sum over the batch adds one partial sum per block),
make no tensor larger than the plain one's, and be planned only where cutting the batch is exact
and keeps every matrix product whole. (Every catalogue op and random composition is also checked
in blocks of 1 and 2 rows in test_properties.py.)
"""

from __future__ import annotations

import math
import re

import pytest
import sympy
import torch

from derive import apply, op
from derive.verify import TensorSizes

from .conftest import derived
from .test_lowering import AtenOps, generated, max_middle, mlp_mse


def gelu(u):
    return u * (1 + sympy.erf(u / sympy.sqrt(2))) / 2


@op(x="n d", gamma="d", beta="d")
def layernorm_gelu(x, gamma, beta, eps=1e-5):
    mean = x.mean("d", keepdim=True)
    diff = x - mean
    var = (diff**2).mean("d", keepdim=True)
    out = apply(gelu, gamma * diff * (var + eps) ** -0.5 + beta)
    return out


@op(x="n d", w="d", y="n d")
def scaled_mse(x, w, y):
    """A loss (a scalar output) whose weight's gradient is a sum over the batch."""
    loss = (((x * w - y) ** 2).mean("d")).mean("n")
    return loss


def _inputs(module, name: str, shapes: list[tuple[int, ...]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    out, saved = getattr(module, f"{name}_forward")(*inputs)
    grad = None if out.dim() == 0 else torch.randn(out.shape, generator=g, dtype=torch.float64)
    return grad, saved


def _blocks(module, rows: int | None, cache_bytes: int | None = None):
    """Set the module's block size (and the cache it compares a batch with); returns a restore function."""
    old = (module.ROWS_PER_BLOCK, module.CACHE_BYTES)
    module.ROWS_PER_BLOCK = rows
    if cache_bytes is not None:
        module.CACHE_BYTES = cache_bytes

    def restore() -> None:
        module.ROWS_PER_BLOCK, module.CACHE_BYTES = old

    return restore


CASES = [
    ("layernorm", [(11, 6), (6,), (6,)], 1),
    ("batchnorm", [(11, 6), (6,), (6,)], 2),  # dx reads the sums over the batch: a second sweep
    ("rmsnorm", [(11, 6), (6,)], 1),
]


@pytest.mark.parametrize("name, shapes, sweeps", CASES)
@pytest.mark.parametrize("rows", [1, 4, 11, 50])
def test_a_backward_in_blocks_of_rows_gives_the_plain_ones_gradients(name, shapes, sweeps, rows):
    d, module = derived(name)
    assert d.code.in_blocks is not None
    assert sum(line.startswith("for start, ") for line in d.code.in_blocks.lines) == sweeps
    grad, saved = _inputs(module, name, shapes)
    backward = getattr(module, f"{name}_backward")
    plain = backward(grad, saved)._asdict()
    restore = _blocks(module, rows)
    try:
        with TensorSizes() as sizes:
            blocked = backward(grad, saved)._asdict()
    finally:
        restore()
    assert sizes.largest <= math.prod(shapes[0])
    for k, v in plain.items():
        torch.testing.assert_close(blocked[k], v, rtol=1e-12, atol=1e-12, msg=f"d{k} in blocks of {rows}")


def test_a_sum_over_the_batch_of_a_value_the_backward_computes_follows_it():
    """dbeta = Σ_n dpre[n, d] reads the GELU's derivative, computed in the same block before it."""
    d, module = generated(layernorm_gelu)
    lines = d.code.in_blocks.lines
    first_sum = next(k for k, line in enumerate(lines) if line.strip().startswith("dbeta = dbeta + "))
    made = next(k for k, line in enumerate(lines) if re.match(r"\s+dpre\w* = ", line))
    assert made < first_sum
    grad, saved = _inputs(module, "layernorm_gelu", [(9, 5), (5,), (5,)])
    plain = module.layernorm_gelu_backward(grad, saved)._asdict()
    restore = _blocks(module, 2)
    try:
        blocked = module.layernorm_gelu_backward(grad, saved)._asdict()
    finally:
        restore()
    for k, v in plain.items():
        torch.testing.assert_close(blocked[k], v, rtol=1e-12, atol=1e-12)


def test_a_mean_over_the_batch_divides_by_the_whole_batch_not_a_block():
    d, module = generated(scaled_mse)
    grad, saved = _inputs(module, "scaled_mse", [(7, 3), (3,), (7, 3)])
    plain = module.scaled_mse_backward(grad, saved)._asdict()
    restore = _blocks(module, 3)  # blocks of 3, 3 and 1 rows
    try:
        blocked = module.scaled_mse_backward(grad, saved)._asdict()
    finally:
        restore()
    for k, v in plain.items():
        torch.testing.assert_close(blocked[k], v, rtol=1e-12, atol=1e-12)


def test_only_a_batch_larger_than_the_cache_on_a_cpu_is_cut():
    _, module = derived("layernorm")
    grad, saved = _inputs(module, "layernorm", [(64, 32), (32,), (32,)])
    cuts: list[int] = []
    real = module._row_blocks

    def counted(rows, *tensors):
        blocks = real(rows, *tensors)
        cuts.append(len(blocks))
        return blocks

    module._row_blocks, block_bytes = counted, module.BLOCK_BYTES
    try:
        module.layernorm_backward(grad, saved)  # 16 KB a tensor: within CACHE_BYTES, done whole
        assert cuts == []
        module.BLOCK_BYTES = 64 * 32 * 8 // 5  # 12 rows of the largest tensor
        read = sum(t.numel() * t.element_size() for t in (grad, saved["var_inv"], saved["xhat"]))
        restore = _blocks(module, None, cache_bytes=read - 1)  # what the backward reads: 1 byte over
        try:
            blocked = module.layernorm_backward(grad, saved)
        finally:
            restore()
        assert cuts == [6]  # 5 blocks of 12 rows and one of 4
    finally:
        module._row_blocks, module.BLOCK_BYTES = real, block_bytes
    torch.testing.assert_close(blocked.x, module.layernorm_backward(grad, saved).x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["log_softmax", "mse_loss", "gelu"])
def test_a_backward_with_no_sum_over_the_batch_is_not_cut(name):
    """Each row apart in a few passes: blocks would only add a copy of each block into the whole."""
    d, _ = derived(name)
    assert d.code.in_blocks is None


@pytest.mark.parametrize("the_op", [mlp_mse, max_middle])
def test_a_batch_is_not_cut_where_a_block_would_split_a_matrix_product_or_a_max(the_op):
    """dW1 = x.T @ dh sums two operands' product over the batch: one matmul, not one per block; a
    max's gradient scatters dout to its argmax, which the plan does not cut."""
    d, _ = generated(the_op)
    assert d.code.in_blocks is None
    assert "_row_blocks" not in "\n".join(d.code.backward)


# compositions the property tests found, each a bug of the plan before its fix
@op(x="n d", y="d k", w="k")
def value_read_by_a_later_sweep(x, y, w):
    """dpre1 is computed between two sweeps and read by the second: it must outlive the first group."""
    return (apply(sympy.Abs, ((apply(sympy.Abs, ((x @ y) + w))) @ w))) @ x


@op(x="d", y="d", w="n")
def sum_read_outside_the_sweeps(x, y, w):
    """dw = Σ_d dv3[d] · ones(n): free of the batch dim d, it follows the sweep that sums."""
    return (x.apply(sympy.sin) + y) + w.sum("n")


@op(x="n k", y="d", w="k d")
def value_between_sweeps_read_by_a_row(x, y, w):
    """dx reads dv3 (free of n), which reads the sum over n of dmm1·x: a second sweep."""
    v3 = ((x * x) * x).sum("n")
    return apply(lambda u: sympy.Max(u, 0), (x @ (((w @ y) + v3) ** 2)))


@op(x="n d", y="d")
def sweep_that_reads_no_tensor_along_the_batch(x, y):
    """dy is constant along the batch (d here): its sweep reads no tensor a block of (and its code's
    `torch.ones` is no vector of ones to sum with)."""
    return (((1.5 + x).flatten("n", "d")).sum("nd")) / ((y.sum("d")) ** 2 + 1)


@pytest.mark.parametrize(
    "the_op",
    [
        value_read_by_a_later_sweep,
        sum_read_outside_the_sweeps,
        value_between_sweeps_read_by_a_row,
        sweep_that_reads_no_tensor_along_the_batch,
    ],
)
def test_compositions_the_property_tests_found_give_the_plain_gradients_in_blocks(the_op):
    d, module = generated(the_op)
    assert d.code.in_blocks is not None
    sizes = {"n": 5, "d": 3, "k": 4}
    shapes = [tuple(1 if dim is None else sizes[dim.name] for dim in t.layout) for t in d.program.inputs]
    assert module._row_blocks(3) == ((0, 3),)  # a sweep with no tensor to size a block by: one block
    name = d.program.name
    grad, saved = _inputs(module, name, shapes)
    backward = getattr(module, f"{name}_backward")
    plain = backward(grad, saved)._asdict()
    for rows in (1, 2):
        restore = _blocks(module, rows)
        try:
            blocked = backward(grad, saved)._asdict()
        finally:
            restore()
        for k, v in plain.items():
            torch.testing.assert_close(blocked[k], v, rtol=1e-12, atol=1e-12, msg=f"d{k} in blocks of {rows}")


@pytest.mark.parametrize("name", ["layernorm", "batchnorm"])
def test_the_differentiable_op_passes_gradcheck_in_blocks(name):
    """The generated op's autograd Function (what `loss.backward()` runs) saves what the blocked
    backward reads too: float64 gradcheck with blocks of 3 rows, a ragged last one."""
    _, module = derived(name)
    g = torch.Generator().manual_seed(1)
    x, gamma, beta = (
        torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in [(8, 5), (5,), (5,)]
    )
    restore = _blocks(module, 3)
    try:
        assert torch.autograd.gradcheck(getattr(module, name), (x, gamma, beta))
    finally:
        restore()


def test_a_blocks_gradient_is_computed_in_the_rows_of_the_whole_not_copied_there():
    """After the first block (which makes the whole tensor), dx's chain starts with out=its rows."""
    d, module = derived("layernorm")
    assert "out=_rows_out(dx_all, 0, start, N)" in "\n".join(d.code.in_blocks.lines)
    grad, saved = _inputs(module, "layernorm", [(11, 6), (6,), (6,)])
    plain = module.layernorm_backward(grad, saved)
    restore = _blocks(module, 3)  # 4 blocks: 3, 3, 3 and 2 rows
    try:
        with AtenOps() as ops:
            blocked = module.layernorm_backward(grad, saved)
    finally:
        restore()
    assert ops.counts["copy_"] == 1  # the first block, into the whole it makes
    torch.testing.assert_close(blocked.x, plain.x, rtol=1e-12, atol=1e-12)


def test_checking_in_blocks_puts_back_the_users_block_size():
    from derive.verify import in_row_blocks

    d, module = derived("layernorm")
    grad, saved = _inputs(module, "layernorm", [(5, 4), (4,), (4,)])
    restore = _blocks(module, 2)
    try:
        assert [rows for rows, _ in in_row_blocks(module, d.program, grad, saved)] == [1, 3]
        assert module.ROWS_PER_BLOCK == 2
    finally:
        restore()
