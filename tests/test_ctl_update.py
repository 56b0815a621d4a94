"""`kho-agentctl update` (what kho-agent-update.service runs): the real command against a real
private dbus-daemon and a real `kho-agentd --simulate`, with VM managers as Gio clients.

An update refused before its prepare leaves the daemon exactly as it was (state, history, the
clients' sessions); one refused after it cancels, and the clients are told; one that goes
through commits, and the next boot shows the live-update number one higher.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cliout import cli_json, envelope
from dbusrig import MANAGER_IFACE, MANAGER_PATH, Daemon, GioClient, PrivateBus, client_env
from test_ctl import (
    CTL_TIMEOUT,
    WAIT_S,
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
from test_daemon_config import closed_window

from kho_agent.cli.update import ready_seconds
from kho_agent.config import parse_config
from kho_agent.engine.prepare import same_build
from kho_agent.errors import ConfigInvalid
from kho_agent.kernel.image import ImageInfo
from kho_agent.kernel.sysinfo import read_sysinfo
from kho_agent.sim import SimKernel

__all__ = ["bus", "daemon", "kernel", "simdir"]  # fixtures, imported for pytest

KEYS = ("outcome", "running", "target", "live_update_number", "preflight", "waited_ready_s",
        "stage", "cancelled")


# --- helpers ----------------------------------------------------------------------------------

def update(address: str, *argv: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`kho-agentctl update ARGV --json`: the process and its envelope."""
    done = ctl(address, "update", *argv, "--json")
    doc = envelope(done.stdout)
    assert doc["exit_code"] == done.returncode, (doc, done.stderr)
    assert isinstance(doc["result"], dict) and tuple(doc["result"]) == KEYS, doc
    return done, doc


def history(address: str) -> Any:
    done = ctl(address, "history", "--json")
    assert done.returncode == 0, done.stderr
    return cli_json(done.stdout)


def daemon_view(address: str) -> tuple[Any, ...]:
    """What an update refused before its prepare must leave as it was."""
    status = cli_json(ctl(address, "status", "--json").stdout)
    props = status["properties"]
    return (props["State"], props["TargetKernel"], props["LiveUpdateNumber"],
            props["LastResult"], [(s["name"], s["ready"]) for s in status["sessions"]],
            history(address))


def running_image(simdir: Path) -> Path:
    host = SimKernel(simdir).host()
    return host.path(f"boot/vmlinuz-{read_sysinfo(host.root).release}")


def configured_daemon(bus: PrivateBus, simdir: Path, tmp_path: Path, conf: str) -> Daemon:
    root = tmp_path / "config-root"
    (root / "etc/kho-agent").mkdir(parents=True)
    (root / "etc/kho-agent/agent.conf").write_text(conf)
    return Daemon(bus.address, simdir, tmp_path / "state", ["--config-root", str(root)])


# --- before anything changes ------------------------------------------------------------------

def test_the_running_kernel_as_target_is_up_to_date_and_nothing_is_done(
        bus: PrivateBus, daemon: Daemon, simdir: Path) -> None:
    before = daemon_view(bus.address)
    image = running_image(simdir)
    done, doc = update(bus.address, "--kernel", str(image))
    assert done.returncode == 0, done.stderr
    result = doc["result"]
    assert result["outcome"] == "up-to-date" and result["stage"] == "check"
    assert result["running"] == {"release": "7.3.0-sim", "version": "#1 SMP PREEMPT_DYNAMIC"}
    assert result["target"] == {"kernel": str(image.resolve()), "initrd": None,
                                "release": "7.3.0-sim", "version": "#1 SMP PREEMPT_DYNAMIC"}
    assert result["cancelled"] is False and result["waited_ready_s"] is None
    assert daemon_view(bus.address) == before
    text = ctl(bus.address, "update", "--kernel", str(image))
    assert text.returncode == 0 and text.stdout.startswith("up to date: the running kernel "
                                                           "7.3.0-sim is the target")


