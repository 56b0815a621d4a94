"""Running a guest: the QEMU command line, the accelerator probe, the serial console's frames.

One guest per call of :func:`run_guest`: QEMU boots ``-kernel`` directly (no firmware boot
loader, no initramfs) with the root image on the first virtio disk, the serial console written
to a file and ``-no-reboot``, so it exits when the guest powers off, reboots or panics
(``panic=-1`` on the kernel command line makes a panic a reboot). A kexec is not a reboot to
QEMU: the whole boot chain of a live update runs in one QEMU process, one serial log. These
guests have no network.

:func:`start_guest` is the other way, for the fleet (tests/vm/fleet.py): the same command line
plus a user-mode NIC whose guest port 22 is forwarded to a port of the host's loopback, QEMU
started in the background (:class:`BackgroundGuest`), and stopped by the caller (a poweroff
over SSH, then killed after a bound).

Results leave the guest on the job disk (tests/vm/jobdisk.py) and as framed lines on the serial
console, ``KHO-TEST <json object>``, which :func:`parse_frames` collects. Nothing here waits on a
timing guess: a run ends when QEMU exits; the timeout is only the backstop for a hung guest,
and says so.

Acceleration: ``/dev/kvm`` is not proof that KVM works (on this machine it is ``kvm_pvm``, which
cannot run a stock kernel: every boot dies with "KVM internal error ... emulation failure"), so
:func:`probe_accel` boots the kernel under KVM for a few seconds and uses it only if the kernel
got to the end of its own initialisation; otherwise TCG, single-threaded (multi-threaded TCG
oopsed once in three boots here).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .cache import cache_root, content_key

# Host packages the VM suite needs (CI installs them with apt-get): QEMU and qemu-img for the
# guests and overlays, debootstrap for the root filesystem, e2fsprogs for the images, nasm for
# the boot sector the real-VMM scenario runs (payload/count.asm).
# openssh-client and ansible-core for the fleet scenario (tests/vm/fleet.py, test_fleet.py).
VM_APT_PACKAGES: tuple[str, ...] = ("qemu-system-x86", "qemu-utils", "debootstrap", "e2fsprogs",
                                    "nasm", "openssh-client", "ansible-core")

QEMU = "qemu-system-x86_64"
FRAME_MARKER = "KHO-TEST "
ACCEL_ENV = "KHO_AGENT_TEST_ACCEL"

# The kernel command line of the test guest: serial console, root on the first virtio disk,
# a panic ends QEMU (with -no-reboot), KHO and LUO on (both default off).
BASE_APPEND = "console=ttyS0 root=/dev/vda rw panic=-1 kho=on liveupdate=on"

Accel = Literal["kvm", "tcg"]

# What a kernel prints when it has finished its own initialisation and fails to find a root
# file system: the probe boots without a disk and waits for this.
_PROBE_MARKER = "Kernel panic - not syncing"
_KVM_FAILURES = ("KVM internal error", "emulation failure", "failed to initialize kvm",
                 "Could not access KVM kernel module")
PROBE_TIMEOUT_S = 15.0


class QemuError(RuntimeError):
    """QEMU could not be started at all (missing binary, bad image): the message says what."""


class SerialConsole:
    """The guest's serial console, as QEMU wrote it to `serial_log`: its text and its frames."""

    serial_log: Path

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def frames(self) -> list[dict[str, Any]]:
        return parse_frames(self.serial_text())

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.serial_text().splitlines()[-lines:])


@dataclass(frozen=True)
class GuestRun(SerialConsole):
    """How one QEMU process ended and where its serial console went."""

    returncode: int
    serial_log: Path
    elapsed_s: float
    timed_out: bool
    accel: Accel = "tcg"
    argv: list[str] = field(default_factory=list)
    # QEMU's own messages (not the guest's): "terminating on signal", KVM errors, disk errors.
    qemu_stderr: str = ""

    @property
    def panicked(self) -> bool:
        return _PROBE_MARKER in self.serial_text()

    @property
    def powered_off(self) -> bool:
        """The kernel's last words on an orderly power-off (``reboot: Power down``)."""
        return "reboot: Power down" in self.serial_text()

    def describe(self, lines: int = 40) -> str:
        """One paragraph for an assertion message: how it ended and the console's last lines."""
        if self.timed_out:
            how = f"timed out after {self.elapsed_s:.0f} s and was killed"
        elif self.panicked:
            how = f"ended with a kernel panic after {self.elapsed_s:.1f} s"
        else:
            how = f"exited with status {self.returncode} after {self.elapsed_s:.1f} s"
        stderr = f"\nQEMU said: {self.qemu_stderr.strip()}" if self.qemu_stderr.strip() else ""
        return (f"guest ({self.accel}) {how}; serial log {self.serial_log}{stderr}\n"
                f"--- last {lines} lines of the serial console ---\n{self.tail(lines)}")


