"""``derive train`` (issue 4, LECTURE.md exercise 4): the lecture's network trained with generated backward code.

Trajectories and data preparation are tested in-process; the command line through subprocesses,
all started at once by one fixture so the interpreter start-ups overlap.
"""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from derive.training import mlp
from derive.training.data import DataError, Vocabulary, builtin_words, load_dataset, read_words
from derive.training.mlp import Params
from derive.training.train import ProgressLine, TrainConfig, evaluate, main, train

NAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "names.txt"
needs_names = pytest.mark.skipif(not NAMES.exists(), reason=f"{NAMES} not present")


@pytest.fixture(scope="module")
def data():
    """names.txt when this checkout sits next to ../shared, else the built-in word list."""
    return load_dataset(NAMES if NAMES.exists() else None)


# ----------------------------------------------------------------------------------------------
# (a) generated backward trains exactly like autograd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backward", ["layers", "network"])
def test_generated_and_autograd_loss_trajectories_agree(data, backward):
    config = TrainConfig(steps=300, backward=backward)
    generated = train(config, data).losses
    reference = train(TrainConfig(steps=300, backward="autograd"), data).losses
    gaps = [abs(a - b) for a, b in zip(generated, reference)]
    assert len(generated) == len(reference) == 300 and max(gaps) < 1e-4, max(gaps)


def test_initial_loss_is_near_the_lectures(data):
    assert abs(train(TrainConfig(steps=1), data).losses[0] - 3.78) < 0.1


def test_check_every_reports_tiny_autograd_differences(data):
    check = train(TrainConfig(steps=50, check_every=10), data).grad_check
    assert check is not None and check.checks == 5 and check.max_abs_diff < 1e-5


def test_generated_step_grads_have_the_parameter_shapes():
    params, g = mlp.init_params(vocab_size=27)
    X, Y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
    for step in (mlp.generated_step, mlp.generated_network_step):
        _, grads = step(params, X, Y)
        assert [gr.shape for gr in grads] == [p.shape for p in params]


def test_init_matches_the_lecture_parameter_count():
    params, _ = mlp.init_params(vocab_size=27, n_hidden=200)
    assert sum(p.numel() for p in params) == 12_297


def test_learning_rate_drops_tenfold_after_half_the_steps():
    config = TrainConfig()
    assert (config.lr_at(99_999), config.lr_at(100_000)) == (0.1, 0.01)


# ----------------------------------------------------------------------------------------------
# (b) data preparation
# ----------------------------------------------------------------------------------------------


@needs_names
def test_names_split_sizes_match_the_lecture():
    ds = load_dataset(NAMES)
    assert (ds.vocab.size, len(ds.train), len(ds.val), len(ds.test)) == (27, 182_625, 22_655, 22_866)


def test_builtin_words_are_deterministic_lowercase_names():
    words = builtin_words()
    assert words == builtin_words() and len(set(words)) == 5000 and all(w.isalpha() and w.islower() for w in words)


def test_builtin_vocabulary_is_the_lectures_27_tokens():
    assert Vocabulary.from_words(builtin_words()).chars == "." + "abcdefghijklmnopqrstuvwxyz"


