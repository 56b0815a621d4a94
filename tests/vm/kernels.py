"""Real KHO/LUO kernels for the VM suite: built from Debian's kernel source packages, cached.

Debian's stock kernels do not enable KHO, but its archive carries the kernel source as packages
(``linux-source-7.2`` in sid, ``linux-source-7.3`` in experimental). This module downloads one,
builds a trimmed x86-64 bzImage with the fragment ``kho-guest.config`` beside this file, and
keeps the result in the test cache (``cache.py``; ``/var/cache/kho-agent-tests`` by default)::

    <cache>/apt/                          the private apt configuration (below)
    <cache>/debs/<package>_<version>/     downloaded .deb files, one per entry
    <cache>/kernels/<series>-<version>-<key>/
        bzImage  config  kernelrelease  build-log-tail.txt  build-info.json
    <cache>/stock-kernels/<package>_<version>/
        vmlinuz-<release>  config-<release>  build-info.json
    <cache>/logs/                         full logs of failed builds

Build: ``make x86_64_defconfig``, the fragment merged with ``scripts/kconfig/merge_config.sh``,
``make olddefconfig``, then a check that every option of the fragment came out as asked (the
build stops with the list of those that did not, and whether the name exists in the tree's
Kconfig at all), ``make -j<cpus> bzImage``. The fragment also leaves out hardware a QEMU guest
never has (DRM, sound, USB, wireless, NICs, ...). Measured on 2 shared cores (2026-11-21):
``make bzImage`` 549 s for 7.3-rc7 and 609 s for 7.2.13 (bzImage ~10.0 MiB each), download
(166 MB) 3-6 s, unpacking ~17 s, configuring ~6 s; a cached kernel is found in ~0.6 s.

A kernel entry is keyed by the source package's version, the SHA-256 of the fragment and
``RECIPE_VERSION`` (bump it when the build steps change). The source tree is deleted after the
build; only the artefacts stay.

Which kernel is which
---------------------
``primary_kernel()`` is the kernel every guest boots and the target of same-kernel live updates:
by default the 7.3 build (the newest, ``PRIMARY_SERIES``). ``next_kernel()`` is the *second*
kernel, the other version for the cross-version scenario: by default the 7.2 build
(``NEXT_SERIES``). Issue 5's cross-version scenario boots the guest on next (7.2.13) and
live-updates it into primary (7.3-rc7); both speak the same formats, so the other direction must
work too, and which one a scenario runs is the scenario's choice.

Overrides, for a user's own kernels (nothing is downloaded or built then):
``KHO_AGENT_TEST_KERNEL=/path/bzImage`` replaces primary ("7.3"),
``KHO_AGENT_TEST_KERNEL_NEXT=/path/bzImage`` replaces next ("7.2"). The release is read from the
image itself (``kho_agent.kernel.image``); a ``.config`` or ``config-<release>`` beside the image
is used, if present, to check that KHO and LUO are enabled.

``ensure_stock_debian_kernel()`` is Debian's own 7.2 image from sid (no KHO): a refusal target
that prepare must refuse. It is downloaded and extracted, never booted.

The private apt configuration
-----------------------------
Downloads never touch the machine's apt setup: ``<cache>/apt/apt.conf`` (passed with ``-c``)
points ``Dir::State``, ``Dir::Cache`` and every ``Dir::Etc`` list (sources, source parts,
preferences, trusted parts) at ``<cache>/apt``, and its sources list names only Debian ``sid``
and ``experimental`` (main, amd64). The machine's ``apt.conf.d`` still applies: that is where
its network settings live (on our machines it also turns off the ``Valid-Until`` date check,
because the mirror serves a frozen archive; signature checking stays on).

Signature verification stays ON. Every source line carries ``signed-by=`` with the keyrings
below, ``Dir::Etc::TrustedParts`` is an empty private directory (so no other key the machine
trusts is accepted), and ``Acquire::AllowInsecureRepositories`` is false. ``apt-get download``
checks every .deb against the hash in the signed index.

Which keys: bookworm's ``debian-archive-keyring`` (2023.3+deb12u2) holds the bookworm and trixie
archive keys, and sid's and experimental's ``InRelease`` files are signed by both (checked on
2026-11-21 with gpgv: "Debian Archive Automatic Signing Key (12/bookworm)" and "(13/trixie)"),
so the machine's keyring verifies them as it is. When a later archive drops those keys,
``apt-get update`` fails with NO_PUBKEY; then, and only then, this module fetches the newer
``debian-archive-keyring`` .deb from ``trixie``/``bookworm-backports``, suites the machine's
keyring *can* verify (so the new keyring arrives through a verified chain: bookworm key ->
signed Release -> Packages hash -> .deb), stores its keyring in ``<cache>/apt/keyrings`` and adds
it to ``signed-by``. If sid still does not verify, the download fails with a message saying so;
verification is never turned off. ``python -m tests.vm.kernels keyring`` runs that step alone.

Command line (warms the cache; prints what it did and how long it took)::

    python -m tests.vm.kernels build 7.2 7.3 stock
    python -m tests.vm.kernels update      # refresh the private apt lists
    python -m tests.vm.kernels keyring     # fetch the newer archive keyring (see above)
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kho_agent.kernel.image import ImageError, read_image

from . import progress
from .cache import cache_root, content_key, ensure_entry

# Bump when the build steps change in a way that changes the result (a new entry, not a stale hit).
RECIPE_VERSION = "1"
FRAGMENT = Path(__file__).with_name("kho-guest.config")

# What `make bzImage` of the source packages needs on a Debian machine (CI installs these).
BUILD_APT_PACKAGES: tuple[str, ...] = (
    "build-essential", "bc", "bison", "flex", "libelf-dev", "libssl-dev", "dwarves", "cpio",
    "xz-utils", "python3",
)

MIRROR_ENV = "KHO_AGENT_TEST_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
JOBS_ENV = "KHO_AGENT_TEST_JOBS"
SUITES: tuple[str, ...] = ("sid", "experimental")
ARCH = "amd64"
SYSTEM_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Suites the machine's (bookworm) keyring can verify, to fetch a newer keyring from.
KEYRING_SUITES: tuple[str, ...] = ("trixie", "bookworm-backports")
KEYRING_PACKAGE = "debian-archive-keyring"
# apt's words for "this index is not signed by a key you trust".
SIGNATURE_FAILURES = ("NO_PUBKEY", "EXPKEYSIG", "KEYEXPIRED", "is not signed",
                      "signatures couldn't be verified", "Signature by key")

PRIMARY_SERIES = "7.3"
NEXT_SERIES = "7.2"
PRIMARY_ENV = "KHO_AGENT_TEST_KERNEL"
NEXT_ENV = "KHO_AGENT_TEST_KERNEL_NEXT"
OVERRIDE_ENV = {PRIMARY_SERIES: PRIMARY_ENV, NEXT_SERIES: NEXT_ENV}
STOCK_SERIES = "7.2"

# What a user-supplied kernel must have for the suite to mean anything (checked when its config
# is found beside the image).
ESSENTIAL_OPTIONS = ("KEXEC_FILE", "KEXEC_HANDOVER", "LIVEUPDATE", "LIVEUPDATE_MEMFD")

LOG_TAIL_LINES = 40          # in an error message
KEPT_LOG_LINES = 200         # in the cache entry


@dataclass(frozen=True)
class SourcePackage:
    series: str
    package: str
    suite: str


SOURCES: dict[str, SourcePackage] = {
    "7.2": SourcePackage("7.2", "linux-source-7.2", "sid"),
    "7.3": SourcePackage("7.3", "linux-source-7.3", "experimental"),
}


@dataclass(frozen=True)
class KernelImage:
    """A bootable kernel for the guests."""

    path: Path             # the bzImage
    release: str           # `uname -r` it will report
    series: str            # "7.3", "7.2", ...
    config: Path | None    # its .config, when known
    source: str            # "built from linux-source-7.3 7.3~rc7-1~exp1" or "KHO_AGENT_TEST_KERNEL"


class KernelSetupError(Exception):
    """A kernel could not be downloaded or built: what failed, the log's end, what to do."""

    def __init__(self, what: str, log_tail: str = "", advice: str | None = None) -> None:
        self.what = what
        self.log_tail = log_tail
        self.advice = advice if advice is not None else (
            f"fix the cause above and run `python -m tests.vm.kernels build` again, or use a "
            f"kernel of your own: {PRIMARY_ENV}=/path/bzImage (and {NEXT_ENV}= for the second)")
        super().__init__(what)

    def __str__(self) -> str:
        parts = [self.what]
        if self.log_tail:
            parts.append("last lines of the log:\n" + _indent(self.log_tail))
        parts.append("what to do: " + self.advice)
        return "\n".join(parts)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


