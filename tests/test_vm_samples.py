"""The blobs the VM suite captured from a real 7.3-rc7 guest around one live update
(tests/data/vm-samples/README.md): the outgoing debugfs tree before the kexec and the incoming
one after it, decoded and compared with each other and with dtc."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kho_agent.abi import KhoInput, KhoState, Severity, Side, decode_state
from kho_agent.abi.formats.kexec_metadata_v1 import KexecMetadata
from kho_agent.abi.kho_state import ScratchArea, scratch_roles
from kho_agent.abi.luo_common import LuoState
from kho_agent.kernel.debugfs import read_snapshot

CASE = Path(__file__).resolve().parent / "data" / "vm-samples" / "7.3-rc7-guest"


def decode(side: Side) -> KhoState:
    snap = read_snapshot(str(CASE / side.value))
    scratch = [ScratchArea(p, n, r) for p, n, r in
               zip(snap.scratch_phys, snap.scratch_len, scratch_roles(len(snap.scratch_len)),
                   strict=True)]
    return decode_state(KhoInput(snap.fdt, snap.sub_blobs, scratch, None, side))


def test_the_outgoing_fdt_is_cut_short_and_the_incoming_one_is_whole() -> None:
    out, inc = decode(Side.OUT), decode(Side.IN)
    truncated = [f for f in out.findings if f.code == "debugfs-fdt-truncated"]
    assert len(truncated) == 1 and "233 of 285" in truncated[0].message
    assert (CASE / "out/fdt").stat().st_size == 233
    # what the next kernel received is the FDT the outgoing header announced
    assert out.root_source == "truncated-fdt" and inc.root_source == "fdt"
    assert (CASE / "in/fdt").stat().st_size == out.fdt_size == inc.fdt_size == 285
    assert out.compatible == inc.compatible == "kho-v4"
    assert out.memmap_phys == inc.memmap_phys
    assert [(s.name, s.size) for s in out.subtrees] == [(s.name, s.size) for s in inc.subtrees]
    assert not [f for f in out.findings + inc.findings if f.severity is Severity.ERROR]


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc (device-tree-compiler) missing")
def test_dtc_reads_the_same_memory_map_from_the_incoming_fdt() -> None:
    dts = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(CASE / "in/fdt")],
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in dts.splitlines() if "preserved-memory-map" in x)
    # dtc prints the native (little-endian) u64 as two big-endian cells
    cells = [int(c, 16) for c in line.split("<")[1].split(">")[0].split()]
    value = struct.unpack("<Q", struct.pack(">II", *cells))[0]
    assert value == decode(Side.IN).memmap_phys


def test_kexec_metadata_came_through_byte_for_byte() -> None:
    out = (CASE / "out/sub_fdts/kexec-metadata").read_bytes()
    assert out == (CASE / "in/sub_fdts/kexec-metadata").read_bytes()
    meta = next(s.decoded for s in decode(Side.IN).subtrees if s.name == "kexec-metadata")
    assert isinstance(meta, KexecMetadata)
    assert meta.previous_release == "7.3.0-rc7" and meta.kexec_count == 1


def test_luo_before_the_reboot_and_after_it() -> None:
    out, inc = decode(Side.OUT), decode(Side.IN)
    luo = next(s.decoded for s in out.subtrees if s.name == "LUO")
    assert isinstance(luo, LuoState) and luo.liveupdate_number == 1 and luo.sessions == []
    assert {f.code for f in out.findings} >= {"sessions-not-serialized"}
    assert {f.code for f in inc.findings} >= {"luo-blob-freed"}
    # the scratch areas the kernel reported, in its order
    assert [a.role for a in out.scratch] == ["lowmem", "global", "node 0"]
