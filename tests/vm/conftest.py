"""The QEMU suite's builds report their progress on pytest's terminal (progress.py): a cold
cache builds two kernels and the guest images for about half an hour, which pytest's capturing
would otherwise keep silent."""

from __future__ import annotations

import pytest

from . import progress


def pytest_configure(config: pytest.Config) -> None:
    progress.attach(config)
