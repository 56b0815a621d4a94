"""The guests' root filesystems: Debian with systemd and kho-agent installed as a package, one
per release in :data:`GUESTS` (bookworm with systemd 252; sid with systemd 262, where systemd
carries the agent's sessions through the kexec).

Two cached layers (``tests/vm/cache.py``), each keyed by everything that goes into it:

1. **base** (``rootfs-base/<release>-<key>``): ``debootstrap --variant=minbase`` of the
   release with the packages the agent and the tests need, plus the configuration that does not
   depend on this repository (hostname, root password, masked units that would only add noise or
   want a network, the ``vmm`` user). Keyed by suite, package list and :data:`BASE_RECIPE`;
   building it takes about a minute and a half and needs the Debian archive.
2. **agent** (``rootfs-agent/<release>-<key>``): a copy of the base with kho-agent installed the
   way a distribution package would install it: the wheel built from this repository plus wheels
   of the dependencies the release lacks (``pip install --no-index`` inside the tree, so pip
   checks the declared dependencies against Debian's ``python3-*`` packages), the data files through
   ``packaging/install_data.py`` (with the fdstore drop-in where the release's systemd carries
   fd stores through LUO), the files of ``tests/vm/guest`` (job-disk mount, test driver,
   polkit rule, ``/etc/default/kexec``), the units enabled; then turned into an ext4 image with
   ``mkfs.ext4 -d`` (no loop mount). Keyed by the base key, the package sources, the pinned
   dependency wheels, the data files and the guest files, so the slow base is reused when only
   the agent changes.

The guest files are applied in the agent layer, not the base, for the same reason: editing the
test driver must not redo debootstrap.

Every run boots a private copy (:func:`scratch_copy`): the cached image is never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import progress
from .cache import content_key, ensure_entry

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(__file__).resolve().parent / "guest"
INSTALL_DATA = REPO / "packaging" / "install_data.py"

MIRROR_ENV = "KHO_AGENT_TEST_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Bump when the base recipe (debootstrap options, configure_base) changes meaning.
BASE_RECIPE = "base-3"
# Bump when the agent-layer recipe changes meaning.
AGENT_RECIPE = "agent-3"

# Tags a wheel for the guest may carry: x86_64 glibc (both releases' glibc is newer than these).
WHEEL_PLATFORMS: tuple[str, ...] = (
    "manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
    "manylinux_2_34_x86_64",
)


@dataclass(frozen=True)
class GuestRelease:
    """One Debian release the suite builds a guest of: everything that differs between them."""

    name: str                      # the guest's name in test ids ("bookworm", "sid")
    suite: str                     # debootstrap's suite
    packages: tuple[str, ...]      # debootstrap --include
    extra_wheels: tuple[str, ...]  # pyproject dependencies the release lacks, as exact pins
    python: str                    # the release's python3 ("3.11"): the wheels' tags
    # The hand-off mode an operator following preflight sets up: "fdstore" installs
    # systemd/kho-agent-fdstore.conf as the unit's drop-in (systemd >= 261).
    handoff: str

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")


# What the agent imports and runs, as Debian packages. polkit is split since bookworm: `polkitd`
# is the daemon with the JavaScript rules engine (and pkcheck/pkaction), `pkexec` only the setuid
# tool, which the guest does not need. polkitd depends on the virtual package default-logind,
# which debootstrap cannot resolve: libpam-systemd provides it. procps is there for debugging a
# failed run (ps, pgrep). qemu-system-x86 is the VM manager's QEMU (jobs/vmm_qemu.py, TCG inside
# the guest).
_COMMON_PACKAGES: tuple[str, ...] = (
    "systemd-sysv", "udev", "dbus", "libpam-systemd", "polkitd", "python3", "python3-pip",
    "python3-gi", "python3-pydbus", "python3-systemd", "python3-pyroute2", "python3-lz4",
    "iproute2", "kexec-tools", "procps", "qemu-system-x86",
)

GUESTS: dict[str, GuestRelease] = {
    # Debian 12: systemd 252 (before LUO: hand-off mode "direct"), Python 3.11, QEMU 7.2.
    # python3-cairo: Debian's python3-gi does not depend on it, but the PyGObject 3.42.2
    # metadata it installs requires pycairo>=1.16.0, so pip refuses the PyGObject dependency
    # without it. Not packaged or too old in bookworm, from PyPI (where possible the versions
    # the host's development venv runs):
    #   blake3     not packaged in bookworm; 1.0.5, not the venv's 1.0.11: from 1.0.8 on blake3
    #              requires typing-extensions>=4.6 on Python < 3.12, and bookworm has 4.4.0 (a
    #              newer one from PyPI would shadow Debian's for every program of the guest);
    #   zstandard  bookworm has 0.20, the agent needs >= 0.21.
    # The others come from Debian: PyGObject 3.42.2, systemd-python 235, pyroute2 0.7.2,
    # lz4 4.0.2. pip checks them inside the guest tree when it installs. (fdt and pydbus are
    # test dependencies, not the agent's; python3-pydbus is in the base all the same.)
    "bookworm": GuestRelease(
        name="bookworm", suite="bookworm", packages=(*_COMMON_PACKAGES, "python3-cairo"),
        extra_wheels=("blake3==1.0.5", "zstandard==0.25.0"), python="3.11",
        handoff="direct"),
    # Debian unstable, what the next release will be: systemd 262 (carries fd stores through
    # LUO: hand-off mode "fdstore"), Python 3.14, QEMU 11.1, PyGObject 3.58 (read 2026-12-03).
    # Everything comes from Debian.
    "sid": GuestRelease(
        name="sid", suite="sid", packages=(*_COMMON_PACKAGES, "python3-blake3",
                                           "python3-zstandard"),
        extra_wheels=(), python="3.14", handoff="fdstore"),
}
DEFAULT_GUEST = "bookworm"

HOSTNAME = "kho-guest"
VMM_USER = "vmm"
VMM_UID = 990
IMAGE_SIZE = "4G"  # room for the real-VMM scenario's VM saved whole (1 GiB)
IMAGE_NAME = "rootfs.ext4"
ROOT_LABEL = "khoroot"

# Timers and services that would want a network, run maintenance at random times under the
# tests, or put a login prompt between the framed lines on the serial console.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-networkd.service",
    "systemd-networkd-wait-online.service",
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
)

Runner = Literal["qcow2", "copy"]


class BuildError(RuntimeError):
    """A step of the image build failed; the message names the step and what to do."""


@dataclass(frozen=True)
class BaseTree:
    """The cached debootstrap tree (do not modify: the agent layer copies it)."""

    path: Path
    key: str


@dataclass(frozen=True)
class GuestImage:
    """The cached ext4 image of the guest's root filesystem (read-only: boot a scratch copy)."""

    path: Path
    key: str
    base_key: str
    # What went into the agent layer, as recorded at build time (wheels, pip's report, timings).
    info: dict[str, object]
    release: GuestRelease


