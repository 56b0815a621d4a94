"""ABI compatibility: versions read from kernel images and debugfs state, compare(), and the
`kho-agentctl compat` command end to end."""

from __future__ import annotations

import glob
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import zstandard
from cliout import cli_json

from kho_agent.abi import CODES, KhoInput, Severity, Side, decode_state
from kho_agent.abi.compat import (
    FLB_MISSING,
    HANDLER_MISMATCH,
    HANDLER_MISSING,
    KHO_ROOT_MISMATCH,
    KHO_ROOT_MISSING,
    LUO_MISMATCH,
    LUO_MISSING,
    MEMBLOCK_MISMATCH,
    METADATA_MISMATCH,
    CompatReport,
    CompatRow,
    Impact,
    KernelAbi,
    Spoken,
    Verdict,
    abi_from_payload,
    abi_from_state,
    compare,
    handler_key,
    merge,
)
from kho_agent.cli import main
from kho_agent.kernel import debugfs
from kho_agent.kernel.image import read_image

REPO = Path(__file__).resolve().parent.parent

# What 7.2.13 / 7.3-rc7 carry (docs/kernel-abi.md, "Verified against 7.2.13 / 7.3-rc7 source").
V73 = ["kho-v4", "luo-v5", "memfd-v2", "memblock-v1", "reserve-mem-v1", "kexec-metadata"]


def payload(*strings: str, extra: bytes = b"") -> bytes:
    """A fake vmlinux: ELF magic, some code, then the strings NUL-separated as in .rodata."""
    body = b"\0".join(s.encode() for s in strings)
    return (b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"\x48\x89\xe5" * 100 + b"\0" + body + b"\0"
            + extra + b"Linux version 7.3.0-test (b@h) #1\n\0")


def bzimage(data: bytes, version: str = "7.3.0-test (b@h) #1") -> bytes:
    """Minimal bzImage (see test_image.py for the layout), zstd payload + appended size."""
    comp = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    comp += struct.pack("<I", len(data))
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    struct.pack_into("<H", setup, 0x20E, 0x300)
    raw = version.encode() + b"\0"
    setup[0x500:0x500 + len(raw)] = raw
    struct.pack_into("<II", setup, 0x248, 0x100, len(comp))
    return bytes(setup) + b"\x90" * 0x100 + comp


def write_image(path: Path, *strings: str) -> str:
    path.write_bytes(bzimage(payload(*strings)))
    return str(path)


def image_abi(*strings: str, extra: bytes = b"") -> KernelAbi:
    return abi_from_payload(payload(*strings, extra=extra), "test image")


def row(report: CompatReport, key: str) -> CompatRow:
    return next(r for r in report.rows if r.contract == key)


def samples_debugfs() -> Path:
    base = REPO / "tests" / "data" / "kho-samples" / "debugfs"
    if not (base / "stage1-3-loaded" / "out").is_dir():
        # committed with the tree: its absence is a broken checkout, not a reason to skip
        pytest.fail(f"kho-samples not found in {base}")
    return base


def sample_state(stage: str, side: str = "out") -> KhoInput:
    snap = debugfs.read_snapshot(str(samples_debugfs() / stage / side))
    return KhoInput(snap.fdt, snap.sub_blobs)


# --- versions from an image ------------------------------------------------------------------

def test_payload_versions_73() -> None:
    abi = image_abi(*V73, "kho-test-v1", "liveupdate-test-flb-v0")
    spoken = {k: v.versions for k, v in abi.contracts.items()}
    assert spoken["kho-root"] == ("kho-v4",)
    assert spoken["luo"] == ("luo-v5",)
    assert spoken["luo-session"] == () and spoken["luo-flb"] == ()
    assert spoken["handler:memfd"] == ("memfd-v2",)
    assert spoken["handler:guest_memfd"] == () and spoken["handler:kvm_vm"] == ()
    assert spoken["memblock"] == ("memblock-v1",)
    assert spoken["reserve-mem"] == ("reserve-mem-v1",)
    assert spoken["kexec-metadata"] == ("v1",)
    assert abi.kho_built is True and abi.luo_built is True
    assert abi.notes == []


