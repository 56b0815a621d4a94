"""A fleet of test guests on this host, reachable over SSH, for Ansible (issue 16, section 3).

Each guest is a scratch copy of the cached image (tests/vm/rootfs.py) with its own job disk
(scenario kind "fleet", tests/vm/jobs/run.py), booted in the background by QEMU
(tests/vm/qemu.py start_guest) with a user-mode NIC whose port 22 is forwarded to its own port
of 127.0.0.1. The kernel command line carries ``kho_test.ssh=1`` (networkd and sshd start only
with it) and ``systemd.hostname=<name>``; kho-agent hands the running command line to the next
kernel, so both stay through every live update, and so does the forwarded port (a kexec is not
a new QEMU).

What a guest does on each boot is its runner's: boot 1 installs the target kernel in /boot and
preserves the workload's session vm-1; every later boot (after a kexec the fleet tool caused)
checks vm-<n-1> byte for byte, records the agent's verification and preserves vm-<n>; none of
them powers off. The end of boot n's run is the driver-exit frame on the guest's serial console,
which the host reads while the guest runs (:meth:`FleetGuest.wait_for_boot`).

Use::

    with fleet.running_fleet(tmp_path, kernel, count=3, target=target) as f:
        f.ansible("all", "ansible.builtin.ping")         # -i f.inventory, f.ansible_env()
        f.playbook(Path("site.yml"), extra_vars={...})   # ansible-playbook, output captured
        f.guests[0].ssh.run("kho-agentctl status --json")
        f.guests[0].wait_for_boot(2, timeout_s=900)      # the boot after its live update
    runs = f.results                                     # name -> ScenarioRun, job disks read

``running_fleet`` stops every guest at the end (a poweroff over SSH, QEMU killed after a bound)
and reads each job disk, whatever happened inside the block. ``directory/inventory.ini`` and
``directory/<name>/ssh`` (a script: ssh to the guest) stay for running things by hand while
the fleet is up.

By hand, to work on a play against a fleet that stays up until Ctrl-C (as root, from the
checkout; the primary kernel, and the target too unless ``--target`` names a vmlinuz)::

    PYTHONPATH=$PWD/tests:$PWD .venv/bin/python -m vm.fleet /tmp/fleet --count 3
    ansible-playbook -i /tmp/fleet/inventory.ini play.yml     # in another terminal
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import jobdisk, qemu, rootfs, scenarios
from .guestssh import COMMON_OPTIONS, SshTarget
from .kernels import primary_kernel
from .scenarios import ScenarioRun

NAME_PREFIX = "kho-fleet-"
GROUP = "fleet"
# Under TCG, three guests on two cores answered SSH 77-106 s after QEMU started and were ready
# (boot 1's run returned) in 108 s, 142 s beside a kernel build (2026-12-04): the bound is for
# a hung guest.
READY_TIMEOUT_S = 900.0
POLL_S = 2.0
STOP_BOUND_S = 120.0
# The workload's big memfd: 16 MiB instead of the 256 of the one-update scenario (which carries
# the big one); every byte is still checked, and three guests hash it under TCG at once.
BIG_MIB = 16
GUEST_MEMORY_MB = scenarios.GUEST_MEMORY_MB
JOB_OUT = "/mnt/job/out"


class FleetError(RuntimeError):
    """A guest of the fleet did not come up (or could not be started): the message names it and
    ends with its serial console's last lines."""


class Kernel(Protocol):
    """What the fleet needs of a kernel image: tests/vm/kernels.py KernelImage, or a
    :class:`TargetImage`."""

    @property
    def path(self) -> Path: ...

    @property
    def release(self) -> str: ...


@dataclass(frozen=True)
class TargetImage:
    """A kernel image to install in a guest's /boot that is not a KernelImage (Debian's stock
    kernel of tests/vm/kernels.py ensure_stock_debian_kernel: a vmlinuz-<release>)."""

    path: Path
    release: str

    @classmethod
    def from_vmlinuz(cls, path: Path) -> TargetImage:
        if not path.name.startswith("vmlinuz-"):
            raise ValueError(f"{path}: not named vmlinuz-<release>")
        return cls(path, path.name.removeprefix("vmlinuz-"))


