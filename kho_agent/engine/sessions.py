"""The clients' sessions: before the kexec created, filled (preserve), declared ready or released
by their owners; after it retrieved by verify (verify.py) and claimed by their owners, checked
(a session its owner kept in its own fd store) or finished unclaimed.

Session fds live only as long as this process: a restart in the same boot after PREPARED means
the preservation is gone, and the engine says so instead of claiming it (recovery.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass, field

from ..digest import DigestResult, digest_fd
from ..errors import AgentError, Busy, InvalidArgument, KernelRefused, NotFound
from ..facts import FileFacts, file_facts
from ..kernel.liveupdate import LiveUpdateSession, validate_session_name, validate_token
from .context import EngineContext
from .handoff import SYSTEMD_SESSION
from .manifest import (
    AGENT_SESSION,
    FileEntry,
    ObservedFile,
    ObservedSession,
    SessionEntry,
    VerifyItem,
    check_session,
)
from .phase import Phase


@dataclass
class PreservedFile:
    token: int
    # The agent's own reference, for the size and digest taken at ready. Without digests it is
    # dropped at ready (the kernel holds the file and freezes its size, and 10k files would
    # otherwise cost 10k fds); with digests it is kept, so that a client that says "not ready"
    # and then "ready" again gets a digest of its memory as it is now.
    fd: int | None
    size: int
    seals: int | None
    facts: FileFacts
    digest: DigestResult | None = None

    def drop_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class ClientSession:
    name: str
    owner: str
    handle: LiveUpdateSession
    digests: bool
    files: dict[int, PreservedFile] = field(default_factory=dict)
    ready: bool = False
    owner_gone: bool = False      # the creator's bus connection closed (the daemon says so)
    # the owner keeps the session fd in its own service's fd store (option fd_store): in mode
    # fdstore the agent does not park it (systemd would hand it to only one of two stores)
    owner_fd_store: bool = False

    def entry(self, mode: str) -> SessionEntry:
        return SessionEntry(self.name, self.owner, [
            FileEntry(f.token, f.size, f.digest.hexdigest if f.digest else None,
                      f.digest.alg if f.digest else None,
                      f.digest.seconds if f.digest else None, f.seals)
            for f in sorted(self.files.values(), key=lambda f: f.token)], self.ready,
            self.digests, self.owner_fd_store and mode == "fdstore")

    def close(self) -> None:
        """Close the session (the kernel unpreserves its files) and the agent's own fds."""
        for f in self.files.values():
            f.drop_fd()
        self.handle.close()


def seals(fd: int) -> int | None:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # a shmem file without sealing support answers EINVAL
        return None


# --------------------------------------------------------------------- before the kexec

def create_session(ctx: EngineContext, name: str, owner: str, digests: bool | None,
                   owner_fd_store: bool) -> LiveUpdateSession:
    validate_session_name(name)
    if name == AGENT_SESSION:
        raise InvalidArgument(f"session name {AGENT_SESSION!r} is the agent's own")
    if name == SYSTEMD_SESSION:
        # systemd >= 261 creates it at shutdown for its fd stores, and skips a stored
        # session of that name
        raise InvalidArgument(f"session name {SYSTEMD_SESSION!r} is systemd's own")
    if ctx.state.phase in (Phase.COMMITTING, Phase.CANCELLING, Phase.PREPARING):
        raise Busy(f"cannot create sessions while {ctx.state.phase.value}")
    if name in ctx.clients:
        # Never ask the kernel: a CREATE_SESSION that fails with EEXIST can leave an empty
        # block that panics the next kernel (platform notes).
        raise Busy(f"session {name!r:.80} already exists (owner {ctx.clients[name].owner})")
    try:
        handle = ctx.open_device().create_session(name)
    except KernelRefused as exc:
        if exc.errno == errno.EEXIST:  # from the kernel despite our records
            ctx.commit_blocker = (f"CREATE_SESSION {name!r:.80} failed with EEXIST: the "
                                  "kernel may hand over an empty session block that "
                                  "panics the next kernel; only a cold reboot is safe")
        raise
    ctx.clients[name] = ClientSession(name, owner, handle,
                                      ctx.config.digests if digests is None else digests,
                                      owner_fd_store=owner_fd_store)
    return handle