def test_payload_versions_619_fdt_era() -> None:
    abi = image_abi("kho-v1", "luo-v1", "luo-session-v2", "luo-flb-v1", "memfd-v1", "memblock-v1")
    spoken = {k: v.versions for k, v in abi.contracts.items()}
    assert spoken["luo"] == ("luo-v1",)
    assert spoken["luo-session"] == ("luo-session-v2",)
    assert spoken["luo-flb"] == ("luo-flb-v1",)
    assert spoken["handler:memfd"] == ("memfd-v1",)
    assert spoken["kexec-metadata"] == ()


def test_payload_in_flight_handlers_and_compound_root() -> None:
    abi = image_abi("kho-v4;radix-v1", "luo-v5", "guest_memfd_luo_v1", "kvm_vm_luo_v1")
    assert abi.contracts["kho-root"].versions == ("kho-v4;radix-v1",)
    assert abi.contracts["handler:guest_memfd"].versions == ("guest_memfd_luo_v1",)
    assert abi.contracts["handler:kvm_vm"].versions == ("kvm_vm_luo_v1",)


def test_payload_without_kho() -> None:
    abi = image_abi("memfd_create", "kho_scratch", "some-v1")
    assert abi.kho_built is False and abi.luo_built is False
    assert abi.contracts["kho-root"].versions == ()
    assert any("built without KHO" in n for n in abi.notes)


def test_payload_kho_without_luo() -> None:
    abi = image_abi("kho-v4", "memblock-v1", "kexec-metadata")
    assert abi.kho_built is True and abi.luo_built is False
    assert any("built without LUO" in n for n in abi.notes)


def test_payload_lookalikes_do_not_count() -> None:
    # Embedded in longer identifiers, or not NUL-terminated: not the contract strings.
    abi = image_abi("xkho-v4", "kho-v4x", "my_luo-v5", "memfd-v2.c", "luo-session-v2-old",
                    extra=b"kho-v3 is described in a comment\0")
    assert abi.contracts["kho-root"].versions == ()
    assert abi.contracts["luo"].versions == ()
    assert abi.contracts["handler:memfd"].versions == ()
    assert abi.contracts["luo-session"].versions == ()


def test_payload_string_as_instruction_immediate() -> None:
    # movabs $"luo-v5\0\0", %rax: an 8-byte string copied into luo_ser.compatible.
    abi = image_abi("kho-v4", extra=b"\x48\xb8luo-v5\0\0\x48\x89\x07")
    assert abi.contracts["luo"].versions == ("luo-v5",)


def test_payload_several_versions_highest_wins_with_note() -> None:
    abi = image_abi("kho-v9", "kho-v10", "kho-v3")
    spoken = abi.contracts["kho-root"]
    assert spoken.versions == ("kho-v3", "kho-v9", "kho-v10")
    assert spoken.primary == "kho-v10"
    assert spoken.note is not None and "taken as kho-v10" in spoken.note
    assert any("several KHO root versions" in n for n in abi.notes)


def test_handler_key() -> None:
    assert handler_key("memfd-v7") == "handler:memfd"
    assert handler_key("guest_memfd_luo_v2") == "handler:guest_memfd"
    assert handler_key("vfio-pci-v1") == "handler:vfio-pci-v1"


# --- versions from the running kernel's debugfs state ----------------------------------------

def test_state_from_real_sample() -> None:
    state = decode_state(sample_state("stage1-3-loaded"))
    abi = abi_from_state(state)
    spoken = {k: v.versions for k, v in abi.contracts.items()}
    assert spoken["kho-root"] == ("kho-v4",)  # recovered from the truncated out/fdt
    assert spoken["luo"] == ("luo-v5",)
    assert spoken["luo-session"] == () and spoken["luo-flb"] == ()
    assert spoken["memblock"] == ("memblock-v1",)
    assert spoken["reserve-mem"] == ("reserve-mem-v1",)
    assert spoken["kexec-metadata"] == ("v1",)
    # Sessions are serialized only inside reboot(): handlers are not known from debugfs.
    assert "handler:memfd" not in abi.contracts
    assert abi.release == "7.3.0-rc7-kho"


