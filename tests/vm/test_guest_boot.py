"""The test guest boots on a real KHO/LUO kernel with kho-agent installed and running.

One cold boot of the cached image (tests/vm/rootfs.py) on the 7.3 build (tests/vm/kernels.py,
or $KHO_AGENT_TEST_KERNEL): the job disk's run script records what systemd, the agent, D-Bus,
polkit and the kernel say, then powers the guest off; the host reads the records back and
checks them. This is the floor under every scenario: if this fails, they all would.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from . import jobdisk, qemu, rootfs

pytestmark = pytest.mark.vm

# Everything the run records goes to out/ on the job disk, one file per question, with the
# exit status of the command beside it (<name>.rc), so a failed command is told apart from an
# empty answer.
RUN_SCRIPT = r"""#!/bin/bash
out=/mnt/job/out
mkdir -p "$out"
rec() {  # rec NAME COMMAND...: stdout+stderr to out/NAME, exit status to out/NAME.rc
    local name=$1; shift
    "$@" >"$out/$name" 2>&1
    echo $? >"$out/$name.rc"
}
if [ "${KHO_TEST_BOOT:-1}" != 1 ]; then
    # Never expected: this job makes one cold boot. Say so and stop.
    echo "KHO-TEST {\"event\":\"unexpected-boot\",\"boot\":$KHO_TEST_BOOT}"
    systemctl poweroff
    exit 0
fi
rec is-system-running systemctl is-system-running --wait
rec failed-units systemctl list-units --failed --plain --no-legend --no-pager
rec agent-active systemctl is-active kho-agent.service
rec agent-status systemctl status --no-pager --full kho-agent.service
rec agent-show systemctl show kho-agent.service -p MainPID -p ExecMainStatus -p NRestarts
rec state busctl --system get-property org.khoagent.Agent1 /org/khoagent/Agent1 \
    org.khoagent.Agent1.Manager State
rec cmdline cat /proc/cmdline
rec liveupdate ls -l /dev/liveupdate
rec status kho-agentctl status --json
rec preflight kho-agentctl preflight --json
rec versions dpkg-query -W systemd python3 python3-gi qemu-system-x86 kho-agent
# The guest's polkit rule: vmm may use sessions (0: authorized) but not manage the update
# (2: authentication required, which nobody can give for a system user).
rec pk-vmm-session runuser -u vmm -- sh -c \
    'exec pkcheck --action-id org.khoagent.Agent1.session --process $$'
rec pk-vmm-manage runuser -u vmm -- sh -c \
    'exec pkcheck --action-id org.khoagent.Agent1.manage --process $$'