def _client(ctx: EngineContext, name: str) -> ClientSession:
    client = ctx.clients.get(name)
    if client is None:
        why = ctx.released.get(name)
        if why is not None:
            raise NotFound(f"session {name!r:.80} was released: {why}")
        known = ", ".join(sorted(ctx.clients)[:20]) or "none"
        raise NotFound(f"no session {name!r:.80} (known: {known:.400})")
    return client


def preserve(ctx: EngineContext, name: str, fd: int, token: int) -> None:
    client = _client(ctx, name)
    validate_token(token)
    if token in client.files:
        raise InvalidArgument(f"token {token:#x} is already used in session {name!r:.80}")
    if ctx.state.phase in (Phase.COMMITTING, Phase.CANCELLING):
        raise Busy(f"cannot preserve files while {ctx.state.phase.value}")
    facts = file_facts(fd)
    if facts.hugetlb or not facts.shmem or facts.linked:
        raise InvalidArgument(f"fd {fd} cannot be preserved: only memfds (not hugetlb) and "
                              "unlinked tmpfs files can")
    try:
        own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
    except OSError as exc:  # before the kernel is asked: nothing preserved, nothing to undo
        code = exc.errno or errno.EBADF
        raise KernelRefused("dup", code, (
            "the agent has no file descriptor left for its own reference to the file "
            "(raise LimitNOFILE= of the service)" if code in (errno.EMFILE, errno.ENFILE)
            else f"fd {fd} cannot be duplicated")) from exc
    try:
        client.handle.preserve_fd(fd, token)
    except BaseException:
        os.close(own)
        raise
    client.files[token] = PreservedFile(token, own, facts.size, seals(own), facts)
    client.ready = False  # new data: the client says ready again


def set_ready(ctx: EngineContext, name: str, ready: bool) -> None:
    """A ready client's memory is quiescent: only now are sizes and digests taken. A client
    that is no longer ready may change its memory: its digests are void until it is ready
    again (and a session is not committed while not ready, unless forced)."""
    client = _client(ctx, name)
    client.owner_gone = False  # whoever says so is its owner (the service checked the uid)
    if ready:
        client.ready = False
        try:
            for f in client.files.values():
                if f.fd is None:
                    continue  # measured at an earlier ready; the kernel froze its size
                f.size = os.fstat(f.fd).st_size
                f.seals = seals(f.fd)
                if client.digests:
                    f.digest = digest_fd(f.fd, f.size)
                else:
                    f.drop_fd()
        except AgentError:  # a file changed while it was digested: not ready, no digests
            for f in client.files.values():
                f.digest = None
            raise
    else:
        for f in client.files.values():
            f.digest = None
    client.ready = ready


def owner_gone(ctx: EngineContext, name: str, never_told: bool) -> None:
    """The session's creator disconnected from the bus. A creator that left before the
    reply to CreateSession could reach it never learned of the session (no path, no fd):
    the session is released. Otherwise the session stays for a new connection of the same
    uid, and a commit refused for it says that its owner is gone."""
    client = ctx.clients.get(name)
    if client is None:
        return
    if never_told and not client.files:
        release_session(ctx, name)
        ctx.note_released(name, "its creator disconnected before the reply to "
                          "CreateSession reached it: nobody knew of the session")
        return
    client.owner_gone = True


def release_session(ctx: EngineContext, name: str) -> None:
    """Close a client session before the kexec (the kernel unpreserves its files)."""
    client = ctx.clients.pop(name, None)
    if client is None:
        raise NotFound(f"no session {name!r:.80}")
    client.close()


# --------------------------------------------------------------------- after the kexec

