"""The decoder fuzz harness: input format, targets and oracle.

No atheris here: decoder.py imports this module under atheris's instrumentation, corpus.py uses
the format to write seeds, and a crash input replays with plain Python
(`python fuzz/harness.py CRASH-FILE`).

Input: one selector byte (`data[0] % len(TARGETS)`), then the target's payload. `fdt`, `root` and
`elfcore` take the payload as raw bytes. The other targets read it as a *scenario*: one flags byte,
then sections `tag:u8 length:u16le body` (a cut-off last section keeps what is there):

    tag % 5 == 0  BLOB     name_len:u8 name body   a sub_fdts blob (name -> bytes)
    tag % 5 == 1  PAGE     phys:u64le data          bytes of physical memory at phys
    tag % 5 == 2  ARG      value:u64le              a walker argument (root, first block, ...)
    tag % 5 == 3  SCRATCH  phys:u64le size:u64le    a scratch area
    tag % 5 == 4  ROOT     fdt                      the root FDT (state target)

PAGE sections make a SparseMemory: the page around each written byte exists and reads as zero
elsewhere, a page never written is unavailable. Flags: bit 0 incoming side, bit 1 no memory
source at all, bits 2-3 page shift (12, 12, 14, 16), bits 4-5 a per-target variant, bit 6
aliased memory (every address reads as some page of the image, see AliasedMemory), bit 7 (state
target) render the result as `decode --json` and `compat` do.

Oracle (the invariants of tests/test_fuzz.py): a low-level parser may raise AbiError and nothing
else; decode_state() raises nothing; every finding code is listed in CODES; a memory read returns
exactly what was asked for; the reads of one input stay within a budget that grows with the
distinct pages it reads and the blobs it holds (counted, not timed), so that a decode whose work
outgrows its input is reported as a hang, and so is one input that raises the peak RSS by more
than MAX_RSS_GROWTH_MB. Anything else escapes as an exception, which libFuzzer records.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kho_agent.abi import luo, registry
from kho_agent.abi.block import MAX_BLOCKS, walk_blocks
from kho_agent.abi.compat import abi_from_state
from kho_agent.abi.context import DecodeContext, Side
from kho_agent.abi.errors import AbiError, MemoryUnavailable
from kho_agent.abi.fdt import parse_fdt
from kho_agent.abi.findings import CODES, Severity
from kho_agent.abi.formats import kexec_metadata_v1 as kexec_metadata
from kho_agent.abi.formats import kho_selftest_v1 as kho_test
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.jsonview import to_json
from kho_agent.abi.kho_root import decode_root, recover_truncated_root
from kho_agent.abi.kho_state import KhoInput, KhoState, ScratchArea, decode_state
from kho_agent.abi.memmap_chunks import BITMAP_512_BYTES, chunks_walk
from kho_agent.abi.memory import PhysicalMemory, SparseMemory
from kho_agent.abi.radix import RadixGeometry, radix_walk
from kho_agent.abi.vmalloc import VmallocDesc, read_area_bytes, read_vmalloc
from kho_agent.kernel.physmem import ElfCoreMemory

TAG_BLOB, TAG_PAGE, TAG_ARG, TAG_SCRATCH, TAG_ROOT = range(5)
MAX_SECTIONS = 4096
PAGE = 4096
PAGE_SHIFTS = (12, 12, 14, 16)

# Read budget, counted by CountingMemory. A structure page legitimately costs up to one read per
# pointer it holds (a radix node of 512 slots that all point at missing pages, a folio-array chunk
# of 511 blocks), and a blob a read per subtree or entry it lists; anything beyond that grows
# faster than its input. A single read is bounded as in test_fuzz.py: a decoder must never ask
# for more than any real structure, however large a length field says it is.
READS_BASE = 2_048
READS_PER_PAGE = 640
READS_PER_BLOB_BYTE = 0.25
MAX_READ_LENGTH = 16 << 20
MAX_READ_BYTES = 64 << 20
# What AliasedMemory serves beyond the image before it runs out: as much as the largest input
# (-max_len) holds, so that aliasing at most doubles what an input can make the decoder walk
# (a leaf page of alternating bits is 16k extents), and enough for any chain to reach every
# kind of structure.
ALIAS_BYTES = 64 << 10
# Memory: no input of at most 64 KiB may raise the process's peak RSS by this much (a decode of
# the largest sample takes about 2 MB). libFuzzer's -rss_limit_mb bounds the total besides.
MAX_RSS_GROWTH_MB = 128


class ReadBudgetExceeded(Exception):
    """Raised by CountingMemory: not an AbiError, so no decoder can swallow it (a hang)."""


class MemoryBudgetExceeded(Exception):
    """One input made the process's peak RSS jump (a hang of another kind)."""