def test_state_root_from_incoming_when_out_fdt_absent() -> None:
    out = decode_state(sample_state("stage2-1-boot"))
    assert out.compatible is None
    assert "kho-root" not in abi_from_state(out).contracts
    inp = sample_state("stage2-1-boot", "in")
    incoming = decode_state(KhoInput(inp.root_fdt, inp.sub_blobs, side=Side.IN))
    abi = abi_from_state(out, incoming)
    assert abi.contracts["kho-root"].versions == ("kho-v4",)
    assert abi.contracts["kho-root"].note is not None


def test_state_without_luo_or_memblock() -> None:
    inp = sample_state("stage1-3-loaded")
    for name in ("LUO", "memblock"):
        del inp.sub_blobs[name]
    abi = abi_from_state(decode_state(inp))
    assert abi.contracts["luo"].versions == ()
    assert abi.contracts["memblock"].versions == ()


def test_merge_prefers_state_and_fills_handlers_from_image() -> None:
    state = abi_from_state(decode_state(sample_state("stage1-3-loaded")))
    image = image_abi("kho-v3", "luo-v5", "memfd-v2")
    merged = merge(state, image)
    assert merged.contracts["kho-root"].versions == ("kho-v4",)  # the state wins
    assert merged.contracts["handler:memfd"].versions == ("memfd-v2",)
    assert merged.contracts["handler:memfd"].source == "test image"


# --- compare() ---------------------------------------------------------------------------------

def test_compare_identical_is_compatible() -> None:
    report = compare(image_abi(*V73), image_abi(*V73))
    assert report.verdict is Verdict.COMPATIBLE
    assert all(r.verdict is Verdict.COMPATIBLE and r.reached for r in report.rows)
    assert [r.contract for r in report.rows] == ["kho-root", "luo", "handler:memfd", "memblock",
                                                 "reserve-mem", "kexec-metadata"]
    assert report.findings() == []


def test_compare_kho_root_mismatch_drops_everything_below() -> None:
    target = [s if s != "kho-v4" else "kho-v5" for s in V73]
    target[1] = "luo-v6"
    report = compare(image_abi(*V73), image_abi(*target))
    assert report.verdict is Verdict.INCOMPATIBLE
    root = row(report, "kho-root")
    assert (root.verdict, root.consequence) == (Verdict.INCOMPATIBLE, KHO_ROOT_MISMATCH)
    assert root.consequence == ("the next kernel disables KHO revival: all preserved memory is "
                                "lost and it boots as a cold boot (no panic)")
    # LUO differs too, but the next kernel never reads it: no panic.
    luo = row(report, "luo")
    assert luo.reached is False and luo.consequence is None
    assert luo.note is not None and "not reached" in luo.note
    assert not row(report, "handler:memfd").reached


def test_compare_luo_mismatch_panics() -> None:
    report = compare(image_abi(*V73), image_abi("kho-v4", "luo-v6", "memfd-v2"))
    luo = row(report, "luo")
    assert (luo.verdict, luo.impact) == (Verdict.INCOMPATIBLE, Impact.FATAL)
    assert luo.consequence == ("the next kernel panics at boot (LUO check at early_initcall, "
                               "even with liveupdate=off as long as KHO is enabled)")
    assert luo.consequence == LUO_MISMATCH
    assert report.verdict is Verdict.INCOMPATIBLE
    assert not row(report, "handler:memfd").reached


def test_compare_luo_session_mismatch_fdt_era() -> None:
    running = image_abi("kho-v1", "luo-v1", "luo-session-v2", "memfd-v1")
    target = image_abi("kho-v1", "luo-v1", "luo-session-v1", "memfd-v1")
    report = compare(running, target)
    assert row(report, "luo").verdict is Verdict.COMPATIBLE
    session = row(report, "luo-session")
    assert (session.verdict, session.consequence) == (Verdict.INCOMPATIBLE, LUO_MISMATCH)
    assert report.verdict is Verdict.INCOMPATIBLE


