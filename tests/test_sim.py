"""The simulated kernel (kho_agent.sim): a full live-update cycle checked with the decoder on both
sides, the 7.2/7.3 session rules and errnos, the kernel defects it reproduces, faults, ABI
mismatches, cross-process behaviour and an older-ABI cycle. Real memfds throughout."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho_agent.abi import KhoInput, ScratchArea, Severity, Side, decode_state, registry
from kho_agent.abi.compat import abi_from_payload
from kho_agent.abi.formats.kexec_metadata_v1 import KexecMetadata
from kho_agent.abi.formats.records import LuoLimits
from kho_agent.abi.kho_state import KhoState, scratch_roles
from kho_agent.abi.luo_common import LuoState
from kho_agent.abi.memfd import MemfdState
from kho_agent.errors import AgentError, Busy, InvalidArgument, KernelRefused, NotFound
from kho_agent.kernel import debugfs
from kho_agent.kernel.fsmagic import TMPFS_MAGIC, fs_magic
from kho_agent.kernel.host import Host
from kho_agent.kernel.image import read_image
from kho_agent.kernel.kexec import load_named
from kho_agent.kernel.kho_scratch import ScratchParam, ScratchSizes
from kho_agent.kernel.params import kstrtobool
from kho_agent.kernel.physmem import ElfCoreMemory
from kho_agent.sim import SimAbi, SimKernel, check_abi
from kho_agent.sim import boot as simboot
from kho_agent.sim import liveupdate as simlu
from kho_agent.sim.versions import era_combinations

F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
PAGE = 4096
CMDLINE = "console=ttyS0 kho=on liveupdate=on"
REPO = Path(__file__).resolve().parent.parent


# --- helpers ---------------------------------------------------------------------------------

def decode(host: Host, side: str, *, sync: bool = True) -> KhoState:
    """What the engine does: sync, then decode debugfs kho/<side> + proc/kcore (without sync:
    the files exactly as they are on disk)."""
    if sync:
        host.sync()
    snap = debugfs.read_snapshot(debugfs.kho_dir(host.debugfs, side))
    roles = scratch_roles(len(snap.scratch_phys))
    scratch = [ScratchArea(p, n, r) for p, n, r in zip(snap.scratch_phys, snap.scratch_len,
                                                       roles, strict=True)]
    memory = ElfCoreMemory(str(host.path("proc/kcore")))
    try:
        return decode_state(KhoInput(snap.fdt, snap.sub_blobs, scratch, memory, Side(side)))
    finally:
        memory.close()


def decode_handover(directory: Path, scratch: list[tuple[int, int]]) -> KhoState:
    """The handover exactly as the next kernel gets it, checked as an outgoing state (its memory
    map is intact there), so the serialized sessions and files are checked too."""
    memory = ElfCoreMemory(str(directory / "handover/memory.core"))
    try:
        areas = [ScratchArea(p, n, r) for (p, n), r in zip(scratch, scratch_roles(len(scratch)),
                                                           strict=True)]
        return decode_state(KhoInput((directory / "handover/fdt").read_bytes(), {}, areas,
                                     memory, Side.OUT))
    finally:
        memory.close()


def errors(state: KhoState) -> list[str]:
    return [f"{f.code} {f.path}: {f.message}" for f in state.findings
            if f.severity is Severity.ERROR]


def codes(state: KhoState) -> set[str]:
    return {f.code for f in state.findings}


def subtree(state: KhoState, name: str) -> object:
    return next(s.decoded for s in state.subtrees if s.name == name)


def memfd(content: bytes = b"", *, size: int | None = None, sealing: bool = False) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING if sealing else 0)
    if size is not None:
        os.ftruncate(fd, size)
    if content:
        os.pwrite(fd, content, 0)
    return fd


def refused(err: int) -> pytest.RaisesExc[KernelRefused]:
    return pytest.raises(KernelRefused, match=errno.errorcode[err])


def kexec(kernel: SimKernel, *, release: str = "7.3.1-sim", abi: SimAbi | None = None,
          cmdline: str = CMDLINE) -> SimKernel:
    """Load a synthetic image and reboot into it; return the attached new boot."""
    host = kernel.host()
    image = kernel.write_kernel_image(kernel.directory / f"img-{release}", release=release,
                                      abi=abi or kernel.abi)
    load_named(host.kexec, image, None, cmdline)
    host.kexec.reboot(via_systemd=False)
    return SimKernel(kernel.directory)


@pytest.fixture
def sim(tmp_path: Path) -> SimKernel:
    return SimKernel.create(tmp_path / "sim")


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            continue


# --- the full cycle --------------------------------------------------------------------------

def test_full_cycle_byte_exact_on_both_sides(sim: SimKernel, fds: list[int]) -> None:
    host = sim.host()
    dev = host.liveupdate.open()
    vm, agent = dev.create_session("vm-1"), dev.create_session("kho-agent")
    one = b"KHO-LUO demo payload: hello from the first kernel".ljust(PAGE, b"!")
    sparse = b"tail-bytes"
    sealed = b"manifest v1"
    a = memfd(one)
    b = memfd(size=4 * PAGE)                     # pages 0..2 a hole, data in page 3
    os.pwrite(b, sparse, 3 * PAGE + 5)
    os.lseek(b, 123, os.SEEK_SET)
    c = memfd(sealed, sealing=True)
    fcntl.fcntl(c, fcntl.F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
    os.lseek(c, 3, os.SEEK_SET)
    fds += [a, b, c]
    vm.preserve_fd(a, 0x1001)
    vm.preserve_fd(b, 0x1002)
    agent.preserve_fd(c, 0)
    # written after PRESERVE_FD: the freeze at reboot refreshes the data pages
    os.pwrite(a, b"late", 10)
    os.lseek(a, 50, os.SEEK_SET)

    out = decode(host, "out")
    assert errors(out) == []
    # the 7.2/7.3 debugfs defect: out/fdt frozen at its size before LUO and memblock were added
    assert "debugfs-fdt-truncated" in codes(out)
    assert out.root_source == "truncated-fdt" and out.memmap is not None
    luo = subtree(out, "LUO")
    assert isinstance(luo, LuoState) and luo.sessions_phys == 0 and luo.liveupdate_number == 1
    assert [r.name for r in subtree(out, "memblock").regions] == ["kho_demo_rsv"]  # type: ignore[attr-defined]

    old_id, old_release = sim.boot_id, sim.release
    old_scratch = [(s.phys, s.size) for s in sim.state.scratch]
    new = kexec(sim)

    handed = decode_handover(sim.directory, old_scratch)
    assert errors(handed) == []
    hluo = subtree(handed, "LUO")
    assert isinstance(hluo, LuoState)
    assert [(s.name, [f.token for f in s.files]) for s in hluo.sessions] == [
        ("vm-1", [0x1001, 0x1002]), ("kho-agent", [0])]
    holes = hluo.sessions[0].files[1].handler
    assert isinstance(holes, MemfdState) and holes.nr_folios == 4  # holes materialised

    assert new.boot_id != old_id and new.boot_count == 2 and new.release == "7.3.1-sim"
    assert new.liveupdate_number == 2
    nhost = new.host()
    inc = decode(nhost, "in")
    assert errors(inc) == []
    meta = subtree(inc, "kexec-metadata")
    assert isinstance(meta, KexecMetadata)
    assert meta.previous_release == old_release and meta.kexec_count == 1
    assert (nhost.path("proc/sys/kernel/random/boot_id").read_text().strip() == new.boot_id)
    nout = decode(nhost, "out")
    assert errors(nout) == [] and "debugfs-fdt-absent" in codes(nout)
    assert not nhost.path("sys/kernel/debug/kho/out/fdt").exists()

    ndev = nhost.liveupdate.open()
    rvm = ndev.retrieve_session("vm-1")
    ra, rb = rvm.retrieve_fd(0x1001), rvm.retrieve_fd(0x1002)
    rc = ndev.retrieve_session("kho-agent").retrieve_fd(0)
    fds += [ra, rb, rc]
    expect_a = bytearray(one)
    expect_a[10:14] = b"late"
    assert os.pread(ra, 2 * PAGE, 0) == bytes(expect_a)
    assert os.lseek(ra, 0, os.SEEK_CUR) == 50
    assert os.fstat(rb).st_size == 4 * PAGE
    assert os.pread(rb, 4 * PAGE, 0) == bytes(3 * PAGE + 5) + sparse + bytes(PAGE - 15)
    assert os.lseek(rb, 0, os.SEEK_CUR) == 123
    assert os.pread(rc, 100, 0) == sealed and os.lseek(rc, 0, os.SEEK_CUR) == 3
    assert fcntl.fcntl(rc, fcntl.F_GET_SEALS) == F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
    assert fcntl.fcntl(rc, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.readlink(f"/proc/self/fd/{rc}").startswith("/memfd: ")  # empty name


def test_kho_boot_debugfs_in_tree_and_inherited_scratch(sim: SimKernel) -> None:
    old = (sim.host().path("sys/kernel/debug/kho/out/scratch_phys").read_text(),
           sim.host().path("sys/kernel/debug/kho/out/scratch_len").read_text())
    # a new kho_scratch= is ignored on a KHO boot: the areas are inherited unchanged (§5.5)
    new = kexec(sim, cmdline=CMDLINE + " kho_scratch=64M,64M,64M")
    h = new.host()
    assert (h.path("sys/kernel/debug/kho/out/scratch_phys").read_text(),
            h.path("sys/kernel/debug/kho/out/scratch_len").read_text()) == old
    in_fdt = h.path("sys/kernel/debug/kho/in/fdt").read_bytes()
    assert in_fdt == (sim.directory / "handover/fdt").read_bytes()
    luo = h.path("sys/kernel/debug/kho/in/sub_fdts/LUO").read_bytes()
    assert len(luo) == 32 and not luo.startswith(b"luo-v5")  # the page LUO freed at boot
    meta = h.path("sys/kernel/debug/kho/in/sub_fdts/kexec-metadata").read_bytes()
    assert meta[4:4 + len(sim.release)] == sim.release.encode()


def test_cold_boot_files(sim: SimKernel) -> None:
    h = sim.host()
    assert h.path("proc/cmdline").read_text().startswith(CMDLINE)
    assert h.path("proc/sys/kernel/osrelease").read_text() == "7.3.0-sim\n"
    assert h.path("proc/1/comm").read_text() == "sim-init\n"
    assert h.path("dev/liveupdate").exists() and h.liveupdate.present()
    assert h.path("sys/kernel/kexec_loaded").read_text() == "0\n"
    assert h.path("sys/devices/system/node/has_memory").read_text() == "0\n"
    meminfo = h.path("proc/meminfo").read_text()
    for key in ("MemTotal:", "MemFree:", "MemAvailable:", "HugePages_Total:", "Hugepagesize:",
                "CmaTotal:"):
        assert key in meminfo
    image = read_image(str(h.path("boot/vmlinuz-7.3.0-sim")))
    assert image.info.release == "7.3.0-sim"
    lines = h.path("sys/kernel/debug/memblock/reserved").read_text().splitlines()
    assert lines[0] == "   0: 0x0000000000000000..0x00000000000fffff    0 NONE"
    assert any(line.endswith(" RSV_KERN") for line in lines)


def test_default_scratch_sizing_follows_rsrv_kern(tmp_path: Path) -> None:
    """Twice the RSRV_KERN reservations, rounded to 4 MiB (§5.4): 40 MiB kernel + 64 MiB memmap
    (4 GiB / 64) + 4 MiB node data + the 1 MiB reserve_mem region. The memmap ends exactly at
    4 GiB, and memblock_reserved_kern_size() clips it to `limit - base` with limit 0xffffffff:
    lowmem counts one byte less, so global = round_up(2 bytes) = 4 MiB."""
    sim = SimKernel.create(tmp_path / "s")
    lengths = [int(x, 16) for x in sim.host().path(
        "sys/kernel/debug/kho/out/scratch_len").read_text().split()]
    kern = (40 + 64 + 4 + 1) << 20
    lowmem = -(-2 * (kern - 1) // (4 << 20)) * (4 << 20)
    assert lengths == [lowmem, 4 << 20, -(-2 * kern // (4 << 20)) * (4 << 20)]
    two = SimKernel.create(tmp_path / "two", memory_mib=8192, nodes=2)
    assert len(two.state.scratch) == 4
    assert two.host().path("sys/devices/system/node/has_memory").read_text() == "0-1\n"
    explicit = SimKernel.create(tmp_path / "x", cmdline=CMDLINE + " kho_scratch=10M,64M,6M")
    assert [s.size for s in explicit.state.scratch] == [12 << 20, 64 << 20, 8 << 20]


@pytest.mark.parametrize(("value", "expect"), [
    ("on", True), ("off", False), ("1", True), ("y", True), ("N", False), ("e", True),
    ("d", False), ("O", None), ("ox", None), ("", None), (None, None), ("x", None)])
def test_kstrtobool(value: str | None, expect: bool | None) -> None:
    assert kstrtobool(value) is expect


@pytest.mark.parametrize(("value", "expect"), [
    ("50%", ScratchParam(scale=50)),
    ("16M,512M,256M", ScratchParam(sizes=ScratchSizes(16 << 20, 512 << 20, 256 << 20))),
    ("0,0x1000000,0", ScratchParam(sizes=ScratchSizes(0, 16 << 20, 0))),
    ("0,0,0", None), ("64M,,64M", None), ("256M,512M,512Mfoo", None), ("512M,512M", None),
    ("12345678901%", None), ("x%", None)])
def test_kho_scratch_grammar(value: str, expect: ScratchParam | None) -> None:
    assert simboot.parse_kho_scratch(value) == expect


def test_device_absent_without_kho_or_luo(tmp_path: Path) -> None:
    for cmdline in ("liveupdate=on", "kho=on liveupdate=off", "kho=off liveupdate=on"):
        sim = SimKernel.create(tmp_path / cmdline.replace(" ", "_"), cmdline=cmdline)
        h = sim.host()
        assert not h.path("dev/liveupdate").exists() and not h.liveupdate.present()
        with refused(errno.ENOENT):
            h.liveupdate.open()
    nokho = SimKernel.create(tmp_path / "nokho", cmdline="kho=0 liveupdate=1")
    assert not nokho.host().path("sys/kernel/debug/kho").exists()


def test_attach_to_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        SimKernel(tmp_path)


def test_synthetic_image_round_trip(sim: SimKernel, tmp_path: Path) -> None:
    for abi in (SimAbi(), SimAbi("kho-v3", "luo-v1", "memfd-v1")):
        path = sim.write_kernel_image(tmp_path / "img", release="7.9.9-x", abi=abi)
        assert path.stat().st_size < 8192
        image = read_image(str(path))
        assert image.info.release == "7.9.9-x" and image.info.compression == "gzip"
        spoken = abi_from_payload(image.payload)
        assert (spoken.contracts["kho-root"].primary, spoken.contracts["luo"].primary,
                spoken.contracts["handler:memfd"].primary,
                spoken.contracts["memblock"].primary) == (abi.kho, abi.luo, abi.memfd,
                                                          abi.memblock)


@pytest.mark.parametrize("abi", [SimAbi("kho-v4", "luo-v1"), SimAbi("kho-v3", "luo-v5"),
                                 SimAbi("kho-v1", "luo-v1", "memfd-v2"), SimAbi("kho-v9"),
                                 SimAbi(memblock="memblock-v2")])
def test_impossible_abi_combinations(tmp_path: Path, abi: SimAbi) -> None:
    with pytest.raises(InvalidArgument):
        SimKernel.create(tmp_path, abi=abi)


# --- session rules ---------------------------------------------------------------------------

def test_session_names(sim: SimKernel) -> None:
    dev = sim.host().liveupdate.open()
    for bad in ("", "x" * 64, "\0abc"):
        with refused(errno.EINVAL):
            dev.create_session(bad)
    long = dev.create_session("y" * 63)
    assert long.get_name() == "y" * 63 and long.name == "y" * 63 and not long.incoming
    dev.create_session("a")
    with refused(errno.EEXIST):
        dev.create_session("a")


def test_session_fd_is_a_real_cloexec_fd(sim: SimKernel) -> None:
    s = sim.host().liveupdate.open().create_session("s")
    fd = s.fileno()
    os.fstat(fd)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    s.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_preserve_fd_rules(sim: SimKernel, fds: list[int], tmp_path: Path) -> None:
    dev = sim.host().liveupdate.open()
    s, t = dev.create_session("s"), dev.create_session("t")
    m = memfd(b"x")
    fds.append(m)
    s.preserve_fd(m, 1)
    with refused(errno.EEXIST):
        s.preserve_fd(memfd(b"y"), 1)
    with refused(errno.EBUSY):          # the same inode, any session
        t.preserve_fd(m, 2)
    with refused(errno.EBUSY):
        s.preserve_fd(os.dup(m), 3)
    null = os.open("/dev/null", os.O_RDWR)
    regular = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    fds += [null, regular]
    for fd in (null, regular):
        with refused(errno.ENOENT):
            s.preserve_fd(fd, 9)
    try:
        huge = os.memfd_create("h", os.MFD_HUGETLB)
    except OSError:
        huge = -1
    if huge >= 0:
        fds.append(huge)
        with refused(errno.ENOENT):
            s.preserve_fd(huge, 9)
    with refused(errno.EBADF):
        s.preserve_fd(987654, 9)
    with refused(errno.EOPNOTSUPP):
        simlu.check_seals(0x40)
    simlu.check_seals(0x3F)


def test_unlinked_shmem_file_is_preservable(sim: SimKernel, fds: list[int]) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    probe = os.open(shm, os.O_RDONLY)
    fds.append(probe)
    if fs_magic(probe) != TMPFS_MAGIC:
        pytest.skip("no tmpfs at /dev/shm")
    path = shm / f"kho-sim-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fds.append(fd)
    s = sim.host().liveupdate.open().create_session("s")
    with refused(errno.ENOENT):        # still linked
        s.preserve_fd(fd, 1)
    path.unlink()
    s.preserve_fd(fd, 1)


def test_direction_checks(sim: SimKernel, fds: list[int]) -> None:
    dev = sim.host().liveupdate.open()
    out = dev.create_session("s")
    m = memfd(b"data")
    fds.append(m)
    out.preserve_fd(m, 1)
    with refused(errno.EINVAL):
        out.retrieve_fd(1)
    with refused(errno.EINVAL):
        out.finish()
    new = kexec(sim)
    inc = new.host().liveupdate.open().retrieve_session("s")
    assert inc.incoming and inc.get_name() == "s"
    with refused(errno.EINVAL):
        inc.preserve_fd(memfd(b"z"), 2)


def test_luo_v1_limits(tmp_path: Path, fds: list[int]) -> None:
    sim = SimKernel.create(tmp_path, abi=SimAbi("kho-v3", "luo-v1", "memfd-v2"))
    dev = sim.host().liveupdate.open()
    s = dev.create_session("files")
    for token in range(128):
        fd = memfd()
        fds.append(fd)
        s.preserve_fd(fd, token)
    with refused(errno.ENOSPC):
        s.preserve_fd(memfd(), 999)
    for i in range(818):
        dev.create_session(f"s{i}")
    with refused(errno.ENOMEM):
        dev.create_session("one-too-many")


def test_luo_v5_chain_caps(sim: SimKernel, monkeypatch: pytest.MonkeyPatch,
                           fds: list[int]) -> None:
    """The block-chain caps (510,000 sessions, 630,000 files) give ENOSPC; the caps are lowered
    here so the test stays fast."""
    assert sim.abi.luo_format.limits == LuoLimits(510_000, 630_000, "ENOSPC", "ENOSPC",
                                                  "10000 blocks of 51", "10000 blocks of 63")
    lowered = dataclasses.replace(sim.abi.luo_format.limits, sessions=3, files_per_session=2)
    monkeypatch.setattr(simlu, "luo_limits", lambda rt: lowered)
    dev = sim.host().liveupdate.open()
    s = dev.create_session("a")
    dev.create_session("b")
    dev.create_session("c")
    with refused(errno.ENOSPC):
        dev.create_session("d")
    for token in (1, 2):
        fd = memfd()
        fds.append(fd)
        s.preserve_fd(fd, token)
    with refused(errno.ENOSPC):
        s.preserve_fd(memfd(), 3)


def test_closing_outgoing_session_unpreserves(sim: SimKernel, fds: list[int]) -> None:
    host = sim.host()
    dev = host.liveupdate.open()
    gone, kept = dev.create_session("gone"), dev.create_session("kept")
    m = memfd(b"m")
    fds.append(m)
    gone.preserve_fd(m, 1)
    gone.close()
    kept.preserve_fd(m, 1)  # no longer preserved elsewhere: no EBUSY
    dev.close()             # closing the device does not destroy sessions
    new = kexec(sim)
    ndev = new.host().liveupdate.open()
    with refused(errno.ENOENT):
        ndev.retrieve_session("gone")
    fd = ndev.retrieve_session("kept").retrieve_fd(1)
    fds.append(fd)
    assert os.pread(fd, 10, 0) == b"m"


def test_incoming_session_rules(sim: SimKernel, fds: list[int]) -> None:
    dev = sim.host().liveupdate.open()
    s = dev.create_session("s")
    a, b = memfd(b"aaa"), memfd(b"bbb")
    fds += [a, b]
    s.preserve_fd(a, 1)
    s.preserve_fd(b, 2)
    dev.create_session("other").preserve_fd(memfd(b"o"), 7)
    new = kexec(sim)
    ndev = new.host().liveupdate.open()
    with refused(errno.ENOENT):
        ndev.retrieve_session("nope")
    inc = ndev.retrieve_session("s")
    with refused(errno.EINVAL):
        ndev.retrieve_session("s")
    first, again = inc.retrieve_fd(1), inc.retrieve_fd(1)
    fds += [first, again]
    assert os.fstat(first).st_ino == os.fstat(again).st_ino  # the same file twice
    with refused(errno.ENOENT):
        inc.retrieve_fd(99)
    with refused(errno.EBUSY):   # retrieved, incoming session not finished
        ndev.create_session("next").preserve_fd(first, 1)
    inc.finish()                 # token 2 was never retrieved: discarded
    with refused(errno.ENOENT):
        inc.retrieve_fd(2)
    assert inc.get_name() == "s"
    assert os.pread(first, 10, 0) == b"aaa"  # the caller's fds stay valid
    ndev.create_session("carry").preserve_fd(first, 1)  # FINISH first, then re-preserve works
    inc.close()
    with refused(errno.ENOENT):
        ndev.retrieve_session("s")
    other = ndev.retrieve_session("other")
    other.close()                # closing a retrieved session finishes it
    with refused(errno.ENOENT):
        ndev.retrieve_session("other")
    # a new outgoing session may reuse an incoming name
    ndev.create_session("s")


def test_old_boot_objects_are_gone_after_kexec(sim: SimKernel) -> None:
    host = sim.host()
    dev = host.liveupdate.open()
    s = dev.create_session("s")
    kexec(sim)
    for call in (lambda: dev.create_session("x"), s.get_name, host.liveupdate.open,
                 host.kexec.loaded, host.sync, sim.host):
        with pytest.raises(AgentError, match="kexec'd"):
            call()
    s.close()  # releasing resources stays possible


def test_size_change_after_preserve_fails_the_freeze(sim: SimKernel, fds: list[int]) -> None:
    host = sim.host()
    s = host.liveupdate.open().create_session("s")
    m = memfd(b"x" * 100)
    fds.append(m)
    s.preserve_fd(m, 1)
    os.ftruncate(m, 5000)
    image = sim.write_kernel_image(sim.directory / "img", release="7.3.1", abi=sim.abi)
    load_named(host.kexec, image, None, CMDLINE)
    with pytest.raises(KernelRefused, match="changed size from 100 to 5000") as exc:
        host.kexec.reboot(via_systemd=False)
    assert exc.value.errno == errno.EINVAL
    assert s.get_name() == "s" and sim.boot_count == 1  # still running, still preserved
    os.ftruncate(m, 100)
    host.kexec.reboot(via_systemd=False)
    fd = SimKernel(sim.directory).host().liveupdate.open().retrieve_session("s").retrieve_fd(1)
    fds.append(fd)
    assert os.pread(fd, 200, 0) == b"x" * 100


def test_preserved_memfd_cannot_change_size(sim: SimKernel, fds: list[int]) -> None:
    """As on the kernel (EPERM from PRESERVE_FD on): the simulator freezes a memfd made with
    MFD_ALLOW_SEALING with F_SEAL_SHRINK | F_SEAL_GROW. The handover records the seals the
    file had; the restored file gets the freeze seals again (what the agent saw at ready)."""
    host = sim.host()
    s = host.liveupdate.open().create_session("s")
    size = 2 * PAGE + 10
    m = memfd(b"y" * size, sealing=True)
    fds.append(m)
    s.preserve_fd(m, 1)
    for resize in (lambda: os.ftruncate(m, PAGE), lambda: os.ftruncate(m, 8 * PAGE),
                   lambda: os.pwrite(m, b"past the end", size),
                   lambda: os.posix_fallocate(m, 0, 8 * PAGE)):
        with pytest.raises(PermissionError):
            resize()
    assert os.pwrite(m, b"inside", 5) == 6      # writes within the size still work
    assert os.fstat(m).st_size == size
    assert fcntl.fcntl(m, fcntl.F_GET_SEALS) == F_SEAL_SHRINK | F_SEAL_GROW
    scratch = [(x.phys, x.size) for x in sim.state.scratch]
    new = kexec(sim)
    luo = subtree(decode_handover(sim.directory, scratch), "LUO")
    assert isinstance(luo, LuoState)
    handler = luo.sessions[0].files[0].handler
    assert isinstance(handler, MemfdState) and handler.seals == 0 and handler.size == size
    fd = new.host().liveupdate.open().retrieve_session("s").retrieve_fd(1)
    fds.append(fd)
    assert os.pread(fd, 3 * PAGE, 0) == b"yyyyyinside" + b"y" * (size - 11)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == F_SEAL_SHRINK | F_SEAL_GROW


def test_freeze_where_seals_cannot_be_added_and_after_unpreserve(sim: SimKernel,
                                                                fds: list[int]) -> None:
    """What the simulator cannot do as the kernel does: a memfd that takes no more seals is not
    frozen (its resize is found at reboot, test above); a frozen file stays frozen when its
    session is closed (the kernel lifts the freeze)."""
    dev = sim.host().liveupdate.open()
    s = dev.create_session("s")
    closed = memfd(b"z" * 100, sealing=True)
    done = memfd(b"w" * 100, sealing=True)
    fcntl.fcntl(done, fcntl.F_ADD_SEALS, F_SEAL_SEAL)
    fds += [closed, done]
    s.preserve_fd(closed, 1)
    s.preserve_fd(done, 2)
    assert fcntl.fcntl(done, fcntl.F_GET_SEALS) == F_SEAL_SEAL  # nothing added
    os.ftruncate(done, 200)                                     # not frozen
    os.ftruncate(done, 100)
    s.close()                                                   # unpreserved
    with pytest.raises(PermissionError):
        os.ftruncate(closed, 200)                               # the seals stay
    assert fcntl.fcntl(closed, fcntl.F_GET_SEALS) == F_SEAL_SHRINK | F_SEAL_GROW


# --- the empty-block defect (§1.5) -------------------------------------------------------------

@pytest.mark.parametrize(("sessions", "panics"), [(51, True), (50, False)])
def test_duplicate_create_at_block_boundary_panics_next_kernel(
        sim: SimKernel, sessions: int, panics: bool) -> None:
    dev = sim.host().liveupdate.open()
    for i in range(sessions):
        dev.create_session(f"s{i}")
    with refused(errno.EEXIST):
        dev.create_session("s0")
    new = kexec(sim)
    ndev = new.host().liveupdate.open()
    if panics:
        assert len(new.panics) == 1 and "invalid entry count: 0" in new.panics[0]
        assert new.release == sim.release and new.boot_count == 3  # cold boot, old kernel
        assert new.liveupdate_number == 1
        with refused(errno.ENOENT):
            ndev.retrieve_session("s1")
    else:
        assert new.panics == [] and new.liveupdate_number == 2
        ndev.retrieve_session("s1")


def test_later_create_or_close_clears_the_empty_block(sim: SimKernel) -> None:
    dev = sim.host().liveupdate.open()
    made = [dev.create_session(f"s{i}") for i in range(51)]
    with refused(errno.EEXIST):
        dev.create_session("s0")
    made[7].close()
    new = kexec(sim)
    assert new.panics == []
    new.host().liveupdate.open().retrieve_session("s8")


# --- faults ------------------------------------------------------------------------------------

def test_fault_freeze_fails(sim: SimKernel, fds: list[int]) -> None:
    host = sim.host()
    s = host.liveupdate.open().create_session("s")
    m = memfd(b"q")
    fds.append(m)
    s.preserve_fd(m, 1)
    sim.inject("freeze-fails")
    image = sim.write_kernel_image(sim.directory / "img", release="7.3.1", abi=sim.abi)
    load_named(host.kexec, image, None, CMDLINE)
    with refused(errno.EINVAL):
        host.kexec.reboot(via_systemd=False)
    assert sim.faults() == {} and sim.boot_count == 1 and host.kexec.loaded()
    host.kexec.reboot(via_systemd=False)  # consumed: the retry goes through
    SimKernel(sim.directory).host().liveupdate.open().retrieve_session("s")


def test_fault_corrupt_file_flips_bytes(sim: SimKernel, fds: list[int]) -> None:
    s = sim.host().liveupdate.open().create_session("kho-agent")
    m = memfd(b'{"manifest": 1}')
    fds.append(m)
    s.preserve_fd(m, 0)
    sim.inject("corrupt-file", session="kho-agent", token=0, offset=2, length=3)
    fd = kexec(sim).host().liveupdate.open().retrieve_session("kho-agent").retrieve_fd(0)
    fds.append(fd)
    got = os.pread(fd, 100, 0)
    want = bytearray(b'{"manifest": 1}')
    for i in range(2, 5):
        want[i] ^= 0xFF
    assert got == bytes(want)


def test_fault_drop_kho(sim: SimKernel, fds: list[int]) -> None:
    s = sim.host().liveupdate.open().create_session("s")
    s.preserve_fd(memfd(b"x"), 1)
    sim.inject("drop-kho")
    new = kexec(sim)
    assert not new.state.kho_boot and new.liveupdate_number == 1
    assert not new.host().path("sys/kernel/debug/kho/in").exists()
    with refused(errno.ENOENT):
        new.host().liveupdate.open().retrieve_session("s")


def test_fault_corrupt_handover_is_sticky_eio(sim: SimKernel) -> None:
    sim.host().liveupdate.open().create_session("s")
    new = kexec(sim)
    new.inject("corrupt-handover")
    lu = new.host().liveupdate
    for _ in range(2):
        with refused(errno.EIO):
            lu.open()
    assert new.faults() == {}
    with refused(errno.EIO):  # sticky for the boot, also for another process
        SimKernel(sim.directory).host().liveupdate.open()


def test_fault_luo_mismatch_panics(sim: SimKernel) -> None:
    sim.host().liveupdate.open().create_session("s")
    sim.inject("luo-mismatch")
    new = kexec(sim)
    assert len(new.panics) == 1 and "failed to initialize properly" in new.panics[0]
    with refused(errno.ENOENT):
        new.host().liveupdate.open().retrieve_session("s")


def test_fault_load_fails_and_load_rules(sim: SimKernel, tmp_path: Path) -> None:
    host = sim.host()
    image = sim.write_kernel_image(tmp_path / "img", release="7.3.1", abi=sim.abi)
    sim.inject("load-fails", errno=errno.ENOMEM)
    with refused(errno.ENOMEM):
        load_named(host.kexec, image, None, CMDLINE)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    with refused(errno.ENOEXEC):
        load_named(host.kexec, junk, None, CMDLINE)
    with refused(errno.EINVAL):
        host.kexec.reboot(via_systemd=False)  # nothing loaded
    assert host.kexec.available() and not host.kexec.loaded()
    load_named(host.kexec, image, None, CMDLINE)
    assert host.kexec.loaded() and host.path("sys/kernel/kexec_loaded").read_text() == "1\n"
    host.kexec.unload()
    assert not host.kexec.loaded() and host.path("sys/kernel/kexec_loaded").read_text() == "0\n"
    with pytest.raises(InvalidArgument):
        sim.inject("no-such-fault")
    with pytest.raises(InvalidArgument):
        sim.inject("corrupt-file", token=0)  # session missing


def test_segments_must_fit_in_scratch(tmp_path: Path) -> None:
    sim = SimKernel.create(tmp_path / "s", cmdline=CMDLINE + " kho_scratch=4M,0,0")
    image = sim.write_kernel_image(tmp_path / "img", release="7.3.1", abi=sim.abi)
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as fh:
        fh.truncate(5 << 20)
    with refused(errno.EADDRNOTAVAIL):
        load_named(sim.host().kexec, image, initrd, CMDLINE)
    small = tmp_path / "small"
    small.write_bytes(b"\0" * 1000)
    load_named(sim.host().kexec, image, small, CMDLINE)


def test_segments_are_placed_as_the_kernel_places_them(tmp_path: Path) -> None:
    # 3 MiB of initrd and a few KiB of kernel would fit into the 4 MiB area by size, but the
    # kernel segment is 2 MiB aligned (top-down: at the area's middle) and purgatory sits at its
    # bottom, so no hole of 3 MiB is left: kho_locate_mem_hole() finds none
    # (docs/kernel-abi.md §5.5)
    sim = SimKernel.create(tmp_path / "s", cmdline=CMDLINE + " kho_scratch=4M,0,0")
    image = sim.write_kernel_image(tmp_path / "img", release="7.3.1", abi=sim.abi)
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as fh:
        fh.truncate(3 << 20)
    assert image.stat().st_size + (3 << 20) + 2 * 4096 < 4 << 20
    with refused(errno.EADDRNOTAVAIL) as err:
        load_named(sim.host().kexec, image, initrd, CMDLINE)
    assert "initrd (3145728 bytes)" in str(err.value)
    with open(initrd, "wb") as fh:
        fh.truncate(1 << 20)
    load_named(sim.host().kexec, image, initrd, CMDLINE)


# --- ABI mismatches (§3.9) ---------------------------------------------------------------------

def test_kho_root_mismatch_drops_the_handover(sim: SimKernel) -> None:
    sim.host().liveupdate.open().create_session("s")
    new = kexec(sim, abi=SimAbi("kho-v3", "luo-v1", "memfd-v2"))
    assert new.abi.kho == "kho-v3" and not new.state.kho_boot and new.panics == []
    assert any("incompatible with 'kho-v3'" in n for n in new.notes)
    with refused(errno.ENOENT):
        new.host().liveupdate.open().retrieve_session("s")


def test_unknown_file_handler_fails_open_with_eio(tmp_path: Path, fds: list[int]) -> None:
    sim = SimKernel.create(tmp_path, abi=SimAbi("kho-v2", "luo-v1", "memfd-v1"))
    s = sim.host().liveupdate.open().create_session("s")
    m = memfd(b"v1 data")
    fds.append(m)
    s.preserve_fd(m, 1)
    new = kexec(sim, abi=SimAbi("kho-v2", "luo-v1", "memfd-v2"))
    with pytest.raises(KernelRefused, match="memfd-v1") as exc:
        new.host().liveupdate.open()
    assert exc.value.errno == errno.EIO


def test_older_abi_cycle_kho_v3_luo_v1_memfd_v1(tmp_path: Path, fds: list[int]) -> None:
    abi = SimAbi("kho-v3", "luo-v1", "memfd-v1")
    sim = SimKernel.create(tmp_path, abi=abi)
    host = sim.host()
    dev = host.liveupdate.open()
    m = memfd(b"old era" * 1000)
    os.lseek(m, 9, os.SEEK_SET)
    fds.append(m)
    dev.create_session("a").preserve_fd(m, 5)
    dev.create_session("b")
    out = decode(host, "out")
    assert errors(out) == [] and out.compatible == "kho-v3" and out.root_source == "fdt"
    scratch = [(s.phys, s.size) for s in sim.state.scratch]
    new = kexec(sim, release="7.1.0-sim")
    handed = decode_handover(sim.directory, scratch)
    # The decoder's table of shipped combinations has kho-v3 only with memfd-v2; which release
    # carried kho-v3 is unconfirmed (docs/kernel-abi.md §0) and the task asks for this pair, so that
    # one heuristic finding is expected; no kernel checks it.
    assert [e.split()[0] for e in errors(handed)] == ["compatible-mismatch"]
    luo = subtree(handed, "LUO")
    assert isinstance(luo, LuoState) and luo.compatible == "luo-v1"
    assert [s.name for s in luo.sessions] == ["a", "b"]
    assert luo.sessions[0].files[0].compatible == "memfd-v1"
    assert new.liveupdate_number == 2 and new.abi == abi
    assert errors(decode(new.host(), "in")) == []
    fd = new.host().liveupdate.open().retrieve_session("a").retrieve_fd(5)
    fds.append(fd)
    assert os.pread(fd, 7000, 0) == b"old era" * 1000 and os.lseek(fd, 0, os.SEEK_CUR) == 9


@pytest.mark.parametrize("abi", era_combinations(), ids=lambda a: f"{a.kho}-{a.luo}-{a.memfd}")
def test_every_era_carries_a_memfd_through_a_live_update(tmp_path: Path, fds: list[int],
                                                         abi: SimAbi) -> None:
    """Each combination of versions the simulator speaks (from the format records): a session
    with a memfd goes through a kexec into a kernel of the same versions and comes back."""
    sim = SimKernel.create(tmp_path, abi=abi)
    m = memfd(b"era " * 2000)
    os.lseek(m, 3, os.SEEK_SET)
    fds.append(m)
    sim.host().liveupdate.open().create_session("a").preserve_fd(m, 7)
    out = decode(sim.host(), "out")
    assert errors(out) == [] and out.compatible == abi.kho
    scratch = [(s.phys, s.size) for s in sim.state.scratch]
    new = kexec(sim)
    assert new.state.kho_boot and new.panics == [] and new.abi == abi
    handed = decode_handover(sim.directory, scratch)
    shipped = abi.memfd in registry.shipped_with(abi.kho)[1]
    assert [e.split()[0] for e in errors(handed)] == ([] if shipped else ["compatible-mismatch"])
    luo = subtree(handed, "LUO")
    assert isinstance(luo, LuoState) and luo.compatible == abi.luo
    assert [(f.compatible, f.token) for f in luo.sessions[0].files] == [(abi.memfd, 7)]
    assert errors(decode(new.host(), "in")) == []
    fd = new.host().liveupdate.open().retrieve_session("a").retrieve_fd(7)
    fds.append(fd)
    assert os.pread(fd, 8000, 0) == b"era " * 2000 and os.lseek(fd, 0, os.SEEK_CUR) == 3


def test_the_era_matrix_is_the_shipped_table_plus_one_simulated_pair() -> None:
    eras = {(a.kho, a.luo, a.memfd) for a in era_combinations()}
    assert eras >= {("kho-v1", "luo-v1", "memfd-v1"), ("kho-v2", "luo-v1", "memfd-v1"),
                    ("kho-v2", "luo-v1", "memfd-v2"), ("kho-v3", "luo-v1", "memfd-v1"),
                    ("kho-v3", "luo-v1", "memfd-v2"), ("kho-v4", "luo-v5", "memfd-v2")}
    for abi in era_combinations():
        check_abi(abi)


def test_kho_v1_era_writes_the_map_at_finalize(tmp_path: Path, fds: list[int]) -> None:
    sim = SimKernel.create(tmp_path, abi=SimAbi("kho-v1", "luo-v1", "memfd-v1"))
    s = sim.host().liveupdate.open().create_session("a")
    m = memfd(b"v1")
    fds.append(m)
    s.preserve_fd(m, 1)
    out = decode(sim.host(), "out")
    assert errors(out) == [] and out.memmap_phys == 0 and "memmap-not-checked" in codes(out)
    scratch = [(a.phys, a.size) for a in sim.state.scratch]
    new = kexec(sim)
    handed = decode_handover(sim.directory, scratch)
    assert errors(handed) == [] and handed.memmap is not None
    fd = new.host().liveupdate.open().retrieve_session("a").retrieve_fd(1)
    fds.append(fd)
    assert os.pread(fd, 10, 0) == b"v1"


# --- processes ---------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from kho_agent.sim import SimKernel
    host = SimKernel(Path(sys.argv[1])).host()
    dev = host.liveupdate.open()
    if sys.argv[2] == "retrieve":
        s = dev.retrieve_session("s")
        dev.close()  # the session outlives the device
        print("holding", flush=True)
        sys.stdin.read()
    elif sys.argv[2] == "hold-preserve":
        s = dev.create_session("kept")
        m = os.memfd_create("m", os.MFD_ALLOW_SEALING)
        os.write(m, b"held")
        s.preserve_fd(m, 1)
        print("holding", flush=True)
        sys.stdin.read()
    elif sys.argv[2] == "preserve":
        s = dev.create_session("left-behind")
        m = os.memfd_create("m")
        os.write(m, b"lost")
        s.preserve_fd(m, 1)
        host.sync()
        print("done", flush=True)
    else:
        print("holding", flush=True)
        sys.stdin.read()
""")