def _kept_entry(ctx: EngineContext, name: str) -> SessionEntry:
    manifest = ctx.verified_manifest
    if manifest is None:
        raise NotFound("no live update was verified in this boot")
    entry = next((s for s in manifest.sessions if s.name == name), None)
    if entry is None or not entry.owner_fd_store:
        raise NotFound(f"session {name!r:.80} is not one its owner kept in its own fd store "
                       "in the verified live update")
    return entry


def kept_session_owner(ctx: EngineContext, name: str) -> str:
    """The recorded owner of a session its owner kept in its own fd store."""
    return _kept_entry(ctx, name).owner


def check_kept_session(ctx: EngineContext, name: str,
                       session: LiveUpdateSession) -> list[VerifyItem]:
    """After the update: check a session its owner kept in its own fd store (option
    fd_store), through the session fd the owner hands in, against what the verified
    manifest recorded of it (sizes, seals, digests). Reads only: every file is retrieved
    (RETRIEVE_FD may be repeated; the owner retrieves them too) and closed again."""
    entry = _kept_entry(ctx, name)
    actual = session.get_name()
    if actual != name:
        raise InvalidArgument(f"the fd passed is session {actual!r:.80}, not {name!r:.80}")
    files: list[ObservedFile] = []
    for f in entry.files:
        try:
            fd = session.retrieve_fd(f.token)
        except AgentError as exc:
            files.append(ObservedFile(f.token, 0, None, None, exc.message))
            continue
        try:
            digest = (digest_fd(fd, alg=f.digest_alg).hexdigest
                      if f.digest is not None and f.digest_alg is not None else None)
            files.append(ObservedFile(f.token, os.fstat(fd).st_size, digest, seals(fd), None))
        finally:
            os.close(fd)
    return check_session(entry, ObservedSession(name, files, None))


def claim_session(ctx: EngineContext, name: str) -> LiveUpdateSession:
    """Hand a retrieved incoming session to its owner (who finishes it)."""
    session = ctx.incoming.pop(name, None)
    if session is None:
        if name in ctx.state.discarded:
            raise NotFound(f"incoming session {name!r:.80} was finished unclaimed after the "
                           "grace period; its memory is discarded")
        raise NotFound(f"no retrieved incoming session {name!r:.80}")
    if not ctx.incoming:
        ctx.claim_deadline = None
    ctx.state.awaiting = sorted(ctx.incoming)
    try:
        ctx.store.save(ctx.state)  # a restart must not report a claimed session as lost
    except AgentError as exc:  # the owner gets its session anyway; the record lags
        ctx.persist_problem = exc.message
    return session


def finish_unclaimed(ctx: EngineContext) -> list[str]:
    """Finish every incoming session nobody claimed (their memory is discarded): what the
    grace period ends with, or an operator's decision. The names are recorded in the state,
    so that an owner who comes later learns what happened to its session."""
    names = sorted(ctx.incoming)
    problems = []
    for name in names:
        session = ctx.incoming.pop(name)
        try:
            session.finish()
        except KernelRefused as exc:  # closing finishes it as well
            problems.append(f"{name}: {exc.message}")
        session.close()
    ctx.claim_deadline = None
    ctx.state.awaiting = []
    if names:
        ctx.state.discarded = sorted(set(ctx.state.discarded) | set(names))
        note = (f"finished {len(names)} unclaimed incoming session(s), their memory is "
                f"discarded: {', '.join(names)}")
        if problems:
            note += "; FINISH failed for " + "; ".join(problems)
        ctx.transition(ctx.state.phase, note, strict=False)
    return names


def finish_expired(ctx: EngineContext, now: float | None) -> list[str]:
    """Called by the daemon's timer: once the grace period after verify has ended, finish
    the sessions still unclaimed. Before that, or with no grace period configured, nothing."""
    if ctx.claim_deadline is None or not ctx.incoming:
        return []
    if (time.monotonic() if now is None else now) < ctx.claim_deadline:
        return []
    return finish_unclaimed(ctx)
