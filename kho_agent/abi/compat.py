"""Which handover ABI versions two kernels speak, and what a kexec between them would do.

A kernel image names every contract it speaks as a NUL-terminated string in its .rodata
(`kho-v4`, `luo-v5`, `memfd-v2`, `memblock-v1`, ...); the running kernel's outgoing KHO state
(debugfs) shows what it actually hands over. `compare()` lines the two up, contract by contract,
and says what the next kernel does on a mismatch (docs/kernel-abi.md §1.1, §2.2-§2.4, §3.9):

    KHO root        the next kernel disables KHO revival: preserved memory lost, cold boot
    LUO             the next kernel panics at boot
    file handler    every open of /dev/liveupdate fails with EIO
    memblock        reserve_mem regions allocated afresh (warning only)
    kexec-metadata  ignored with a warning

The contracts form a tree: LUO, memblock and kexec-metadata are read only if the KHO root is
accepted, file handlers only if LUO is. A row below a contract that already drops the handover
is shown as not reached. Everything here is pure: bytes and decoded states in, records out.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import luo, registry
from .context import Side
from .findings import Finding, Severity, make
from .formats import kexec_metadata_v1 as kexec_metadata
from .formats import memblock_v1 as memblock
from .formats.kexec_metadata_v1 import KexecMetadata
from .formats.memblock_v1 import MemblockState
from .kho_state import KhoState
from .luo_common import LuoState


class Verdict(enum.Enum):
    COMPATIBLE = "compatible"
    INCOMPATIBLE = "incompatible"
    UNKNOWN = "unknown"


class Impact(enum.Enum):
    FATAL = "error"      # a mismatch loses the handover, panics the next kernel or breaks LUO
    WARNING = "warning"  # a mismatch only loses optional state; the kernel warns


# --- what a mismatch does, word for word (tests and fleet tooling match these) ---------------

KHO_ROOT_MISMATCH = ("the next kernel disables KHO revival: all preserved memory is lost and it "
                     "boots as a cold boot (no panic)")
KHO_ROOT_MISSING = ("the target kernel is built without KHO (CONFIG_KEXEC_HANDOVER): it ignores "
                    "the handover; all preserved memory is lost and it boots as a cold boot")
LUO_MISMATCH = ("the next kernel panics at boot (LUO check at early_initcall, even with "
                "liveupdate=off as long as KHO is enabled)")
LUO_MISSING = ("the target kernel is built without LUO: it ignores the LUO state and every "
               "preserved session is lost (no panic)")
FLB_MISMATCH = ("the next kernel cannot restore the LUO FLB state (global objects such as IOMMU "
                "or PCI state); the exact failure is not pinned down (docs/kernel-abi.md §2.5)")
FLB_MISSING = ("the target kernel does not read LUO FLB state: file-lifecycle-bound global "
               "objects are lost")
HANDLER_MISMATCH = ("every open of /dev/liveupdate in the next kernel fails with EIO: the "
                    "preserved sessions are unreachable and leaked until the next reboot")
HANDLER_MISSING = ("the target kernel lacks this file handler: every open of /dev/liveupdate "
                   "fails with EIO; the preserved sessions are unreachable and leaked until "
                   "the next reboot")
MEMBLOCK_MISMATCH = ("reserve_mem regions are allocated afresh in the next kernel and their "
                     "contents are lost (a warning only)")
MEMBLOCK_MISSING = ("the target kernel does not revive reserve_mem regions: they are allocated "
                    "afresh and their contents are lost (a warning only)")
METADATA_MISMATCH = ("the next kernel ignores the kexec metadata with a warning (no previous "
                     "release or kexec count after the update)")
METADATA_MISSING = ("the target kernel does not read kexec metadata: no previous release or "
                    "kexec count after the update (harmless)")


@dataclass(frozen=True)
class Contract:
    key: str
    title: str
    token: str                    # regex of the version string, without the NUL terminator
    parent: str | None            # contract that must be accepted before this one is read
    impact: Impact
    mismatch: str                 # consequence when both speak it, in different versions
    missing: str                  # consequence when the target does not speak it at all
    always: bool = False          # list the row even when neither kernel speaks it
    may_be_module: bool = False   # the code can live in a module, invisible in the image
    presence_version: str | None = None  # the string names the contract, not its version
    # version -> why an equal string does not prove an equal layout; such a pair is compatible
    # only between kernels of the same major.minor release
    same_string_caveats: tuple[tuple[str, str], ...] = ()


HANDLER_PREFIX = "handler:"

# Parents come before their children; compare() relies on that order.
CONTRACTS: tuple[Contract, ...] = (
    Contract("kho-root", "KHO root", r"kho-v\d+(?:;[a-z0-9_-]+)*", None, Impact.FATAL,
             KHO_ROOT_MISMATCH, KHO_ROOT_MISSING, always=True,
             same_string_caveats=tuple((f.compatible, f.same_string_caveat)
                                       for f in registry.KHO_ROOTS if f.same_string_caveat)),
    Contract("luo", "LUO", r"luo-v\d+[a-z0-9_;-]*", "kho-root", Impact.FATAL,
             LUO_MISMATCH, LUO_MISSING, always=True),
    Contract("luo-session", "LUO sessions (luo-v1 FDT)", r"luo-session-v\d+", "luo",
             Impact.FATAL, LUO_MISMATCH, LUO_MISMATCH),
    Contract("luo-flb", "LUO FLB (luo-v1 FDT)", r"luo-flb-v\d+", "luo", Impact.FATAL,
             FLB_MISMATCH, FLB_MISSING),
    Contract(f"{HANDLER_PREFIX}memfd", "memfd file handler", r"memfd-v\d+", "luo", Impact.FATAL,
             HANDLER_MISMATCH, HANDLER_MISSING, always=True),
    Contract(f"{HANDLER_PREFIX}guest_memfd", "guest_memfd file handler",
             r"guest_memfd_luo_v\d+", "luo", Impact.FATAL, HANDLER_MISMATCH, HANDLER_MISSING,
             may_be_module=True),
    Contract(f"{HANDLER_PREFIX}kvm_vm", "KVM VM file handler", r"kvm_vm_luo_v\d+", "luo",
             Impact.FATAL, HANDLER_MISMATCH, HANDLER_MISSING, may_be_module=True),
    Contract("memblock", "memblock reserve_mem", r"memblock-v\d+", "kho-root", Impact.WARNING,
             MEMBLOCK_MISMATCH, MEMBLOCK_MISSING, always=True),
    Contract("reserve-mem", "reserve_mem regions", r"reserve-mem-v\d+", "memblock",
             Impact.WARNING, MEMBLOCK_MISMATCH, MEMBLOCK_MISSING),
    Contract("kexec-metadata", "kexec metadata", re.escape(kexec_metadata.SUBTREE_NAME),
             "kho-root", Impact.WARNING, METADATA_MISMATCH, METADATA_MISSING, always=True,
             presence_version=f"v{kexec_metadata.VERSION}"),
)
CONTRACT_BY_KEY: dict[str, Contract] = {c.key: c for c in CONTRACTS}
_IDENT = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.;")


def contract_for(key: str) -> Contract:
    """The contract row for a key; file handlers nobody listed get a generic one."""
    known = CONTRACT_BY_KEY.get(key)
    if known is not None:
        return known
    name = key.removeprefix(HANDLER_PREFIX)
    return Contract(key, f"{name} file handler", re.escape(name), "luo", Impact.FATAL,
                    HANDLER_MISMATCH, HANDLER_MISSING)


def handler_key(compatible: str) -> str:
    """The handler contract a luo_file_ser compatible belongs to."""
    for c in CONTRACTS:
        if c.key.startswith(HANDLER_PREFIX) and re.fullmatch(c.token, compatible):
            return c.key
    return f"{HANDLER_PREFIX}{compatible}"


def version_key(version: str) -> tuple[tuple[int, ...], str]:
    """Order versions by their numbers: kho-v10 after kho-v9, kho-v4;radix-v1 after kho-v4."""
    return tuple(int(n) for n in re.findall(r"\d+", version)), version


# --- what a kernel speaks --------------------------------------------------------------------

@dataclass(frozen=True)
class Spoken:
    versions: tuple[str, ...]  # ordered by version_key, highest last; empty: speaks none
    source: str                # where it was read: "image", "debugfs", ...
    note: str | None = None

    @property
    def primary(self) -> str | None:
        return self.versions[-1] if self.versions else None


@dataclass
class KernelAbi:
    source: str
    release: str | None = None
    kho_built: bool | None = None
    luo_built: bool | None = None
    contracts: dict[str, Spoken] = field(default_factory=dict)  # key absent: not known
    notes: list[str] = field(default_factory=list)


# The payload is scanned a window at a time: one regular-expression search holds the GIL for as
# long as it runs, and over a 30 MB payload under TCG that starved the daemon's main loop until
# systemd's watchdog killed it (a verify in the QEMU suite). Windows overlap by more than the
# longest string taken, so a string across a boundary is found in the window it starts in.
SCAN_WINDOW = 1 << 20
MAX_STRING = 4096


def _found(payload: bytes, token: str) -> list[str]:
    # The literal prefix keeps the scan fast; the byte before the match is checked by hand so
    # that e.g. "xkho-v4" does not count. Strings usually follow a NUL, but a short one copied
    # into a fixed field may be an instruction immediate (movabs "luo-v5\0\0"), so only an
    # identifier character before it disqualifies a match.
    pattern = re.compile(b"(" + token.encode() + b")\0")
    found: set[str] = set()
    for start in range(0, len(payload), SCAN_WINDOW):
        end = start + SCAN_WINDOW
        for m in pattern.finditer(payload, start, end + MAX_STRING):
            if m.start() >= end:
                break  # the next window's
            if (m.start() and payload[m.start() - 1] in _IDENT) or m.end() - m.start() > MAX_STRING:
                continue
            found.add(m.group(1).decode("ascii"))
    return sorted(found, key=version_key)


def payload_strings(payload: bytes) -> dict[str, list[str]]:
    """The version strings of each contract found in a decompressed image (contract key ->
    versions, highest last): the slow part of reading an image's ABI, and all of its input."""
    return {c.key: _found(payload, c.token) for c in CONTRACTS}


