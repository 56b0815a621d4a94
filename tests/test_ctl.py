"""kho-agentctl over D-Bus: the real command (a subprocess, stdout not a terminal) against a real
private dbus-daemon and a real `kho-agentd --simulate` subprocess.

What the command prints is checked against what other clients read from the daemon: busctl (not
ours) for properties and job objects, and a Gio client (tests/dbusrig.py) that creates a session,
preserves a real memfd into it and, after the simulated kexec, retrieves it again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cliout import cli_json
from dbusrig import (
    MANAGER_IFACE,
    MANAGER_PATH,
    NOBODY,
    Daemon,
    GioClient,
    GLib,
    PrivateBus,
    RemoteError,
    busctl,
    client_env,
    get_property,
    python_as,
    require_run_as,
)

from kho_agent.abi.kho_state import ScratchArea
from kho_agent.cli import bus as ctl_bus
from kho_agent.cli.jobs import ProgressView
from kho_agent.cli.preflight import render_report
from kho_agent.cli.scratch import plan_from_json
from kho_agent.engine.preflight import Check, PreflightResult, Tier, render
from kho_agent.engine.scratch_plan import plan_scratch
from kho_agent.errors import AgentError
from kho_agent.kernel.sysinfo import MemblockRegion, NumaNode, SysInfo, parse_cmdline
from kho_agent.service import interfaces as api
from kho_agent.service.buses import StartFacts
from kho_agent.sim import SimKernel
from kho_agent.sim.versions import SimAbi

CTL_TIMEOUT = 30.0
WAIT_S = 10.0
INCOMPATIBLE = SimAbi(kho="kho-v3", luo="luo-v1", memfd="memfd-v1")
PROGRESS_LINE = re.compile(r"^(prepare|commit|cancel|verify): (\d+)%(?: .+)?$")


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus("system") as private:
        yield private


@pytest.fixture
def simdir(tmp_path: Path) -> Path:
    directory = tmp_path / "sim"
    SimKernel.create(directory)
    return directory


@pytest.fixture
def kernel(tmp_path: Path, simdir: Path) -> Path:
    return SimKernel(simdir).write_kernel_image(tmp_path / "vmlinuz-next", release="7.3.1-sim",
                                               abi=SimAbi())


@pytest.fixture
def daemon(bus: PrivateBus, simdir: Path, tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(bus.address, simdir, tmp_path / "state") as running:
        yield running


def ctl(address: str | None, *argv: str, timeout: float = CTL_TIMEOUT
        ) -> subprocess.CompletedProcess[str]:
    """`kho-agentctl [--bus-address ADDR] ARGV...` in a fresh process, stdin and stdout not
    terminals, nothing inherited that points at the machine's buses."""
    head = ["--bus-address", address] if address is not None else []
    done = subprocess.run([sys.executable, "-m", "kho_agent.cli", *head, *argv],
                          capture_output=True, text=True, timeout=timeout, env=client_env(),
                          stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def prop(bus: PrivateBus, name: str) -> Any:
    """A Manager property as busctl (not our client) reads it."""
    return get_property(bus.address, MANAGER_PATH, MANAGER_IFACE, name)


def wait_for_state(bus: PrivateBus, wanted: str) -> None:
    deadline = time.monotonic() + WAIT_S
    seen = None
    while time.monotonic() < deadline:
        seen = prop(bus, "State")
        if seen == wanted:
            return
        time.sleep(0.05)
    raise AssertionError(f"State stayed {seen!r}, not {wanted!r}, for {WAIT_S} s")


def wait_for_exit(daemon: Daemon) -> None:
    """Until the daemon's process ended (a commit on the simulated kernel ends it, as a kexec
    would), at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while daemon.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)


def progress_values(stderr: str, label: str) -> list[int]:
    values = []
    for line in stderr.splitlines():
        found = PROGRESS_LINE.match(line)
        if found and found.group(1) == label:
            values.append(int(found.group(2)))
    return values


def memfd_with(content: bytes) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def create_ready_session(client: GioClient, name: str, token: int, content: bytes) -> None:
    (path, _index), fds = client.call_values(MANAGER_PATH, MANAGER_IFACE, "CreateSession", "s",
                                             (name,))
    for fd in fds:
        os.close(fd)  # the agent keeps its own reference to the session
    assert path == api.SESSION_PATH_PREFIX + api.escape_path_component(name)
    memfd = memfd_with(content)
    try:
        client.call_values(MANAGER_PATH, MANAGER_IFACE, "Preserve", "sht", (name, 0, token),
                           fds=[memfd])
    finally:
        os.close(memfd)
    client.call_values(MANAGER_PATH, MANAGER_IFACE, "SetReady", "sb", (name, True))


# --- status -----------------------------------------------------------------------------------

def test_status_text_and_json_agree_with_busctl(bus: PrivateBus, daemon: Daemon) -> None:
    text = ctl(bus.address, "status")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^  state: +idle", text.stdout, re.M)
    assert "(simulated kernel)" in text.stdout
    assert re.search(r"^sessions: 0$", text.stdout, re.M)

    done = ctl(bus.address, "status", "--json")
    assert done.returncode == 0, done.stderr
    doc = cli_json(done.stdout)
    # every Manager property, with the value busctl reads
    for name in ("State", "StateMessage", "HandoffMode", "RunningKernel", "TargetKernel",
                 "LiveUpdateNumber", "LastResult", "Simulated"):
        assert doc["properties"][name] == prop(bus, name), name
    assert doc["properties"]["HandoffMode"] == "simulated"
    assert doc["running_job"] is None and doc["jobs"] == [] and doc["sessions"] == []
    assert doc["connection"] == {"bus": "address", "address": bus.address}


def test_bus_option_is_accepted_after_the_command_too(bus: PrivateBus, daemon: Daemon) -> None:
    done = ctl(None, "status", "--json", "--bus-address", bus.address)
    assert done.returncode == 0, done.stderr
    assert cli_json(done.stdout)["properties"]["State"] == "idle"


# --- prepare ----------------------------------------------------------------------------------

def test_prepare_prints_progress_lines_and_exits_0(bus: PrivateBus, daemon: Daemon,
                                                    kernel: Path) -> None:
    done = ctl(bus.address, "prepare", "--kernel", str(kernel))
    assert done.returncode == 0, done.stderr
    values = progress_values(done.stderr, "prepare")
    # not a terminal: one plain line per new value or phase, from the job's start to its end
    assert values[0] == 0 and values[-1] == 100
    assert values == sorted(values), values
    assert any(0 < v < 100 for v in values), values
    # each line names the phase the job is in (issue 15: a bare percentage said nothing)
    for phase in ("planning: reading the outgoing KHO state", "loading the kernel",
                  "writing the manifest", "preserving the agent's session"):
        assert re.search(rf"^prepare: \d+% {re.escape(phase)}$", done.stderr, re.M), \
            done.stderr
    assert "\r" not in done.stderr
    assert f"prepared {kernel}" in done.stdout
    assert prop(bus, "State") == "prepared"
    assert prop(bus, "TargetKernel") == str(kernel)


def test_prepare_resolves_a_relative_kernel_path(bus: PrivateBus, daemon: Daemon,
                                                 kernel: Path) -> None:
    # the daemon's working directory is not ours: the client sends an absolute path
    done = subprocess.run([sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address,
                           "prepare", "--kernel", kernel.name, "--json"], cwd=kernel.parent,
                          capture_output=True, text=True, timeout=CTL_TIMEOUT, env=client_env())
    assert done.returncode == 0, done.stderr
    assert cli_json(done.stdout)["result"]["prepared"] == str(kernel)


def test_prepare_dry_run_changes_nothing(bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    done = ctl(bus.address, "prepare", "--kernel", str(kernel), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    doc = cli_json(done.stdout)
    assert doc["state"] == "done" and doc["type"] == "prepare"
    assert doc["result"]["dry_run"] is True and doc["result"]["would_prepare"] is True
    assert "kho=on" in doc["result"]["cmdline"].split()
    assert prop(bus, "State") == "idle"
    assert prop(bus, "TargetKernel") == ""
    # no manifest was written
    manifest = ctl(bus.address, "manifest", "--json")
    assert manifest.returncode == 2
    assert cli_json(manifest.stdout)["error"] == "NotFound"


def test_dry_run_of_an_incompatible_target_exits_1(bus: PrivateBus, daemon: Daemon,
                                                   tmp_path: Path, simdir: Path) -> None:
    old = SimKernel(simdir).write_kernel_image(tmp_path / "vmlinuz-old", release="6.19-sim",
                                               abi=INCOMPATIBLE)
    done = ctl(bus.address, "prepare", "--kernel", str(old), "--dry-run")
    assert done.returncode == 1, done.stderr
    assert "prepare would be refused" in done.stdout
    assert re.search(r"^blocker +target-abi", done.stdout, re.M)
    assert prop(bus, "State") == "idle"


def test_refused_prepare_exits_3_with_the_error_name(bus: PrivateBus, daemon: Daemon,
                                                     tmp_path: Path, simdir: Path) -> None:
    path = tmp_path / "vmlinuz-target"
    SimKernel(simdir).write_kernel_image(path, release="6.19-sim", abi=INCOMPATIBLE)
    done = ctl(bus.address, "prepare", "--kernel", str(path), "--json")
    assert done.returncode == 3, done.stderr
    doc = cli_json(done.stdout)
    assert doc["error"] == "PreflightFailed" and doc["exit_code"] == 3
    assert "target-abi" in doc["message"]
    assert "PreflightFailed" in done.stderr
    assert prop(bus, "State") == "idle"


def test_malformed_scratch_value_is_refused_before_the_call(bus: PrivateBus, daemon: Daemon,
                                                            kernel: Path) -> None:
    done = ctl(bus.address, "prepare", "--kernel", str(kernel), "--scratch", "64M,,64M",
               "--json")
    assert done.returncode == 2
    assert cli_json(done.stdout)["error"] == "InvalidArgument"
    assert busctl(bus.address, "tree", api.BUS_NAME).stdout.count("/job/") == 0


def test_no_wait_prints_the_job_path(bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    done = ctl(bus.address, "prepare", "--kernel", str(kernel), "--no-wait")
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    assert path.startswith(api.JOB_PATH_PREFIX)
    assert done.stderr == ""  # nothing followed, no progress
    kind = get_property(bus.address, path, api.JOB_IFACE, "Type")
    assert kind == "prepare"


# --- commit, cancel ---------------------------------------------------------------------------

def test_commit_without_prepare_exits_3(bus: PrivateBus, daemon: Daemon) -> None:
    done = ctl(bus.address, "commit", "--json")
    assert done.returncode == 3
    doc = cli_json(done.stdout)
    assert doc["error"] == "NotPrepared" and doc["exit_code"] == 3
    assert "warning" not in done.stderr and "handing off" not in done.stderr
    assert daemon.returncode is None  # nothing happened to it


def test_a_refused_commit_announces_no_reboot_and_names_force(bus: PrivateBus, daemon: Daemon,
                                                              kernel: Path) -> None:
    """The reboot is announced only once the daemon's checks passed; a commit they refuse
    (a session not ready) says why and names the real option, `--force`."""
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-slow", 9, b"not ready yet")
        vm_manager.call_values(MANAGER_PATH, MANAGER_IFACE, "SetReady", "sb",
                               ("vm-slow", False))
        assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
        refused = ctl(bus.address, "commit")
        assert refused.returncode == 3, refused.stderr
        assert "Busy" in refused.stderr and "vm-slow" in refused.stderr
        assert "kho-agentctl commit --force" in refused.stderr
        assert "commit with force" not in refused.stderr
        assert "reboots" not in refused.stderr and "handing off" not in refused.stderr
        assert prop(bus, "State") == "prepared" and daemon.returncode is None
        forced = ctl(bus.address, "commit", "--force")
        assert forced.returncode == 0, forced.stderr
        announced = forced.stderr.index("the checks passed; handing off")
        assert announced < forced.stderr.index("commit: 100%")


def test_commit_dry_run_and_cancel(bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
    dry = ctl(bus.address, "commit", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: commit would go ahead" in dry.stdout
    assert "handing off" not in dry.stderr
    assert prop(bus, "State") == "prepared" and daemon.returncode is None

    cancel = ctl(bus.address, "cancel", "--json")
    assert cancel.returncode == 0, cancel.stderr
    doc = cli_json(cancel.stdout)
    assert doc["type"] == "cancel" and doc["state"] == "done"
    assert doc["result"]["message"].startswith("cancelled")
    assert prop(bus, "State") == "idle"
    again = ctl(bus.address, "cancel")
    assert again.returncode == 3 and "NotPrepared" in again.stderr


def test_verify_with_nothing_to_verify_is_refused(bus: PrivateBus, daemon: Daemon) -> None:
    done = ctl(bus.address, "verify", "--json")
    assert done.returncode == 3
    assert cli_json(done.stdout)["error"] == "NotPrepared"
    assert "nothing to verify" in done.stderr
    assert prop(bus, "State") == "idle"   # refused, not "failed"


# --- the whole cycle --------------------------------------------------------------------------

def test_prepare_commit_restart_verify(bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    content = os.urandom(64 * 1024)
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-1", 7, content)
        listed = ctl(bus.address, "sessions", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = cli_json(listed.stdout)
        assert row["name"] == "vm-1" and row["ready"] is True and row["incoming"] is False
        assert row["tokens"] == [7] and row["owner_uid"] == 0
        assert row["owner_bus_name"] == vm_manager.unique_name
        table = ctl(bus.address, "sessions").stdout
        assert re.search(r"^vm-1 +this boot +yes +no +1 +0 :", table, re.M), table

        prepared = ctl(bus.address, "prepare", "--kernel", str(kernel), "--json")
        assert prepared.returncode == 0, prepared.stderr
        assert cli_json(prepared.stdout)["result"]["sessions"] == ["vm-1"]
        manifest = ctl(bus.address, "manifest")
        assert manifest.returncode == 0, manifest.stderr
        assert "vm-1" in {s["name"] for s in json.loads(manifest.stdout)["sessions"]}

        committed = ctl(bus.address, "commit")
        assert committed.returncode == 0, committed.stderr
        assert "handing off" in committed.stderr and str(kernel) in committed.stderr
        assert committed.stdout.startswith("committed: handed off")
        assert progress_values(committed.stderr, "commit")[-1] == 100

    # the simulated kexec ends the daemon, as a real one ends the host
    wait_for_exit(daemon)
    assert daemon.returncode == 0, daemon.stderr_text()

    down = ctl(bus.address, "status", "--json")
    assert down.returncode == 2
    assert cli_json(down.stdout)["error"] == "DaemonUnreachable"

    daemon.start()  # the next boot: it verifies on its own
    wait_for_state(bus, "verified")
    verified = ctl(bus.address, "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("verified:")

    status = ctl(bus.address, "status")
    assert re.search(r"^  state: +verified", status.stdout, re.M), status.stdout
    assert re.search(r"^  last result: +verified", status.stdout, re.M)
    doc = cli_json(ctl(bus.address, "status", "--json").stdout)
    assert doc["properties"]["State"] == "verified"
    assert doc["last_result"]["ok"] is True
    assert [s["name"] for s in doc["sessions"]] == ["vm-1"]
    assert doc["sessions"][0]["incoming"] is True

    jobs = cli_json(ctl(bus.address, "jobs", "--json").stdout)
    assert [(j["id"], j["type"], j["state"], j["progress"]) for j in jobs] == \
        [(1, "verify", "done", 100)]
    assert get_property(bus.address, jobs[0]["job"], api.JOB_IFACE, "State") == "done"
    assert re.search(r"^ +1 +verify +done +100%", ctl(bus.address, "jobs").stdout, re.M)

    # the owner gets its memory back, byte for byte
    with GioClient(bus.address) as vm_manager:
        _, fds = vm_manager.call_values(MANAGER_PATH, MANAGER_IFACE, "RetrieveFile", "st",
                                        ("vm-1", 7))
        try:
            assert os.pread(fds[0], len(content) + 1, 0) == content
        finally:
            for fd in fds:
                os.close(fd)


def test_verify_follows_the_daemons_own_verification(bus: PrivateBus, daemon: Daemon,
                                                     kernel: Path) -> None:
    assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
    assert ctl(bus.address, "commit").returncode == 0
    wait_for_exit(daemon)   # the simulated kexec ends the daemon: the next boot starts it
    daemon.start()
    # whether the boot-time job still runs (followed) or has ended (its result reported), the
    # answer is the daemon's verification, not a second one
    done = ctl(bus.address, "verify", "--json")
    assert done.returncode == 0, done.stderr
    doc = cli_json(done.stdout)
    assert doc["result"]["ok"] is True and doc["type"] == "verify"
    jobs = cli_json(ctl(bus.address, "jobs", "--json").stdout)
    assert [j["type"] for j in jobs] == ["verify"]


def test_verify_again_after_a_verification_that_ran_is_refused_with_why(
        bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    """`--again` does not pretend to verify anew: the first verification retrieved the
    sessions (the kernel hands each out once), so a second is refused, exit 3, saying so and
    naming the result and its report; plain `verify` does not advertise `--again` as a rerun."""
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-3", 5, b"guest" * 100)
        assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
        assert ctl(bus.address, "commit").returncode == 0
    wait_for_exit(daemon)   # the simulated kexec ends the daemon: the next boot starts it
    daemon.start()
    wait_for_state(bus, "verified")
    plain = ctl(bus.address, "verify")
    assert plain.returncode == 0 and "--again verifies anew" not in plain.stdout
    again = ctl(bus.address, "verify", "--again", "--json")
    assert again.returncode == 3, again.stderr
    doc = cli_json(again.stdout)
    assert doc["error"] == "NotPrepared"
    assert "cannot be verified anew" in doc["message"] and "hands each out once" in \
        doc["message"] and re.search(r"\(verified: \d+ ok;", doc["message"])
    assert str(daemon.state_dir) in doc["message"]  # the report it points at
    assert prop(bus, "State") == "verified"   # refused, nothing changed


def test_kernel_refusals_exit_4_with_the_errno(bus: PrivateBus, daemon: Daemon, simdir: Path,
                                               kernel: Path) -> None:
    sim = SimKernel(simdir)
    sim.inject("load-fails", errno=errno.EBUSY)
    load = ctl(bus.address, "prepare", "--kernel", str(kernel), "--json")
    assert load.returncode == 4, load.stderr
    doc = cli_json(load.stdout)
    assert doc["error"] == "KernelRefused" and doc["exit_code"] == 4
    assert doc["errno"] == errno.EBUSY and doc["errno_name"] == "EBUSY"
    assert prop(bus, "State") == "idle"

    assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
    sim.inject("freeze-fails")
    reboot = ctl(bus.address, "commit")
    assert reboot.returncode == 4, reboot.stderr
    assert "KernelRefused" in reboot.stderr and "EINVAL" in reboot.stderr
    # a refused kexec loses nothing: still prepared, the daemon still up
    assert prop(bus, "State") == "prepared" and daemon.returncode is None


def test_verify_reports_a_damaged_file_and_exits_1(bus: PrivateBus, daemon: Daemon,
                                                   simdir: Path, kernel: Path) -> None:
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-2", 3, b"guest memory" * 1000)
        assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
        SimKernel(simdir).inject("corrupt-file", session="vm-2", token=3, offset=5)
        assert ctl(bus.address, "commit").returncode == 0
    wait_for_exit(daemon)   # the simulated kexec ends the daemon: the next boot starts it
    daemon.start()
    wait_for_state(bus, "failed")
    done = ctl(bus.address, "verify")
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("failed:")
    assert "vm-2" in done.stdout
    doc = cli_json(ctl(bus.address, "verify", "--json").stdout)
    assert doc["result"]["ok"] is False
    assert any("vm-2" in f["name"] for f in doc["result"]["summary"]["failures"])


# --- preflight and scratch through the daemon --------------------------------------------------

def test_preflight_and_scratch_go_through_the_daemon(bus: PrivateBus, daemon: Daemon,
                                                     kernel: Path) -> None:
    done = ctl(bus.address, "preflight", "--kernel", str(kernel), "--json")
    assert done.returncode == 0, done.stderr
    report = cli_json(done.stdout)
    # only the daemon on the simulated kernel reports this mode; this process is not simulated
    assert report["handoff_mode"] == "simulated"
    assert report["verdict"] == "ok"
    assert "note:" not in done.stderr
    text = ctl(bus.address, "preflight", "--kernel", str(kernel))
    assert text.stdout.rstrip().endswith("verdict: ok (hand-off mode: simulated)")

    plan = ctl(bus.address, "scratch", "--kernel", str(kernel), "--json")
    assert plan.returncode in (0, 1), plan.stderr
    doc = cli_json(plan.stdout)
    assert doc["host"] is None and doc["inputs"] is None  # the daemon sends the plan only
    assert (plan.returncode == 0) == doc["sufficient"]
    # the areas are the simulated kernel's, as its debugfs lists them
    assert daemon.simulate_dir is not None
    scratch_len = daemon.simulate_dir / "root/sys/kernel/debug/kho/out/scratch_len"
    sizes = [int(v, 0) for v in scratch_len.read_text().split()]
    assert [a["size"] for a in doc["plan"]["reserved"]] == sizes
    text = ctl(bus.address, "scratch", "--kernel", str(kernel))
    assert "recommended: kho_scratch=" in text.stdout


def test_preflight_with_checks_that_could_not_run_is_not_ok(bus: PrivateBus, daemon: Daemon,
                                                           kernel: Path) -> None:
    """No KHO debugfs (not mounted, or a kernel without it): the outgoing state and the LUO
    limits were not checked. They are `not-run`, never `ok`, over D-Bus as locally, and a
    preflight that found no blocker but could not run every check exits 2, report printed."""
    assert daemon.simulate_dir is not None
    shutil.rmtree(daemon.simulate_dir / "root/sys/kernel/debug/kho")
    done = ctl(bus.address, "preflight", "--json")
    report = cli_json(done.stdout)
    assert done.returncode == 2, [c for c in report["checks"] if c["tier"] != "ok"]
    tiers = {c["name"]: c["tier"] for c in report["checks"]}
    assert tiers["outgoing-state"] == "not-run" and tiers["luo-limits"] == "not-run"
    assert tiers["debugfs"] == "warning" and "blocker" not in tiers.values()
    assert report["verdict"] == "not-run"
    text = ctl(bus.address, "preflight")
    assert text.returncode == 2
    assert re.search(r"^not-run +outgoing-state +not run: ", text.stdout, re.M), text.stdout
    assert "has no error findings" not in text.stdout and "limits not known" not in text.stdout
    assert text.stdout.rstrip().endswith("verdict: not-run (hand-off mode: simulated)")
    # a blocker still wins: with a target, the scratch areas cannot be sized without debugfs
    blocked = ctl(bus.address, "preflight", "--kernel", str(kernel), "--json")
    assert blocked.returncode == 1 and cli_json(blocked.stdout)["verdict"] == "blocker"


def test_preflight_runs_locally_with_a_note_when_no_daemon_answers(bus: PrivateBus,
                                                                   kernel: Path) -> None:
    done = ctl(bus.address, "preflight", "--kernel", str(kernel), "--json")
    assert done.returncode in (0, 1)
    notes = [line for line in done.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1 and "in this process" in notes[0]
    assert cli_json(done.stdout)["handoff_mode"] != "simulated"


# --- daemon not reachable ----------------------------------------------------------------------

def test_a_missing_kernel_is_refused_here_before_any_call(bus: PrivateBus, daemon: Daemon,
                                                          tmp_path: Path) -> None:
    # kho-agentctl opens --kernel itself (the daemon gets the fd): nothing is asked of it
    path = tmp_path / "vmlinuz-missing"
    done = ctl(bus.address, "prepare", "--kernel", str(path), "--json")
    assert done.returncode == 2, done.stderr
    doc = cli_json(done.stdout)
    assert doc["error"] == "NotFound" and doc["message"] == f"target kernel {path} does not exist"
    assert busctl(bus.address, "tree", api.BUS_NAME).stdout.count("/job/") == 0
    assert prop(bus, "State") == "idle"


@pytest.mark.parametrize("content", [None, b"not a kernel image" * 64])
def test_an_unreadable_target_kernel_is_the_same_error_in_every_command(
        bus: PrivateBus, daemon: Daemon, kernel: Path, tmp_path: Path,
        content: bytes | None) -> None:
    """A target kernel that is missing (NotFound) or not a kernel (InvalidArgument) is "cannot
    run" (exit 2) with the same name in prepare (its dry run too), preflight (through the
    daemon and here), scratch and compat; before, prepare refused it by policy
    (PreflightFailed, 3) and preflight reported a blocker (1)."""
    path = tmp_path / "vmlinuz-broken"
    if content is not None:
        path.write_bytes(content)
    name = "NotFound" if content is None else "InvalidArgument"
    for argv in (["prepare"], ["prepare", "--dry-run"], ["preflight"], ["preflight", "--local"],
                 ["scratch"], ["compat", "--running-image", str(kernel)]):
        done = ctl(bus.address, *argv, "--kernel", str(path), "--json")
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert cli_json(done.stdout)["error"] == name, (argv, done.stdout)
        assert str(path) in done.stderr, (argv, done.stderr)
    # a D-Bus caller naming the file (the daemon opens it) gets the same error name
    with GioClient(bus.address) as client:
        for method in ("Preflight", "ScratchPlan"):
            with pytest.raises(RemoteError) as raised:
                client.call_values(MANAGER_PATH, MANAGER_IFACE, method, "a{sv}",
                                   ({"kernel": GLib.Variant("s", str(path))},))
            assert raised.value.name == f"{api.ERROR_PREFIX}{name}", (method, raised.value)
    assert prop(bus, "State") == "idle"


@pytest.mark.parametrize("command", ["status", "prepare --kernel KERNEL", "commit", "cancel",
                                     "verify", "sessions", "manifest", "jobs"])
def test_no_daemon_exits_2_with_how_to_start_it(bus: PrivateBus, tmp_path: Path,
                                                command: str) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"opened here, never read: no daemon answers")
    done = ctl(bus.address, *command.replace("KERNEL", str(kernel)).split())
    assert done.returncode == 2
    assert "kho-agentd is not running" in done.stderr
    assert "kho-agentd --bus-address" in done.stderr and "--simulate DIR" in done.stderr
    assert done.stdout == ""


def test_no_bus_exits_2_in_json(tmp_path: Path) -> None:
    done = ctl(f"unix:path={tmp_path}/no-bus-here", "status", "--json")
    assert done.returncode == 2
    doc = cli_json(done.stdout)
    assert doc["error"] == "DaemonUnreachable" and doc["exit_code"] == 2
    assert "cannot connect" in doc["message"]


def test_the_start_advice_follows_what_the_host_has() -> None:
    """`systemctl start kho-agent` only where systemd runs and the unit is installed; a missing
    unit or a host without systemd is said; the session bus is advised only to a process that
    has one; the trial on a bus of its own is offered whenever the system bus is meant."""
    system, session = ctl_bus.BusTarget("system"), ctl_bus.BusTarget("session")
    ready = StartFacts(systemd_running=True, unit_installed=True, session_bus=False)
    assert system.hint(ready).startswith("start it with `systemctl start kho-agent`")
    no_unit = system.hint(dataclasses.replace(ready, unit_installed=False))
    assert "kho-agent.service is not installed on this host" in no_unit
    assert not no_unit.startswith("start it with `systemctl")
    no_systemd = system.hint(dataclasses.replace(ready, systemd_running=False))
    assert "does not run systemd" in no_systemd and "systemctl" not in no_systemd
    for text in (system.hint(ready), no_unit, no_systemd):
        assert "dbus-daemon --session --fork --print-address" in text
    lonely = session.hint(ready)
    assert "no session bus" in lonely and "--bus session" not in lonely
    assert "`kho-agentd --bus session --simulate DIR`" in session.hint(
        dataclasses.replace(ready, session_bus=True))


def test_the_advised_trial_works_on_a_fresh_host(tmp_path: Path) -> None:
    """The commands the advice gives, run as given in an empty directory of a process with no
    bus at all (kho-agentd and kho-agentctl spelled as this checkout's modules)."""
    advice = ctl_bus.BusTarget("session").hint(
        StartFacts(systemd_running=False, unit_installed=False, session_bus=False))
    steps = re.findall(r"`([^`]+)`", advice)
    assert len(steps) == 3, advice
    here = {"kho-agentd": f"{sys.executable} -m kho_agent.daemon",
            "kho-agentctl": f"{sys.executable} -m kho_agent.cli"}
    steps = [re.sub(r"^kho-agent(d|ctl)", lambda m: here[m.group(0)], s) for s in steps]
    env = client_env()
    assert not {"DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS"} & set(env)
    started = subprocess.run(["sh", "-c", steps[0] + '; echo "$ADDR"'], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=30, check=True)
    address = started.stdout.strip().splitlines()[-1]
    bus_pid = int(busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                         "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s",
                         "org.freedesktop.DBus").stdout.split()[1])
    daemon = None
    try:
        assert steps[1].endswith(" &")
        daemon = subprocess.Popen(["sh", "-c", f"exec {steps[1][:-2]}"], cwd=tmp_path,
                                  env={**env, "ADDR": address}, stderr=subprocess.PIPE,
                                  text=True)
        assert daemon.stderr is not None
        for line in daemon.stderr:  # "it is ready when it logs 'serving'"
            if "serving" in line:
                break
        status = subprocess.run(["sh", "-c", steps[2]], cwd=tmp_path, capture_output=True,
                                text=True, timeout=CTL_TIMEOUT, env={**env, "ADDR": address})
        assert status.returncode == 0, status.stderr
        assert "(simulated kernel)" in status.stdout.splitlines()[0]
        assert (tmp_path / "DIR" / "boot.json").exists()  # DIR was created
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=30)
        os.kill(bus_pid, signal.SIGTERM)


