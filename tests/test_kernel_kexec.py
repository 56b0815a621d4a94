"""The real kexec seam: kexec_file_load arguments, errors before and from the syscall, errno
advice, /sys/kernel/kexec_loaded, and the reboot paths (which never reach reboot(2) here)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kho_agent.errors import (
    AbiMismatch,
    AgentError,
    Busy,
    InvalidArgument,
    KernelRefused,
    NotFound,
)
from kho_agent.kernel import kexec as kx
from kho_agent.kernel.callerfile import open_regular
from kho_agent.kernel.kexec import load_named


@pytest.fixture(autouse=True)
def never_reboot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test in this file runs with reboot(2) unreachable."""
    def forbidden() -> None:
        pytest.fail("reboot_into_loaded_kernel() was reached from a test")

    monkeypatch.setattr(kx, "reboot_into_loaded_kernel", forbidden)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@dataclass
class Call:
    kernel_fd: int
    initrd_fd: int
    cmdline: bytes | None
    flags: int
    kernel_ino: int | None
    initrd_ino: int | None


class RecordingKexec(kx.RealKexec):
    """RealKexec with the syscall replaced by a recorder that answers `answer`."""

    def __init__(self, root: Path, answer: int = 0, machine: str | None = "x86_64") -> None:
        super().__init__(root, machine=machine)
        self.calls: list[Call] = []
        self.answer = answer

    def _syscall(self, kernel_fd: int, initrd_fd: int, cmdline: bytes | None, flags: int) -> int:
        def ino(fd: int) -> int | None:
            return os.fstat(fd).st_ino if fd >= 0 else None

        self.calls.append(Call(kernel_fd, initrd_fd, cmdline, flags, ino(kernel_fd),
                               ino(initrd_fd)))
        return self.answer


@pytest.fixture
def images(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd.img"
    kernel.write_bytes(b"MZ not really a kernel")
    initrd.write_bytes(b"070701 not really a cpio")
    yield kernel, initrd


# --- arguments as the syscall sees them ------------------------------------------------------

def test_load_without_initrd_passes_no_initramfs_and_a_nul_terminated_cmdline(
        tmp_path: Path, images: tuple[Path, Path]) -> None:
    kernel, _ = images
    kexec = RecordingKexec(tmp_path)
    before = _open_fds()
    load_named(kexec, kernel, None, "console=ttyS0 kho=on")
    (call,) = kexec.calls
    assert call.cmdline == b"console=ttyS0 kho=on\0"  # cmdline_len counts the NUL
    assert call.flags == kx.KEXEC_FILE_NO_INITRAMFS == 0x4
    assert call.initrd_fd == -1
    assert call.kernel_ino == kernel.stat().st_ino
    assert _open_fds() == before  # closed again


def test_load_with_initrd_passes_both_files(tmp_path: Path, images: tuple[Path, Path]) -> None:
    kernel, initrd = images
    kexec = RecordingKexec(tmp_path)
    load_named(kexec, kernel, initrd, "")
    (call,) = kexec.calls
    assert call.flags == 0
    assert (call.kernel_ino, call.initrd_ino) == (kernel.stat().st_ino, initrd.stat().st_ino)
    assert call.cmdline == b"\0"


def test_load_closes_files_when_the_kernel_refuses(
        tmp_path: Path, images: tuple[Path, Path]) -> None:
    kernel, initrd = images
    kexec = RecordingKexec(tmp_path, answer=errno.EADDRNOTAVAIL)
    before = _open_fds()
    with pytest.raises(KernelRefused) as info:
        load_named(kexec, kernel, initrd, "x")
    assert _open_fds() == before
    assert info.value.errno == errno.EADDRNOTAVAIL and info.value.op == "kexec_file_load"
    assert "kho_scratch=" in info.value.advice


def test_unload_passes_the_unload_flag_and_no_files(tmp_path: Path) -> None:
    kexec = RecordingKexec(tmp_path)
    kexec.unload()
    (call,) = kexec.calls
    assert (call.kernel_fd, call.initrd_fd, call.cmdline, call.flags) == (-1, -1, None, 0x1)


def test_unload_refusal_keeps_errno(tmp_path: Path) -> None:
    with pytest.raises(KernelRefused) as info:
        RecordingKexec(tmp_path, answer=errno.EBUSY).unload()
    assert info.value.errno == errno.EBUSY and "UNLOAD" in info.value.op


# --- errors raised before the syscall --------------------------------------------------------

def test_missing_kernel_names_the_path_before_any_syscall(
        tmp_path: Path, images: tuple[Path, Path]) -> None:
    _, initrd = images
    kexec = RecordingKexec(tmp_path)
    missing = tmp_path / "boot" / "vmlinuz-7.3.0"
    before = _open_fds()
    with pytest.raises(NotFound, match=re.escape(str(missing))):
        load_named(kexec, missing, initrd, "")
    assert kexec.calls == []
    assert _open_fds() == before


def test_missing_initrd_names_the_path_and_closes_the_kernel(
        tmp_path: Path, images: tuple[Path, Path]) -> None:
    kernel, _ = images
    kexec = RecordingKexec(tmp_path)
    before = _open_fds()
    with pytest.raises(NotFound, match=r"initrd .*nope\.img"):
        load_named(kexec, kernel, tmp_path / "nope.img", "")
    assert kexec.calls == [] and _open_fds() == before


def test_empty_or_non_regular_images_and_nul_in_cmdline_are_refused(
        tmp_path: Path, images: tuple[Path, Path]) -> None:
    kernel, _ = images
    kexec = RecordingKexec(tmp_path)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(InvalidArgument, match="empty"):
        load_named(kexec, empty, None, "")
    with pytest.raises(InvalidArgument, match="regular file"):
        load_named(kexec, tmp_path, None, "")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="regular file"):  # and does not block opening it
        load_named(kexec, kernel, fifo, "")
    with pytest.raises(InvalidArgument, match="NUL"):
        load_named(kexec, kernel, None, "a\0b")
    assert kexec.calls == []


