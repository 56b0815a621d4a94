"""Which incoming sessions of the current simulated boot are retrieved (and by which process) or
finished: an append-only log, `incoming.log` in the boot's directory, of lines
`R <hex name> <pid> <start time>` and `F <hex name>`. The holder is named by its pid and its
start time, as pids are reused: a holder that died is never mistaken for the process that got
its pid later. One small append per RETRIEVE_SESSION or FINISH (a rewrite of the whole boot
state per retrieval made a verify of 1,000 sessions quadratic, and a file per session cost an
inode creation each). Only the holder of /dev/liveupdate retrieves, and the kernel lets one
process hold it, so the log needs no lock: single appends of a line are atomic (O_APPEND), and a
reader consumes whole lines only."""

from __future__ import annotations

import os
from pathlib import Path

from .store import own_identity, pid_alive

LOG_FILE = "incoming.log"


def _key(name: str) -> str:
    # session names are up to 63 arbitrary bytes: hex keeps a line one token per field
    return name.encode(errors="surrogateescape").hex()


class RetrievalLog:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOG_FILE
        self._fd = -1
        self._read = 0          # bytes of the log applied so far
        self._retrieved: dict[str, tuple[int, int | None]] = {}  # hex name -> (pid, start)
        self._finished: set[str] = set()

    def _open(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _refresh(self) -> None:
        """Apply what other processes appended since the last look."""
        fd = self._open()
        size = os.fstat(fd).st_size
        if size <= self._read:
            return
        data = os.pread(fd, size - self._read, self._read)
        end = data.rfind(b"\n") + 1   # a line being appended right now waits for next time
        for line in data[:end].decode("ascii", errors="replace").splitlines():
            fields = line.split()
            if len(fields) in (3, 4) and fields[0] == "R" and all(f.isdigit()
                                                                  for f in fields[2:]):
                # a line of an earlier version has no start time
                start = int(fields[3]) if len(fields) == 4 else None
                self._retrieved[fields[1]] = (int(fields[2]), start)
            elif len(fields) == 2 and fields[0] == "F":
                self._retrieved.pop(fields[1], None)
                self._finished.add(fields[1])
        self._read += end

    def _append(self, line: str) -> None:
        os.write(self._open(), line.encode("ascii") + b"\n")

    def ever_retrieved(self) -> set[str]:
        """The names RETRIEVE_SESSION handed out in this boot, by any process, finished since
        or not."""
        self._refresh()
        # FINISH is refused on a session not retrieved: every finished one was retrieved first
        ever = set(self._retrieved) | self._finished
        return {bytes.fromhex(key).decode(errors="surrogateescape") for key in ever}

    def finished(self, name: str) -> bool:
        self._refresh()
        return _key(name) in self._finished

    def holder(self, name: str) -> int | None:
        """The pid holding the session retrieved, or None. A holder that exited closed its
        session, and closing a retrieved session finishes it: that is recorded here."""
        self._refresh()
        holder = self._retrieved.get(_key(name))
        if holder is None:
            return None
        pid, start = holder
        if (pid, start) == own_identity() or pid_alive(pid, start):
            return pid
        self.mark_finished(name)
        return None

    def mark_retrieved(self, name: str) -> None:
        pid, start = own_identity()
        self._append(f"R {_key(name)} {pid} {start}")
        self._retrieved[_key(name)] = (pid, start)

    def mark_finished(self, name: str) -> None:
        key = _key(name)
        if key in self._finished:
            return
        self._append(f"F {key}")
        self._retrieved.pop(key, None)
        self._finished.add(key)

