"""Synthetic kernel images: a minimal x86 bzImage whose gzip payload names a release and the ABI
versions the simulated kernel speaks, found by `kernel.image.read_image` and
`abi.compat.abi_from_payload` exactly as in a real image."""

from __future__ import annotations

import gzip
import struct

from ..abi import registry
from ..abi.formats.records import KEXEC_METADATA
from .versions import SimAbi

SETUP_SECTS = 4
BOOT_PROTOCOL = 0x020F  # 2.15
VERSION_OFFSET = 0x300  # kernel_version pointer value; the string sits at +0x200
BUILDER = "sim@kho-agent"
UTS_VERSION = "#1 SMP PREEMPT_DYNAMIC"   # `uname -v` of every simulated kernel


def abi_strings(abi: SimAbi) -> list[str]:
    """The NUL-terminated strings a kernel of this ABI carries in .rodata."""
    out = [abi.kho, abi.luo, abi.memfd, abi.memblock, *abi.memblock_format.image_strings,
           *abi.luo_format.image_strings]
    if abi.has_kexec_metadata:
        out += next(f.image_strings for f in registry.SUBTREES if f.family == KEXEC_METADATA)
    return out


def banner(release: str) -> str:
    return f"Linux version {release} ({BUILDER}) {UTS_VERSION}"


def build_payload(release: str, abi: SimAbi) -> bytes:
    """An ELF-looking vmlinux stand-in: header, some code bytes, .rodata strings, the banner."""
    elf = b"\x7fELF\x02\x01\x01" + bytes(57)
    rodata = b"".join(b"\0" + s.encode() for s in abi_strings(abi)) + b"\0"
    return (elf + b"\x90" * 512 + rodata + banner(release).encode() + b"\n\0"
            + b"\xcc" * 256)


def build_bzimage(release: str, abi: SimAbi) -> bytes:
    """Boot sector + setup header (boot protocol 2.15), a protected-mode stub, and the gzip payload
    at payload_offset, as the x86 boot protocol lays it out."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    setup[0x1F1] = SETUP_SECTS
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, BOOT_PROTOCOL)
    struct.pack_into("<H", setup, 0x20E, VERSION_OFFSET)
    version = f"{release} ({BUILDER}) {UTS_VERSION}".encode()[:255] + b"\0"
    setup[VERSION_OFFSET + 0x200:VERSION_OFFSET + 0x200 + len(version)] = version
    compressed = gzip.compress(build_payload(release, abi), mtime=0)
    stub = b"\x90" * 0x200
    struct.pack_into("<II", setup, 0x248, len(stub), len(compressed))
    return bytes(setup) + stub + compressed
