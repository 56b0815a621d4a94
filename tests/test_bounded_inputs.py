"""Issue 11, class 7: every file kho-agentctl is given or finds in a directory is read with the
bound of its format and only if it is a regular file. A FIFO, a device, a directory where a file
is expected (and a file where a directory is), a dangling symlink or a 2 GB sparse file: exit 2
with a message, never a hang, a MemoryError or a traceback.

What could hang if it regressed (a FIFO opened for reading) runs in a subprocess with a timeout,
or in-process under an interval timer that raises.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from cliout import cli_json

from kho_agent.abi.errors import AbiError
from kho_agent.errors import InvalidArgument, NotFound
from kho_agent.kernel import debugfs
from kho_agent.kernel.image import ImageError, read_image
from kho_agent.kernel.physmem import (
    ELF64_PHDR_SIZE,
    MAX_PHDR_TABLE,
    ElfCoreMemory,
    RawImageMemory,
    write_elf_core,
)

REPO = Path(__file__).resolve().parent.parent
HANG_S = 20.0        # what a regressed (blocking) read would hit instead of hanging the suite
QUICK_S = 10.0       # a refusal by size or kind reads nothing: well under this
SPARSE = 2 << 30     # the 2 GB sparse file


class Hung(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = HANG_S) -> Iterator[None]:
    """Raise Hung in this process if the block runs longer than `seconds`: a blocking open()
    of a FIFO is interrupted (the handler raises, so PEP 475 does not retry it)."""
    def expired(_sig: int, _frame: FrameType | None) -> None:
        raise Hung(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def ctl(*argv: str, timeout: float = HANG_S) -> subprocess.CompletedProcess[str]:
    """kho-agentctl in a subprocess: a regression that blocks fails with TimeoutExpired."""
    done = subprocess.run([sys.executable, "-m", "kho_agent.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "Traceback" not in done.stderr, done.stderr
    assert "MemoryError" not in done.stderr, done.stderr
    return done


def refused(done: subprocess.CompletedProcess[str], name: str, text: str) -> dict[str, object]:
    """A --json run that exited 2 with the error `name` and `text` in its message."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    doc: dict[str, object] = cli_json(done.stdout)
    assert doc["error"] == name and doc["exit_code"] == 2, doc
    assert text in str(doc["message"]), doc
    assert text in done.stderr
    return doc


def sparse(path: Path, size: int = SPARSE) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


