"""Shared fixtures."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The captured KHO/LUO samples, committed in tests/data/kho-samples."""
    samples = REPO / "tests" / "data" / "kho-samples"
    if not (samples / "case-in-1").is_dir():
        # The samples are committed: their absence is a broken checkout, not a reason to skip.
        pytest.fail(f"kho-samples not found in {samples}")
    return samples


@pytest.fixture(autouse=True, scope="module")
def _collect_cycles_between_modules() -> Iterator[None]:
    """Objects of the simulated kernel hold real descriptors (session socketpairs, locks) in
    reference cycles that only the cyclic collector frees; a module's worth of them is let go
    before the next module starts, so the test process stays far below its descriptor limit."""
    yield
    gc.collect()
