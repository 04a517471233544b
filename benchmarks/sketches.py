"""Hand-written lowerings of the same fused formulas, to size what a better lowering would gain.

``python -m benchmarks.sketches [--clock cpu] [--ops ...]`` times each generated fused backward against a
sketch that computes the same gradients from the same ``saved`` dict, with the lowering changes proposed
in the benchmark report:

- scalar and per-row/per-column factors are combined first (``dloss / N``, ``gamma * var_inv * dgamma / (N-1)``),
  so that every full-size tensor is touched once;
- ``a + b * c`` patterns become ``torch.addcmul`` and the result is updated in place (``addcmul_``), so one
  full-size buffer is allocated instead of one per operator;
- a δ(c, target[n]) term is a sparse update of N entries, not a dense one-hot of N x C;
- ``(1 - h**2) * dh`` is ``torch.ops.aten.tanh_backward(dh, h)``; shared products are computed once.

The sketches are not generated code: they read ``saved`` by the names the catalogue ops give their
intermediates, and every sketch is checked against the generated backward before it is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import torch

from . import cases as cases_mod
from .runtime import Config, _max_rel_err, time_interleaved


def _one_hot_free(probs: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    d = probs * scale  # the only full-size pass
    d[torch.arange(probs.shape[0], device=probs.device), target] -= scale
    return d


def cross_entropy(go: Any, s: dict) -> tuple:
    dloss = torch.ones_like(s["loss"]) if go is None else go
    return (_one_hot_free(s["probs"], s["target"], dloss / s["N"]),)


def _batchnorm(go: torch.Tensor, s: dict, denom: int) -> tuple:
    xhat, N = s["xhat"], s["N"]
    dbeta = go.sum(0)
    dgamma = (go * xhat).sum(0)
    a = (s["gamma"] * s["var_inv"]).reshape(-1)  # (D,)
    dx = torch.addcmul(-(a * dbeta / N), go, a).addcmul_(xhat, a * dgamma / denom, value=-1)
    return dx, dgamma, dbeta


def batchnorm(go: torch.Tensor, s: dict) -> tuple:
    return _batchnorm(go, s, s["N"] - 1)


def batchnorm_biased(go: torch.Tensor, s: dict) -> tuple:
    return _batchnorm(go, s, s["N"])


def layernorm(go: torch.Tensor, s: dict) -> tuple:
    xhat, vi, D = s["xhat"], s["var_inv"], s["D"]
    dbeta = go.sum(0)
    dgamma = (go * xhat).sum(0)
    g = go * s["gamma"]  # once (the generated code computes it twice)
    t3 = g.sum(1, keepdim=True)
    t4 = (g * xhat).sum(1, keepdim=True)
    dx = torch.addcmul(-(vi * t3 / D), g, vi).addcmul_(xhat, vi * t4 / D, value=-1)
    return dx, dgamma, dbeta


def log_softmax(go: torch.Tensor, s: dict) -> tuple:
    scale = go.sum(1, keepdim=True) / s["total"]  # (N, 1)
    return (torch.addcmul(go, s["e"], scale, value=-1),)


def makemore_mlp(go: Any, s: dict) -> tuple:
    N, E = s["N"], s["E"]
    dloss = torch.ones_like(s["loss"]) if go is None else go
    dlogits = _one_hot_free(s["probs"], s["Yb"], dloss / N)
    dh = dlogits @ s["W2"].T
    dhpreact = torch.ops.aten.tanh_backward(dh, s["h"])
    t3 = dhpreact.sum(0)
    t4 = (s["bnraw"] * dhpreact).sum(0)
    a = s["bngain"] * s["bnvar_inv"]  # (1, J)
    dhprebn = torch.addcmul(-(a * t3 / N), dhpreact, a).addcmul_(s["bnraw"], a * t4 / (N - 1), value=-1)
    dembcat = dhprebn @ s["W1"].T
    dW2 = s["h"].T @ dlogits
    dW1 = s["embcat"].T @ dhprebn
    dC = dloss.new_zeros((s["V"], E)).index_add_(0, s["Xb"].reshape(-1), dembcat.reshape(-1, E))
    return dC, dW1, dhprebn.sum(0), dW2, dlogits.sum(0), t4[None], t3[None]


SKETCHES: dict[str, Callable[..., tuple]] = {
    "cross_entropy": cross_entropy,
    "batchnorm": batchnorm,
    "batchnorm_biased": batchnorm_biased,
    "layernorm": layernorm,
    "log_softmax": log_softmax,
    "makemore_mlp": makemore_mlp,
}


def compare(case: cases_mod.Case, cfg: Config) -> dict[str, Any]:
    mod = case.module
    inp = case.make(torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        out, saved = getattr(mod, f"{case.op}_forward")(*inp.args, **inp.params)
    go = None if out.dim() == 0 else torch.randn(out.shape, generator=torch.Generator().manual_seed(cfg.seed + 1))
    backward, sketch = getattr(mod, f"{case.op}_backward"), SKETCHES[case.op]
    try:
        err = _max_rel_err(list(sketch(go, saved)), list(backward(go, saved)))
    except (KeyError, RuntimeError) as exc:  # the generated module changed under the sketch
        return {"case": case.label, "error": f"{type(exc).__name__}: {exc}"}
    timed = time_interleaved({"generated": lambda: backward(go, saved), "sketch": lambda: sketch(go, saved)}, cfg)
    gen, sk = timed["generated"]["median"], timed["sketch"]["median"]
    return {"case": case.label, "generated_s": gen, "sketch_s": sk, "speedup": gen / sk, "rel_err": err}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sketches", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(cases_mod.OPS))
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    threads = 1 if args.clock == "cpu" else args.threads
    torch.set_num_threads(threads)
    cfg = Config(threads=threads, rounds=args.rounds, min_run_time=0.1, compile=False, clock=args.clock)
    print(f"torch threads {torch.get_num_threads()}, clock {args.clock}", file=sys.stderr)
    print("| case | generated | sketch | speedup | max rel diff |\n|---|---|---|---|---|")
    for case in cases_mod.cases(args.ops.split(","), args.sizes.split(",")):
        r = compare(case, cfg)
        if "error" in r:
            print(f"| {r['case']} | n/a | n/a | n/a | {r['error']} |")
            continue
        print(
            f"| {r['case']} | {r['generated_s'] * 1e3:.3f} ms | {r['sketch_s'] * 1e3:.3f} ms | "
            f"{r['speedup']:.2f}x | {r['rel_err']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
