"""Every bad input gets a one-line message naming the problem, exit code 2, no traceback,
and leaves the output folder exactly as it was."""

from __future__ import annotations

import pytest
import sympy

from derive import DeriveError, api, apply, derive, op
from derive.cli import main
from derive.emit import render
from derive.verify import load_module, verify

from .test_cli import derive_cli


class Result:
    """What one in-process CLI call returned and printed (subprocess-free, so fast)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(capsys, *args: str) -> Result:
    code = main(list(args))
    out, err = capsys.readouterr()
    return Result(code, out, err)


HEADER = "import sympy\nfrom derive import op, apply, exp, log\n\n"

BAD_OPS = {
    "non_ascii_dim": (
        '@op(x="n é")\ndef f(x):\n    out = x * x\n    return out\n',
        ["'é' is not a dim name (ASCII letters, digits and _)"],
    ),
    "spec_keyword_misspelt": (
        '@op(x="n d", idx="ints n")\ndef f(x, idx):\n    out = x.take(idx, "n")\n    return out\n',
        ["'ints' reads as the keyword 'int'", "lower case"],
    ),
    "spec_int_and_const": (
        '@op(x="const int n d")\ndef f(x):\n    out = x * x\n    return out\n',
        ["int or const, not both"],
    ),
    "unknown_dim": ('@op(x="n d")\ndef f(x):\n    out = x.sum("q")\n    return out\n', ["'q'", "x", "f.py:"]),
    "kept_dim_reduced_again": (
        '@op(x="n t d")\ndef f(x):\n    out = x.sum("t", keepdim=True).sum("t")\n    return out\n',
        ["'t'", "keepdim=True", "without keepdim"],
    ),
    "matmul_mismatch": (
        '@op(x="n d", w="k h")\ndef f(x, w):\n    out = x @ w\n    return out\n',
        ["'d'", "'k'", "matmul"],
    ),
    "float_index": (
        '@op(x="n d", y="n")\ndef f(x, y):\n    out = x.take(y, "d")\n    return out\n',
        ["integer index", "x"],
    ),
    "int_arithmetic": (
        '@op(x="n d", y="int n")\ndef f(x, y):\n    out = x * 2 + y\n    return out\n',
        ["integer", "'y'"],
    ),
    "int_output": ('@op(y="int n")\ndef f(y):\n    return y\n', ["integer tensor", "nothing to differentiate"]),
    "floor": ('@op(x="n d")\ndef f(x):\n    out = apply(sympy.floor, x)\n    return out\n', ["floor", "no derivative"]),
    "sign": ('@op(x="n d")\ndef f(x):\n    out = apply(sympy.sign, x)\n    return out\n', ["sign", "no derivative"]),
    "returns_none": ('@op(x="n d")\ndef f(x):\n    out = x * 2\n', ["returned NoneType"]),
    "returns_number": ('@op(x="n d")\ndef f(x):\n    return 3\n', ["returned int", "not a tensor"]),
    "bad_dim_name": ('@op(x="n 2d")\ndef f(x):\n    return x * 2\n', ["'2d'", "not a dim name"]),
    "undeclared_input": ('@op(x="n d")\ndef f(x, w):\n    return x * w\n', ["'w'", "no dims declared"]),
    # an input called N gives dim n's size another name (size_n); a local called N cannot
    "size_name_clash": ('@op(x="n d")\ndef f(x):\n    N = x * x\n    return N\n', ["'N'", "dim 'n'"]),
    "max_over_a_tuple": (
        '@op(x="b t d")\ndef f(x):\n    out = x.max(("t", "d"))\n    return out\n',
        ["max takes one dim", 'x.max("t").max(...)'],
    ),
    "torch_function": (
        'import torch\n\n\n@op(x="n d")\ndef f(x):\n    out = torch.sigmoid(x)\n    return out\n',
        ["torch.sigmoid", "derive tensor", "apply(f, x)", "f.py:"],
    ),
    "negative_parameter": (
        '@op(x="n d")\ndef f(x, s=-1.0):\n    out = apply(lambda u: sympy.Max(0, s * (u - 1)), x)\n    return out\n',
        ["'s'", "-1.0", "positive", "-s"],
    ),
    "no_differentiable_input": (
        '@op(x="const n d", idx="int n")\ndef f(x, idx):\n    out = x.take(idx, "n")\n    return out\n',
        ["every input is 'int' or 'const'", "nothing gets a gradient"],
    ),
    "division_by_zero": ('@op(x="n d")\ndef f(x):\n    out = x / 0\n    return out\n', ["division by zero", "f.py:"]),
    "spec_not_a_string": ('@op(x=["n", "d"])\ndef f(x):\n    out = x * 2\n    return out\n', ["not a string", "'n d'"]),
    "unclosed_parenthesis": ('@op(x="(n d")\ndef f(x):\n    out = x * 2\n    return out\n', ["unclosed '('"]),
    "dims_differing_in_case": ('@op(x="n N")\ndef f(x):\n    out = x * 2\n    return out\n', ["differ only in case"]),
    "dims_differing_in_case_across_inputs": (
        '@op(x="n d", y="N d")\ndef f(x, y):\n    out = x * 2\n    return out\n',
        ["differ only in case"],
    ),
    "bare_decorator": ("@op\ndef f(x):\n    out = x * 2\n    return out\n", ["@op needs the dims", '@op(x="n d")']),
    "declared_name_differs_from_the_parameter": (
        '@op(x="n d", W="d o")\ndef f(x, w):\n    out = x @ w\n    return out\n',
        ["declares ['W']", "no such parameter"],
    ),
    "dunder_op_name": (
        '@op(x="n d")\ndef __init__(x):\n    out = x * 2\n    return out\n\n\nf = __init__\n',
        ["reserved"],
    ),
    "keyword_only_input": ('@op(x="n d")\ndef f(*, x):\n    out = x * 2\n    return out\n', ["keyword-only", "'x'"]),
    "undefined_sympy_function": (
        '@op(x="n d")\ndef f(x):\n    out = apply(lambda u: sympy.Function("g")(u), x)\n    return out\n',
        ["undefined SymPy function", "g(", "f.py:"],
    ),
    "function_without_torch_code": (
        '@op(x="n d")\ndef f(x):\n    out = apply(lambda u: sympy.LambertW(u), x)\n    return out\n',
        ["LambertW", "no PyTorch function", "f.py:6"],  # black had failed on the printer's comment
    ),
    "function_torch_lacks": (
        '@op(x="n d")\ndef f(x):\n    out = apply(lambda u: sympy.gamma(u), x)\n    return out\n',
        ["torch.special.gamma", "not in this PyTorch", "f.py:6"],
    ),
    "heaviside_of_an_input": (
        '@op(x="n d")\ndef f(x):\n    out = apply(lambda u: sympy.Heaviside(u) * u, x)\n    return out\n',
        ["Heaviside has no derivative", "f.py:6"],
    ),
    "piecewise_without_a_default": (
        '@op(x="n d")\ndef f(x):\n    out = apply(lambda u: sympy.Piecewise((u, u > 0)), x)\n    return out\n',
        ["Piecewise((u, u > 0)) has no value where none of its conditions holds", "(value, True)", "f.py:6"],
    ),
    "sympy_function_on_a_tensor": (
        '@op(x="n d")\ndef f(x):\n    out = sympy.tanh(x)\n    return out\n',
        ["SymPy function cannot take a derive tensor", "apply(f, x)", "f.py:6"],
    ),
    "torch_functional_on_a_tensor": (
        'import torch.nn.functional as F\n\n\n@op(x="n d")\ndef f(x):\n    out = F.relu(x)\n    return out\n',
        ["torch.relu", "derive tensor", "f.py:9"],
    ),
    "user_code_error": (
        '@op(x="n d")\ndef f(x):\n    out = x * undefined_name\n    return out\n',
        ["NameError", "undefined_name", "f.py:"],
    ),
}


@pytest.fixture
def out_dir(tmp_path):
    folder = tmp_path / "generated"
    folder.mkdir()
    (folder / "keep.py").write_text("# must survive\n")
    return folder


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case", sorted(BAD_OPS))
def test_malformed_op_exits_2_naming_the_problem(case, tmp_path, out_dir, capsys):
    source, expected = BAD_OPS[case]
    (tmp_path / "f.py").write_text(HEADER + source)
    before = _snapshot(out_dir)
    r = cli(capsys, f"{tmp_path / 'f.py'}:f", "--out", str(out_dir))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in expected:
        assert word in r.stderr, (word, r.stderr)
    assert _snapshot(out_dir) == before


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("missing.py:f", "no such file"),
        ("{dir}/broken.py:f", "failed to import"),
        ("{dir}/plain.py:nothing", "has no function 'nothing'"),
        ("{dir}/plain.py:helper", "not declared with @derive.op"),
        ("softmx", "did you mean softmax"),
        ("{dir}/plain.py", "plain.py:FUNCTION"),
        ('{dir}/we"ird.py:f', "cannot go into a generated file header"),
    ],
)
def test_bad_op_references_exit_2(spec, expected, tmp_path, out_dir, capsys):
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    (tmp_path / "plain.py").write_text("def helper(x):\n    return x\n")
    (tmp_path / 'we"ird.py').write_text(HEADER + '@op(x="n d")\ndef f(x):\n    out = x * 2\n    return out\n')
    before = _snapshot(out_dir)
    r = cli(capsys, spec.format(dir=tmp_path), "--out", str(out_dir))
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _snapshot(out_dir) == before


def test_errors_are_derive_errors_in_python(tmp_path):
    (tmp_path / "f.py").write_text(HEADER + BAD_OPS["unknown_dim"][0])
    with pytest.raises(DeriveError):
        api.run(api.resolve(f"{tmp_path / 'f.py'}:f"), write=False)


def test_kinks_use_pytorchs_convention_and_say_so(capsys):
    r = cli(capsys, "relu", "--no-write")
    assert r.returncode == 0 and "PyTorch's convention" in r.stdout


def test_a_malformed_op_through_the_real_command_line(tmp_path, out_dir):
    (tmp_path / "f.py").write_text(HEADER + BAD_OPS["floor"][0])
    r = derive_cli(f"{tmp_path / 'f.py'}:f", "--out", str(out_dir))
    assert r.returncode == 2 and "floor" in r.stderr and "Traceback" not in r.stderr


def test_generated_code_that_crashes_in_verification_is_one_line_that_says_whose_bug(monkeypatch, capsys, out_dir):
    def crash(*args, **kwargs):
        raise IndexError("too many indices for tensor of dimension 1")

    monkeypatch.setattr(api, "verify_module", crash)
    monkeypatch.setenv("DERIVE_NO_CACHE", "1")
    before = _snapshot(out_dir)
    r = cli(capsys, "relu", "--out", str(out_dir))
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "raised IndexError while being verified (too many indices" in r.stderr and "derive's bug" in r.stderr
    assert _snapshot(out_dir) == before


def test_latex_with_another_format_is_a_usage_error(capsys, out_dir):
    before = _snapshot(out_dir)
    r = cli(capsys, "relu", "--latex", "--format", "json", "--out", str(out_dir))
    assert r.returncode == 2 and "--latex and --format json" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(out_dir) == before


def test_no_arguments_is_a_usage_error():
    r = derive_cli()
    assert r.returncode == 2 and "name an op" in r.stderr


def test_generated_functions_reject_wrong_shapes_and_dtypes():
    import torch

    from generated.batchnorm import batchnorm_forward
    from generated.cross_entropy import cross_entropy_forward

    with pytest.raises(ValueError, match="gamma must be"):
        batchnorm_forward(torch.randn(4, 3), torch.randn(5), torch.randn(3))
    with pytest.raises(TypeError, match="target must be an int64"):
        cross_entropy_forward(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="N-1 != 0"):
        batchnorm_forward(torch.randn(1, 3), torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="needs N != 0"):  # a mean over an empty batch
        cross_entropy_forward(torch.randn(0, 3), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(TypeError, match="float64"):
        batchnorm_forward(torch.randn(4, 3), torch.randn(3, dtype=torch.float64), torch.randn(3))
    # the derivation took eps positive (SymPy reads sqrt(eps**2) as eps): another value is refused
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be positive"):
            batchnorm_forward(torch.randn(4, 3), torch.randn(3), torch.randn(3), eps=eps)


DOMAIN_OPS = {  # a log of an input: checked where the forward is finite, not at normal inputs
    # finite in float64 at normal inputs, but not in float32, the dtype autograd is compared in
    "unit (float32)": '@op(x="n d")\ndef f(x):\n    out = x**1000\n    return out\n',
    "positive": (
        '@op(logits="n c", target="int n", prior="const c")\ndef f(logits, target, prior, tau=1.0):\n'
        '    z = logits + tau * log(prior)\n    m = z.max("c", keepdim=True)\n'
        '    logp = z - m - log(exp(z - m).sum("c", keepdim=True))\n'
        '    loss = -logp.take(target, "c").mean("n")\n    return loss\n'
    ),
    "unit": '@op(p="n d")\ndef f(p):\n    loss = -(p * log(p) + (1 - p) * log(1 - p)).sum("d").mean("n")\n    return loss\n',
    # a focal loss: finite at seed 0's normal inputs of the comparisons' sizes, not at the gradcheck's
    "positive (at gradcheck's sizes)": (
        '@op(z="n c", y="const n c")\ndef f(z, y, gamma=2.0):\n'
        "    p = apply(lambda u: 1 / (1 + sympy.exp(-u)), z)\n    pt = y * p + (1 - y) * (1 - p)\n"
        '    loss = (-((1 - pt) ** gamma) * log(pt)).mean("c").mean("n")\n    return loss\n'
    ),
}


@pytest.mark.parametrize("domain", sorted(DOMAIN_OPS))
def test_an_op_that_takes_the_log_of_an_input_verifies_where_its_forward_is_finite(domain, tmp_path, capsys):
    (tmp_path / "f.py").write_text(HEADER + DOMAIN_OPS[domain])
    r = cli(capsys, f"{tmp_path / 'f.py'}:f", "--no-write")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified" in r.stdout and "the forward is not finite at standard normal ones" in r.stdout, r.stdout
    result = api.run(api.resolve(f"{tmp_path / 'f.py'}:f"), write=False)
    assert result.verification.domain == domain.split()[0] and result.verification.ok
    assert all(status != "FAILED" for _, status in result.verification.exact)


def test_a_reference_autograd_cannot_give_is_named_as_autograds(tmp_path, out_dir, capsys):
    """sqrt(u² - 1) where u > 1 or u < -1, else 0: autograd's where makes NaN from the branch it does
    not take (0 · NaN), while derive's gradient is finite. The reference's branches are clamped to
    their regions, but an ``Or`` bounds no value. The error says whose value is not finite."""
    body = "    out = apply(lambda u: sympy.Piecewise((sympy.sqrt(u * u - 1), (u > 1) | (u < -1)), (0, True)), x)\n"
    (tmp_path / "f.py").write_text(HEADER + '@op(x="n d")\ndef f(x):\n' + body + "    return out\n")
    r = cli(capsys, f"{tmp_path / 'f.py'}:f", "--out", str(out_dir))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "(fused backward: autograd's reference for x is not finite at inputs drawn" in r.stderr, r.stderr


def test_a_failed_verification_says_which_check_failed_and_writes_nothing(tmp_path, out_dir, capsys):
    (tmp_path / "f.py").write_text(HEADER + '@op(x="n d")\ndef f(x):\n    out = log(x - 100)\n    return out\n')
    before = _snapshot(out_dir)
    r = cli(capsys, f"{tmp_path / 'f.py'}:f", "--out", str(out_dir))
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "failed verification (forward: out is not finite at inputs drawn" in r.stderr, r.stderr
    assert _snapshot(out_dir) == before


def test_a_grad_output_of_the_wrong_shape_is_refused_naming_the_shape():
    import torch

    from generated.linear import linear_backward, linear_forward

    out, saved = linear_forward(torch.randn(4, 3), torch.randn(3, 5), torch.randn(5))
    with pytest.raises(ValueError, match=r"linear: grad_output must have the output's shape \(4, 5\), got \(5,\)"):
        linear_backward(torch.randn(5), saved)


@pytest.mark.parametrize(
    "fn",
    [
        lambda u: sympy.erfc(u),
        lambda u: sympy.erfinv(sympy.tanh(u) / 2),
        lambda u: sympy.cot(u / 4 + 1),
        lambda u: sympy.sec(u / 4),
        lambda u: sympy.csc(u / 4 + 1),
        lambda u: sympy.sinc(u),
        lambda u: sympy.polygamma(1, u * u + 2),
    ],
    ids=["erfc", "erfinv", "cot", "sec", "csc", "sinc", "polygamma"],
)
def test_sympy_functions_with_a_torch_kernel_are_printed_and_verify(fn):
    """Functions SymPy's torch printer left as unsupported comments (black then failed on them)."""

    @op(x="n d")
    def f(x):
        return apply(fn, x)

    d = derive(f)
    assert verify(d, load_module(render(d), "f")).ok


