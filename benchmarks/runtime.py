"""Time the backward of one case five ways and count the memory each keeps for it.

- ``eager``: ``NAME_backward(grad_output, saved)``, the generated fused backward;
- ``compiled``: the same function under ``torch.compile`` (compile time reported separately);
- ``atoms``: autograd through ``NAME_forward`` (the atom chain), ``torch.autograd.grad(retain_graph=True)``;
- ``native``: autograd through PyTorch's fused op (``F.cross_entropy``, ``F.batch_norm``, ...);
- ``bound``: the time to stream the bytes the fused backward reads and writes (``torch.add(a, b, out=c)``
  over the same number of bytes), or the time of the GEMMs the backward must do, whichever is larger.

All timings are medians of ``torch.utils.benchmark.Timer.blocked_autorange`` block times, pooled over
``rounds`` interleaved rounds (every method once per round, so slow drift of the machine hits all alike).
"""

from __future__ import annotations

import inspect
import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.benchmark import Timer

from .cases import Case

METHODS = ("eager", "compiled", "atoms", "native", "bound")


@dataclass
class Config:
    threads: int
    rounds: int = 3
    min_run_time: float = 0.15
    compile: bool = True
    seed: int = 1234
    # "wall": time.perf_counter (latency, what a user sees); "cpu": time.thread_time, the CPU time of the
    # timing thread only, which time-slicing by other processes on the machine does not inflate (needs threads=1)
    clock: str = "wall"
    device: str = "cpu"  # where inputs live and kernels run; "cuda" times with a synchronize before each reading

    @property
    def timer(self) -> Callable[[], float]:
        if self.device != "cpu":
            return _synchronized_clock
        return time.thread_time if self.clock == "cpu" else time.perf_counter


def _synchronized_clock() -> float:
    """Wall time once every queued GPU kernel has finished (GPU work is asynchronous)."""
    torch.cuda.synchronize()
    return time.perf_counter()


# -- timing --------------------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable[[], Any]], cfg: Config) -> dict[str, dict[str, float]]:
    """Median (and IQR) in seconds of each callable, pooled over interleaved rounds."""
    for fn in fns.values():  # warm-up: allocator, caches, lazy init
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(cfg.rounds):
        for name, fn in fns.items():
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=cfg.threads, timer=cfg.timer)
            m = timer.blocked_autorange(min_run_time=cfg.min_run_time)
            times[name].extend(m.times)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [med, med, med]
        out[name] = {"median": med, "iqr": q[2] - q[0], "min": min(ts), "blocks": len(ts)}
    return out


def page_faults(fn: Callable[[], Any], cfg: Config, calls: int = 5) -> float | None:
    """Minor page faults per call (fresh large buffers the OS must map and zero), where getrusage exists.

    None on a GPU: its buffers come from the caching allocator, not from fresh host pages.
    """
    if cfg.device != "cpu":
        return None
    try:
        import resource
    except ImportError:
        return None
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