def abi_from_payload(payload: bytes, source: str = "image",
                     release: str | None = None) -> KernelAbi:
    """Which ABI versions a kernel speaks, from the strings in its decompressed image."""
    return abi_from_strings(payload_strings(payload), source, release)


def abi_from_strings(found: dict[str, list[str]], source: str = "image",
                     release: str | None = None) -> KernelAbi:
    """abi_from_payload() from the strings payload_strings() found (a contract missing from
    `found` is one whose strings the image does not hold)."""
    abi = KernelAbi(source, release)
    for c in CONTRACTS:
        versions = sorted(found.get(c.key, []), key=version_key)
        note = None
        if c.presence_version is not None:
            if versions:
                note = (f"version {c.presence_version} assumed: the image names the "
                        f"{c.title} but its version is a number in code, and "
                        f"{c.presence_version} is the only one defined")
            versions = [c.presence_version] if versions else []
        elif len(versions) > 1:
            note = (f"several {c.title} versions appear in the image ({', '.join(versions)}); "
                    f"taken as {versions[-1]}, the highest")
            abi.notes.append(note)
        abi.contracts[c.key] = Spoken(tuple(versions), source, note)
    abi.kho_built = bool(abi.contracts["kho-root"].versions)
    abi.luo_built = bool(abi.contracts["luo"].versions)
    if not abi.kho_built:
        abi.notes.append(f"{source}: no kho-vN string: the kernel is built without KHO "
                         "(CONFIG_KEXEC_HANDOVER is not set)")
    elif not abi.luo_built:
        abi.notes.append(f"{source}: no luo-vN string: the kernel is built without LUO "
                         "(CONFIG_LIVEUPDATE is not set)")
    return abi