def test_a_user_op_without_out_goes_to_generated_here_never_into_the_catalogue(tmp_path, capsys, monkeypatch):
    """With no --out, a user's op went into derive's own generated/, whose --check then failed; a
    failed run left an empty --out folder behind."""
    (tmp_path / "f.py").write_text(HEADER + '@op(x="n d")\ndef f(x):\n    return x * x\n')
    (tmp_path / "bad.py").write_text(HEADER + '@op(x="n d")\ndef f(x):\n    return x.sum("q")\n')
    monkeypatch.chdir(tmp_path)
    r = cli(capsys, "bad.py:f", "--out", "new/deeper", "-q")
    assert r.returncode == 2 and not (tmp_path / "new").exists(), r.stderr
    r = cli(capsys, "f.py:f", "-q")
    assert r.returncode == 0 and (tmp_path / "generated" / "f.py").is_file(), r.stderr
    monkeypatch.chdir(api.default_out().parent)
    r = cli(capsys, f"{tmp_path / 'f.py'}:f", "-q")
    assert r.returncode == 2 and "derive's own catalogue folder" in r.stderr and "--out DIR" in r.stderr, r.stderr
    assert not (api.default_out() / "f.py").exists()


def test_derive_takes_a_catalogue_name_too_and_a_misspelt_one_is_a_derive_error():
    """``derive("linear")`` failed with "'str' object has no attribute 'program'"."""
    assert derive("linear").name == "linear"
    with pytest.raises(DeriveError, match="did you mean linear"):
        derive("lineer")


