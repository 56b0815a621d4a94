"""What a D-Bus client of kho-agentd loads: kho-agentctl's bus commands and a VM manager's
AgentClient talk to the daemon and need neither the decoder nor the engine. Loading them anyway
cost `kho-agentctl status` ~100 ms per run (benchmarks/bench_daemon.py: 1.6x -> 2.4x its floor)
once the errno advice imported the format registry and the contract imported xml.sax.saxutils
(which loads urllib.request, http and email)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("kho_agent.abi.registry", "kho_agent.abi.kho_state", "kho_agent.engine",
         "kho_agent.sim", "urllib.request", "http.client")


@pytest.mark.parametrize("modules", [
    ["kho_agent.client"],
    ["kho_agent.cli", "kho_agent.cli.bus", "kho_agent.cli.status", "kho_agent.cli.sessions"],
])
def test_a_bus_client_loads_no_decoder_and_no_engine(modules: list[str]) -> None:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, env={"PYTHONPATH": str(REPO)})
    loaded = set(json.loads(done.stdout))
    assert set(modules) <= loaded
    assert not [m for m in HEAVY if m in loaded], sorted(m for m in loaded if m in HEAVY)