def mirror() -> str:
    return os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR


def _run(argv: Sequence[str | Path], what: str, *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    """Run a build step; on failure raise BuildError with the step and the tail of its output."""
    progress.REPORTER.step(what)
    proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    output = progress.communicate(proc)
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, argv))}\n"
                         f"{tail}")
    return output


def _chroot_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def _chroot(root: Path, argv: Sequence[str], what: str) -> str:
    return _run(["chroot", root, *argv], what, env=_chroot_env())


@contextmanager
def _proc_mounted(root: Path) -> Iterator[None]:
    """/proc inside the tree while chrooted tools run: systemd 262's journalctl opens files
    through /proc/self/fd and fails with ENOENT without it (252's did not need it)."""
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    _run(["mount", "-t", "proc", "proc", proc], "mounting /proc in the guest tree")
    try:
        yield
    finally:
        _run(["umount", proc], "unmounting /proc in the guest tree")


def _require_tools(tools: Iterable[str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing host tools: {', '.join(missing)}; install "
                         "tests.vm.qemu.VM_APT_PACKAGES with apt-get")
    if os.geteuid() != 0:
        raise BuildError("building the guest image needs root (debootstrap, chroot)")


# --- base layer -------------------------------------------------------------------------------

def base_key(release: GuestRelease) -> str:
    return content_key([BASE_RECIPE, release.suite, mirror(), *release.packages, *MASKED_UNITS,
                        HOSTNAME, VMM_USER, str(VMM_UID)])


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    target = root / rel.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _mask(root: Path, unit: str) -> None:
    # What `systemctl mask` does, without needing the unit to exist (some are absent in minbase).
    link = root / "etc/systemd/system" / unit
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("/dev/null")


def configure_base(root: Path) -> None:
    """The repository-independent configuration of a fresh debootstrap tree."""
    _write(root, "etc/hostname", HOSTNAME + "\n")
    _write(root, "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n"
                              "::1 localhost ip6-localhost ip6-loopback\n")
    # Empty root password: the guest has no network, and it lets a human debugging an image log
    # in on the console (after unmasking the serial getty) without rebuilding it.
    _chroot(root, ["passwd", "-d", "root"], "clearing root's password")
    # The VM manager stand-in: a system user without a login session, as libvirt-qemu would be.
    _chroot(root, ["useradd", "--system", "--uid", str(VMM_UID), "--user-group",
                   "--home-dir", "/var/lib/vmm", "--create-home", "--shell", "/usr/sbin/nologin",
                   VMM_USER], "creating the vmm user")
    for unit in MASKED_UNITS:
        _mask(root, unit)
    # Keep the journal of earlier boots (the boot chain of a live-update scenario is one run).
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    (root / "mnt/job").mkdir(parents=True, exist_ok=True)
    # What debootstrap downloaded stays in the tree otherwise (~100 MB of .deb files).
    for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def _build_base(entry: Path, release: GuestRelease) -> None:
    _require_tools(["debootstrap", "chroot"])
    tree = entry / "rootfs"
    times: dict[str, float] = {}
    start = time.monotonic()
    # bookworm's debootstrap (1.0.128) bootstraps sid too, and the machine's archive keyring
    # (bookworm's, with the trixie keys) verifies sid's Release file (checked 2026-12-03)
    _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(release.packages),
          release.suite, tree, mirror()], f"debootstrap of {release.suite}")
    times["debootstrap"] = time.monotonic() - start
    start = time.monotonic()
    configure_base(tree)
    times["configure"] = time.monotonic() - start
    (entry / "build.json").write_text(json.dumps(
        {"key": base_key(release), "suite": release.suite, "packages": release.packages,
         "times": times},
        indent=2) + "\n")


