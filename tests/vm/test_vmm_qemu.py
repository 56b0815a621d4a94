"""The real-VMM manager (jobs/vmm_qemu.py) on this machine: a real QEMU whose guest RAM is the
manager's memfd, kho-agentd on a private bus and the simulated kernel, a simulated kexec in
between. The same manager runs in the QEMU guests on a real KHO kernel (test_scenarios.py);
here it runs in seconds, so a broken manager shows before a 5-minute guest run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agenthost import Host, host, kernel_option  # noqa: F401  (host: a fixture)

from . import vmm

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("nasm") is None,
                       reason="needs qemu-system-x86 and nasm (./quickstart.sh vm installs them)"),
]

RAM_MIB = 64


@pytest.fixture
def old(tmp_path: Path) -> Iterator[Path]:
    """The manager's directory in the "old kernel"; its manager (and QEMU) end with the test,
    as a kexec would end them."""
    directory = tmp_path / "old"
    yield directory
    pid_file = directory / "manager.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def manager(rig: Host, *args: str) -> dict[str, Any]:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": rig.bus.address}
    proc = subprocess.run([sys.executable, str(vmm.MANAGER), *args], capture_output=True,
                          text=True, timeout=600, env=env, check=False)
    assert proc.stdout.strip(), proc.stderr
    report = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert proc.returncode == (0 if report.get("ok") else 1)
    return report


def test_a_running_vm_counts_on_after_a_simulated_live_update(host: Host,  # noqa: F811
                                                              tmp_path: Path, old: Path) -> None:
    payload = vmm.build_payload(tmp_path / "count.bin")
    new = tmp_path / "new"
    launched = manager(host, "launch", str(old), "vm-qemu", str(RAM_MIB), str(payload))
    assert launched["ok"], (old / "manager.log").read_text()
    client = host.client()
    result, job = host.run_job(client, "Prepare", kernel_option(host))
    assert result == "done", job
    suspended = manager(host, "suspend", str(old))
    assert suspended["ok"], suspended
    assert suspended["migration"]["status"] == "completed"
    # x-ignore-shared: the device state, not the 64 MiB of RAM, went into the second memfd
    assert 0 < suspended["state_bytes"] < 4 << 20
    sessions = {row[0]: row for row in client.call_values(
        "/org/khoagent/Agent1", "org.khoagent.Agent1.Manager", "ListSessions", "", ())[0][0]}
    assert sessions["vm-qemu"][4] is True  # ready
    result, job = host.run_job(client, "Commit")
    assert result == "done", job
    host.restart()
    host.wait_state("verified", timeout=60)
    resumed = manager(host, "resume", str(new), "vm-qemu", str(payload), "--keep-running")
    assert resumed["ok"], resumed
    # the RAM came back bit for bit and the VM's own count went on from where it stopped
    assert resumed["ram_digest"] == suspended["ram_digest"]
    assert resumed["count_at_restore"] == suspended["count_at_stop"]
    assert resumed["count_later"] > resumed["count_at_restore"]
    assert resumed["status_after_restore"] == "paused"
    log = vmm.CountLog.read(old / "serial-1.log", new / "serial-2.log")
    before = vmm.CountLog.read(old / "serial-1.log").values
    assert len(before) >= 3 and len(log.values) >= len(before) + 3
    assert log.gaps() == [], log.gaps()
    # the classic alternative on the same VM: saved whole to disk, restored by a new QEMU
    image = tmp_path / "vm.img"
    saved = manager(host, "cold-save", str(new), str(image))
    assert saved["ok"], saved
    # all of its RAM (filled: QEMU sends a zero page as a flag; the firmware zeroes a few)
    assert saved["image_bytes"] > 0.95 * (RAM_MIB << 20)
    cold = tmp_path / "cold"
    restored = manager(host, "cold-restore", str(cold), str(image), str(RAM_MIB), str(payload))
    assert restored["ok"], restored
    assert restored["ram_digest"] == saved["ram_digest"]
    assert restored["count_at_restore"] == saved["count_at_stop"]
    log = vmm.CountLog.read(old / "serial-1.log", new / "serial-2.log", cold / "serial-3.log")
    assert log.gaps() == [], log.gaps()
    # the session is finished: nothing is left for anyone to retrieve
    assert "vm-qemu" not in {row[0] for row in client.call_values(
        "/org/khoagent/Agent1", "org.khoagent.Agent1.Manager", "ListSessions", "", ())[0][0]}


def test_a_refused_commit_resumes_the_vm_in_place(host: Host,  # noqa: F811
                                                  tmp_path: Path, old: Path) -> None:
    payload = vmm.build_payload(tmp_path / "count.bin")
    assert manager(host, "launch", str(old), "vm-qemu", str(RAM_MIB), str(payload))["ok"]
    suspended = manager(host, "suspend", str(old))
    assert suspended["ok"], suspended
    client = host.client()
    result, job = host.run_job(client, "Commit")   # nothing was prepared: refused
    assert result == "failed" and job["ErrorName"].endswith(".NotPrepared"), job
    resumed = manager(host, "resume-in-place", str(old))
    assert resumed["ok"], resumed
    # the same QEMU went on: one serial log, no gap, and the session is no longer ready
    log = vmm.CountLog.read(old / "serial-1.log")
    assert log.gaps() == [] and len(log.values) >= 5
    sessions = {row[0]: row for row in client.call_values(
        "/org/khoagent/Agent1", "org.khoagent.Agent1.Manager", "ListSessions", "", ())[0][0]}
    assert sessions["vm-qemu"][4] is False
