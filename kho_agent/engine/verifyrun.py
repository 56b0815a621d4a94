"""Verification after a live update, in the order a VM manager waits on it.

After the kexec the VM managers wait for their sessions; the agent's verification reads much
more than they need (the KHO state, the network, the running kernel's ABI, and the digests of
every preserved byte the owners asked to have checked). So verification runs in three steps:

1. retrieval (the engine, `Engine.verify_begin`, then `verify_retrieve` once per
   session, so that the engine answers the owners between two): the manifest from the agent's
   own session, then each incoming session retrieved and each file's size and seals read. A
   session whose owner did not ask for digests is handed back as soon as it is retrieved (they
   are retrieved first). What the agent reads here does not grow with the files' bytes; the
   kernel's RETRIEVE_FD does (it restores the folios), and an owner would pay it anyway.
2. observation (`observe`, on a thread of its own beside the engine): the digests, the KHO
   state, the network, the running kernel's ABI. It needs no engine state: it reads only the
   fds a `VerifyRun` holds and the host, so the engine answers the owners meanwhile.
3. conclusion (the engine, `Engine.verify_conclude`): the comparison with the manifest,
   the report, the verdict. A session with digests is handed back from here on: its owner gets it
   once its bytes are proven (or proven wrong, which the report then says), and nobody writes to
   it while the agent reads it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from .. import netstate
from ..abi import Side
from ..abi.formats.kexec_metadata_v1 import KexecMetadata
from ..digest import digest_fd
from ..errors import AgentError
from ..facts import KhoView, kho_view, running_abi
from ..imagestrings import ImageStrings
from ..kernel.host import Host
from ..kernel.liveupdate import LiveUpdateDevice
from ..kernel.sysinfo import SysInfo
from .manifest import Manifest, ObservedSession, SessionEntry, SubtreeEntry


@dataclass
class PendingDigest:
    """A file whose digest the owner asked for: retrieved at step 1, read at step 2."""

    session: int            # index in VerifyRun.sessions
    file: int               # index in that session's files
    fd: int                 # a retrieved fd of the file, held by the run until it ends
    size: int
    alg: str                # the algorithm the manifest's digest was taken with


@dataclass
class VerifyRun:
    """One verification between its first and its last step."""

    info: SysInfo
    manifest: Manifest
    disk_manifest_matches_memfd: bool | None
    sessions: list[ObservedSession]           # sizes and seals; digests filled at step 2
    device: LiveUpdateDevice | None = None    # /dev/liveupdate, or None and why not
    device_problem: str | None = None
    todo: list[SessionEntry] = field(default_factory=list)  # to retrieve, the last one first
    started: float = 0.0                      # perf_counter() when retrieval started
    retrieved_all: bool = False
    pending: list[PendingDigest] = field(default_factory=list)
    handed_back: list[str] = field(default_factory=list)   # may be claimed from step 1 on
    held: list[str] = field(default_factory=list)          # claimed only after step 3

    def close(self) -> None:
        """Close the fds held for the digests (the sessions themselves stay retrieved)."""
        while self.pending:
            os.close(self.pending.pop().fd)


@dataclass(frozen=True)
class Retrieved:
    """One session done in step 1."""

    entry: SessionEntry     # what the manifest says of it
    retrieved: bool         # False: it could not be (the report says why)
    held: bool              # it has digests: its owner gets it after step 3


@dataclass
class HostObservation:
    """What step 2 found besides the digests (which it writes into the run's sessions)."""

    kho_boot: bool
    liveupdate_number: int | None
    previous_release: str | None
    abi: dict[str, str]
    subtrees: list[SubtreeEntry]
    network: dict[str, object] | None


@contextmanager
def timed_step(report: Callable[[str, float], None], step: str) -> Iterator[None]:
    """Report how long the block took (the daemon logs each verification step with it)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        report(step, time.perf_counter() - started)


def _digesting(phase: Callable[[str, int, int], None], base: int, total: int,
               hashed: int) -> None:
    phase("digesting", base + hashed, total)


def observe(host: Host, run: VerifyRun, known: ImageStrings,
            timed: Callable[[str, float], None],
            progress: Callable[[int], None] = lambda percent: None,
            phase: Callable[[str, int, int], None] = lambda name, done, total: None
            ) -> HostObservation:
    """Step 2. The digests first (the held sessions wait on them), then the rest."""
    def step(name: str) -> AbstractContextManager[None]:
        return timed_step(timed, name)

    total = sum(p.size for p in run.pending)
    done = 0
    if total:
        phase("digesting", 0, total)
    with step(f"digests of {len(run.pending)} file(s), {total} bytes"):
        for pending in run.pending:
            files = run.sessions[pending.session].files
            assert files is not None  # pending only for files of a retrieved session
            observed = files[pending.file]
            try:
                observed.digest = digest_fd(
                    pending.fd, pending.size, pending.alg,
                    on_bytes=functools.partial(_digesting, phase, done, total)).hexdigest
            except AgentError as exc:
                observed.error = f"cannot read it for its digest: {exc.message}"
            done += pending.size
            progress(50 + 40 * done // max(total, 1))
    phase("decoding the incoming and outgoing KHO state", 0, 0)
    with step("decoding the incoming and outgoing KHO state"):
        incoming = kho_view(host, Side.IN)
        out = kho_view(host, Side.OUT, with_memory=False)
    with step("reading the network"):
        net, _ = netstate.observe()
    with step("reading the running kernel's ABI"):
        abi = {k: v.primary for k, v in running_abi(
            host, run.info.release, out, incoming, known=known).contracts.items() if v.primary}
    luo = out.luo
    return HostObservation(
        kho_boot=incoming.state is not None and incoming.state.root_source != "none",
        liveupdate_number=luo.liveupdate_number if luo else None,
        previous_release=_previous_release(incoming),
        abi=abi,
        subtrees=[SubtreeEntry(n, s, None) for n, s in sorted(incoming.sub_blob_sizes.items())],
        network=net.to_json() if net else None)


def _previous_release(incoming: KhoView) -> str | None:
    previous = None
    if incoming.state is not None:
        for sub in incoming.state.subtrees:
            if isinstance(sub.decoded, KexecMetadata):
                previous = sub.decoded.previous_release
    return previous
