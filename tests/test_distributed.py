"""Sharded dims: a generated module whose reductions over a split dim all-reduce (gloo, 2 processes)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from derive import catalogue, derive
from derive.emit import render
from derive.errors import OpDefinitionError

from .conftest import derive_cli

WORLD = 2


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3 + 1
    gamma, beta, dout = torch.randn(5, generator=g), torch.randn(5, generator=g), torch.randn(8, 5, generator=g)
    return x, gamma.double(), beta.double(), dout.double()


def _worker(rank: int, folder: str) -> None:
    """One process: its rows of the batch, the sharded module, results saved for the test."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        module = _module(Path(folder) / "batchnorm.py")
        x, gamma, beta, dout = _inputs()
        rows = slice(rank * 4, rank * 4 + 4)
        out, saved = module.batchnorm_forward(x[rows], gamma, beta, group=dist.group.WORLD)
        grads = module.batchnorm_backward(dout[rows], saved)
        steps = module.batchnorm_backward_steps(dout[rows], saved)
        # the differentiable layer, through autograd: the same all-reduces
        leaves = [t.clone().requires_grad_() for t in (x[rows], gamma, beta)]
        module.batchnorm(*leaves, group=dist.group.WORLD).backward(dout[rows])
        layer = {f"layer_{n}": t.grad for n, t in zip(("x", "gamma", "beta"), leaves)}
        torch.save({"out": out, **grads._asdict(), "steps_x": steps["x"], **layer}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_sharded_batchnorm_on_two_processes_equals_one_process(tmp_path):
    d = derive(catalogue()["batchnorm"], shard="n")
    (tmp_path / "batchnorm.py").write_text(render(d))
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    module = _module(tmp_path / "batchnorm.py")
    x, gamma, beta, dout = _inputs()
    out, saved = module.batchnorm_forward(x, gamma, beta)  # group=None: one process, the whole batch
    grads = module.batchnorm_backward(dout, saved)
    for name, whole in [("out", out), ("x", grads.x), ("steps_x", grads.x), ("layer_x", grads.x)]:
        torch.testing.assert_close(torch.cat([p[name] for p in parts]), whole, rtol=0, atol=1e-6)
    for name in ("gamma", "beta"):  # a parameter's gradient sums over the batch: every process has all of it
        for p in parts:
            torch.testing.assert_close(p[name], getattr(grads, name), rtol=0, atol=1e-6)
            torch.testing.assert_close(p[f"layer_{name}"], getattr(grads, name), rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="process group"):
        module.register_custom_op()


@pytest.mark.parametrize(
    "name, shard, forward, backward",
    [
        ("batchnorm", "n", 2, 2),  # mean and variance; dbeta and dgamma (dx reuses them)
        ("layernorm", "n", 0, 2),  # rows are normalised alone: only the parameters' gradients sum over n
        ("layernorm", "d", 2, 2),  # a row split across processes: its statistics and dx's two sums
        ("linear", "n", 0, 2),  # dW = x.T @ dout and db sum over n
    ],
)
def test_the_module_all_reduces_exactly_the_reductions_over_the_sharded_dim(name, shard, forward, backward):
    d = derive(catalogue()[name], shard=shard)
    assert sum("_all_reduce(" in line for line in d.code.forward) == forward, d.code.forward
    assert sum("_all_reduce(" in line for line in d.code.backward) == backward, d.code.backward
    unsharded = derive(catalogue()[name])
    assert not any("_all_reduce" in line for line in unsharded.code.forward + unsharded.code.backward)
    assert "group=None" in render(d) and "group=None" not in render(unsharded)


@pytest.mark.parametrize(
    "name, shard, message",
    [
        ("softmax", "d", "takes a max over the sharded dim 'd'"),
        ("cross_entropy", "c", "sharded dim 'c'"),
        ("embedding", "v", "at other positions"),
        ("batchnorm", "q", "has no dim 'q' to shard; its dims: n, d"),
    ],
)
def test_a_dim_that_cannot_be_sharded_is_refused_in_one_line(name, shard, message):
    with pytest.raises(OpDefinitionError, match=re.escape(message)):
        derive(catalogue()[name], shard=shard)


def test_the_command_line_marks_the_all_reduces_and_keeps_generated_single_process(tmp_path):
    r = derive_cli("batchnorm", "--shard", "n", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "sharded: n is split across the processes of `group`" in r.stdout
    assert "dgamma = all_reduce((dout*xhat).sum(0), group)" in r.stdout
    assert (tmp_path / "batchnorm.py").read_text().startswith('"""Generated by `python -m derive batchnorm --shard n`')
    r = derive_cli("batchnorm", "--shard", "n")
    assert r.returncode == 2 and "--shard writes a distributed module" in r.stderr