rec kexec-default cat /etc/default/kexec
# kho-agent as its Debian package installed it (tests/vm/rootfs.py: dpkg -i in the image)
rec pkg-status dpkg-query -W -f '${Status} ${Version}\n' kho-agent
rec pkg-owner dpkg-query -S /usr/lib/systemd/system/kho-agent.service /usr/bin/kho-agentctl
rec man env MANWIDTH=80 man -P cat kho-agentctl
rec version kho-agentctl --version
rec agent-enabled systemctl is-enabled kho-agent.service
rec agent-unit systemctl show kho-agent.service -p FragmentPath -p DropInPaths
rec digest-alg python3 -c 'import kho_agent.digest as d; print(d.default_algorithm())'
rec pip python3 -m pip --version
rec blake3 dpkg-query -W -f '${Status}\n' python3-blake3
rec agent-journal journalctl -b -u kho-agent.service --no-pager -o short-monotonic
rec journal-warnings journalctl -b -p warning --no-pager -o short-monotonic
echo "KHO-TEST {\"event\":\"checks-done\",\"boot\":1}"
sync
systemctl poweroff
"""

BOOT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_path() -> Path:
    if shutil.which(qemu.QEMU) is None:
        pytest.skip(f"{qemu.QEMU} is not installed (apt-get install "
                    f"{' '.join(qemu.VM_APT_PACKAGES)})")
    try:
        from .kernels import KernelSetupError, primary_kernel
    except ImportError as exc:
        pytest.skip(f"no kernel provider (tests/vm/kernels.py): {exc}")
    try:
        return primary_kernel().path
    except KernelSetupError as exc:
        pytest.skip(f"no KHO/LUO kernel can be had: {exc}")


@pytest.fixture(scope="module", params=list(rootfs.GUESTS))
def guest(request: pytest.FixtureRequest) -> rootfs.GuestRelease:
    return rootfs.GUESTS[request.param]


@pytest.fixture(scope="module")
def booted(kernel_path: Path, guest: rootfs.GuestRelease,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[qemu.GuestRun, Path]:
    work = tmp_path_factory.mktemp(f"guest-boot-{guest.name}")
    image = rootfs.ensure_guest_image(guest.name)
    root = rootfs.scratch_copy(image, work)
    job = work / "job"
    job.mkdir()
    job.chmod(0o755)
    (job / "run").write_text(RUN_SCRIPT)
    (job / "run").chmod(0o755)
    disk = jobdisk.make_job_disk(job, work / "job.img", size_mb=64)
    run = qemu.run_guest(kernel_path, qemu.guest_append(), [root, disk],
                         timeout_s=BOOT_TIMEOUT_S, serial_log=work / "serial.log")
    out = jobdisk.read_job_disk(disk, work / "result")
    print(f"\nguest boot ({guest.name}): {run.accel}, {run.elapsed_s:.1f} s in QEMU; serial log "
          f"{run.serial_log}")
    for frame in run.frames():
        if frame.get("event") == "driver-start":
            print(f"guest boot: test driver started {frame.get('uptime')} s after the kernel")
    return run, out


def _answer(out: Path, name: str) -> tuple[int, str]:
    rc_file = out / "out" / f"{name}.rc"
    if not rc_file.is_file():
        raise AssertionError(f"the guest did not record {name!r}")
    return int(rc_file.read_text()), (out / "out" / name).read_text(errors="replace")


def test_guest_powers_off_after_its_run(booted: tuple[qemu.GuestRun, Path]) -> None:
    run, out = booted
    assert not run.timed_out, run.describe()
    assert not run.panicked, run.describe()
    assert run.powered_off, run.describe()
    events = [f.get("event") for f in run.frames()]
    # the driver's frames and the run's own reached the serial console, in order
    assert events[:1] == ["driver-start"], (events, run.describe())
    assert "checks-done" in events, (events, run.describe())
    assert events.index("driver-start") < events.index("checks-done")
    # the driver's log of this boot is on the job disk, with the run's output in it
    log = (out / "logs" / "boot-1.log").read_text(errors="replace")
    assert "KHO-TEST" in log and "checks-done" in log


def test_no_failed_units(booted: tuple[qemu.GuestRun, Path]) -> None:
    _, out = booted
    rc, running = _answer(out, "is-system-running")
    _, failed = _answer(out, "failed-units")
    assert failed.strip() == "", f"failed units:\n{failed}\n{_answer(out, 'journal-warnings')[1]}"
    assert running.strip() == "running" and rc == 0, running


def test_agent_is_active_and_answers_on_the_bus(booted: tuple[qemu.GuestRun, Path]) -> None:
    _, out = booted
    journal = _answer(out, "agent-journal")[1]
    rc, active = _answer(out, "agent-active")
    assert (rc, active.strip()) == (0, "active"), \
        f"{_answer(out, 'agent-status')[1]}\n--- journal ---\n{journal}"
    rc, state = _answer(out, "state")
    # busctl prints a string property as: s "idle"
    assert rc == 0 and state.startswith('s "'), f"{state}\n--- journal ---\n{journal}"
    rc, status = _answer(out, "status")
    assert rc == 0, status
    report = json.loads(status)["result"]   # the --json envelope's result
    assert report["properties"]["State"] == state.strip()[3:-1]
    restarts = _answer(out, "agent-show")[1]
    assert "NRestarts=0" in restarts, f"{restarts}\n{journal}"


def test_kernel_has_kho_and_luo(booted: tuple[qemu.GuestRun, Path]) -> None:
    _, out = booted
    cmdline = _answer(out, "cmdline")[1].split()
    assert "kho=on" in cmdline and "liveupdate=on" in cmdline
    rc, listing = _answer(out, "liveupdate")
    assert rc == 0 and listing.startswith("c"), listing  # a character device


def test_guest_configuration(booted: tuple[qemu.GuestRun, Path]) -> None:
    _, out = booted
    assert _answer(out, "pk-vmm-session")[0] == 0, _answer(out, "pk-vmm-session")[1]
    rc, text = _answer(out, "pk-vmm-manage")
    assert rc == 2, f"vmm must not be granted manage: pkcheck rc={rc} {text}"
    assert "LOAD_KEXEC=false" in _answer(out, "kexec-default")[1].splitlines()


def test_the_hand_off_mode_is_the_one_the_release_needs(
        booted: tuple[qemu.GuestRun, Path], guest: rootfs.GuestRelease) -> None:
    """bookworm's systemd 252 predates LUO: the agent holds the sessions (direct); sid's 262
    carries them in the fd store, and the image has the drop-in that preflight asks for."""
    _, out = booted
    rc, status = _answer(out, "status")
    assert rc == 0, status
    assert json.loads(status)["result"]["properties"]["HandoffMode"] == guest.handoff
    rc, text = _answer(out, "preflight")
    report = json.loads(text)["result"]
    assert report["handoff_mode"] == guest.handoff, text
    handoff = next(c for c in report["checks"] if c["name"] == "handoff")
    assert handoff["tier"] == "ok", handoff
    print(f"\n{guest.name}: {_answer(out, 'versions')[1].strip()}")


def test_the_agent_is_the_debian_package(booted: tuple[qemu.GuestRun, Path],
                                         guest: rootfs.GuestRelease) -> None:
    """The image installed the .deb built from this checkout (no pip on the guest): dpkg owns
    the CLI and the unit, the package's postinst enabled the service (and linked the fdstore
    drop-in where systemd is 261 or newer), its man page renders, and the agent digests with
    what the release has (python3-blake3 in sid, SHA-256 on bookworm)."""
    _, out = booted
    rc, status = _answer(out, "pkg-status")
    assert rc == 0 and status.startswith("install ok installed "), status
    version = status.split()[-1]
    rc, owners = _answer(out, "pkg-owner")
    assert rc == 0, owners
    assert [line.split(":")[0] for line in owners.splitlines()] == ["kho-agent"] * 2, owners
    rc, text = _answer(out, "version")
    assert rc == 0 and text.splitlines()[0] == f"kho-agentctl {version}", text
    rc, page = _answer(out, "man")
    assert rc == 0, page
    page = re.sub(".\x08", "", page)  # overstrike (bold, underline), if man kept it
    assert "NAME" in page and "kho-agentctl" in page.split("NAME", 1)[1][:200], page[:500]
    assert "SYNOPSIS" in page, page[:500]
    assert _answer(out, "agent-enabled") == (0, "enabled\n")
    unit = dict(line.split("=", 1) for line in _answer(out, "agent-unit")[1].splitlines())
    # the package's unit, not a copy in /etc (bookworm's split-/usr systemd 252 finds it
    # through /lib, which merged /usr makes the same file)
    assert unit["FragmentPath"] in ("/usr/lib/systemd/system/kho-agent.service",
                                    "/lib/systemd/system/kho-agent.service"), unit
    dropin = "/etc/systemd/system/kho-agent.service.d/fdstore.conf"
    assert (dropin in unit["DropInPaths"].split()) == (guest.handoff == "fdstore"), unit
    assert _answer(out, "digest-alg") == (0, guest.digest_alg + "\n")
    blake3_installed = _answer(out, "blake3")[1].startswith("install ok installed")
    assert blake3_installed == (guest.digest_alg == "blake3")
    rc, pip = _answer(out, "pip")
    assert rc != 0 and "No module named pip" in pip, pip
