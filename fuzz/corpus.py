"""Seed corpus and dictionary for fuzz/decoder.py, built at run time from the samples in the tree.

    python fuzz/corpus.py OUT_DIR [DICT_FILE]

Seeds, in the harness's input format (harness.py):
* every FDT and sub-blob captured from real 7.3-rc7 kernels (tests/data/kho-samples: root FDTs,
  the cut-short debugfs out/fdt, sub_fdts, debugfs snapshots; tests/data/vm-samples) for the
  fdt, root, luo and subtree targets;
* for the memory walkers and decode_state, the same blobs with the pages of memory.core that a
  clean decode of them reads (recorded, trimmed of leading and trailing zeros), and the walker's
  start address taken from that decode: the radix tree of case-out-1, the session and file block
  chains, every memfd and its folio array of case-in-1;
* states of the older eras built with the encoders (tests/synth.py: kho-v1 chunk maps with page
  and 512-byte bitmaps, kho-v2 .. kho-v4, luo-v1 and luo-v5, memfd-v1 and -v2, 16 KiB pages),
  which the captured samples do not cover;
* small ELF cores in the /proc/kcore layout, and the header pages of the captured ones.
Nothing is written inside the repository unless OUT_DIR points there.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import tempfile
from pathlib import Path

from harness import PAGE, Scenario, selector

from kho_agent.abi import luo, registry
from kho_agent.abi.block import encode_blocks, walk_blocks
from kho_agent.abi.context import DecodeContext, Side
from kho_agent.abi.errors import MemoryUnavailable
from kho_agent.abi.fdt import FDT_MAGIC
from kho_agent.abi.formats import kho_selftest_v1 as kho_test
from kho_agent.abi.formats.records import (
    KEXEC_METADATA,
    KhoRootVersion,
    LuoVersion,
    SubtreeVersion,
)
from kho_agent.abi.kho_root import decode_root
from kho_agent.abi.kho_state import KhoInput, decode_state
from kho_agent.abi.luo_common import FILE_SER_SIZE, SESSION_SER_SIZE, LuoState
from kho_agent.abi.memfd import MemfdState
from kho_agent.abi.memory import PageAllocator, PhysicalMemory, SparseMemory
from kho_agent.abi.radix import RadixGeometry, radix_encode, radix_walk
from kho_agent.abi.registry import MEMMAP_FORMATS
from kho_agent.abi.vmalloc import VmallocDesc, encode_vmalloc, read_area_bytes, read_vmalloc
from kho_agent.kernel.physmem import ElfCoreMemory, write_elf_core

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "data" / "kho-samples"
VM_SAMPLES = REPO / "tests" / "data" / "vm-samples"
sys.path.insert(0, str(REPO / "tests"))

import synth  # type: ignore[import-not-found]  # noqa: E402  (tests/synth.py, found above)

FLAG_IN = 1
FLAG_NO_MEMORY = 2
FLAG_16K = 8  # page shift 14
FLAG_ALIASED = 0x40
FLAG_RENDER = 0x80  # state target: to_json and abi_from_state as well
MAX_DICT_ADDRESSES = 64


class RecordingMemory:
    """Passes reads through and keeps a copy of every byte read, to seed the memory image."""

    def __init__(self, inner: PhysicalMemory) -> None:
        self.inner = inner
        self.shadow = SparseMemory(PAGE)

    def read(self, phys: int, length: int) -> bytes:
        data = self.inner.read(phys, length)
        self.shadow.write(phys, data)
        return data

    def pages(self) -> list[tuple[int, bytes]]:
        """The pages read, each as (address of its first non-zero byte, the non-zero span)."""
        out = []
        for phys, page in self.shadow.pages():
            body = page.rstrip(b"\0")
            lead = len(body) - len(body.lstrip(b"\0"))
            out.append((phys + lead, body[lead:]))
        return out


class Corpus:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: set[bytes] = set()
        self.counts: dict[str, int] = {}
        self.addresses: dict[int, int] = {}  # page address -> seeds that hold it

    def add(self, target: str, label: str, payload: bytes) -> None:
        data = bytes([selector(target)]) + payload
        digest = hashlib.sha1(data).digest()
        if digest in self.seen:
            return
        self.seen.add(digest)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80]
        (self.out / f"{target}-{safe}-{digest.hex()[:8]}").write_bytes(data)
        self.counts[target] = self.counts.get(target, 0) + 1

    def scenario(self, target: str, label: str, sc: Scenario) -> None:
        self.add(target, label, sc.encode())
        if sc.pages and sc.has_memory:
            # the same with aliased memory (harness.AliasedMemory): every pointer leads somewhere
            self.add(target, f"{label}-aliased", Scenario(
                sc.flags | FLAG_ALIASED, sc.blobs, sc.pages, sc.args, sc.scratch,
                sc.root).encode())
            for phys, _ in sc.pages:
                page = phys - phys % PAGE
                self.addresses[page] = self.addresses.get(page, 0) + 1


# ----------------------------------------------------------------------------- captured samples


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _is_blob(path: Path) -> bool:
    return path.name == "fdt" or path.parent.name == "sub_fdts" or (
        path.parent.name == "fdt" and path.suffix in (".bin", ".dtb"))


def _scratch(d: Path) -> list[tuple[int, int]]:
    try:
        phys = [int(x, 0) for x in (d / "scratch_phys").read_text().split()]
        size = [int(x, 0) for x in (d / "scratch_len").read_text().split()]
    except (OSError, ValueError):
        return []
    return list(zip(phys, size, strict=False))


def _sub_blobs(d: Path) -> list[tuple[str, bytes]]:
    subs = d / "sub_fdts"
    return [(p.name, p.read_bytes()) for p in sorted(subs.iterdir())] if subs.is_dir() else []


def raw_blobs(c: Corpus) -> None:
    for path in _files(SAMPLES) + _files(VM_SAMPLES):
        if not _is_blob(path):
            continue
        blob = path.read_bytes()
        label = path.relative_to(REPO / "tests" / "data").as_posix()
        if blob[:4] == FDT_MAGIC.to_bytes(4, "big"):
            c.add("fdt", label, blob)
        if path.name == "fdt" or "fdt-full" in path.name or "-fdt." in path.name \
                or path.name.endswith("in-fdt.dtb"):
            c.add("root", label, blob)
        name = path.name.removeprefix("stage1-debugfs-out-sub_fdts-").removeprefix(
            "stage2-debugfs-in-sub_fdts-").removeprefix("stage2-debugfs-out-sub_fdts-")
        name = name.split(".")[0]
        side = FLAG_IN if "in" in path.parts or "stage2-debugfs-in" in path.name else 0
        if name == "LUO":
            c.scenario("luo", label, Scenario(side | FLAG_NO_MEMORY, blobs=[(name, blob)]))
        elif name in ("memblock", "kho_test", "kexec-metadata"):
            c.scenario("subtree", label, Scenario(side | FLAG_NO_MEMORY, blobs=[(name, blob)]))


def _case(name: str) -> tuple[Side, bytes, list[tuple[str, bytes]], Path]:
    d = SAMPLES / name
    side = Side.IN if name.startswith("case-in") else Side.OUT
    return side, (d / "fdt").read_bytes(), _sub_blobs(d), d / "memory.core"


def sample_states(c: Corpus) -> None:
    for name in ("case-out-1", "case-in-1"):
        side, fdt, subs, core = _case(name)
        flag = FLAG_IN if side is Side.IN else 0
        with ElfCoreMemory(str(core)) as mem:
            rec = RecordingMemory(mem)
            state = decode_state(KhoInput(fdt, dict(subs), memory=rec, side=side))
            c.scenario("state", name, Scenario(flag, blobs=subs, pages=rec.pages(), root=fdt))
            c.scenario("state", f"{name}-rendered", Scenario(flag | FLAG_RENDER, blobs=subs,
                                                             pages=rec.pages(), root=fdt))
            c.scenario("state", f"{name}-debugfs-only", Scenario(flag, blobs=subs))
            root = decode_root(fdt)
            # each subtree blob as the walkers' callers get it, with the pages its decode reads
            for sub in state.subtrees:
                if sub.phys is None:
                    continue
                try:
                    blob = mem.read(sub.phys, sub.size or PAGE)
                except MemoryUnavailable:
                    blob = dict(subs).get(sub.name, b"")
                rec = RecordingMemory(mem)
                ctx = DecodeContext(rec, side)
                target = "luo" if sub.name == luo.SUBTREE_NAME else "subtree"
                if sub.name == luo.SUBTREE_NAME:
                    luo.decode(blob, ctx, "/LUO")
                elif sub.name == kho_test.SUBTREE_NAME:
                    kho_test.decode(blob, ctx, "/kho_test")
                c.scenario(target, f"{name}-{sub.name}-memory",
                           Scenario(flag, blobs=[(sub.name, blob)], pages=rec.pages()))
                if isinstance(sub.decoded, kho_test.KhoTestState) and sub.decoded.folios_info:
                    _vmalloc_seed(c, f"{name}-kho_test", mem, side, sub.decoded.folios_info)
                if isinstance(sub.decoded, LuoState):
                    _luo_seeds(c, name, mem, side, sub.decoded)
            if root.memmap_phys and side is Side.OUT:
                rec = RecordingMemory(mem)
                radix_walk(rec, root.memmap_phys, RadixGeometry())
                c.scenario("radix", f"{name}-memmap",
                           Scenario(0, pages=rec.pages(), args=[root.memmap_phys]))
        # the debugfs snapshots of the same runs: cut-short out/fdt, freed in/sub_fdts/LUO
        for d in sorted((SAMPLES / "debugfs").glob("*/*")):
            if d.name not in ("in", "out") or not d.is_dir():
                continue
            fdt_path = d / "fdt"
            dflag = FLAG_IN if d.name == "in" else 0
            c.scenario("state", f"debugfs-{d.parent.name}-{d.name}", Scenario(
                dflag | FLAG_NO_MEMORY, blobs=_sub_blobs(d), scratch=_scratch(d),
                root=fdt_path.read_bytes() if fdt_path.is_file() else None))
    for d in sorted(VM_SAMPLES.glob("*/*")):
        if d.is_dir() and d.name in ("in", "out"):
            fdt_path = d / "fdt"
            c.scenario("state", f"vm-{d.parent.name}-{d.name}", Scenario(
                (FLAG_IN if d.name == "in" else 0) | FLAG_NO_MEMORY, blobs=_sub_blobs(d),
                scratch=_scratch(d), root=fdt_path.read_bytes() if fdt_path.is_file() else None))


def _luo_seeds(c: Corpus, case: str, mem: PhysicalMemory, side: Side, state: LuoState) -> None:
    flag = FLAG_IN if side is Side.IN else 0
    if state.sessions_phys:
        rec = RecordingMemory(mem)
        walk_blocks(DecodeContext(rec, side), state.sessions_phys, SESSION_SER_SIZE, "/", "s")
        c.scenario("block", f"{case}-sessions",
                   Scenario(flag, pages=rec.pages(), args=[state.sessions_phys]))
    for session in state.sessions[:4]:
        if session.files_phys:
            rec = RecordingMemory(mem)
            walk_blocks(DecodeContext(rec, side), session.files_phys, FILE_SER_SIZE, "/", "f")
            c.scenario("block", f"{case}-files-{session.name}",
                       Scenario(flag | 0x10, pages=rec.pages(), args=[session.files_phys]))
    memfds = [(f, f.handler) for s in state.sessions for f in s.files
              if isinstance(f.handler, MemfdState)]
    for f, handler in sorted(memfds, key=lambda pair: pair[1].nr_folios)[:6]:
        rec = RecordingMemory(mem)
        registry.decode_memfd(f.compatible, DecodeContext(rec, side), f.data, "/f")
        variant = 0x10 if f.compatible == "memfd-v2" else 0
        c.scenario("memfd", f"{case}-{f.token:#x}",
                   Scenario(flag | variant, pages=rec.pages(), args=[f.data]))
        _vmalloc_seed(c, f"{case}-memfd-{f.token:#x}", mem, side, handler.folio_array)


def _vmalloc_seed(c: Corpus, label: str, mem: PhysicalMemory, side: Side,
                  desc: VmallocDesc) -> None:
    rec = RecordingMemory(mem)
    ctx = DecodeContext(rec, side)
    area = read_vmalloc(ctx, desc, "/v", "seed")
    length = min(desc.total_pages * PAGE, 4 * PAGE)
    read_area_bytes(ctx, area, length, "/v", "seed")
    word = desc.total_pages | desc.flags << 32 | desc.order << 48
    c.scenario("vmalloc", label, Scenario(FLAG_IN if side is Side.IN else 0, pages=rec.pages(),
                                          args=[desc.first, word, length]))


def compact_core(runs: list[tuple[int, bytes]], vaddr_base: int = 0xFFFF888000000000) -> bytes:
    """An ELF64 core like write_elf_core's, without its page alignment: small seeds."""
    phnum = len(runs)
    header = bytearray(64)
    header[:16] = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0,
                     0, 0)
    offset = 64 + 56 * phnum
    table = bytearray()
    for phys, data in runs:
        table += struct.pack("<IIQQQQQQ", 1, 6, offset, vaddr_base + phys, phys, len(data),
                             len(data), 4096)
        offset += len(data)
    return bytes(header + table) + b"".join(data for _, data in runs)