class OracleViolation(Exception):
    """An invariant of a decoder's result does not hold."""


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


class CountingMemory:
    """Counts the reads of one input and stops a decode that exceeds its budget.

    The budget grows with the distinct pages that were actually read: a decoder may spend a
    read on every pointer of a page it read, but reading the same pages over and over (a shared
    structure walked once per referrer, a cycle not noticed) exhausts it.
    """

    def __init__(self, inner: PhysicalMemory, extra_reads: int = 0) -> None:
        self.inner = inner
        self.extra_reads = READS_BASE + extra_reads
        self.reads = 0
        self.bytes = 0
        self.pages: set[int] = set()

    def read(self, phys: int, length: int) -> bytes:
        self.reads += 1
        if self.reads > self.extra_reads + READS_PER_PAGE * len(self.pages):
            raise ReadBudgetExceeded(f"{self.reads} reads for one input that has led to "
                                     f"{len(self.pages)} distinct pages")
        if length > MAX_READ_LENGTH or length < 0:
            raise ReadBudgetExceeded(f"a single read of {length:#x} bytes at {phys:#x}")
        data = self.inner.read(phys, length)
        if len(data) != length:
            raise OracleViolation(f"read({phys:#x}, {length:#x}) returned {len(data)} bytes")
        self.bytes += length
        if self.bytes > MAX_READ_BYTES:
            raise ReadBudgetExceeded(f"more than {MAX_READ_BYTES} bytes read for one input")
        self.pages.update(range(phys // PAGE, (phys + max(length, 1) - 1) // PAGE + 1))
        return data


class AliasedMemory:
    """Memory in which every address holds something, up to ALIAS_BYTES: a page of the image
    reads as itself, any other page as one of the image's (chosen by its page number), at the
    same offset. Pointers the fuzzer changes then still lead somewhere, and shared or looping
    structures are common, as in real memory with corrupt pointers."""

    def __init__(self, image: SparseMemory) -> None:
        self.image = dict(image.pages())
        self.order = sorted(self.image)
        self.aliased = 0

    def read(self, phys: int, length: int) -> bytes:
        out = bytearray()
        pos, end = phys, phys + length
        while pos < end:
            base = pos - pos % PAGE
            n = min(base + PAGE, end) - pos
            page = self.image.get(base)
            if page is None:
                if not self.order or self.aliased + n > ALIAS_BYTES:
                    raise MemoryUnavailable(phys, length)
                self.aliased += n
                page = self.image[self.order[(base // PAGE) % len(self.order)]]
            out += page[pos - base:pos - base + n]
            pos += n
        return bytes(out)


# ----------------------------------------------------------------------------- scenario format


@dataclass
class Scenario:
    flags: int = 0
    blobs: list[tuple[str, bytes]] = field(default_factory=list)
    pages: list[tuple[int, bytes]] = field(default_factory=list)
    args: list[int] = field(default_factory=list)
    scratch: list[tuple[int, int]] = field(default_factory=list)
    root: bytes | None = None

    @property
    def side(self) -> Side:
        return Side.IN if self.flags & 1 else Side.OUT

    @property
    def has_memory(self) -> bool:
        return not self.flags & 2

    @property
    def page_shift(self) -> int:
        return PAGE_SHIFTS[(self.flags >> 2) & 3]

    @property
    def variant(self) -> int:
        return (self.flags >> 4) & 3

    def arg(self, i: int, default: int = 0) -> int:
        return self.args[i] if i < len(self.args) else default

    @property
    def aliased(self) -> bool:
        return bool(self.flags & 0x40)

    def memory(self) -> CountingMemory | None:
        if not self.has_memory:
            return None
        mem = SparseMemory(PAGE)
        for phys, data in self.pages:
            mem.write(phys, data or b"\0")
        blob_bytes = sum(len(b) for _, b in self.blobs) + len(self.root or b"")
        return CountingMemory(AliasedMemory(mem) if self.aliased else mem,
                              int(READS_PER_BLOB_BYTE * blob_bytes))

    def encode(self) -> bytes:
        out = bytearray([self.flags & 0xFF])

        def section(tag: int, body: bytes) -> None:
            if len(body) > 0xFFFF:
                raise ValueError(f"a section holds at most 65535 bytes, not {len(body)}")
            out.extend(struct.pack("<BH", tag, len(body)) + body)

        if self.root is not None:
            section(TAG_ROOT, self.root)
        for name, blob in self.blobs:
            raw = name.encode("latin-1")
            section(TAG_BLOB, bytes([len(raw)]) + raw + blob)
        for value in self.args:
            section(TAG_ARG, struct.pack("<Q", value))
        for phys, size in self.scratch:
            section(TAG_SCRATCH, struct.pack("<QQ", phys, size))
        for phys, data in self.pages:
            section(TAG_PAGE, struct.pack("<Q", phys) + data)
        return bytes(out)


def _u64(raw: bytes) -> int:
    return int.from_bytes(raw[:8].ljust(8, b"\0"), "little")


def parse_scenario(payload: bytes) -> Scenario:
    sc = Scenario(payload[0] if payload else 0)
    pos = 1
    sections = 0
    while pos < len(payload) and sections < MAX_SECTIONS:
        tag = payload[pos] % 5
        length = int.from_bytes(payload[pos + 1:pos + 3], "little")
        body = payload[pos + 3:pos + 3 + length]
        pos += 3 + length
        sections += 1
        if tag == TAG_BLOB:
            n = body[0] if body else 0
            sc.blobs.append((body[1:1 + n].decode("latin-1"), body[1 + n:]))
        elif tag == TAG_PAGE:
            if len(body) >= 8:
                sc.pages.append((_u64(body), body[8:]))
        elif tag == TAG_ARG:
            sc.args.append(_u64(body))
        elif tag == TAG_SCRATCH:
            sc.scratch.append((_u64(body), _u64(body[8:16])))
        else:
            sc.root = body
    return sc


# ----------------------------------------------------------------------------- checks


def check_findings(ctx_findings: list[object]) -> None:
    for f in ctx_findings:
        code = getattr(f, "code", None)
        if code not in CODES:
            raise OracleViolation(f"finding code {code!r} is not listed in findings.CODES")
        if not isinstance(getattr(f, "severity", None), Severity):
            raise OracleViolation(f"finding {code} has no Severity")


def new_context(sc: Scenario) -> DecodeContext:
    return DecodeContext(sc.memory(), sc.side, sc.page_shift)


# ----------------------------------------------------------------------------- targets


def target_fdt(payload: bytes) -> str:
    try:
        fdt = parse_fdt(payload)
    except AbiError:
        return "rejected"
    if fdt.totalsize > len(payload):
        raise OracleViolation(f"totalsize {fdt.totalsize} beyond the {len(payload)} bytes given")
    if sum(1 for _ in fdt.root.walk()) > 1 + len(payload) // 8:
        raise OracleViolation("more nodes than the blob can hold")
    return "ok"


def target_root(payload: bytes) -> str:
    outcome = "ok"
    try:
        root = decode_root(payload)
    except AbiError:
        outcome = "rejected"
    else:
        if root.fdt_size > len(payload):
            raise OracleViolation("root fdt_size beyond the blob")
        for code, _, _ in root.problems:
            if code not in CODES:
                raise OracleViolation(f"root problem code {code!r} is not in CODES")
        for sub in root.subtrees:
            for code, _ in sub.problems:
                if code not in CODES:
                    raise OracleViolation(f"subtree problem code {code!r} is not in CODES")
    try:
        recovered = recover_truncated_root(payload)
    except AbiError:
        return "rejected"
    if recovered is not None and not recovered.recovered:
        raise OracleViolation("recover_truncated_root returned a root not marked recovered")
    return outcome


def _subtree(sc: Scenario, decoders: list[Callable[[bytes, DecodeContext, str], object | None]],
             ) -> str:
    outcome = "ok"
    for i, (_, blob) in enumerate(sc.blobs[:4] or [("", b"")]):
        ctx = new_context(sc)
        for decoder in decoders:
            try:
                decoder(blob, ctx, f"/blob{i}")
            except AbiError:
                outcome = "rejected"
        check_findings(list(ctx.findings))
    return outcome


def target_luo(sc: Scenario) -> str:
    return _subtree(sc, [luo.decode])


def target_subtree(sc: Scenario) -> str:
    return _subtree(sc, [memblock.decode, kexec_metadata.decode, kho_test.decode])


def target_memfd(sc: Scenario) -> str:
    ctx = new_context(sc)
    compatible = ("memfd-v1", "memfd-v2")[sc.variant & 1]
    outcome = "ok"
    for phys in sc.args[:8] or [0]:
        try:
            registry.decode_memfd(compatible, ctx, phys, f"/memfd[{phys:#x}]")
        except AbiError:
            outcome = "rejected"
    check_findings(list(ctx.findings))
    return outcome


def target_vmalloc(sc: Scenario) -> str:
    ctx = new_context(sc)
    word = sc.arg(1)
    desc = VmallocDesc(sc.arg(0), word & 0xFFFF_FFFF, (word >> 32) & 0xFFFF, word >> 48)
    try:
        area = read_vmalloc(ctx, desc, "/vmalloc", "fuzz")
        data = read_area_bytes(ctx, area, sc.arg(2, PAGE) % (1 << 20), "/vmalloc", "fuzz data")
    except AbiError:
        return "rejected"
    if data is not None and len(data) != sc.arg(2, PAGE) % (1 << 20):
        raise OracleViolation("read_area_bytes returned the wrong length")
    check_findings(list(ctx.findings))
    return "ok"


def target_block(sc: Scenario) -> str:
    ctx = new_context(sc)
    entry_size = (80, 64, 16, 48)[sc.variant]
    try:
        chain = walk_blocks(ctx, sc.arg(0), entry_size, "/chain", "fuzz")
    except AbiError:
        return "rejected"
    if len(chain.blocks) > MAX_BLOCKS:
        raise OracleViolation(f"{len(chain.blocks)} blocks walked, the limit is {MAX_BLOCKS}")
    if any(len(e) != entry_size for e in chain.entries):
        raise OracleViolation("a block entry is not entry_size bytes")
    check_findings(list(ctx.findings))
    return "ok"


def _check_walk_json(walk: object) -> None:
    json.dumps(to_json(walk))


def target_radix(sc: Scenario) -> str:
    memory = sc.memory() or CountingMemory(SparseMemory(PAGE))
    geom = RadixGeometry(sc.page_shift, depth_plus_one=not sc.variant & 1)
    try:
        walk = radix_walk(memory, sc.arg(0), geom)
    except AbiError:
        return "rejected"
    walk.extents.self_overlaps()
    walk.extents.union()
    walk.extents.uncovered(sc.arg(1), sc.arg(2) % (1 << 40))
    _check_walk_json(walk)
    return "ok"


def target_chunks(sc: Scenario) -> str:
    memory = sc.memory() or CountingMemory(SparseMemory(PAGE))
    variant = (None, BITMAP_512_BYTES, 1 << sc.page_shift, None)[sc.variant]
    try:
        walk = chunks_walk(memory, sc.arg(0), sc.page_shift, variant)
    except AbiError:
        return "rejected"
    walk.extents.self_overlaps()
    walk.extents.union()
    _check_walk_json(walk)
    return "ok"


def target_state(sc: Scenario) -> str:
    # at most 1026 scratch areas, as kho_agent.kernel.debugfs reads (lowmem, global, a node each)
    roles = ["lowmem", "global", "node 0", "node 1"]
    inp = KhoInput(sc.root, dict(sc.blobs),
                   [ScratchArea(p, n, roles[i % 4]) for i, (p, n) in enumerate(sc.scratch[:1026])],
                   sc.memory(), sc.side, sc.page_shift)
    state = decode_state(inp)  # nothing may escape, not even an AbiError
    if not isinstance(state, KhoState) or state.side is not sc.side:
        raise OracleViolation("decode_state returned something else than this input's state")
    if state.root_source not in ("fdt", "truncated-fdt", "none"):
        raise OracleViolation(f"root_source {state.root_source!r}")
    check_findings(list(state.findings))
    if sc.flags & 0x80:  # what `decode --json` and `compat` do with it: half the time of a run
        json.dumps(to_json(state))
        abi_from_state(state)
    return "ok"


_CORE_FD = -1


def target_elfcore(payload: bytes) -> str:
    """The memory reader: an ELF core of fuzzed bytes, opened through a memfd and read."""
    global _CORE_FD
    if _CORE_FD < 0:
        _CORE_FD = os.memfd_create("kho-fuzz-core", os.MFD_CLOEXEC)
    os.ftruncate(_CORE_FD, 0)
    os.pwrite(_CORE_FD, payload, 0)
    try:
        mem = ElfCoreMemory(f"/proc/self/fd/{_CORE_FD}")
    except AbiError:
        return "rejected"
    outcome = "ok"
    with mem:
        counted = CountingMemory(mem)
        for seg in mem.segments[:16]:
            for phys, length in ((seg.phys, min(seg.size, 64)), (seg.phys + seg.size - 4, 8),
                                 (seg.phys + seg.size // 2, PAGE)):
                try:
                    counted.read(phys, length)
                except MemoryUnavailable:
                    outcome = "unavailable"
    return outcome


RawTarget = Callable[[bytes], str]
ScenarioTarget = Callable[[Scenario], str]
TARGETS: list[tuple[str, RawTarget | None, ScenarioTarget | None]] = [
    ("fdt", target_fdt, None),
    ("root", target_root, None),
    ("luo", None, target_luo),
    ("subtree", None, target_subtree),
    ("memfd", None, target_memfd),
    ("vmalloc", None, target_vmalloc),
    ("block", None, target_block),
    ("radix", None, target_radix),
    ("chunks", None, target_chunks),
    ("state", None, target_state),
    ("elfcore", target_elfcore, None),
]
TARGET_INDEX = {name: i for i, (name, _, _) in enumerate(TARGETS)}

# per target: executions, and outcome -> count; printed by the driver from KHO_FUZZ_STATS
STATS: dict[str, dict[str, int]] = {name: {} for name, _, _ in TARGETS}


def selector(name: str) -> int:
    return TARGET_INDEX[name]


def run_one(data: bytes) -> str:
    """Decode one fuzz input; return the target's name. Raises on a crash or a hang."""
    global _EXECS, _FLUSHED
    _EXECS += 1
    if not data:
        return "none"
    name, raw, scenario = TARGETS[data[0] % len(TARGETS)]
    payload = data[1:]
    counts = STATS[name]
    counts["execs"] = counts.get("execs", 0) + 1
    try:
        rss_before = peak_rss_mb()
        outcome = raw(payload) if raw is not None else (
            scenario(parse_scenario(payload)) if scenario is not None else "none")
        grown = peak_rss_mb() - rss_before
        if grown > MAX_RSS_GROWTH_MB:
            raise MemoryBudgetExceeded(f"one input raised the peak RSS by {grown} MB")
    except Exception as exc:  # the oracle boundary: classify and count, then re-raise
        kind = ("hang" if isinstance(exc, ReadBudgetExceeded) else
                "memory" if isinstance(exc, MemoryBudgetExceeded) else "crash")
        counts[kind] = counts.get(kind, 0) + 1
        write_stats()
        sys.stderr.write(f"\n*** {kind} in target {name!r}: {type(exc).__name__}: {exc}\n")
        raise
    counts[outcome] = counts.get(outcome, 0) + 1
    now = time.monotonic()
    if now - _FLUSHED >= 1.0 or _EXECS == _RUNS:
        _FLUSHED = now
        write_stats()
    return name


# libFuzzer ends the process with exit(), which skips Python's atexit handlers: the figures are
# written once a second, after the last of KHO_FUZZ_RUNS executions, and at a crash.
_EXECS = 0
_FLUSHED = 0.0
_RUNS = int(os.environ.get("KHO_FUZZ_RUNS", "0") or 0)


def write_stats() -> None:
    path = os.environ.get("KHO_FUZZ_STATS")
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(STATS, fh)
        os.replace(tmp, path)


def main(argv: list[str]) -> int:
    """Replay inputs without atheris: exit 1 on the first that crashes or hangs."""
    for path in argv:
        with open(path, "rb") as fh:
            data = fh.read()
        print(f"{path}: target {run_one(data)}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