def test_the_configured_target_is_taken_without_kernel_and_twice_changes_nothing(
        bus: PrivateBus, simdir: Path, tmp_path: Path) -> None:
    """Target=newest-compatible on a host whose newest kernel runs already: the second run
    of a rollout."""
    boot = tmp_path / "config-root" / "boot"
    boot.mkdir(parents=True)
    shutil.copy(running_image(simdir), boot / "vmlinuz-7.3.0-sim")
    with configured_daemon(bus, simdir, tmp_path, "[Prepare]\nTarget=newest-compatible\n"):
        before = daemon_view(bus.address)
        for _ in range(2):
            done, doc = update(bus.address)
            assert done.returncode == 0, done.stderr
            assert doc["result"]["outcome"] == "up-to-date"
            assert doc["result"]["target"]["kernel"] == str((boot / "vmlinuz-7.3.0-sim").resolve())
        assert daemon_view(bus.address) == before


def test_check_says_would_update_and_prepares_nothing(bus: PrivateBus, daemon: Daemon,
                                                      kernel: Path) -> None:
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-1", 1, b"guest")
        before = daemon_view(bus.address)
        done, doc = update(bus.address, "--check", "--kernel", str(kernel))
        assert done.returncode == 0, done.stderr
        result = doc["result"]
        assert result["outcome"] == "would-update" and result["stage"] == "check"
        assert result["target"]["release"] == "7.3.1-sim"
        assert result["preflight"]["verdict"] in ("ok", "warning")
        assert {c["name"] for c in result["preflight"]["checks"]} >= {"kho", "target-abi"}
        assert result["live_update_number"] == before[2]
        assert daemon_view(bus.address) == before