# -- bytes ---------------------------------------------------------------------------------------
def _storages(tensors: list[Any]) -> dict[int, int]:
    """Distinct storages (data pointer -> bytes) of the tensors in ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return seen


def _bytes_beyond(held: dict[int, int], inputs: dict[int, int]) -> int:
    return sum(b for p, b in held.items() if p not in inputs)


def keys_read_by_backward(module: Any, op: str) -> list[str]:
    """The ``saved`` entries the fused backward reads (the module's ``_BACKWARD_KEYS``, else from its source)."""
    keys = getattr(module, "_BACKWARD_KEYS", None)
    if keys is not None:
        return list(keys)
    src = inspect.getsource(getattr(module, f"{op}_backward"))
    return list(dict.fromkeys(re.findall(r'saved\["(\w+)"\]', src)))


def autograd_saved(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, dict[int, int]]:
    """Run ``fn`` recording what autograd saves for its backward (distinct storages)."""
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        held[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, held


# -- lower bound ---------------------------------------------------------------------------------
def stream_fn(nbytes: int, device: str = "cpu") -> Callable[[], Any]:
    """``c = a + b`` over float32 tensors holding ``nbytes`` in all (read 2/3, write 1/3)."""
    numel = max(1, math.ceil(nbytes / 12))
    a, b, c = (torch.rand(numel, device=device) for _ in range(3))
    return lambda: torch.add(a, b, out=c)


def gemm_fn(gemms: list[tuple[int, int, int]], device: str = "cpu") -> Callable[[], Any] | None:
    if not gemms:
        return None
    mats = [tuple(torch.rand(r, c, device=device) for r, c in ((m, k), (k, n), (m, n))) for m, k, n in gemms]

    def run() -> None:
        for a, b, c in mats:
            torch.mm(a, b, out=c)

    return run


# -- one case ------------------------------------------------------------------------------------
def _max_rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest |got - ref| over all gradients, relative to the largest |ref| over all of them.

    (One scale for all: a gradient that is zero in exact arithmetic, like b1's ahead of a batch norm,
    would otherwise show its rounding noise as a 100% error.)
    """
    scale = max(max((b.abs().max().item() for b in ref), default=0.0), 1e-30)
    worst = max(((a.reshape(b.shape) - b).abs().max().item() for a, b in zip(got, ref)), default=0.0)
    return worst / scale


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text[:120]


def run_case(case: Case, cfg: Config) -> dict[str, Any]:
    """Everything measured for one case, as a JSON-ready dict (times in seconds, sizes in bytes)."""
    mod = case.module
    forward = getattr(mod, f"{case.op}_forward")
    backward = getattr(mod, f"{case.op}_backward")
    g = torch.Generator().manual_seed(cfg.seed)
    inp = case.make(g)
    args, params = [a.to(cfg.device) for a in inp.args], inp.params

    # generated forward, without autograd: what `saved` holds
    with torch.no_grad():
        out, saved = forward(*args, **params)
    scalar = out.dim() == 0
    grad_out = None if scalar else torch.randn(out.shape, generator=g).to(cfg.device)
    input_storages = _storages(args)
    saved_tensors = [v for v in saved.values() if isinstance(v, torch.Tensor)]
    used_keys = keys_read_by_backward(mod, case.op)
    used_tensors = [saved[k] for k in used_keys if isinstance(saved.get(k), torch.Tensor)]

    # autograd through the atom chain and through the native op: graphs kept, only backward timed
    def leaves() -> list[Any]:
        return [a.detach().clone().requires_grad_(i in inp.diff) for i, a in enumerate(args)]

    atom_args = leaves()
    atom_out, atom_held = autograd_saved(lambda *a, **k: forward(*a, **k)[0], atom_args, params)
    atom_diff = [atom_args[i] for i in inp.diff]
    nat_args = leaves()
    nat_out, nat_held = autograd_saved(case.native, nat_args, params)
    nat_diff = [nat_args[i] for i in inp.diff]

    def eager() -> Any:
        return backward(grad_out, saved)

    def atoms() -> Any:
        return torch.autograd.grad(atom_out, atom_diff, grad_outputs=grad_out, retain_graph=True)

    def native() -> Any:
        return torch.autograd.grad(nat_out, nat_diff, grad_outputs=grad_out, retain_graph=True)

    ref = list(atoms())
    grads = list(eager())
    errors = {"eager_vs_atoms": _max_rel_err(grads, ref)}

    # bound: the bytes the fused backward must read (its saved inputs, grad_output) and write (grads)
    io = _storages(used_tensors + ([grad_out] if grad_out is not None else []) + grads)
    io_bytes = sum(io.values())
    fns: dict[str, Callable[[], Any]] = {
        "eager": eager,
        "atoms": atoms,
        "native": native,
        "stream": stream_fn(io_bytes, cfg.device),
    }
    gemm = gemm_fn(case.gemms, cfg.device)
    if gemm is not None:
        fns["gemm"] = gemm

    compiled_error = None
    compile_s = None
    if cfg.compile:
        try:
            torch._dynamo.reset()
            cbackward = torch.compile(backward, dynamic=False)
            t0 = time.perf_counter()
            cgrads = list(cbackward(grad_out, saved))
            compile_s = time.perf_counter() - t0
            errors["compiled_vs_atoms"] = _max_rel_err(cgrads, ref)
            fns["compiled"] = lambda: cbackward(grad_out, saved)
        except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not fatal
            compiled_error = _short(exc)
    else:
        compiled_error = "skipped"

    timed = time_interleaved(fns, cfg)
    faults = {k: page_faults(fns[k], cfg) for k in ("eager", "compiled", "atoms", "native") if k in fns}
    med = {k: v["median"] for k, v in timed.items()}
    med["bound"] = max(med["stream"], med.get("gemm", 0.0))
    if "compiled" not in med:
        med["compiled"] = None

    def ratio(a: str, b: str) -> float | None:
        return None if med.get(a) is None or med.get(b) is None else med[a] / med[b]

    return {
        "op": case.op,
        "size": case.size,
        "shape": case.shape,
        "native": case.native_note,
        "time_s": med,
        "iqr_s": {k: v["iqr"] for k, v in timed.items()},
        "min_s": {k: v["min"] for k, v in timed.items()},
        "blocks": {k: v["blocks"] for k, v in timed.items()},
        "compile_s": compile_s,
        "compiled_error": compiled_error,
        "ratios": {
            "eager/atoms": ratio("eager", "atoms"),
            "eager/native": ratio("eager", "native"),
            "eager/bound": ratio("eager", "bound"),
            "compiled/native": ratio("compiled", "native"),
            "atoms/native": ratio("atoms", "native"),
        },
        "bytes": {
            "backward_io": io_bytes,
            "generated_saved": _bytes_beyond(_storages(saved_tensors), input_storages),
            "generated_saved_incl_inputs": sum(_storages(saved_tensors).values()),
            "generated_read_by_fused": _bytes_beyond(_storages(used_tensors), input_storages),
            "atoms_autograd_saved": _bytes_beyond(atom_held, _storages(atom_args)),
            "atoms_autograd_saved_incl_inputs": sum(atom_held.values()),
            "native_autograd_saved": _bytes_beyond(nat_held, _storages(nat_args)),
            "native_autograd_saved_incl_inputs": sum(nat_held.values()),
        },
        "saved_keys": [k for k, v in saved.items() if isinstance(v, torch.Tensor)],
        "read_by_fused": [k for k in used_keys if isinstance(saved.get(k), torch.Tensor)],
        "max_rel_err": errors,
        "page_faults_per_call": faults,
    }


# -- user-style compositions ---------------------------------------------------------------------
def run_composition(name: str, cfg: Config, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """A composition's fused backward against autograd through PyTorch's own ops, with tensor sizes beside.

    ``peak``: the largest tensor the generated backward creates (``derive.verify.TensorSizes``);
    ``forward_largest``: the largest of the forward's inputs, output and the tensors it creates.
    """
    from dataclasses import replace

    from derive.verify import TensorSizes

    from .compositions import COMPOSITIONS, generated

    comp = COMPOSITIONS[name]
    if shapes is not None:
        comp = replace(comp, shapes=shapes)
    d, module = generated(name)
    forward, backward = getattr(module, f"{name}_forward"), getattr(module, f"{name}_backward")
    g = torch.Generator().manual_seed(cfg.seed)
    args, params = [a.to(cfg.device) for a in comp.inputs(g)], dict(comp.params)
    with torch.no_grad(), TensorSizes() as forward_sizes:
        out, saved = forward(*args, **params)
    grad_out = None if out.dim() == 0 else torch.randn(out.shape, generator=g).to(cfg.device)
    differentiable = {t.name for t in d.program.differentiable_inputs}  # a const input gets no gradient
    tensors = [a.detach().clone().requires_grad_(n in differentiable) for n, a in zip(comp.shapes, args)]
    leaves = [t for t in tensors if t.requires_grad]
    ref_out = comp.torch_fn(*tensors, **params)

    def eager() -> Any:
        return backward(grad_out, saved)

    def autograd() -> Any:
        return torch.autograd.grad(ref_out, leaves, grad_outputs=grad_out, retain_graph=True)

    with TensorSizes() as backward_sizes:
        grads = list(eager())
    error = _max_rel_err(grads, list(autograd()))
    timed = time_interleaved({"eager": eager, "autograd": autograd}, cfg)
    faults = {k: page_faults(fn, cfg) for k, fn in (("eager", eager), ("autograd", autograd))}
    med = {k: v["median"] for k, v in timed.items()}
    largest = max([forward_sizes.largest, out.numel()] + [a.numel() for a in args])
    return {
        "name": name,
        "shape": comp.shape_text,
        "doc": (comp.op.doc or "").splitlines()[0] if getattr(comp.op, "doc", "") else "",
        "time_s": med,
        "iqr_s": {k: v["iqr"] for k, v in timed.items()},
        "ratio": med["eager"] / med["autograd"],
        "peak": backward_sizes.largest,
        "peak_op": backward_sizes.largest_op,
        "forward_largest": largest,
        "max_rel_err": error,
        "page_faults_per_call": faults,
    }
