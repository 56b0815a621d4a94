"""Findings: what a check found, with a stable code, a severity, a path and an actionable sentence.

Codes are stable identifiers that fleet tooling may match on; never rename one. Every code has a
default severity here; a check may lower it where the context makes a condition benign (for
example the incoming side of a kexec, where the memory map is no longer reserved).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    path: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity.value, "path": self.path,
                "message": self.message}


# code -> (default severity, what it means). Tests check that every code used is listed here.
CODES: dict[str, tuple[Severity, str]] = {
    # structure and versions
    "compatible-unknown": (Severity.ERROR, "a compatible string or version this decoder does not know"),
    "compatible-mismatch": (Severity.ERROR, "a compatible string that disagrees with its container"),
    # composite compatible strings ("base;sub-a;sub-b", abi/composite.py): one per component
    "compatible-component-known": (Severity.INFO, "a component of a composite compatible string this decoder knows"),
    "compatible-component-unknown": (Severity.ERROR, "a component of a composite compatible string this decoder does not know"),
    "compatible-component-unsorted": (Severity.ERROR, "composite sub-components out of their strict alphabetical order"),
    "compatible-component-duplicate": (Severity.ERROR, "a composite compatible string names a component twice"),
    "compatible-component-empty": (Severity.ERROR, "a composite compatible string has an empty component"),
    "property-missing": (Severity.ERROR, "a required property is absent"),
    "property-malformed": (Severity.ERROR, "a property has the wrong size or an impossible value"),
    "blob-malformed": (Severity.ERROR, "a blob or structure could not be decoded"),
    "fdt-duplicate": (Severity.ERROR, "an FDT node holds two children or properties of one name"),
    "subtree-unknown": (Severity.WARNING, "a KHO subtree no decoder here knows; its contents are not checked"),
    # memory
    "not-preserved": (Severity.ERROR, "a structure lies in memory the preserved-memory map does not cover"),
    "scratch-overlap": (Severity.ERROR, "preserved memory overlaps a KHO scratch area"),
    "misaligned": (Severity.ERROR, "an address that must be aligned is not"),
    "memmap-overlap": (Severity.WARNING, "two preserved ranges overlap"),
    "memory-unavailable": (Severity.INFO, "the memory source lacks pages; what they hold was not checked"),
    "memmap-not-checked": (Severity.INFO, "the preserved-memory map was not used for checks"),
    # chains
    "chain-cycle": (Severity.ERROR, "a linked chain of pages loops back on itself"),
    "chain-too-long": (Severity.ERROR, "a chain exceeds what the kernel accepts"),
    "block-count-invalid": (Severity.ERROR, "a serialization block has count 0 or above its capacity"),
    "count-mismatch": (Severity.ERROR, "a count disagrees with the data it describes"),
    # LUO
    "session-duplicate-name": (Severity.ERROR, "two sessions share a name"),
    "token-duplicate": (Severity.ERROR, "two files of one session share a token"),
    "name-unterminated": (Severity.ERROR, "a fixed-size name field has no NUL"),
    "name-empty": (Severity.ERROR, "a session name is empty"),
    "sessions-not-serialized": (Severity.INFO, "LUO serializes sessions only inside reboot(); none in memory yet"),
    "luo-blob-freed": (Severity.INFO, "the incoming LUO blob was freed by the kernel after boot"),
    "handler-unknown": (Severity.ERROR, "a file handler compatible the decoder does not know"),
    # memfd
    "memfd-short": (Severity.ERROR, "a memfd's folio list does not cover its size"),
    "memfd-seals-invalid": (Severity.ERROR, "seal bits the kernel refuses on retrieve"),
    "vmalloc-flags-unknown": (Severity.WARNING, "kho_vmalloc flag bits the kernel drops on restore"),
    # ABI compatibility between the running and a target kernel (abi/compat.py)
    "abi-incompatible": (Severity.ERROR, "the target kernel does not accept a contract the running kernel hands over"),
    "abi-unverified": (Severity.WARNING, "a contract's version is not known on one side; compatibility is not proven"),
    # kernel quirks
    "debugfs-fdt-truncated": (Severity.INFO, "debugfs kho/out/fdt is cut short by a known kernel defect"),
    "debugfs-fdt-absent": (Severity.INFO, "no kho/out/fdt: the kernel booted through KHO and does not expose it"),
    "kexec-metadata-invalid": (Severity.WARNING, "the kernel ignores this kexec-metadata (it only warns)"),
}


def make(code: str, path: str, message: str, severity: Severity | None = None) -> Finding:
    """Build a finding with the code's default severity unless the caller overrides it."""
    default, _ = CODES[code]
    return Finding(code=code, severity=severity or default, path=path, message=message)


def worst(findings: list[Finding]) -> Severity | None:
    order = (Severity.ERROR, Severity.WARNING, Severity.INFO)
    for sev in order:
        if any(f.severity is sev for f in findings):
            return sev
    return None
