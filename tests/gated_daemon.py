"""kho-agentd with the middle step of its verification held at a gate (tests only).

The daemon is the real one (`kho_agent.daemon.main`); only `observe` (as engine/verify.py calls
it), the step that runs beside the engine, waits before it starts: it creates `GATE.waiting`,
then waits until `GATE` exists. A gate that holds "fail" makes the step fail with EIO instead,
as a read error would. So a test can look at the daemon, deterministically, while its
verification is retrieving-done but not concluded.

    python tests/gated_daemon.py GATE kho-agentd arguments...
"""

from __future__ import annotations

import errno
import sys
import time
from pathlib import Path
from typing import Any

from kho_agent import daemon
from kho_agent.engine import verify
from kho_agent.engine.verifyrun import HostObservation

GATE_TIMEOUT_S = 60


def main() -> int:
    gate = Path(sys.argv[1])
    real = verify.observe

    def gated(*args: Any, **kwargs: Any) -> HostObservation:
        Path(f"{gate}.waiting").touch()
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test never opened {gate}")
            time.sleep(0.01)
        if gate.read_text().strip() == "fail":
            raise OSError(errno.EIO, "the test failed the observation", str(gate))
        return real(*args, **kwargs)

    verify.observe = gated
    return daemon.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
