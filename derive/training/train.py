"""``python -m derive train``: train the lecture's network with generated backward code only.

Exercise 4 of LECTURE.md: n_embd 10, n_hidden 200, block 3, batch 32, SGD with ``p -= lr * grad``
(lr 0.1, then 0.01 after half the steps), inside ``torch.no_grad()``, every gradient coming from
the modules in ``generated/`` (see :mod:`derive.training.mlp`). Then batch norm is recalibrated over the
whole training set, the train and val losses are reported and names are sampled.

Example:
    >>> from derive.training.data import load_dataset
    >>> data = load_dataset()
    >>> run = train(TrainConfig(steps=300, n_hidden=16), data)
    >>> len(run.losses), sum(run.losses[:50]) > sum(run.losses[-50:])
    (300, True)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from . import gpt, mlp, wavenet
from .data import Dataset, load_dataset
from ..errors import DeriveError

PROG = "derive train"


MODELS = {"mlp": mlp, "wavenet": wavenet, "gpt": gpt}
"""The models ``--model`` names: modules with the same functions (init_params, STEPS, calibrate, ...)."""


class TrainUsageError(DeriveError):
    """A bad option value or combination (exit code 2)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (the lecture's exercise 4 by default)."""

    steps: int = 200_000
    n_embd: int = 10
    n_hidden: int = 200
    block_size: int = 3
    batch_size: int = 32
    lr: float = 0.1
    seed: int = mlp.LECTURE_SEED
    backward: str = "layers"
    check_every: int = 0
    ddp: int = 0  # processes sharing each batch (0: one process)
    model: str = "mlp"  # mlp (the lecture's), wavenet (the hierarchical one that follows it) or gpt

    def lr_at(self, step: int) -> float:
        """``lr`` for the first half of the steps, ``lr / 10`` after (0.1 then 0.01 in the lecture).

        >>> [TrainConfig(steps=4).lr_at(i) for i in range(4)]
        [0.1, 0.1, 0.01, 0.01]
        """
        return self.lr if step < self.steps // 2 else self.lr / 10


@dataclass
class GradCheck:
    """Generated gradients recomputed with autograd every ``check_every`` steps: the worst difference."""

    checks: int = 0
    max_abs_diff: float = 0.0
    param: str = ""
    step: int = -1

    def add(self, step: int, diff: float, param: str) -> None:
        """Record one check."""
        self.checks += 1
        if diff >= self.max_abs_diff:
            self.max_abs_diff, self.param, self.step = diff, param, step


@dataclass
class TrainRun:
    """What one training run produced: parameters, the loss of every step, time, checks."""

    config: TrainConfig
    params: Any  # the model's Params
    losses: list[float]
    seconds: float
    grad_check: GradCheck | None = None

    @property
    def steps_per_second(self) -> float:
        """Training steps per second of wall time (the loop only)."""
        return len(self.losses) / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True)
class Evaluation:
    """Losses after batch-norm recalibration, and samples."""

    train_loss: float
    val_loss: float
    samples: list[str] = field(default_factory=list)


Progress = Callable[[int, float, float], None]
"""Called as ``progress(step, loss, steps_per_second)`` while training."""


