"""Host side of the real-VMM scenario: the payload VM and what proves it kept running.

The VM is ``payload/count.asm``, a boot sector that counts in its own RAM and prints the count
every 2^20 steps (assembled here with nasm, 512 bytes, in well under a second: not cached). The
manager that runs it in QEMU is ``jobs/vmm_qemu.py``; these checks read what it wrote.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

PAYLOAD_SOURCE = Path(__file__).resolve().parent / "payload" / "count.asm"
MANAGER = Path(__file__).resolve().parent / "jobs" / "vmm_qemu.py"
COUNT_STEP = 1 << 20  # as count.asm prints


def build_payload(dest: Path) -> Path:
    """Assemble the counting boot sector into ``dest`` (nasm: apt-get install nasm)."""
    subprocess.run(["nasm", "-f", "bin", "-o", str(dest), str(PAYLOAD_SOURCE)], check=True,
                   capture_output=True)
    data = dest.read_bytes()
    if len(data) != 512 or data[510:] != b"\x55\xaa":
        raise RuntimeError(f"{dest} is not a boot sector ({len(data)} bytes)")
    return dest


@dataclass(frozen=True)
class CountLog:
    """The counts a VM printed on its serial port, across one or more QEMU processes."""

    values: list[int]
    junk: list[str]

    @classmethod
    def read(cls, *serial_logs: Path) -> CountLog:
        # One stream: a line cut by the stop is finished by the restored VM in the next log.
        text = "".join(p.read_text(errors="replace") for p in serial_logs)
        values, junk = [], []
        for line in text.replace("\r", "").split("\n")[:-1]:
            if len(line) == 8 and all(c in "0123456789ABCDEF" for c in line):
                values.append(int(line, 16))
            elif line.strip():
                junk.append(line)
        return cls(values, junk)

    def gaps(self) -> list[tuple[int, int]]:
        """Neighbours that are not one step apart: a VM that restarted or lost time shows."""
        pairs = zip(self.values, self.values[1:], strict=False)
        return [(a, b) for a, b in pairs if b - a != COUNT_STEP]
