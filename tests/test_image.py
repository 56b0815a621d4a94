"""kho_agent.kernel.image: kernel image containers and payload compressions, on synthetic images."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import lz4.block
import pytest
import zstandard

from kho_agent.kernel.image import (
    LZ4_LEGACY_BLOCK,
    LZ4_LEGACY_MAGIC,
    ImageError,
    decompress,
    image_memory_size,
    parse_image,
    read_image,
    setup_cmdline_size,
)

HEADER_VERSION = "7.3.0-test (builder@host) #1 SMP PREEMPT_DYNAMIC"
PAYLOAD = (b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"code" * 300
           + b"\0kho-v4\0luo-v5\0memfd-v2\0Linux version 7.3.0-banner (b@h) #1\n\0" + b"tail" * 50)


def build_bzimage(compressed: bytes, *, setup_sects: int = 4, protocol: int = 0x020F,
                  version: str | None = HEADER_VERSION, trailer: bytes = b"") -> bytes:
    """A minimal x86 bzImage: boot sector + setup header, a stub of protected-mode code, then the
    payload at payload_offset (relative to the protected-mode code) and `trailer` after it."""
    sects = setup_sects or 4
    setup = bytearray((sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    if version is not None:
        struct.pack_into("<H", setup, 0x20E, 0x300)  # string at 0x300 + 0x200
        raw = version.encode() + b"\0"
        setup[0x500:0x500 + len(raw)] = raw
    stub = b"\x90" * 0x180
    struct.pack_into("<II", setup, 0x248, len(stub), len(compressed))
    return bytes(setup) + stub + compressed + trailer


def with_size(data: bytes, size: int) -> bytes:
    """What the kernel build's *_with_size commands do: append the uncompressed size."""
    return data + struct.pack("<I", size)


def lz4_legacy(data: bytes) -> bytes:
    """LZ4 legacy framing built by hand: magic, then [u32 size][block] per 8 MiB of input."""
    out = bytearray(struct.pack("<I", LZ4_LEGACY_MAGIC))
    for i in range(0, len(data), LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(data[i:i + LZ4_LEGACY_BLOCK], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


def xz_kernel(data: bytes) -> bytes:
    # The kernel uses xz with CRC32 and the x86 BCJ filter in front of LZMA2.
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                         filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}])


def zstd_no_size(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_content_size=False).compress(data)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "bzip2": lambda d: with_size(bz2.compress(d), len(d)),
    "xz": lambda d: with_size(xz_kernel(d), len(d)),
    "lzma": lambda d: with_size(lzma.compress(d, format=lzma.FORMAT_ALONE), len(d)),
    "lz4": lambda d: with_size(lz4_legacy(d), len(d)),
    "zstd": lambda d: with_size(zstd_no_size(d), len(d)),
}


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_bzimage_each_compression(name: str) -> None:
    image = parse_image(build_bzimage(COMPRESSORS[name](PAYLOAD)), "bz")
    assert image.payload == PAYLOAD
    info = image.info
    assert (info.kind, info.compression, info.setup_version) == ("bzImage", name, "2.15")
    assert info.kernel_version == HEADER_VERSION
    assert info.release == "7.3.0-test"
    assert info.payload_size == len(PAYLOAD)
    assert info.payload_kind == "elf"


def test_bzimage_from_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(build_bzimage(COMPRESSORS["zstd"](PAYLOAD)))
    image = read_image(str(path))
    assert image.info.path == str(path)
    assert image.payload == PAYLOAD


def test_setup_sects_zero_means_four_and_banner_fallback() -> None:
    image = parse_image(build_bzimage(gzip.compress(PAYLOAD), setup_sects=0, version=None))
    assert image.payload == PAYLOAD
    # No kernel_version pointer: the version comes from linux_banner in the payload.
    assert image.info.kernel_version == "7.3.0-banner (b@h) #1"
    assert image.info.release == "7.3.0-banner"


