"""The ABI versions a simulated kernel speaks, and which combinations one kernel could ship.

Each era's facts (reference §0, §1.2, §2.4) become properties here, so the rest of the simulator
asks "does this kernel write blob-size?" instead of comparing version strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InvalidArgument

KHO_VERSIONS = ("kho-v1", "kho-v2", "kho-v3", "kho-v4")
# LUO and memfd versions each KHO root era can be combined with. This is the decoder's
# SHIPPED_WITH table widened by one pair: kho-v3 with memfd-v1 (which one release carried kho-v3
# is unconfirmed, §0, and rehearsing an older memfd handler against it is useful).
ERA_COMBINATIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "kho-v1": (frozenset({"luo-v1"}), frozenset({"memfd-v1"})),
    "kho-v2": (frozenset({"luo-v1"}), frozenset({"memfd-v1", "memfd-v2"})),
    "kho-v3": (frozenset({"luo-v1"}), frozenset({"memfd-v1", "memfd-v2"})),
    "kho-v4": (frozenset({"luo-v5"}), frozenset({"memfd-v2"})),
}
MEMBLOCK_VERSIONS = ("memblock-v1",)


@dataclass(frozen=True)
class SimAbi:
    """The versions a simulated kernel speaks."""

    kho: str = "kho-v4"
    luo: str = "luo-v5"
    memfd: str = "memfd-v2"
    memblock: str = "memblock-v1"

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> SimAbi:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"an ABI record must be an object, not {raw!r}")
        return cls(**{k: str(raw[k]) for k in ("kho", "luo", "memfd", "memblock")})

    @property
    def memmap_format(self) -> str:
        """Key into abi.memmap.MEMMAP_FORMATS."""
        return {"kho-v1": "chunks-page", "kho-v2": "radix-v2-early"}.get(self.kho, "radix")

    @property
    def radix_plus_one(self) -> bool:
        return self.kho in ("kho-v3", "kho-v4")

    @property
    def has_blob_size(self) -> bool:
        return self.kho != "kho-v1"

    @property
    def has_kexec_metadata(self) -> bool:
        return self.kho != "kho-v1"  # 7.1+

    @property
    def luo_blocks(self) -> bool:
        """luo-v5: sessions and files in KHO block chains (no fixed caps, empty-block defect)."""
        return self.luo == "luo-v5"

    @property
    def debugfs_72(self) -> bool:
        """7.2/7.3 debugfs: out/fdt frozen at its early size on a cold boot, absent on a KHO
        boot (§4.1). Older eras are written in full (their behaviour is not pinned down)."""
        return self.kho == "kho-v4"

    @property
    def memmap_at_finalize(self) -> bool:
        """kho-v1 writes preserved-memory-map only at finalize, inside reboot() with LUO."""
        return self.kho == "kho-v1"


def check_abi(abi: SimAbi) -> None:
    """Raise InvalidArgument unless one kernel could speak this combination."""
    combo = ERA_COMBINATIONS.get(abi.kho)
    if combo is None:
        raise InvalidArgument(f"the simulator speaks KHO roots {', '.join(KHO_VERSIONS)}, not "
                              f"{abi.kho!r}")
    luos, memfds = combo
    if abi.luo not in luos:
        raise InvalidArgument(f"{abi.luo!r} with a {abi.kho!r} root is not a combination any "
                              f"kernel shipped: a {abi.kho} kernel speaks "
                              f"{', '.join(sorted(luos))} (luo-v1 is the FDT era of kho-v1..v3, "
                              "luo-v5 needs kho-v4 block chains)")
    if abi.memfd not in memfds:
        raise InvalidArgument(f"{abi.memfd!r} with a {abi.kho!r} root is not a combination the "
                              f"simulator supports; use {', '.join(sorted(memfds))}")
    if abi.memblock not in MEMBLOCK_VERSIONS:
        raise InvalidArgument(f"the simulator speaks memblock {', '.join(MEMBLOCK_VERSIONS)}, "
                              f"not {abi.memblock!r}")