def test_an_inhibitor_refuses_before_the_prepare_and_nothing_changes(
        bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    with GioClient(bus.address) as vm_manager, GioClient(bus.address) as backup:
        create_ready_session(vm_manager, "vm-1", 1, b"guest")
        _, fds = backup.call_values(MANAGER_PATH, MANAGER_IFACE, "Inhibit", "ss",
                                    ("backup", "nightly backup"))
        try:
            before = daemon_view(bus.address)
            with vm_manager.catch_signal("SessionReleased") as released:
                done, doc = update(bus.address, "--kernel", str(kernel))
                assert done.returncode == 3, done.stderr
                assert doc["error"]["error"] == "Inhibited"
                assert "backup (uid 0: nightly backup)" in doc["error"]["message"]
                assert doc["result"]["stage"] == "check" and doc["result"]["cancelled"] is False
                assert daemon_view(bus.address) == before
                assert released.received == []
            # --check meets the same refusal
            checked, doc = update(bus.address, "--check", "--kernel", str(kernel))
            assert checked.returncode == 3 and doc["error"]["error"] == "Inhibited"
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize(("conf", "words"), [
    (f"[Commit]\nMaintenanceWindow={closed_window()}\n", "outside the maintenance window"),
    ("[Commit]\nHandoffMode=fdstore\n", "requires hand-off mode fdstore (HandoffMode="),
])
def test_a_commit_the_configuration_refuses_is_refused_before_the_prepare(
        bus: PrivateBus, simdir: Path, kernel: Path, tmp_path: Path, conf: str,
        words: str) -> None:
    with configured_daemon(bus, simdir, tmp_path, conf):
        before = daemon_view(bus.address)
        done, doc = update(bus.address, "--kernel", str(kernel))
        assert done.returncode == 3, done.stderr
        assert doc["error"]["error"] == "PreflightFailed"
        assert words in doc["error"]["message"]
        assert doc["result"]["stage"] == "check" and doc["result"]["cancelled"] is False
        assert daemon_view(bus.address) == before


def test_a_preflight_blocker_refuses_as_prepare_would(bus: PrivateBus, daemon: Daemon,
                                                      simdir: Path, tmp_path: Path) -> None:
    from test_ctl import INCOMPATIBLE

    old = SimKernel(simdir).write_kernel_image(tmp_path / "vmlinuz-old", release="7.0.0-sim",
                                               abi=INCOMPATIBLE)
    before = daemon_view(bus.address)
    done, doc = update(bus.address, "--kernel", str(old))
    assert done.returncode == 3, done.stderr
    assert doc["error"]["error"] == "PreflightFailed"
    assert doc["error"]["message"].startswith("preflight found blockers: target-abi: ")
    assert doc["result"]["preflight"]["verdict"] == "blocker"
    assert daemon_view(bus.address) == before


def test_an_update_already_prepared_is_left_alone(bus: PrivateBus, daemon: Daemon,
                                                  kernel: Path) -> None:
    assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
    before = daemon_view(bus.address)
    done, doc = update(bus.address, "--kernel", str(kernel))
    assert done.returncode == 3 and doc["error"]["error"] == "Busy"
    assert "already prepared" in doc["error"]["message"]
    assert daemon_view(bus.address) == before


# --- after the prepare ------------------------------------------------------------------------

def test_clients_not_ready_in_time_cancel_the_update_and_their_owner_is_told(
        bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-slow", 9, b"not ready")
        vm_manager.call_values(MANAGER_PATH, MANAGER_IFACE, "SetReady", "sb",
                               ("vm-slow", False))
        with vm_manager.catch_signal("SessionReleased") as released:
            done, doc = update(bus.address, "--kernel", str(kernel), "--ready-timeout", "0.5")
            assert done.returncode == 3, done.stderr
            assert doc["error"]["error"] == "Busy"
            assert "session(s) not ready: vm-slow after 0.5 s" in doc["error"]["message"]
            assert doc["result"]["stage"] == "wait" and doc["result"]["cancelled"] is True
            assert doc["result"]["outcome"] is None
            name, _path, reason = released.wait()
            assert name == "vm-slow" and "cancel" in reason
    assert "waiting up to 0.5 s for session(s) to be ready: vm-slow" in done.stderr
    assert prop(bus, "State") == "idle" and daemon.returncode is None
    assert prop(bus, "TargetKernel") == ""


def test_a_stop_while_waiting_cancels_the_prepared_update(bus: PrivateBus, daemon: Daemon,
                                                          kernel: Path) -> None:
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-slow", 9, b"not ready")
        vm_manager.call_values(MANAGER_PATH, MANAGER_IFACE, "SetReady", "sb",
                               ("vm-slow", False))
        waiting = background_update(bus.address, "--kernel", str(kernel))
        try:
            wait_for_state(bus, "prepared")
            waiting.send_signal(signal.SIGTERM)
            out, err = waiting.communicate(timeout=CTL_TIMEOUT)
        finally:
            stop(waiting)
    assert waiting.returncode == 2, err
    assert "Traceback" not in err  # the handler raises nothing inside a GLib dispatch
    doc = envelope(out)
    assert doc["error"]["error"] == "Interrupted"
    assert "stopped by SIGTERM" in doc["error"]["message"] and "was cancelled" in \
        doc["error"]["message"]
    assert doc["result"]["cancelled"] is True
    assert prop(bus, "State") == "idle"


def background_update(address: str, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kho_agent.cli", "--bus-address", address,
                             "update", *argv, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=client_env(),
                            stdin=subprocess.DEVNULL)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_update_waits_for_the_clients_then_commits_and_the_number_goes_up(
        bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    number = prop(bus, "LiveUpdateNumber")
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-1", 7, b"guest memory" * 1000)
        vm_manager.call_values(MANAGER_PATH, MANAGER_IFACE, "SetReady", "sb", ("vm-1", False))
        going = background_update(bus.address, "--kernel", str(kernel), "--ready-timeout", "60")
        try:
            wait_for_state(bus, "prepared")
            # the update waits: still prepared, not committed, until the owner says ready
            assert going.poll() is None and prop(bus, "State") == "prepared"
            vm_manager.call_values(MANAGER_PATH, MANAGER_IFACE, "SetReady", "sb",
                                   ("vm-1", True))
            out, err = going.communicate(timeout=CTL_TIMEOUT)
        finally:
            stop(going)
    assert going.returncode == 0, err
    result = cli_json(out)
    assert result["outcome"] == "committing" and result["stage"] == "commit"
    assert result["live_update_number"] == number
    assert result["target"]["release"] == "7.3.1-sim"
    assert isinstance(result["waited_ready_s"], float) and result["waited_ready_s"] > 0
    assert "handing off to" in err

    wait_for_exit(daemon)  # the simulated kexec ends the daemon, as a real one the host
    assert daemon.returncode == 0, daemon.stderr_text()
    daemon.start()
    wait_for_state(bus, "verified")
    status = cli_json(ctl(bus.address, "status", "--json").stdout)
    assert status["properties"]["LiveUpdateNumber"] == number + 1
    assert status["properties"]["RunningKernel"] == "7.3.1-sim"
    assert status["last_result"]["ok"] is True
    # and in the new kernel, the same target is up to date
    done, doc = update(bus.address, "--kernel", str(kernel))
    assert done.returncode == 0 and doc["result"]["outcome"] == "up-to-date", done.stderr


def test_a_kexec_the_kernel_refuses_cancels_the_update(bus: PrivateBus, daemon: Daemon,
                                                       simdir: Path, kernel: Path) -> None:
    SimKernel(simdir).inject("freeze-fails")
    done, doc = update(bus.address, "--kernel", str(kernel))
    assert done.returncode == 4, done.stderr
    assert doc["error"]["error"] == "KernelRefused" and doc["error"]["errno"] == errno.EINVAL
    assert doc["result"]["stage"] == "commit" and doc["result"]["cancelled"] is True
    assert doc["result"]["outcome"] is None and doc["result"]["waited_ready_s"] is not None
    assert prop(bus, "State") == "idle" and daemon.returncode is None
    # one attempt: the failed commit is folded into the update it cancelled
    entries = history(bus.address)["entries"]
    assert [e.get("verdict") for e in entries] == ["cancelled"], entries
    assert entries[0]["commits_failed"] == 1, entries
    assert entries[0]["last_commit_error_name"] == "KernelRefused", entries


def test_a_prepare_that_outlives_the_timeout_is_cancelled_and_the_next_update_runs(
        bus: PrivateBus, daemon: Daemon, simdir: Path, kernel: Path) -> None:
    """The kexec load takes far longer than --timeout: update cancels the prepare (Job.Cancel)
    instead of leaving the host prepared behind it, and the next run is not Busy."""
    with GioClient(bus.address) as vm_manager:
        create_ready_session(vm_manager, "vm-1", 1, b"guest")
        SimKernel(simdir).inject("slow-load", seconds=8.0)
        with vm_manager.catch_signal("SessionReleased") as released, \
                vm_manager.catch_signal("JobRemoved") as removed:
            done, doc = update(bus.address, "--kernel", str(kernel), "--timeout", "3")
            # the prepare rolls back at its next step (after the load), never prepared
            removed.wait(WAIT_S, lambda args: args[2] == "canceled")
            assert prop(bus, "State") == "idle"
            assert done.returncode == 2, done.stderr
            assert doc["error"]["error"] == "JobNotFinished"
            message = doc["error"]["message"]
            assert message.startswith("the prepare did not finish (--timeout 3 s); "), message
            assert "cancel" in message, message
            assert doc["result"]["stage"] == "prepare" and doc["result"]["outcome"] is None
            assert not SimKernel(simdir).host().kexec.loaded()
            assert released.received == []  # the clients' sessions stay, as they were
        status = cli_json(ctl(bus.address, "status", "--json").stdout)
        assert [(s["name"], s["ready"]) for s in status["sessions"]] == [("vm-1", True)]
        checked, doc = update(bus.address, "--check", "--kernel", str(kernel))
        assert checked.returncode == 0, checked.stderr
        assert doc["result"]["outcome"] == "would-update"


def test_a_commit_that_outlives_the_timeout_is_never_cancelled(
        bus: PrivateBus, daemon: Daemon, simdir: Path, kernel: Path) -> None:
    """Once the Commit started the kexec may be under way: a wait that ends (--timeout) says
    so and leaves the commit alone, which then hands off."""
    number = prop(bus, "LiveUpdateNumber")
    SimKernel(simdir).inject("slow-reboot", seconds=9.0)
    done, doc = update(bus.address, "--kernel", str(kernel), "--timeout", "5")
    assert "cancel the prepared update" not in done.stderr  # not even tried
    assert "cancelled the update" not in done.stderr
    assert done.returncode == 2, done.stderr
    assert doc["error"]["error"] == "JobNotFinished"
    assert "the commit was not cancelled: it may be handing off" in doc["error"]["message"]
    assert doc["result"]["stage"] == "commit" and doc["result"]["cancelled"] is False
    wait_for_exit(daemon)  # the commit went on: the simulated kexec ends the daemon
    assert daemon.returncode == 0, daemon.stderr_text()
    daemon.start()
    wait_for_state(bus, "verified")
    assert prop(bus, "LiveUpdateNumber") == number + 1


def test_a_dry_run_of_prepare_says_what_update_decides_on(bus: PrivateBus, daemon: Daemon,
                                                          simdir: Path, kernel: Path) -> None:
    with GioClient(bus.address) as backup:
        _, fds = backup.call_values(MANAGER_PATH, MANAGER_IFACE, "Inhibit", "ss",
                                    ("backup", "nightly"))
        try:
            done = ctl(bus.address, "prepare", "--dry-run", "--kernel", str(kernel), "--json")
            text = ctl(bus.address, "prepare", "--dry-run", "--kernel",
                       str(running_image(simdir)))
        finally:
            for fd in fds:
                os.close(fd)
    result = cli_json(done.stdout)["result"]   # the job's Result
    assert result["target_is_running"] is False and result["release"] == "7.3.1-sim"
    assert result["commit_refused"]["error"] == "Inhibited"
    assert result["prepare_refused"] is None and result["would_prepare"] is True
    assert "this is the kernel running" in text.stdout
    assert "a commit now would be refused: Inhibited: " in text.stdout


def test_a_dry_run_of_prepare_says_the_prepare_is_refused_while_one_is_prepared(
        bus: PrivateBus, daemon: Daemon, kernel: Path) -> None:
    """The dry run runs the prepare's own start check: update reads which states allow a
    prepare from it, not from a copy of the engine's rule."""
    assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
    done = ctl(bus.address, "prepare", "--dry-run", "--kernel", str(kernel), "--json")
    assert done.returncode == 1, done.stderr
    result = cli_json(done.stdout)["result"]
    assert result["would_prepare"] is False
    assert result["prepare_refused"]["error"] == "Busy"
    assert result["prepare_refused"]["message"] == "cannot prepare while prepared; cancel first"
    text = ctl(bus.address, "prepare", "--dry-run", "--kernel", str(kernel))
    assert "verdict: prepare would be refused: Busy: cannot prepare while prepared" in \
        text.stdout
    assert prop(bus, "State") == "prepared"


# --- the pieces -------------------------------------------------------------------------------

def test_the_ready_timeout_is_configured_and_published(bus: PrivateBus, simdir: Path,
                                                       tmp_path: Path) -> None:
    with configured_daemon(bus, simdir, tmp_path, "[Update]\nReadyTimeoutSec=2min 30s\n"):
        assert prop(bus, "ReadyTimeoutUSec") == 150_000_000
    assert parse_config([]).update_ready_timeout_seconds == 600.0
    assert parse_config([("/a.conf", b"[Update]\nReadyTimeoutSec=0\n")]) \
        .update_ready_timeout_seconds == 0.0
    for bad in ("infinity", "25h", "soon"):
        with pytest.raises(ConfigInvalid, match=r"^/a\.conf:2: \[Update\] ReadyTimeoutSec="):
            parse_config([("/a.conf", f"[Update]\nReadyTimeoutSec={bad}\n".encode())])


def test_ready_timeout_option_bounds() -> None:
    assert ready_seconds("0") == 0.0 and ready_seconds("86400") == 86400.0
    for bad in ("-1", "nan", "inf", "86401", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="seconds"):
            ready_seconds(bad)


def test_an_image_is_the_running_kernel_only_with_the_same_build() -> None:
    info = ImageInfo("/boot/vmlinuz", "bzImage", "gzip", "2.15",
                     "6.1.0-18-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC "
                     "Debian 6.1.76-1 (2024-02-01)", 1, 1, "elf")
    assert info.uts_version == "#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01)"
    banner = ImageInfo("/boot/Image", "arm64-image", "none", None,
                       "6.1.0 (me@host) (gcc (Debian 12.2.0-14) 12.2.0, GNU ld 2.40) #7 SMP",
                       1, 1, "arm64-image")
    assert banner.uts_version == "#7 SMP"

    class Running:
        release = "6.1.0-18-amd64"
        version = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01)"

    running: Any = Running()
    assert same_build(running, info.release, info.uts_version)
    assert not same_build(running, info.release, "#2 SMP PREEMPT_DYNAMIC Debian 6.1.76-1")
    assert not same_build(running, "6.1.0-19-amd64", info.uts_version)
    assert not same_build(running, info.release, None)   # unreadable: never the same
    running.version = None
    assert not same_build(running, info.release, info.uts_version)


def test_json_keys_are_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in readme, key
