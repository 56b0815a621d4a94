"""The boots of a simulated machine, and the switch from one to the next.

    DIR/current -> boots/<id>     the boot in force: a symlink, replaced by one rename(2)
    DIR/boots/<id>/               everything of one boot: boot.json, incoming.log, kernel/,
                                  handover/ (what this boot received), root/, its locks, and
                                  what the machine carries from boot to boot (faults.json,
                                  userspace.json)
    DIR/state.lock                the machine lock: boot transitions and recovery
    DIR/boot.json, root, kernel, handover -> current/...   stable paths for readers

A boot transition (create(), the cold boot after a panic, the kexec) builds the next boot in a
new directory under boots/ while it holds the machine lock, flushes it to disk, and switches
`current` to it with one rename. A process killed at any point of it (it releases the lock as
it dies) leaves `current` on the old boot or on the new one, each whole; a host crash, too, as
the new boot is on disk before the switch is. Recovery, at every attach and at the start of
every transition, under the machine lock, removes what a killed process left: boot directories
`current` does not name (half built, or replaced and half removed), temporary files of dead
writers, a half-made switch; and it restores the stable links. A directory of the earlier
single-boot layout (boot.json a regular file) becomes the first boot of this one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..errors import AgentError
from .store import (
    KEXECD,
    TMP_NAME,
    crash_point,
    crash_points,
    fsync_dir,
    fsync_tree,
    locked,
    pid_alive,
    remove_tree,
)

CURRENT = "current"
BOOTS = "boots"
LINKS = ("boot.json", "root", "kernel", "handover")
_SWITCH = ".current.new"
# the single-boot layout: per-boot files at the top, carried into the first boot
LEGACY_BOOT_FILES = ("boot.json", "incoming.log", "faults.json", "userspace.json", "kernel",
                     "handover", "root")
# files of that layout that have no place at the top any more
LEGACY_TOP_FILES = ("incoming.log", "faults.json", "userspace.json", "handover.new",
                    "liveupdate.lock", "liveupdate.holder")


def current(directory: Path) -> Path | None:
    """The directory of the boot in force, or None (no boot yet, or not a simulator
    directory)."""
    try:
        target = os.readlink(directory / CURRENT)
    except OSError:
        return None
    boot = directory / target
    return boot if boot.parent == directory / BOOTS and boot.is_dir() else None


def looks_like_machine(directory: Path) -> bool:
    """Whether `directory` holds a simulated machine, of this layout or the single-boot one
    (checked before anything is written there)."""
    return os.path.lexists(directory / CURRENT) or (directory / "boot.json").is_file()


def link_target(boot: Path) -> str:
    """What DIR/current reads while `boot` is in force."""
    return f"{BOOTS}/{boot.name}"


def recover(directory: Path) -> Path | None:
    """Clean up after killed processes; return the current boot. Takes the machine lock. Its
    steps are crash points too: a process killed while it recovers leaves what the next one
    recovers."""
    with locked(directory), crash_points():
        return _recover(directory)


def _recover(directory: Path) -> Path | None:
    boot = current(directory)
    legacy = directory / "boot.json"
    if boot is None and legacy.is_file() and not legacy.is_symlink():
        boot = _migrate(directory)
    _collect(directory, keep=boot)
    if boot is not None:
        _links(directory)
        _dead_tmp_files(boot)
    return boot


def _collect(directory: Path, keep: Path | None) -> None:
    """Remove every boot directory but `keep`, and a switch that was never made."""
    (directory / _SWITCH).unlink(missing_ok=True)
    try:
        entries = list(os.scandir(directory / BOOTS))
    except FileNotFoundError:
        return
    for entry in entries:
        if keep is None or entry.name != keep.name:
            remove_tree(Path(entry.path))


def _links(directory: Path) -> None:
    """The stable paths, DIR/root and the others, pointing into `current`; files of the
    single-boot layout at the top removed."""
    for name in LINKS:
        path = directory / name
        want = f"{CURRENT}/{name}"
        try:
            if os.readlink(path) == want:
                continue
        except FileNotFoundError:
            pass
        except OSError:  # a regular file or directory of the single-boot layout
            remove_tree(path)
        tmp = directory / f".{name}.link"
        crash_point()
        tmp.unlink(missing_ok=True)
        os.symlink(want, tmp)
        crash_point()
        os.replace(tmp, path)
    for name in LEGACY_TOP_FILES:
        if os.path.lexists(directory / name):
            remove_tree(directory / name)


def _dead_tmp_files(boot: Path) -> None:
    """Temporary files (`.NAME.PID.tmp`) of writers that died before their rename."""
    for top, _dirs, files in os.walk(boot):
        for name in files:
            match = TMP_NAME.match(name)
            if match and not pid_alive(int(match.group(1))):
                Path(top, name).unlink(missing_ok=True)


def _new_boot(directory: Path) -> Path:
    crash_point()
    boot = directory / BOOTS / uuid.uuid4().hex[:16]
    boot.mkdir(parents=True)
    return boot


def _switch(directory: Path, boot: Path) -> None:
    """Make `boot` current: flushed first, then one rename of the `current` symlink."""
    crash_point()
    fsync_tree(boot)
    fsync_dir(boot.parent)
    crash_point()
    tmp = directory / _SWITCH
    tmp.unlink(missing_ok=True)
    os.symlink(link_target(boot), tmp)
    crash_point("switch")
    os.replace(tmp, directory / CURRENT)  # the transition happens here, whole
    crash_point("switched")
    fsync_dir(directory)


def _migrate(directory: Path) -> Path:
    """The single-boot layout of earlier versions becomes the first boot: its files are linked
    (not copied) into a new boot directory, which is switched to; the old files stay untouched
    until then, so a process killed half-way leaves the old layout as it was."""
    boot = _new_boot(directory)
    for name in LEGACY_BOOT_FILES:
        src = directory / name
        if src.is_symlink():
            continue
        crash_point()
        if src.is_dir():
            shutil.copytree(src, boot / name, symlinks=True, copy_function=os.link)
        elif src.is_file():
            os.link(src, boot / name)
    _switch(directory, boot)
    return boot


@contextmanager
def transition(directory: Path, old: Path | None) -> Iterator[Path]:
    """Build the next boot of the machine in `directory`; yields the new boot's directory, to
    be filled. When the block ends normally the machine switches to it and the other boot
    directories are removed; when it raises, the new directory is removed and the old boot
    stays. `old` is the boot the caller runs in (None: create() replaces whatever runs): if it
    is no longer current, the caller's boot is gone and nothing is done. The old boot's own
    lock is held too, so that no read-modify-write of it (a fault injected, a kernel loaded)
    lands between what the transition read of it and the switch."""
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory), crash_points():
        now = _recover(directory)
        if old is not None and (now is None or now.name != old.name):
            raise AgentError(KEXECD)
        with locked(old) if old is not None else nullcontext():
            boot = _new_boot(directory)
            try:
                yield boot
            except BaseException:
                remove_tree(boot)
                raise
            _switch(directory, boot)
        _collect(directory, keep=boot)
        _links(directory)
        crash_point()  # done: the caller has not returned yet
