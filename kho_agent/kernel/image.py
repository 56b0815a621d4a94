"""Kernel image files: find and decompress the kernel inside, so its strings can be read, and
read the header facts kexec and the command line depend on (image_memory_size(),
setup_cmdline_size()).

Supported containers:

    x86 bzImage     setup header "HdrS" at 0x202 (boot protocol >= 2.08 for payload_offset/length);
                    the payload starts payload_offset bytes after the protected-mode code, which
                    begins at (setup_sects + 1) * 512 (setup_sects 0 means 4)
    arm64 zboot     EFI zboot: "MZ" + "zimg" at 4, payload offset u32 at 8, size u32 at 12,
                    compression name at 24
    ELF vmlinux     used as is
    arm64 Image     raw ("ARM\\x64" magic at 56), used as is; or a bare compressed stream of one
                    (Image.gz and friends)

Payload compressions, detected by magic: gzip, bzip2, lzma (alone), xz, lz4 (legacy frame), zstd.
LZO is recognised and refused. The kernel build appends the 4-byte uncompressed size after every
payload but gzip's; each decoder stops at the end of its stream and ignores that trailer.

Output is bounded (MAX_OUTPUT by default) so a hostile file cannot exhaust memory.
"""

from __future__ import annotations

import bz2
import lzma
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import zstandard

from ..errors import AgentError, InvalidArgument, NotFound, PermissionDenied
from .callerfile import open_regular

# A decompressed payload is a vmlinux: a distribution kernel's is 30-70 MiB; one with DWARF
# debug information can pass 300 MiB.
MAX_OUTPUT = 512 << 20
# An image is read whole to find the kernel inside. The largest input taken is an uncompressed
# vmlinux, which is itself the payload: the file bound is the payload bound. A larger file (or a
# 2 GB sparse one) is refused by its size before any read.
MAX_INPUT = MAX_OUTPUT
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20   # uncompressed bytes per legacy block
LZ4_LEGACY_BOUND = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound
ZSTD_INPUT_CHUNK = 512

# x86 boot protocol setup header (Documentation/arch/x86/boot.rst): field offsets, and the
# protocol version that introduced each field read here
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
HDRS_MAGIC = 0x202
PROTOCOL_VERSION = 0x206
KERNEL_VERSION_PTR = 0x20E
CMDLINE_SIZE = 0x238            # u32, protocol 2.06+: longest command line, NUL excluded
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C
SETUP_HEADER_END = 0x250
INIT_SIZE = 0x260               # u32, protocol 2.10+: memory the kernel needs to boot in place
MIN_CMDLINE_SIZE_PROTOCOL = 0x0206
MIN_PAYLOAD_PROTOCOL = 0x0208
MIN_INIT_SIZE_PROTOCOL = 0x020A
OLD_CMDLINE_SIZE = 255          # before 2.06 the boot protocol takes 255 bytes

# arm64 Image header (Documentation/arch/arm64/booting.rst)
ARM64_IMAGE_SIZE = 16           # u64 image_size: memory the kernel takes, bss included
ARM64_MAGIC_OFFSET = 56
ARM64_MAGIC = b"ARM\x64"
ZBOOT_HEADER = 56

IMAGE_HEADER_BYTES = 4096       # enough of a file for image_memory_size() and setup_cmdline_size()


class ImageError(Exception):
    """A file is not a kernel image this module can read; the message says why and what to do.
    `kind` is the agent error it amounts to (NotFound, PermissionDenied, InvalidArgument), for
    callers that report a name and an exit code."""

    def __init__(self, message: str, kind: type[AgentError] = InvalidArgument) -> None:
        super().__init__(message)
        self.kind = kind

    def as_agent_error(self) -> AgentError:
        return self.kind(str(self))


@dataclass(frozen=True)
class ImageInfo:
    path: str
    kind: str                     # "bzImage", "arm64-zboot", "elf", "arm64-image"
    compression: str              # "gzip", "bzip2", "lzma", "xz", "lz4", "zstd" or "none"
    setup_version: str | None     # x86 boot protocol, e.g. "2.15"
    kernel_version: str | None    # setup header kernel_version string, else the linux_banner
    payload_size: int             # decompressed bytes
    compressed_size: int          # payload bytes in the file
    payload_kind: str             # what the payload is: "elf", "arm64-image" or "data"

    @property
    def release(self) -> str | None:
        """`uname -r` of the image: the first word of its version string."""
        if not self.kernel_version:
            return None
        return self.kernel_version.split()[0]

    @property
    def uts_version(self) -> str | None:
        """`uname -v` of the image ("#1 SMP PREEMPT_DYNAMIC ..."): its version string from the
        '#' on. The setup header's form is `RELEASE (BUILDER) UTS_VERSION`, the banner's
        `RELEASE (BUILDER) (COMPILER) UTS_VERSION`; UTS_VERSION starts with the build number
        ("#1"), which neither of the parts before holds."""
        if not self.kernel_version:
            return None
        _, mark, rest = self.kernel_version.partition(" #")
        return f"#{rest}".strip() if mark else None