def _child(directory: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), mode], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_exclusive_open_across_processes(sim: SimKernel) -> None:
    child = _child(sim.directory, "hold")
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        lu = sim.host().liveupdate
        assert lu.holders() == [child.pid]
        with pytest.raises(KernelRefused, match=f"process {child.pid}") as exc:
            lu.open()
        assert exc.value.errno == errno.EBUSY
    finally:
        child.communicate("")
    assert lu.holders() == []
    lu.open().close()


def test_restart_without_reboot_finds_no_outgoing_sessions(sim: SimKernel) -> None:
    child = _child(sim.directory, "preserve")
    out, _ = child.communicate()
    assert out.strip() == "done" and child.returncode == 0
    again = SimKernel(sim.directory)
    dev = again.host().liveupdate.open()
    dev.create_session("left-behind")  # the old one died with its process: no EEXIST
    new = kexec(again)
    fresh = new.host().liveupdate.open().retrieve_session("left-behind")
    with refused(errno.ENOENT):       # an empty session: the child's file is gone
        fresh.retrieve_fd(1)


def test_retrieved_state_is_shared_between_processes_of_a_boot(sim: SimKernel,
                                                               fds: list[int]) -> None:
    dev = sim.host().liveupdate.open()
    for name in ("s", "done"):
        m = memfd(name.encode())
        fds.append(m)
        dev.create_session(name).preserve_fd(m, 1)
    new = kexec(sim)
    ndev = new.host().liveupdate.open()
    ndev.retrieve_session("done").finish()
    ndev.close()
    child = _child(new.directory, "retrieve")
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        other = SimKernel(new.directory).host().liveupdate.open()
        with refused(errno.ENOENT):   # finished by the first process
            other.retrieve_session("done")
        with pytest.raises(KernelRefused, match=f"process {child.pid}") as exc:
            other.retrieve_session("s")
        assert exc.value.errno == errno.EINVAL   # still open in the child
    finally:
        child.communicate("")
    with refused(errno.ENOENT):       # the child exited: closing its session finished it
        other.retrieve_session("s")