def test_zstd_streamed_frame_without_content_size() -> None:
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    chunks = cctx.compressobj()
    frame = chunks.compress(PAYLOAD) + chunks.flush()
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert parse_image(build_bzimage(with_size(frame, len(PAYLOAD)))).payload == PAYLOAD


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 command not installed")
def test_lz4_legacy_from_the_lz4_command(tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(PAYLOAD)
    subprocess.run(["lz4", "-l", "-q", "-f", str(src), str(tmp_path / "payload.lz4")],
                   check=True)
    data = (tmp_path / "payload.lz4").read_bytes()
    assert data[:4] == struct.pack("<I", LZ4_LEGACY_MAGIC)
    image = parse_image(build_bzimage(with_size(data, len(PAYLOAD))))
    assert (image.info.compression, image.payload) == ("lz4", PAYLOAD)


def test_lz4_multiple_blocks_with_a_short_last_block() -> None:
    big = (b"0123456789abcdef" * (LZ4_LEGACY_BLOCK // 16)) + b"short tail block"
    framed = lz4_legacy(big)
    # Two blocks: a full 8 MiB one and a 16-byte one, which lz4.block.decompress must return
    # at its real length even though it is given an 8 MiB buffer.
    (first,) = struct.unpack_from("<I", framed, 4)
    (second,) = struct.unpack_from("<I", framed, 8 + first)
    assert 12 + first + second == len(framed)
    last = framed[12 + first:]
    assert lz4.block.decompress(last, uncompressed_size=LZ4_LEGACY_BLOCK) == b"short tail block"
    name, out = decompress(with_size(framed, len(big)))
    assert name == "lz4"
    assert out == big


def test_lz4_truncated_after_a_complete_block() -> None:
    big = os.urandom(64) * (LZ4_LEGACY_BLOCK // 64) + os.urandom(4096)
    framed = lz4_legacy(big)
    # The first block is whole; the second is cut: no silent partial payload.
    with pytest.raises(ImageError, match="truncated"):
        decompress(framed[:-100])


def test_lz4_concatenated_frames() -> None:
    framed = lz4_legacy(b"first") + lz4_legacy(b"second")
    assert decompress(with_size(framed, 11)) == ("lz4", b"firstsecond")


def test_lz4_truncated_block() -> None:
    framed = with_size(lz4_legacy(PAYLOAD), len(PAYLOAD))
    with pytest.raises(ImageError, match="truncated"):
        decompress(framed[:len(framed) // 2])


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_truncated_compressed_stream(name: str) -> None:
    data = COMPRESSORS[name](PAYLOAD * 20)
    with pytest.raises(ImageError, match="truncated"):
        parse_image(build_bzimage(data[:len(data) // 2]))


def test_payload_runs_past_end_of_file() -> None:
    image = build_bzimage(gzip.compress(PAYLOAD))
    with pytest.raises(ImageError, match=r"runs past the end of the file.*truncated"):
        parse_image(image[:-10])


def test_header_only_file_is_truncated() -> None:
    image = build_bzimage(gzip.compress(PAYLOAD))
    with pytest.raises(ImageError, match="truncated"):
        parse_image(image[:0x220])


def test_garbage_is_not_a_kernel() -> None:
    with pytest.raises(ImageError, match="not a kernel image"):
        parse_image(bytes(range(256)) * 16, "junk")


def test_tiny_file() -> None:
    with pytest.raises(ImageError, match="too short"):
        parse_image(b"hello", "tiny")


def test_old_boot_protocol_is_refused() -> None:
    with pytest.raises(ImageError, match=r"2\.7 predates payload_offset \(2\.08\)"):
        parse_image(build_bzimage(gzip.compress(PAYLOAD), protocol=0x0207))


def test_unknown_compression() -> None:
    with pytest.raises(ImageError, match="unknown compression"):
        parse_image(build_bzimage(b"\x11\x22\x33\x44" + PAYLOAD))


def test_lzo_is_refused_clearly() -> None:
    with pytest.raises(ImageError, match=r"LZO.*not support"):
        parse_image(build_bzimage(b"\x89LZO\x00\r\n\x1a\n" + b"\0" * 64))


@pytest.mark.parametrize("name", ["gzip", "xz", "zstd", "lz4", "bzip2", "lzma"])
def test_decompression_bomb_is_bounded(name: str) -> None:
    bomb = b"\0" * (1 << 20)
    with pytest.raises(ImageError, match="exceeds"):
        parse_image(build_bzimage(COMPRESSORS[name](bomb)), limit=64 << 10)


def test_elf_vmlinux_used_as_is() -> None:
    image = parse_image(PAYLOAD, "vmlinux")
    assert (image.info.kind, image.info.compression) == ("elf", "none")
    assert image.info.release == "7.3.0-banner"
    assert image.payload is PAYLOAD


def arm64_image(body: bytes) -> bytes:
    head = bytearray(64)
    head[0:2] = b"MZ"
    head[56:60] = b"ARM\x64"
    return bytes(head) + body


def test_raw_arm64_image() -> None:
    image = parse_image(arm64_image(PAYLOAD), "Image")
    assert (image.info.kind, image.info.compression) == ("arm64-image", "none")


def test_bare_gzip_arm64_image() -> None:
    image = parse_image(gzip.compress(arm64_image(PAYLOAD)), "Image.gz")
    assert (image.info.kind, image.info.compression) == ("arm64-image", "gzip")
    assert image.payload == arm64_image(PAYLOAD)


def test_bare_gzip_of_something_else() -> None:
    with pytest.raises(ImageError, match="does not hold a kernel"):
        parse_image(gzip.compress(b"just some text" * 10), "notes.gz")


def zboot(payload: bytes, name: str) -> bytes:
    head = bytearray(0x200)
    head[0:2] = b"MZ"
    head[4:8] = b"zimg"
    struct.pack_into("<II", head, 8, len(head), len(payload))
    head[24:24 + len(name)] = name.encode()
    return bytes(head) + payload


def test_arm64_zboot() -> None:
    inner = arm64_image(PAYLOAD)
    image = parse_image(zboot(zstd_no_size(inner), "zstd"), "vmlinuz.efi")
    assert (image.info.kind, image.info.compression) == ("arm64-zboot", "zstd")
    assert image.info.payload_kind == "arm64-image"
    assert image.payload == inner
    xz = parse_image(zboot(xz_kernel(inner), "xzkern"))
    assert xz.info.compression == "xz"


def test_arm64_zboot_name_mismatch() -> None:
    with pytest.raises(ImageError, match="says 'gzip' but the payload is zstd"):
        parse_image(zboot(zstd_no_size(arm64_image(PAYLOAD)), "gzip"))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        read_image(str(tmp_path / "nope"))
    with pytest.raises(ImageError, match="is a directory"):
        read_image(str(tmp_path))


# --- header facts: the memory kexec gives the kernel, the command line it takes ---------------

MiB = 1 << 20


def bzimage_header(init_size: int, protocol: int = 0x020F, setup_sects: int = 3) -> bytes:
    head = bytearray(4096)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, protocol)
    struct.pack_into("<I", head, 0x260, init_size)
    return bytes(head)


def test_image_memory_size() -> None:
    # bzImage: init_size, at least the protected-mode part ((setup_sects + 1) * 512 bytes in)
    assert image_memory_size(bzimage_header(20 * MiB), MiB) == (20 * MiB, "bzImage init_size")
    assert image_memory_size(bzimage_header(1000), 2048 + 5000)[0] == 5000
    assert image_memory_size(bzimage_header(0, protocol=0x0209), 2048 + 7000)[0] == 7000
    # arm64 Image: image_size (u64 at 16), magic "ARM\x64" at 56
    arm = bytearray(64)
    struct.pack_into("<Q", arm, 16, 30 * MiB)
    arm[56:60] = b"ARM\x64"
    assert image_memory_size(bytes(arm), 25 * MiB) == (30 * MiB, "arm64 Image image_size")
    assert image_memory_size(b"\x7fELF" + bytes(100), 104) is None


def test_setup_header_cmdline_size() -> None:
    head = bytearray(4096)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x020F)
    struct.pack_into("<I", head, 0x238, 2047)
    assert setup_cmdline_size(bytes(head)) == 2047
    struct.pack_into("<H", head, 0x206, 0x0205)
    assert setup_cmdline_size(bytes(head)) == 255
    assert setup_cmdline_size(b"\0" * 4096) is None
