"""A host as the engine sees it: a filesystem root plus the kernel seams.

`real_host()` is the machine itself; `kho_agent.sim.SimKernel.host()` is a simulated one whose root
is a directory the simulator keeps (proc, sys, debugfs files written byte-exact), so the readers
(`sysinfo`, `debugfs`, `physmem`) are the same code on both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..abi.errors import AbiError
from ..abi.memory import PhysicalMemory
from ..errors import AgentError
from .kexec import Kexec
from .liveupdate import LiveUpdate


class Sync(Protocol):
    def __call__(self, memory: bool = True) -> None: ...


@dataclass
class Host:
    root: Path
    liveupdate: LiveUpdate
    kexec: Kexec
    simulated: bool = False
    # Make the kernel's views current: debugfs always, /proc/kcore when the argument (memory)
    # is true. A real kernel always is current; the simulator writes its files lazily and
    # flushes them here. Call before reading either.
    sync: Sync = field(default=lambda memory=True: None)

    def path(self, relative: str) -> Path:
        """A path under the host root (`proc/cmdline` -> /proc/cmdline on a real host)."""
        return self.root / relative.lstrip("/")

    @property
    def debugfs(self) -> str:
        return str(self.path("sys/kernel/debug"))

    def memory(self) -> PhysicalMemory | None:
        """Physical memory (`/proc/kcore`), or None when it cannot be read here."""
        from .physmem import ElfCoreMemory

        kcore = self.path("proc/kcore")
        if not os.access(kcore, os.R_OK):
            return None
        try:
            return ElfCoreMemory(str(kcore))
        except (OSError, AbiError, AgentError):  # unreadable or not a core: decode without it
            return None


def real_host(root: Path = Path("/")) -> Host:
    from .kexec import RealKexec
    from .liveupdate import RealLiveUpdate

    return Host(root, RealLiveUpdate(root), RealKexec(root))
