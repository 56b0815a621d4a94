"""The simulated host the engine tests share (test_engine.py and the modules beside it): a
simulated kernel, a target image, an agent, and helpers that play the clients. No blake3
import: tests/test_digest_fallback.py uses it for hosts without the module."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kho_agent.engine import Engine, EngineConfig
from kho_agent.sim import SimAbi, SimKernel


class Rig:
    """A simulated host with an agent, a target image, and helpers to play the clients."""

    def __init__(self, tmp: Path, target_abi: SimAbi | None = None, *, memory_mib: int = 4096,
                 cmdline: str = "console=ttyS0 kho=on liveupdate=on") -> None:
        self.tmp = tmp
        self.sim = SimKernel.create(tmp / "sim", memory_mib=memory_mib, cmdline=cmdline)
        self.target = self.sim.write_kernel_image(tmp / "boot" / "vmlinuz-7.3.1-sim",
                                                  release="7.3.1-sim",
                                                  abi=target_abi or SimAbi())
        self.config = EngineConfig(state_dir=tmp / "state")
        self.agent = self.new_agent()

    def new_agent(self) -> Engine:
        agent = Engine(self.sim.host(), self.config)
        agent.start()
        return agent

    def client(self, name: str, contents: dict[int, bytes], ready: bool = True) -> None:
        self.agent.create_session(name, "test")
        for token, data in contents.items():
            fd = os.memfd_create(f"t{token}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.write(fd, data)
            self.agent.preserve(name, fd, token)
            os.close(fd)
        if ready:
            self.agent.set_ready(name, True)

    def reboot_view(self) -> Engine:
        """After the simulated kexec: a new kernel, a new agent process."""
        self.sim = SimKernel(self.tmp / "sim")
        return self.new_agent()

    def state(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.config.state_dir / "state.json").read_text())
        return data
