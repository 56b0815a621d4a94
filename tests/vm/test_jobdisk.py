"""The job disk round trip on real e2fsprogs: mkfs.ext4 -d in, debugfs out, nothing mounted."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .jobdisk import (
    JOB_LABEL,
    JobDiskError,
    job_disk_tools_missing,
    make_job_disk,
    read_job_disk,
    read_job_file,
)
from .qemu import parse_frames

pytestmark = pytest.mark.skipif(bool(job_disk_tools_missing()),
                                reason=f"e2fsprogs missing: {job_disk_tools_missing()}")


def _tree(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Relative path -> (content or None for a directory, permission bits)."""
    out: dict[str, tuple[bytes | None, int]] = {}
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        out[str(path.relative_to(root))] = (None if path.is_dir() else path.read_bytes(), mode)
    return out


@pytest.fixture
def job_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "deep/er/still").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    run = src / "run"
    run.write_text("#!/bin/sh\necho hello\n")
    run.chmod(0o755)
    # Every byte value, NULs and a lone CR included, and a file spanning many blocks.
    (src / "deep/er/still/all-bytes.bin").write_bytes(bytes(range(256)) * 64)
    (src / "deep/random.bin").write_bytes(os.urandom(3 * 4096 + 17))
    (src / "deep/er/empty").write_bytes(b"")
    (src / "name with spaces.txt").write_text("spaced\n")
    (src / "deep/er/secret").write_bytes(b"only root\n")
    (src / "deep/er/secret").chmod(0o600)
    return src


def test_round_trip_keeps_content_modes_and_nesting(tmp_path: Path, job_src: Path) -> None:
    image = make_job_disk(job_src, tmp_path / "job.img", size_mb=16)
    out = read_job_disk(image, tmp_path / "out")
    assert _tree(out) == _tree(job_src)


def test_disk_is_labelled_for_the_guest_fstab(tmp_path: Path, job_src: Path) -> None:
    image = make_job_disk(job_src, tmp_path / "job.img", size_mb=16)
    # The guest mounts LABEL=khojob: ask e2fsprogs itself, not our code.
    label = subprocess.run(["e2label", str(image)], capture_output=True, text=True, check=True)
    assert label.stdout.strip() == JOB_LABEL == "khojob"
    # Sparse: 16 MiB of address space, far less allocated.
    assert image.stat().st_size == 16 * 2**20
    assert image.stat().st_blocks * 512 < 8 * 2**20


def test_files_written_later_come_back(tmp_path: Path, job_src: Path) -> None:
    """What a guest adds (here written with debugfs, as the guest's ext4 would) is read back."""
    image = make_job_disk(job_src, tmp_path / "job.img", size_mb=16)
    payload = tmp_path / "result.bin"
    payload.write_bytes(b"\x00\xff" * 5000)
    subprocess.run(["debugfs", "-w", "-R", "mkdir /logs", str(image)], check=True,
                   capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", f"write {payload} /logs/boot-1.log", str(image)],
                   check=True, capture_output=True)
    out = read_job_disk(image, tmp_path / "out")
    assert (out / "logs/boot-1.log").read_bytes() == payload.read_bytes()
    assert read_job_file(image, "/logs/boot-1.log") == payload.read_bytes()
    assert read_job_file(image, "/deep/er/still/all-bytes.bin") == bytes(range(256)) * 64


def test_missing_file_is_an_error_not_empty_bytes(tmp_path: Path, job_src: Path) -> None:
    image = make_job_disk(job_src, tmp_path / "job.img", size_mb=16)
    with pytest.raises(JobDiskError, match="/logs/nothing"):
        read_job_file(image, "/logs/nothing")


def test_too_small_disk_is_refused_with_the_size_to_use(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "blob").write_bytes(b"\x01" * (7 * 2**20))
    with pytest.raises(JobDiskError, match=r"size_mb=\d+") as info:
        make_job_disk(src, tmp_path / "job.img", size_mb=8)
    suggested = int(str(info.value).split("size_mb=")[1].split()[0])
    # The suggestion must actually work.
    image = make_job_disk(src, tmp_path / "job.img", size_mb=suggested)
    out = read_job_disk(image, tmp_path / "out")
    assert (out / "blob").read_bytes() == b"\x01" * (7 * 2**20)


def test_reading_into_a_non_empty_directory_is_refused(tmp_path: Path, job_src: Path) -> None:
    image = make_job_disk(job_src, tmp_path / "job.img", size_mb=16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("from an earlier run")
    with pytest.raises(JobDiskError, match="not empty"):
        read_job_disk(image, out)


# --- the guest's side of the contract: tests/vm/guest/kho-test-driver, run on the host ----------

DRIVER = Path(__file__).resolve().parent / "guest" / "kho-test-driver"


def _driver(job: Path, *, new_session: bool = False) -> subprocess.Popen[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KHO_TEST_DRIVER_JOB": str(job)}
    return subprocess.Popen(["/bin/bash", str(DRIVER)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=new_session)


def test_driver_runs_the_job_once_per_boot_and_numbers_the_logs(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    run = job / "run"
    run.write_text('#!/bin/sh\necho "boot=$KHO_TEST_BOOT cwd=$(pwd) log=$KHO_TEST_LOG"\n'
                   'echo to-stderr >&2\nexit $((KHO_TEST_BOOT + 1))\n')
    run.chmod(0o755)
    for boot in (1, 2):
        proc = _driver(job)
        stdout, _ = proc.communicate(timeout=60)
        # the run's status comes out as the driver's (the unit shows a failed run as failed)
        assert proc.returncode == boot + 1
        log = job / "logs" / f"boot-{boot}.log"
        expected = f"boot={boot} cwd={job} log={log}"
        assert expected in stdout and "to-stderr" in stdout
        assert log.read_text() == stdout  # the console and the file saw the same lines
        frames = parse_frames(stdout, strict=True)
        assert [f["event"] for f in frames] == ["driver-start", "driver-exit"]
        assert frames[0]["boot"] == boot and frames[1]["status"] == boot + 1
        assert frames[0]["uptime"] <= frames[1]["uptime"]
    assert sorted(p.name for p in (job / "logs").iterdir()) == ["boot-1.log", "boot-2.log"]


def test_driver_stopped_by_the_shutdown_says_so_and_dies_by_the_signal(tmp_path: Path) -> None:
    """systemd stops the unit with SIGTERM to its whole control group (here: process group)
    when the shutdown the run asked for begins: the driver must record it and go at once."""
    job = tmp_path / "job"
    job.mkdir()
    ready = tmp_path / "ready"
    run = job / "run"
    run.write_text(f"#!/bin/sh\necho requesting-shutdown\ntouch {ready}\nexec sleep 600\n")
    run.chmod(0o755)
    proc = _driver(job, new_session=True)
    try:
        # wait for the run to be in its sleep (a condition, bounded; not a timing guess)
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        assert ready.exists(), "the run never started"
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGTERM
    frames = parse_frames(stdout, strict=True)
    assert [f["event"] for f in frames] == ["driver-start", "driver-stopped"]
    log = (job / "logs" / "boot-1.log").read_text()
    assert "requesting-shutdown" in log and '"driver-stopped"' in log


def test_driver_without_a_run_reports_it_and_does_nothing_else(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "run").write_text("#!/bin/sh\necho must not run\n")  # not executable
    proc = _driver(job)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert [f["event"] for f in parse_frames(stdout, strict=True)] == ["no-run"]
    assert "must not run" not in stdout
    assert not (job / "logs").exists()