# --- config fragments and .config files ---------------------------------------------------------

_ASSIGN = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_VALUE = re.compile(r'^(y|m|n|-?[0-9]+|0x[0-9a-fA-F]+|"(?:[^"\\]|\\.)*")$')


def parse_fragment(text: str) -> dict[str, str]:
    """``{"KEXEC_HANDOVER": "y", ...}`` from a fragment (CONFIG_X=value lines, # comments).

    ``# CONFIG_X is not set`` asks for "n". Anything else is an error with its line number, and
    so is an option given twice (which of two values kconfig keeps is not worth guessing).
    """
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        not_set = _NOT_SET.match(line)
        if not_set:
            name, value = not_set.group(1), "n"
        elif not line or line.startswith("#"):
            continue
        else:
            assign = _ASSIGN.match(line)
            if not assign or not _VALUE.match(assign.group(2)):
                raise ValueError(f"line {number}: {raw!r} is not CONFIG_NAME=value "
                                 "(y, m, n, a number or a quoted string; comments on their "
                                 "own lines)")
            name, value = assign.group(1), assign.group(2)
        short = name.removeprefix("CONFIG_")
        if short in options:
            raise ValueError(f"line {number}: {name} is given twice")
        options[short] = value
    return options


def parse_dotconfig(text: str) -> dict[str, str]:
    """A kernel .config as ``{name: value}``; ``# CONFIG_X is not set`` reads as "n"."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        not_set = _NOT_SET.match(line)
        if not_set:
            values[not_set.group(1).removeprefix("CONFIG_")] = "n"
            continue
        assign = _ASSIGN.match(line)
        if assign:
            values[assign.group(1).removeprefix("CONFIG_")] = assign.group(2)
    return values


@dataclass(frozen=True)
class OptionMismatch:
    """A fragment option that did not come out of olddefconfig as asked."""

    name: str
    wanted: str
    got: str | None          # None: absent from .config (unmet dependency or no such option)
    known: bool | None       # the name exists in the tree's Kconfig; None when not checked

    def describe(self) -> str:
        if self.known is False:
            return f"CONFIG_{self.name}: no such option in this kernel's Kconfig"
        got = "absent (a dependency is not met)" if self.got is None else self.got
        return f"CONFIG_{self.name}: asked {self.wanted}, got {got}"


def option_mismatches(wanted: dict[str, str], final: dict[str, str],
                      known_symbols: set[str] | None = None) -> list[OptionMismatch]:
    """Every option of ``wanted`` that ``final`` (a parsed .config) does not have as asked.

    An option asked "n" is satisfied by "n" or by its absence (kconfig omits invisible options).
    """
    mismatches = []
    for name, value in wanted.items():
        got = final.get(name)
        if got == value or (value == "n" and got is None):
            continue
        known = None if known_symbols is None else name in known_symbols
        mismatches.append(OptionMismatch(name, value, got, known))
    return mismatches


_KCONFIG_SYMBOL = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$", re.MULTILINE)


def kconfig_symbols(tree: Path) -> set[str]:
    """Every symbol a ``config``/``menuconfig`` entry defines in the tree's Kconfig files."""
    symbols: set[str] = set()
    for path in tree.rglob("Kconfig*"):
        if path.is_file():
            symbols.update(_KCONFIG_SYMBOL.findall(path.read_text(errors="replace")))
    return symbols


