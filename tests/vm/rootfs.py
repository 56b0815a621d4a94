"""The guests' root filesystems: Debian with systemd and kho-agent installed from its Debian
package, one per release in :data:`GUESTS` (bookworm with systemd 252; sid with systemd 262,
where systemd carries the agent's sessions through the kexec).

Two cached layers (``tests/vm/cache.py``), each keyed by everything that goes into it:

1. **base** (``rootfs-base/<release>-<key>``): ``debootstrap --variant=minbase`` of the
   release with the packages the agent and the tests need (the package's Depends and
   Recommends as the release has them, man-db, QEMU for the VM-manager scenario; no pip), plus
   the configuration that does not depend on this repository (hostname, root password, masked
   units that would only add noise or wait for a network, the ``vmm`` user), and SSH access:
   the host keys and a test key pair (ed25519, made with the tree's ``ssh-keygen``; the private
   key is kept in the entry, outside the tree, the public key is root's ``authorized_keys``).
   Keyed by suite, package list and :data:`BASE_RECIPE`; building it takes about a minute and a
   half and needs the Debian archive.
2. **agent** (``rootfs-agent/<release>-<key>``): a copy of the base with kho-agent installed
   the way a host installs it: ``packaging/build_deb.py`` builds ``kho-agent_<version>_all.deb``
   from this checkout on the host (kept in the entry), and ``dpkg -i`` installs it inside the
   tree, so dpkg checks its Depends against what the release has, and the package's
   maintainer scripts do the rest: they enable the service and, where the release's
   ``systemctl --version`` is 261 or newer, link the fdstore drop-in (the build checks that
   the result is the hand-off mode :class:`GuestRelease` expects). Nothing is started: the
   tree has no ``/run/systemd/system``. Then the files of ``tests/vm/guest`` (job-disk mount,
   test driver, polkit rule, ``/etc/default/kexec``), the test units enabled, the fleet's
   network and sshd set up (:func:`configure_fleet_access`: they start only on a kernel command
   line with ``kho_test.ssh=1``), and the tree turned into an ext4 image with ``mkfs.ext4 -d``
   (no loop mount); the base's key pair is copied into the entry (:attr:`GuestImage.ssh_key`).
   Keyed by the base key, everything that goes into the package (:func:`package_inputs`) and
   the guest files, so the slow base is reused when only the agent changes.

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
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import packaging_scripts

from . import progress
from .cache import content_key, ensure_entry

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(__file__).resolve().parent / "guest"

MIRROR_ENV = "KHO_AGENT_TEST_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Bump when the base recipe (debootstrap options, configure_base) changes meaning.
BASE_RECIPE = "base-5"
# Bump when the agent-layer recipe changes meaning.
AGENT_RECIPE = "agent-5"

# packaging/build_deb.py: what the .deb is built from (package_inputs), and from its control
# file, what the build needs on the host (`./quickstart.sh vm` asks it with
# --print-build-deps) and what the package depends on (the guests' packages below).
BUILD_DEB = packaging_scripts.load("build_deb")

# Where the package's postinst links the drop-in of hand-off mode "fdstore" (systemd >= 261).
FDSTORE_DROPIN = "etc/systemd/system/kho-agent.service.d/fdstore.conf"


@dataclass(frozen=True)
class GuestRelease:
    """One Debian release the suite builds a guest of: everything that differs between them."""

    name: str                      # the guest's name in test ids ("bookworm", "sid")
    suite: str                     # debootstrap's suite
    packages: tuple[str, ...]      # debootstrap --include
    # The hand-off mode the package sets up on this release: "fdstore" where its systemd is
    # 261 or newer (the postinst links the drop-in), "direct" below.
    handoff: str
    # The digest algorithm the agent takes: "blake3" where python3-blake3 is installed.
    digest_alg: str


# What the agent imports and runs, as Debian packages: the Depends of packaging/debian/control
# and its Recommends (read from it: guest_packages()) as far as the release has them
# (python3-blake3 only in sid), python3 for its ${python3:Depends}. polkit is split since
# bookworm: `polkitd` (a Recommends) is the daemon with the JavaScript rules engine (and
# pkcheck/pkaction), `pkexec` only the setuid tool, which the guest does not need. polkitd
# depends on the virtual package default-logind, which debootstrap cannot resolve:
# libpam-systemd provides it. For the tests: python3-pydbus (their D-Bus client), man-db (`man
# kho-agentctl` on an installed host), procps for debugging a failed run (ps, pgrep),
# qemu-system-x86 the VM manager's QEMU (jobs/vmm_qemu.py, TCG inside the guest),
# openssh-server for the fleet (tests/vm/fleet.py: Ansible over SSH), with the SFTP server that
# Ansible copies its modules through (a Depends of openssh-server, named because debootstrap
# does not install Recommends and a split of the package would drop it silently). No pip: a
# host runs the agent on Debian's own Python packages.
_SYSTEM_PACKAGES: tuple[str, ...] = ("systemd-sysv", "udev", "libpam-systemd", "python3")
_TEST_PACKAGES: tuple[str, ...] = (
    "python3-pydbus", "man-db", "iproute2", "procps", "qemu-system-x86",
    "openssh-server", "openssh-sftp-server",
)


def guest_packages(*, lacking: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """debootstrap's --include for a release: the system, the package's Depends and
    Recommends but those the release `lacking` has not, the tests' packages, `extra`."""
    package = [name for field in ("Depends", "Recommends")
               for name in BUILD_DEB.binary_relations(field) if name not in lacking]
    return tuple(dict.fromkeys((*_SYSTEM_PACKAGES, *package, *_TEST_PACKAGES, *extra)))


