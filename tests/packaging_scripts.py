"""The scripts of packaging/ as modules, for the tests (and tests/vm): "packaging" is not a
Python package, and must not become one (it would shadow PyPA's `packaging`), so a script is
loaded from its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"


def load(script: str) -> ModuleType:
    """packaging/<script>.py as the module `kho_packaging_<script>`, loaded once per process
    (every test module gets the same one)."""
    name = f"kho_packaging_{script}"
    if name in sys.modules:
        return sys.modules[name]
    path = PACKAGING / f"{script}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while they are created
    spec.loader.exec_module(module)
    return module