def test_records_of_dead_processes_whose_pids_were_reused(sim: SimKernel,
                                                        fds: list[int]) -> None:
    """A process SIGKILLed while it holds /dev/liveupdate and outgoing sessions holds nothing
    afterwards, as the kernel releases everything of a dead process; and what the records
    still say of it means nothing once another process runs under its pid."""
    child = _child(sim.directory, "hold-preserve")
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        assert sim.host().liveupdate.holders() == [child.pid]
        child.kill()
        child.wait()
    finally:
        child.communicate("")
    boot_dir = Path(os.path.realpath(sim.directory / "boot.json")).parent
    alive = os.getppid()            # a live process, standing in for a reused pid
    (boot_dir / "liveupdate.holder").write_text(str(alive))
    state = json.loads((boot_dir / "boot.json").read_text())
    state["outgoing_owner"] = [alive, "a-process-that-died"]
    (boot_dir / "boot.json").write_text(json.dumps(state))
    again = SimKernel(sim.directory)
    lu = again.host().liveupdate
    assert lu.holders() == []
    dev = lu.open()
    dev.create_session("kept")      # no EEXIST, no Busy: the dead owner's sessions are gone
    m = memfd(b"carried")
    fds.append(m)
    dev.create_session("s").preserve_fd(m, 1)
    new = kexec(again)
    ndev = new.host().liveupdate.open()
    # the log says the session is held by the live pid, started at another time: the holder
    # died, and its session was finished when its fds closed
    log = Path(os.path.realpath(new.directory / "boot.json")).parent / "incoming.log"
    with log.open("a") as fh:
        fh.write(f"R {b'kept'.hex()} {alive} 1\n")
    with refused(errno.ENOENT):
        ndev.retrieve_session("kept")
    fd = ndev.retrieve_session("s").retrieve_fd(1)
    fds.append(fd)
    assert os.pread(fd, 100, 0) == b"carried"