@pytest.mark.parametrize(("running", "target", "verdict"), [
    ("6.19.3", "6.19.8", Verdict.COMPATIBLE),
    ("6.16.1", "6.19.8", Verdict.UNKNOWN),
    (None, "6.19.8", Verdict.UNKNOWN),
])
def test_compare_kho_v1_same_string_different_layout(running: str | None, target: str,
                                                     verdict: Verdict) -> None:
    r = abi_from_payload(payload("kho-v1"), "r", running)
    t = abi_from_payload(payload("kho-v1"), "t", target)
    root = row(compare(r, t), "kho-root")
    assert root.verdict is verdict
    if verdict is Verdict.UNKNOWN:
        assert root.note is not None and "512 bytes to a page" in root.note


def test_compare_flb_dropped_by_older_kernel() -> None:
    running = image_abi("kho-v1", "luo-v1", "luo-session-v2", "luo-flb-v1", "memfd-v1")
    target = image_abi("kho-v1", "luo-v1", "luo-session-v2", "memfd-v1")
    flb = row(compare(running, target), "luo-flb")
    assert (flb.verdict, flb.consequence) == (Verdict.INCOMPATIBLE, FLB_MISSING)
    # The other direction: nothing FLB-shaped is handed over.
    back = row(compare(target, running), "luo-flb")
    assert back.verdict is Verdict.COMPATIBLE


def test_compare_handler_mismatch_eio() -> None:
    report = compare(image_abi(*V73), image_abi("kho-v4", "luo-v5", "memfd-v1"))
    memfd = row(report, "handler:memfd")
    assert (memfd.verdict, memfd.consequence) == (Verdict.INCOMPATIBLE, HANDLER_MISMATCH)
    assert "fails with EIO" in HANDLER_MISMATCH
    assert report.verdict is Verdict.INCOMPATIBLE


def test_compare_handler_missing_in_target() -> None:
    report = compare(image_abi(*V73), image_abi("kho-v4", "luo-v5"))
    memfd = row(report, "handler:memfd")
    assert (memfd.verdict, memfd.consequence) == (Verdict.INCOMPATIBLE, HANDLER_MISSING)


def test_compare_handler_that_may_be_a_module_is_unknown() -> None:
    report = compare(image_abi(*V73, "kvm_vm_luo_v1"), image_abi(*V73))
    kvm = row(report, "handler:kvm_vm")
    assert kvm.verdict is Verdict.UNKNOWN
    assert kvm.note is not None and "module" in kvm.note
    assert report.verdict is Verdict.UNKNOWN


def test_compare_memblock_mismatch_is_a_warning() -> None:
    target = [s if s != "memblock-v1" else "memblock-v2" for s in V73]
    report = compare(image_abi(*V73), image_abi(*target))
    mb = row(report, "memblock")
    assert (mb.verdict, mb.impact, mb.consequence) == (Verdict.INCOMPATIBLE, Impact.WARNING,
                                                       MEMBLOCK_MISMATCH)
    assert "allocated afresh" in MEMBLOCK_MISMATCH
    assert report.verdict is Verdict.COMPATIBLE
    assert [w.contract for w in report.warnings] == ["memblock"]
    assert [(f.code, f.severity) for f in report.findings()] == [("abi-incompatible",
                                                                  Severity.WARNING)]


def test_compare_kexec_metadata_version_mismatch_is_a_warning() -> None:
    running = abi_from_state(decode_state(sample_state("stage1-3-loaded")))
    running.contracts["kexec-metadata"] = Spoken(("v2",), "test")
    running.contracts["handler:memfd"] = Spoken(("memfd-v2",), "test")
    report = compare(running, image_abi(*V73))
    md = row(report, "kexec-metadata")
    assert (md.verdict, md.impact, md.consequence) == (Verdict.INCOMPATIBLE, Impact.WARNING,
                                                       METADATA_MISMATCH)
    assert report.verdict is Verdict.COMPATIBLE


