"""`kexec-metadata` sub-blob, version 1 (include/linux/kho/abi/kexec_metadata.h, 7.1+).

    struct kho_kexec_metadata {            // __packed, 73 bytes
        u32  version;                       // KHO_KEXEC_METADATA_VERSION = 1, must be first
        char previous_release[65];          // uname -r of the kernel that kexec'd
        u32  kexec_count;                   // kexec boots since the last cold boot
    };

The kernel only warns about a short blob or another version, so findings here are warnings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..context import DecodeContext, cstr
from ..errors import AbiError
from ..structs import layout
from .records import KEXEC_METADATA, SubtreeVersion

SUBTREE_NAME = "kexec-metadata"
VERSION = 1
RELEASE_LEN = 65
SER = layout(f"<I{RELEASE_LEN}sI", 73)  # struct kho_kexec_metadata, __packed
SIZE_V1 = SER.size


@dataclass
class KexecMetadata:
    version: int
    previous_release: str | None
    kexec_count: int | None


def decode(blob: bytes, ctx: DecodeContext, path: str) -> KexecMetadata | None:
    if len(blob) < 4:
        ctx.add("kexec-metadata-invalid", path,
                f"kexec-metadata is {len(blob)} bytes, shorter than its version field; the next "
                "kernel ignores it")
        return None
    (version,) = struct.unpack_from("<I", blob, 0)
    if version != VERSION:
        ctx.add("kexec-metadata-invalid", path,
                f"kexec-metadata version {version} is unknown (this decoder knows {VERSION}); the "
                "next kernel ignores it")
        return KexecMetadata(version, None, None)
    if len(blob) < SIZE_V1:
        ctx.add("kexec-metadata-invalid", path,
                f"kexec-metadata v1 is {len(blob)} bytes, needs {SIZE_V1}; the next kernel "
                "ignores it")
        return KexecMetadata(version, None, None)
    release, had_nul = cstr(blob[4:4 + RELEASE_LEN])
    if not had_nul:
        ctx.add("name-unterminated", path, "kexec-metadata previous_release has no NUL in its "
                "65 bytes")
    (count,) = struct.unpack_from("<I", blob, 4 + RELEASE_LEN)
    return KexecMetadata(version, release, count)


def encode(meta: KexecMetadata) -> bytes:
    release = (meta.previous_release or "").encode()
    if len(release) >= RELEASE_LEN:
        raise AbiError("release does not fit the 65-byte field with its NUL")
    return SER.pack(meta.version, release, meta.kexec_count or 0)


KEXEC_METADATA_V1 = SubtreeVersion(
    family=KEXEC_METADATA,
    compatible=f"v{VERSION}",  # a number in the blob, not a string
    subtree_name=SUBTREE_NAME,
    releases="7.1 ..",
    decode=decode,
    image_strings=(SUBTREE_NAME,),
)