def fragment_text() -> str:
    return FRAGMENT.read_text()


def kernel_cache_name(source: SourcePackage, version: str, fragment: str) -> str:
    """The cache entry name of a build: readable prefix, key over everything that shapes it."""
    key = content_key([RECIPE_VERSION, source.package, version,
                       hashlib.sha256(fragment.encode()).hexdigest()])
    return f"{source.series}-{_safe(version)}-{key}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def series_of(release: str) -> str:
    """"7.3" from "7.3.0-rc7", "7.2" from "7.2.13+deb14-amd64"."""
    match = re.match(r"^(\d+)\.(\d+)", release)
    if not match:
        raise ValueError(f"{release!r} is not a kernel release (major.minor...)")
    return f"{match.group(1)}.{match.group(2)}"


# --- the private apt configuration ----------------------------------------------------------------

def apt_config_text(root: Path) -> str:
    """apt.conf for downloads: every state, cache and Dir::Etc path under ``root``."""
    lines = [
        "// kho-agent VM suite: a private apt used only to download; the machine's sources,",
        "// state and trusted keys are not used. Written by tests/vm/kernels.py.",
        f'Dir::State "{root}/state";',
        f'Dir::State::Lists "{root}/state/lists";',
        f'Dir::State::status "{root}/state/status";',
        f'Dir::Cache "{root}/cache";',
        f'Dir::Cache::Archives "{root}/cache/archives";',
        f'Dir::Etc::SourceList "{root}/sources.list";',
        f'Dir::Etc::SourceParts "{root}/sources.list.d";',
        f'Dir::Etc::Preferences "{root}/preferences";',
        f'Dir::Etc::PreferencesParts "{root}/preferences.d";',
        # Never created: with signed-by on every source only those keyrings count, and this
        # keeps the machine's legacy /etc/apt/trusted.gpg out of it even for apt-key users.
        f'Dir::Etc::Trusted "{root}/trusted.gpg";',
        f'Dir::Etc::TrustedParts "{root}/trusted.gpg.d";',
        f'APT::Architecture "{ARCH}";',
        f'APT::Architectures {{ "{ARCH}"; }};',
        'Acquire::Languages "none";',
        # Stated here although they are apt's defaults: this configuration must never trust an
        # unsigned or badly signed index, whatever a machine's apt.conf.d says.
        'Acquire::AllowInsecureRepositories "false";',
        'Acquire::AllowDowngradeToInsecureRepositories "false";',
        'Acquire::AllowWeakRepositories "false";',
        'APT::Get::AllowUnauthenticated "false";',
    ]
    return "\n".join(lines) + "\n"


def apt_sources_text(mirror: str, suites: Sequence[str], keyrings: Sequence[Path]) -> str:
    if not keyrings:
        raise ValueError("a source needs at least one keyring: verification is never off")
    signed_by = ",".join(str(path) for path in keyrings)
    return "".join(f"deb [arch={ARCH} signed-by={signed_by}] {mirror} {suite} main\n"
                   for suite in suites)