def test_compare_target_without_kho() -> None:
    report = compare(image_abi(*V73), image_abi("memfd_create"))
    root = row(report, "kho-root")
    assert (root.verdict, root.consequence) == (Verdict.INCOMPATIBLE, KHO_ROOT_MISSING)
    assert report.verdict is Verdict.INCOMPATIBLE
    assert "built without KHO" in report.notes[0]
    assert all(not r.reached for r in report.rows if r.contract != "kho-root")


def test_compare_target_without_luo() -> None:
    report = compare(image_abi(*V73), image_abi("kho-v4", "memblock-v1", "kexec-metadata"))
    luo = row(report, "luo")
    assert (luo.verdict, luo.consequence) == (Verdict.INCOMPATIBLE, LUO_MISSING)
    assert "no panic" in LUO_MISSING


def test_compare_running_luo_off_hands_over_nothing() -> None:
    inp = sample_state("stage1-3-loaded")
    del inp.sub_blobs["LUO"]
    running = abi_from_state(decode_state(inp))
    report = compare(running, image_abi("kho-v4", "luo-v6", "memfd-v9", "memblock-v1",
                                        "kexec-metadata"))
    assert row(report, "luo").verdict is Verdict.COMPATIBLE
    assert row(report, "handler:memfd").verdict is Verdict.COMPATIBLE
    assert report.verdict is Verdict.COMPATIBLE


def test_compare_running_handlers_unknown() -> None:
    running = abi_from_state(decode_state(sample_state("stage1-3-loaded")))
    report = compare(running, image_abi(*V73))
    memfd = row(report, "handler:memfd")
    assert memfd.verdict is Verdict.UNKNOWN and memfd.running is None
    assert memfd.note is not None and "--running-image" in memfd.note
    assert report.verdict is Verdict.UNKNOWN
    codes = {f.code for f in report.findings()}
    assert codes == {"abi-unverified"}


def test_compare_running_without_kho() -> None:
    report = compare(image_abi("nothing"), image_abi(*V73))
    assert report.verdict is Verdict.COMPATIBLE
    assert "nothing to hand over" in report.notes[0]


def test_finding_codes_are_registered() -> None:
    report = compare(image_abi(*V73, "kvm_vm_luo_v1"),
                     image_abi("kho-v4", "luo-v5", "memfd-v1", "memblock-v2"))
    findings = report.findings()
    assert {f.code for f in findings} == {"abi-incompatible", "abi-unverified"}
    assert all(f.code in CODES for f in findings)


# --- kho-agentctl compat --------------------------------------------------------------------

def test_cli_two_images_compatible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_image(tmp_path / "a", *V73)
    b = write_image(tmp_path / "b", *V73)
    assert main(["compat", "--kernel", b, "--running-image", a]) == 0
    out = capsys.readouterr().out
    assert re.search(r"KHO root\s+kho-v4\s+kho-v4\s+compatible", out)
    assert "Verdict: COMPATIBLE" in out
    assert "bzImage, zstd, boot protocol 2.15" in out


