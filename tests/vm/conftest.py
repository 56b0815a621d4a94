"""The QEMU suite's builds report their progress on pytest's terminal (progress.py): a cold
cache builds two kernels and the guest images for about half an hour, which pytest's capturing
would otherwise keep silent."""

from __future__ import annotations

import sys

import pytest

from . import progress


def pytest_configure(config: pytest.Config) -> None:
    progress.attach(config)


def pytest_collection_finish(session: pytest.Session) -> None:
    # pytest imports this package as `vm` (tests/ has no __init__.py); a test module that
    # imports `tests.vm...` loads a second copy of every module, whose progress reporter is not
    # attached: its builds would be silent again. Import them relatively (`from . import ...`).
    doubled = sorted(name for name in sys.modules if name.startswith("tests.vm."))
    if doubled:
        raise pytest.UsageError(f"tests/vm modules imported twice, as {', '.join(doubled)}: "
                                "import them relatively (from . import ...)")