def core_seeds(c: Corpus) -> None:
    for name in ("case-out-1", "case-in-1"):
        core = SAMPLES / name / "memory.core"
        raw = core.read_bytes()
        c.add("elfcore", f"{name}-headers", raw[:PAGE])  # segments lie beyond the end
        with ElfCoreMemory(str(core)) as mem:
            runs = [(seg.phys, mem.read(seg.phys, min(seg.size, 64))) for seg in mem.segments[:6]]
        c.add("elfcore", f"{name}-compact", compact_core(runs))
    c.add("elfcore", "adjacent-runs", compact_core([(0x1000, b"a" * 16), (0x1010, b"b" * 16),
                                                    (0x3000, bytes(range(64)))]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "core"
        write_elf_core(str(path), [(0x2000, b"kho" * 8)])
        c.add("elfcore", "write_elf_core", path.read_bytes())


# ----------------------------------------------------------------------------- older eras


def _era(c: Corpus, label: str, root: KhoRootVersion, luo_fmt: LuoVersion, memfd_era: str, *,
         memmap: str | None = None, page_shift: int = 12, sized: bool | None = None) -> None:
    """A state as a kernel of these versions lays it out (`memmap` and `sized` override the
    root version's own map format and blob-size, for the shapes one version had over time)."""
    compatible = root.compatible
    memmap = memmap or root.memmap
    sized = root.size_prop is not None if sized is None else sized
    s = synth.Synth(page_shift)
    content = b"kho-agent fuzz seed " * 300
    big = s.memfd_file(memfd_era, 0x1A, content, pos=17)
    holes = s.memfd_file(memfd_era, 0x1B, b"", size=3 * s.page_size + 5)
    sessions = {"vm-7": [big, holes], "idle": []}
    s.luo(luo_fmt, sessions, number=5, sized=sized)
    s.memblock({"kho_demo_rsv": 1 << 20}, align=1 << 20, sized=sized)
    if root.writes_kexec_metadata:
        s.kexec_metadata("7.1.0-kho", 2, sized=sized)
    inp = s.finish(compatible, memmap)
    flag = FLAG_16K if page_shift == 14 else 0
    rec = RecordingMemory(inp.memory)
    inp.memory = rec
    state = decode_state(inp)
    assert inp.root_fdt is not None
    c.scenario("state", label, Scenario(flag | FLAG_RENDER, pages=rec.pages(),
                                        root=inp.root_fdt))
    if state.memmap_phys:
        rec = RecordingMemory(s.memory)
        MEMMAP_FORMATS[memmap](rec, state.memmap_phys, page_shift)
        target = "chunks" if memmap.startswith("chunks") else "radix"
        variant = {"chunks-512": 0x10, "chunks-page": 0x20, "radix-v2-early": 0x10}.get(memmap, 0)
        c.scenario(target, label, Scenario(flag | variant, pages=rec.pages(),
                                           args=[state.memmap_phys]))
    for sub in state.subtrees:
        if sub.phys is None:
            continue
        blob = s.memory.read(sub.phys, sub.size or s.page_size)
        rec = RecordingMemory(s.memory)
        ctx = DecodeContext(rec, Side.OUT, page_shift)
        if sub.name == luo.SUBTREE_NAME:
            luo.decode(blob, ctx, "/LUO")
            c.scenario("luo", label, Scenario(flag, blobs=[(sub.name, blob)], pages=rec.pages()))
            if isinstance(sub.decoded, LuoState):
                _luo_seeds(c, label, s.memory, Side.OUT, sub.decoded)
        else:
            c.scenario("subtree", f"{label}-{sub.name}",
                       Scenario(flag, blobs=[(sub.name, blob.rstrip(b"\0") or blob)]))
        if blob[:4] == FDT_MAGIC.to_bytes(4, "big"):
            c.add("fdt", f"{label}-{sub.name}", blob[:int.from_bytes(blob[4:8], "big")])
    c.add("root", label, inp.root_fdt)
    c.add("fdt", f"{label}-root", inp.root_fdt)


def walker_seeds(c: Corpus) -> None:
    """Shapes the captured states lack: a vmalloc area of two chunks (a full one links to the
    next), a block chain of two blocks, and a radix leaf with every bit set."""
    mem, alloc = SparseMemory(PAGE), PageAllocator(0x1000_0000)
    desc = encode_vmalloc(bytes(600 * PAGE), mem, alloc)
    _vmalloc_seed(c, "two-chunks", mem, Side.OUT, desc)
    first = encode_blocks([struct.pack("<64sQQ", f"s{i}".encode(), 0, 0) for i in range(60)],
                          SESSION_SER_SIZE, mem, alloc)
    rec = RecordingMemory(mem)
    walk_blocks(DecodeContext(rec), first, SESSION_SER_SIZE, "/", "s")
    c.scenario("block", "two-blocks", Scenario(0, pages=rec.pages(), args=[first]))
    root = radix_encode([(0x4000_0000, PAGE * PAGE * 8, 0)], mem, alloc)
    rec = RecordingMemory(mem)
    radix_walk(rec, root)
    c.scenario("radix", "full-leaf", Scenario(0, pages=rec.pages(), args=[root]))


def era_seeds(c: Corpus) -> None:
    """One state per combination of versions one kernel shipped (from the registry), then the
    shapes a version had over time that the matrix does not reach."""
    for root in registry.KHO_ROOTS:
        luos, memfds = registry.shipped_with(root.compatible)
        for luo_version in sorted(luos):
            for memfd_version in sorted(memfds):
                _era(c, f"{root.compatible}-{luo_version}-{memfd_version}", root,
                     registry.LUO_BY_COMPATIBLE[luo_version], memfd_version)
    kho_v1, kho_v2 = registry.ROOT_FORMATS["kho-v1"], registry.ROOT_FORMATS["kho-v2"]
    newest = registry.KHO_ROOTS[-1]
    newest_luo = sorted(registry.shipped_with(newest.compatible)[0])[-1]
    newest_memfd = sorted(registry.shipped_with(newest.compatible)[1])[-1]
    _era(c, "kho-v1-chunks-512", kho_v1, registry.LUO_BY_COMPATIBLE["luo-v1"], "memfd-v1",
         memmap="chunks-512")
    _era(c, "kho-v2-early", kho_v2, registry.LUO_BY_COMPATIBLE["luo-v1"], "memfd-v2",
         sized=False)
    _era(c, f"{newest.compatible}-16k", newest, registry.LUO_BY_COMPATIBLE[newest_luo],
         newest_memfd, page_shift=14)


# ----------------------------------------------------------------------------- dictionary

DICT_STRINGS = [
    # every version string the registry knows, and the further strings their kernels carry
    *(f.compatible for f in registry.FORMATS if f.family != KEXEC_METADATA),
    *(s for f in registry.FORMATS if isinstance(f, LuoVersion | SubtreeVersion)
      for s in f.image_strings if s != "kexec-metadata"),
    "compatible", "preserved-memory-map", "preserved-data", "blob-size", "fdt",
    "liveupdate-number", "luo-session", "luo-session-header", "luo-flb", "luo-flb-header",
    "start", "size", "magic", "nr_folios", "folios_info", "csum", "data",
    "LUO", "memblock", "kho_test", "kexec-metadata",
]


def _escape(raw: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}"
                   for b in raw)


def dictionary(addresses: dict[int, int]) -> list[bytes]:
    """Magic values, tokens and names of the formats, and the addresses of the seeds' pages
    (little-endian u64, as pointers are stored): inserted where a pointer was, they make
    structures that loop or share pages."""
    words: list[bytes] = [FDT_MAGIC.to_bytes(4, "big"), b"\x7fELF\x02\x01\x01"]
    words += [struct.pack(">I", tok) for tok in (1, 2, 3, 4, 9)]  # FDT structure tokens
    words += [struct.pack(">I", v) for v in (16, 17)]  # FDT versions
    words += [s.encode() + b"\0" for s in DICT_STRINGS]
    words += [struct.pack("<I", kho_test.MAGIC), struct.pack("<Q", 1 << 63),
              struct.pack("<Q", (1 << 64) - 1), struct.pack("<Q", 0x1000)]
    common = sorted(addresses, key=lambda a: (-addresses[a], a))[:MAX_DICT_ADDRESSES]
    words += [struct.pack("<Q", a) for a in sorted(common)]
    return words


def write_dictionary(path: Path, addresses: dict[int, int]) -> int:
    words = dictionary(addresses)
    path.write_text("".join(f'w{i}="{_escape(w)}"\n' for i, w in enumerate(words)))
    return len(words)


def build(out: Path) -> Corpus:
    out.mkdir(parents=True, exist_ok=True)
    c = Corpus(out)
    raw_blobs(c)
    sample_states(c)
    core_seeds(c)
    walker_seeds(c)
    era_seeds(c)
    return c


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    corpus = build(Path(argv[0]))
    counts = dict(sorted(corpus.counts.items()))
    if len(argv) > 1:
        write_dictionary(Path(argv[1]), corpus.addresses)
    print(" ".join(f"{k}={v}" for k, v in counts.items()), f"total={sum(counts.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