def _decoded(state: KhoState | None, name: str) -> tuple[bool, object | None]:
    if state is None:
        return False, None
    for sub in state.subtrees:
        if sub.name == name:
            return True, sub.decoded
    return False, None


def abi_from_state(state: KhoState, incoming: KhoState | None = None,
                   source: str = "debugfs") -> KernelAbi:
    """What the running kernel hands over, from its decoded outgoing KHO state.

    `incoming` (the decoded kho/in state, on a kernel that booted through KHO) supplies the root
    compatible when kho/out/fdt is absent: this kernel accepted that root at boot, so it is its
    own. File handlers are known only once sessions are serialized (inside reboot()); until
    then they are left unknown for the caller to fill in from the kernel image.
    """
    abi = KernelAbi(source, kho_built=True)
    put = abi.contracts.__setitem__
    if state.compatible:
        put("kho-root", Spoken((state.compatible,), source))
    elif incoming is not None and incoming.compatible:
        put("kho-root", Spoken((incoming.compatible,), f"{source} (kho/in)",
                               "from the incoming root FDT, which this kernel accepted at boot"))
    else:
        abi.notes.append(f"{source}: the outgoing root FDT is not readable (a kernel that booted "
                         "through KHO does not expose kho/out/fdt); the KHO root version comes "
                         "from the kernel image, if any")

    present, decoded = _decoded(state, luo.SUBTREE_NAME)
    if not present:
        for key in ("luo", "luo-session", "luo-flb"):
            put(key, Spoken((), source, "no LUO subtree: LUO is off in the running kernel "
                            "(liveupdate=off or not built); it hands over no sessions"))
    elif isinstance(decoded, LuoState):
        abi.luo_built = True
        put("luo", Spoken((decoded.compatible,), source))
        put("luo-session", Spoken(tuple(v for v in (decoded.session_compatible,) if v), source))
        put("luo-flb", Spoken(tuple(v for v in (decoded.flb_compatible,) if v), source))
        if decoded.sessions_serialized:
            seen: dict[str, set[str]] = {}
            for session in decoded.sessions:
                for f in session.files:
                    seen.setdefault(handler_key(f.compatible), set()).add(f.compatible)
            for c in CONTRACTS:
                if c.key.startswith(HANDLER_PREFIX):
                    seen.setdefault(c.key, set())
            for key, versions in seen.items():
                put(key, Spoken(tuple(sorted(versions, key=version_key)), source,
                                "file handlers of the serialized sessions"))
    else:
        abi.luo_built = True
        abi.notes.append(f"{source}: the LUO subtree could not be decoded (see the decode "
                         "findings); its version comes from the kernel image, if any")

    present, decoded = _decoded(state, memblock.SUBTREE_NAME)
    if not present:
        none = "no memblock subtree: no reserve_mem= regions to hand over"
        put("memblock", Spoken((), source, none))
        put("reserve-mem", Spoken((), source, none))
    elif isinstance(decoded, MemblockState):
        put("memblock", Spoken((decoded.compatible,), source))
        put("reserve-mem", Spoken(tuple(sorted({r.compatible for r in decoded.regions},
                                               key=version_key)), source))

    present, decoded = _decoded(state, kexec_metadata.SUBTREE_NAME)
    if not present:
        put("kexec-metadata", Spoken((), source, "no kexec-metadata subtree (kernels before 7.1 "
                                     "do not write one)"))
    elif isinstance(decoded, KexecMetadata):
        put("kexec-metadata", Spoken((f"v{decoded.version}",), source))
        if decoded.previous_release and state.side is Side.OUT:
            # The outgoing blob carries this kernel's own release for the next kernel to log.
            abi.release = decoded.previous_release
            abi.notes.append(f"{source}: the outgoing kexec metadata names release "
                             f"{decoded.previous_release}, kexec count {decoded.kexec_count}")
    return abi


