#!/usr/bin/python3
"""The scenario runner inside the test guest: /mnt/job/run, started on every boot by
kho-test-driver.service (tests/vm/guest) with KHO_TEST_BOOT=<n> (1 = the cold boot).

It reads /mnt/job/scenario.json, does what the scenario asks of boot n, writes what it saw to
/mnt/job/out/boot-<n>.json (plus raw KHO blobs under /mnt/job/out/boot-<n>/), and ends the boot
itself: through kho-agentctl commit (a live update), systemctl reboot, or systemctl poweroff.
The host reads the job disk after QEMU exits (tests/vm/scenarios.py); it never guesses timing:
every wait here is for a condition, bounded, and a bound that runs out is recorded as such.

Scenario keys: updates (live updates in a row), target (kernel image on the job disk),
refuse_target (an image prepare must refuse first), capture (copy the KHO blobs), scratch
("auto": prepare with the recommended kho_scratch=), cancel (prepare, cancel, reboot cold),
kill (SIGKILL the agent after prepare), without_fdstore_dropin (remove the drop-in of hand-off
mode fdstore at the first boot, before anything else), keeper (a VM manager unit that keeps its
own fds in its own fd store, tests/vm/jobs/keeper.py, beside the workload), scratch_probe (on
every boot of "updates", after the sessions of the previous one were checked and finished:
record the scratch areas and memblock/reserved, and what kho-agentctl scratch and preflight
say about the next update), upgrade (a .deb on the job disk: `dpkg -i` it while the update is
prepared, as an unattended upgrade of the package would, and record whether the daemon and the
update were left alone).

Scenario kind "fleet" (tests/vm/fleet.py) is the one that does not end its boots: something
outside (Ansible over SSH) does the live update, and the guest stays up for it. Boot 1 installs
the target kernel in /boot (target, target_release) and preserves the workload's session vm-1;
every later boot (after a kexec the fleet tool caused) checks what the previous one preserved as
"updates" does (verification, every byte of vm-<n-1>) and preserves vm-<n> for the next update.
The host reads each boot's end from the driver-exit frame on the serial console.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

JOB = Path(os.environ.get("KHO_TEST_JOB", "/mnt/job"))
BOOT = int(os.environ.get("KHO_TEST_BOOT", "1"))
OUT = JOB / "out"
WORKLOAD = JOB / "workload.py"
DEBUGFS_KHO = Path("/sys/kernel/debug/kho")
# only with CONFIG_ARCH_KEEP_MEMBLOCK (arm64, not x86): the planner estimates without it
MEMBLOCK_RESERVED = Path("/sys/kernel/debug/memblock/reserved")
BUS = ("org.khoagent.Agent1", "/org/khoagent/Agent1", "org.khoagent.Agent1.Manager")


class Boot:
    """What this boot saw, written to out/boot-<n>.json after every step (a boot that ends
    abruptly still leaves what it had)."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"boot": BOOT, "steps": [], "facts": {}}
        OUT.mkdir(parents=True, exist_ok=True)
        self.dir = OUT / f"boot-{BOOT}"
        self.dir.mkdir(exist_ok=True)
        self.dir.chmod(0o777)  # the workload runs as vmm and writes its report here

    def save(self) -> None:
        path = OUT / f"boot-{BOOT}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, path)
        os.sync()

    def fact(self, key: str, value: Any) -> Any:
        self.record["facts"][key] = value
        self.save()
        return value

    def run(self, name: str, argv: list[str], timeout: float = 900) -> dict[str, Any]:
        start = time.monotonic()
        print(f"KHO-TEST {json.dumps({'event': 'step', 'boot': BOOT, 'step': name})}",
              flush=True)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  check=False)
            step = {"name": name, "argv": argv, "rc": proc.returncode,
                    "stdout": proc.stdout[-20000:], "stderr": proc.stderr[-20000:]}
        except subprocess.TimeoutExpired:
            step = {"name": name, "argv": argv, "rc": None, "stdout": "",
                    "stderr": f"timed out after {timeout} s"}
        step["seconds"] = round(time.monotonic() - start, 3)
        self.record["steps"].append(step)
        self.save()
        return step

    def ctl(self, name: str, *args: str, timeout: float = 900) -> dict[str, Any]:
        step = self.run(name, ["kho-agentctl", *args, "--json"], timeout)
        # the envelope (schema/kho-agentctl-v1.schema.json) as it came, and as "json" what the
        # readers want: the command's document, or on failure the error's
        try:
            doc = json.loads(step["stdout"]) if step["stdout"].strip() else None
        except json.JSONDecodeError:
            doc = None
        step["envelope"] = doc
        step["json"] = (doc["result"] if doc["error"] is None else doc["error"]) \
            if isinstance(doc, dict) and "schema" in doc else doc
        self.save()
        return step

    def workload(self, command: str, session: str) -> dict[str, Any]:
        report = self.dir / f"workload-{command}-{session}.json"
        big = str(self.record["facts"]["scenario"].get("big_mib", 256))
        step = self.run(f"workload-{command}-{session}",
                        ["runuser", "-u", "vmm", "--", "python3", str(WORKLOAD), command,
                         session, str(report), big])
        step["report"] = json.loads(report.read_text()) if report.exists() else None
        self.save()
        return step


