"""The QEMU runner's pure parts: the serial frame parser and the command line (no guest booted)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .qemu import (
    BASE_APPEND,
    FRAME_MARKER,
    GuestRun,
    QemuError,
    build_argv,
    guest_append,
    parse_frames,
    probe_accel,
    run_guest,
)

# --- frames -----------------------------------------------------------------------------------


def test_frames_come_back_in_order_from_a_noisy_console() -> None:
    frames = [{"event": "driver-start", "boot": 1, "uptime": 12.5},
              {"event": "result", "name": "ä/ü", "bytes": [0, 255], "nested": {"ok": True}},
              {"event": "driver-exit", "boot": 1, "status": 0}]
    text = "\r\n".join([
        "[    0.000000] Linux version 7.3.0-rc7 (root@host)",
        f"{FRAME_MARKER}{json.dumps(frames[0])}",
        "[  OK  ] Started kho-agent.service - kho-agent live-update orchestrator.",
        # as journald forwards a service's stdout to the console: timestamp, identifier[pid]:
        f"[   13.123456] kho-test[412]: {FRAME_MARKER}{json.dumps(frames[1], ensure_ascii=False)}",
        f"{FRAME_MARKER}{json.dumps(frames[2])}   ",
        "reboot: Power down",
    ]) + "\r\n"
    assert parse_frames(text) == frames


def test_broken_frames_are_skipped_or_named_in_strict_mode() -> None:
    good = {"event": "ok"}
    text = "\n".join([
        # a kernel message spliced into the middle of a frame
        f'{FRAME_MARKER}{{"event": "res[   20.1] random: crng init done',
        f"{FRAME_MARKER}[1, 2, 3]",        # JSON, but not an object
        f"{FRAME_MARKER}",                 # nothing after the marker
        "KHO-TEST{\"no\": \"space\"}",     # not the marker
        f"{FRAME_MARKER}{json.dumps(good)} trailing words",
    ])
    assert parse_frames(text) == [good]
    with pytest.raises(ValueError, match="serial line 1: malformed frame"):
        parse_frames(text, strict=True)
    with pytest.raises(ValueError, match="serial line 2: a frame must be a JSON object"):
        parse_frames(f"no frame here\n{FRAME_MARKER}[1, 2, 3]\n", strict=True)


def test_no_frames_in_a_console_without_any() -> None:
    assert parse_frames("") == []
    assert parse_frames("[    1.0] Run /sbin/init as init process\n") == []


# --- command line ---------------------------------------------------------------------------------


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_argv_tcg_boots_the_kernel_with_disks_in_order(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    root, job = tmp_path / "root.qcow2", tmp_path / "job.img"
    serial = tmp_path / "serial.log"
    argv = build_argv(kernel, guest_append("stage=2"), [root, job], memory_mb=3072, accel="tcg",
                      smp=2, serial_log=serial)
    assert argv[0] == "qemu-system-x86_64"
    # single-threaded TCG: multi-threaded TCG oopsed on this machine (platform notes)
    assert _pairs(argv, "-accel") == ["tcg,thread=single"]
    assert _pairs(argv, "-cpu") == ["max"]
    assert _pairs(argv, "-m") == ["3072"]
    assert _pairs(argv, "-smp") == ["2"]
    assert _pairs(argv, "-kernel") == [str(kernel)]
    assert _pairs(argv, "-append") == [f"{BASE_APPEND} stage=2"]
    assert _pairs(argv, "-serial") == [f"file:{serial}"]
    # a guest that powers off, reboots or panics ends QEMU
    assert "-no-reboot" in argv and "-nographic" in argv
    drives = _pairs(argv, "-drive")
    assert len(drives) == 2
    assert drives[0].startswith(f"file={root},format=qcow2,if=virtio")
    assert drives[1].startswith(f"file={job},format=raw,if=virtio")


def test_argv_kvm_uses_the_host_cpu(tmp_path: Path) -> None:
    argv = build_argv(tmp_path / "k", "x", [], memory_mb=256, accel="kvm", smp=1,
                      serial_log=tmp_path / "s", extra_args=["-s"])
    assert _pairs(argv, "-accel") == ["kvm"]
    assert _pairs(argv, "-cpu") == ["host"]
    assert "-drive" not in argv
    assert argv[-1] == "-s"


def test_append_always_has_the_kho_switches_and_panic_ends_qemu() -> None:
    words = guest_append().split()
    for needed in ("console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "kho=on",
                   "liveupdate=on"):
        assert needed in words


qemu_missing = shutil.which("qemu-system-x86_64") is None


@pytest.mark.skipif(qemu_missing, reason="qemu-system-x86_64 not installed")
def test_qemu_accepts_the_command_line(tmp_path: Path) -> None:
    """QEMU parses our options and opens our drives before it loads the kernel: with a kernel
    file that does not exist it must fail on the kernel, not on an option or a -drive property."""
    disks = [tmp_path / "root.img", tmp_path / "job.img"]
    for disk in disks:
        disk.write_bytes(b"\0" * 2**20)
    argv = build_argv(tmp_path / "absent-kernel", guest_append(), disks, memory_mb=128,
                      accel="tcg", smp=1, serial_log=tmp_path / "serial.log")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "absent-kernel" in proc.stderr, proc.stderr
    assert "kernel" in proc.stderr.lower(), proc.stderr


def test_missing_kernel_or_disk_is_refused_before_qemu(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="kernel image"):
        run_guest(tmp_path / "nope", "", [], timeout_s=1, serial_log=tmp_path / "s", accel="tcg")
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    with pytest.raises(QemuError, match="disk image"):
        run_guest(kernel, "", [tmp_path / "nodisk"], timeout_s=1, serial_log=tmp_path / "s",
                  accel="tcg")


def test_forced_accel_skips_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KHO_AGENT_TEST_ACCEL", "tcg")
    # the kernel does not exist: a probe would have to boot it
    assert probe_accel(tmp_path / "absent", cache_dir=tmp_path) == "tcg"
    monkeypatch.setenv("KHO_AGENT_TEST_ACCEL", "fast")
    with pytest.raises(QemuError, match="kvm or tcg"):
        probe_accel(tmp_path / "absent", cache_dir=tmp_path)


def test_guest_run_describes_a_timeout_with_the_console_tail(tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    serial.write_text("".join(f"line {i}\n" for i in range(100)) + "Kernel panic - not syncing\n")
    run = GuestRun(returncode=-9, serial_log=serial, elapsed_s=600, timed_out=True)
    text = run.describe(lines=3)
    assert "timed out after 600 s" in text
    assert text.endswith("line 98\nline 99\nKernel panic - not syncing")
    assert "line 97" not in text


def test_qemu_img_overlay_is_recognised_by_suffix(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    base = tmp_path / "base.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(base), "8M"], check=True)
    from .rootfs import scratch_copy
    overlay = scratch_copy(base, tmp_path / "run", mode="qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base.resolve())
    copy = scratch_copy(base, tmp_path / "run", mode="copy")
    assert copy.read_bytes() == base.read_bytes()
