"""kho-agentd with a state file of any shape (issue 11, class 5), on a private bus and the
simulated kernel: it owns its bus name within seconds (no crash, no hang before the name, no
restart loop under systemd), reports the corruption and where the file was kept in State,
StateMessage and its log, and the next Prepare works without a restart. A boot that was verified
already is not verified again when its state file is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbusrig import MANAGER_IFACE, MANAGER_PATH, Daemon, GioClient, PrivateBus
from gi.repository import GLib

from kho_agent.sim import SimAbi, SimKernel

ERR = "org.khoagent.Agent1.Error."
START_SECONDS = 5.0   # the daemon must own its name this fast, whatever the state file is


def deep_nesting(path: Path) -> None:
    path.write_bytes(b"[" * 200_000 + b"]" * 200_000)


def wrong_types(path: Path) -> None:
    # each of these was once taken as it came (str() of a list, bool() of a string, the keys
    # of an object): a prepared update of some other boot
    path.write_text(json.dumps({"phase": "prepared", "boot_id": ["not", "a", "string"],
                                "loaded_by_us": "yes", "awaiting": {"vm-a": 1},
                                "last_result": "verified", "handoff_seconds": "0.5"}))


def symlink_to_fifo(path: Path) -> None:
    os.mkfifo(path.with_name("a-fifo"))
    path.symlink_to("a-fifo")


def directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("kept with the directory")


SHAPES: dict[str, Callable[[Path], None]] = {
    "directory": directory,
    "fifo": os.mkfifo,
    "symlink-to-fifo": symlink_to_fifo,
    "deep-nesting": deep_nesting,
    "wrong-types": wrong_types,
}


@dataclass
class Host:
    bus: PrivateBus
    sim_dir: Path
    state_dir: Path
    target: Path
    daemon: Daemon
    client: GioClient

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def prop(self, name: str) -> Any:
        return self.client.get_property(MANAGER_PATH, MANAGER_IFACE, name)

    def start(self) -> float:
        """Start the daemon; the seconds until it owned its name (the rig fails the test if it
        exits first or takes longer than START_SECONDS)."""
        began = time.monotonic()
        self.daemon.start()
        return time.monotonic() - began

    def run_job(self, method: str, options: dict[str, GLib.Variant] | None = None
                ) -> tuple[str, str, str]:
        """(result, ErrorName, ErrorMessage) of a job, once it is removed."""
        with self.client.catch_signal("JobRemoved") as removed:
            if method == "Verify":
                ((job,), _fds) = self.client.call_values(MANAGER_PATH, MANAGER_IFACE, method)
            else:
                ((job,), _fds) = self.client.call_values(MANAGER_PATH, MANAGER_IFACE, method,
                                                         "a{sv}", (options or {},))
            _id, _path, result = removed.wait(30, lambda args: args[1] == job)
        iface = "org.khoagent.Agent1.Job"
        return (result, self.client.get_property(job, iface, "ErrorName"),
                self.client.get_property(job, iface, "ErrorMessage"))

    def prepare(self) -> tuple[str, str, str]:
        return self.run_job("Prepare", {"kernel": GLib.Variant("s", str(self.target))})

    def wait_state(self, *states: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = str(self.prop("State"))
            if state in states:
                return state
            time.sleep(0.05)
        raise AssertionError(f"State never became {states}:\n{self.daemon.stderr_text()}")

    def next_boot(self) -> None:
        """After a simulated kexec the daemon exits by itself; the next boot starts it."""
        deadline = time.monotonic() + 10
        while self.daemon.returncode is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self.daemon.stop()
        self.start()


def make_host(tmp_path: Path, argv: list[str] | None = None) -> Iterator[Host]:
    sim_dir = tmp_path / "sim"
    sim = SimKernel.create(sim_dir)
    target = sim.write_kernel_image(tmp_path / "vmlinuz-7.3.1-sim", release="7.3.1-sim",
                                    abi=SimAbi())
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with PrivateBus() as bus:
        daemon = Daemon(bus.address, sim_dir, state_dir, argv=argv,
                        start_timeout=START_SECONDS)
        client = GioClient(bus.address)
        try:
            yield Host(bus, sim_dir, state_dir, target, daemon, client)
        finally:
            client.close()
            daemon.close(check=False)
            for fifo in tmp_path.rglob("*"):  # a reader still blocked in open() is released
                if fifo.is_fifo():
                    with contextlib.suppress(OSError):  # nobody waiting
                        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    yield from make_host(tmp_path)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_daemon_comes_up_idle_and_says_where_the_corrupt_state_is(host: Host,
                                                                      shape: str) -> None:
    SHAPES[shape](host.state_file)
    assert host.start() < START_SECONDS
    assert host.prop("State") == "idle"
    (aside,) = sorted(host.state_dir.glob("state.json.corrupt-*"))
    message = str(host.prop("StateMessage"))
    assert "corrupt" in message and str(aside) in message, message
    log = host.daemon.stderr_text()
    assert "[recovered]" in log and str(aside) in log, log
    assert host.state_file.is_file() and not host.state_file.is_symlink()
    result, error, detail = host.prepare()   # the next operation works, without a restart
    assert result == "done", (error, detail)
    assert host.prop("State") == "prepared"


def test_a_verified_boot_is_not_verified_again_when_its_state_file_is_lost(host: Host) -> None:
    host.start()
    assert host.prepare()[0] == "done"
    result, error, detail = host.run_job("Commit")
    assert result == "done", (error, detail)
    host.next_boot()                      # verifies on its own
    assert host.wait_state("verified", "failed") == "verified", host.prop("StateMessage")
    host.daemon.stop()
    host.state_file.unlink()
    os.mkfifo(host.state_file)
    host.start()
    assert host.prop("State") == "verified"
    assert "verified already" in str(host.prop("StateMessage"))
    assert json.loads(host.prop("LastResult"))["result"] == "verified"
    assert "verifying" not in host.daemon.stderr_text()
    result, error, detail = host.run_job("Verify")   # asked again: refused, no new verdict
    assert result == "failed" and error == ERR + "NotPrepared", (error, detail)
    assert host.prop("State") == "verified"


def read_only_argv(state_dir: Path) -> list[str] | None:
    """The daemon in a private mount namespace where its state directory is read-only."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return None
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return None
    return [unshare, "-m", "--propagation", "private", "sh", "-c",
            'mount --bind -o ro "$0" "$0" && exec "$@"', str(state_dir),
            sys.executable, "-m", "kho_agent.daemon"]


def test_a_corrupt_state_that_cannot_be_moved_still_lets_the_daemon_up(tmp_path: Path) -> None:
    argv = read_only_argv(tmp_path / "state")
    if argv is None:
        pytest.skip("needs root and unshare(1) for a read-only state directory")
    for host in make_host(tmp_path, argv):
        directory(host.state_file)
        assert host.start() < START_SECONDS
        assert host.prop("State") == "idle"
        message = str(host.prop("StateMessage"))
        assert "corrupt" in message and "could not be moved aside" in message, message
        assert "EROFS" in message and "refused" in message
        assert host.state_file.is_dir()   # left where it was, never written over
        result, error, detail = host.prepare()
        assert result == "failed" and error == ERR + "StateCorrupt", (error, detail)
        assert host.prop("State") == "idle"
        assert not SimKernel(host.sim_dir).host().kexec.loaded()