def test_a_machine_without_kho_is_refused_before_the_syscall(
        tmp_path: Path, images: tuple[Path, Path]) -> None:
    kexec = RecordingKexec(tmp_path, machine="riscv64")
    assert kexec.available() is False
    with pytest.raises(KernelRefused) as info, open_regular(images[0]) as kernel:
        kexec.load(kernel, None, "")
    assert info.value.errno == errno.ENOSYS
    assert "x86-64 and arm64" in info.value.advice
    assert kexec.calls == []


def test_syscall_numbers() -> None:
    assert kx.syscall_number("x86_64") == 320
    assert kx.syscall_number("aarch64") == 294
    with pytest.raises(KernelRefused):
        kx.syscall_number("ppc64le")


# --- the real syscall on this host -----------------------------------------------------------

def test_available_on_this_host_answers_without_raising() -> None:
    assert isinstance(kx.RealKexec(Path("/")).available(), bool)


def test_loading_a_non_kernel_file_is_refused_with_the_advice_for_its_errno(
        tmp_path: Path) -> None:
    if kx.KEXEC_FILE_LOAD_SYSCALL.get(os.uname().machine) is None:
        pytest.skip("kexec_file_load is only called on x86-64 and arm64")
    not_a_kernel = tmp_path / "hostname"
    source = Path("/etc/hostname")
    if source.is_file() and source.stat().st_size:
        shutil.copyfile(source, not_a_kernel)
    else:
        not_a_kernel.write_text("not-a-kernel\n")
    before = _open_fds()
    with pytest.raises(KernelRefused) as info:
        load_named(kx.RealKexec(Path("/")), not_a_kernel, None, "console=ttyS0")
    # the sandbox may forbid kexec (EPERM) or lack it (ENOSYS); a real one rejects the image
    assert info.value.errno in {errno.EPERM, errno.ENOEXEC, errno.EINVAL, errno.ENOSYS,
                                errno.EBADMSG}
    assert info.value.advice == kx.kexec_advice(info.value.errno, Path("/"))
    assert info.value.advice.startswith(kx.KEXEC_ADVICE[info.value.errno])
    assert _open_fds() == before


# --- errno advice ----------------------------------------------------------------------------

@pytest.mark.parametrize("err", [
    errno.EADDRNOTAVAIL, errno.EPERM, errno.ENOEXEC, errno.EKEYREJECTED, errno.EKEYREVOKED,
    errno.EBADMSG, errno.EBUSY, errno.ENOMEM, errno.EINVAL, errno.ENOSYS, errno.EBADF,
    errno.ENOENT,
])
def test_every_documented_kexec_errno_has_advice(err: int) -> None:
    assert err in kx.KEXEC_ADVICE
    assert kx.kexec_advice(err, Path("/nonexistent-root")) != kx.KEXEC_FALLBACK_ADVICE


def test_signature_errnos_say_signature() -> None:
    for err in (errno.EKEYREJECTED, errno.EKEYREVOKED, errno.EBADMSG):
        assert "signature verification failed" in kx.KEXEC_ADVICE[err]


def test_unknown_kexec_errno_falls_back() -> None:
    assert kx.kexec_advice(errno.EXDEV, Path("/")) == kx.KEXEC_FALLBACK_ADVICE


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_eperm_names_the_lockdown_mode(tmp_path: Path) -> None:
    _write(tmp_path, "sys/kernel/security/lockdown", "none [integrity] confidentiality\n")
    assert kx.lockdown_mode(tmp_path) == "integrity"
    advice = kx.kexec_advice(errno.EPERM, tmp_path)
    assert "lockdown is in 'integrity' mode" in advice