def test_kho_agentd_names_the_bus_it_could_not_reach(tmp_path: Path) -> None:
    """Before, every case said "cannot connect to the bus", naming none."""
    env = client_env()
    cases = (([], env, "the system bus at unix:path=/run/dbus/system_bus_socket (the default"),
             ([], {**env, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/system"},
              f"the system bus at unix:path={tmp_path}/system (DBUS_SYSTEM_BUS_ADDRESS)"),
             (["--bus", "session"], env, "the session bus, which this process has none of"),
             (["--bus-address", f"unix:path={tmp_path}/private"], env,
              f"the bus at unix:path={tmp_path}/private:"))
    if Path("/run/dbus/system_bus_socket").exists():
        cases = cases[1:]  # this machine has a system bus: the default would connect
    for argv, environ, words in cases:
        done = subprocess.run([sys.executable, "-m", "kho_agent.daemon", *argv, "--simulate",
                               str(tmp_path / "sim")], capture_output=True, text=True,
                              timeout=60, env=environ, stdin=subprocess.DEVNULL)
        assert done.returncode == 2, done.stderr
        last = done.stderr.splitlines()[-1]
        assert last.startswith("kho-agentd: cannot connect to ") and words in last, last


# --- pieces without a bus ---------------------------------------------------------------------

def test_bus_and_bus_address_exclude_each_other() -> None:
    with pytest.raises(AgentError, match="exclude each other"):
        ctl_bus.target_from_args(argparse.Namespace(bus="session", bus_address="unix:path=/x"))
    assert ctl_bus.target_from_args(argparse.Namespace()) == ctl_bus.BusTarget("system", None)


def test_progress_plain_lines_only_on_change() -> None:
    out = io.StringIO()
    view = ProgressView("prepare", out)
    job = ctl_bus.JobInfo("/x")
    for value in (0, 0, 30, 30, 60, 100):
        job.progress = value
        view.update(job)
    view.finish()
    assert out.getvalue() == "prepare: 0%\nprepare: 30%\nprepare: 60%\nprepare: 100%\n"


def test_progress_bar_redraws_one_line_on_a_terminal() -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as stream:
            view = ProgressView("verify", stream)
            job = ctl_bus.JobInfo("/x")
            for value in (0, 50, 100):
                job.progress = value
                view.update(job)
            view.finish()
        os.close(follower)
        follower = -1
        # one read may return part of what was written: read until the pty reports the
        # closed follower (EIO)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks).decode()
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    frames = data.replace("\r\n", "\n").split("\r")[1:]
    assert len(frames) == 3
    assert frames[1].startswith("verify [###############...............]  50%")
    assert frames[-1].endswith("100%\n")  # the final frame ends the line


def test_failed_job_maps_to_the_errors_exit_code() -> None:
    job = ctl_bus.JobInfo("/x", state=api.JOB_FAILED,
                          error_name=api.ERROR_PREFIX + "KernelRefused",
                          error_message="KEXEC_FILE_LOAD failed: EBUSY (Device or resource "
                                        "busy): retry")
    err = job.error()
    assert err.exit_code == 4 and err.name == "KernelRefused"
    assert job.to_json()["error"]["errno_name"] == "EBUSY"


def test_scratch_plan_survives_the_bus_form() -> None:
    cmdline = "console=ttyS0 kho=on liveupdate=on"
    info = SysInfo(release="7.3.0", cmdline=cmdline, params=parse_cmdline(cmdline), boot_id="x",
                   machine="x86_64", page_size=4096, mem_total=8 << 30, mem_available=4 << 30,
                   hugepages_total=0, cma_total=None,
                   nodes=[NumaNode(0, 4 << 30), NumaNode(1, 4 << 30)],
                   memblock_reserved=[MemblockRegion(0x1000_0000, 40 << 20, 0, ("RSV_KERN",)),
                                      MemblockRegion(0x1_4000_0000, 8 << 20, 1,
                                                     ("RSV_KERN",))],
                   pid1=None, systemd_version=None, load_kexec_at_shutdown=None, lockdown=None)
    areas = [ScratchArea(0x4000_0000, 64 << 20, "lowmem"), ScratchArea(0, 4 << 20, "global"),
             ScratchArea(0x1_0000_0000, 64 << 20, "node 0"),
             ScratchArea(0x2_0000_0000, 64 << 20, "node 1")]
    plan = plan_scratch(info, areas, image_bytes=20 << 20, initrd_bytes=3 << 20)
    # what makes the JSON form lossy: int-keyed dicts and nested records
    assert plan.segments and len(plan.kern.per_node) == 2
    assert plan_from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_preflight_report_renders_as_the_local_one() -> None:
    result = PreflightResult([Check("kho", Tier.OK, "KHO is on"),
                              Check("scratch", Tier.BLOCKER, "too small", "boot with more"),
                              Check("debugfs", Tier.WARNING, "not mounted", "mount it")],
                             "direct")
    assert render_report(json.loads(json.dumps(result.to_json()))) == render(result)


# --- issue 11, class 8: bounded waits, errors with names ---------------------------------------

# process start and imports (~0.5 s), then at most the owner lookup and one Ping (1 s each)
SLACK_S = 4.0


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, resumed (SIGCONT) whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def timed_ctl(address: str, *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = ctl(address, *argv)
    return done, time.monotonic() - start


def test_a_stopped_daemon_is_daemon_not_responding_within_the_timeout(
        bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    commands = [["status"], ["sessions"], ["jobs"], ["manifest"], ["commit"], ["cancel"],
                ["verify"], ["preflight"], ["scratch"], ["preflight", "--kernel", str(kernel)],
                ["scratch", "--kernel", str(kernel)],
                # last: queued, these still run once the daemon is resumed
                ["prepare", "--kernel", str(kernel), "--no-wait"],
                ["prepare", "--kernel", str(kernel)]]
    with stopped(daemon.pid):
        for argv in commands:
            done, took = timed_ctl(bus.address, *argv, "--timeout", "2", "--json")
            assert took < 2 + SLACK_S, (argv, took)
            assert done.returncode == 2, (argv, done.stdout, done.stderr)
            doc = cli_json(done.stdout)
            assert doc["error"] == "DaemonNotResponding" and doc["exit_code"] == 2, (argv, doc)
            assert f"(pid {daemon.pid}, stopped: `kill -CONT {daemon.pid}` resumes it)" in \
                doc["message"]
            assert "within the --timeout of 2 s" in doc["message"]
            assert "kho-agentctl " in done.stderr and "DaemonNotResponding" in done.stderr
            assert "note:" not in done.stderr  # preflight/scratch do not fall back to --local
    assert ctl(bus.address, "status", "--json").returncode == 0  # resumed, it answers again


def test_a_stopped_bus_is_bounded_too(tmp_path: Path) -> None:
    with PrivateBus("system") as private, stopped(private.pid):
        done, took = timed_ctl(private.address, "status", "--timeout", "2", "--json")
    assert took < 2 + SLACK_S
    assert done.returncode == 2, done.stderr
    doc = cli_json(done.stdout)
    assert doc["error"] == "DaemonUnreachable"
    assert "did not accept a connection within 2 s" in doc["message"]


def test_status_into_a_closed_pipe_exits_quietly(bus: PrivateBus, daemon: Daemon) -> None:
    # `kho-agentctl status | head -1` once head has gone: no BrokenPipeError traceback
    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run([sys.executable, "-m", "kho_agent.cli", "--bus-address",
                               bus.address, "status"], stdout=writer, stderr=subprocess.PIPE,
                              text=True, timeout=CTL_TIMEOUT, env=client_env(),
                              stdin=subprocess.DEVNULL, check=False)
    finally:
        os.close(writer)
    assert proc.returncode == 141 and proc.stderr == ""


# A stand-in for kho-agentd whose Cancel starts a job that never ends (the real daemon's jobs
# end too fast on the simulated kernel to stop the daemon in the middle of one).
FAKE_AGENT = r"""
import sys

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib

from kho_agent.service import contract
from kho_agent.service import interfaces as api

JOB = api.JOB_PATH_PREFIX + "1"
PROPS = {"Id": GLib.Variant("u", 1), "Type": GLib.Variant("s", "cancel"),
         "State": GLib.Variant("s", "running"), "Progress": GLib.Variant("u", 0),
         "Result": GLib.Variant("s", ""), "ErrorName": GLib.Variant("s", ""),
         "ErrorMessage": GLib.Variant("s", "")}
conn = Gio.DBusConnection.new_for_address_sync(
    sys.argv[1], Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
manager = Gio.DBusNodeInfo.new_for_xml(contract.MANAGER_XML).lookup_interface(api.MANAGER_IFACE)
job = Gio.DBusNodeInfo.new_for_xml(contract.JOB_XML).lookup_interface(api.JOB_IFACE)
conn.register_object(api.MANAGER_PATH, manager,
                     lambda c, s, p, i, m, a, inv: inv.return_value(GLib.Variant("(o)", (JOB,))),
                     None, None)
conn.register_object(JOB, job, None, lambda c, s, p, i, prop: PROPS[prop], None)
conn.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
               "RequestName", GLib.Variant("(su)", (api.BUS_NAME, 4)), None,
               Gio.DBusCallFlags.NONE, 5000, None)
print("ready", flush=True)
GLib.MainLoop().run()
"""


def test_following_a_job_is_bounded_when_the_daemon_stops(bus: PrivateBus) -> None:
    fake = subprocess.Popen([sys.executable, "-c", FAKE_AGENT, bus.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=client_env(), stdin=subprocess.DEVNULL)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        # a job that runs on: the wait ends at --timeout, and the job continues
        done, took = timed_ctl(bus.address, "cancel", "--timeout", "2", "--json")
        assert took < 2 + SLACK_S and done.returncode == 2, done.stderr
        assert cli_json(done.stdout)["error"] == "JobNotFinished"
        # the daemon stopped while its job is followed: no news, and no answer to a Ping
        follower = subprocess.Popen(
            [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, "cancel",
             "--timeout", "3", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=client_env(), stdin=subprocess.DEVNULL)
        try:
            assert follower.stderr is not None
            assert follower.stderr.readline().strip() == "cancel: 0%"  # it follows the job
            start = time.monotonic()
            with stopped(fake.pid):
                out, err = follower.communicate(timeout=CTL_TIMEOUT)
                took = time.monotonic() - start
        finally:
            follower.kill()
            follower.wait()
        assert took < 3 + SLACK_S, took
        assert follower.returncode == 2 and "Traceback" not in err, err
        doc = cli_json(out)
        assert doc["error"] == "DaemonNotResponding"
        assert f"sent nothing about job {api.JOB_PATH_PREFIX}1 for 3 s" in doc["message"]
        assert f"(pid {fake.pid}, stopped:" in doc["message"]
    finally:
        fake.kill()
        fake.wait()


def test_kernel_and_initrd_reach_the_daemon_as_fds(bus: PrivateBus, daemon: Daemon,
                                                  kernel: Path, tmp_path: Path) -> None:
    # /proc/self/fd/N names a file only the kho-agentctl process has open: a daemon that got
    # the path would open its own fd N; one that got the fd reads the image we opened
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(4096))
    kernel_fd = os.open(kernel, os.O_RDONLY)
    initrd_fd = os.open(initrd, os.O_RDONLY)
    try:
        def run(*argv: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, *argv,
                 "--kernel", f"/proc/self/fd/{kernel_fd}", "--initrd",
                 f"/proc/self/fd/{initrd_fd}", "--json"], pass_fds=(kernel_fd, initrd_fd),
                capture_output=True, text=True, timeout=CTL_TIMEOUT, env=client_env(),
                stdin=subprocess.DEVNULL)
            assert "Traceback" not in done.stderr, done.stderr
            return done

        dry = run("prepare", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        result = cli_json(dry.stdout)["result"]
        # the daemon names the files it was passed by where they really are
        assert result["kernel"] == str(kernel) and result["initrd"] == str(initrd)
        assert result["would_prepare"] is True
        report = run("preflight")
        assert report.returncode == 0, report.stderr
        checks = {c["name"]: c for c in cli_json(report.stdout)["checks"]}
        assert checks["target-abi"]["tier"] == "ok", checks["target-abi"]
        plan = run("scratch")
        assert plan.returncode in (0, 1), plan.stderr
        assert cli_json(plan.stdout)["plan"]["segments"]
    finally:
        os.close(kernel_fd)
        os.close(initrd_fd)


def test_an_unprivileged_client_passes_fds_the_daemon_accepts(bus: PrivateBus, daemon: Daemon,
                                                             kernel: Path) -> None:
    # the daemon opens paths only for root: an unprivileged preflight works only with fds
    require_run_as(NOBODY, python=True)
    public = Path(tempfile.mkdtemp(prefix="kho-ctl-"))  # pytest's tmp root is 0700
    try:
        public.chmod(0o755)
        image = public / "vmlinuz-next"
        shutil.copyfile(kernel, image)
        image.chmod(0o644)
        done = python_as(NOBODY, "import sys; from kho_agent.cli import main; sys.exit(main())",
                         "--bus-address", bus.address, "preflight", "--kernel", str(image),
                         "--json", timeout=CTL_TIMEOUT)
    finally:
        shutil.rmtree(public)
    assert done.returncode == 0, done.stderr
    checks = {c["name"]: c for c in cli_json(done.stdout)["checks"]}
    assert checks["target-abi"]["tier"] == "ok", checks["target-abi"]