def merge(primary: KernelAbi, fallback: KernelAbi) -> KernelAbi:
    """One view of a kernel from two sources: `primary` wins where it knows a contract."""
    return KernelAbi(
        source=f"{primary.source} + {fallback.source}",
        release=primary.release or fallback.release,
        kho_built=primary.kho_built if primary.kho_built is not None else fallback.kho_built,
        luo_built=primary.luo_built if primary.luo_built is not None else fallback.luo_built,
        contracts={**fallback.contracts, **primary.contracts},
        notes=[*primary.notes, *fallback.notes],
    )


# --- the comparison --------------------------------------------------------------------------

@dataclass(frozen=True)
class CompatRow:
    contract: str
    title: str
    running: tuple[str, ...] | None   # None: not known
    target: tuple[str, ...] | None
    verdict: Verdict
    impact: Impact
    reached: bool                     # False: an earlier contract already drops this state
    consequence: str | None           # what the kexec does, when not compatible
    note: str | None = None
    on_mismatch: str = ""             # what a version mismatch of this contract would do


@dataclass
class CompatReport:
    verdict: Verdict
    rows: list[CompatRow]
    notes: list[str]
    running: KernelAbi
    target: KernelAbi

    @property
    def warnings(self) -> list[CompatRow]:
        return [r for r in self.rows if r.reached and r.impact is Impact.WARNING
                and r.verdict is not Verdict.COMPATIBLE]

    def findings(self) -> list[Finding]:
        out = []
        for r in self.rows:
            if not r.reached or r.verdict is Verdict.COMPATIBLE:
                continue
            severity = Severity.ERROR if r.impact is Impact.FATAL else Severity.WARNING
            if r.verdict is Verdict.INCOMPATIBLE:
                out.append(make("abi-incompatible", f"/{r.contract}",
                                f"{r.title}: running {_text(r.running)}, target "
                                f"{_text(r.target)}: {r.consequence}", severity))
            else:
                out.append(make("abi-unverified", f"/{r.contract}",
                                f"{r.title}: running {_text(r.running)}, target "
                                f"{_text(r.target)}: {r.note or 'not known'}; on a mismatch "
                                f"{r.consequence}",
                                Severity.WARNING if r.impact is Impact.FATAL else Severity.INFO))
        return out


def _text(versions: tuple[str, ...] | None) -> str:
    if versions is None:
        return "unknown"
    return ", ".join(versions) if versions else "none"


