"""The job disk: how work goes into a guest and results come back out, without mounting anything.

The host makes an ext4 image (label ``khojob``) from a directory with ``mkfs.ext4 -d``; QEMU
attaches it as the second virtio disk; the guest mounts it at ``/mnt/job`` through its fstab
(``LABEL=khojob``) and the test driver (``tests/vm/guest/kho-test-driver``) runs ``/mnt/job/run``
on every boot, logging to ``/mnt/job/logs/boot-<n>.log``. After QEMU has exited the host copies
the whole file system out with ``debugfs -R "rdump / DIR"``: no loop device, no mount, no root
needed for that part.

Ownership and modes come from the source directory, root included: ``/mnt/job`` in the guest
gets the mode of ``src_dir`` (``tempfile.mkdtemp`` makes 0700 directories, which only root could
enter: ``chmod`` it if an unprivileged guest user such as ``vmm`` needs it), and ``run`` must be
executable.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

JOB_LABEL = "khojob"
DEFAULT_SIZE_MB = 256
# ext4 metadata (journal, inode tables, group descriptors) of a small file system, plus room for
# what the guest writes: a source tree filling more than this share of the disk is refused.
MAX_FILL = 0.6


class JobDiskError(RuntimeError):
    """Making or reading a job disk failed; the message says what and what to do."""


def _tree_bytes(src_dir: Path) -> int:
    total = 0
    for path in src_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            # Rounded up to whole 4 KiB blocks, as ext4 stores them.
            total += -(-path.stat().st_size // 4096) * 4096
    return total


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(argv, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise JobDiskError(f"{what}: {argv[0]} not found; install e2fsprogs") from exc
    if proc.returncode != 0:
        raise JobDiskError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                           + proc.stderr.decode(errors="replace")[-2000:])
    return proc


def make_job_disk(src_dir: Path, image: Path, size_mb: int = DEFAULT_SIZE_MB) -> Path:
    """Make ``image``, an ext4 file system labelled ``khojob`` holding a copy of ``src_dir``.

    The image is sparse: ``size_mb`` costs only what is written. Raises JobDiskError when the
    tree does not fit with room to spare for the guest's results.
    """
    if not src_dir.is_dir():
        raise JobDiskError(f"job directory {src_dir} does not exist")
    needed = _tree_bytes(src_dir)
    if needed > MAX_FILL * size_mb * 1024 * 1024:
        raise JobDiskError(
            f"{src_dir} holds {needed / 2**20:.1f} MiB, too much for a {size_mb} MiB job disk "
            f"(at most {MAX_FILL:.0%} of it, the rest is ext4 metadata and the guest's results): "
            f"pass size_mb={int(needed / MAX_FILL / 2**20) + 16} or more")
    image.parent.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    _run(["mkfs.ext4", "-q", "-F", "-L", JOB_LABEL, "-d", str(src_dir), str(image),
          f"{size_mb}M"], f"making the job disk {image}")
    return image


def _replay_journal(image: Path) -> None:
    """Bring a disk whose guest did not unmount it (panic, killed QEMU) to a consistent state.

    debugfs reads the file system as it is on disk and ignores the journal, so what the guest
    wrote last could be missing. ``e2fsck -p`` replays the journal and fixes what is safe to
    fix; on a cleanly unmounted disk it only reads the superblock.
    """
    proc = subprocess.run(["e2fsck", "-p", str(image)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, check=False)
    # 0: clean, 1: errors corrected; anything else means the file system is damaged: read
    # what can be read anyway, debugfs reports the files it cannot dump.
    if proc.returncode not in (0, 1):
        message = proc.stdout.decode(errors="replace")[-1000:]
        raise JobDiskError(f"e2fsck could not repair the job disk {image} "
                           f"(exit {proc.returncode}):\n{message}")


def _debugfs_errors(stderr: bytes) -> list[str]:
    # debugfs exits 0 whatever happens to a -R request; its errors are the stderr lines other
    # than its version banner.
    return [line for line in stderr.decode(errors="replace").splitlines()
            if line and not line.startswith("debugfs ")]


def read_job_disk(image: Path, out_dir: Path) -> Path:
    """Copy every file of the job disk ``image`` into ``out_dir`` (created; must not exist or
    be empty) and return ``out_dir``. Modes are kept; ``lost+found`` is left out when empty.

    Call it after QEMU has exited: the disk must not be in use.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise JobDiskError(f"{out_dir} is not empty: read the job disk into a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    _replay_journal(image)
    proc = _run(["debugfs", "-R", f'rdump / "{out_dir}"', str(image)],
                f"copying the job disk {image} to {out_dir}")
    errors = _debugfs_errors(proc.stderr)
    if errors:
        raise JobDiskError(f"debugfs could not copy everything out of {image}: "
                           + "; ".join(errors[:5]))
    lost = out_dir / "lost+found"
    if lost.is_dir() and not any(lost.iterdir()):
        lost.rmdir()
    return out_dir


def read_job_file(image: Path, path: str) -> bytes:
    """The content of one file of the job disk (``path`` absolute in it, e.g. ``/out/x.json``)."""
    proc = _run(["debugfs", "-R", f'cat "{path}"', str(image)], f"reading {path} from {image}")
    errors = _debugfs_errors(proc.stderr)
    if errors:
        raise JobDiskError(f"cannot read {path} from the job disk {image}: {'; '.join(errors)}")
    return proc.stdout


def job_disk_tools_missing() -> list[str]:
    return [tool for tool in ("mkfs.ext4", "debugfs", "e2fsck") if shutil.which(tool) is None]
