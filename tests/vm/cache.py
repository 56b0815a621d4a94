"""The on-disk cache of the VM suite: kernels, root filesystems, downloads.

It lives outside the repository (builds are large and slow) and every entry is keyed by the
content that produced it, so a change of input is a new entry and never a stale hit. An entry
is built in a temporary directory beside its final place and renamed into place when complete,
so a build killed half-way leaves no entry that looks finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .progress import REPORTER

CACHE_ENV = "KHO_AGENT_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/kho-agent-tests")


def cache_root() -> Path:
    """``$KHO_AGENT_TEST_CACHE``, else ``/var/cache/kho-agent-tests``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def content_key(parts: Iterable[bytes | str]) -> str:
    """A short hex key for an ordered list of inputs (length-prefixed, so no two lists collide)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CacheEntry:
    """One keyed directory, e.g. ``kernels/7.3-rc7-<key>``."""

    path: Path

    def ready(self) -> bool:
        return (self.path / ".complete").is_file()


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        # Two pytest runs (or a build and a test) may want the same entry: the second waits.
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_entry(kind: str, name: str, build: Callable[[Path], None],
                 what: str | None = None) -> CacheEntry:
    """Return the complete entry ``<root>/<kind>/<name>``, building it with ``build(tmpdir)`` once.

    ``build`` fills the directory it is given; on success it becomes the entry atomically, on
    any exception the half-built directory is removed and the exception propagates. A build
    is reported on the terminal (progress.py): ``what`` it is (what and from which source;
    default ``kind/name``), where, how long it took or why it failed.
    """
    entry = CacheEntry(cache_root() / kind / name)
    if entry.ready():
        return entry
    with _locked(cache_root() / kind / f".{name}.lock"):
        if entry.ready():
            return entry
        work = entry.path.with_name(f".{name}.building")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(entry.path, ignore_errors=True)
        work.mkdir(parents=True)
        REPORTER.begin(what or f"{kind}/{name}", entry.path)
        built = False
        try:
            build(work)
            (work / ".complete").write_text("")
            work.rename(entry.path)
            built = True
        finally:
            raised = sys.exc_info()[1]  # what is propagating, reported as it goes
            REPORTER.end(None if built else str(raised) or type(raised).__name__)
            shutil.rmtree(work, ignore_errors=True)
    return entry
