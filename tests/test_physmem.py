"""Physical-memory readers: ELF cores (the /proc/kcore layout) and raw images."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kho_agent.abi.errors import AbiError, MemoryUnavailable
from kho_agent.kernel.physmem import ElfCoreMemory, RawImageMemory, write_elf_core


def test_core_roundtrip_merges_adjacent_runs_and_reads_across_them(tmp_path: Path) -> None:
    core = tmp_path / "m.core"
    a, b, c = b"A" * 4096, b"B" * 4096, b"C" * 100
    write_elf_core(str(core), [(0x3000, b), (0x2000, a), (0x9000, c)])
    with ElfCoreMemory(str(core)) as mem:
        assert [(s.phys, s.size) for s in mem.segments] == [(0x2000, 8192), (0x9000, 100)]
        assert mem.read(0x2FFE, 4) == b"AABB"  # crosses the former run boundary
        assert mem.read(0x9000 + 98, 2) == b"CC"
        with pytest.raises(MemoryUnavailable):
            mem.read(0x9000 + 99, 2)  # past the end of a segment
        with pytest.raises(MemoryUnavailable):
            mem.read(0x5000, 1)  # in no segment


def test_real_extract_segments(samples_dir: Path) -> None:
    with ElfCoreMemory(str(samples_dir / "case-out-1" / "memory.core")) as mem:
        assert len(mem.segments) == 9
        assert mem.segments[0].phys == 0x24BE000
        assert mem.read(0x42F3000, 8) == b"luo-v5\0\0"


def test_core_rejects_non_elf_and_big_endian(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes(b"\0" * 128)
    with pytest.raises(AbiError, match="not an ELF core"):
        ElfCoreMemory(str(bad))
    core = tmp_path / "be.core"
    write_elf_core(str(core), [(0, b"x")])
    raw = bytearray(core.read_bytes())
    raw[5] = 2  # ELFDATA2MSB
    core.write_bytes(bytes(raw))
    with pytest.raises(AbiError, match="little-endian"):
        ElfCoreMemory(str(core))


def test_core_with_absurd_phoff_reads_nothing_huge(tmp_path: Path) -> None:
    core = tmp_path / "c.core"
    write_elf_core(str(core), [(0x1000, b"y" * 16)])
    raw = bytearray(core.read_bytes())
    struct.pack_into("<Q", raw, 32, 1 << 60)  # e_phoff far beyond the file
    core.write_bytes(bytes(raw))
    with pytest.raises(AbiError, match="run past the end"):
        ElfCoreMemory(str(core))


def test_kcore_segments_without_paddr_are_ignored(tmp_path: Path) -> None:
    core = tmp_path / "k.core"
    write_elf_core(str(core), [(0x1000, b"z" * 8)])
    raw = bytearray(core.read_bytes())
    struct.pack_into("<Q", raw, 64 + 24, (1 << 64) - 1)  # p_paddr = -1, like kcore's vmalloc
    core.write_bytes(bytes(raw))
    with ElfCoreMemory(str(core)) as mem:
        assert mem.segments == []


def test_raw_image(tmp_path: Path) -> None:
    img = tmp_path / "ram.img"
    img.write_bytes(bytes(range(256)) * 16)
    mem = RawImageMemory(str(img), base=0x100000)
    assert mem.read(0x100010, 3) == bytes([16, 17, 18])
    with pytest.raises(MemoryUnavailable):
        mem.read(0xFFFFF, 2)
    with pytest.raises(MemoryUnavailable):
        mem.read(0x100000 + 4095, 2)
    mem.close()