GUESTS: dict[str, GuestRelease] = {
    # Debian 12: systemd 252 (before LUO: hand-off mode "direct"), Python 3.11, QEMU 7.2,
    # PyGObject 3.42.2, systemd-python 235, pyroute2 0.7.2, zstandard 0.20, lz4 4.0.2; no
    # python3-blake3, so the agent digests with SHA-256. python3-cffi-backend: bookworm's
    # python3-zstandard depends on the virtual python3-cffi-backend-api-{min,max}, which
    # debootstrap cannot resolve (it fails configuring the base).
    "bookworm": GuestRelease(
        name="bookworm", suite="bookworm",
        packages=guest_packages(lacking=("python3-blake3",), extra=("python3-cffi-backend",)),
        handoff="direct", digest_alg="sha256"),
    # Debian unstable, what the next release will be: systemd 262 (carries fd stores through
    # LUO: hand-off mode "fdstore"), Python 3.14, QEMU 11.1, PyGObject 3.58, python3-blake3
    # (read 2026-12-03).
    "sid": GuestRelease(
        name="sid", suite="sid", packages=guest_packages(),
        handoff="fdstore", digest_alg="blake3"),
}
DEFAULT_GUEST = "bookworm"

HOSTNAME = "kho-guest"
VMM_USER = "vmm"
VMM_UID = 990
IMAGE_SIZE = "4G"  # room for the real-VMM scenario's VM saved whole (1 GiB)
IMAGE_NAME = "rootfs.ext4"
ROOT_LABEL = "khoroot"

# Timers and services that would want a network, run maintenance at random times under the
# tests, or put a login prompt between the framed lines on the serial console. Not
# systemd-networkd itself: the fleet's guests get their address from it (configure_fleet_access;
# it starts only where the kernel command line asks for it); nothing waits for it to be online.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
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
    ssh_key: Path          # the test key pair's private half (its .pub beside it), not in the tree


@dataclass(frozen=True)
class GuestImage:
    """The cached ext4 image of the guest's root filesystem (read-only: boot a scratch copy)."""

    path: Path
    key: str
    base_key: str
    # What went into the agent layer, as recorded at build time (the .deb, dpkg's output,
    # timings).
    info: dict[str, object]
    release: GuestRelease
    # The private key root's authorized_keys in the image accepts (ed25519, mode 0600, made at
    # the base's build; the .pub beside it): ssh -i it, as tests/vm/fleet.py does.
    ssh_key: Path


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


# Where the base entry keeps the test key pair (beside the tree, never in it) and the name the
# agent entry copies it under.
SSH_KEY_DIR = "ssh"
SSH_KEY_NAME = "id_ed25519"
SSH_KEY_COMMENT = "kho-agent-test"