def bus_prop(target: tuple[str, str, str], name: str) -> Any:
    """A property on the system bus (service, object, interface); None where it cannot be read
    (no such service or property)."""
    proc = subprocess.run(["busctl", "--system", "--json=short", "get-property", *target, name],
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)["data"]


def prop(name: str) -> Any:
    return bus_prop(BUS, name)


def wait_state(boot: Boot, states: tuple[str, ...], timeout: float) -> str | None:
    """Wait until the agent's State is one of `states` (the agent verifies on its own after a
    live update: this waits for that to end)."""
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    state = None
    while time.monotonic() < deadline:
        state = prop("State")
        if state is None and unit_state() == "failed":
            boot.fact(f"wait_for_{'_'.join(states)}_agent_failed", True)
            return None
        if state in states:
            boot.fact(f"waited_for_{'_'.join(states)}_s", round(time.monotonic() - start, 2))
            return str(state)
        time.sleep(0.5)
    boot.fact(f"wait_for_{'_'.join(states)}_timed_out", {"last_state": state,
                                                          "timeout": timeout})
    return None


def unit_state() -> str:
    return subprocess.run(["systemctl", "show", "-P", "ActiveState", "kho-agent.service"],
                          capture_output=True, text=True, check=False).stdout.strip()


def agent_pid() -> int | None:
    proc = subprocess.run(["systemctl", "show", "-P", "MainPID", "kho-agent.service"],
                          capture_output=True, text=True, check=False)
    pid = int(proc.stdout.strip() or 0)
    return pid or None


def agent_fds() -> list[str]:
    pid = agent_pid()
    if pid is None:
        return []
    out = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(os.readlink(entry))
        except OSError:
            continue
    return sorted(out)


def capture(boot: Boot, side: str) -> None:
    """The raw KHO blobs of one side, and what our decoder reads of the live state."""
    src = DEBUGFS_KHO / side
    dest = boot.dir / f"kho-{side}"
    listing = []
    if src.is_dir():
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            listing.append(str(rel))
            if path.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    (dest / rel).write_bytes(path.read_bytes())
                except OSError as exc:
                    boot.fact(f"copy_error_{side}_{rel}", str(exc))
    boot.fact(f"kho_{side}_files", listing)
    args = ["decode", "--live"] + (["--in"] if side == "in" else [])
    step = boot.ctl(f"decode-{side}", *args)
    (boot.dir / f"decode-{side}.json").write_text(step["stdout"])


SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
           "org.freedesktop.systemd1.Manager")