def test_cli_two_images_incompatible_json(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    a = write_image(tmp_path / "a", *V73)
    b = write_image(tmp_path / "b", "kho-v4", "luo-v6", "memfd-v2", "memblock-v1")
    assert main(["compat", "--kernel", b, "--running-image", a, "--json"]) == 1
    doc = cli_json(capsys.readouterr().out)
    assert set(doc) == {"verdict", "rows", "notes", "running", "target", "images", "findings"}
    assert doc["verdict"] == "incompatible"
    luo = next(r for r in doc["rows"] if r["contract"] == "luo")
    assert {"contract", "title", "running", "target", "verdict", "impact", "reached",
            "consequence", "note"} <= set(luo)
    assert (luo["running"], luo["target"], luo["verdict"]) == (["luo-v5"], ["luo-v6"],
                                                               "incompatible")
    assert luo["consequence"] == LUO_MISMATCH
    root = next(r for r in doc["rows"] if r["contract"] == "kho-root")
    assert (root["verdict"], root["consequence"]) == ("compatible", None)
    assert root["on_mismatch"] == KHO_ROOT_MISMATCH
    assert doc["images"]["target"]["compression"] == "zstd"
    assert doc["images"]["running"]["kind"] == "bzImage"
    assert doc["target"]["release"] == "7.3.0-test"
    assert any(f["code"] == "abi-incompatible" and f["path"] == "/luo" for f in doc["findings"])


def test_cli_text_shows_consequence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_image(tmp_path / "a", *V73)
    b = write_image(tmp_path / "b", "kho-v5", "luo-v5", "memfd-v2")
    assert main(["compat", "--kernel", b, "--running-image", a]) == 1
    out = capsys.readouterr().out
    assert f"KHO root: incompatible: {KHO_ROOT_MISMATCH}" in out
    assert re.search(r"^LUO\s+luo-v5\s+luo-v5\s+not reached$", out, re.M)
    assert "LUO: " not in out  # explained by the KHO root line, not repeated
    assert "Verdict: INCOMPATIBLE" in out


def test_cli_bad_target_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    a = write_image(tmp_path / "a", *V73)
    assert main(["compat", "--kernel", str(junk), "--running-image", a]) == 2
    err = capsys.readouterr().err
    assert "target kernel" in err and "is not a kernel image" in err
    assert "Traceback" not in err
    assert main(["compat", "--kernel", str(tmp_path / "missing"), "--running-image", a]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_truncated_running_image_exits_2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a"
    a.write_bytes(bzimage(payload(*V73))[:-20])
    b = write_image(tmp_path / "b", *V73)
    assert main(["compat", "--kernel", b, "--running-image", str(a)]) == 2
    err = capsys.readouterr().err
    assert "running kernel" in err and "truncated" in err


def fake_host(tmp_path: Path, stage: str = "stage1-3-loaded", boot: list[str] | None = None,
              ) -> list[str]:
    """A debugfs copy of a real sample and a /boot with the running kernel's image."""
    dbg = tmp_path / "debugfs"
    shutil.copytree(samples_debugfs() / stage, dbg / "kho")
    boot_dir = tmp_path / "boot"
    boot_dir.mkdir()
    if boot is not None:
        write_image(boot_dir / f"vmlinuz-{os.uname().release}", *boot)
    return ["--debugfs", str(dbg), "--boot-dir", str(boot_dir)]


def test_cli_live_compatible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = fake_host(tmp_path, boot=V73)
    target = write_image(tmp_path / "target", *V73)
    assert main(["compat", "--kernel", target, *host, "--json"]) == 0
    doc = cli_json(capsys.readouterr().out)
    assert doc["verdict"] == "compatible"
    rows = {r["contract"]: r for r in doc["rows"]}
    assert rows["kho-root"]["running"] == ["kho-v4"]
    assert rows["handler:memfd"]["running"] == ["memfd-v2"]
    assert doc["running"]["contracts"]["luo"]["source"].startswith("debugfs ")
    assert doc["running"]["contracts"]["handler:memfd"]["source"].startswith("image ")
    # The outgoing kexec metadata names the kernel that wrote the state.
    assert doc["running"]["release"] == "7.3.0-rc7-kho"


def test_cli_live_luo_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = fake_host(tmp_path, boot=V73)
    target = write_image(tmp_path / "target", "kho-v4", "luo-v4", "memfd-v2", "memblock-v1")
    assert main(["compat", "--kernel", target, *host]) == 1
    out = capsys.readouterr().out
    assert f"LUO: incompatible: {LUO_MISMATCH}" in out


def test_cli_live_state_wins_over_running_image(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # The running image claims kho-v3, but debugfs shows kho-v4 is what is handed over.
    host = fake_host(tmp_path, boot=["kho-v3", "luo-v5", "memfd-v2"])
    target = write_image(tmp_path / "target", *V73)
    assert main(["compat", "--kernel", target, *host, "--json"]) == 0
    doc = cli_json(capsys.readouterr().out)
    assert next(r for r in doc["rows"] if r["contract"] == "kho-root")["running"] == ["kho-v4"]


def test_cli_live_without_running_image(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    host = fake_host(tmp_path, boot=None)
    target = write_image(tmp_path / "target", *V73)
    assert main(["compat", "--kernel", target, *host]) == 1
    out = capsys.readouterr().out
    assert re.search(r"memfd file handler\s+unknown\s+memfd-v2\s+unknown", out)
    assert "does not exist: file handler versions" in out
    assert "Verdict: NOT PROVEN" in out


def test_cli_live_booted_through_kho(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Second kernel of the sample run: no kho/out/fdt; the root version comes from kho/in/fdt.
    host = fake_host(tmp_path, stage="stage2-1-boot", boot=["luo-v5", "memfd-v2"])
    target = write_image(tmp_path / "target", *V73)
    assert main(["compat", "--kernel", target, *host, "--json"]) == 0
    doc = cli_json(capsys.readouterr().out)
    root = next(r for r in doc["rows"] if r["contract"] == "kho-root")
    assert root["running"] == ["kho-v4"] and root["verdict"] == "compatible"
    assert doc["running"]["contracts"]["kho-root"]["source"].endswith("(kho/in)")


def test_cli_no_debugfs_kho_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dbg = tmp_path / "debugfs"
    (dbg / "tracing").mkdir(parents=True)
    target = write_image(tmp_path / "target", *V73)
    assert main(["compat", "--kernel", target, "--debugfs", str(dbg),
                 "--boot-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "KHO is off" in err and "--running-image" in err


# --- a real kernel image, if this host has one -----------------------------------------------

def _real_images() -> list[tuple[str, str]]:
    pairs = []
    for image in sorted(glob.glob("/boot/vmlinuz-*")):
        config = image.replace("/vmlinuz-", "/config-")
        if os.access(image, os.R_OK) and os.path.exists(config):
            pairs.append((image, config))
    return pairs


@pytest.mark.skipif(not _real_images(), reason="no readable /boot/vmlinuz-* with a config")
def test_real_kernel_image_agrees_with_its_config() -> None:
    image_path, config_path = _real_images()[-1]
    image = read_image(image_path)
    abi = abi_from_payload(image.payload, image_path)
    config = Path(config_path).read_text(errors="replace")
    kho_on = re.search(r"^CONFIG_KEXEC_HANDOVER=y$", config, re.M) is not None
    assert abi.kho_built is kho_on
    luo_on = re.search(r"^CONFIG_LIVEUPDATE=y$", config, re.M) is not None
    assert abi.luo_built is luo_on
    release = image_path.rsplit("/vmlinuz-", 1)[1]
    assert image.info.release in (None, release)


def test_strings_across_scan_windows_are_found_once_and_whole() -> None:
    """The payload is scanned a window at a time (so the daemon's main loop is not starved):
    a string that starts in one window and ends in the next is found, whole, and one longer
    than MAX_STRING is not taken at all, wherever it lies."""
    from kho_agent.abi.compat import MAX_STRING, SCAN_WINDOW, payload_strings

    filler = bytearray(b"\xcc" * (3 * SCAN_WINDOW))
    placed = {SCAN_WINDOW - 3: b"luo-v5\0", 2 * SCAN_WINDOW - 1: b"memfd-v7\0",
              2 * SCAN_WINDOW + 10: b"\0kho-v4\0"}
    for offset, text in placed.items():
        filler[offset:offset + len(text)] = text
    long_one = b"\0kho-v9" + b";a" * MAX_STRING + b"\0"
    filler[SCAN_WINDOW + 100:SCAN_WINDOW + 100 + len(long_one)] = long_one
    found = payload_strings(bytes(filler))
    assert found["luo"] == ["luo-v5"]
    assert found["handler:memfd"] == ["memfd-v7"]
    assert found["kho-root"] == ["kho-v4"]   # not the string longer than MAX_STRING
