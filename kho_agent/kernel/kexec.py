"""Loading the next kernel with `kexec_file_load` (the only loader that carries KHO) and
rebooting into it.

`Kexec` is the seam: the real implementation (raw syscalls through ctypes) and the simulated
kernel both provide it. Failures are `KernelRefused` with the errno and advice.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

from ..errors import (
    AbiMismatch,
    AgentError,
    Busy,
    InvalidArgument,
    KernelRefused,
    NotFound,
)
from .callerfile import RegularFile, open_regular

KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4
KEXEC_LOADED_PATH = "sys/kernel/kexec_loaded"  # relative to the host root


class Kexec(Protocol):
    def available(self) -> bool:
        """kexec_file_load exists on this kernel (not ENOSYS)."""
        ...

    def loaded(self) -> bool:
        """A kexec image is loaded (`/sys/kernel/kexec_loaded`)."""
        ...

    def load(self, kernel: RegularFile, initrd: RegularFile | None, cmdline: str) -> None:
        """Load the image in the open `kernel` (and `initrd`). The caller opened them, with the
        rights it chose (callerfile.py), and closes them."""
        ...

    def unload(self) -> None: ...

    def reboot(self, *, via_systemd: bool) -> None:
        """Reboot into the loaded image: `systemctl kexec` when systemd is PID 1, else
        reboot(LINUX_REBOOT_CMD_KEXEC). On a real host reboot(2) returns only by raising and
        `systemctl kexec` returns once the kexec is queued; the simulated kernel performs its
        kexec and returns."""
        ...


# Syscall numbers of kexec_file_load on the two architectures that have KHO
# (arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h).
KEXEC_FILE_LOAD_SYSCALL: dict[str, int] = {"x86_64": 320, "amd64": 320, "aarch64": 294,
                                           "arm64": 294}
LINUX_REBOOT_CMD_KEXEC = 0x45584543  # glibc's reboot(int) adds the two magic numbers itself
CAP_SYS_BOOT = 22
LOCKDOWN_PATH = "sys/kernel/security/lockdown"
SYSTEMCTL_TIMEOUT = 120.0  # seconds; `systemctl kexec` only queues a job, so this is generous

KEXEC_LOAD_OP = "kexec_file_load"
KEXEC_UNLOAD_OP = "kexec_file_load(UNLOAD)"
REBOOT_OP = "reboot(LINUX_REBOOT_CMD_KEXEC)"

_SIGNATURE = ("signature verification failed (KEXEC_SIG / lockdown): sign the image with a key "
              "the running kernel trusts, or boot without signature enforcement")

KEXEC_ADVICE: dict[int, str] = {
    errno.EADDRNOTAVAIL: "kernel and initrd do not fit in the KHO scratch areas: see "
                         "`kho-agentctl scratch`, boot cold with a larger kho_scratch=",
    errno.EPERM: "kexec is not permitted here",  # completed by diagnose_kexec_eperm()
    errno.ENOEXEC: "not a kernel image this architecture can kexec (bzImage/Image, not vmlinux "
                   "or an EFI zboot without a loader)",
    errno.EKEYREJECTED: _SIGNATURE,
    errno.EKEYREVOKED: _SIGNATURE,
    errno.EKEYEXPIRED: _SIGNATURE,
    errno.EBADMSG: _SIGNATURE,
    errno.ENOKEY: _SIGNATURE,
    errno.ENODATA: "the image carries no signature and this kernel requires one (KEXEC_SIG_FORCE "
                   "or lockdown): use a signed kernel image",
    errno.EBUSY: "another kexec load or unload is running (the kexec lock is held): wait for it "
                 "and retry",
    errno.ENOMEM: "the kernel could not allocate memory to stage the image: free memory and "
                  "retry",
    errno.EINVAL: "the kernel rejected the arguments: the command line may be too long for the "
                  "image, the image header may be unusable, or a flag is unknown to this kernel",
    errno.ENOSYS: "this kernel has no kexec_file_load (CONFIG_KEXEC_FILE is off, or the "
                  "platform forbids kexec, e.g. a confidential VM)",
    errno.EBADF: "a file descriptor passed to the kernel was not open for reading",
    errno.ENOENT: "the kernel image or initrd does not exist",
    errno.EFBIG: "the kernel image or initrd is larger than the kernel reads (2 GiB)",
    errno.ETXTBSY: "the kernel image or initrd is open for writing elsewhere (still being "
                   "written?): wait for the writer to finish",
    errno.EACCES: "the kernel image or initrd cannot be read (an LSM or IMA policy refused it)",
}
KEXEC_FALLBACK_ADVICE = "unexpected error from kexec_file_load; see dmesg"

REBOOT_ADVICE: dict[int, str] = {
    errno.EINVAL: "no kexec image is loaded, or a live-update file handler refused to freeze "
                  "(sessions stay preserved and the host keeps running): load the kernel again "
                  "and see dmesg",
    errno.EPERM: "this process lacks CAP_SYS_BOOT: run as root",
    errno.EBUSY: "a kexec load or unload is running (the kexec lock is held): retry",
    errno.ENOSPC: "live-update serialization found no room for a session or file (unexpected; "
                  "see dmesg); the host keeps running with its sessions preserved",
    errno.EAGAIN: "KHO finalization failed (6.19/7.0 kernels); the host keeps running with its "
                  "sessions preserved: see dmesg",
}
REBOOT_FALLBACK_ADVICE = "the reboot into the loaded kernel failed; the host keeps running: " \
                         "see dmesg"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError):
        return None


def lockdown_mode(root: Path) -> str | None:
    """The active lockdown mode from `<root>/sys/kernel/security/lockdown` (the bracketed word in
    `none [integrity] confidentiality`), or None when the file is absent."""
    text = _read_text(root / LOCKDOWN_PATH)
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _status_fields(root: Path) -> dict[str, str]:
    text = _read_text(root / "proc/self/status") or ""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def diagnose_kexec_eperm(root: Path) -> list[str]:
    """The reasons visible from `root` why kexec_file_load says EPERM, most specific first."""
    causes = []
    mode = lockdown_mode(root)
    if mode is not None and mode != "none":
        causes.append(f"kernel lockdown is in {mode!r} mode: only images signed with a key the "
                      "kernel trusts can be loaded")
    sysctl = root / "proc/sys/kernel"
    if (_read_text(sysctl / "kexec_load_disabled") or "").strip() == "1":
        causes.append("kernel.kexec_load_disabled is 1: kexec stays off until the next cold boot")
    if (_read_text(sysctl / "kexec_load_limit_reboot") or "").strip() == "0":
        causes.append("kernel.kexec_load_limit_reboot is 0: no more loads are allowed this boot")
    status = _status_fields(root)
    try:
        cap_eff = int(status["CapEff"], 16)
    except (KeyError, ValueError):
        cap_eff = None
    if cap_eff is not None and not cap_eff & (1 << CAP_SYS_BOOT):
        causes.append("this process lacks CAP_SYS_BOOT: run as root with that capability")
    if status.get("Seccomp") == "2":
        causes.append("this process runs under a seccomp filter (container runtimes' default "
                      "profiles forbid kexec): run on the host or allow kexec_file_load")
    return causes


def kexec_advice(err: int, root: Path) -> str:
    base = KEXEC_ADVICE.get(err, KEXEC_FALLBACK_ADVICE)
    if err != errno.EPERM:
        return base
    causes = diagnose_kexec_eperm(root)
    if not causes:
        causes = ["no lockdown, sysctl or capability explains it: a seccomp, LSM or container "
                  "policy forbids kexec (or CAP_SYS_BOOT is missing in the initial user "
                  "namespace)"]
    return f"{base}: " + "; ".join(causes)


def syscall_number(machine: str | None = None) -> int:
    arch = platform.machine() if machine is None else machine
    try:
        return KEXEC_FILE_LOAD_SYSCALL[arch.lower()]
    except KeyError:
        advice = f"KHO exists only on x86-64 and arm64; this machine is {arch}"
        raise KernelRefused(KEXEC_LOAD_OP, errno.ENOSYS, advice) from None


def encode_cmdline(cmdline: str) -> bytes:
    """The command line as the syscall takes it: UTF-8 with its terminating NUL."""
    raw = cmdline.encode("utf-8")
    if b"\0" in raw:
        raise InvalidArgument("the kernel command line contains a NUL byte: remove it")
    return raw + b"\0"


def open_images(kernel: Path, initrd: Path | None, stack: ExitStack
                ) -> tuple[RegularFile, RegularFile | None]:
    """Open a named kernel image (and initrd) as regular files, without blocking; both are
    closed with `stack`."""
    image = stack.enter_context(open_regular(kernel, "kernel image"))
    ramdisk = stack.enter_context(open_regular(initrd, "initrd")) if initrd is not None else None
    return image, ramdisk


def load_named(kexec: Kexec, kernel: Path, initrd: Path | None, cmdline: str) -> None:
    """Load a kernel given by name (the command-line tools and tests; the daemon opens the files
    itself, as its caller may)."""
    encode_cmdline(cmdline)  # a bad command line is refused before any file is opened
    with ExitStack() as stack:
        image, ramdisk = open_images(kernel, initrd, stack)
        kexec.load(image, ramdisk, cmdline)


def _check_image(file: RegularFile) -> None:
    if file.size == 0:
        raise InvalidArgument(f"{file.label} is empty")


def reboot_into_loaded_kernel() -> None:
    """The one place that calls reboot(LINUX_REBOOT_CMD_KEXEC). Returns only by raising OSError;
    on success the machine is gone. Tests replace this function and must never call it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class RealKexec:
    """kexec_file_load through the raw syscall (ctypes), `<root>/sys/kernel/kexec_loaded`, and
    the reboot into the loaded image."""

    def __init__(self, root: Path, machine: str | None = None,
                 systemctl: str = "systemctl") -> None:
        self.root = root
        self._machine = machine
        self._systemctl = systemctl
        self._libc: ctypes.CDLL | None = None

    def _syscall(self, kernel_fd: int, initrd_fd: int, cmdline: bytes | None, flags: int) -> int:
        """Run kexec_file_load; the errno, or 0 on success."""
        number = syscall_number(self._machine)
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._libc.syscall.restype = ctypes.c_long
        buf = ctypes.create_string_buffer(cmdline, len(cmdline)) if cmdline else None
        # syscall(2) reads every argument as a long: pass longs so -1 arrives sign-extended
        result = self._libc.syscall(
            ctypes.c_long(number), ctypes.c_long(kernel_fd), ctypes.c_long(initrd_fd),
            ctypes.c_ulong(len(cmdline) if cmdline else 0), buf, ctypes.c_ulong(flags))
        if result == 0:
            return 0
        return ctypes.get_errno() or errno.EIO  # never report a failure as success

    def available(self) -> bool:
        try:
            syscall_number(self._machine)
        except KernelRefused:
            return False
        # kernel fd -1 fails in kernel_read_file_from_fd (EBADF) before any image is built or
        # swapped, so the probe can neither load nor unload anything; EPERM/EBUSY/EINVAL also
        # prove the syscall exists
        return self._syscall(-1, -1, None, 0) != errno.ENOSYS

    def loaded(self) -> bool:
        text = _read_text(self.root / KEXEC_LOADED_PATH)
        if text is None:  # no CONFIG_KEXEC_CORE: nothing can be loaded
            return False
        value = text.strip()
        if value not in ("0", "1"):
            raise AbiMismatch(f"{self.root / KEXEC_LOADED_PATH} reads {value!r}, expected 0 or 1")
        return value == "1"

    def load(self, kernel: RegularFile, initrd: RegularFile | None, cmdline: str) -> None:
        syscall_number(self._machine)  # an unsupported machine fails before touching files
        raw = encode_cmdline(cmdline)
        _check_image(kernel)
        flags = KEXEC_FILE_NO_INITRAMFS
        initrd_fd = -1
        if initrd is not None:
            _check_image(initrd)
            initrd_fd = initrd.fd
            flags = 0
        err = self._syscall(kernel.fd, initrd_fd, raw, flags)
        if err:
            raise KernelRefused(KEXEC_LOAD_OP, err, kexec_advice(err, self.root))

    def unload(self) -> None:
        err = self._syscall(-1, -1, None, KEXEC_FILE_UNLOAD)
        if err:
            raise KernelRefused(KEXEC_UNLOAD_OP, err, kexec_advice(err, self.root))

    def reboot(self, *, via_systemd: bool) -> None:
        """`systemctl kexec` returns once systemd has queued the kexec (the shutdown then happens
        around the caller); reboot(2) returns only by raising."""
        if via_systemd:
            self._systemctl_kexec()
            return
        # reboot(LINUX_REBOOT_CMD_KEXEC) neither syncs nor unmounts: flush what we can first
        os.sync()
        try:
            reboot_into_loaded_kernel()
        except OSError as exc:
            err = exc.errno if exc.errno is not None else errno.EIO
            raise KernelRefused(REBOOT_OP, err,
                                REBOOT_ADVICE.get(err, REBOOT_FALLBACK_ADVICE)) from exc

    def _systemctl_kexec(self) -> None:
        # As root, systemctl skips the shutdown-inhibitor check unless asked; the agent honours
        # inhibitors (a backup, a package upgrade) and reports who blocks.
        command = [self._systemctl, "kexec", "--check-inhibitors=yes"]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=SYSTEMCTL_TIMEOUT)
        except FileNotFoundError as exc:
            raise NotFound(f"{self._systemctl} not found: systemd is not installed here; reboot "
                           "with reboot(2) instead (no systemd as PID 1)") from exc
        except subprocess.TimeoutExpired as exc:
            raise AgentError(f"`{' '.join(command)}` did not return within "
                             f"{SYSTEMCTL_TIMEOUT:.0f} s; check `systemctl list-jobs`") from exc
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout.strip() or "no output"
            if "inhibit" in detail.lower():
                raise Busy(f"the kexec is blocked by a shutdown inhibitor, nothing was lost: "
                           f"{detail} (`systemd-inhibit --list` shows who; commit again when "
                           "it is released)")
            raise AgentError(f"`{' '.join(command)}` failed with exit status {proc.returncode}: "
                             f"{detail}")
