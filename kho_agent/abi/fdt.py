"""Flattened device tree: a strict, bounded parser and a writer that lays bytes out as libfdt does.

The kernel builds every KHO FDT with libfdt, and we must write the same bytes (the simulated kernel
hands them to our own decoder and to `dtc`). Two libfdt paths matter:

* sequential write (`fdt_create` .. `fdt_finish`): the reserve map sits at 48 (header size aligned
  to a reserve entry), and the string table holds names in *reverse* order of first use, because
  libfdt grows it downwards from the end of the buffer;
* read-write (`fdt_open_into`, `fdt_add_subnode`, `fdt_setprop`, `fdt_pack`): new properties and
  new subnodes are inserted *first* in their node, new names are appended to the string table, and
  packing moves the reserve map to 40.

Both paths look a name up anywhere in the string table, so a name may share the tail of another
("size" inside "blob-size"). The parser never trusts an offset or a length it has not checked and
raises only AbiError subclasses.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import AbiError, FdtTruncated

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_NOP = 4
FDT_END = 9
HEADER_SIZE = 40
SW_RSVMAP_OFFSET = 48  # FDT_ALIGN(sizeof(struct fdt_header), sizeof(struct fdt_reserve_entry))
RW_RSVMAP_OFFSET = 40  # FDT_ALIGN(sizeof(struct fdt_header), 8), used by fdt_pack()

MAX_DEPTH = 64
MAX_NODES = 200_000


@dataclass
class FdtNode:
    name: str
    props: list[tuple[str, bytes]] = field(default_factory=list)
    children: list[FdtNode] = field(default_factory=list)

    def prop(self, name: str) -> bytes | None:
        for key, value in self.props:
            if key == name:
                return value
        return None

    def child(self, name: str) -> FdtNode | None:
        for node in self.children:
            if node.name == name:
                return node
        return None

    def walk(self, path: str = "") -> Iterator[tuple[str, FdtNode]]:
        here = path or "/"
        yield here, self
        for node in self.children:
            yield from node.walk(f"{path}/{node.name}")


@dataclass
class Fdt:
    root: FdtNode
    totalsize: int
    version: int
    last_comp_version: int
    boot_cpuid: int
    reservations: list[tuple[int, int]]


def _be32(blob: bytes, off: int) -> int:
    return int.from_bytes(blob[off:off + 4], "big")


def check_header(blob: bytes) -> tuple[int, int, int, int, int, int]:
    """Validate the header; return (totalsize, off_struct, off_strings, off_rsvmap, size_strings,
    size_struct). Raises FdtTruncated when the blob is shorter than totalsize."""
    if len(blob) < HEADER_SIZE:
        raise AbiError(f"not an FDT: {len(blob)} bytes is shorter than the 40-byte header")
    magic, totalsize, off_struct, off_strings, off_rsv, version, last_comp, _cpu, size_strings, \
        size_struct = struct.unpack_from(">10I", blob, 0)
    if magic != FDT_MAGIC:
        raise AbiError(f"not an FDT: magic {magic:#010x}, expected {FDT_MAGIC:#010x}")
    if version < 16 or last_comp > 17:
        raise AbiError(f"FDT version {version} (last compatible {last_comp}) is not supported; "
                       "libfdt writes version 17")
    if version < 17:
        size_struct = totalsize - off_struct
    if totalsize < HEADER_SIZE:
        raise AbiError(f"FDT header totalsize {totalsize} is smaller than the header")
    if len(blob) < totalsize:
        raise FdtTruncated(have=len(blob), need=totalsize)
    for what, off, size in (("memory reservation map", off_rsv, 16),
                            ("structure block", off_struct, size_struct),
                            ("strings block", off_strings, size_strings)):
        if off < HEADER_SIZE or off + size > totalsize:
            raise AbiError(f"FDT {what} at {off}+{size} lies outside the blob (totalsize "
                           f"{totalsize})")
    if off_rsv % 8 or off_struct % 4:
        raise AbiError("FDT blocks are misaligned (reserve map must be 8-aligned, structure "
                       "block 4-aligned)")
    return totalsize, off_struct, off_strings, off_rsv, size_strings, size_struct


def _cstring(data: bytes, off: int, end: int, what: str) -> tuple[str, int]:
    nul = data.find(b"\0", off, end)
    if nul < 0:
        raise AbiError(f"FDT {what} at offset {off} has no terminating NUL")
    try:
        return data[off:nul].decode("ascii"), nul
    except UnicodeDecodeError as exc:
        raise AbiError(f"FDT {what} at offset {off} is not printable ASCII") from exc


def parse_fdt(blob: bytes, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Fdt:
    """Parse an FDT into nodes and raw property bytes (no type guessing: KHO values are native
    endian, so callers unpack what they need)."""
    blob = bytes(blob)
    totalsize, off_struct, off_strings, off_rsv, size_strings, size_struct = check_header(blob)
    _, _, _, _, _, version, last_comp, cpu = struct.unpack_from(">8I", blob, 0)
    reservations: list[tuple[int, int]] = []
    pos = off_rsv
    while True:
        if pos + 16 > totalsize:
            raise AbiError("FDT memory reservation map has no terminating entry")
        addr, size = struct.unpack_from(">QQ", blob, pos)
        pos += 16
        if addr == 0 and size == 0:
            break
        reservations.append((addr, size))
    strings_end = off_strings + size_strings
    end = off_struct + size_struct
    pos = off_struct
    stack: list[FdtNode] = []
    root: FdtNode | None = None
    nodes = 0
    while True:
        if pos + 4 > end:
            raise AbiError("FDT structure block ends without an FDT_END token")
        tag = _be32(blob, pos)
        pos += 4
        if tag == FDT_BEGIN_NODE:
            name, nul = _cstring(blob, pos, end, "node name")
            pos = (nul + 1 + 3) & ~3
            nodes += 1
            if nodes > max_nodes:
                raise AbiError(f"FDT has more than {max_nodes} nodes")
            if root is not None and not stack:
                raise AbiError("FDT has a second root node")
            if len(stack) >= max_depth:
                raise AbiError(f"FDT nests deeper than {max_depth} levels")
            node = FdtNode(name)
            if stack:
                stack[-1].children.append(node)
            else:
                root = node
            stack.append(node)
        elif tag == FDT_END_NODE:
            if not stack:
                raise AbiError("FDT has an FDT_END_NODE without a matching FDT_BEGIN_NODE")
            stack.pop()
        elif tag == FDT_PROP:
            if not stack:
                raise AbiError("FDT has a property outside any node")
            if pos + 8 > end:
                raise AbiError("FDT property header runs past the structure block")
            length, nameoff = struct.unpack_from(">II", blob, pos)
            pos += 8
            if pos + length > end:
                raise AbiError(f"FDT property value of {length} bytes runs past the structure "
                               "block")
            if nameoff >= size_strings:
                raise AbiError(f"FDT property name offset {nameoff} is outside the strings block")
            name, _ = _cstring(blob, off_strings + nameoff, strings_end, "property name")
            stack[-1].props.append((name, blob[pos:pos + length]))
            pos = (pos + length + 3) & ~3
        elif tag == FDT_NOP:
            continue
        elif tag == FDT_END:
            if stack:
                raise AbiError("FDT ends inside an open node")
            break
        else:
            raise AbiError(f"FDT has an unknown structure token {tag:#x} at offset {pos - 4}")
    if root is None:
        raise AbiError("FDT has no root node")
    return Fdt(root=root, totalsize=totalsize, version=version, last_comp_version=last_comp,
               boot_cpuid=cpu, reservations=reservations)


# ----------------------------------------------------------------------------- writing


@dataclass
class _WNode:
    name: str
    props: list[tuple[int, bytes]] = field(default_factory=list)  # (nameoff, value)
    children: list[_WNode] = field(default_factory=list)


def _find_string(strtab: bytes, name: str) -> int:
    """libfdt's fdt_find_string_(): first match at any byte offset, so tails are shared."""
    return strtab.find(name.encode("ascii") + b"\0")


