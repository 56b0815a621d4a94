"""The ABI version strings of kernel images this agent has decoded, kept across the kexec.

Reading which file-handler versions a kernel speaks means decompressing its image and scanning
it (`abi.compat.payload_strings`): under TCG 26 s of a 43 s verification, on the critical path
of every VM manager waiting for its session after the kexec. Prepare has decoded that very image
already, as its target: it records the strings here, keyed by the BLAKE3 digest of the image
file's bytes, and verify looks the running kernel's image up by the digest of what is in /boot
now. Equal digests are equal images, so the strings are the ones a new scan would find. The
digest is BLAKE3, or SHA-256 where the blake3 module is missing (digest.default_algorithm): the
entry's key names it, and a lookup reads only entries of its own algorithm.

    <state dir>/image-strings.json
        {"version": 1, "images": [{"blake3": "<64 hex>", "strings": {"<contract>": [...]}}]}
        ("sha256" instead of "blake3" for an entry keyed by SHA-256)

At most MAX_IMAGES entries, newest last. The file is a cache: one of any other shape (absent,
unreadable, too large, not this schema) is a miss, never an error, and the next record
replaces it.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .digest import default_algorithm, new_hasher
from .errors import AgentError
from .kernel.atomicfile import write_atomic
from .kernel.callerfile import read_if_present

FILE_NAME = "image-strings.json"
SCHEMA_VERSION = 1
MAX_IMAGES = 4
MAX_FILE_BYTES = 1 << 20        # four images' strings are a few hundred bytes
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"[a-z0-9:_-]{1,64}")      # contract keys: "kho-root", "handler:memfd"
_STRING = re.compile(r"[a-z0-9;_-]{1,128}")


DIGEST_CHUNK = 4 << 20  # hashed a piece at a time: one call must not hold the GIL for long


def image_digest(data: bytes) -> str:
    """The key of an image: its digest (BLAKE3, else SHA-256), lowercase hex."""
    hasher = new_hasher(default_algorithm(), len(data))
    view = memoryview(data)
    for start in range(0, len(data), DIGEST_CHUNK):
        hasher.update(view[start:start + DIGEST_CHUNK])
    return str(hasher.hexdigest())


@dataclass
class ImageStrings:
    """The cache in one state directory."""

    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME

    def _load(self) -> list[tuple[str, dict[str, list[str]]]]:
        try:
            raw = read_if_present(self.path, "image strings", MAX_FILE_BYTES)
        except AgentError:
            return []
        if not isinstance(raw, bytes):
            return []
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            return []
        if not isinstance(doc, dict) or doc.get("version") != SCHEMA_VERSION:
            return []
        images = doc.get("images")
        if not isinstance(images, list):
            return []
        out = []
        for entry in images[-MAX_IMAGES:]:
            parsed = _entry(entry)
            if parsed is not None:
                out.append(parsed)
        return out

    def lookup(self, digest: str) -> dict[str, list[str]] | None:
        """The strings recorded for the image with this digest, or None."""
        for key, strings in self._load():
            if key == digest:
                return strings
        return None

    def remember(self, digest: str, strings: dict[str, list[str]]) -> None:
        """Record an image's strings (best effort: a cache that cannot be written is a miss
        later, and the caller's operation goes on)."""
        images = [(k, s) for k, s in self._load() if k != digest]
        images.append((digest, {k: list(v) for k, v in strings.items()}))
        doc = {"version": SCHEMA_VERSION,
               "images": [{default_algorithm(): k, "strings": s}
                          for k, s in images[-MAX_IMAGES:]]}
        # a cache: verify decodes the image itself when it finds nothing here
        with contextlib.suppress(AgentError, OSError):
            write_atomic(self.path, json.dumps(doc, sort_keys=True).encode() + b"\n")


def _entry(entry: object) -> tuple[str, dict[str, list[str]]] | None:
    if not isinstance(entry, dict):
        return None
    # an entry keyed by another algorithm is a miss here (its key is not this digest)
    digest, strings = entry.get(default_algorithm()), entry.get("strings")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        return None
    if not isinstance(strings, dict):
        return None
    out: dict[str, list[str]] = {}
    for key, values in strings.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key) or not isinstance(values, list):
            return None
        if not all(isinstance(v, str) and _STRING.fullmatch(v) for v in values):
            return None
        out[key] = list(values)
    return digest, out