@dataclass(frozen=True)
class _Outcome:
    verdict: Verdict
    consequence: str | None
    note: str | None


def _series(release: str | None) -> str | None:
    m = re.match(r"(\d+\.\d+)", release or "")
    return m.group(1) if m else None


def _judge(c: Contract, running: Spoken | None, target: Spoken | None,
           running_source: str, releases: tuple[str | None, str | None]) -> _Outcome:
    if running is None:
        return _Outcome(Verdict.UNKNOWN, c.mismatch,
                        f"the running kernel's version is not known from {running_source}; "
                        "give --running-image (or make /boot/vmlinuz-RELEASE readable)")
    if not running.versions:
        return _Outcome(Verdict.COMPATIBLE, None,
                        running.note or "the running kernel hands over no such state")
    if target is None:
        return _Outcome(Verdict.UNKNOWN, c.mismatch, "the target kernel's version is not known")
    if not target.versions:
        if c.may_be_module:
            return _Outcome(Verdict.UNKNOWN, c.missing,
                            "not in the target image; it may be built as a module, which this "
                            "check cannot see")
        return _Outcome(Verdict.INCOMPATIBLE, c.missing, None)
    r, t = running.primary, target.primary
    several = target.note or running.note
    if r == t:
        caveat = dict(c.same_string_caveats).get(r or "")
        series = {_series(rel) for rel in releases}
        if caveat and (None in series or len(series) > 1):
            known = " and ".join(rel or "unknown" for rel in releases)
            return _Outcome(Verdict.UNKNOWN, c.mismatch, f"{caveat}; releases {known}")
        return _Outcome(Verdict.COMPATIBLE, None, several)
    if r in target.versions or t in running.versions:
        return _Outcome(Verdict.UNKNOWN, c.mismatch,
                        f"several versions found; cannot tell whether the target checks {r}")
    return _Outcome(Verdict.INCOMPATIBLE, c.mismatch, several)


def _keys(running: KernelAbi, target: KernelAbi) -> list[str]:
    keys = [c.key for c in CONTRACTS]
    extra = sorted((set(running.contracts) | set(target.contracts)) - set(keys))
    return keys + extra


def _speaks(abi: KernelAbi, key: str) -> bool:
    spoken = abi.contracts.get(key)
    return spoken is not None and bool(spoken.versions)


def compare(running: KernelAbi, target: KernelAbi) -> CompatReport:
    """Line up what the running kernel hands over with what the target kernel accepts."""
    rows: list[CompatRow] = []
    by_key: dict[str, CompatRow] = {}
    for key in _keys(running, target):
        c = contract_for(key)
        if not (c.always or _speaks(running, key) or _speaks(target, key)):
            continue
        rspoken, tspoken = running.contracts.get(key), target.contracts.get(key)
        parent = by_key.get(c.parent) if c.parent else None
        outcome = _judge(c, rspoken, tspoken, running.source, (running.release, target.release))
        reached = True
        if parent is not None and not parent.reached:
            reached, outcome = False, _Outcome(outcome.verdict, None, parent.note)
        elif parent is not None and parent.verdict is Verdict.INCOMPATIBLE:
            reached = False
            outcome = _Outcome(outcome.verdict, None, f"not reached: the {parent.title} "
                               "mismatch drops this state first")
        elif parent is not None and parent.running == ():
            outcome = _Outcome(Verdict.COMPATIBLE, None, f"nothing to hand over: the running "
                               f"kernel hands over no {parent.title} state")
        row = CompatRow(key, c.title, rspoken.versions if rspoken else None,
                        tspoken.versions if tspoken else None, outcome.verdict, c.impact,
                        reached, outcome.consequence, outcome.note, c.mismatch)
        rows.append(row)
        by_key[key] = row
    notes = list(running.notes) + [n for n in target.notes if n not in running.notes]
    if target.kho_built is False:
        notes.insert(0, "the target kernel is built without KHO: it cannot receive a live "
                     "update; a kexec into it is a plain reboot and loses every preserved page")
    if running.kho_built is False:
        notes.insert(0, "the running kernel is built without KHO: it has nothing to hand over")
    return CompatReport(_overall(rows), rows, notes, running, target)


def _overall(rows: Iterable[CompatRow]) -> Verdict:
    fatal = [r for r in rows if r.reached and r.impact is Impact.FATAL]
    if any(r.verdict is Verdict.INCOMPATIBLE for r in fatal):
        return Verdict.INCOMPATIBLE
    if any(r.verdict is Verdict.UNKNOWN for r in fatal):
        return Verdict.UNKNOWN
    return Verdict.COMPATIBLE