def parse_policy_candidate(text: str) -> str | None:
    """The ``Candidate:`` version of ``apt-cache policy PKG`` output, None for (none)/absent."""
    match = re.search(r"^\s*Candidate:\s*(\S+)\s*$", text, re.MULTILINE)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def signature_failed(output: str) -> bool:
    return any(marker in output for marker in SIGNATURE_FAILURES)


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class PrivateApt:
    """apt-get/apt-cache run against a private configuration under ``root``."""

    def __init__(self, root: Path, mirror: str, suites: Sequence[str],
                 keyrings: Sequence[Path]) -> None:
        self.root = root
        self.mirror = mirror
        self.suites = tuple(suites)
        self.keyrings = tuple(keyrings)

    @property
    def config(self) -> Path:
        return self.root / "apt.conf"

    def setup(self) -> None:
        for sub in ("state/lists/partial", "cache/archives/partial", "sources.list.d",
                    "preferences.d", "trusted.gpg.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "state/status").touch()
        _write_if_changed(self.config, apt_config_text(self.root))
        _write_if_changed(self.root / "sources.list",
                          apt_sources_text(self.mirror, self.suites, self.keyrings))

    @contextmanager
    def locked(self) -> Iterator[None]:
        # apt fails instead of waiting when its lists are locked: serialize our own runs.
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def run(self, tool: str, args: Sequence[str], cwd: Path | None = None) -> tuple[int, str]:
        cmd = [tool, "-c", str(self.config), *args]
        env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, check=False)
        except FileNotFoundError as exc:
            raise KernelSetupError(f"{tool} is not installed",
                                   advice="run this on a Debian machine (apt-get and "
                                          "apt-cache are needed to download)") from exc
        return proc.returncode, proc.stdout

    def has_lists(self) -> bool:
        lists = self.root / "state/lists"
        return all(any(lists.glob(f"*_dists_{suite}_InRelease")) for suite in self.suites)

    def update(self) -> tuple[bool, str]:
        """``apt-get update``; (ok, output)."""
        code, out = self.run("apt-get", ["-q", "update"])
        # apt-get update may exit 0 after a W: for a source it could not verify: look at both.
        ok = code == 0 and not signature_failed(out) and self.has_lists()
        return ok, out

    def candidate(self, package: str) -> str | None:
        code, out = self.run("apt-cache", ["policy", package])
        return parse_policy_candidate(out) if code == 0 else None

    def package_names(self, prefix: str) -> list[str]:
        code, out = self.run("apt-cache", ["pkgnames", prefix])
        return sorted(out.split()) if code == 0 else []

    def download(self, package: str, version: str, dest: Path) -> Path:
        """``apt-get download PKG=VERSION`` into ``dest``; the .deb's path."""
        owner = dest.stat().st_uid
        _give_to_apt_sandbox(dest)
        try:
            code, out = self.run("apt-get", ["-q", "download", f"{package}={version}"],
                                 cwd=dest)
        finally:
            if os.geteuid() == 0:
                os.chown(dest, owner, -1)
        debs = sorted(dest.glob("*.deb"))
        if code != 0 or len(debs) != 1:
            raise KernelSetupError(f"downloading {package} {version} with the private apt "
                                   f"configuration ({self.config}) failed", _tail(out))
        return debs[0]


def _give_to_apt_sandbox(directory: Path) -> None:
    # apt downloads as the unprivileged _apt user; a directory it cannot write makes it fall
    # back to downloading as root (with a warning). Let it write there instead.
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam("_apt").pw_uid
    except KeyError:
        return
    os.chown(directory, uid, -1)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def _mirror() -> str:
    return os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR


def _apt_root() -> Path:
    return cache_root() / "apt"


def _bootstrapped_keyring() -> Path:
    return _apt_root() / "keyrings" / "debian-archive-keyring.gpg"


def trusted_keyrings() -> list[Path]:
    """The machine's archive keyring, plus the newer one if it was ever fetched."""
    keyrings = [SYSTEM_KEYRING]
    if _bootstrapped_keyring().is_file():
        keyrings.append(_bootstrapped_keyring())
    return keyrings


def _main_apt() -> PrivateApt:
    apt = PrivateApt(_apt_root(), _mirror(), SUITES, trusted_keyrings())
    apt.setup()
    return apt