def guest_name(index: int) -> str:
    """The name of the index-th guest (1-based): its inventory name and its hostname."""
    return f"{NAME_PREFIX}{index}"


def fleet_spec(target: Kernel | None, *, install_target: bool = True,
               big_mib: int = BIG_MIB, agent_target: str | None = None) -> dict[str, Any]:
    """The scenario of one guest's job disk (tests/vm/jobs/run.py kind "fleet"); the target
    image is on the job disk as kernels/target, installed as /boot/vmlinuz-<release> at boot 1
    when ``install_target``. ``agent_target``: the agent's Target= (kho-agent.conf(5)), set at
    boot 1 before the workload preserves anything, as the host was configured when installed
    (a restart of a daemon holding sessions is refused)."""
    spec: dict[str, Any] = {"kind": "fleet", "big_mib": big_mib}
    if agent_target is not None:
        spec["agent_conf"] = f"[Prepare]\nTarget={agent_target}\n"
    if target is not None:
        spec["target"] = "kernels/target"
        if install_target:
            spec["target_release"] = target.release
    return spec


def cmdline(name: str, append: str = "") -> str:
    """The fleet guest's kernel command line: the scenarios', sshd and networkd on, its name."""
    return " ".join(part for part in (scenarios.APPEND, rootfs.FLEET_CMDLINE,
                                      f"systemd.hostname={name}", append) if part)


def inventory_text(hosts: Sequence[tuple[str, SshTarget]], *, group: str = GROUP) -> str:
    """An Ansible INI inventory: every host in ``group`` on 127.0.0.1 at its own port, as root
    with the image's test key, no host-key checks, the guest's own python3."""
    keys = {target.key for _name, target in hosts}
    if len(keys) != 1:
        raise ValueError(f"the hosts of one inventory share one key, not {sorted(keys)}")
    lines = ["# written by tests/vm/fleet.py: QEMU guests of this host, each on a forwarded port",
             f"[{group}]"]
    lines += [f"{name} ansible_host={target.host} ansible_port={target.port}"
              for name, target in hosts]
    ssh_args = " ".join(f"-o {option}" for option in COMMON_OPTIONS)
    lines += ["", f"[{group}:vars]",
              f"ansible_user={hosts[0][1].user}",
              f"ansible_ssh_private_key_file={keys.pop()}",
              f"ansible_ssh_common_args='{ssh_args}'",
              "ansible_python_interpreter=/usr/bin/python3", ""]
    return "\n".join(lines)


