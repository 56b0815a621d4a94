"""The builds of the QEMU suite say what they do (progress.py), cheaply: no kernel is built.

A cold `./quickstart.sh vm` was silent for about half an hour while it built two kernels: pytest
kept every line a fixture printed. These hold the reporter's lines, the cache and the step
runner to it, and check that a line written during a test reaches pytest's terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from . import cache, kernels, progress, rootfs
from .progress import PREFIX, Progress, elapsed_text

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_elapsed_text() -> None:
    assert [elapsed_text(s) for s in (0, 59.9, 60, 245, 3599, 3600, 3725)] == \
        ["0s", "59s", "1m00s", "4m05s", "59m59s", "1h00m", "1h02m"]


def test_a_build_says_what_where_each_step_and_a_line_while_a_step_runs(tmp_path: Path) -> None:
    lines: list[str] = []
    clock = FakeClock()
    report = Progress(lines.append, clock, every=45.0)
    log = tmp_path / "build.log"
    log.write_text("  CC      init/main.o\n  CC      kernel/fork.o\n\n")
    report.begin("the 7.3 kernel from linux-source-7.3 7.3.1-1", tmp_path / "entry")
    assert lines == [f"{PREFIX} building the 7.3 kernel from linux-source-7.3 7.3.1-1 into "
                     f"{tmp_path / 'entry'} (cached: later runs reuse it)"]
    clock.now += 12
    report.step("make -j2 bzImage", log)
    assert lines[-1].endswith("the 7.3 kernel from linux-source-7.3 7.3.1-1: make -j2 bzImage "
                              "(12s so far)")
    clock.now += 44
    report.waiting()
    assert len(lines) == 2            # less than `every` since the last line: quiet
    clock.now += 1
    report.waiting()
    assert lines[-1] == (f"{PREFIX} the 7.3 kernel from linux-source-7.3 7.3.1-1: still make "
                         f"-j2 bzImage, 57s elapsed; log {log}: CC      kernel/fork.o")
    clock.now += 30 * 60
    report.end()
    assert lines[-1] == f"{PREFIX} built the 7.3 kernel from linux-source-7.3 7.3.1-1 in 30m57s"
    report.waiting()
    assert len(lines) == 4            # no build: nothing to say


def test_a_failed_build_says_why_with_the_end_of_its_output() -> None:
    lines: list[str] = []
    report = Progress(lines.append, FakeClock())
    report.begin("the sid base tree", Path("/cache/rootfs-base/sid-1"))
    report.end("debootstrap failed (exit 1)\nE: Couldn't download packages")
    assert lines[-1] == (f"{PREFIX} building the sid base tree failed after 0s: debootstrap "
                         "failed (exit 1)\n    E: Couldn't download packages")


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The process-wide reporter's lines, in a cache of this test's own."""
    seen: list[str] = []
    monkeypatch.setattr(progress.REPORTER, "write", seen.append)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return seen


def test_a_cache_build_is_reported_from_start_to_end(lines: list[str], tmp_path: Path) -> None:
    def fill(work: Path) -> None:
        kernels._run(["sh", "-c", "echo made > out"], work, work / "build.log", "make thing")

    entry = cache.ensure_entry("kernels", "k1", fill, "the test kernel from a shell")
    assert (entry.path / "out").read_text() == "made\n"
    assert lines[0] == (f"{PREFIX} building the test kernel from a shell into "
                        f"{tmp_path / 'cache' / 'kernels' / 'k1'} (cached: later runs reuse it)")
    assert "the test kernel from a shell: make thing (" in lines[1]
    assert lines[-1].startswith(f"{PREFIX} built the test kernel from a shell in ")
    count = len(lines)
    cache.ensure_entry("kernels", "k1", fill, "the test kernel from a shell")
    assert len(lines) == count        # cached: nothing built, nothing said


def test_a_failed_step_reports_the_tail_of_its_log(lines: list[str]) -> None:
    def fill(work: Path) -> None:
        kernels._run(["sh", "-c", "echo compiling; echo 'error: no rule for bzImage'; exit 2"],
                     work, work / "build.log", "make -j1 bzImage")

    with pytest.raises(kernels.KernelSetupError):
        cache.ensure_entry("kernels", "k2", fill)
    assert lines[-1].startswith(f"{PREFIX} building kernels/k2 failed after ")
    assert "make -j1 bzImage failed (exit status 2)" in lines[-1]
    assert "error: no rule for bzImage" in lines[-1]   # the make output's end


@pytest.mark.parametrize("runner", ["kernels", "rootfs"])
def test_a_running_step_gets_a_line_with_the_logs_last_line(
        lines: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, runner: str) -> None:
    """No clock involved: the step waits until a "still" line was written, so the runner must
    write one while it runs."""
    monkeypatch.setattr(progress, "POLL_S", 0.01)
    monkeypatch.setattr(progress.REPORTER, "every", 0.0)
    go = tmp_path / "go"

    def write(text: str) -> None:
        lines.append(text)
        if "still" in text:
            go.touch()
    monkeypatch.setattr(progress.REPORTER, "write", write)
    script = f"echo '  CC foo.o'; while [ ! -e {go} ]; do sleep 0.01; done"
    progress.REPORTER.begin("a step that waits", tmp_path / "entry")
    try:
        if runner == "kernels":
            kernels._run(["sh", "-c", script], tmp_path, tmp_path / "build.log", "make foo.o")
        else:
            rootfs._run(["sh", "-c", script], "debootstrap sid")
    finally:
        progress.REPORTER.end()
    still = [line for line in lines if "still" in line]
    assert still, lines
    assert ("a step that waits: still make foo.o, " in still[0]) if runner == "kernels" \
        else ("a step that waits: still debootstrap sid, " in still[0])
    if runner == "kernels":   # its output goes to a log: the line shows where it stands
        assert still[0].endswith(f"log {tmp_path / 'build.log'}: CC foo.o")


def test_the_lines_reach_pytests_terminal_past_its_capturing(tmp_path: Path) -> None:
    """What tests/vm/conftest.py does, in a pytest run of its own with the default capturing
    (fd): a line written during a test is on the terminal although the test passes."""
    (tmp_path / "conftest.py").write_text(
        "from tests.vm import progress\n\n\n"
        "def pytest_configure(config):\n    progress.attach(config)\n")
    (tmp_path / "test_build.py").write_text(
        "from pathlib import Path\n\nfrom tests.vm import progress\n\n\n"
        "def test_build():\n"
        "    print('captured, not shown')\n"
        "    progress.REPORTER.begin('the 7.3 kernel', Path('/cache/kernels/k'))\n"
        "    progress.REPORTER.end()\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    shown = done.stdout + done.stderr
    assert f"{PREFIX} building the 7.3 kernel into /cache/kernels/k" in shown, shown
    assert f"{PREFIX} built the 7.3 kernel in 0s" in shown
    assert "captured, not shown" not in shown