@dataclass(frozen=True)
class KernelImage:
    info: ImageInfo
    payload: bytes


# --- decompressors --------------------------------------------------------------------------

Decompressor = Callable[[bytes, int], bytes]


def _too_big(limit: int) -> ImageError:
    return ImageError(f"the decompressed payload exceeds {limit >> 20} MiB; this is not a kernel "
                      "image (or it is a decompression bomb)")


def _truncated(name: str) -> ImageError:
    return ImageError(f"the {name} payload ends before its compressed stream does: the image is "
                      "truncated or corrupt; copy it again (e.g. from the kernel package)")


def _gzip(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ImageError(f"the gzip payload is corrupt: {exc}") from exc
    if len(out) > limit:
        raise _too_big(limit)
    if not d.eof:
        raise _truncated("gzip")
    return out


def _bzip2(data: bytes, limit: int) -> bytes:
    d = bz2.BZ2Decompressor()
    try:
        out = d.decompress(data, limit + 1)
    except OSError as exc:
        raise ImageError(f"the bzip2 payload is corrupt: {exc}") from exc
    if len(out) > limit:
        raise _too_big(limit)
    if not d.eof:
        raise _truncated("bzip2")
    return out


def _lzma_format(fmt: int, name: str) -> Decompressor:
    def decompress(data: bytes, limit: int) -> bytes:
        d = lzma.LZMADecompressor(format=fmt)
        try:
            out = d.decompress(data, limit + 1)
        except lzma.LZMAError as exc:
            raise ImageError(f"the {name} payload is corrupt: {exc}") from exc
        if len(out) > limit:
            raise _too_big(limit)
        if not d.eof:
            raise _truncated(name)
        return out
    return decompress


def _zstd(data: bytes, limit: int) -> bytes:
    # Kernel frames may lack the content size, so decode as a stream. Input goes in small pieces
    # to bound the output of one call (a zstd block yields at most 128 KiB from a few bytes);
    # the decoder stops at the end of the frame, before the appended size.
    dobj = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    try:
        for pos in range(0, len(data), ZSTD_INPUT_CHUNK):
            out += dobj.decompress(data[pos:pos + ZSTD_INPUT_CHUNK])
            if len(out) > limit:
                raise _too_big(limit)
            if dobj.eof:
                break
    except zstandard.ZstdError as exc:
        raise ImageError(f"the zstd payload is corrupt: {exc}") from exc
    if not dobj.eof:
        raise _truncated("zstd")
    return bytes(out)


def _lz4_legacy(data: bytes, limit: int) -> bytes:
    """LZ4 legacy frame: magic, then [u32 LE compressed size][block]..., each block at most
    8 MiB uncompressed. A size that cannot be a block ends the stream (the kernel appends the
    4-byte uncompressed size after the last block); a plausible size running past the end of the
    data means the payload is truncated."""
    if struct.unpack_from("<I", data, 0)[0] != LZ4_LEGACY_MAGIC:
        raise ImageError("the payload is not an LZ4 legacy frame (the only LZ4 format the kernel "
                         "build uses)")
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size == LZ4_LEGACY_MAGIC:
            continue  # concatenated legacy frames, as lib/decompress_unlz4.c accepts
        if size == 0 or size > LZ4_LEGACY_BOUND:
            break
        if size > len(data) - pos:
            if pos == len(data):
                break  # the appended uncompressed size, nothing after it
            raise _truncated("lz4")
        try:
            out += lz4.block.decompress(data[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as exc:
            raise ImageError(f"the lz4 payload is corrupt at byte {pos}: {exc}") from exc
        if len(out) > limit:
            raise _too_big(limit)
        pos += size
    if not out:
        raise _truncated("lz4")
    return bytes(out)


def _lzo(data: bytes, limit: int) -> bytes:
    raise ImageError("the kernel payload is LZO-compressed, which kho-agent does not support; "
                     "give the uncompressed vmlinux instead (e.g. from the kernel's debug package "
                     "or extracted with scripts/extract-vmlinux)")


@dataclass(frozen=True)
class Compression:
    name: str
    magic: bytes
    decompress: Decompressor


# Order matters only where magics share a prefix (none do).
COMPRESSIONS: tuple[Compression, ...] = (
    Compression("gzip", b"\x1f\x8b", _gzip),
    Compression("bzip2", b"BZh", _bzip2),
    Compression("xz", b"\xfd7zXZ\x00", _lzma_format(lzma.FORMAT_XZ, "xz")),
    Compression("lzma", b"\x5d\x00\x00", _lzma_format(lzma.FORMAT_ALONE, "lzma")),
    Compression("lz4", b"\x02\x21\x4c\x18", _lz4_legacy),
    Compression("zstd", b"\x28\xb5\x2f\xfd", _zstd),
    Compression("lzo", b"\x89LZO", _lzo),
)
ZBOOT_NAMES = {"gzip": "gzip", "zstd": "zstd", "lzma": "lzma", "xzkern": "xz", "xz": "xz",
               "lz4": "lz4", "lzo": "lzo", "bzip2": "bzip2"}


def detect_compression(payload: bytes) -> Compression | None:
    for c in COMPRESSIONS:
        if payload.startswith(c.magic):
            return c
    return None


def decompress(payload: bytes, limit: int = MAX_OUTPUT) -> tuple[str, bytes]:
    """Decompress a kernel payload by its magic; return (compression name, bytes)."""
    c = detect_compression(payload)
    if c is None:
        head = payload[:8].hex(" ")
        raise ImageError(f"the kernel payload has an unknown compression (first bytes {head}); "
                         "supported: gzip, bzip2, lzma, xz, lz4, zstd")
    return c.name, c.decompress(payload, limit)


# --- headers ---------------------------------------------------------------------------------

def _is_bzimage(data: bytes) -> bool:
    return len(data) >= HDRS_MAGIC + 4 and data[HDRS_MAGIC:HDRS_MAGIC + 4] == b"HdrS"


def _boot_protocol(head: bytes) -> int:
    return int(struct.unpack_from("<H", head, PROTOCOL_VERSION)[0])


def _setup_bytes(head: bytes) -> int:
    """Where the protected-mode code starts: after the boot sector and setup_sects sectors
    (0 means 4)."""
    return ((head[SETUP_SECTS] or 4) + 1) * 512


def setup_cmdline_size(head: bytes) -> int | None:
    """An x86 bzImage's setup_header.cmdline_size from the first bytes of the file; None for
    other images (their limit is COMMAND_LINE_SIZE, kernel/cmdline.py)."""
    if len(head) < CMDLINE_SIZE + 4 or not _is_bzimage(head):
        return None
    if _boot_protocol(head) < MIN_CMDLINE_SIZE_PROTOCOL:
        return OLD_CMDLINE_SIZE
    return int(struct.unpack_from("<I", head, CMDLINE_SIZE)[0])


def image_memory_size(head: bytes, file_size: int) -> tuple[int, str] | None:
    """The memory a kernel takes once kexec loads it, from the start of its file (or of its
    decompressed payload), as (bytes, where from); None when the header is neither form.

    x86 bzImage: init_size (kexec_file_load sizes the kernel segment by it; it covers the
    in-place decompression), at least the protected-mode part of the file. arm64 Image:
    image_size, at least the given size.
    """
    if len(head) >= INIT_SIZE + 4 and _is_bzimage(head):
        setup = _setup_bytes(head)
        if _boot_protocol(head) >= MIN_INIT_SIZE_PROTOCOL:
            init_size = struct.unpack_from("<I", head, INIT_SIZE)[0]
            return max(init_size, file_size - setup), "bzImage init_size"
        return file_size - setup, "bzImage protected-mode part (boot protocol without init_size)"
    if (head[ARM64_MAGIC_OFFSET:ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC
            and len(head) >= ARM64_IMAGE_SIZE + 8):
        size = struct.unpack_from("<Q", head, ARM64_IMAGE_SIZE)[0]
        return (max(size, file_size), "arm64 Image image_size") if size else (
            file_size, "arm64 Image size")
    return None


# --- containers ------------------------------------------------------------------------------

_BANNER = re.compile(rb"Linux version (\d+\.\d+[^\0\n]{0,200})")


def _banner(payload: bytes) -> str | None:
    m = _BANNER.search(payload)
    return m.group(1).decode("ascii", errors="replace") if m else None


def _payload_kind(payload: bytes) -> str:
    if payload.startswith(b"\x7fELF"):
        return "elf"
    if payload[ARM64_MAGIC_OFFSET:ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC:
        return "arm64-image"
    return "data"


def _bzimage(path: str, data: bytes, limit: int) -> KernelImage:
    if len(data) < SETUP_HEADER_END:
        raise ImageError(f"{path}: the bzImage setup header is cut short ({len(data)} bytes); "
                         "the file is truncated")
    version = _boot_protocol(data)
    setup_version = f"{version >> 8}.{version & 0xFF}"
    if version < MIN_PAYLOAD_PROTOCOL:
        raise ImageError(f"{path}: boot protocol {setup_version} predates payload_offset (2.08); "
                         "such old kernels have no KHO: nothing to check")
    pm_start = _setup_bytes(data)
    offset, length = struct.unpack_from("<II", data, PAYLOAD_OFFSET)
    start = pm_start + offset
    if length == 0 or start + length > len(data):
        raise ImageError(f"{path}: the bzImage payload ({length} bytes at {start:#x}) runs past "
                         f"the end of the file ({len(data)} bytes): the image is truncated")
    kernel_version = None
    ptr = struct.unpack_from("<H", data, KERNEL_VERSION_PTR)[0]
    if ptr and ptr + 0x200 < pm_start:
        raw = data[ptr + 0x200:min(ptr + 0x200 + 256, pm_start)].split(b"\0")[0]
        kernel_version = raw.decode("ascii", errors="replace") or None
    compression, payload = decompress(data[start:start + length], limit)
    return KernelImage(ImageInfo(path, "bzImage", compression, setup_version,
                                 kernel_version or _banner(payload), len(payload), length,
                                 _payload_kind(payload)), payload)


def _zboot(path: str, data: bytes, limit: int) -> KernelImage:
    if len(data) < ZBOOT_HEADER:
        raise ImageError(f"{path}: the EFI zboot header is cut short; the file is truncated")
    offset, size = struct.unpack_from("<II", data, 8)
    name = data[24:56].split(b"\0")[0].decode("ascii", errors="replace")
    if size == 0 or offset + size > len(data):
        raise ImageError(f"{path}: the zboot payload ({size} bytes at {offset:#x}) runs past the "
                         f"end of the file ({len(data)} bytes): the image is truncated")
    compression, payload = decompress(data[offset:offset + size], limit)
    if ZBOOT_NAMES.get(name, name) != compression:
        raise ImageError(f"{path}: the zboot header says {name!r} but the payload is "
                         f"{compression}; the image is corrupt")
    return KernelImage(ImageInfo(path, "arm64-zboot", compression, None, _banner(payload),
                                 len(payload), size, _payload_kind(payload)), payload)


def _plain(path: str, data: bytes, kind: str) -> KernelImage:
    return KernelImage(ImageInfo(path, kind, "none", None, _banner(data), len(data), len(data),
                                 kind), data)


def parse_image(data: bytes, path: str = "<image>", limit: int = MAX_OUTPUT) -> KernelImage:
    """Identify a kernel image held in memory and return its decompressed payload."""
    if _is_bzimage(data):
        return _bzimage(path, data, limit)
    if data[:2] == b"MZ" and data[4:8] == b"zimg":
        return _zboot(path, data, limit)
    if data.startswith(b"\x7fELF"):
        return _plain(path, data, "elf")
    if data[ARM64_MAGIC_OFFSET:ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC:
        return _plain(path, data, "arm64-image")
    c = detect_compression(data)
    if c is not None:
        # A bare compressed kernel (Debian arm64's vmlinuz is Image.gz).
        _, payload = decompress(data, limit)
        kind = _payload_kind(payload)
        if kind == "data":
            raise ImageError(f"{path}: a {c.name} stream that does not hold a kernel (neither an "
                             "ELF vmlinux nor an arm64 Image)")
        return KernelImage(ImageInfo(path, kind, c.name, None, _banner(payload), len(payload),
                                     len(data), kind), payload)
    if len(data) < SETUP_HEADER_END:
        raise ImageError(f"{path}: {len(data)} bytes is too short for a kernel image; the file "
                         "is truncated or not a kernel")
    raise ImageError(f"{path} is not a kernel image: no x86 bzImage header ('HdrS' at 0x202), "
                     "no EFI zboot, ELF or arm64 Image header; give a /boot/vmlinuz-* file or a "
                     "vmlinux")


def read_image(path: str, limit: int = MAX_OUTPUT) -> KernelImage:
    """Read a kernel image file and return its decompressed payload and what it is. Only a
    regular file of at most MAX_INPUT bytes is read (kernel/callerfile.py: a FIFO, a device or a
    directory is refused without blocking, a larger file before any read)."""
    try:
        with open_regular(path) as opened:
            if opened.size > MAX_INPUT:
                raise ImageError(f"{path} has {opened.size} bytes, more than the "
                                 f"{MAX_INPUT >> 20} MiB a kernel image can be here; give the "
                                 "bzImage/Image, or strip a vmlinux (objcopy --strip-debug)")
            data = opened.read_all(MAX_INPUT)
    except AgentError as exc:
        hint = _OPEN_HINTS.get(type(exc))
        raise ImageError(f"{exc.message}; {hint}" if hint else exc.message, type(exc)) from exc
    return parse_image(data, path, limit)


_OPEN_HINTS: dict[type[AgentError], str] = {
    NotFound: "give the path of a kernel image (e.g. /boot/vmlinuz-RELEASE)",
    PermissionDenied: "kernel images are often readable by root only: run as root",
}