def guest_append(extra: str = "") -> str:
    """:data:`BASE_APPEND` plus ``extra`` (e.g. ``kho_scratch=...`` or a stage marker)."""
    return f"{BASE_APPEND} {extra}".strip()


def parse_frames(text: str, *, strict: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of the ``KHO-TEST <json>`` lines of a serial log, in order.

    The marker may stand anywhere in a line (journald prefixes what it forwards to the console
    with a timestamp and ``identifier[pid]:``); text after the object is ignored. Kernel
    messages can interleave with a frame on the console; a frame that is not a JSON object is
    skipped, or raises ValueError naming the line with ``strict=True``.
    """
    decoder = json.JSONDecoder()
    frames: list[dict[str, Any]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.replace("\r", "")
        at = line.find(FRAME_MARKER)
        if at < 0:
            continue
        payload = line[at + len(FRAME_MARKER):].lstrip()
        try:
            value, _ = decoder.raw_decode(payload)
        except json.JSONDecodeError as exc:
            if strict:
                raise ValueError(f"serial line {number}: malformed frame ({exc.msg}): "
                                 f"{line!r}") from exc
            continue
        if not isinstance(value, dict):
            if strict:
                raise ValueError(f"serial line {number}: a frame must be a JSON object: {line!r}")
            continue
        frames.append(value)
    return frames


def disk_format(path: Path) -> str:
    return "qcow2" if path.suffix == ".qcow2" else "raw"


def build_argv(kernel: Path, append: str, disks: Sequence[Path], *, memory_mb: int,
               accel: Accel, smp: int, serial_log: Path, qemu: str = QEMU,
               extra_args: Sequence[str] = ()) -> list[str]:
    """The QEMU command line of a test guest.

    ``-nodefaults``: no NIC, VGA, floppy or CD-ROM (the guest needs no network, and fewer
    devices boot faster under TCG; the fleet adds its NIC in ``extra_args``: user_network);
    the serial port is added explicitly. Disks are virtio-blk in
    order (vda, vdb, ...), ``cache=unsafe``: every disk is a scratch copy, and a guest's
    flushes cost real time under TCG; what the guest wrote is in the host's page cache as soon
    as QEMU has written it, so it survives QEMU being killed. A virtio RNG feeds the guest's
    entropy pool (systemd's random seed, Python's hash seed) without waiting.
    """
    if accel == "kvm":
        machine = ["-accel", "kvm", "-cpu", "host"]
    else:
        machine = ["-accel", "tcg,thread=single", "-cpu", "max"]
    argv = [qemu, *machine, "-machine", "q35", "-m", str(memory_mb), "-smp", str(smp),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", f"file:{serial_log}", "-monitor", "none",
            "-device", "virtio-rng-pci",
            "-kernel", str(kernel), "-append", append]
    for disk in disks:
        argv += ["-drive", f"file={disk},format={disk_format(disk)},if=virtio,cache=unsafe"]
    return [*argv, *extra_args]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (QEMU exits cleanly, flushing its disks), then SIGKILL if it does not."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_guest(kernel: Path, append: str, disks: Sequence[Path], *, memory_mb: int = 2048,
              timeout_s: float, serial_log: Path, accel: Accel | None = None, smp: int = 1,
              extra_args: Sequence[str] = ()) -> GuestRun:
    """Boot ``kernel`` with ``disks`` and wait for QEMU to exit (or kill it after ``timeout_s``).

    ``accel=None`` probes (:func:`probe_accel`). Raises QemuError only if QEMU cannot start; a
    guest that fails, panics or hangs is a GuestRun that says so.
    """
    timed_out = False
    proc, argv, chosen, stderr_path = _launch(kernel, append, disks, memory_mb=memory_mb,
                                              accel=accel, smp=smp, serial_log=serial_log,
                                              extra_args=extra_args)
    start = time.monotonic()   # QEMU's run, not the accelerator probe before it
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
    elapsed = time.monotonic() - start
    return GuestRun(proc.returncode, serial_log, elapsed, timed_out, chosen, argv,
                    stderr_path.read_text(errors="replace"))


def _launch(kernel: Path, append: str, disks: Sequence[Path], *, memory_mb: int,
            accel: Accel | None, smp: int, serial_log: Path, extra_args: Sequence[str]
            ) -> tuple[subprocess.Popen[bytes], list[str], Accel, Path]:
    """Check the inputs and start QEMU (its own messages to <serial_log>.qemu-stderr): the
    process, its argv, the accelerator chosen, the stderr file. QemuError if it cannot start."""
    if not kernel.is_file():
        raise QemuError(f"kernel image {kernel} does not exist")
    for disk in disks:
        if not disk.is_file():
            raise QemuError(f"disk image {disk} does not exist")
    chosen: Accel = accel or probe_accel(kernel)
    serial_log.parent.mkdir(parents=True, exist_ok=True)
    argv = build_argv(kernel, append, disks, memory_mb=memory_mb, accel=chosen, smp=smp,
                      serial_log=serial_log, extra_args=extra_args)
    stderr_path = serial_log.with_name(serial_log.name + ".qemu-stderr")
    with stderr_path.open("wb") as stderr:   # the child keeps its own copy of the fd
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr,
                                    stderr=stderr)
        except FileNotFoundError as exc:
            raise QemuError(f"{argv[0]} not found: apt-get install "
                            f"{' '.join(VM_APT_PACKAGES)}") from exc
    return proc, argv, chosen, stderr_path


# --- a guest in the background, on a user-mode network --------------------------------------------

def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that nothing listens on now (the kernel picks
    them; all are held until the last is picked, so none comes twice).

    Closed again before QEMU binds them, so another process could take one in between: QEMU
    then exits at once saying it could not set up the forwarding, which the fleet's wait
    (tests/vm/fleet.py) reports with QEMU's message.
    """
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def user_network(ssh_port: int) -> list[str]:
    """QEMU arguments for one virtio NIC on QEMU's user-mode network (slirp: no root, no
    bridge) with the guest's port 22 reachable on the host's ``127.0.0.1:ssh_port``.

    ``restrict=on``: the guest reaches nothing outside (no archive, no host services); the
    forwarded port and slirp's own DHCP still work.
    """
    return ["-nic", f"user,model=virtio-net-pci,restrict=on,"
                    f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22"]


@dataclass
class BackgroundGuest(SerialConsole):
    """A QEMU process that runs until the caller stops it (:meth:`stop`); the guest's port 22
    is ``127.0.0.1:ssh_port`` on the host."""

    name: str
    proc: subprocess.Popen[bytes]
    argv: list[str]
    serial_log: Path
    stderr_path: Path
    accel: Accel
    ssh_port: int
    started: float        # time.monotonic() when QEMU was started

    def running(self) -> bool:
        return self.proc.poll() is None

    def qemu_stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> int | None:
        """QEMU's resident memory now (VmRSS), None once it has exited."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except FileNotFoundError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def describe(self, lines: int = 40) -> str:
        """Whether QEMU still runs, what it said, and the console's last lines."""
        how = "running" if self.running() else f"exited with status {self.proc.returncode}"
        stderr = self.qemu_stderr().strip()
        said = f"\nQEMU said: {stderr}" if stderr else ""
        tail = self.tail(lines)
        return (f"guest {self.name} ({self.accel}, ssh port {self.ssh_port}) {how} after "
                f"{time.monotonic() - self.started:.0f} s; serial log {self.serial_log}{said}\n"
                f"--- last {lines} lines of its serial console ---\n{tail}")

    def stop(self, poweroff: Callable[[], object] | None = None, *,
             bound_s: float = 120.0) -> GuestRun:
        """End the guest: ``poweroff()`` first (it asks the guest to power off, e.g. over SSH;
        its failure is not an error, the bound catches it), then wait up to ``bound_s`` for QEMU
        to exit, then SIGTERM and SIGKILL. Returns the run's record, ``timed_out`` if it had to
        be killed."""
        if poweroff is not None and self.running():
            poweroff()
        killed = False
        try:
            self.proc.wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            killed = True
            _stop(self.proc)
        return GuestRun(self.proc.returncode, self.serial_log, time.monotonic() - self.started,
                        killed, self.accel, self.argv, self.qemu_stderr())


def start_guest(name: str, kernel: Path, append: str, disks: Sequence[Path], *, ssh_port: int,
                serial_log: Path, memory_mb: int = 2048, accel: Accel | None = None,
                smp: int = 1) -> BackgroundGuest:
    """Start QEMU for ``kernel`` and ``disks`` with :func:`user_network` and return at once.

    As :func:`run_guest` otherwise (``-no-reboot``: a poweroff, cold reboot or panic ends
    QEMU; a kexec does not). Raises QemuError only if QEMU cannot be started at all.
    """
    proc, argv, chosen, stderr_path = _launch(kernel, append, disks, memory_mb=memory_mb,
                                              accel=accel, smp=smp, serial_log=serial_log,
                                              extra_args=user_network(ssh_port))
    return BackgroundGuest(name, proc, argv, serial_log, stderr_path, chosen, ssh_port,
                           time.monotonic())


# --- the accelerator probe ------------------------------------------------------------------------

def _kvm_usable_device() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ""
    return out.stdout.splitlines()[0] if out.stdout else ""


def _probe_kvm_boot(kernel: Path, workdir: Path, qemu: str) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM without a root disk; True if it reached the root-mount panic."""
    serial = workdir / "probe-serial.log"
    stderr_path = workdir / "probe-stderr.log"
    argv = build_argv(kernel, "console=ttyS0 panic=-1 root=/dev/kho-probe-none", [],
                      memory_mb=256, accel="kvm", smp=1, serial_log=serial, qemu=qemu)
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        reached = False
        # Polled: QEMU does not exit on a KVM internal error, it pauses the guest, so waiting
        # for the process alone would only end at the deadline.
        while time.monotonic() < deadline:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if _PROBE_MARKER in text:
                reached = True
                break
            err = stderr_path.read_text(errors="replace")
            if proc.poll() is not None or any(f in err for f in _KVM_FAILURES):
                break
            time.sleep(0.2)
        if proc.poll() is None:
            _stop(proc)
    why = stderr_path.read_text(errors="replace").strip().splitlines()
    return reached, (why[0] if why else "no root-mount panic within the probe's time")


def probe_accel(kernel: Path, *, cache_dir: Path | None = None, qemu: str = QEMU) -> Accel:
    """``kvm`` if KVM really boots ``kernel`` on this machine, else ``tcg``.

    ``$KHO_AGENT_TEST_ACCEL`` (kvm or tcg) overrides the probe. The verdict is cached per host
    boot and QEMU version (``<cache>/accel``), so a test session probes once.
    """
    forced = os.environ.get(ACCEL_ENV, "")
    if forced in ("kvm", "tcg"):
        return "kvm" if forced == "kvm" else "tcg"
    if forced:
        raise QemuError(f"${ACCEL_ENV}={forced!r}: use kvm or tcg (or unset it to probe)")
    if not _kvm_usable_device():
        return "tcg"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    directory = cache_dir or cache_root() / "accel"
    directory.mkdir(parents=True, exist_ok=True)
    verdict_file = directory / f"{content_key([boot_id, _qemu_version(qemu)])}.json"
    if verdict_file.is_file():
        cached = json.loads(verdict_file.read_text())
        if cached.get("accel") in ("kvm", "tcg"):
            return "kvm" if cached["accel"] == "kvm" else "tcg"
    workdir = directory / f"probe-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        works, why = _probe_kvm_boot(kernel, workdir, qemu)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    verdict: Accel = "kvm" if works else "tcg"
    record = {"accel": verdict, "reason": "KVM booted the kernel" if works else why,
              "kernel": str(kernel), "qemu": _qemu_version(qemu)}
    tmp = verdict_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(verdict_file)
    return verdict


def command_line(argv: Sequence[str]) -> str:
    """The argv as a shell command, for logs and for running a failed guest again by hand."""
    return shlex.join(argv)