# Killed right after the kexec wrote the new boot's state (kho_agent.sim.kernel.save), before
# the new boot's root: a simulator that wrote the next boot over the old one in place left a
# boot.json of the new boot beside the old boot's root, and every later attach failed
# ("kexec'd into a new boot") for good. tests/test_sim_atomic.py kills at every step.
KILLED_AFTER_STATE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import kho_agent.sim.kernel as simkernel
    from kho_agent.kernel.kexec import load_named
    from kho_agent.sim import SimKernel

    sim = SimKernel(Path(sys.argv[1]))
    host = sim.host()
    fd = os.memfd_create("m")
    os.write(fd, b"lost with the process")
    host.liveupdate.open().create_session("s").preserve_fd(fd, 1)
    image = sim.write_kernel_image(sim.directory / "img", release="7.3.1", abi=sim.abi)
    load_named(host.kexec, image, None, "console=ttyS0 kho=on liveupdate=on")
    real_save = simkernel.save
    def save_then_die(directory, state):
        real_save(directory, state)
        if state.boot_count == 2:   # the next boot's state, written by the kexec
            os.kill(os.getpid(), signal.SIGKILL)
    simkernel.save = save_then_die
    host.kexec.reboot(via_systemd=False)
    print("not killed", flush=True)
""")


def test_killed_in_the_kexec_leaves_a_usable_host(sim: SimKernel, fds: list[int]) -> None:
    child = subprocess.run([sys.executable, "-c", KILLED_AFTER_STATE, str(sim.directory)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    again = SimKernel(sim.directory)
    host = again.host()           # the old boot, whole, less what the dead process held
    assert again.boot_count == 1 and again.boot_id == sim.boot_id
    assert host.path("proc/sys/kernel/random/boot_id").read_text().strip() == sim.boot_id
    assert errors(decode(host, "out")) == []
    dev = host.liveupdate.open()
    dev.create_session("s")       # the dead process's session is gone
    m = memfd(b"kept")
    fds.append(m)
    dev.create_session("t").preserve_fd(m, 1)
    new = kexec(again)
    assert new.boot_count == 2 and errors(decode(new.host(), "in")) == []
    fd = new.host().liveupdate.open().retrieve_session("t").retrieve_fd(1)
    fds.append(fd)
    assert os.pread(fd, 10, 0) == b"kept"


def test_another_live_owner_keeps_outgoing_sessions(sim: SimKernel) -> None:
    first = sim.host().liveupdate.open()
    first.create_session("mine")
    first.close()
    other = SimKernel(sim.directory)  # a second attachment acts like another process
    with pytest.raises(Busy):
        other.host().liveupdate.open().create_session("theirs")


def test_sync_only_rewrites_when_something_changed(sim: SimKernel, fds: list[int]) -> None:
    host = sim.host()
    host.sync()
    kcore = host.path("proc/kcore")
    before = kcore.stat().st_mtime_ns, kcore.stat().st_ino
    host.sync()
    assert (kcore.stat().st_mtime_ns, kcore.stat().st_ino) == before
    m = memfd(b"z" * 3 * PAGE)
    fds.append(m)
    host.liveupdate.open().create_session("s").preserve_fd(m, 1)
    host.sync(memory=False)  # debugfs only: the core (the costly part) stays as it was
    assert kcore.stat().st_ino == before[1]
    host.sync()
    assert kcore.stat().st_ino != before[1]
    core = ElfCoreMemory(str(kcore))
    try:
        # the memfd's data pages are in the kcore now
        hits = [seg for seg in core.segments if b"zzzz" in core.read(seg.phys, seg.size)]
        assert hits
    finally:
        core.close()
    assert struct.calcsize("<QQ") == 16


def test_debugfs_is_read_whole_while_another_thread_changes_the_sessions(tmp_path: Path) -> None:
    """The daemon reads kho/out on two threads (its engine, and verify's observation beside it)
    while sessions change: the simulated debugfs, like the kernel's, shows every subtree whole
    and nothing else (no temporary file of the writer), and no reader fails."""
    import threading

    from kho_agent.facts import kho_view

    host = SimKernel.create(tmp_path / "sim").host()
    device = host.liveupdate.open()
    stop = threading.Event()
    failures: list[BaseException] = []
    names: set[str] = set()

    def read() -> None:
        while not stop.is_set():
            try:
                view = kho_view(host, Side.OUT, with_memory=False)
                assert view.problem is None, view.problem
                names.update(view.sub_blob_sizes)
            except (AgentError, OSError, AssertionError) as exc:
                failures.append(exc)
                return
    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        for i in range(60):
            session = device.create_session(f"s{i}")
            fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
            os.write(fd, b"x" * 4096)
            session.preserve_fd(fd, 1)
            os.close(fd)
            if i % 2:
                session.close()
    finally:
        stop.set()
        for thread in readers:
            thread.join()
        device.close()
    assert failures == []
    assert names and not [n for n in names if n.startswith(".")], names