def test_blank_lines_are_not_words(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("anna\n\n  bob  \n", encoding="utf-8")
    assert read_words(path) == ["anna", "bob"]


def test_fixed_vocabulary_rejects_other_characters(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("\n".join(["abc"] * 9 + ["abz"]), encoding="utf-8")
    with pytest.raises(DataError, match="word 10 .* 'z' outside the vocabulary"):
        load_dataset(path, vocab_chars="abc")


def test_progress_off_a_terminal_is_20_lines_ending_at_the_last_step():
    stream = io.StringIO()
    progress = ProgressLine(steps=1000, label="generated", stream=stream)
    for step in range(1000):
        progress(step, 2.5, 4000.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and lines[-1] == "generated: step 1,000/1,000  loss 2.5000  4,000 steps/s"


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0 and "derive train" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# (c), (d) the command line
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A ``derive train`` invocation: its arguments, the files it needs and what it must print."""

    args: list[str]
    expect: str
    files: dict[str, str | bytes] | None = None
    no_matplotlib: bool = False  # run as if matplotlib were not installed


ERRORS = {
    "missing data file": Case(["--data", "{tmp}/missing.txt"], "does not exist"),
    "empty data file": Case(["--data", "{tmp}/empty.txt"], "is empty", {"empty.txt": "\n"}),
    "word with the reserved '.'": Case(
        ["--data", "{tmp}/dot.txt"], "'bo.b', contains '.', which is reserved", {"dot.txt": "anna\nbo.b\n" * 5}
    ),
    "character outside --vocab": Case(
        ["--data", "{tmp}/abd.txt", "--vocab", "abc"], "'d' outside the vocabulary", {"abd.txt": "abc\nabd\n" * 5}
    ),
    "--steps 0": Case(["--steps", "0"], "--steps: must be at least 1, got 0"),
    "--steps negative": Case(["--steps", "-5"], "--steps: must be at least 1, got -5"),
}
"""Errors checked end to end in a fresh interpreter."""

MORE_ERRORS = {
    "'.' in --vocab": Case(["--vocab", "ab.c"], "--vocab contains '.'"),
    "too few words": Case(["--data", "{tmp}/two.txt"], "only 2 word(s)", {"two.txt": "anna\nbob\n"}),
    "not UTF-8": Case(["--data", "{tmp}/bin.txt"], "not UTF-8", {"bin.txt": b"\xff\xfe\n"}),
    "a directory": Case(["--data", "{tmp}"], "is a directory"),
    "--batch-size 1": Case(["--batch-size", "1"], "--batch-size: must be at least 2"),
    "--lr 0": Case(["--lr", "0"], "--lr: must be a positive number"),
    "unknown option": Case(["--bogus"], "unrecognized arguments: --bogus"),
    "--plot without matplotlib": Case(["--plot", "{tmp}/loss.png"], "pip install 'derive[plot]'", no_matplotlib=True),
    "--plot into a missing folder": Case(["--plot", "{tmp}/nowhere/loss.png"], "does not exist"),
    # each failed only after training (or wrote {tmp}.png and printed {tmp})
    "--plot a folder": Case(["--plot", "{tmp}"], "is a folder; name the file"),
    "--plot a .txt": Case(["--plot", "{tmp}/loss.txt"], "name the file .png"),
    "--plot under a file": Case(["--plot", "{tmp}/afile/loss.png"], "afile is a file", {"afile": "x"}),
    "--ddp 1": Case(["--ddp", "1"], "--ddp: must be at least 2"),
    "--ddp uneven": Case(["--ddp", "3", "--batch-size", "32"], "does not split into 3 equal parts"),
    "--ddp network": Case(["--ddp", "2", "--backward", "network"], "--ddp composes the per-layer modules"),
}
"""Errors checked through main() in this process (same code path, no interpreter start-up)."""


def write_files(case: Case, tmp: Path) -> list[str]:
    """Create the case's files in ``tmp``; its arguments with ``{tmp}`` filled in."""
    for filename, content in (case.files or {}).items():
        if isinstance(content, bytes):
            (tmp / filename).write_bytes(content)
        else:
            (tmp / filename).write_text(content, encoding="utf-8")
    return [arg.replace("{tmp}", str(tmp)) for arg in case.args]


SUCCESSES = {
    "default data": Case(["--steps", "20"], "train loss"),
    "compare with autograd": Case(["--steps", "30", "--compare-autograd", "--samples", "0"], "autograd"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Start every case's ``python -m derive train`` at once; wait for all."""
    tmp = tmp_path_factory.mktemp("train_cli")
    procs = {}
    for name, case in {**ERRORS, **SUCCESSES}.items():
        args = write_files(case, tmp)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "derive", "train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp,
        )
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("name", list(ERRORS))
def test_user_errors_exit_2_with_one_line_naming_the_problem(cli_runs, name):
    result = cli_runs[name]
    lines = result.stderr.strip().splitlines()
    assert (result.returncode, len(lines)) == (2, 1), result.stderr
    assert lines[0].startswith("derive train: error: ") and ERRORS[name].expect in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", list(MORE_ERRORS))
def test_more_user_errors_return_2_with_one_line(tmp_path, capsys, monkeypatch, name):
    case = MORE_ERRORS[name]
    if case.no_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code = main(write_files(case, tmp_path))
    lines = capsys.readouterr().err.strip().splitlines()
    assert (code, len(lines)) == (2, 1) and lines[0].startswith("derive train: error: ") and case.expect in lines[0]


def test_default_data_trains_and_samples_20_names(cli_runs):
    result = cli_runs["default data"]
    assert result.returncode == 0, result.stderr
    assert "built-in list" in result.stdout and "train loss" in result.stdout and "val loss" in result.stdout
    assert len(result.stdout.split("samples (torch.Generator seeded 2147483657):")[1].strip().splitlines()) == 20


def test_compare_autograd_prints_both_runs_side_by_side(cli_runs):
    result = cli_runs["compare with autograd"]
    header = next(line for line in result.stdout.splitlines() if "generated" in line and "autograd" in line)
    assert result.returncode == 0 and header.split() == ["generated", "autograd"], result.stdout
    assert "steps/s" in result.stdout and "largest per-step loss difference: " in result.stdout


def test_ddp_on_two_processes_trains_like_one(data):
    """derive train --ddp 2 --batch-size 64 --steps 300: the single-process losses, to 1e-4."""
    config = TrainConfig(steps=300, batch_size=64)
    one, two = train(config, data), train(replace(config, ddp=2), data)
    assert max(abs(a - b) for a, b in zip(one.losses, two.losses)) < 1e-4
    for name, a, b in zip(Params._fields, one.params, two.params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
    e1, e2 = evaluate(one, data, samples=0), evaluate(two, data, samples=0)
    assert abs(e1.train_loss - e2.train_loss) < 1e-4 and abs(e1.val_loss - e2.val_loss) < 1e-4


@pytest.mark.parametrize("model", ["mlp", "wavenet", "gpt"])
def test_compare_autograd_ends_with_the_largest_per_step_loss_difference(model, capsys):
    """derive train --model M --compare-autograd: generated and autograd from one seed, float32."""
    assert main(["--model", model, "--steps", "300", "--compare-autograd", "-q", "--samples", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("largest per-step loss difference: ")
    assert float(out[-1].split(": ")[1]) < 1e-4


def test_wavenet_fuses_pairs_and_learns():
    """The hierarchical model: context 8, generated backward only; training lowers the val loss."""
    from derive.training import wavenet

    config = TrainConfig(steps=600, model="wavenet", n_embd=24, n_hidden=64, block_size=8)
    assert wavenet.parameter_count(27, 24, 64, 8) == sum(p.numel() for p in wavenet.init_params(27, 24, 64, 8)[0])
    wide = load_dataset(None, block_size=8)  # the built-in names, 8 characters of context
    before = evaluate(train(replace(config, steps=1), wide), wide, samples=0)
    after = evaluate(train(config, wide), wide, samples=0)
    assert after.val_loss < before.val_loss - 0.3, (before, after)
    _, grads = wavenet.layer_step(*_batch(wide, config))
    _, want = wavenet.autograd_step(*_batch(wide, config))
    for name, a, b in zip(wavenet.Params._fields, grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_gpt_attends_causally_and_learns():
    """The transformer: context 16, every gradient from the generated blocks; training lowers the val loss."""
    from derive.training import gpt

    config = TrainConfig(steps=200, model="gpt", n_embd=64, n_hidden=256, block_size=16, lr=1e-3)
    assert gpt.parameter_count(27) == sum(p.numel() for p in gpt.init_params(27)[0])
    wide = load_dataset(None, block_size=16)
    before = gpt.evaluate(gpt.init_params(27)[0], None, wide.val.X, wide.val.Y)  # the val split only: fast
    after = gpt.evaluate(train(config, wide).params, None, wide.val.X, wide.val.Y)
    assert after < before - 0.5, (before, after)
    params, Xb, Yb = _batch(wide, config, gpt)
    _, grads = gpt.layer_step(params, Xb, Yb)
    _, want = gpt.autograd_step(params, Xb, Yb)
    for name, a, b in zip(gpt.Params._fields, grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    x = torch.randn(4, 16, 64)
    changed = x.clone()
    changed[:, -1] += 1.0  # the last position: no earlier one may see it through the generated block
    attn = gpt._block(params, 0)[0]
    block = gpt._GENERATED.attention.attention_block_forward
    out, _ = block(x, *attn, gpt.causal_mask(16))
    shifted, _ = block(changed, *attn, gpt.causal_mask(16))
    torch.testing.assert_close(out[:, :-1], shifted[:, :-1])
    assert not torch.allclose(out[:, -1], shifted[:, -1])


def _batch(data, config, model=None):
    from derive.training import wavenet

    params, g = (model or wavenet).init_params(
        data.vocab.size, config.n_embd, config.n_hidden, config.block_size, seed=1
    )
    ix = torch.randint(0, data.train.X.shape[0], (32,), generator=g)
    return params, data.train.X[ix], data.train.Y[ix]
