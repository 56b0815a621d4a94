"""Running a check as kho-agent.service runs the agent: as root, but without CAP_DAC_OVERRIDE
and CAP_DAC_READ_SEARCH (its CapabilityBoundingSet= keeps neither), so a file's mode applies to
root too. Tests use it for a real EACCES on a machine where they run as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SANDBOX_BOUNDING = "-dac_override,-dac_read_search"


def python_without_dac(code: str) -> subprocess.CompletedProcess[str]:
    """`python -c CODE` with this checkout importable; as root, without the two capabilities
    that bypass file modes (skips the test when setpriv is missing)."""
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
        argv = [setpriv, "--inh-caps=-all", f"--bounding-set={SANDBOX_BOUNDING}", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                          stdin=subprocess.DEVNULL)
