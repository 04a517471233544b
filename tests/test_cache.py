"""The derivation cache: unchanged ops are near-instant, any change to the op is a miss."""

from __future__ import annotations

from derive import api, cache


def _write_op(path, factor: str) -> None:
    path.write_text(
        "from derive import op\n\n" f"@op(x='n d')\ndef scaled(x):\n    out = x * {factor}\n    return out\n"
    )


def test_unchanged_op_comes_from_the_cache_and_a_change_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "ops_a.py"
    _write_op(src, "3")
    spec = f"{src}:scaled"
    first = api.module_source(api.resolve(spec), spec=spec)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    def no_derivation(*args, **kwargs):
        raise AssertionError("a cache hit must not derive again")

    with monkeypatch.context() as m:
        m.setattr(api, "run", no_derivation)
        again = api.module_source(api.resolve(spec), spec=spec)
    assert again == first
    _write_op(src, "5")
    changed = api.module_source(api.resolve(spec), spec=spec)
    assert changed != first and "5" in changed


def test_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("DERIVE_NO_CACHE", "1")
    assert cache.cache_dir() is None


def test_an_edited_helper_in_another_file_is_a_miss(tmp_path, monkeypatch):
    """The key covers the traced program: a helper the op imports from another file changes it."""
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = tmp_path / "cache_helper_mod.py"
    helper.write_text("from derive import tanh\n\ndef act(t):\n    return tanh(t)\n")
    src = tmp_path / "ops_h.py"
    src.write_text(
        "from derive import op\nfrom cache_helper_mod import act\n\n"
        "@op(x='n d')\ndef activated(x):\n    out = act(x)\n    return out\n"
    )
    spec = f"{src}:activated"
    first = api.module_source(api.resolve(spec), spec=spec)
    assert "torch.tanh(" in first
    helper.write_text("from derive import exp\n\ndef act(t):\n    return exp(t)\n")
    import sys

    sys.modules.pop("cache_helper_mod", None)  # a new process would import the edited file
    changed = api.module_source(api.resolve(spec), spec=spec)
    assert "torch.exp(" in changed and "torch.tanh(" not in changed