@pytest.fixture
def odd(tmp_path: Path) -> dict[str, Path]:
    """Things that are not regular files, each where a file may be named."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    directory = tmp_path / "a-directory"
    directory.mkdir()
    return {"fifo": fifo, "link": link, "dangling": dangling, "directory": directory,
            "device": Path("/dev/zero")}


KINDS = {"fifo": ("InvalidArgument", "is a FIFO, not a regular file"),
         "link": ("InvalidArgument", "is a FIFO, not a regular file"),
         "device": ("InvalidArgument", "is a character device, not a regular file"),
         "dangling": ("NotFound", "does not exist"),
         "directory": ("InvalidArgument", "is a directory, not a regular file")}


def case_copy(samples_dir: Path, tmp_path: Path) -> Path:
    """A copy of a real kho/out (fdt, scratch_phys, scratch_len, sub_fdts/), which checks
    clean."""
    case = tmp_path / "out"
    shutil.copytree(samples_dir / "debugfs" / "stage1-3-loaded" / "out", case)
    return case


# --- decode/check: the root FDT, a debugfs-style directory, --sub-fdts, --memory ---------------

@pytest.mark.parametrize("kind", ["fifo", "link", "device", "dangling"])
def test_check_refuses_an_fdt_that_is_not_a_regular_file(odd: dict[str, Path], kind: str) -> None:
    name, text = KINDS[kind]
    if kind == "dangling":
        text = "is a symbolic link to nothing"
    refused(ctl("check", str(odd[kind]), "--json"), name, text)


def test_check_refuses_a_sparse_2gb_fdt_by_its_size(tmp_path: Path) -> None:
    start = time.monotonic()
    done = ctl("check", str(sparse(tmp_path / "fdt")), "--json")
    refused(done, "InvalidArgument", f"has {SPARSE} bytes, more than the "
            f"{debugfs.MAX_ROOT_FDT} it can have")
    assert time.monotonic() - start < QUICK_S


@pytest.mark.parametrize("where", ["fdt", "scratch_phys", "scratch_len", "sub_fdts/LUO"])
@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "dangling"])
def test_debugfs_copy_refuses_odd_files_inside(samples_dir: Path, tmp_path: Path,
                                               odd: dict[str, Path], where: str,
                                               kind: str) -> None:
    case = case_copy(samples_dir, tmp_path)
    target = case / where
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        target.symlink_to(odd[kind])
    name, text = KINDS[kind]
    if kind == "dangling":
        text = "is a symbolic link to nothing"
    doc = refused(ctl("check", str(case), "--json"), name, text)
    assert str(target) in str(doc["message"])


def test_debugfs_copy_refuses_a_file_where_a_directory_belongs(samples_dir: Path,
                                                              tmp_path: Path) -> None:
    case = case_copy(samples_dir, tmp_path)
    shutil.rmtree(case / "sub_fdts")
    (case / "sub_fdts").write_bytes(b"not a directory")
    refused(ctl("check", str(case), "--json"), "InvalidArgument",
            f"{case / 'sub_fdts'} is a regular file, not a directory")


def test_scratch_lists_are_bounded_by_the_areas_a_kernel_has(samples_dir: Path,
                                                             tmp_path: Path) -> None:
    case = case_copy(samples_dir, tmp_path)
    real = (case / "scratch_phys").read_bytes()
    lines = "0x1000\n" * (debugfs.MAX_SCRATCH_AREAS + 1)
    (case / "scratch_phys").write_text(lines)
    (case / "scratch_len").write_text(lines)
    refused(ctl("check", str(case), "--json"), "InvalidArgument",
            f"the kernel writes one per scratch area, at most {debugfs.MAX_SCRATCH_AREAS}")
    (case / "scratch_phys").write_bytes(real)
    sparse(case / "scratch_len", 1 << 30)
    refused(ctl("check", str(case), "--json"), "InvalidArgument",
            f"more than the {debugfs.MAX_SCRATCH_FILE} it can have")


def test_sub_fdts_dir_option_refuses_odd_entries_and_odd_dirs(samples_dir: Path, tmp_path: Path,
                                                             odd: dict[str, Path]) -> None:
    fdt = str(samples_dir / "case-out-1" / "fdt")
    subs = tmp_path / "subs"
    subs.mkdir()
    os.mkfifo(subs / "LUO")
    refused(ctl("check", fdt, "--sub-fdts", str(subs), "--json"), "InvalidArgument",
            f"{subs / 'LUO'} is a FIFO, not a regular file")
    refused(ctl("check", fdt, "--sub-fdts", str(odd["fifo"]), "--json"), "InvalidArgument",
            "is a FIFO, not a directory")
    refused(ctl("check", fdt, "--sub-fdts", str(odd["dangling"]), "--json"), "NotFound",
            "is a symbolic link to nothing")


def test_sub_fdts_dir_holds_at_most_what_one_root_fdt_can_name(samples_dir: Path,
                                                              tmp_path: Path) -> None:
    subs = tmp_path / "subs"
    subs.mkdir()
    for i in range(debugfs.MAX_SUBTREES + 1):
        (subs / f"blob{i}").write_bytes(b"x")
    refused(ctl("check", str(samples_dir / "case-out-1" / "fdt"), "--sub-fdts", str(subs),
                "--json"), "InvalidArgument", f"more than {debugfs.MAX_SUBTREES} entries")


@pytest.mark.parametrize("kind", ["fifo", "link", "device", "dangling", "directory"])
def test_memory_core_must_be_a_regular_file(samples_dir: Path, odd: dict[str, Path],
                                            kind: str) -> None:
    name, text = KINDS[kind]
    doc = refused(ctl("check", str(samples_dir / "case-out-1" / "fdt"), "--memory",
                      str(odd[kind]), "--json"), name, text)
    assert str(odd[kind]) in str(doc["message"])


def test_kcore_path_that_is_a_device_is_refused(samples_dir: Path, tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    shutil.copytree(samples_dir / "debugfs" / "stage1-3-loaded" / "out", debug / "kho" / "out")
    refused(ctl("check", "--live", "--debugfs", str(debug), "--kcore-path", "/dev/zero",
                "--json"), "InvalidArgument", "is a character device")


# --- ELF cores: bounded header reads, kcore-sized files still work -----------------------------

def small_core(path: Path) -> bytearray:
    write_elf_core(str(path), [(0x1000, b"y" * 16)])
    return bytearray(path.read_bytes())


def test_core_claiming_0xffff_headers_of_0xffff_bytes_reads_no_4gib(tmp_path: Path) -> None:
    core = tmp_path / "c.core"
    raw = small_core(core)
    struct.pack_into("<HH", raw, 54, 0xFFFF, 0xFFFF)  # e_phentsize, e_phnum
    core.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(AbiError, match=f"header size 65535 is not the {ELF64_PHDR_SIZE}"):
            ElfCoreMemory(str(core))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_core_header_table_is_bounded_by_the_16_bit_count(tmp_path: Path) -> None:
    core = tmp_path / "c.core"
    raw = small_core(core)
    struct.pack_into("<H", raw, 56, 0xFFFF)  # e_phnum = PN_XNUM
    core.write_bytes(bytes(raw))
    with pytest.raises(AbiError, match="PN_XNUM"):
        ElfCoreMemory(str(core))
    struct.pack_into("<H", raw, 56, 0xFFFE)  # the largest count: a bounded read, then refused
    core.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(AbiError, match="run past the end"):
            ElfCoreMemory(str(core))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MAX_PHDR_TABLE


def test_huge_sparse_core_reads_on_demand_but_a_fifo_is_refused(tmp_path: Path) -> None:
    # /proc/kcore's apparent size is the kernel's whole address space: only the headers are
    # read, the segments on demand. Here: a segment 3 GiB into a sparse file.
    core = tmp_path / "kcore"
    raw = small_core(core)
    far = 3 << 30
    struct.pack_into("<Q", raw, 64 + 8, far)  # p_offset of the only PT_LOAD
    with core.open("r+b") as fh:
        fh.write(raw[:64 + 56])
        fh.seek(far)
        fh.write(b"kcore-like")
    assert core.stat().st_size > far and core.stat().st_blocks * 512 < 1 << 20
    with ElfCoreMemory(str(core)) as mem:
        assert mem.read(0x1000, 10) == b"kcore-like"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "kcore-link").symlink_to(tmp_path / "fifo")
    with no_hang(), pytest.raises(InvalidArgument, match="is a FIFO, not a regular file"):
        ElfCoreMemory(str(tmp_path / "kcore-link"))


def test_raw_image_memory_refuses_non_regular_files(odd: dict[str, Path]) -> None:
    with no_hang():
        with pytest.raises(InvalidArgument, match="is a FIFO"):
            RawImageMemory(str(odd["link"]))
        with pytest.raises(InvalidArgument, match="character device"):
            RawImageMemory(str(odd["device"]))
        with pytest.raises(NotFound):
            RawImageMemory(str(odd["dangling"]))


# --- debugfs reader (the daemon and preflight read it too) -----------------------------------

def test_read_snapshot_keeps_the_error_kind(samples_dir: Path, tmp_path: Path) -> None:
    case = case_copy(samples_dir, tmp_path)
    (case / "fdt").unlink()
    os.mkfifo(case / "fdt")
    with no_hang(), pytest.raises(debugfs.DebugfsError, match="is a FIFO") as caught:
        debugfs.read_snapshot(str(case))
    assert caught.value.kind is InvalidArgument
    with pytest.raises(debugfs.DebugfsError) as missing:
        debugfs.kho_dir(str(tmp_path / "nothing"), "out")
    assert missing.value.kind is NotFound
    assert isinstance(missing.value.as_agent_error(), NotFound)


# --- kernel images: compat, scratch and preflight ----------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "link", "device", "dangling", "directory"])
def test_compat_refuses_images_that_are_not_regular_files(tmp_path: Path, odd: dict[str, Path],
                                                          kind: str) -> None:
    name, text = KINDS[kind]
    refused(ctl("compat", "--kernel", str(odd[kind]), "--running-image", str(odd[kind]),
                "--json"), name, text)
    good = tmp_path / "vmlinux"
    good.write_bytes(b"\x7fELF" + bytes(60) + b"Linux version 7.3.0 (x@y) #1\n")
    refused(ctl("compat", "--kernel", str(good), "--running-image", str(odd[kind]), "--json"),
            name, text)


def test_compat_refuses_a_sparse_2gb_image_without_reading_it(tmp_path: Path) -> None:
    start = time.monotonic()
    refused(ctl("compat", "--kernel", str(sparse(tmp_path / "vmlinuz")), "--running-image",
                str(tmp_path / "vmlinuz"), "--json"), "InvalidArgument",
            f"has {SPARSE} bytes, more than the 512 MiB")
    assert time.monotonic() - start < QUICK_S


def test_read_image_refuses_without_blocking_or_reading(tmp_path: Path,
                                                        odd: dict[str, Path]) -> None:
    with no_hang(), pytest.raises(ImageError, match="is a FIFO") as fifo:
        read_image(str(odd["link"]))
    assert fifo.value.kind is InvalidArgument
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=f"has {SPARSE} bytes"):
            read_image(str(sparse(tmp_path / "big")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("option", ["--kernel", "--initrd"])
@pytest.mark.parametrize("kind", ["fifo", "link", "device", "directory", "dangling"])
@pytest.mark.parametrize("command", ["scratch", "preflight"])
def test_local_scratch_and_preflight_refuse_odd_kernels_and_initrds(
        tmp_path: Path, odd: dict[str, Path], option: str, kind: str, command: str) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    given = {"--kernel": str(kernel), option: str(odd[kind])}  # the odd one replaces a kernel
    argv = [command, "--local", "--json", *(word for pair in given.items() for word in pair)]
    name, text = KINDS[kind]
    doc = refused(ctl(*argv), name, text)
    assert str(odd[kind]) in str(doc["message"])


def test_scratch_initrd_is_bounded_by_what_kexec_file_load_takes(tmp_path: Path) -> None:
    from kho_agent.cli.scratch import INITRD_MAX

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    big = sparse(tmp_path / "initrd", INITRD_MAX + 1)
    refused(ctl("scratch", "--local", "--json", "--kernel", str(kernel), "--initrd", str(big)),
            "InvalidArgument", f"has {INITRD_MAX + 1} bytes")
