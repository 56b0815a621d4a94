"""Progress lines of the QEMU suite's long builds (two kernels, the guest trees and images), on
the terminal while pytest runs.

A cold cache builds for about half an hour; pytest captures what a test or fixture prints (file
descriptors 1 and 2 included) and shows it only when the test fails, so without this the run is
silent that long. Each build says what it builds, from which source and into which cache entry
when it starts; the step it is on (with the log it writes) as it goes; a line every
HEARTBEAT_S seconds while one step runs (elapsed time, the log's last line); and when it ends, how
long it took, or why it failed with the end of its output.

`attach(config)` (tests/vm/conftest.py) sends the lines to pytest's terminal with capturing
suspended for the write; without pytest (quickstart.sh's helpers, a Python shell) they go to
stderr. The reporter is this module's one `REPORTER`: the builds run deep under the cache
(cache.ensure_entry) and the step runners, and threading a parameter through every caller of
those for a terminal line would touch every fixture.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEARTBEAT_S = 45.0     # a line at least this often while a step runs
POLL_S = 5.0           # how often a running step is looked at
PREFIX = "kho-agent vm build:"


def _stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def elapsed_text(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _last_line(log: Path | None, limit: int = 160) -> str | None:
    """The log's last non-empty line (read from its end: a kernel build log grows to MBs)."""
    if log is None:
        return None
    try:
        with log.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - 4096))
            lines = [line for line in handle.read().decode(errors="replace").splitlines()
                     if line.strip()]
    except OSError:
        return None
    return lines[-1].strip()[:limit] if lines else None


@dataclass
class _Build:
    what: str
    started: float
    step: str = ""
    log: Path | None = None


@dataclass
class Progress:
    write: Callable[[str], None] = _stderr_line
    clock: Callable[[], float] = time.monotonic
    every: float = HEARTBEAT_S
    builds: list[_Build] = field(default_factory=list)
    last_line_at: float = 0.0

    def _say(self, text: str) -> None:
        self.last_line_at = self.clock()
        self.write(f"{PREFIX} {text}")

    def begin(self, what: str, where: Path) -> None:
        self.builds.append(_Build(what, self.clock()))
        self._say(f"building {what} into {where} (cached: later runs reuse it)")

    def step(self, text: str, log: Path | None = None) -> None:
        if not self.builds:
            return
        build = self.builds[-1]
        build.step, build.log = text, log
        self._say(f"{build.what}: {text}"
                  f" ({elapsed_text(self.clock() - build.started)} so far)")

    def waiting(self) -> None:
        """Called while a step runs: a line when none was written for `every` seconds."""
        if not self.builds or self.clock() - self.last_line_at < self.every:
            return
        build = self.builds[-1]
        line = (f"{build.what}: still {build.step or 'building'}, "
                f"{elapsed_text(self.clock() - build.started)} elapsed")
        last = _last_line(build.log)
        if last:
            line += f"; log {build.log}: {last}"
        self._say(line)

    def end(self, failure: str | None = None) -> None:
        if not self.builds:
            return
        build = self.builds.pop()
        took = elapsed_text(self.clock() - build.started)
        if failure is None:
            self._say(f"built {build.what} in {took}")
            return
        self._say(f"building {build.what} failed after {took}: "
                  + failure.rstrip().replace("\n", "\n    "))


REPORTER = Progress()


def attach(config: Any) -> None:
    """Send the lines to pytest's terminal, past its capturing (`config`: pytest's Config)."""
    def write(text: str) -> None:
        # looked up when used: a conftest's pytest_configure runs before the terminal
        # reporter's registers it
        capture = config.pluginmanager.getplugin("capturemanager")
        terminal = config.pluginmanager.getplugin("terminalreporter")
        if capture is None or terminal is None:
            _stderr_line(text)
            return
        with capture.global_and_fixture_disabled():
            terminal.ensure_newline()
            terminal.write_line(text)
            terminal.flush()

    REPORTER.write = write


def wait(proc: subprocess.Popen[Any]) -> int:
    """Wait for a step's process (its output goes to a file), saying so now and then."""
    while True:
        try:
            return proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            REPORTER.waiting()


def communicate(proc: subprocess.Popen[str]) -> str:
    """proc.communicate() for a step whose output is piped, saying so now and then."""
    while True:
        try:
            out, _ = proc.communicate(timeout=POLL_S)
            return out or ""
        except subprocess.TimeoutExpired:
            REPORTER.waiting()