def train(
    config: TrainConfig,
    data: Dataset,
    progress: Progress | None = None,
    step_fn: Callable[..., Any] | None = None,
    rows: tuple[int, int] | None = None,
) -> TrainRun:
    """Train from ``config.seed`` with the step named by ``config.backward`` ("layers", "network", "autograd").

    Runs inside ``torch.no_grad()`` on one thread (the ops are tiny: more threads only add overhead);
    with ``check_every`` > 0 the generated gradients are recomputed by autograd every that many steps.
    ``config.ddp`` processes share each batch (:mod:`.ddp`); one of them passes its ``step_fn`` and
    its ``rows`` (``(k, K)``: the k-th of K equal slices of every batch).
    """
    if config.ddp and step_fn is None:
        from .ddp import train_distributed

        return train_distributed(config, data)
    model = MODELS[config.model]
    step_fn = step_fn or model.STEPS[config.backward]
    params, g = model.init_params(data.vocab.size, config.n_embd, config.n_hidden, config.block_size, config.seed)
    if config.backward == "autograd":
        params = type(params)(*(p.requires_grad_() for p in params))
    check = GradCheck() if config.check_every and config.backward != "autograd" else None
    if hasattr(model, "optimizer"):  # AdamW for the transformer
        update = model.optimizer(params)
    else:

        def update(grads: Any, lr: float) -> None:
            mlp.sgd_update(params, grads, lr)

    Xtr, Ytr = data.train.X, data.train.Y
    losses: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for step in range(config.steps):
                ix = torch.randint(0, Xtr.shape[0], (config.batch_size,), generator=g)
                if rows is not None:  # every process draws the same batch and takes its slice
                    ix = ix.chunk(rows[1])[rows[0]]
                Xb, Yb = Xtr[ix], Ytr[ix]
                loss, grads = step_fn(params, Xb, Yb)
                if check is not None and step % config.check_every == 0:
                    check.add(step, *mlp.max_abs_difference(grads, model.autograd_step(params, Xb, Yb)[1]))
                update(grads, config.lr_at(step))
                losses.append(loss.item())
                if progress is not None:
                    progress(step, losses[-1], (step + 1) / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    params = type(params)(*(p.detach() for p in params))
    return TrainRun(config=config, params=params, losses=losses, seconds=seconds, grad_check=check)


def evaluate(run: TrainRun, data: Dataset, samples: int = 20) -> Evaluation:
    """Recalibrate batch norm over the training set, then the train/val losses and ``samples`` names."""
    model = MODELS[run.config.model]
    stats = model.calibrate(run.params, data.train.X)
    names = model.sample(run.params, stats, run.config.block_size, samples, seed=run.config.seed + 10)
    return Evaluation(
        train_loss=model.evaluate(run.params, stats, data.train.X, data.train.Y),
        val_loss=model.evaluate(run.params, stats, data.val.X, data.val.Y),
        samples=[data.vocab.decode(tokens) for tokens in names],
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

DESCRIPTION = """\
Train the lecture's makemore MLP (LECTURE.md, exercise 4), the hierarchical "WaveNet" model that
follows it (--model wavenet), or a small character-level transformer (--model gpt: 2 pre-norm
blocks of 4-head causal self-attention and a GELU MLP, 64 dims, context 16, AdamW), with
generated backward code only.

Every gradient comes from the modules in generated/: by default the forward of generated.embedding,
linear, batchnorm, tanh, linear and cross_entropy, then each one's fused backward in reverse
(--backward network: generated.makemore_mlp's single fused backward). SGD runs inside
torch.no_grad(); autograd is used only by --check-every and --compare-autograd.

Initialisation as in the lecture: a torch.Generator seeded with --seed draws C, W1, b1, W2, b2 and
then every batch; bngain and bnbias come from the global generator, seeded with torch.manual_seed(--seed)
(the lecture leaves it unseeded). After training, batch norm's mean and unbiased variance are
recomputed over the whole training set, train and val losses are printed and names are sampled
(generator seeded with --seed + 10)."""

EPILOG = """\
data: one word per line; the vocabulary is '.' (start/end, reserved) then the data's characters
sorted; the words are shuffled with random.seed(42) and split 80/10/10. Without --data, a built-in
list of 5,000 made-up names (a deterministic syllable generator in derive/training/data.py) is used.

examples:
  python -m derive train --data names.txt                     the lecture's run (200,000 steps)
  python -m derive train --steps 2000 --check-every 100       short run, autograd cross-check
  python -m derive train --data names.txt --compare-autograd --steps 5000
  python -m derive train --steps 20000 --plot loss.png        needs: pip install 'derive[plot]'
  python -m derive train --model wavenet --steps 5000 --compare-autograd
  python -m derive train --model gpt --steps 5000 --compare-autograd
  python -m derive train --ddp 2 --batch-size 64 --steps 300  2 processes, each half of every batch

exit status: 0 ok, 2 usage or data error, 130 interrupted."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() prints one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise TrainUsageError(message)


def _int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``derive train`` argument parser."""
    defaults = TrainConfig()
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, metavar="PATH", help="word list, one word per line (default: built-in names)")
    p.add_argument("--vocab", metavar="CHARS", help="fix the vocabulary to '.' plus CHARS; other characters are errors")
    p.add_argument("--steps", type=_int_at_least(1), default=defaults.steps, help="SGD steps (default: %(default)s)")
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="mlp",
        help="mlp: the lecture's network; wavenet: the hierarchical one that follows it, context 8; gpt: a "
        "character-level transformer, context 16, AdamW (default: mlp)",
    )
    p.add_argument(
        "--hidden", type=_int_at_least(1), default=None, help="hidden units (default: mlp 200, wavenet 128, gpt 256)"
    )
    p.add_argument(
        "--batch-size",
        type=_int_at_least(2, " (batch norm's unbiased variance divides by n - 1)"),
        default=defaults.batch_size,
        help="examples per step (default: %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate, divided by 10 after half the steps (default: mlp and wavenet 0.1, gpt 0.001)",
    )
    p.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=defaults.seed,
        help="initialisation and batch seed (default: %(default)s)",
    )
    p.add_argument(
        "--backward",
        choices=["layers", "network"],
        default=defaults.backward,
        help="layers: compose the generated per-layer modules; network: generated.makemore_mlp (default: %(default)s)",
    )
    p.add_argument(
        "--check-every",
        type=_int_at_least(1),
        metavar="K",
        default=0,
        help="every K steps recompute the gradients with autograd and report the largest difference",
    )
    p.add_argument(
        "--compare-autograd",
        action="store_true",
        help="train again from the same seed with loss.backward() and compare losses and speed",
    )
    p.add_argument(
        "--ddp",
        type=_int_at_least(2),
        metavar="K",
        default=0,
        help="K processes (gloo, 127.0.0.1), each with 1/K of every batch, using modules generated with --shard n",
    )
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of log10 training loss (needs matplotlib)")
    p.add_argument("--samples", type=_int_at_least(0), default=20, help="names to sample (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training configuration an argument namespace asks for."""
    if args.seed + 10 >= 2**63:
        raise TrainUsageError(f"argument --seed: must be below 2**63 - 10, got {args.seed}")
    if args.ddp and args.batch_size % args.ddp:
        raise TrainUsageError(
            f"--ddp {args.ddp}: --batch-size {args.batch_size} does not split into {args.ddp} equal parts"
        )
    if args.model != "mlp" and args.backward == "network":
        raise TrainUsageError(f"--backward network is the MLP's whole-network op; --model {args.model} composes layers")
    if args.ddp and args.model != "mlp":
        raise TrainUsageError("--ddp trains the MLP (--model mlp)")
    if args.ddp and (args.backward != "layers" or args.check_every):
        raise TrainUsageError(
            "--ddp composes the per-layer modules: it takes neither --backward network nor --check-every"
        )
    sizes = MODELS[args.model].DEFAULTS
    return TrainConfig(
        steps=args.steps,
        n_embd=sizes.n_embd,
        block_size=sizes.block_size,
        n_hidden=args.hidden or sizes.n_hidden,
        model=args.model,
        batch_size=args.batch_size,
        lr=args.lr or sizes.lr,
        seed=args.seed,
        backward=args.backward,
        check_every=args.check_every,
        ddp=args.ddp,
    )


def require_matplotlib() -> None:
    """Fail before training, with the install command, when ``--plot`` cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TrainUsageError(
            "--plot needs matplotlib, which is not installed: pip install 'derive[plot]' (or: pip install matplotlib)"
        ) from None


_PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")  # matplotlib writes each without extras


def check_plot_path(path: Path) -> None:
    """The plot's file name and folder, checked before training, so a long run does not end in an error."""
    if path.is_dir():
        raise TrainUsageError(f"--plot {path}: is a folder; name the file, e.g. {path / 'loss.png'}")
    if path.suffix.lower() not in _PLOT_SUFFIXES:
        raise TrainUsageError(f"--plot {path}: name the file {', '.join(_PLOT_SUFFIXES)}")
    from ..emit import writable_folder
    from ..errors import OutputPathError

    folder = path.expanduser().resolve().parent
    if not folder.is_dir():
        blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
        why = f"{blocker} is a file" if blocker is not None and not blocker.is_dir() else "does not exist"
        raise TrainUsageError(f"--plot: folder {str(folder)!r} {why}")
    try:
        writable_folder(folder, option=f"--plot {path}")
    except OutputPathError as exc:
        raise TrainUsageError(str(exc)) from None


class ProgressLine:
    """The progress line on ``stream``: rewritten in place on a terminal, every 5% of the steps otherwise."""

    def __init__(self, steps: int, label: str, stream: TextIO, interval_s: float = 0.2) -> None:
        self.steps, self.label, self.stream = steps, label, stream
        self.tty = stream.isatty()
        self.interval_s = interval_s
        self.every = max(1, steps // 20)
        self.last = 0.0
        self.shown = 0

    def __call__(self, step: int, loss: float, rate: float) -> None:
        """Show step ``step`` (0-based) if it is time to."""
        done = step + 1
        if self.tty:
            now = time.perf_counter()
            if now - self.last < self.interval_s and done < self.steps:
                return
            self.last = now
            end = "\n" if done == self.steps else ""
            text = self._text(done, loss, rate)
            self.shown = max(self.shown, len(text))
            print(f"\r{text.ljust(self.shown)}", end=end, file=self.stream, flush=True)
        elif done % self.every == 0 or done == self.steps:
            print(self._text(done, loss, rate), file=self.stream, flush=True)

    def _text(self, done: int, loss: float, rate: float) -> str:
        """``generated: step   150/3,000  loss 2.6710  2,675 steps/s``."""
        width = len(f"{self.steps:,}")
        return f"{self.label}: step {done:>{width},}/{self.steps:,}  loss {loss:.4f}  {rate:,.0f} steps/s"


def describe_setup(config: TrainConfig, data: Dataset) -> str:
    """The lines printed before training: data, model, optimiser, backward."""
    count = MODELS[config.model].parameter_count(data.vocab.size, config.n_embd, config.n_hidden, config.block_size)
    backward = {
        "layers": "generated embedding -> linear -> batchnorm -> tanh -> linear -> cross_entropy, each *_backward",
        "network": "generated makemore_mlp_backward (whole network fused)",
    }[config.backward]
    if config.model == "gpt":
        backward = (
            "generated token_position_embedding -> 2 x (attention_block -> mlp_block) -> layernorm -> linear -> "
            "cross_entropy, each *_backward"
        )
    if config.model == "wavenet":
        backward = (
            "generated embedding -> 3 x (pairs -> linear -> batchnorm -> tanh) -> linear -> cross_entropy, "
            "each *_backward"
        )
    return (
        f"data:     {data.source}: {data.words:,} words, {data.vocab.size} tokens {data.vocab.chars!r}\n"
        f"examples: train {len(data.train):,} / val {len(data.val):,} / test {len(data.test):,}\n"
        f"model:    {config.model}, {count:,} parameters (n_embd {config.n_embd}, n_hidden {config.n_hidden}, "
        f"block_size {config.block_size}), seed {config.seed}\n"
        f"{'adamw:' if config.model == 'gpt' else 'sgd:':<10}{config.steps:,} steps, batch {config.batch_size}, "
        f"lr {config.lr:g} then {config.lr / 10:g} "
        f"from step {config.steps // 2:,}\n"
        f"backward: {backward}"
        + (
            f"\nddp:      {config.ddp} processes (gloo, 127.0.0.1), each {config.batch_size // config.ddp} rows of every "
            "batch; modules generated with --shard n all-reduce over the batch"
            if config.ddp
            else ""
        )
    )


def describe_run(run: TrainRun) -> str:
    """One line: steps, time, speed, first and last loss; and the autograd check when there was one."""
    line = (
        f"trained {len(run.losses):,} steps in {run.seconds:.1f} s ({run.steps_per_second:,.0f} steps/s); "
        f"batch loss {run.losses[0]:.4f} at the first step, {run.losses[-1]:.4f} at the last"
    )
    check = run.grad_check
    if check is not None and check.checks:
        line += (
            f"\nautograd check: {check.checks:,} checks (every {run.config.check_every:,} steps), largest "
            f"|generated - autograd| = {check.max_abs_diff:.3g} (d{check.param}, step {check.step:,})"
        )
    return line


def describe_evaluation(result: Evaluation, data: Dataset) -> str:
    """Train and val losses after recalibration."""
    return (
        f"batch norm recalibrated over the {len(data.train):,} training examples\n"
        f"train loss {result.train_loss:.4f}\nval loss   {result.val_loss:.4f}"
    )


def describe_comparison(runs: dict[str, TrainRun], results: dict[str, Evaluation]) -> str:
    """Generated and autograd side by side, and how far apart their loss trajectories are."""
    names = list(runs)
    rows = [
        ("steps/s", lambda r, e: f"{r.steps_per_second:,.0f}"),
        ("seconds", lambda r, e: f"{r.seconds:.1f}"),
        ("first batch loss", lambda r, e: f"{r.losses[0]:.4f}"),
        ("last batch loss", lambda r, e: f"{r.losses[-1]:.4f}"),
        ("train loss", lambda r, e: f"{e.train_loss:.4f}"),
        ("val loss", lambda r, e: f"{e.val_loss:.4f}"),
    ]
    lines = [f"{'':18s}" + "".join(f"{name:>12s}" for name in names)]
    for label, cell in rows:
        lines.append(f"{label:18s}" + "".join(f"{cell(runs[n], results[n]):>12s}" for n in names))
    a, b = (runs[n].losses for n in names[:2])
    gap = max(abs(x - y) for x, y in zip(a, b))
    speedup = runs[names[0]].steps_per_second / runs[names[1]].steps_per_second
    lines.append(
        f"{names[0]} is {speedup:.2f}x as fast over the {len(a):,} steps\n"
        f"largest per-step loss difference: {gap:.3g}"
    )
    return "\n".join(lines)


def save_plot(runs: dict[str, TrainRun], path: Path) -> None:
    """log10 of the training loss per step (light) and its mean over windows of 1,000 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for style, (name, run) in zip(["-", "--"], runs.items()):
        log_loss = torch.tensor(run.losses).log10()
        window = 1000 if len(log_loss) >= 5000 else max(1, len(log_loss) // 20)
        usable = len(log_loss) // window * window
        means = log_loss[:usable].view(-1, window).mean(1)
        line = ax.plot(log_loss, alpha=0.25, linewidth=0.5)[0]
        centres = torch.arange(len(means)) * window + window / 2
        ax.plot(centres, means, style, color=line.get_color(), label=f"{name} (mean of {window:,} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 training loss")
    ax.set_title("derive train: the lecture's MLP, generated backward")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise TrainUsageError(f"--plot: cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def run_cli(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Validate, load, train (once or twice), evaluate and print; raises DeriveError for user errors."""
    config = config_from_args(args)
    if args.plot is not None:
        check_plot_path(args.plot)
        require_matplotlib()
    data = load_dataset(args.data, config.block_size, args.vocab)
    print(describe_setup(config, data), file=out, flush=True)
    configs = {"generated": config}
    if args.compare_autograd:
        configs["autograd"] = replace(config, backward="autograd", check_every=0)
    runs: dict[str, TrainRun] = {}
    results: dict[str, Evaluation] = {}
    for name, cfg in configs.items():
        progress = None if args.quiet else ProgressLine(cfg.steps, name, err)
        runs[name] = train(cfg, data, progress)
        results[name] = evaluate(runs[name], data, samples=args.samples if name == "generated" else 0)
        print(f"\n[{name}] {describe_run(runs[name])}", file=out, flush=True)
    print(file=out)
    if args.compare_autograd:
        print(describe_comparison(runs, results), file=out)
    else:
        print(describe_evaluation(results["generated"], data), file=out)
    if args.plot is not None:
        save_plot(runs, args.plot)
        print(f"plot: {args.plot}", file=out)
    if args.samples:
        seed = config.seed + 10
        print(f"\n{args.samples} samples (torch.Generator seeded {seed}):", file=out)
        for name in results["generated"].samples:
            print(f"  {name}", file=out)
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``python -m derive train ARGS``; returns the exit status (0, 2 on errors, 130)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except DeriveError as exc:
        print(f"{PROG}: error: {exc} (see: python -m derive train --help)", file=sys.stderr)
        return exc.exit_code
    try:
        return run_cli(args, sys.stdout, sys.stderr)
    except DeriveError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python -m derive train | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