def ensure_base_tree(release: GuestRelease) -> BaseTree:
    """The cached base tree, built with debootstrap on a miss (about a minute, needs network)."""
    key = base_key(release)
    entry = ensure_entry("rootfs-base", f"{release.name}-{key}",
                         lambda path: _build_base(path, release),
                         f"the {release.name} base tree (debootstrap {release.suite} from "
                         f"{mirror()})")
    prune("rootfs-base", keep=entry.path, spare=KEEP_BASE_TREES)
    return BaseTree(entry.path / "rootfs", key)


# Older complete entries kept besides the current one: each agent image holds ~400 MB, and
# every change to kho_agent/ makes a new one. A couple stay so that two checkouts (or a test
# still running on an overlay backed by the previous image) do not rebuild each other's.
KEEP_BASE_TREES = 1
KEEP_AGENT_IMAGES = 2


def prune(kind: str, *, keep: Path, spare: int) -> list[Path]:
    """Remove complete entries of ``kind`` of the same release as ``keep`` (the name's part
    before the first ``-``) but ``keep`` and the ``spare`` newest others."""
    directory = keep.parent
    release = keep.name.split("-", 1)[0] + "-"
    others = sorted((p for p in directory.iterdir() if p != keep and p.name.startswith(release)
                     and (p / ".complete").is_file()),
                    key=lambda p: (p / ".complete").stat().st_mtime, reverse=True)
    removed = others[spare:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        (directory / f".{path.name}.lock").unlink(missing_ok=True)
    return removed


# --- host-side wheels ---------------------------------------------------------------------------

def _package_sources() -> list[Path]:
    """The files that make the kho-agent wheel (what the key must cover)."""
    files = [REPO / "pyproject.toml", REPO / "README.md"]
    files += sorted(p for p in (REPO / "kho_agent").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return files


def build_agent_wheel(out: Path) -> Path:
    """Build the kho-agent wheel with the host's /usr/bin/python3 into ``out``.

    The sources are copied to a temporary directory first: building in the checkout would
    write ``build/`` and refresh ``kho_agent.egg-info`` in a tree other people are editing.
    Build isolation is off so that the build needs no network (bookworm's setuptools 66 meets
    the ``setuptools>=61`` build requirement).
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kho-wheel-") as tmp:
        src = Path(tmp) / "src"
        for path in _package_sources():
            target = src / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        _run(["/usr/bin/python3", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "--no-cache-dir", "-q", "-w", out, src], "building the kho-agent wheel")
    wheels = sorted(out.glob("kho_agent-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one kho_agent wheel in {out}, found {wheels}")
    return wheels[0]


def _download_extra_wheels(entry: Path, release: GuestRelease) -> None:
    argv: list[str | Path] = ["/usr/bin/python3", "-m", "pip", "download", "--no-deps",
                              "--only-binary=:all:", "--implementation", "cp",
                              "--python-version", release.python, "--abi", release.abi,
                              "--no-cache-dir",
                              "-q", "-d", entry]
    for platform in WHEEL_PLATFORMS:
        argv += ["--platform", platform]
    _run([*argv, *release.extra_wheels], "downloading the dependency wheels from PyPI")


def ensure_extra_wheels(release: GuestRelease) -> list[Path]:
    """The release's extra wheels for the guest, downloaded once into the cache."""
    if not release.extra_wheels:
        return []  # pip download refuses an empty list of requirements
    key = content_key(["wheels-2", release.python, *release.extra_wheels, *WHEEL_PLATFORMS])
    entry = ensure_entry("wheels", key, lambda path: _download_extra_wheels(path, release))
    wheels = sorted(entry.path.glob("*.whl"))
    if len(wheels) != len(release.extra_wheels):
        raise BuildError(f"the wheel cache {entry.path} has {len(wheels)} wheels for "
                         f"{len(release.extra_wheels)} pins; remove it and run again")
    return wheels


# --- agent layer --------------------------------------------------------------------------------

def _files_digest(files: Iterable[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        rel = str(path.relative_to(base)).encode()
        data = path.read_bytes()
        digest.update(len(rel).to_bytes(8, "little") + rel)
        digest.update(len(data).to_bytes(8, "little") + data)
        digest.update(oct(path.stat().st_mode & 0o7777).encode())
    return digest.hexdigest()


def _data_files() -> list[Path]:
    return sorted(p for d in ("systemd", "etc", "share", "catalog") for p in (REPO / d).rglob("*")
                  if p.is_file())


def _guest_files() -> list[Path]:
    return sorted(p for p in GUEST_DIR.rglob("*") if p.is_file())


def agent_key(release: GuestRelease) -> str:
    """Key of the agent layer: changes with any input, without building anything."""
    return content_key([
        AGENT_RECIPE, base_key(release), IMAGE_SIZE, release.handoff,
        _files_digest(_package_sources(), REPO),
        *release.extra_wheels,
        _files_digest(_data_files(), REPO),
        _files_digest([INSTALL_DATA], REPO),
        _files_digest(_guest_files(), GUEST_DIR),
        _files_digest([Path(__file__)], REPO),
    ])


# Where each file of tests/vm/guest goes in the guest, and its mode.
GUEST_FILE_TARGETS: dict[str, tuple[str, int]] = {
    "fstab": ("/etc/fstab", 0o644),
    "kexec.default": ("/etc/default/kexec", 0o644),
    "kho-test-driver.service": ("/usr/lib/systemd/system/kho-test-driver.service", 0o644),
    "kho-test-driver": ("/usr/local/lib/kho-test/kho-test-driver", 0o755),
    "kho-test-bus-floor": ("/usr/local/lib/kho-test/kho-test-bus-floor", 0o755),
    "kho-test-bus-floor.service": ("/usr/lib/systemd/system/kho-test-bus-floor.service", 0o644),
    "50-kho-agent-vmm.rules": ("/etc/polkit-1/rules.d/50-kho-agent-vmm.rules", 0o644),
}


def install_guest_files(root: Path) -> None:
    """Copy every file of tests/vm/guest to its place (a file without a target is an error)."""
    names = {p.name for p in _guest_files()}
    unknown = sorted(names - GUEST_FILE_TARGETS.keys())
    missing = sorted(GUEST_FILE_TARGETS.keys() - names)
    if unknown or missing:
        raise BuildError(f"tests/vm/guest and GUEST_FILE_TARGETS disagree: without a target "
                         f"{unknown}, missing {missing}")
    for name, (target, mode) in GUEST_FILE_TARGETS.items():
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GUEST_DIR / name, dest)
        dest.chmod(mode)
    # /etc/polkit-1/rules.d itself stays as Debian made it (polkitd:root 0700): polkitd reads
    # the rules as its own user, and a root-owned 0644 file in it is readable to it.


def _install_agent(tree: Path, wheels: list[Path]) -> str:
    wheel_dir = tree / "tmp/kho-wheels"
    wheel_dir.mkdir(parents=True)
    for wheel in wheels:
        shutil.copy2(wheel, wheel_dir)
    # --no-index: the guest has no network and must not need one; pip resolves kho-agent's
    # declared dependencies against what the tree has (Debian's python3-* packages) plus these
    # wheels, and fails if a pin is not met.
    report = _chroot(tree, ["python3", "-m", "pip", "install", "--no-index", "--find-links",
                            "/tmp/kho-wheels", "--break-system-packages", "--no-cache-dir",
                            "--root-user-action=ignore", "kho-agent"],
                     "installing kho-agent with pip inside the guest tree")
    shutil.rmtree(wheel_dir)
    return report


def _build_agent(entry: Path, release: GuestRelease, base: BaseTree, key: str) -> None:
    _require_tools(["chroot", "mkfs.ext4"])
    times: dict[str, float] = {}
    tree = entry / "tree"

    start = time.monotonic()
    _run(["cp", "-a", "--reflink=auto", base.path, tree], "copying the base tree")
    times["copy_base"] = time.monotonic() - start

    start = time.monotonic()
    wheels = ensure_extra_wheels(release)
    times["download_wheels"] = time.monotonic() - start
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kho-agent-wheel-") as tmp:
        agent_wheel = build_agent_wheel(Path(tmp))
        times["build_wheel"] = time.monotonic() - start
        start = time.monotonic()
        pip_report = _install_agent(tree, [agent_wheel, *wheels])
        times["pip_install"] = time.monotonic() - start
        wheel_names = [agent_wheel.name, *(w.name for w in wheels)]

    start = time.monotonic()
    fdstore = ["--fdstore"] if release.handoff == "fdstore" else []
    _run([sys.executable, INSTALL_DATA, "--destdir", tree, "--prefix", "/usr", *fdstore],
         "installing the data files (packaging/install_data.py)")
    install_guest_files(tree)
    with _proc_mounted(tree):
        _chroot(tree, ["journalctl", "--update-catalog"], "updating the journal catalog")
        # The guest's own systemctl (it works offline in a chroot): the guest's systemd
        # version reads the [Install] sections, and the host needs no systemd.
        _chroot(tree, ["systemctl", "enable", "kho-agent.service", "kho-test-driver.service",
                       "kho-test-bus-floor.service"],
                "enabling the units")
    times["install_data"] = time.monotonic() - start

    start = time.monotonic()
    image = entry / IMAGE_NAME
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", tree, image, IMAGE_SIZE],
         "mkfs.ext4 -d (the root image)")
    times["mkfs"] = time.monotonic() - start
    shutil.rmtree(tree)
    info = {"key": key, "base_key": base.key, "release": release.name,
            "handoff": release.handoff, "wheels": wheel_names, "times": times,
            "pip": pip_report.splitlines()[-3:]}
    (entry / "build.json").write_text(json.dumps(info, indent=2) + "\n")


def ensure_guest_image(guest: str = DEFAULT_GUEST) -> GuestImage:
    """The cached root image of ``guest`` (a key of :data:`GUESTS`) with kho-agent installed;
    built on a miss (base first if needed)."""
    release = GUESTS[guest]
    base = ensure_base_tree(release)
    key = agent_key(release)
    entry = ensure_entry("rootfs-agent", f"{release.name}-{key}",
                         lambda path: _build_agent(path, release, base, key),
                         f"the {release.name} guest image (kho-agent from this checkout on the "
                         "base tree)")
    prune("rootfs-agent", keep=entry.path, spare=KEEP_AGENT_IMAGES)
    info = json.loads((entry.path / "build.json").read_text())
    return GuestImage(entry.path / IMAGE_NAME, key, base.key, info, release)


def scratch_copy(image: GuestImage | Path, directory: Path, *, mode: Runner = "qcow2",
                 name: str = "root") -> Path:
    """A private, writable copy of the image in ``directory`` for one run.

    ``qcow2`` (default): a copy-on-write overlay backed by the cached image (instant, a few
    hundred KiB; QEMU opens it by its ``.qcow2`` suffix). ``copy``: a plain raw copy
    (``cp --reflink=auto --sparse=always``), for when the host wants to read the disk back
    with debugfs after the run.
    """
    source = image.path if isinstance(image, GuestImage) else image
    directory.mkdir(parents=True, exist_ok=True)
    if mode == "qcow2":
        target = directory / f"{name}.qcow2"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", source.resolve(),
              target], "creating the qcow2 overlay")
        return target
    target = directory / f"{name}.ext4"
    _run(["cp", "--reflink=auto", "--sparse=always", source, target], "copying the root image")
    return target