def make_ssh_access(root: Path, key_dir: Path) -> None:
    """The host keys of the tree's sshd and the test key pair: the private key goes to
    ``key_dir`` (mode 0600), the public key to root's authorized_keys.

    Made with the tree's own ``ssh-keygen`` (openssh-client comes with openssh-server), so the
    build needs no SSH on the host. openssh-server's postinst makes the host keys already;
    ``ssh-keygen -A`` makes whichever are missing, and the check below says if none came.
    Every guest of an image shares these keys: they are test keys of a test image, and the
    fleet's ssh does not check host keys (tests/vm/fleet.py).
    """
    _chroot(root, ["ssh-keygen", "-A"], "making the guest's SSH host keys")
    if not (root / "etc/ssh/ssh_host_ed25519_key").is_file():
        raise BuildError(f"no /etc/ssh/ssh_host_ed25519_key in {root} after ssh-keygen -A")
    inside = Path("/tmp") / SSH_KEY_NAME
    made = root / inside.relative_to("/")
    _chroot(root, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", SSH_KEY_COMMENT,
                   "-f", str(inside)], "making the test SSH key pair")
    key_dir.mkdir(parents=True, exist_ok=True)
    key_dir.chmod(0o700)
    for suffix in ("", ".pub"):
        shutil.move(str(made) + suffix, key_dir / (SSH_KEY_NAME + suffix))
    (key_dir / SSH_KEY_NAME).chmod(0o600)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    ssh_dir.chmod(0o700)
    _write(root, "root/.ssh/authorized_keys",
           (key_dir / (SSH_KEY_NAME + ".pub")).read_text(), mode=0o600)


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
    start = time.monotonic()
    make_ssh_access(tree, entry / SSH_KEY_DIR)
    times["ssh_keys"] = time.monotonic() - start
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
    return BaseTree(entry.path / "rootfs", key, entry.path / SSH_KEY_DIR / SSH_KEY_NAME)


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


# --- the package -------------------------------------------------------------------------------

def package_inputs() -> list[Path]:
    """The files the .deb is built from, the very list build_deb.py copies into its build tree
    (package_files): what the agent layer's key covers."""
    return sorted(path for path in (REPO / relative for relative in BUILD_DEB.package_files(REPO))
                  if path.is_file())


def build_package(out: Path) -> Path:
    """Build kho-agent's .deb from this checkout into ``out`` (packaging/build_deb.py: a
    temporary copy of what the package is built from, dpkg-buildpackage with Debian's python3)."""
    progress.REPORTER.step("building the kho-agent .deb (packaging/build_deb.py)")
    try:
        return Path(BUILD_DEB.build_deb(out, REPO, log=out / "build-deb.log"))
    except BUILD_DEB.BuildError as exc:
        raise BuildError(f"building the .deb failed: {exc} (host build tools: apt-get install "
                         f"{' '.join(BUILD_DEB.build_depends())})") from exc


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


def _guest_files() -> list[Path]:
    return sorted(p for p in GUEST_DIR.rglob("*") if p.is_file())