def host_facts(boot: Boot, prefix: str) -> None:
    boot.fact(f"{prefix}_cmdline", Path("/proc/cmdline").read_text().strip())
    boot.fact(f"{prefix}_release", os.uname().release)
    boot.fact(f"{prefix}_kexec_loaded", Path("/sys/kernel/kexec_loaded").read_text().strip())
    boot.fact(f"{prefix}_boot_id", Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    for name in ("State", "LiveUpdateNumber", "LastResult", "RunningKernel", "HandoffMode"):
        boot.fact(f"{prefix}_{name}", prop(name))
    boot.fact(f"{prefix}_incoming_kho", (DEBUGFS_KHO / "in").is_dir())
    # systemd >= 262 counts the kexecs it carried its state through (None before that); the
    # property's name as this systemd spells it
    for name in ("KExecsCount", "KExecCount"):
        value = bus_prop(SYSTEMD, name)
        if value is not None:
            boot.fact(f"{prefix}_systemd_kexecs", {"property": name, "value": value})
            break
    else:
        boot.fact(f"{prefix}_systemd_kexecs", None)


def end(boot: Boot, how: str) -> int:
    boot.fact("ended_with", how)
    argv = {"poweroff": ["systemctl", "poweroff"], "reboot": ["systemctl", "reboot"]}[how]
    subprocess.run(argv, check=False)
    return 0


def live_update(boot: Boot, spec: dict[str, Any], session: str) -> int:
    """Preserve, prepare and commit: the boot ends in the kexec (or poweroff if it fails)."""
    if spec.get("keeper") and BOOT == 1:
        start_keeper(boot, "keeper-start")
    boot.workload("preserve", session)
    target = str(JOB / spec["target"])
    args = ["prepare", "--kernel", target]
    if spec.get("scratch"):
        boot.ctl("scratch-plan", "scratch", "--kernel", target)
        args += ["--scratch", spec["scratch"]]
    prepared = boot.ctl("prepare", *args)
    if prepared["rc"] != 0:
        return end(boot, "poweroff")
    if spec.get("capture"):
        capture(boot, "out")
    if spec.get("upgrade") and BOOT == 1:
        upgrade_while_prepared(boot, JOB / spec["upgrade"])
    boot.fact("before_commit_fds", agent_fds())
    # A successful commit ends this boot (systemctl kexec stops this unit) before the step's
    # record is written: the next boot is the proof.
    committed = boot.ctl("commit", "commit")
    boot.fact("commit_rc", committed["rc"])
    if committed["rc"] != 0:
        return end(boot, "poweroff")
    # systemctl kexec is under way: this unit is stopped with the rest
    return 0


def upgrade_while_prepared(boot: Boot, deb: Path) -> None:
    """The package upgraded under the prepared update (a reinstall runs the same maintainer
    scripts: prerm upgrade, postinst configure with the old version): the daemon must keep its
    pid, its state and its session fds."""
    boot.fact("upgrade_before", {"pid": agent_pid(), "state": prop("State"),
                                 "fds": agent_fds()})
    boot.run("upgrade", ["env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "-i", str(deb)],
             timeout=600)
    boot.fact("upgrade_after", {"pid": agent_pid(), "state": prop("State"),
                                "fds": agent_fds(), "unit": unit_state()})


def after_update(boot: Boot, spec: dict[str, Any], session: str) -> None:
    state = wait_state(boot, ("verified", "failed"), timeout=600)
    boot.fact("verify_state", state)
    host_facts(boot, "after")
    if spec.get("keeper") and BOOT == 2:
        start_keeper(boot, "keeper-resume")
    if spec.get("capture") or spec.get("scratch"):
        capture(boot, "in")
        capture(boot, "out")
        boot.run("dmesg-kho", ["sh", "-c", "dmesg | grep -iE 'KHO|liveupdate|LUO|scratch'"])
    report = Path("/var/lib/kho-agent/last-verify.json")
    if report.exists():  # the agent's full verification report, item by item
        (boot.dir / "last-verify.json").write_bytes(report.read_bytes())
    manifest = Path("/var/lib/kho-agent/manifest.json")
    if manifest.exists():  # what the agent recorded before the kexec, the network included
        (boot.dir / "manifest.json").write_bytes(manifest.read_bytes())
    boot.run("verified-target", ["systemctl", "is-active", "kho-agent-verified.target"])
    boot.workload("check", session)
    boot.ctl("status", "status")


def scratch(boot: Boot, spec: dict[str, Any]) -> int:
    """A kernel that boots through KHO inherits its scratch areas, so a kho_scratch= plan counts
    at a cold boot: boot 1 (cold, kernel defaults) computes the plan and asks the host for a cold
    boot with it; boot 2 (cold, with the plan) records the areas the kernel reserved and live
    updates; boot 3 (through KHO) records the areas it inherited."""
    if BOOT == 1:
        plan = boot.ctl("scratch-plan", "scratch", "--kernel", str(JOB / spec["target"]))
        form = (plan.get("json") or {}).get("plan", {}).get("absolute_form")
        if form:
            (OUT / "next-append").write_text(f"{form}\n")  # "kho_scratch=..."
        capture(boot, "out")
        return end(boot, "poweroff")
    if BOOT == 2:
        capture(boot, "out")
        boot.run("dmesg-kho", ["sh", "-c", "dmesg | grep -iE 'KHO|scratch'"])
        return live_update(boot, spec, "vm-1")
    after_update(boot, spec, "vm-1")
    return end(boot, "poweroff")


def install_target(boot: Boot, spec: dict[str, Any]) -> None:
    """The target kernel where a kernel package puts it, /boot/vmlinuz-<release>, so that the
    agent can pick it (its newest installed kernel) as an update of the host's would."""
    if not spec.get("target") or not spec.get("target_release"):
        return
    image = Path(f"/boot/vmlinuz-{spec['target_release']}")
    if not image.exists():
        shutil.copy(JOB / spec["target"], image)
    boot.fact("installed_target_image", str(image))


def configure_agent(boot: Boot, spec: dict[str, Any]) -> None:
    """The agent's configuration as the host's installation set it (a drop-in), applied by a
    restart while it holds nothing yet."""
    if not spec.get("agent_conf"):
        return
    dropin = Path("/etc/kho-agent/agent.conf.d/50-fleet-test.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(spec["agent_conf"])
    boot.run("agent-configure", ["systemctl", "restart", "kho-agent.service"])
    wait_state(boot, ("idle",), 120)
    boot.fact("agent_conf", spec["agent_conf"])


def fleet(boot: Boot, spec: dict[str, Any]) -> int:
    """One boot of a fleet guest: check what the previous boot preserved (after the kexec the
    fleet tool caused), preserve this boot's session, and return without ending the boot."""
    if BOOT == 1:
        install_target(boot, spec)
        configure_agent(boot, spec)
    else:
        after_update(boot, spec, f"vm-{BOOT - 1}")
    boot.workload("preserve", f"vm-{BOOT}")
    host_facts(boot, "ready")
    # kho-test-driver frames driver-exit and leaves the guest running (nothing here powers off)
    boot.fact("ended_with", "staying-up")
    return 0


def scratch_probe(boot: Boot, spec: dict[str, Any]) -> None:
    """What the next live update has to fit into on this boot, and what the planner says: the
    scratch areas (a KHO boot inherits them unchanged), the reservations the kernel lists (with
    any preserved memory that came in), the scratch plan and the preflight for the target."""
    for name in ("scratch_phys", "scratch_len"):
        path = DEBUGFS_KHO / "out" / name
        boot.fact(f"kho_{name}", [int(x, 16) for x in path.read_text().split()]
                  if path.exists() else None)
    boot.fact("memblock_reserved", MEMBLOCK_RESERVED.read_text()
              if MEMBLOCK_RESERVED.exists() else None)
    target = str(JOB / spec["target"])
    boot.ctl("scratch-probe", "scratch", "--kernel", target)
    boot.ctl("preflight-probe", "preflight", "--kernel", target)


RTC_RD_TIME = 0x80247009  # _IOR('p', 0x09, struct rtc_time): nine ints


def rtc_offset() -> dict[str, float]:
    """CLOCK_REALTIME minus the RTC, measured at an RTC second edge (to the poll interval).
    QEMU's RTC follows the host's clock in every kernel, so realtime stamps taken in two
    kernels become comparable once each is corrected by its own kernel's offset."""
    import calendar
    import fcntl
    import struct
    fd = os.open("/dev/rtc0", os.O_RDONLY)
    try:
        def read() -> tuple[int, ...]:
            raw = fcntl.ioctl(fd, RTC_RD_TIME, bytes(36))
            return struct.unpack("9i", raw)
        first = read()
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            now = read()
            realtime = time.clock_gettime(time.CLOCK_REALTIME)
            if now[0] != first[0]:
                sec, minute, hour, mday, mon, year = now[:6]
                rtc = calendar.timegm((year + 1900, mon + 1, mday, hour, minute, sec))
                return {"offset_s": realtime - rtc, "polls_until": realtime}
        raise TimeoutError("the RTC did not tick in 2.5 s")
    finally:
        os.close(fd)


def vmm(boot: Boot, command: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    """The real VM manager (vmm_qemu.py), as vmm; its directory per boot on the job disk."""
    directory = boot.dir / "vmm"
    step = boot.run(f"vmm-{command}", ["runuser", "-u", "vmm", "--", "python3",
                                       str(JOB / "vmm_qemu.py"), command, str(directory),
                                       *args], timeout)
    try:
        step["json"] = json.loads(step["stdout"].strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        step["json"] = None
    boot.save()
    return step


def kmsg(text: str) -> None:
    """A line on the console with the kernel's timestamp (printk time of this kernel)."""
    with open("/dev/kmsg", "w") as handle:
        handle.write(f"<4>kho-test: {text}\n")


def qemu_vm(boot: Boot, spec: dict[str, Any]) -> int:
    """A real QEMU VM (256 MiB by default) through a live update: boot 1 runs it, prepares,
    suspends it into the session and commits; boot 2 resumes it as soon as its session can be
    retrieved, then waits for the agent's verification. With "cold": boot 2 then saves the
    same VM whole to disk and reboots cold (QEMU exits, the host starts it again); boot 3
    restores it: the classic alternative's blackout, for comparison."""
    session = "vm-qemu"
    payload = str(JOB / "count.bin")
    boot.fact("rtc", rtc_offset())
    if BOOT == 1:
        (boot.dir / "vmm").mkdir(exist_ok=True)
        (boot.dir / "vmm").chmod(0o777)
        launched = vmm(boot, "launch", session, str(spec.get("ram_mib", 256)), payload)
        if not (launched["json"] or {}).get("ok"):
            return end(boot, "poweroff")
        prepared = boot.ctl("prepare", "prepare", "--kernel", str(JOB / spec["target"]))
        if prepared["rc"] != 0:
            return end(boot, "poweroff")
        suspended = vmm(boot, "suspend")
        if not (suspended["json"] or {}).get("ok"):
            return end(boot, "poweroff")
        boot.fact("commit_called", {"realtime": time.clock_gettime(time.CLOCK_REALTIME)})
        kmsg("commit called")
        committed = boot.ctl("commit", "commit")
        boot.fact("commit_rc", committed["rc"])
        if committed["rc"] != 0:
            vmm(boot, "resume-in-place")
        return end(boot, "poweroff") if committed["rc"] != 0 else 0
    # boot 2: the agent answers; the manager waits until its session can be retrieved
    (boot.dir / "vmm").mkdir(exist_ok=True)
    (boot.dir / "vmm").chmod(0o777)
    image = "/var/lib/vmm-test/vm.img"   # the cold path's saved VM, on the root disk
    if BOOT == 3:  # after the cold reboot: the classic alternative's restore
        vmm(boot, "cold-restore", image, str(spec.get("ram_mib", 256)), payload)
        return end(boot, "poweroff")
    boot.fact("agent_started", agent_start())
    cold = bool(spec.get("cold"))
    vmm(boot, "resume", session, payload, *(["--keep-running"] if cold else []))
    state = wait_state(boot, ("verified", "failed"), timeout=600)
    boot.fact("verify_state", state)
    host_facts(boot, "after")
    report = Path("/var/lib/kho-agent/last-verify.json")
    if report.exists():
        (boot.dir / "last-verify.json").write_bytes(report.read_bytes())
    # where the agent's start went (its own log lines, on this kernel's monotonic clock), and
    # the floor: a bare python3 that connects to the system bus, in the same guest
    boot.run("agent-journal", ["journalctl", "-b", "--no-pager", "-o", "short-monotonic",
                               "-u", "kho-agent"])
    # ... and the floor in the same boot (kho-test-bus-floor.service, started beside the agent)
    boot.run("bus-floor-journal", ["journalctl", "-b", "--no-pager", "-o", "short-monotonic",
                                   "-u", "kho-test-bus-floor"])
    boot.run("python-bus-floor", ["python3", "-c", "from gi.repository import Gio; "
                                  "Gio.bus_get_sync(Gio.BusType.SYSTEM, None)"])
    if not cold:
        return end(boot, "poweroff")
    # the same VM, the classic way: saved whole to disk, a cold reboot into the same kernel
    boot.run("vmm-image-dir", ["install", "-d", "-o", "vmm", "-m", "0700",
                               str(Path(image).parent)])
    saved = vmm(boot, "cold-save", image)
    if not (saved["json"] or {}).get("ok"):
        return end(boot, "poweroff")
    return end(boot, "reboot")


FDSTORE_DROPIN = Path("/etc/systemd/system/kho-agent.service.d/fdstore.conf")
KEEPER_UNIT = "kho-test-keeper.service"
KEEPER_UNIT_TEXT = f"""[Unit]
Description=kho-agent VM test: a VM manager keeping its fds in its own fd store (keeper.py)
After=kho-agent.service dbus.service

[Service]
Type=notify
NotifyAccess=main
User=vmm
ExecStart=/usr/bin/python3 {JOB}/keeper.py {OUT}
FileDescriptorStoreMax=8
FileDescriptorStorePreserve=yes
TimeoutStartSec=300
"""


def start_keeper(boot: Boot, name: str) -> None:
    """Start kho-test-keeper.service (written at the first boot) and record its report."""
    unit = Path("/etc/systemd/system") / KEEPER_UNIT
    if not unit.exists():
        unit.write_text(KEEPER_UNIT_TEXT)
        boot.run("daemon-reload", ["systemctl", "daemon-reload"])
    boot.fact(f"{name}_fdstore_before", subprocess.run(
        ["systemctl", "show", "-P", "NFileDescriptorStore", KEEPER_UNIT],
        capture_output=True, text=True, check=False).stdout.strip())
    step = boot.run(name, ["systemctl", "start", KEEPER_UNIT], timeout=900)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    report = OUT / f"keeper-{boot_id}.json"
    step["report"] = json.loads(report.read_text()) if report.exists() else None
    boot.save()


def remove_fdstore_dropin(boot: Boot) -> None:
    """An operator who removed the fdstore drop-in the package linked at install (the link is
    the administrator's, README): the base unit alone (hand-off mode direct), on whatever
    systemd this guest runs."""
    boot.fact("removed_fdstore_dropin", FDSTORE_DROPIN.exists())
    FDSTORE_DROPIN.unlink(missing_ok=True)
    boot.run("daemon-reload", ["systemctl", "daemon-reload"])
    boot.run("restart-agent", ["systemctl", "restart", "kho-agent.service"])
    wait_state(boot, ("idle",), 180)
    boot.ctl("preflight-without-dropin", "preflight")


def agent_start() -> dict[str, float] | None:
    """When the agent's process started, on this kernel's CLOCK_MONOTONIC and CLOCK_REALTIME."""
    proc = subprocess.run(["systemctl", "show", "-P", "ExecMainStartTimestampMonotonic",
                           "kho-agent.service"], capture_output=True, text=True, check=False)
    try:
        monotonic = int(proc.stdout.strip()) / 1e6
    except ValueError:
        return None
    now_mono = time.clock_gettime(time.CLOCK_MONOTONIC)
    now_real = time.clock_gettime(time.CLOCK_REALTIME)
    return {"monotonic": monotonic, "realtime": now_real - (now_mono - monotonic)}


def main() -> int:
    spec: dict[str, Any] = json.loads((JOB / "scenario.json").read_text())
    boot = Boot()
    boot.fact("scenario", spec)
    if wait_state(boot, ("idle", "prepared", "verified", "failed", "verifying"), 120) is None:
        host_facts(boot, "start")
        boot.run("agent-status", ["systemctl", "status", "--no-pager", "kho-agent"])
        boot.run("agent-journal", ["journalctl", "-b", "--no-pager", "-u", "kho-agent"])
        # a fleet guest stays up: the fleet tool reads the failure over SSH
        return 1 if spec["kind"] == "fleet" else end(boot, "poweroff")
    if BOOT == 1 and spec.get("without_fdstore_dropin"):
        remove_fdstore_dropin(boot)
    host_facts(boot, "start")
    # A real host has its running kernel's image in /boot, where kho-agent reads the ABI the
    # running kernel speaks; QEMU booted this one from outside (-kernel): put it there.
    image = Path(f"/boot/vmlinuz-{os.uname().release}")
    if not image.exists() and (JOB / "kernels/running").exists():
        shutil.copy(JOB / "kernels/running", image)
        boot.fact("installed_running_image", str(image))
    kind = spec["kind"]
    if kind == "updates":
        updates = int(spec.get("updates", 1))
        if BOOT > 1:
            after_update(boot, spec, f"vm-{BOOT - 1}")
        if spec.get("scratch_probe"):
            scratch_probe(boot, spec)
        if BOOT == 1 and spec.get("refuse_target"):
            refused = boot.ctl("prepare-refused", "prepare", "--kernel",
                               str(JOB / spec["refuse_target"]))
            boot.fact("refused_rc", refused["rc"])
            host_facts(boot, "after_refusal")
        if updates >= BOOT:
            return live_update(boot, spec, f"vm-{BOOT}")
        boot.run("journal", ["journalctl", "-b", "--no-pager", "-u", "kho-agent"])
        return end(boot, "poweroff")
    if kind == "cancel":
        if BOOT == 1:
            boot.workload("preserve", "vm-1")
            boot.ctl("prepare", "prepare", "--kernel", str(JOB / spec["target"]))
            host_facts(boot, "prepared")
            boot.ctl("cancel", "cancel")
            host_facts(boot, "cancelled")
            boot.fact("cancelled_fds", agent_fds())
            boot.ctl("sessions", "sessions")
            return end(boot, "reboot")
        boot.workload("check", "vm-1")
        return end(boot, "poweroff")
    if kind == "kill":
        boot.workload("preserve", "vm-1")
        boot.ctl("prepare", "prepare", "--kernel", str(JOB / spec["target"]))
        host_facts(boot, "prepared")
        old = agent_pid()
        boot.fact("killed_pid", old)
        boot.run("kill", ["systemctl", "kill", "-s", "KILL", "kho-agent.service"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and agent_pid() in (None, old):
            time.sleep(0.5)
        boot.fact("restarted_pid", agent_pid())
        wait_state(boot, ("idle", "failed", "prepared"), 60)
        host_facts(boot, "restarted")
        boot.ctl("sessions", "sessions")
        boot.workload("preserve", "vm-2")
        boot.ctl("prepare-again", "prepare", "--kernel", str(JOB / spec["target"]))
        host_facts(boot, "prepared_again")
        boot.ctl("cancel", "cancel")
        host_facts(boot, "cancelled")
        return end(boot, "poweroff")
    if kind == "scratch":
        return scratch(boot, spec)
    if kind == "fleet":
        return fleet(boot, spec)
    if kind == "qemu":
        return qemu_vm(boot, spec)
    boot.fact("error", f"unknown scenario kind {kind!r}")
    return end(boot, "poweroff")


if __name__ == "__main__":
    sys.exit(main())
