"""The persisted state of a simulated boot (`boot.json` in the boot's directory, boots.py):
everything a process attaching to the directory needs to act as this kernel, and the bookkeeping
processes share (who owns outgoing sessions, whether the incoming state was deserialized)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NotFound, StateCorrupt
from .boot import Region, Scratch
from .store import write_atomic
from .versions import SimAbi

BOOT_FILE = "boot.json"


@dataclass
class Incoming:
    """The LUO state this boot received (after a live update)."""

    present: bool = False          # a LUO state was accepted at boot
    status: str = "pending"        # pending (not yet opened), ok, error
    error: str = ""
    # which sessions are retrieved or finished: retrieval.py (a marker file per session)


@dataclass
class Baseline:
    """What this kernel allocated and preserved at boot (fixed addresses)."""

    root: int = 0                  # root FDT page
    memmap: int = 0                # radix root (0 for kho-v1 until finalize)
    luo: int = 0                   # LUO blob (luo_ser, or the luo-v1 FDT)
    luo_size: int = 0
    flb: int = 0
    memblock: int = 0
    memblock_size: int = 0
    metadata: int = 0
    preserved: list[tuple[int, int]] = field(default_factory=list)  # (phys, bytes)
    meta_window: tuple[int, int] = (0, 0)                            # map pages go here
    free_ranges: list[tuple[int, int]] = field(default_factory=list)  # data allocator
    cursor: int = 0


@dataclass
class BootState:
    boot_count: int
    boot_id: str
    release: str
    abi: SimAbi
    cmdline: str
    memory_mib: int
    nodes: int
    kho_enabled: bool
    luo_enabled: bool
    scratch: list[Scratch]
    reserved: list[Region]
    reserve_mem: dict[str, tuple[int, int]]    # name -> (phys, size)
    liveupdate_number: int                     # outgoing luo_ser / liveupdate-number
    kexec_count: int                           # outgoing kexec-metadata count
    kho_boot: bool                             # this boot accepted a handover
    previous_release: str | None               # from the incoming kexec-metadata
    incoming: Incoming = field(default_factory=Incoming)
    baseline: Baseline = field(default_factory=Baseline)
    loaded: dict[str, object] | None = None    # the kexec image loaded in this boot
    # (pid, instance) that took the outgoing sessions, for messages: whether it still holds
    # them is its lock (kernel.py, OWNER_LOCK), which a dead process does not hold
    outgoing_owner: tuple[int, str] | None = None
    device_holder: int | None = None
    panics: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the kernel logged at boot

    def to_json(self) -> dict[str, object]:
        return {
            "boot_count": self.boot_count, "boot_id": self.boot_id, "release": self.release,
            "abi": self.abi.to_json(), "cmdline": self.cmdline, "memory_mib": self.memory_mib,
            "nodes": self.nodes, "kho_enabled": self.kho_enabled,
            "luo_enabled": self.luo_enabled,
            "scratch": [[s.phys, s.size] for s in self.scratch],
            "reserved": [[r.base, r.size, r.nid, r.flags] for r in self.reserved],
            "reserve_mem": {k: list(v) for k, v in self.reserve_mem.items()},
            "liveupdate_number": self.liveupdate_number, "kexec_count": self.kexec_count,
            "kho_boot": self.kho_boot, "previous_release": self.previous_release,
            "incoming": vars(self.incoming),
            "baseline": {**vars(self.baseline),
                         "preserved": [list(p) for p in self.baseline.preserved],
                         "meta_window": list(self.baseline.meta_window),
                         "free_ranges": [list(r) for r in self.baseline.free_ranges]},
            "loaded": self.loaded,
            "outgoing_owner": list(self.outgoing_owner) if self.outgoing_owner else None,
            "device_holder": self.device_holder, "panics": self.panics, "notes": self.notes,
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> BootState:
        d = dict(raw)
        inc = dict(d.pop("incoming"))  # type: ignore[call-overload]
        for moved in ("finished", "retrieved"):  # a directory of an earlier version
            inc.pop(moved, None)
        base = dict(d.pop("baseline"))  # type: ignore[call-overload]
        owner = d.pop("outgoing_owner")
        state = cls(
            abi=SimAbi.from_json(d.pop("abi")),
            scratch=[Scratch(int(p), int(s)) for p, s in d.pop("scratch")],  # type: ignore
            reserved=[Region(*map(int, r)) for r in d.pop("reserved")],  # type: ignore
            reserve_mem={str(k): (int(v[0]), int(v[1]))
                         for k, v in d.pop("reserve_mem").items()},  # type: ignore
            incoming=Incoming(**inc),
            baseline=Baseline(**{**base,
                                 "preserved": [tuple(p) for p in base["preserved"]],
                                 "meta_window": tuple(base["meta_window"]),
                                 "free_ranges": [tuple(r) for r in base["free_ranges"]]}),
            outgoing_owner=(int(owner[0]), str(owner[1])) if owner else None,  # type: ignore
            **d,  # type: ignore[arg-type]
        )
        return state


def load(directory: Path) -> BootState:
    path = directory / BOOT_FILE
    if not path.exists():
        raise NotFound(f"{directory} is not a simulated kernel directory (no {BOOT_FILE}); "
                       "create one with SimKernel.create() or 'kho-agentd --simulate'")
    try:
        raw = json.loads(path.read_text())
        return BootState.from_json(raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateCorrupt(f"{path} cannot be read ({exc}); recreate the simulation with "
                           "SimKernel.create()") from exc


def save(directory: Path, state: BootState) -> None:
    # compact: indenting dominated when the state was rewritten on every retrieve; durable: a
    # host crash leaves the old state or the new, not an empty file
    write_atomic(directory / BOOT_FILE, json.dumps(state.to_json()).encode(), durable=True)