def agent_key(release: GuestRelease) -> str:
    """Key of the agent layer: changes with any input, without building anything."""
    return content_key([
        AGENT_RECIPE, base_key(release), IMAGE_SIZE, release.handoff,
        _files_digest(package_inputs(), REPO),
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


# The kernel command line word that turns the guest's network and sshd on (tests/vm/fleet.py
# boots its guests with it; kho-agent gives the next kernel the running one's command line, so
# it stays through every live update). Every other run boots without it and without a NIC:
# those units would start for nothing and slow each boot under TCG.
FLEET_CMDLINE = "kho_test.ssh=1"
# What `systemctl enable systemd-networkd.service ssh.service` turns on, on both releases (read
# from the images 2026-12-04; the names of units a release lacks are harmless drop-ins).
FLEET_UNITS: tuple[str, ...] = (
    "ssh.service", "systemd-networkd.service", "systemd-networkd.socket",
    "systemd-network-generator.service", "systemd-networkd-persistent-storage.service",
    "systemd-networkd-varlink.socket", "systemd-networkd-varlink-metrics.socket",
    "systemd-networkd-resolve-hook.socket",
)
FLEET_DROPIN = f"""# tests/vm/rootfs.py: only in the fleet's guests (tests/vm/fleet.py)
[Unit]
ConditionKernelCommandLine={FLEET_CMDLINE}
"""
# QEMU's user-mode network (slirp) answers DHCP on its virtio NIC; no IPv6, nothing waits.
FLEET_NETWORK = """# tests/vm/rootfs.py: the fleet guest's NIC (QEMU user-mode network) by DHCP
[Match]
Type=ether

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""
# Key logins only (root's authorized_keys holds the test key; root's password is empty, which
# sshd refuses anyway), and no reverse lookup of the forwarded 10.0.2.2 at every login.
FLEET_SSHD = """# tests/vm/rootfs.py: the fleet's sshd (included before the settings of sshd_config)
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""


def configure_fleet_access(root: Path) -> None:
    """The network and sshd of the fleet's guests, on only with :data:`FLEET_CMDLINE`."""
    _write(root, "etc/systemd/network/20-kho-test-dhcp.network", FLEET_NETWORK)
    _write(root, "etc/ssh/sshd_config.d/kho-test.conf", FLEET_SSHD)
    for unit in FLEET_UNITS:
        _write(root, f"etc/systemd/system/{unit}.d/kho-test-fleet.conf", FLEET_DROPIN)


def _install_package(tree: Path, deb: Path) -> str:
    """``dpkg -i`` the .deb inside the tree; returns dpkg's output (the maintainer scripts')."""
    # The maintainer scripts start or restart the service only where systemd runs
    # (/run/systemd/system, as debhelper's snippets and deb-systemd-invoke test it): never in
    # the tree, whose /run is its own and empty.
    if (tree / "run/systemd/system").exists():
        raise BuildError(f"{tree}/run/systemd/system exists: the package's postinst would try "
                         "to start kho-agent.service from the chroot")
    inside = Path("/tmp") / deb.name
    shutil.copy2(deb, tree / inside.relative_to("/"))
    try:
        # No network and no apt lists in the tree: dpkg fails if the base lacks a Depends,
        # which is the check that the package installs on this release as it is.
        return _chroot(tree, ["dpkg", "-i", str(inside)],
                       "installing the kho-agent .deb inside the guest tree (dpkg -i)")
    finally:
        (tree / inside.relative_to("/")).unlink()


def _check_installed(tree: Path, release: GuestRelease) -> None:
    """What the maintainer scripts did, as this release needs it: the service enabled, the
    fdstore drop-in linked where (and only where) the release's systemd carries fd stores."""
    wants = tree / "etc/systemd/system/multi-user.target.wants/kho-agent.service"
    if not wants.is_symlink():
        raise BuildError(f"the package did not enable kho-agent.service: no {wants}")
    dropin = tree / FDSTORE_DROPIN
    linked = dropin.is_symlink() and (tree / os.readlink(dropin).lstrip("/")).is_file()
    if linked != (release.handoff == "fdstore"):
        raise BuildError(f"{release.name} needs hand-off mode {release.handoff}, but the "
                         f"package's postinst {'linked' if linked else 'did not link'} "
                         f"/{FDSTORE_DROPIN} (it links it on systemd >= 261)")


def _build_agent(entry: Path, release: GuestRelease, base: BaseTree, key: str) -> None:
    _require_tools(["chroot", "mkfs.ext4"])
    times: dict[str, float] = {}
    tree = entry / "tree"

    start = time.monotonic()
    _run(["cp", "-a", "--reflink=auto", base.path, tree], "copying the base tree")
    times["copy_base"] = time.monotonic() - start

    start = time.monotonic()
    deb = build_package(entry)
    times["build_deb"] = time.monotonic() - start

    start = time.monotonic()
    # /proc: the triggers dpkg runs (systemd's journalctl --update-catalog on sid) need it
    with _proc_mounted(tree):
        dpkg_output = _install_package(tree, deb)
        _check_installed(tree, release)
        times["dpkg_install"] = time.monotonic() - start
        start = time.monotonic()
        install_guest_files(tree)
        configure_fleet_access(tree)
        # The guest's own systemctl (it works offline in a chroot): the guest's systemd
        # version reads the [Install] sections, and the host needs no systemd.
        _chroot(tree, ["systemctl", "enable", "kho-test-driver.service",
                       "kho-test-bus-floor.service", "systemd-networkd.service",
                       "ssh.service"], "enabling the test units, networkd and sshd")
    times["guest_files"] = time.monotonic() - start
    key_dir = entry / SSH_KEY_DIR
    key_dir.mkdir(mode=0o700)
    for suffix in ("", ".pub"):
        shutil.copy2(str(base.ssh_key) + suffix, key_dir / (SSH_KEY_NAME + suffix))

    start = time.monotonic()
    image = entry / IMAGE_NAME
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", tree, image, IMAGE_SIZE],
         "mkfs.ext4 -d (the root image)")
    times["mkfs"] = time.monotonic() - start
    shutil.rmtree(tree)
    info = {"key": key, "base_key": base.key, "release": release.name,
            "handoff": release.handoff, "deb": deb.name, "times": times,
            "dpkg": dpkg_output.splitlines()}
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
    return GuestImage(entry.path / IMAGE_NAME, key, base.key, info, release,
                      entry.path / SSH_KEY_DIR / SSH_KEY_NAME)


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
