"""The fleet (tests/vm/fleet.py): QEMU guests of this host reachable over SSH, for Ansible
(issue 16, section 3).

The tests marked `vm` and `extended` boot three guests on the primary kernel under whatever
accelerator the machine has (TCG here) and take minutes; the others check the fleet's pure
parts and the image recipe's network and SSH pieces without a guest. The rolling live update
across the fleet plays packaging/ansible's rolling_update (the collection from this checkout)
against guests that start on the 7.2 KHO kernel (a build when cold) with the 7.3 kernel
installed as their target.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ansiblerig import COLLECTION, link_collection, recap

from . import fleet, kernels, qemu, rootfs
from .guestssh import SshTarget
from .test_scenarios import _kernel, workload_ok

# --- without a guest --------------------------------------------------------------------------


def _hosts(tmp_path: Path) -> list[tuple[str, SshTarget]]:
    key = tmp_path / "id_ed25519"
    return [(fleet.guest_name(i), SshTarget(port, key))
            for i, port in enumerate(qemu.free_ports(3), 1)]


@pytest.mark.skipif(shutil.which("ansible-inventory") is None,
                    reason="ansible-inventory (ansible-core) is not installed")
def test_ansible_reads_the_inventory_as_written(tmp_path: Path) -> None:
    """Ansible's own parser: every guest on 127.0.0.1 at its own port, as root with the key,
    no host-key checks, the guest's python3."""
    hosts = _hosts(tmp_path)
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(fleet.inventory_text(hosts))
    proc = subprocess.run(["ansible-inventory", "-i", str(inventory), "--list"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert sorted(listed[fleet.GROUP]["hosts"]) == [name for name, _ in hosts]
    for name, target in hosts:
        hostvars = listed["_meta"]["hostvars"][name]
        assert (hostvars["ansible_host"], hostvars["ansible_port"], hostvars["ansible_user"]) \
            == ("127.0.0.1", target.port, "root"), hostvars
        assert hostvars["ansible_ssh_private_key_file"] == str(target.key)
        args = hostvars["ansible_ssh_common_args"].split()
        assert "StrictHostKeyChecking=no" in args and "UserKnownHostsFile=/dev/null" in args
        assert hostvars["ansible_python_interpreter"] == "/usr/bin/python3"


def test_one_inventory_takes_one_key(tmp_path: Path) -> None:
    (name, target), *_others = _hosts(tmp_path)
    other = SshTarget(target.port, tmp_path / "another_key")
    with pytest.raises(ValueError, match="share one key"):
        fleet.inventory_text([(name, target), (fleet.guest_name(9), other)])


def test_the_ports_are_distinct_and_free() -> None:
    ports = qemu.free_ports(8)
    assert len(set(ports)) == 8
    args = qemu.user_network(ports[0])
    assert args[0] == "-nic"
    assert f"hostfwd=tcp:127.0.0.1:{ports[0]}-:22" in args[1].split(",")
    assert "restrict=on" in args[1].split(",")


def test_ssh_never_prompts_and_checks_no_host_key(tmp_path: Path) -> None:
    target = SshTarget(2222, tmp_path / "key")
    argv = target.argv("kho-agentctl status --json")
    assert argv[0] == "ssh" and argv[-2:] == ["root@127.0.0.1", "kho-agentctl status --json"]
    options = {argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"}
    assert {"BatchMode=yes", "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null"} <= options
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == str(target.key)
    script = tmp_path / "ssh"
    script.write_text(target.script())
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0


def test_the_banner_probe_tells_an_sshd_from_a_closed_or_silent_port(tmp_path: Path) -> None:
    """What QEMU's forwarding looks like before the guest's sshd listens (accepted, then
    closed) against an sshd's first line; a port nobody listens on is refused."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(2)
        target = SshTarget(server.getsockname()[1], tmp_path / "key")

        def answer(greeting: bytes) -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(greeting)

        for greeting, expected in ((b"", None), (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
                                                  "SSH-2.0-OpenSSH_9.2p1 Debian-2")):
            thread = threading.Thread(target=answer, args=(greeting,))
            thread.start()
            assert target.banner() == expected
            thread.join()
    assert SshTarget(qemu.free_ports(1)[0], tmp_path / "key").banner() is None


def test_the_guest_command_line_turns_ssh_on_and_names_the_guest() -> None:
    words = fleet.cmdline(fleet.guest_name(2), "loglevel=7").split()
    assert rootfs.FLEET_CMDLINE in words and "systemd.hostname=kho-fleet-2" in words
    assert {"kho=on", "liveupdate=on"} <= set(words) and words[-1] == "loglevel=7"


def test_the_spec_installs_the_target_only_when_asked() -> None:
    target = fleet.TargetImage.from_vmlinuz(Path("/x/vmlinuz-7.2.13+deb14-amd64"))
    assert target.release == "7.2.13+deb14-amd64"
    assert fleet.fleet_spec(target) == {"kind": "fleet", "big_mib": fleet.BIG_MIB,
                                        "target": "kernels/target",
                                        "target_release": "7.2.13+deb14-amd64"}
    assert "target_release" not in fleet.fleet_spec(target, install_target=False)
    assert fleet.fleet_spec(None) == {"kind": "fleet", "big_mib": fleet.BIG_MIB}
    with pytest.raises(ValueError, match="vmlinuz-<release>"):
        fleet.TargetImage.from_vmlinuz(Path("/boot/bzImage"))


def test_a_boot_ends_with_its_driver_exit_frame() -> None:
    frames: list[dict[str, Any]] = [
        {"event": "driver-start", "boot": 1}, {"event": "step", "boot": 1, "step": "x"},
        {"event": "driver-exit", "boot": 1, "status": 0},
        {"event": "driver-start", "boot": 2}, {"event": "driver-exit", "boot": "2"},
    ]
    assert fleet.boot_ends(frames) == {1: frames[2]}


def test_the_fleet_units_start_only_when_the_command_line_asks(tmp_path: Path) -> None:
    """sshd and networkd carry a condition on kho_test.ssh=1 (the other scenarios boot without
    a NIC, and their timings must not pay for them); a masked unit would ignore it, and the
    wait for "online" stays masked: nothing in the fleet waits for it."""
    rootfs.configure_fleet_access(tmp_path)
    for unit in ("ssh.service", "systemd-networkd.service"):
        assert unit not in rootfs.MASKED_UNITS
        dropin = tmp_path / f"etc/systemd/system/{unit}.d/kho-test-fleet.conf"
        assert f"ConditionKernelCommandLine={rootfs.FLEET_CMDLINE}" in dropin.read_text()
    assert "systemd-networkd-wait-online.service" in rootfs.MASKED_UNITS
    network = (tmp_path / "etc/systemd/network/20-kho-test-dhcp.network").read_text()
    assert "DHCP=ipv4" in network
    for release in rootfs.GUESTS.values():
        assert {"openssh-server", "openssh-sftp-server"} <= set(release.packages), release.name


# --- three guests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def primary() -> kernels.KernelImage:
    for tool in ("ssh", "ansible"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed "
                        f"(apt-get install {' '.join(qemu.VM_APT_PACKAGES)})")
    return _kernel(kernels.PRIMARY_SERIES)


def _json(guest: fleet.FleetGuest, command: str) -> dict[str, Any]:
    proc = guest.run(command)
    assert proc.returncode == 0, f"{guest.name}: {command}: {proc.stdout}{proc.stderr}"
    document: dict[str, Any] = json.loads(proc.stdout)["result"]
    return document


@pytest.mark.vm
@pytest.mark.extended
def test_three_guests_answer_ansible_and_come_back_after_a_live_update(
        tmp_path: Path, primary: kernels.KernelImage) -> None:
    """Three guests on the primary kernel, each with its workload's session preserved and the
    target in /boot: Ansible reaches all three; one of them live updates (started over SSH,
    as a fleet tool would), and comes back on the same port with its workload checked."""
    with fleet.running_fleet(tmp_path, primary, count=3, target=primary) as running:
        pong = running.ansible("all", "ansible.builtin.ping", "", "-o")
        assert pong.returncode == 0, pong.stdout + pong.stderr
        for guest in running.guests:
            line = next(ln for ln in pong.stdout.splitlines() if ln.startswith(guest.name))
            assert "SUCCESS" in line and '"ping": "pong"' in line, pong.stdout
            # three machines, not one three times: each port leads to its own guest
            assert guest.run("hostname").stdout.strip() == guest.name
            status = _json(guest, "kho-agentctl status --json")
            assert status["properties"]["State"] == "idle", status
            sessions = {s["name"]: s for s in status["sessions"]}
            assert sessions["vm-1"]["ready"] is True, sessions
            assert guest.run(f"test -f /boot/vmlinuz-{primary.release}").returncode == 0

        first = running.guests[0]
        # the commit ends the SSH session with the kernel: run it detached, as a unit
        update_start = time.monotonic()
        started = first.run(f"kho-agentctl prepare --kernel /boot/vmlinuz-{primary.release} "
                            "&& systemd-run --unit kho-fleet-commit kho-agentctl commit")
        assert started.returncode == 0, started.stdout + started.stderr
        ended = first.wait_for_boot(2)
        assert ended["status"] == 0, first.vm.describe()
        update_s = time.monotonic() - update_start
        after = _json(first, "kho-agentctl status --json")
        assert after["properties"]["State"] == "verified", after
        again = running.ansible(first.name, "ansible.builtin.ping", "", "-o")
        assert again.returncode == 0, again.stdout + again.stderr
        measured = running.measurements()

    print(f"\nfleet: {json.dumps(measured)}\nfleet: {first.name}'s live update, prepare "
          f"over SSH to the end of boot 2's checks: {update_s:.1f} s")
    for name, run in running.results.items():
        assert not run.runs[0].timed_out and run.runs[0].powered_off, run.runs[0].describe()
        workload_ok(run, 1, "workload-preserve-vm-1")
        facts = run.facts(1)
        assert (facts["ended_with"], facts["ready_State"]) == ("staying-up", "idle"), name
        assert facts["installed_target_image"] == f"/boot/vmlinuz-{primary.release}"
    updated = running.results[first.name]
    facts = updated.facts(2)
    assert facts["verify_state"] == "verified", updated.describe()
    assert facts["after_LiveUpdateNumber"] == updated.facts(1)["start_LiveUpdateNumber"] + 1
    assert facts["after_boot_id"] != updated.facts(1)["start_boot_id"]
    report = workload_ok(updated, 2, "workload-check-vm-1")
    assert report["bytes_checked"] > fleet.BIG_MIB << 20
    workload_ok(updated, 2, "workload-preserve-vm-2")
    assert facts["ended_with"] == "staying-up"
    for name in (g.name for g in running.guests[1:]):
        assert sorted(running.results[name].boots) == [1], name  # the others were not touched


ROLLING = COLLECTION / "playbooks" / "rolling_update.yml"


@pytest.fixture
def collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collection where ansible finds it: this checkout's packaging/ansible."""
    monkeypatch.setenv("ANSIBLE_COLLECTIONS_PATH", str(link_collection(tmp_path)))


def _play(running: fleet.Fleet, *extra: str) -> subprocess.CompletedProcess[str]:
    return running.playbook(ROLLING, *extra,
                            extra_vars={"kho_hosts": fleet.GROUP, "kho_serial": 1})


@pytest.mark.vm
@pytest.mark.extended
def test_a_rolling_live_update_across_the_fleet(tmp_path: Path, primary: kernels.KernelImage,
                                                collection: None) -> None:
    """Issue 16, section 3: three guests on the 7.2 KHO kernel, each with its workload's
    session preserved and the 7.3 kernel installed in /boot, the agent configured with
    Target=newest-compatible. The rolling play (serial 1) updates all three through the KHO
    path, every byte checked; check mode and a second run change nothing."""
    start = _kernel("7.2")
    with fleet.running_fleet(tmp_path, start, count=3, target=primary,
                             agent_target="newest-compatible") as running:
        checked = _play(running, "--check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert all(r["changed"] == 0 and r["failed"] == 0
                   for r in recap(checked.stdout).values()), checked.stdout
        assert len(recap(checked.stdout)) == 3, checked.stdout
        for guest in running.guests:   # check mode prepared nothing
            assert _json(guest, "kho-agentctl status --json")["properties"]["State"] == "idle"

        began = time.monotonic()
        rolled = _play(running)
        rolled_s = time.monotonic() - began
        assert rolled.returncode == 0, rolled.stdout[-6000:] + rolled.stderr[-3000:]
        rows = recap(rolled.stdout)
        assert sorted(rows) == [g.name for g in running.guests], rolled.stdout
        assert all(r["failed"] == 0 and r["changed"] >= 1 for r in rows.values()), rows
        for guest in running.guests:
            guest.wait_for_boot(2)     # boot 2's checks of what boot 1 preserved
            assert guest.run("uname -r").stdout.strip() == primary.release

        began = time.monotonic()
        again = _play(running)
        again_s = time.monotonic() - began
        assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-3000:]
        assert all(r["changed"] == 0 and r["failed"] == 0
                   for r in recap(again.stdout).values()), again.stdout
        assert "up to date" in again.stdout
        measured = running.measurements()

    print(f"\nfleet roll: 3 hosts, serial 1: {rolled_s:.1f} s ({rolled_s / 3:.1f} s a host); "
          f"the second run: {again_s:.1f} s; {json.dumps(measured)}")
    for name, run in running.results.items():
        before, after = run.facts(1), run.facts(2)
        assert before["start_release"] == start.release, name
        assert after["after_release"] == primary.release, name
        assert after["after_incoming_kho"] is True, name
        assert after["verify_state"] == "verified", run.describe()
        assert after["after_LiveUpdateNumber"] == before["start_LiveUpdateNumber"] + 1, name
        report = workload_ok(run, 2, "workload-check-vm-1")
        assert report["bytes_checked"] > fleet.BIG_MIB << 20, name
        assert sorted(run.boots) == [1, 2], name     # one kexec each, no cold reboot


@pytest.mark.vm
@pytest.mark.extended
def test_a_failing_host_stops_the_rollout_and_is_left_as_it_was(
        tmp_path: Path, primary: kernels.KernelImage, collection: None) -> None:
    """The second host's target is Debian's stock kernel, without KHO: the first host updates,
    the second refuses before anything changes (its workload still runs in the old kernel),
    and the rollout stops there: the third host is never touched."""
    start = _kernel("7.2")
    stock = fleet.TargetImage.from_vmlinuz(kernels.ensure_stock_debian_kernel())
    bad = fleet.guest_name(2)
    with fleet.running_fleet(tmp_path, start, count=3, target=primary, targets={bad: stock},
                             agent_target="newest-compatible",
                             agent_targets={bad: f"/boot/vmlinuz-{stock.release}"}) as running:
        rolled = _play(running)
        assert rolled.returncode != 0, rolled.stdout[-6000:]
        rows = recap(rolled.stdout)
        first, third = fleet.guest_name(1), fleet.guest_name(3)
        assert rows[first]["failed"] == 0 and rows[first]["changed"] >= 1, rows
        assert rows[bad]["failed"] == 1, rows
        assert third not in rows or rows[third]["ok"] == 0, rows
        # the play says which host failed, with the agent's error name
        assert re.search(rf"{bad}: kho-agent refuses the update: PreflightFailed", rolled.stdout), \
            rolled.stdout[-6000:]
        running.guest(first).wait_for_boot(2)
        for name in (bad, third):
            guest = running.guest(name)
            assert guest.run("uname -r").stdout.strip() == start.release, name
            status = _json(guest, "kho-agentctl status --json")
            assert status["properties"]["State"] == "idle", (name, status)
            assert [s["name"] for s in status["sessions"]] == ["vm-1"], (name, status)
            assert guest.run("cat /sys/kernel/kexec_loaded").stdout.strip() == "0", name
            history = _json(guest, "kho-agentctl history --json")
            assert history["entries"] == [], (name, history)   # no attempt was made
    for name in (bad, third):
        assert sorted(running.results[name].boots) == [1], name
    assert sorted(running.results[first].boots) == [1, 2]
    assert running.results[first].facts(2)["verify_state"] == "verified"