def test_a_piecewise_whose_conditions_cover_every_value_needs_no_true_branch():
    """(u > 0), (u < 0), (u = 0) cover the reals: refused by a check that read only the last condition."""

    @op(x="n d")
    def f(x):
        return apply(lambda u: sympy.Piecewise((u, u > 0), (-u, u < 0), (0, sympy.Eq(u, 0))), x)

    d = derive(f)
    assert verify(d, load_module(render(d), "f")).ok


def test_an_out_folder_never_loses_a_file_derive_did_not_write(tmp_path, capsys, monkeypatch):
    """``--out`` overwrote another package's ``__init__.py`` and a module of the op's name (a helper
    wrote into ``derive/`` itself and broke ``from derive import op``), and an explicit ``--out``
    into derive's own ``generated/`` replaced a catalogue module with a user's op."""
    (tmp_path / "f.py").write_text(HEADER + '@op(x="n d")\ndef linear(x):\n    return x * x\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('VERSION = "1.0"\n')
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "linear.py").write_text("x = 1\n")
    for out, says in [("pkg", "__init__.py derive did not write"), ("mods", "derive did not write it")]:
        r = cli(capsys, "f.py:linear", "--out", out, "-q")
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "pkg" / "__init__.py").read_text() == 'VERSION = "1.0"\n'
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["__init__.py"]
    assert (tmp_path / "mods" / "linear.py").read_text() == "x = 1\n"
    before = (api.default_out() / "linear.py").read_text()
    r = cli(capsys, "f.py:linear", "--out", str(api.default_out()), "-q")
    assert r.returncode == 2 and "derive's own catalogue folder" in r.stderr, r.stderr
    assert (api.default_out() / "linear.py").read_text() == before
    assert cli(capsys, "f.py:linear", "--out", "fresh", "-q").returncode == 0  # its own folder: written
    assert cli(capsys, "f.py:linear", "--out", "fresh", "-q").returncode == 0  # and again: derive's file
    r = cli(capsys, "--check", "--out", "fresh")
    assert r.returncode == 0 and "fresh/ is current" in r.stdout, r.stdout + r.stderr  # no catalogue asked for


