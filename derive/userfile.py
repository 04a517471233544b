"""Import a person's .py file by path, as Python would run it: a real module, siblings importable.

Shared by ``derive PATH.py:FUNCTION`` (api) and ``derive check --against FILE`` (tutor), so both
accept what ``python FILE.py`` accepts: dataclasses, pickling, ``from my_helpers import ...``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_file(path: Path, prefix: str) -> ModuleType:
    """Run ``path`` as a module named ``prefix`` + a hash of its path; its folder is importable while it runs.

    The module is registered in ``sys.modules`` before it runs (``dataclasses`` and ``typing``
    look their module up there) and removed again if it raises, which it may: callers turn the
    exception into a one-line message.
    """
    name = f"{prefix}{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module
