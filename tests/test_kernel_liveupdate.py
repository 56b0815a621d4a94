"""The real /dev/liveupdate seam: ioctl numbering, argument structs, name rules, errno advice,
holder discovery, and real ioctls on fds that are not LUO fds (this machine has no LUO)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho_agent.errors import InvalidArgument, KernelRefused
from kho_agent.kernel import liveupdate as lu
from kho_agent.kernel.procfd import FdHolder, describe_holders, find_holders

NRS = {"CREATE_SESSION": 0x00, "RETRIEVE_SESSION": 0x01, "PRESERVE_FD": 0x40,
       "RETRIEVE_FD": 0x41, "FINISH": 0x42, "GET_NAME": 0x43}


# --- ioctl numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
@pytest.mark.parametrize("op", sorted(NRS))
def test_ioctl_numbers_on_kho_arches_match_the_reference_table(machine: str, op: str) -> None:
    # kernel-abi.md §3.2: _IOC_NONE == 0 there, so the value is 0xBA00 | nr
    assert lu.ioctl_number(op, machine) == 0xBA00 | NRS[op]


@pytest.mark.parametrize("machine", ["ppc64le", "ppc64", "mips64", "sparc64", "alpha"])
@pytest.mark.parametrize("op", sorted(NRS))
def test_ioctl_numbers_carry_ioc_none_on_three_dir_bit_arches(machine: str, op: str) -> None:
    # _IOC_NONE == 1 at bit 29 (13 size bits): 0x2000BA00 | nr
    assert lu.ioctl_number(op, machine) == 0x2000BA00 | NRS[op]


def test_ioctl_number_accepts_kernel_macro_names_and_rejects_unknown() -> None:
    assert lu.ioctl_number("LIVEUPDATE_SESSION_GET_NAME", "x86_64") == 0xBA43
    assert lu.ioctl_number("LIVEUPDATE_IOCTL_CREATE_SESSION", "ppc64le") == 0x2000BA00
    with pytest.raises(InvalidArgument, match="RETRIEVE_INTO_FD"):
        lu.ioctl_number("RETRIEVE_INTO_FD")
    assert lu.ioctl_numbers("aarch64") == {op: 0xBA00 | nr for op, nr in NRS.items()}


@pytest.mark.parametrize(("machine", "getflags", "setflags"), [
    # FS_IOC_GETFLAGS = _IOR('f', 1, long), FS_IOC_SETFLAGS = _IOW('f', 2, long): the published
    # values differ between the generic and the powerpc layouts (read/write bits swapped)
    ("x86_64", 0x80086601, 0x40086602),
    ("aarch64", 0x80086601, 0x40086602),
    ("ppc64le", 0x40086601, 0x80086602),
])
def test_ioc_direction_and_size_bits_against_published_ioctls(
        machine: str, getflags: int, setflags: int) -> None:
    layout = lu.ioc_layout(machine)
    assert lu._IOC(layout.read, ord("f"), 1, 8, machine) == getflags
    assert lu._IOC(layout.write, ord("f"), 2, 8, machine) == setflags


def test_ioc_refuses_fields_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="nr"):
        lu._IOC(0, 0xBA, 256, 0, "x86_64")
    with pytest.raises(ValueError, match="size"):
        lu._IOC(0, 0xBA, 0, 1 << 14, "x86_64")
    lu._IOC(0, 0xBA, 0, (1 << 14) - 1, "x86_64")  # the largest generic size fits
    with pytest.raises(ValueError, match="size"):
        lu._IOC(1, 0xBA, 0, 1 << 13, "ppc64le")  # powerpc has one size bit fewer


# --- structs ---------------------------------------------------------------------------------

def test_struct_sizes_match_the_uapi() -> None:
    assert (lu.SESSION_ARGS_SIZE, lu.FD_ARGS_SIZE, lu.FINISH_ARGS_SIZE,
            lu.GET_NAME_ARGS_SIZE) == (72, 16, 8, 72)
    assert {op: size for op, (_, _, size) in lu.LUO_IOCTLS.items()} == {
        "CREATE_SESSION": 72, "RETRIEVE_SESSION": 72, "PRESERVE_FD": 16, "RETRIEVE_FD": 16,
        "FINISH": 8, "GET_NAME": 72}
    packed = [lu.pack_create_session(b"a"), lu.pack_retrieve_session(b"a"),
              lu.pack_preserve_fd(3, 1), lu.pack_retrieve_fd(1), lu.pack_finish(),
              lu.pack_get_name()]
    assert [len(p) for p in packed] == [72, 72, 16, 16, 8, 72]
    # the first u32 of every struct is its own size
    assert [struct.unpack_from("<I", p)[0] for p in packed] == [72, 72, 16, 16, 8, 72]


def test_byte_layout_of_preserve_fd_and_create_session() -> None:
    # hand-built from the C layout: u32 size, s32 fd, u64 token (little-endian here)
    assert lu.pack_preserve_fd(5, 0x1122334455667788) == (
        b"\x10\x00\x00\x00" b"\x05\x00\x00\x00" b"\x88\x77\x66\x55\x44\x33\x22\x11")
    raw = lu.pack_create_session(b"vm-1")
    assert raw[:8] == b"\x48\x00\x00\x00\xff\xff\xff\xff"  # size 72, fd -1 (out field)
    assert raw[8:12] == b"vm-1" and raw[12:] == bytes(60)
    assert lu.pack_finish() == b"\x08\x00\x00\x00\x00\x00\x00\x00"


def test_pack_unpack_round_trips() -> None:
    name63 = b"n" * 63
    assert lu.unpack_create_session(lu.pack_create_session(name63, fd=9)) == \
        lu.SessionArgs(72, 9, name63)
    assert lu.unpack_retrieve_session(lu.pack_retrieve_session(b"x", fd=4)) == \
        lu.SessionArgs(72, 4, b"x")
    assert lu.unpack_preserve_fd(lu.pack_preserve_fd(7, 2**64 - 1)) == \
        lu.FdArgs(16, 7, 2**64 - 1)
    assert lu.unpack_retrieve_fd(lu.pack_retrieve_fd(0x1A, fd=11)) == lu.FdArgs(16, 11, 0x1A)
    assert lu.unpack_finish(lu.pack_finish(3)) == lu.FinishArgs(8, 3)
    filled = bytearray(lu.pack_get_name())
    filled[8:8 + 12] = b"test-session"  # what the kernel writes back
    assert lu.unpack_get_name(filled) == lu.GetNameArgs(72, 0, b"test-session")


def test_pack_keeps_a_64_byte_name_without_nul_but_refuses_longer() -> None:
    # 64 bytes with no NUL is the kernel's own EINVAL case: expressible on purpose
    assert lu.pack_create_session(b"x" * 64)[8:] == b"x" * 64
    with pytest.raises(ValueError):
        lu.pack_create_session(b"x" * 65)  # struct would truncate it silently


def test_unpack_refuses_wrong_lengths() -> None:
    with pytest.raises(ValueError):
        lu.unpack_create_session(bytes(71))
    with pytest.raises(ValueError):
        lu.unpack_finish(bytes(16))


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "a",
    "x" * 63,
    "x" * 61 + "é",          # 61 + 2 = 63 bytes
    "x" * 60 + "€",          # 60 + 3 = 63 bytes
    "kho-agent/vm 1:guest",
])
def test_valid_session_names(name: str) -> None:
    raw = lu.validate_session_name(name)
    assert raw == name.encode()
    assert 1 <= len(raw) <= 63


@pytest.mark.parametrize(("name", "reason"), [
    ("", "empty"),
    ("x" * 64, "64 bytes"),
    ("x" * 62 + "é", "64 bytes"),  # only 63 characters, but 64 bytes
    ("x" * 61 + "€", "64 bytes"),
    ("a\0b", "NUL"),
    ("\0", "NUL"),
    ("bad\ud800", "UTF-8"),        # a lone surrogate has no UTF-8 form
])
def test_invalid_session_names(name: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        lu.validate_session_name(name)


def test_session_name_must_be_a_string() -> None:
    with pytest.raises(InvalidArgument):
        lu.validate_session_name(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [0, 1, 0x1A, 2**63, 2**64 - 1])
def test_valid_tokens(token: int) -> None:
    assert lu.validate_token(token) == token


@pytest.mark.parametrize("token", [-1, 2**64, 2**70, True])
def test_invalid_tokens(token: int) -> None:
    with pytest.raises(InvalidArgument):
        lu.validate_token(token)


# --- errno advice ----------------------------------------------------------------------------

REQUIRED_ADVICE = [
    ("open", errno.ENOENT), ("open", errno.EBUSY), ("open", errno.EIO),
    ("CREATE_SESSION", errno.EEXIST), ("CREATE_SESSION", errno.EINVAL),
    ("CREATE_SESSION", errno.ENOSPC), ("CREATE_SESSION", errno.EMFILE),
    ("RETRIEVE_SESSION", errno.ENOENT), ("RETRIEVE_SESSION", errno.EINVAL),
    ("PRESERVE_FD", errno.ENOENT), ("PRESERVE_FD", errno.EBUSY), ("PRESERVE_FD", errno.EEXIST),
    ("PRESERVE_FD", errno.EOPNOTSUPP), ("PRESERVE_FD", errno.EFBIG), ("PRESERVE_FD", errno.EBADF),
    ("PRESERVE_FD", errno.ENOMEM), ("PRESERVE_FD", errno.EINVAL),
    ("RETRIEVE_FD", errno.ENOENT), ("RETRIEVE_FD", errno.EIO),
    ("FINISH", errno.EBUSY), ("FINISH", errno.EINVAL),
    ("GET_NAME", errno.EINVAL), ("GET_NAME", errno.ENOTTY),
]


@pytest.mark.parametrize(("op", "err"), REQUIRED_ADVICE)
def test_every_documented_errno_has_its_own_advice(op: str, err: int) -> None:
    assert (op, err) in lu.LUO_ADVICE
    # op-specific, not the common text or the fallback
    assert lu.luo_advice(op, err) not in (lu.LUO_GENERIC_ADVICE.get(err), lu.LUO_FALLBACK_ADVICE)


def test_every_template_fills_without_context() -> None:
    for (op, err) in lu.LUO_ADVICE:
        text = lu.luo_advice(op, err)
        assert "{" not in text and "}" not in text, (op, err)


def test_advice_texts_carry_the_facts_from_the_reference() -> None:
    assert "kho=on liveupdate=on" in lu.luo_advice("open", errno.ENOENT, path="/dev/liveupdate")
    eexist = lu.luo_advice("CREATE_SESSION", errno.EEXIST, name="vm-1")
    assert "'vm-1'" in eexist and "throwaway session" in eexist and "panic" in eexist
    assert "no incoming session 'vm-7'" in lu.luo_advice("RETRIEVE_SESSION", errno.ENOENT,
                                                         name="vm-7")
    assert "hugetlb" in lu.luo_advice("PRESERVE_FD", errno.ENOENT)
    assert "cold boot" in lu.luo_advice("open", errno.EIO)


def test_unknown_errno_keeps_its_errno_with_the_fallback() -> None:
    exc = lu.luo_refused("FINISH", errno.EXDEV, name="s")
    assert exc.errno == errno.EXDEV and exc.op == "FINISH"
    assert exc.advice == lu.LUO_FALLBACK_ADVICE
    assert "EXDEV" in str(exc)
    # a common errno without an op entry gets the common text
    assert lu.luo_refused("PRESERVE_FD", errno.E2BIG).advice == lu.LUO_GENERIC_ADVICE[errno.E2BIG]


# --- the device on this machine and under a fake root ----------------------------------------

def test_real_root_has_no_device_and_open_says_why() -> None:
    if os.path.exists("/dev/liveupdate"):
        pytest.skip("this machine has /dev/liveupdate")
    dev = lu.RealLiveUpdate(Path("/"))
    assert dev.present() is False
    with pytest.raises(KernelRefused) as info:
        dev.open()
    assert info.value.errno == errno.ENOENT and info.value.op == "open"
    assert info.value.advice == lu.luo_advice("open", errno.ENOENT, path="/dev/liveupdate")
    assert "CONFIG_LIVEUPDATE" in str(info.value)


def _fake_proc(root: Path, pid: int, links: dict[int, Path], comm: str) -> None:
    fd_dir = root / "proc" / str(pid) / "fd"
    fd_dir.mkdir(parents=True)
    (root / "proc" / str(pid) / "comm").write_text(comm + "\n")
    for fd, target in links.items():
        (fd_dir / str(fd)).symlink_to(target)


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    device = tmp_path / "dev" / "liveupdate"
    device.parent.mkdir()
    device.write_bytes(b"")
    other = tmp_path / "other"
    other.write_bytes(b"")
    _fake_proc(tmp_path, 4242, {7: device, 3: other}, "kho-agentd")
    _fake_proc(tmp_path, 4243, {3: other}, "bystander")
    _fake_proc(tmp_path, 99, {12: Path("../../../dev/liveupdate")}, "relative")  # hand-made
    (tmp_path / "proc" / "500").mkdir()  # a process that vanished: no fd directory
    (tmp_path / "proc" / "self").mkdir()  # not a pid
    (tmp_path / "proc" / "4243" / "fd" / "9").write_text("not a link")
    return tmp_path


def test_holders_under_a_fake_root(fake_root: Path) -> None:
    dev = lu.RealLiveUpdate(fake_root)
    assert dev.present() is True
    assert dev.holders() == [99, 4242]
    details = dev.holder_details()
    assert details[1] == FdHolder(4242, "kho-agentd", (7,))
    assert describe_holders(details, self_pid=1) == \
        "pid 99 (relative), pid 4242 (kho-agentd)"


def test_open_ebusy_names_the_holders(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A regular file cannot be made to answer EBUSY: stand in for the kernel at os.open only.
    def busy(path: object, flags: int, mode: int = 0o777) -> int:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    monkeypatch.setattr(os, "open", busy)
    with pytest.raises(KernelRefused) as info:
        lu.RealLiveUpdate(fake_root).open()
    assert info.value.errno == errno.EBUSY
    assert "pid 4242 (kho-agentd)" in info.value.advice
    assert "another live-update agent holds" in info.value.advice


def test_open_ebusy_without_visible_holder_says_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "liveupdate").write_bytes(b"")

    def busy(path: object, flags: int, mode: int = 0o777) -> int:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    monkeypatch.setattr(os, "open", busy)
    with pytest.raises(KernelRefused, match="unknown holder"):
        lu.RealLiveUpdate(tmp_path).open()


def test_open_missing_device_under_a_root_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(KernelRefused) as info:
        lu.RealLiveUpdate(tmp_path).open()
    assert info.value.errno == errno.ENOENT
    assert str(tmp_path / "dev" / "liveupdate") in info.value.advice


def test_open_failure_without_table_entry_keeps_its_errno(tmp_path: Path) -> None:
    (tmp_path / "dev" / "liveupdate").mkdir(parents=True)  # O_RDWR on a directory: EISDIR
    with pytest.raises(KernelRefused) as info:
        lu.RealLiveUpdate(tmp_path).open()
    assert info.value.errno == errno.EISDIR
    assert info.value.advice == lu.LUO_FALLBACK_ADVICE


def test_scanning_the_real_proc_finds_this_process(tmp_path: Path) -> None:
    target = tmp_path / "held"
    target.write_bytes(b"x")
    fd = os.open(target, os.O_RDONLY)
    try:
        found = {h.pid: h for h in find_holders(target, Path("/proc"))}
        assert os.getpid() in found
        assert fd in found[os.getpid()].fds
        assert "this process" in describe_holders([found[os.getpid()]])
    finally:
        os.close(fd)
    after = {h.pid: h for h in find_holders(target, Path("/proc"))}
    assert os.getpid() not in after


def test_scanning_a_missing_proc_finds_nobody(tmp_path: Path) -> None:
    assert find_holders(tmp_path / "x", tmp_path / "no-proc") == []


# --- real ioctls on fds that are not LUO fds -------------------------------------------------

@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("kho-agent-test", os.MFD_CLOEXEC)
    os.write(fd, b"guest memory")
    yield fd
    os.close(fd)


def _raw_errno(fd: int, op: str) -> int:
    """What the kernel answers for a LUO ioctl on `fd`, asked directly (no wrapper)."""
    size = lu.LUO_IOCTLS[op][2]
    buf = bytearray(size)
    struct.pack_into("=I", buf, 0, size)
    with pytest.raises(OSError) as info:
        fcntl.ioctl(fd, lu.ioctl_number(op), buf, True)
    assert info.value.errno is not None
    return info.value.errno


def test_session_wrapper_keeps_the_kernels_errno(memfd: int) -> None:
    expected = {op: _raw_errno(memfd, op)
                for op in ("PRESERVE_FD", "RETRIEVE_FD", "FINISH", "GET_NAME")}
    assert set(expected.values()) <= {errno.ENOTTY, errno.EINVAL}  # what a shmem file says
    other = os.memfd_create("payload", os.MFD_CLOEXEC)
    session = lu.RealLiveUpdateSession(memfd, "probe", incoming=False)
    try:
        calls = {
            "PRESERVE_FD": lambda: session.preserve_fd(other, 0x1A),
            "RETRIEVE_FD": lambda: session.retrieve_fd(0x1A),
            "FINISH": session.finish,
            "GET_NAME": session.get_name,
        }
        for op, call in calls.items():
            with pytest.raises(KernelRefused) as info:
                call()
            assert info.value.op == op
            assert info.value.errno == expected[op]
            assert info.value.advice == lu.luo_advice(op, expected[op], name="probe",
                                                      token="26 (0x1a)", fd=other)
    finally:
        os.close(other)
    # the wrapper did not take the fd away or touch its contents
    assert os.pread(memfd, 12, 0) == b"guest memory"
    assert session.fileno() == memfd and session.name == "probe" and not session.incoming


def test_device_wrapper_keeps_the_kernels_errno(memfd: int) -> None:
    expected = _raw_errno(memfd, "CREATE_SESSION")
    device = lu.RealLiveUpdateDevice(memfd)
    with pytest.raises(KernelRefused) as info:
        device.create_session("vm-1")
    assert (info.value.op, info.value.errno) == ("CREATE_SESSION", expected)
    with pytest.raises(KernelRefused) as info:
        device.retrieve_session("vm-1")
    assert info.value.op == "RETRIEVE_SESSION"
    with pytest.raises(InvalidArgument):
        device.create_session("x" * 64)  # refused before any ioctl


def test_session_arguments_are_checked_before_the_ioctl(memfd: int) -> None:
    session = lu.RealLiveUpdateSession(memfd, "probe", incoming=False)
    with pytest.raises(InvalidArgument):
        session.preserve_fd(memfd, 2**64)
    with pytest.raises(InvalidArgument):
        session.preserve_fd(-1, 1)
    with pytest.raises(InvalidArgument):
        session.retrieve_fd(-5)


def test_close_is_idempotent_and_later_calls_say_ebadf() -> None:
    fd = os.memfd_create("closing", os.MFD_CLOEXEC)
    session = lu.RealLiveUpdateSession(fd, "gone", incoming=True)
    session.close()
    session.close()
    assert session.closed
    with pytest.raises(OSError):
        os.fstat(fd)  # the fd really was closed (and not reused in between)
    with pytest.raises(KernelRefused) as info:
        session.finish()
    assert info.value.errno == errno.EBADF and "'gone'" in info.value.advice
    with pytest.raises(KernelRefused):
        session.fileno()

    dfd = os.memfd_create("device", os.MFD_CLOEXEC)
    with lu.RealLiveUpdateDevice(dfd) as device:
        pass
    device.close()
    with pytest.raises(KernelRefused) as info:
        device.create_session("late")
    assert info.value.errno == errno.EBADF