def bootstrap_keyring() -> Path:
    """Fetch the newest ``debian-archive-keyring`` from suites the machine's keyring verifies.

    The trust chain stays intact: the machine's keyring verifies the trixie/bookworm-backports
    Release files, whose Packages index pins the .deb's hash. Returns the stored keyring.
    """
    apt = PrivateApt(cache_root() / "apt-keyring", _mirror(), KEYRING_SUITES, [SYSTEM_KEYRING])
    apt.setup()
    with apt.locked():
        ok, out = apt.update()
        if not ok:
            raise KernelSetupError(
                f"apt-get update of {', '.join(KEYRING_SUITES)} (to fetch a newer "
                f"{KEYRING_PACKAGE}) failed", _tail(out),
                advice=f"install a newer {KEYRING_PACKAGE} on this machine, or check the "
                       f"network and the mirror ({MIRROR_ENV})")
        version = apt.candidate(KEYRING_PACKAGE)
        if version is None:
            raise KernelSetupError(f"{KEYRING_PACKAGE} is not in {', '.join(KEYRING_SUITES)}")
        work = apt.root / "download"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            deb = apt.download(KEYRING_PACKAGE, version, work)
            _run(["dpkg-deb", "-x", str(deb), str(work / "x")], None, None,
                 f"unpacking {deb.name}")
            found = [work / "x/usr/share/keyrings" / name
                     for name in ("debian-archive-keyring.pgp", "debian-archive-keyring.gpg")]
            keyring = next((path for path in found if path.is_file()), None)
            if keyring is None:
                raise KernelSetupError(f"{deb.name} has no usr/share/keyrings/"
                                       "debian-archive-keyring.{pgp,gpg}")
            target = _bootstrapped_keyring()
            target.parent.mkdir(parents=True, exist_ok=True)
            # apt (bookworm) recognises binary keyrings by the .gpg suffix; .pgp is the same format.
            shutil.copyfile(keyring, target.with_name(target.name + ".tmp"))
            target.with_name(target.name + ".tmp").replace(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def update_lists() -> PrivateApt:
    """Refresh the private lists of sid and experimental, verified (fetching keys if needed)."""
    apt = _main_apt()
    with apt.locked():
        ok, out = apt.update()
    if not ok and signature_failed(out) and not _bootstrapped_keyring().is_file():
        bootstrap_keyring()
        apt = _main_apt()
        with apt.locked():
            ok, out = apt.update()
    if not ok:
        why = ("the archive's signatures could not be verified with the keyrings "
               f"{', '.join(map(str, apt.keyrings))}" if signature_failed(out)
               else "apt-get update failed")
        raise KernelSetupError(f"{why} (private apt configuration {apt.config}, suites "
                               f"{', '.join(SUITES)})", _tail(out))
    return apt


def _ready_apt() -> tuple[PrivateApt, bool]:
    """The private apt with lists present; True when this call fetched them."""
    apt = _main_apt()
    if apt.has_lists():
        return apt, False
    return update_lists(), True


# --- running build steps --------------------------------------------------------------------------

def _run(cmd: Sequence[str], cwd: Path | None, log: Path | None, what: str,
         env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; its output goes to ``log`` (appended) or is returned. Failure raises."""
    full_env = dict(os.environ, LC_ALL="C", **(env or {}))
    progress.REPORTER.step(what, log)
    try:
        if log is not None:
            with log.open("a") as handle:
                handle.write(f"\n$ {' '.join(cmd)}\n")
                handle.flush()
                code = progress.wait(subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=handle,
                                                      stderr=subprocess.STDOUT))
            output = ""
            tail = _tail(log.read_text(errors="replace"))
        else:
            proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            output = progress.communicate(proc)
            code, tail = proc.returncode, _tail(output)
    except FileNotFoundError as exc:
        raise KernelSetupError(
            f"{what}: {cmd[0]} is not installed",
            advice="install the build dependencies: apt-get install "
                   + " ".join(BUILD_APT_PACKAGES)) from exc
    if code != 0:
        raise KernelSetupError(f"{what} failed (exit status {code})", tail)
    return output


def _jobs() -> int:
    value = os.environ.get(JOBS_ENV)
    if value:
        try:
            jobs = int(value)
        except ValueError as exc:
            raise KernelSetupError(f"{JOBS_ENV}={value!r} is not a number",
                                   advice=f"set {JOBS_ENV} to a job count, or unset it") from exc
        if jobs > 0:
            return jobs
        raise KernelSetupError(f"{JOBS_ENV}={value!r} must be at least 1",
                               advice=f"set {JOBS_ENV} to a job count, or unset it")
    return len(os.sched_getaffinity(0))


def _download_deb(apt: PrivateApt, package: str, version: str) -> tuple[Path, float]:
    """The cached .deb of ``package`` ``version`` (downloading it once); seconds spent."""
    start = time.monotonic()

    def fetch(work: Path) -> None:
        with apt.locked():
            apt.download(package, version, work)

    entry = ensure_entry("debs", f"{_safe(package)}_{_safe(version)}", fetch,
                         f"the download of {package} {version} (from {_mirror()})")
    debs = sorted(entry.path.glob("*.deb"))
    if len(debs) != 1:
        raise KernelSetupError(f"the cache entry {entry.path} should hold one .deb, "
                               f"it holds {len(debs)}",
                               advice=f"delete {entry.path} and run again")
    return debs[0], time.monotonic() - start


def _gcc_version() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], stdout=subprocess.PIPE, text=True,
                             check=False).stdout
    except FileNotFoundError:
        return "gcc not installed"
    return out.splitlines()[0] if out else "unknown"


def _build_kernel(source: SourcePackage, version: str, deb: Path, download_s: float,
                  fragment: str, work: Path) -> None:
    """Fill ``work`` with bzImage, config, kernelrelease, build-log-tail.txt, build-info.json."""
    log = work / "build.log"
    timings: dict[str, float] = {"download_s": round(download_s, 1)}
    try:
        start = time.monotonic()
        unpacked = work / "deb"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], None, log, f"unpacking {deb.name}")
        tarballs = sorted((unpacked / "usr/src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise KernelSetupError(f"{deb.name} should hold one usr/src/linux-source-*.tar.* "
                                   f"file, it holds {len(tarballs)}")
        src = work / "src"
        src.mkdir()
        _run(["tar", "-xf", str(tarballs[0]), "-C", str(src)], None, log,
             f"unpacking {tarballs[0].name}")
        shutil.rmtree(unpacked)
        trees = [path for path in src.iterdir() if (path / "Makefile").is_file()]
        if len(trees) != 1:
            raise KernelSetupError(f"{tarballs[0].name} should unpack to one kernel tree")
        tree = trees[0]
        timings["unpack_s"] = round(time.monotonic() - start, 1)

        start = time.monotonic()
        (work / "fragment.config").write_text(fragment)
        _run(["make", "x86_64_defconfig"], tree, log, "make x86_64_defconfig")
        _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(work / "fragment.config")],
             tree, log, "merging kho-guest.config into the defconfig")
        _run(["make", "olddefconfig"], tree, log, "make olddefconfig")
        final = (tree / ".config").read_text()
        mismatches = option_mismatches(parse_fragment(fragment), parse_dotconfig(final),
                                       kconfig_symbols(tree))
        if mismatches:
            raise KernelSetupError(
                f"{len(mismatches)} option(s) of {FRAGMENT.name} did not survive "
                f"`make olddefconfig` in {source.package} {version}:\n"
                + _indent("\n".join(m.describe() for m in mismatches)),
                advice=f"add the missing dependencies to {FRAGMENT} (see the option's "
                       "`depends on` in its Kconfig) or drop options this kernel lacks")
        timings["configure_s"] = round(time.monotonic() - start, 1)

        start = time.monotonic()
        jobs = _jobs()
        _run(["make", f"-j{jobs}", "bzImage"], tree, log, f"make -j{jobs} bzImage")
        timings["build_s"] = round(time.monotonic() - start, 1)
        release = _run(["make", "-s", "kernelrelease"], tree, None, "make kernelrelease").strip()

        shutil.copyfile(tree / "arch/x86/boot/bzImage", work / "bzImage")
        shutil.copyfile(tree / ".config", work / "config")
        (work / "kernelrelease").write_text(release + "\n")
        # The image says which release it is; a disagreement means we copied the wrong file.
        embedded = _image_release(work / "bzImage")
        if embedded != release:
            raise KernelSetupError(f"the built bzImage reports release {embedded!r}, "
                                   f"`make kernelrelease` says {release!r}")
        info = {
            "series": source.series, "package": source.package, "version": version,
            "suite": source.suite, "recipe": RECIPE_VERSION, "release": release,
            "fragment_sha256": hashlib.sha256(fragment.encode()).hexdigest(),
            "bzimage_bytes": (work / "bzImage").stat().st_size, "jobs": jobs,
            "compiler": _gcc_version(), **timings,
        }
        (work / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        (work / "build-log-tail.txt").write_text(
            _tail(log.read_text(errors="replace"), KEPT_LOG_LINES) + "\n")
    except KernelSetupError as exc:
        kept = _keep_failed_log(log, f"{source.series}-{_safe(version)}")
        if kept is not None:
            exc.advice = f"the full log is {kept}; {exc.advice}"
        raise
    finally:
        # The tree is ~1.5 GB once built: never keep it.
        shutil.rmtree(work / "src", ignore_errors=True)
        shutil.rmtree(work / "deb", ignore_errors=True)
        log.unlink(missing_ok=True)
        (work / "fragment.config").unlink(missing_ok=True)


def _image_release(image: Path) -> str:
    try:
        release = read_image(str(image)).info.release
    except (ImageError, OSError) as exc:
        raise KernelSetupError(f"{image} cannot be read as a kernel image: {exc}") from exc
    if release is None:
        raise KernelSetupError(f"{image} has no version string")
    return release


def _keep_failed_log(log: Path, name: str) -> Path | None:
    if not log.is_file():
        return None
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kept = logs / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    shutil.copyfile(log, kept)
    return kept


# --- public API -----------------------------------------------------------------------------------

def ensure_kernel(series: str) -> KernelImage:
    """The KHO/LUO kernel of ``series`` ("7.2" or "7.3"), built once and cached.

    ``KHO_AGENT_TEST_KERNEL`` replaces "7.3" (primary), ``KHO_AGENT_TEST_KERNEL_NEXT`` "7.2".
    Raises KernelSetupError (with the log's end and what to do) when it cannot be had.
    """
    override = _override(series)
    if override is not None:
        return override
    source = SOURCES.get(series)
    if source is None:
        raise KernelSetupError(f"no kernel series {series!r}",
                               advice=f"use one of {', '.join(sorted(SOURCES))}")
    fragment = fragment_text()
    try:
        parse_fragment(fragment)
    except ValueError as exc:
        raise KernelSetupError(f"{FRAGMENT}: {exc}", advice=f"fix {FRAGMENT}") from exc

    apt, fresh = _ready_apt()
    # Two rounds at most: lists from an earlier day may name a version the mirror dropped;
    # then refresh them once and take the current version.
    while True:
        version = apt.candidate(source.package)
        if version is None and not fresh:
            apt, fresh = update_lists(), True
            continue
        if version is None:
            raise KernelSetupError(f"{source.package} is not in the private apt lists "
                                   f"(suite {source.suite})",
                                   advice=f"check that {source.suite} still carries it "
                                          f"(apt-cache policy), or set {OVERRIDE_ENV[series]}")
        name = kernel_cache_name(source, version, fragment)
        entry_path = cache_root() / "kernels" / name
        if not (entry_path / ".complete").is_file():
            try:
                deb, download_s = _download_deb(apt, source.package, version)
            except KernelSetupError:
                if fresh:
                    raise
                apt, fresh = update_lists(), True
                continue

            def build(work: Path, deb: Path = deb, download_s: float = download_s,
                      version: str = version) -> None:
                _build_kernel(source, version, deb, download_s, fragment, work)

            entry_path = ensure_entry(
                "kernels", name, build, f"the {source.series} kernel from {source.package} "
                f"{version} ({source.suite}, {deb.name}) with {FRAGMENT.name}").path
        return KernelImage(
            path=entry_path / "bzImage",
            release=(entry_path / "kernelrelease").read_text().strip(),
            series=source.series,
            config=entry_path / "config",
            source=f"built from {source.package} {version}",
        )


def primary_kernel() -> KernelImage:
    """The kernel the guests boot (7.3 build, or ``KHO_AGENT_TEST_KERNEL``)."""
    return ensure_kernel(PRIMARY_SERIES)


def next_kernel() -> KernelImage:
    """The second kernel, for the cross-version scenario (7.2 build, or ``..._NEXT``)."""
    return ensure_kernel(NEXT_SERIES)


def _override(series: str) -> KernelImage | None:
    env = OVERRIDE_ENV.get(series)
    value = os.environ.get(env) if env else None
    if not env or not value:
        return None
    advice = f"point {env} at a kernel image (bzImage) with KHO and LUO, or unset it"
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise KernelSetupError(f"{env}={value}: no such file", advice=advice)
    try:
        release = read_image(str(path)).info.release
    except (ImageError, OSError) as exc:
        raise KernelSetupError(f"{env}={value} is not a readable kernel image: {exc}",
                               advice=advice) from exc
    if release is None:
        raise KernelSetupError(f"{env}={value}: no version string found in the image",
                               advice=advice)
    config = config_beside(path, release)
    if config is not None:
        missing = option_mismatches({name: "y" for name in ESSENTIAL_OPTIONS},
                                    parse_dotconfig(config.read_text(errors="replace")))
        if missing:
            raise KernelSetupError(
                f"{env}={value}: its config {config} lacks "
                + ", ".join(f"CONFIG_{m.name}=y" for m in missing), advice=advice)
    return KernelImage(path=path, release=release, series=series_of(release), config=config,
                       source=env)


def config_beside(image: Path, release: str) -> Path | None:
    """A kernel config next to ``image``: ``.config`` (a build tree) or ``config-<release>``."""
    for candidate in (image.parent / ".config", image.parent / f"config-{release}",
                      image.parent / "config"):
        if candidate.is_file():
            return candidate
    return None


# ABI: "7.2.13+deb14" (Debian 14 naming), "7.3" (experimental), "6.1.0-18" (bookworm naming).
_ABI = r"\d+\.\d+(?:\.\d+)?(?:[-+][0-9a-z]+)?"
_STOCK_IMAGE = re.compile(rf"^linux-(?:binary-unsigned-(?P<a>{_ABI})-amd64"
                          rf"|image-(?P<b>{_ABI})-amd64-unsigned)$")


def pick_stock_packages(names: Iterable[str], series: str) -> tuple[str, str]:
    """(image package, config package) of Debian's generic amd64 kernel of ``series``.

    Debian has called the package holding the unsigned vmlinuz ``linux-image-ABI-amd64-unsigned``
    and (7.x) ``linux-binary-unsigned-ABI-amd64``; the config then sits in ``linux-base-ABI-amd64``.
    With several ABIs the highest wins.
    """
    found: list[tuple[tuple[int, ...], str, str]] = []
    available = set(names)
    for name in available:
        match = _STOCK_IMAGE.match(name)
        if not match:
            continue
        abi = match.group("a") or match.group("b")
        if series_of(abi) != series:
            continue
        base = f"linux-base-{abi}-amd64"
        config_pkg = base if base in available else name
        numbers = tuple(int(part) for part in re.findall(r"\d+", abi))
        found.append((numbers, name, config_pkg))
    if not found:
        raise KernelSetupError(f"no Debian amd64 kernel image package of series {series} in sid",
                               advice="check `apt-cache pkgnames linux-binary-unsigned-` with "
                                      "the private configuration; the package names may have "
                                      "changed again")
    _, image_pkg, config_pkg = max(found)
    return image_pkg, config_pkg


def _find_one(root: Path, patterns: Sequence[str], what: str) -> Path:
    for pattern in patterns:
        hits = sorted(path for path in root.glob(pattern) if path.is_file())
        if hits:
            return hits[0]
    raise KernelSetupError(f"no {what} ({' or '.join(patterns)}) in the extracted packages")


def ensure_stock_debian_kernel() -> Path:
    """Debian's stock 7.2 vmlinuz from sid (KHO not enabled): a target prepare must refuse.

    Its config is beside it as ``config-<release>``. Downloaded once, never booted.
    """
    apt, fresh = _ready_apt()
    # As for ensure_kernel: lists from an earlier day may name packages the mirror dropped.
    while True:
        try:
            return _stock_entry(apt)
        except KernelSetupError:
            if fresh:
                raise
            apt, fresh = update_lists(), True


def _stock_entry(apt: PrivateApt) -> Path:
    image_pkg, config_pkg = pick_stock_packages(apt.package_names("linux-"), STOCK_SERIES)
    version = apt.candidate(image_pkg)
    if version is None:
        raise KernelSetupError(f"{image_pkg} has no candidate version in sid")

    def build(work: Path) -> None:
        start = time.monotonic()
        debs = [_download_deb(apt, package, version)[0]
                for package in dict.fromkeys((image_pkg, config_pkg))]
        download_s = time.monotonic() - start
        extracted = work / "x"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(extracted)], None, None,
                 f"unpacking {deb.name}")
        vmlinuz = _find_one(extracted, ("boot/vmlinuz-*", "usr/lib/modules/*/vmlinuz*"),
                            "vmlinuz")
        config = _find_one(extracted, ("boot/config-*", "usr/lib/modules/*/config"),
                           "kernel config")
        release = _image_release(vmlinuz)
        shutil.copyfile(vmlinuz, work / f"vmlinuz-{release}")
        shutil.copyfile(config, work / f"config-{release}")
        shutil.rmtree(extracted)
        options = parse_dotconfig((work / f"config-{release}").read_text(errors="replace"))
        info = {"package": image_pkg, "config_package": config_pkg, "version": version,
                "release": release, "download_s": round(download_s, 1),
                "vmlinuz_bytes": (work / f"vmlinuz-{release}").stat().st_size,
                "kexec_handover": options.get("KEXEC_HANDOVER", "n")}
        (work / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")

    entry = ensure_entry("stock-kernels", f"{_safe(image_pkg)}_{_safe(version)}", build,
                         f"Debian's stock kernel {image_pkg} {version}")
    images = sorted(entry.path.glob("vmlinuz-*"))
    if len(images) != 1:
        raise KernelSetupError(f"the cache entry {entry.path} should hold one vmlinuz-*",
                               advice=f"delete {entry.path} and run again")
    return images[0]


# --- command line ---------------------------------------------------------------------------------

def _describe_entry(path: Path) -> str:
    info_path = path / "build-info.json"
    if not info_path.is_file():
        return ""
    info = json.loads(info_path.read_text())
    keys = ("version", "release", "download_s", "unpack_s", "configure_s", "build_s",
            "bzimage_bytes", "jobs", "kexec_handover")
    return ", ".join(f"{key}={info[key]}" for key in keys if key in info)


def _cli_build(targets: Sequence[str]) -> int:
    for target in targets:
        start = time.monotonic()
        if target == "stock":
            image = ensure_stock_debian_kernel()
            print(f"stock: {image} ({time.monotonic() - start:.1f} s; "
                  f"{_describe_entry(image.parent)})", flush=True)
            continue
        kernel = ensure_kernel(target)
        print(f"{target}: {kernel.path} release {kernel.release}, {kernel.source} "
              f"({time.monotonic() - start:.1f} s; {_describe_entry(kernel.path.parent)})",
              flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.kernels",
                                     description="Build and cache the VM suite's kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="download and build (cached): 7.2, 7.3, stock")
    build.add_argument("targets", nargs="*", default=[PRIMARY_SERIES, NEXT_SERIES, "stock"],
                       choices=[*sorted(SOURCES), "stock"])
    sub.add_parser("update", help="refresh the private apt lists (sid, experimental)")
    sub.add_parser("keyring", help=f"fetch the newest {KEYRING_PACKAGE} (see the docstring)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        if args.command == "build":
            return _cli_build(args.targets)
        if args.command == "update":
            apt = update_lists()
            print(f"updated {apt.root} in {time.monotonic() - start:.1f} s")
            return 0
        path = bootstrap_keyring()
        print(f"stored {path} in {time.monotonic() - start:.1f} s")
        return 0
    except KernelSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