@pytest.mark.parametrize("name", ["torch", "typing", "itertools"])
def test_an_op_named_after_a_module_its_code_or_file_would_hide_is_refused(name: str, tmp_path, capsys):
    """An op called ``torch`` shadowed the module in its own generated code (a traceback in the
    verification); ``typing.py`` would hide the module the generated code imports from its folder.
    Other standard-library names (``trace``, ``select``) are fine: nothing imports them there."""
    (tmp_path / "f.py").write_text(HEADER + f'@op(x="n d")\ndef {name}(x):\n    return x * x\n')
    r = cli(capsys, f"{tmp_path / 'f.py'}:{name}", "--out", str(tmp_path / "gen"), "-q")
    assert r.returncode == 2 and "rename the op" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "gen").exists()


@pytest.mark.parametrize("args", [("--check", "tanh"), ("--list", "--all"), ("--all", "--check")])
def test_two_runs_asked_at_once_are_a_usage_error(args: tuple[str, ...], capsys):
    """``--check batchnorm`` ignored the op; ``--list --all`` listed and ignored ``--all``."""
    r = cli(capsys, *args)
    assert r.returncode == 2 and "give one" in r.stderr, r.stderr


def test_the_python_api_refuses_what_the_command_line_refuses(tmp_path):
    """``api.run(out_dir=<a file>)`` raised FileExistsError, ``device="foo"`` a VerificationError
    calling itself derive's bug, and ``derive(<plain function>)`` an AttributeError."""
    from derive.errors import DeviceError, OutputPathError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        api.run(api.resolve("tanh"), out_dir=tmp_path / "afile")
    with pytest.raises(DeviceError, match="not a torch device name"):
        api.run(api.resolve("tanh"), write=False, device="foo")

    @op(x="n d")
    def two(x):
        return x * 2

    with pytest.raises(OutputPathError, match="derive's own catalogue folder"):  # no spec: still a user's op
        api.run(two, verify=False)
    assert not (api.default_out() / "two.py").exists()

    def plain(x):
        return x

    with pytest.raises(DeriveError, match="decorate it with @op"):
        derive(plain)


@pytest.mark.parametrize("bad", [-1, 5])
def test_an_index_outside_the_dim_it_indexes_is_refused_by_the_forward(bad: int):
    """``cross_entropy_forward(logits, [0, 1, 2, -1])`` read class C-1 for -1 and its backward then
    failed inside torch; an embedding's too."""
    import torch

    from generated.cross_entropy import cross_entropy_forward
    from generated.embedding import embedding_forward

    with pytest.raises(ValueError, match=r"target indexes a dim of size C=5: its values must be in \[0, C\)"):
        cross_entropy_forward(torch.randn(4, 5), torch.tensor([0, 1, 2, bad]))
    with pytest.raises(ValueError, match="X indexes a dim of size V=5"):
        embedding_forward(torch.randn(5, 3), torch.tensor([[0, bad]]))