def test_eperm_ignores_lockdown_none_and_falls_back_to_policy(tmp_path: Path) -> None:
    _write(tmp_path, "sys/kernel/security/lockdown", "[none] integrity confidentiality\n")
    _write(tmp_path, "proc/self/status", "Name:\tx\nCapEff:\t000001ffffffffff\nSeccomp:\t0\n")
    advice = kx.kexec_advice(errno.EPERM, tmp_path)
    assert "lockdown is in" not in advice
    assert "seccomp, LSM or container policy" in advice


def test_eperm_names_missing_cap_sys_boot_seccomp_and_sysctls(tmp_path: Path) -> None:
    without_boot = (1 << 41) - 1 & ~(1 << 22)  # every capability but CAP_SYS_BOOT (22)
    _write(tmp_path, "proc/self/status", f"CapEff:\t{without_boot:016x}\nSeccomp:\t2\n")
    _write(tmp_path, "proc/sys/kernel/kexec_load_disabled", "1\n")
    _write(tmp_path, "proc/sys/kernel/kexec_load_limit_reboot", "0\n")
    causes = kx.diagnose_kexec_eperm(tmp_path)
    assert len(causes) == 4
    text = " ".join(causes)
    for needle in ("CAP_SYS_BOOT", "seccomp", "kexec_load_disabled", "kexec_load_limit_reboot"):
        assert needle in text


def test_eperm_does_not_blame_a_present_cap_sys_boot(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/status", "CapEff:\t0000000000400000\nSeccomp:\t0\n")  # bit 22
    assert kx.diagnose_kexec_eperm(tmp_path) == []


# --- kexec_loaded ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [("1\n", True), ("0\n", False)])
def test_loaded_reads_the_fake_root(tmp_path: Path, text: str, expected: bool) -> None:
    _write(tmp_path, kx.KEXEC_LOADED_PATH, text)
    assert kx.RealKexec(tmp_path).loaded() is expected


def test_loaded_is_false_without_the_file_and_refuses_garbage(tmp_path: Path) -> None:
    assert kx.RealKexec(tmp_path).loaded() is False
    _write(tmp_path, kx.KEXEC_LOADED_PATH, "yes\n")
    with pytest.raises(AbiMismatch):
        kx.RealKexec(tmp_path).loaded()


# --- reboot ----------------------------------------------------------------------------------

def _fake_systemctl(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "systemctl"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_reboot_via_systemd_runs_systemctl_kexec(tmp_path: Path) -> None:
    log = tmp_path / "args"
    script = _fake_systemctl(tmp_path, f'echo "$@" > {log}\nexit 0\n')
    kx.RealKexec(tmp_path, systemctl=str(script)).reboot(via_systemd=True)
    assert log.read_text() == "kexec --check-inhibitors=yes\n"


def test_a_shutdown_inhibitor_is_reported_as_busy(tmp_path: Path) -> None:
    script = _fake_systemctl(tmp_path, 'echo "Operation inhibited by \\"backup\\" (PID 42 '
                             '\\"borg\\", user root), reason is \\"nightly\\"." >&2\nexit 1\n')
    with pytest.raises(Busy) as info:
        kx.RealKexec(tmp_path, systemctl=str(script)).reboot(via_systemd=True)
    assert "borg" in info.value.message and "systemd-inhibit --list" in info.value.message


def test_reboot_via_systemd_failure_carries_stderr_and_status(tmp_path: Path) -> None:
    script = _fake_systemctl(
        tmp_path, 'echo "Failed to start kexec.target: Unit not found." >&2\nexit 5\n')
    with pytest.raises(AgentError) as info:
        kx.RealKexec(tmp_path, systemctl=str(script)).reboot(via_systemd=True)
    assert "exit status 5" in info.value.message
    assert "Unit not found" in info.value.message


def test_reboot_via_systemd_without_systemctl_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        kx.RealKexec(tmp_path, systemctl=str(tmp_path / "absent")).reboot(via_systemd=True)


def test_direct_reboot_failure_keeps_the_errno(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reached = []

    def refuse() -> None:
        reached.append(True)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(kx, "reboot_into_loaded_kernel", refuse)
    with pytest.raises(KernelRefused) as info:
        kx.RealKexec(tmp_path).reboot(via_systemd=False)
    assert reached == [True]
    assert info.value.errno == errno.EINVAL and info.value.op == kx.REBOOT_OP
    assert "no kexec image is loaded" in info.value.advice