class FdtTree:
    """A tree with libfdt's exact string table and property order; renders to bytes."""

    def __init__(self, root: _WNode, strtab: bytes, rsvmap_offset: int,
                 reservations: list[tuple[int, int]] | None = None) -> None:
        self.root = root
        self.strtab = bytearray(strtab)
        self.rsvmap_offset = rsvmap_offset
        self.reservations = list(reservations or [])

    # --- read-write operations (after fdt_open_into) -----------------------------------------
    @classmethod
    def open(cls, blob: bytes) -> FdtTree:
        """fdt_open_into(): take an existing blob, keeping its string table and name offsets."""
        _, _, off_strings, off_rsv, size_strings, _ = check_header(blob)
        parsed = parse_fdt(blob)
        strtab = blob[off_strings:off_strings + size_strings]

        def convert(node: FdtNode) -> _WNode:
            out = _WNode(node.name)
            for name, value in node.props:
                out.props.append((_find_string(strtab, name), value))
            out.children = [convert(c) for c in node.children]
            return out
        # Name offsets are recovered by lookup; for tables libfdt wrote, the first match is the
        # offset libfdt itself chose, because it also reuses the first match.
        return cls(convert(parsed.root), strtab, off_rsv, parsed.reservations)

    def _node(self, path: str) -> _WNode:
        node = self.root
        for part in [p for p in path.split("/") if p]:
            for child in node.children:
                if child.name == part:
                    node = child
                    break
            else:
                raise AbiError(f"FDT has no node {path!r}")
        return node

    def _string(self, name: str) -> int:
        off = _find_string(bytes(self.strtab), name)
        if off < 0:
            off = len(self.strtab)
            self.strtab += name.encode("ascii") + b"\0"
        return off

    def add_subnode(self, parent: str, name: str) -> None:
        node = self._node(parent)
        if any(c.name == name for c in node.children):
            raise AbiError(f"FDT node {parent!r} already has a child {name!r} (-FDT_ERR_EXISTS)")
        node.children.insert(0, _WNode(name))  # after the parent's properties, before children

    def del_node(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise AbiError("cannot delete the FDT root node")
        parent = self._node("/".join(parts[:-1]))
        before = len(parent.children)
        parent.children = [c for c in parent.children if c.name != parts[-1]]
        if len(parent.children) == before:
            raise AbiError(f"FDT has no node {path!r}")

    def setprop(self, path: str, name: str, value: bytes) -> None:
        node = self._node(path)
        for i, (nameoff, _) in enumerate(node.props):
            if self._name_at(nameoff) == name:
                node.props[i] = (nameoff, bytes(value))  # resized in place
                return
        node.props.insert(0, (self._string(name), bytes(value)))  # new properties go first

    def _name_at(self, off: int) -> str:
        end = self.strtab.index(0, off)
        return self.strtab[off:end].decode("ascii")

    def pack(self) -> bytes:
        """fdt_pack(): reserve map moves to 40, blocks follow without gaps."""
        self.rsvmap_offset = RW_RSVMAP_OFFSET
        return self.to_bytes()

    def to_bytes(self) -> bytes:
        body = bytearray()
        self._render(self.root, body)
        body += struct.pack(">I", FDT_END)
        rsv = b"".join(struct.pack(">QQ", a, s) for a, s in self.reservations) + bytes(16)
        off_rsv = self.rsvmap_offset
        off_struct = off_rsv + len(rsv)
        off_strings = off_struct + len(body)
        total = off_strings + len(self.strtab)
        header = struct.pack(">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsv, 17, 16, 0,
                             len(self.strtab), len(body))
        pad = bytes(off_rsv - HEADER_SIZE)
        return header + pad + rsv + bytes(body) + bytes(self.strtab)

    def _render(self, node: _WNode, out: bytearray) -> None:
        name = node.name.encode("ascii") + b"\0"
        out += struct.pack(">I", FDT_BEGIN_NODE) + name + bytes(-len(name) % 4)
        for nameoff, value in node.props:
            out += struct.pack(">III", FDT_PROP, len(value), nameoff) + value
            out += bytes(-len(value) % 4)
        for child in node.children:
            self._render(child, out)
        out += struct.pack(">I", FDT_END_NODE)


class FdtWriter:
    """libfdt's sequential-write API: begin_node/property/end_node, then finish()."""

    def __init__(self) -> None:
        self._strtab = bytearray()  # in final order; new names are prepended
        self._stack: list[_WNode] = []
        self._root: _WNode | None = None
        # Properties refer to names by offset from the table's end until finish() (libfdt stores
        # negative offsets during sequential write for the same reason: the table grows down).
        self._pending: list[tuple[_WNode, int, int]] = []

    def begin_node(self, name: str) -> FdtWriter:
        node = _WNode(name)
        if self._stack:
            self._stack[-1].children.append(node)
        elif self._root is None:
            self._root = node
        else:
            raise AbiError("FdtWriter: second root node")
        self._stack.append(node)
        return self

    def end_node(self) -> FdtWriter:
        if not self._stack:
            raise AbiError("FdtWriter: end_node without begin_node")
        self._stack.pop()
        return self

    def property(self, name: str, value: bytes) -> FdtWriter:
        if not self._stack:
            raise AbiError("FdtWriter: property outside a node")
        encoded = name.encode("ascii") + b"\0"
        off = bytes(self._strtab).find(encoded)
        if off < 0:
            self._strtab[0:0] = encoded
            off = 0
        from_end = len(self._strtab) - off
        node = self._stack[-1]
        node.props.append((0, bytes(value)))
        self._pending.append((node, len(node.props) - 1, from_end))
        return self

    def property_string(self, name: str, value: str) -> FdtWriter:
        return self.property(name, value.encode("ascii") + b"\0")

    def property_u64(self, name: str, value: int) -> FdtWriter:
        return self.property(name, struct.pack("<Q", value))  # KHO: native (LE) endian

    def property_u32(self, name: str, value: int) -> FdtWriter:
        return self.property(name, struct.pack("<I", value))

    def finish_tree(self) -> FdtTree:
        if self._stack or self._root is None:
            raise AbiError("FdtWriter: finish with open nodes or no root")
        total = len(self._strtab)
        for node, index, from_end in self._pending:
            node.props[index] = (total - from_end, node.props[index][1])
        return FdtTree(self._root, bytes(self._strtab), SW_RSVMAP_OFFSET)

    def finish(self) -> bytes:
        return self.finish_tree().to_bytes()
