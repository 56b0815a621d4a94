"""`kho-agentctl history` and `kho-agentctl inhibit` against a real kho-agentd on a private bus
(the simulated kernel), with busctl (not ours) reading the Inhibitors property; and Inhibit's
arguments and polkit action on the daemon."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from agenthost import Authority, Host, host, invoke, kernel_option
from cliout import cli_json, envelope
from dbusrig import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    NOBODY,
    Daemon,
    GioClient,
    PrivateBus,
    RemoteError,
    busctl,
    client_env,
    require_run_as,
)
from gi.repository import GLib
from test_ctl import (
    bus,
    create_ready_session,
    ctl,
    daemon,
    kernel,
    prop,
    simdir,
    wait_for_exit,
    wait_for_state,
)

__all__ = ["bus", "daemon", "host", "kernel", "simdir"]  # fixtures, imported for pytest

WAIT_S = 10.0


def history(bus: PrivateBus) -> dict[str, object]:
    done = ctl(bus.address, "history", "--json")
    assert done.returncode == 0, done.stderr
    document: dict[str, object] = cli_json(done.stdout)
    return document


def wait_inhibitors(bus: PrivateBus, count: int) -> list[list[object]]:
    deadline = time.monotonic() + WAIT_S
    held: list[list[object]] = []
    while time.monotonic() < deadline:
        held = prop(bus, "Inhibitors")
        if len(held) == count:
            return held
        time.sleep(0.05)
    raise AssertionError(f"Inhibitors stayed {held!r}, not {count} of them")


# --- history ------------------------------------------------------------------------------------

def test_history_keeps_a_cancel_and_a_live_update_across_the_kexec(
        bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    assert history(bus)["entries"] == []
    assert ctl(bus.address, "history").stdout.startswith("no live update")
    content = os.urandom(8192)
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-1", 7, content)
        assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
        assert ctl(bus.address, "cancel").returncode == 0
        create_ready_session(vm_manager, "vm-1", 7, content)
        assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
        assert ctl(bus.address, "commit").returncode == 0
    wait_for_exit(daemon)
    daemon.start()  # the next boot
    wait_for_state(bus, "verified")
    document = history(bus)
    assert document["schema"] == 1 and document["problems"] == []
    cancelled, verified = document["entries"]  # type: ignore[misc]
    assert cancelled["verdict"] == "cancelled" and cancelled["ended"]
    assert verified["verdict"] == "verified" and verified["release_to"] == "7.3.1-sim"
    assert (verified["sessions"], verified["files"], verified["bytes"]) == (1, 1, 8192)
    assert verified["kernel_to"] == str(kernel)
    assert 0 <= verified["blackout_seconds"] < 60
    table = ctl(bus.address, "history").stdout
    assert re.search(r"^\S+ +cancelled +7\.3\.0-sim +7\.3\.1-sim +1 +8\.0 KiB +- +"
                     r"cancelled: unloaded", table, re.M), table
    assert re.search(r"^\S+ +verified +7\.3\.0-sim +7\.3\.1-sim +1 +8\.0 KiB +\d+\.\d\d s",
                     table, re.M), table
    assert ctl(bus.address, "history", "--json", "--last", "1").stdout.count('"verdict"') == 1


def test_a_corrupt_history_file_is_reported_not_fatal(bus: PrivateBus, simdir: Path,
                                                      tmp_path: Path, kernel: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    good = {"id": "x1", "kind": "update", "started": "2026-01-01T00:00:00+00:00",
            "verdict": "verified", "release_from": "7.2.0"}
    (state / "history.jsonl").write_bytes(b"\xff{torn\n" + json.dumps(good).encode() + b"\n"
                                         + b'{"id": 5}\n')
    with Daemon(bus.address, simdir, state) as agentd:
        document = history(bus)
        assert [e["id"] for e in document["entries"]] == ["x1"]  # type: ignore[index]
        problems = document["problems"]
        assert isinstance(problems, list) and len(problems) == 2
        assert "line 1 skipped: not UTF-8" in problems[0] and "line 3" in problems[1]
        text = ctl(bus.address, "history")
        assert text.returncode == 0 and "line 3 skipped" in text.stderr
        # the daemon goes on: an update is prepared and recorded, the file rewritten clean,
        # the file with the lines it left out moved aside first, and its log says so
        assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
        document = history(bus)
        assert document["problems"] == []
        assert [e["verdict"] for e in document["entries"]] == [  # type: ignore[union-attr]
            "verified", "prepared"]
        (aside,) = state.glob("history.jsonl.corrupt-*")
        assert aside.read_bytes().startswith(b"\xff{torn\n") \
            and aside.read_bytes().endswith(b'\n{"id": 5}\n')
        log = agentd.stderr_text()
        assert "history: 2 unreadable line(s)" in log and str(aside) in log, log


# --- inhibit ------------------------------------------------------------------------------------

def test_inhibit_holds_commits_off_while_its_command_runs(bus: PrivateBus, daemon: Daemon,
                                                          kernel: Path) -> None:
    assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
    # the command run under the inhibitor tries to commit, and reports what it got
    inner = [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, "commit",
             "--json"]
    held = ctl(bus.address, "inhibit", "--who", "ops", "--why", "database migration", "--",
               *inner)
    assert held.returncode == 3, (held.stdout, held.stderr)  # the command's own exit status
    refusal = cli_json(held.stdout)
    assert refusal["error"] == "Inhibited"
    assert "ops (uid 0: database migration)" in refusal["message"]
    assert prop(bus, "State") == "prepared"
    assert wait_inhibitors(bus, 0) == []
    assert ctl(bus.address, "commit", "--dry-run").returncode == 0
    # the refusal is counted on the prepared update, not an entry of its own
    entries = history(bus)["entries"]
    assert [(e["kind"], e["verdict"], e["commits_refused"],  # type: ignore[index]
             e["last_commit_error_name"]) for e in entries] == [  # type: ignore[union-attr]
        ("update", "prepared", 1, "Inhibited")]
    assert "1 commit(s) refused (last: Inhibited: " in ctl(bus.address, "history").stdout


def test_an_inhibitor_shows_in_status_and_ends_with_its_holder(bus: PrivateBus,
                                                               daemon: Daemon) -> None:
    holders = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        holder = subprocess.Popen(
            [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, "inhibit",
             "--why", f"held until {sig.name}"], stdout=subprocess.PIPE, text=True,
            env=client_env(), stdin=subprocess.DEVNULL)
        holders.append(holder)
        assert holder.stdout is not None and "holding" in holder.stdout.readline()
    try:
        first, _ = wait_inhibitors(bus, 2)
        assert first[0] == "uid 0" and first[1] == "held until SIGTERM" and first[2] == 0
        status = ctl(bus.address, "status")
        assert re.search(r"^  inhibitors: +uid 0 \(uid 0, since \S+\): held until SIGTERM$",
                         status.stdout, re.M), status.stdout
        assert "held until SIGKILL - commits are refused until released" in status.stdout
        doc = cli_json(ctl(bus.address, "status", "--json").stdout)
        assert [i["why"] for i in doc["inhibitors"]] == ["held until SIGTERM",
                                                         "held until SIGKILL"]
        holders[0].send_signal(signal.SIGTERM)
        assert holders[0].wait(WAIT_S) == 0
        assert [h[1] for h in wait_inhibitors(bus, 1)] == ["held until SIGKILL"]
        holders[1].kill()  # a crashed holder: the kernel closes its fd
        holders[1].wait(WAIT_S)
        wait_inhibitors(bus, 0)
        assert "inhibitors:     none" in ctl(bus.address, "status").stdout
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
                holder.wait()


def test_inhibit_json_says_it_holds_when_it_holds_and_again_at_release(
        bus: PrivateBus, daemon: Daemon) -> None:
    """`inhibit --json --why X` (the waiting form) printed its envelope only at release: a
    script could not read that it holds. Now one envelope line when the hold is taken, a
    second at release, each valid against the schema."""
    holder = subprocess.Popen(
        [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, "inhibit",
         "--why", "scripted hold", "--json"], stdout=subprocess.PIPE, text=True,
        env=client_env(), stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], WAIT_S)
        assert ready, "no document while the hold is held"
        held = envelope(holder.stdout.readline())
        assert (held["command"], held["ok"], held["exit_code"]) == ("inhibit", True, 0)
        assert held["result"] == {"inhibiting": {"who": "uid 0", "why": "scripted hold"},
                                  "state": "held"}
        # what it says is so: the daemon lists the hold while the document is read
        assert [h[1] for h in wait_inhibitors(bus, 1)] == ["scripted hold"]
        holder.send_signal(signal.SIGTERM)
        rest = holder.stdout.read()
        assert holder.wait(WAIT_S) == 0
        lines = rest.splitlines()
        assert len(lines) == 1, rest
        released = envelope(lines[0])
        assert released["exit_code"] == 0 and released["error"] is None
        assert released["result"] == {"inhibiting": {"who": "uid 0", "why": "scripted hold"},
                                      "state": "released"}
        wait_inhibitors(bus, 0)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_sigterm_ends_the_covered_command_before_the_hold(bus: PrivateBus, daemon: Daemon,
                                                             tmp_path: Path) -> None:
    """`inhibit -- CMD` under a supervisor's SIGTERM: the command is stopped and waited for
    before the hold goes (it used to die alone and leave the command running, unheld)."""
    pid_file = tmp_path / "child.pid"
    holder = subprocess.Popen(
        [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, "inhibit",
         "--why", "covering a command", "--", "sh", "-c", f'echo $$ > {pid_file}; exec sleep 600'],
        env=client_env(), stdin=subprocess.DEVNULL)
    try:
        wait_inhibitors(bus, 1)
        deadline = time.monotonic() + WAIT_S
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the covered command did not start"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        holder.send_signal(signal.SIGTERM)
        holder.wait(WAIT_S)
        assert not Path(f"/proc/{child}").exists() or \
            Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", "the command still runs"
        wait_inhibitors(bus, 0)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_inhibit_refuses_bad_text_and_needs_its_polkit_action(host: Host) -> None:
    client = host.client()
    for who, why, needle in (("ops", "", "must say something"), ("ops", "a\nb", "one line"),
                             ("x" * 65, "why", "at most 64"), ("ops", "y" * 257, "at most 256")):
        try:
            client.call(MANAGER_PATH, MANAGER_IFACE, "Inhibit",
                        GLib.Variant("(ss)", (who, why)))
        except RemoteError as exc:
            assert "InvalidArgument" in str(exc) and needle in str(exc), str(exc)
        else:
            raise AssertionError(f"Inhibit({who[:10]!r}, {why[:10]!r}) was not refused")
    assert host.prop("Inhibitors") == []
    require_run_as(NOBODY)
    authority = Authority(host.bus.address, {"org.khoagent.Agent1.session": {NOBODY}})
    try:
        denied = busctl(host.bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                        "Inhibit", "ss", "me", "because", uid=NOBODY)
        assert denied.returncode != 0 and "inhibit" in denied.stderr, denied.stderr
        assert (NOBODY, "org.khoagent.Agent1.inhibit") in authority.asked
        authority.grants["org.khoagent.Agent1.inhibit"] = {NOBODY}
        # busctl closes the fd as it exits: the inhibitor comes and goes
        allowed = busctl(host.bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                         "Inhibit", "ss", "me", "because", uid=NOBODY)
        assert allowed.returncode == 0, allowed.stderr
    finally:
        authority.stop()
    assert invoke(host.client(), "History")[0].startswith('{"schema": 1')
    assert kernel_option(host)  # the host fixture's target stays usable