def boot_ends(frames: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The driver-exit frames of a serial console by boot number (tests/vm/guest/
    kho-test-driver frames one when the run of a boot returns)."""
    return {int(f["boot"]): f for f in frames
            if f.get("event") == "driver-exit" and isinstance(f.get("boot"), int)}


@dataclass
class FleetGuest:
    """One guest: its QEMU, how to reach it, its job disk; ``result`` once the fleet stopped."""

    name: str
    directory: Path
    vm: qemu.BackgroundGuest
    ssh: SshTarget
    job_disk: Path
    target: Kernel | None
    # Seconds from QEMU's start: SSH answered; boot 1's run returned (its driver-exit frame).
    ssh_ready_s: float | None = None
    boot1_done_s: float | None = None
    rss_kib: dict[str, int | None] = field(default_factory=dict)
    result: ScenarioRun | None = None

    def run(self, command: str, *, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``command`` over SSH in the guest (guestssh.SshTarget.run)."""
        return self.ssh.run(command, timeout_s=timeout_s)

    def boot_ends(self) -> dict[int, dict[str, Any]]:
        return boot_ends(self.vm.frames())

    def wait_for_boot(self, n: int, *, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the run of boot ``n`` has returned (its driver-exit frame, with its
        status) and return the frame. FleetError if QEMU exits or the bound runs out first."""
        deadline = time.monotonic() + timeout_s
        while True:
            ended = self.boot_ends().get(n)
            if ended is not None:
                return ended
            if not self.vm.running():
                raise FleetError(f"{self.name}: QEMU exited before boot {n}'s run returned\n"
                                 + self.vm.describe())
            if time.monotonic() > deadline:
                raise FleetError(f"{self.name}: boot {n}'s run did not return within "
                                 f"{timeout_s:.0f} s\n" + self.vm.describe())
            time.sleep(POLL_S)

    def record(self, n: int) -> dict[str, Any]:
        """What boot ``n`` recorded so far (out/boot-<n>.json), read over SSH while the guest
        runs; after the fleet stopped, ``result.boot(n)`` has it from the job disk."""
        proc = self.run(f"cat {JOB_OUT}/boot-{n}.json")
        if proc.returncode != 0:
            raise FleetError(f"{self.name}: no record of boot {n}: {proc.stderr.strip()}")
        record: dict[str, Any] = json.loads(proc.stdout)
        return record

    def poll_ready(self) -> bool:
        """One look: SSH answers and boot 1's run returned. FleetError if QEMU is gone."""
        if not self.vm.running():
            raise FleetError(f"{self.name}: QEMU exited before the guest was ready\n"
                             + self.vm.describe())
        if self.ssh_ready_s is None and self.ssh.banner() is not None \
                and self.run("true", timeout_s=30).returncode == 0:
            self.ssh_ready_s = round(time.monotonic() - self.vm.started, 1)
            self.rss_kib["ssh_ready"] = self.vm.rss_kib()
        # seen now, after the SSH probe (which can take tens of seconds): not earlier
        if self.boot1_done_s is None and 1 in self.boot_ends():
            self.boot1_done_s = round(time.monotonic() - self.vm.started, 1)
            self.rss_kib["boot1_done"] = self.vm.rss_kib()
        return self.ssh_ready_s is not None and self.boot1_done_s is not None

    def missing(self) -> str:
        what = [w for w, done in (("SSH", self.ssh_ready_s), ("boot 1's run", self.boot1_done_s))
                if done is None]
        return " and ".join(what)


@dataclass
class Fleet:
    """The guests, the inventory, and how to run Ansible against them."""

    directory: Path
    guests: list[FleetGuest]
    inventory: Path
    image: rootfs.GuestImage
    kernel: Kernel
    control_dir: Path              # ssh ControlPath sockets of Ansible (short: a socket path)
    started: float
    ready_s: float | None = None
    results: dict[str, ScenarioRun] = field(default_factory=dict)

    def guest(self, name: str) -> FleetGuest:
        for guest in self.guests:
            if guest.name == name:
                return guest
        raise KeyError(f"no guest {name!r} in the fleet ({[g.name for g in self.guests]})")

    def ansible_env(self) -> dict[str, str]:
        """The environment for ansible and ansible-playbook: this fleet's inventory by default,
        no host-key checks, no colours (readable in assertion messages), no retry files,
        pipelining (fewer SSH round trips under TCG), its own temporary and control dirs."""
        env = dict(os.environ)
        env.update({
            "ANSIBLE_INVENTORY": str(self.inventory),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_TIMEOUT": "30",
            "ANSIBLE_LOCAL_TEMP": str(self.directory / "ansible-tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir),
        })
        return env

    def _ansible(self, argv: list[str], timeout_s: float,
                 cwd: Path | None) -> subprocess.CompletedProcess[str]:
        log = self.directory / "ansible.log"
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, env=self.ansible_env(), cwd=cwd, capture_output=True,
                                  text=True, errors="replace", timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) \
                else exc.stdout or ""
            proc = subprocess.CompletedProcess(argv, 124, out,
                                               f"timed out after {timeout_s:.0f} s")
        with log.open("a") as handle:
            handle.write(f"$ {shlex.join(argv)}\n(exit {proc.returncode} after "
                         f"{time.monotonic() - start:.1f} s)\n{proc.stdout}{proc.stderr}\n")
        return proc

    def ansible(self, pattern: str, module: str, args: str = "", *extra: str,
                timeout_s: float = 600.0,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``ansible -i <inventory> PATTERN -m MODULE [-a ARGS] EXTRA...``; output captured
        (and appended to directory/ansible.log)."""
        argv = ["ansible", "-i", str(self.inventory), pattern, "-m", module]
        if args:
            argv += ["-a", args]
        return self._ansible([*argv, *extra], timeout_s, cwd)

    def playbook(self, playbook: Path, *extra: str, extra_vars: Mapping[str, Any] | None = None,
                 timeout_s: float = 3600.0,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``ansible-playbook -i <inventory> [-e JSON] PLAYBOOK EXTRA...`` (e.g. ``--check``,
        ``--limit``); output captured (and appended to directory/ansible.log). ``cwd``: where
        an ansible.cfg beside the playbook is read from."""
        argv = ["ansible-playbook", "-i", str(self.inventory)]
        if extra_vars:
            argv += ["-e", json.dumps(dict(extra_vars))]
        return self._ansible([*argv, *extra, str(playbook)], timeout_s, cwd)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until every guest answers SSH and boot 1's run has returned (bounded)."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.guests)
        while waiting:
            waiting = [g for g in waiting if not g.poll_ready()]
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise FleetError(f"not ready within {timeout_s:.0f} s: "
                                 + "; ".join(f"{g.name} (no {g.missing()})" for g in waiting)
                                 + "\n\n" + "\n\n".join(g.vm.describe() for g in waiting))
            time.sleep(POLL_S)
        self.ready_s = round(time.monotonic() - self.started, 1)
        self.write_measurements()

    def stop(self, bound_s: float = STOP_BOUND_S) -> dict[str, ScenarioRun]:
        """Power every guest off (over SSH, all at once), kill those that do not exit within
        ``bound_s``, read every job disk. Returns (and keeps in ``results``) each guest's
        ScenarioRun (boots recorded, serial log, how QEMU ended)."""
        asked: list[tuple[FleetGuest, subprocess.Popen[bytes]]] = []
        for guest in self.guests:
            guest.rss_kib["at_stop"] = guest.vm.rss_kib()
            if guest.vm.running():
                # not waited for here: systemctl queues the poweroff and the connection drops
                asked.append((guest, subprocess.Popen(
                    guest.ssh.argv("systemctl poweroff"), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        # every QEMU ends before any disk is read: a disk that cannot be read must not leave
        # the other guests running (or hide the failure the test is ending on)
        ended = {guest.name: guest.vm.stop(bound_s=bound_s) for guest in self.guests}
        for _guest, proc in asked:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        unreadable = []
        for guest in self.guests:
            run = ended[guest.name]
            try:
                guest.result = scenarios.read_scenario_disk(
                    guest.job_disk, guest.directory, [run.serial_text()], [run])
            except (jobdisk.JobDiskError, ValueError) as exc:  # ValueError: a torn boot record
                unreadable.append(f"{guest.name}: {exc}")
                continue
            self.results[guest.name] = guest.result
        shutil.rmtree(self.control_dir, ignore_errors=True)
        self.write_measurements()
        if unreadable:
            raise FleetError("job disks not readable after the stop:\n" + "\n".join(unreadable))
        return self.results

    def measurements(self) -> dict[str, Any]:
        """The figures of this fleet: per guest the seconds from QEMU's start to SSH and to the
        end of boot 1's run, QEMU's resident memory (KiB) then and at the stop; the whole
        fleet's time to ready."""
        return {"guests": len(self.guests), "accel": self.guests[0].vm.accel,
                "ready_s": self.ready_s,
                "per_guest": {g.name: {"ssh_ready_s": g.ssh_ready_s,
                                       "boot1_done_s": g.boot1_done_s,
                                       "rss_kib": g.rss_kib} for g in self.guests}}

    def write_measurements(self) -> None:
        (self.directory / "fleet.json").write_text(
            json.dumps(self.measurements(), indent=1) + "\n")


def start_fleet(directory: Path, kernel: Kernel, *, count: int = 3,
                target: Kernel | None = None, targets: Mapping[str, Kernel | None] | None = None,
                install_target: bool = True, files: Mapping[str, Path] | None = None,
                agent_target: str | None = None,
                agent_targets: Mapping[str, str | None] | None = None,
                guest: str = rootfs.DEFAULT_GUEST, big_mib: int = BIG_MIB,
                memory_mb: int = GUEST_MEMORY_MB, append: str = "") -> Fleet:
    """Start ``count`` guests on ``kernel`` (QEMU in the background; :meth:`Fleet.wait_ready`
    waits for them, :func:`running_fleet` does both and stops them).

    ``target``: the kernel each guest gets in /boot (``targets`` by guest name overrides it per
    guest, None for none), on the job disk as kernels/target either way; ``install_target``
    False leaves it there only (for a play that installs it). ``files``: more files on every
    job disk (name on the disk -> host path). ``append``: more kernel command line.
    ``agent_target``: every guest's Target= (``agent_targets`` by guest name overrides it);
    None leaves the agent's configuration as the package installed it.
    """
    if count < 1:
        raise ValueError(f"a fleet of {count} guests")
    image = rootfs.ensure_guest_image(guest)
    accel = qemu.probe_accel(kernel.path)
    directory.mkdir(parents=True, exist_ok=True)
    names = [guest_name(i) for i in range(1, count + 1)]
    unknown = sorted((set(targets or {}) | set(agent_targets or {})) - set(names))
    if unknown:
        raise ValueError(f"targets for guests the fleet does not have: {unknown}")
    ports = qemu.free_ports(count)
    control_dir = Path(tempfile.mkdtemp(prefix="kho-fleet-cp-"))
    fleet = Fleet(directory, [], directory / "inventory.ini", image, kernel, control_dir,
                  time.monotonic())
    try:
        for name, port in zip(names, ports, strict=True):
            here = directory / name
            own = targets[name] if targets and name in targets else target
            disk_files = {"kernels/running": kernel.path, **(files or {})}
            if own is not None:
                disk_files["kernels/target"] = own.path
            root = rootfs.scratch_copy(image, here)
            configured = (agent_targets[name] if agent_targets and name in agent_targets
                          else agent_target)
            spec = fleet_spec(own, install_target=install_target, big_mib=big_mib,
                              agent_target=configured)
            disk = scenarios.make_scenario_disk(here, spec, disk_files)
            ssh = SshTarget(port, image.ssh_key)
            (here / "ssh").write_text(ssh.script())
            (here / "ssh").chmod(0o755)
            vm = qemu.start_guest(name, kernel.path, cmdline(name, append), [root, disk],
                                  ssh_port=port, serial_log=here / "serial.log",
                                  memory_mb=memory_mb, accel=accel)
            fleet.guests.append(FleetGuest(name, here, vm, ssh, disk, own))
    except BaseException:
        for started in fleet.guests:  # none may outlive a failed start
            started.vm.stop(bound_s=0)
        shutil.rmtree(control_dir, ignore_errors=True)
        raise
    fleet.inventory.write_text(inventory_text([(g.name, g.ssh) for g in fleet.guests]))
    return fleet


@contextmanager
def running_fleet(directory: Path, kernel: Kernel, *, ready_timeout_s: float = READY_TIMEOUT_S,
                  **options: Any) -> Iterator[Fleet]:
    """:func:`start_fleet` (same options), wait until every guest is ready, yield the fleet;
    at the end, whatever happened, :meth:`Fleet.stop` (the job disks read into each guest's
    ``result``, and ``fleet.results``)."""
    fleet = start_fleet(directory, kernel, **options)
    try:
        fleet.wait_ready(ready_timeout_s)
        yield fleet
    finally:
        fleet.stop()


def main(argv: Sequence[str]) -> int:
    """Bring a fleet up and keep it until SIGINT or SIGTERM (module docstring)."""
    parser = argparse.ArgumentParser(prog="python3 -m vm.fleet", description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--guest", default=rootfs.DEFAULT_GUEST, choices=sorted(rootfs.GUESTS))
    parser.add_argument("--target", type=Path, help="a vmlinuz-<release> for every guest's "
                        "/boot (default: the primary kernel)")
    args = parser.parse_args(argv)
    kernel = primary_kernel()  # a kernel build when the cache is cold
    target: Kernel = TargetImage.from_vmlinuz(args.target) if args.target else kernel
    # SIGTERM ends the wait as Ctrl-C does, so the guests are stopped and the disks read
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with running_fleet(args.directory, kernel, count=args.count, target=target,
                       guest=args.guest) as running:
        print(json.dumps(running.measurements(), indent=1))
        print(f"inventory: {running.inventory}")
        for guest in running.guests:
            print(f"{guest.name}: {guest.directory / 'ssh'} (port {guest.ssh.port})")
        print("up until Ctrl-C", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("stopping the fleet", flush=True)
    for name, run in running.results.items():
        how = "powered off" if run.runs[0].powered_off else \
            "killed" if run.runs[0].timed_out else f"QEMU exited {run.runs[0].returncode}"
        print(f"{name}: boots recorded {sorted(run.boots)}, {how}; {run.result_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
