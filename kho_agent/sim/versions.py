"""The ABI versions a simulated kernel speaks, and which combinations one kernel could ship: a view
over the format records (abi/registry.py).

A SimAbi names one version per family; its properties are the records of those versions, so the
rest of the simulator asks the record ("does this kernel write blob-size?", "are sessions in
block chains?") and never compares version strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TypeVar

from ..abi import registry
from ..abi.formats.records import (
    KHO,
    LUO,
    MEMBLOCK,
    MEMFD,
    KhoRootVersion,
    LuoVersion,
    MemfdVersion,
    SubtreeVersion,
)
from ..errors import InvalidArgument

R = TypeVar("R")


def _newest(family: str, among: frozenset[str] | None = None) -> str:
    """The newest version of a family (the registry lists them oldest first), among `among`."""
    return [v for v in registry.versions(family) if among is None or v in among][-1]


# By default a simulated kernel speaks what the newest kernels ship (kho-v4, luo-v5, memfd-v2,
# memblock-v1: 7.2/7.3).
_NEWEST_KHO = _newest(KHO)
_NEWEST_LUOS, _NEWEST_MEMFDS = registry.shipped_with(_NEWEST_KHO)


@dataclass(frozen=True)
class SimAbi:
    """The versions a simulated kernel speaks (check_abi() says whether one kernel could)."""

    kho: str = _NEWEST_KHO
    luo: str = _newest(LUO, _NEWEST_LUOS)
    memfd: str = _newest(MEMFD, _NEWEST_MEMFDS)
    memblock: str = _newest(MEMBLOCK)

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> SimAbi:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"an ABI record must be an object, not {raw!r}")
        return cls(**{k: str(raw[k]) for k in ("kho", "luo", "memfd", "memblock")})

    # --- the records (check_abi() has made sure each exists) ---------------------------------
    @property
    def kho_format(self) -> KhoRootVersion:
        return _record(registry.kho_root(self.kho), KHO, self.kho)

    @property
    def luo_format(self) -> LuoVersion:
        return _record(registry.luo(self.luo), LUO, self.luo)

    @property
    def memfd_format(self) -> MemfdVersion:
        return _record(registry.memfd(self.memfd), MEMFD, self.memfd)

    @property
    def memblock_format(self) -> SubtreeVersion:
        found = registry.find(MEMBLOCK, self.memblock)
        return _record(found if isinstance(found, SubtreeVersion) else None, MEMBLOCK,
                       self.memblock)

    # --- the quirks the simulator asks about ----------------------------------------------------
    @property
    def has_blob_size(self) -> bool:
        return self.kho_format.size_prop is not None

    @property
    def has_kexec_metadata(self) -> bool:
        return self.kho_format.writes_kexec_metadata

    @property
    def luo_blocks(self) -> bool:
        """Sessions and files in KHO block chains (no fixed caps, empty-block defect)."""
        return self.luo_format.sessions_in_blocks

    @property
    def debugfs_fdt_truncated(self) -> bool:
        """debugfs out/fdt frozen at its early size on a cold boot, absent on a KHO boot (§4.1).
        Older eras are written in full (their behaviour is not pinned down)."""
        return self.kho_format.debugfs_fdt_truncated

    @property
    def memmap_at_finalize(self) -> bool:
        """The root's preserved-memory-map is written only at finalize, inside reboot()."""
        return self.kho_format.memmap_at_finalize


def _record(record: R | None, family: str, version: str) -> R:
    if record is None:
        spoken = ", ".join(registry.versions(family))
        raise InvalidArgument(f"the simulator speaks {family} {spoken}, not {version!r}")
    return record


def check_abi(abi: SimAbi) -> None:
    """Raise InvalidArgument unless one kernel could speak this combination."""
    if registry.kho_root(abi.kho) is None:
        raise InvalidArgument(f"the simulator speaks KHO roots {', '.join(registry.versions(KHO))}"
                              f", not {abi.kho!r}")
    luos, memfds = registry.simulated_with(abi.kho)
    if abi.luo not in luos:
        eras = "; ".join(f"{f.compatible} with {', '.join(sorted(f.shipped_with_kho))}"
                         for f in registry.LUO_FORMATS)
        raise InvalidArgument(f"{abi.luo!r} with a {abi.kho!r} root is not a combination any "
                              f"kernel shipped: a {abi.kho} kernel speaks "
                              f"{', '.join(sorted(luos))} (LUO versions shipped: {eras})")
    if abi.memfd not in memfds:
        raise InvalidArgument(f"{abi.memfd!r} with a {abi.kho!r} root is not a combination the "
                              f"simulator supports; use {', '.join(sorted(memfds))}")
    if registry.find(MEMBLOCK, abi.memblock) is None:
        raise InvalidArgument(f"the simulator speaks memblock "
                              f"{', '.join(registry.versions(MEMBLOCK))}, not {abi.memblock!r}")


def era_combinations() -> list[SimAbi]:
    """Every combination check_abi() accepts (the simulator eras the tests rehearse)."""
    memblocks = registry.versions(MEMBLOCK)
    return [SimAbi(kho, luo, memfd, memblock)
            for kho in registry.versions(KHO)
            for luo in sorted(registry.simulated_with(kho)[0])
            for memfd in sorted(registry.simulated_with(kho)[1])
            for memblock in memblocks]
