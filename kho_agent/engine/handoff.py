"""Commit and the hand-off to the loaded kernel.

    PREPARED -> COMMITTING -> (kexec)

Commit writes the final manifest and hands off: in mode `direct` (and the simulator's) this
process holds the session fds until the kexec; in mode `fdstore` they are parked in systemd's fd
store across it.

On systemd >= 261 with `FileDescriptorStorePreserve=yes` (kho-agent-fdstore.conf), systemd keeps
the fds a service stores with `FDSTORE=1` through a kexec and hands them back in `LISTEN_FDS`
after the reboot (design.md decision 1). The agent then needs no process alive at the kexec:
it parks every session fd at commit, closes `/dev/liveupdate` so that systemd-shutdown can open
it, and adopts the incoming session fds from the store after the boot instead of retrieving
them.

Each session is stored under its own name, `luo-` followed by the session name with every byte
outside `[A-Za-z0-9._-]` written as `%XX`: fd store names are printable ASCII without ':' and at
most 255 characters, session names are up to 63 arbitrary bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from ..config.window import next_opening, window_allows
from ..errors import AgentError, Busy, Inhibited, NotPrepared, PreflightFailed
from ..kernel.atomicfile import write_atomic
from . import attempts
from .context import EngineContext
from .manifest import AGENT_SESSION, manifest_to_json
from .phase import Phase
from .prepare import build_manifest, replace_agent_session

SESSION_FDNAME_PREFIX = "luo-"
# The session systemd-shutdown (>= 261) creates for the memfds in fd stores; a stored session
# fd of that name is skipped, so no client may use it.
SYSTEMD_SESSION = "systemd"
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def session_fdname(name: str) -> str:
    """The fd store name of a session."""
    raw = name.encode("utf-8", errors="surrogateescape")
    return SESSION_FDNAME_PREFIX + "".join(chr(b) if b in _PLAIN else f"%{b:02X}" for b in raw)


def session_from_fdname(fdname: str) -> str | None:
    """The session name an fd store name stands for, or None when it is not one of ours."""
    if not fdname.startswith(SESSION_FDNAME_PREFIX):
        return None
    text = fdname[len(SESSION_FDNAME_PREFIX):]
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or any(c not in "0123456789ABCDEF" for c in pair):
                return None
            out.append(int(pair, 16))
            i += 3
        elif ord(ch) < 128 and ord(ch) in _PLAIN:
            out.append(ord(ch))
            i += 1
        else:
            return None
    if not out:
        return None
    return out.decode("utf-8", errors="surrogateescape")


class SessionFdStore(Protocol):
    """Where the session fds wait for the kexec (the daemon's is systemd's fd store)."""

    @property
    def capacity(self) -> int:
        """How many fds the store takes (FileDescriptorStoreMax=)."""
        ...

    def park(self, name: str, fd: int) -> None:
        """Store a duplicate of `fd` for session `name`; raises AgentError when it cannot."""
        ...

    def unpark(self, name: str) -> None:
        """Drop what is stored for `name` (nothing stored is not an error)."""
        ...


@dataclass
class CommitOptions:
    force: bool = False           # commit although some clients are not ready, or outside
                                  # the maintenance window
    dry_run: bool = False
    now: Callable[[], datetime] = field(default=datetime.now)   # local time, for the window
    # who holds live updates off and why ("who (why)"): the commit is refused while any does
    inhibitors: tuple[str, ...] = ()


@dataclass
class CommitResult:
    dry_run: bool
    handoff_seconds: float | None
    plan: list[str]


def _park_sessions(ctx: EngineContext) -> None:
    """fdstore: hand every session fd to the store, all or none."""
    store = ctx.fd_store
    assert store is not None  # handoff_mode() says fdstore only with a store
    handles = [(c.name, c.handle) for c in ctx.clients.values() if not c.owner_fd_store]
    if ctx.agent_session is not None:
        handles.append((AGENT_SESSION, ctx.agent_session))
    if len(handles) > store.capacity:
        raise PreflightFailed(f"{len(handles)} session fds to park but the fd store takes "
                              f"{store.capacity}: raise FileDescriptorStoreMax= in "
                              "kho-agent-fdstore.conf")
    try:
        for name, handle in handles:
            store.park(name, handle.fileno())
            ctx.parked.append(name)
    except AgentError:
        ctx.unpark_all()
        raise


def _check_window(ctx: EngineContext, now: datetime) -> None:
    """Outside the configured maintenance window a commit is refused (a dry run too: it says
    what the commit would do); --force overrides."""
    windows = ctx.config.maintenance_window
    if window_allows(windows, now):
        return
    opening = next_opening(windows, now)
    when = f"the next opening is {opening:%a %Y-%m-%d %H:%M}; " if opening else ""
    raise PreflightFailed(
        f"outside the maintenance window (MaintenanceWindow={', '.join(map(str, windows))}, "
        f"{ctx.config.origin('MaintenanceWindow')}): it is {now:%a %Y-%m-%d %H:%M} here; "
        f"{when}commit then, or with --force (which also commits without the sessions that "
        "are not ready)")


def _check_required_mode(ctx: EngineContext, mode: str) -> None:
    """HandoffMode= names the mode this host must use: a host that offers another (the fdstore
    drop-in went missing, PID 1 is not systemd) is refused rather than handed off otherwise."""
    required = ctx.config.handoff_required
    if required != "auto" and mode != required:
        raise PreflightFailed(
            f"the configuration requires hand-off mode {required} (HandoffMode=, "
            f"{ctx.config.origin('HandoffMode')}) but this host hands off in mode {mode} "
            "(docs/systemd.md says what each needs); fix the host or set HandoffMode=auto")


def check_policy(ctx: EngineContext, options: CommitOptions) -> None:
    """What refuses a commit whatever is prepared, in the order commit asks: an inhibitor
    held (Inhibited), a kernel state only a cold reboot is safe from (commit_blocker: a
    CREATE_SESSION that failed with EEXIST; PreflightFailed), outside the maintenance window
    unless forced, a hand-off mode other than the configured one (PreflightFailed). Also asked
    before anything is prepared (`policy_refusal`), so that `kho-agentctl update` refuses with
    the very error the commit would meet."""
    if options.inhibitors:
        # --force is about clients that are not ready; an inhibitor is released by its holder
        raise Inhibited("live updates are held off by " + "; ".join(options.inhibitors)
                        + ": commit when they are released (`kho-agentctl status` lists them)")
    if ctx.commit_blocker:
        raise PreflightFailed(ctx.commit_blocker)
    if not options.force:
        _check_window(ctx, options.now())
    _check_required_mode(ctx, ctx.handoff_mode())


def policy_refusal(ctx: EngineContext, options: CommitOptions) -> AgentError | None:
    """The error check_policy raises now, or None: a commit would not be refused by policy
    (whether something is prepared and the clients are ready is not asked). Changes
    nothing."""
    try:
        check_policy(ctx, options)
    except AgentError as exc:
        return exc
    return None


def commit(ctx: EngineContext, options: CommitOptions) -> CommitResult:
    """Hand off to the loaded kernel. A commit that does not happen is recorded in the history
    (a dry run is not: it asks, it does not attempt)."""
    try:
        ctx.acquire("commit")
    except AgentError as exc:
        if not options.dry_run:
            attempts.commit_refused(ctx, exc)
        raise
    try:
        try:
            ready = _ready(ctx, options)
        except AgentError as exc:
            if not options.dry_run:
                attempts.commit_refused(ctx, exc)
            raise
        if isinstance(ready, CommitResult):
            return ready
        plan, mode, handoff = ready
        try:
            ctx.host.kexec.reboot(via_systemd=mode in ("direct", "fdstore"))
        except AgentError as exc:  # refused by the kernel, an inhibitor, or systemctl
            ctx.unpark_all()  # the agent holds them again; a later cancel must free them
            # back to prepared first (the kexec did not happen: no commit time to keep), then
            # the history: a failure to record must not keep the phase at committing
            raised = ctx.transition_best_effort(
                exc, Phase.PREPARED, f"the kexec did not happen, nothing lost: {exc.message}",
                committed_at=None, handoff_seconds=None)
            attempts.commit_refused(ctx, exc)
            raise raised  # noqa: B904 (the error or its copy)
        ctx.handed_off = True  # only the simulator returns from a successful reboot
        return CommitResult(False, handoff, plan)
    finally:
        ctx.lock.release()


def _ready(ctx: EngineContext, options: CommitOptions
           ) -> CommitResult | tuple[list[str], str, float]:
    """Everything up to the reboot: the checks, the final manifest, the fds parked, the state
    "committing". A dry run ends after the checks with its plan."""
    if ctx.state.phase is not Phase.PREPARED:
        raise NotPrepared(f"nothing is prepared (state {ctx.state.phase.value}); run "
                          "prepare first")
    check_policy(ctx, options)
    waiting = [c.name + (" (its owner disconnected)" if c.owner_gone else "")
               for c in ctx.clients.values() if not c.ready]
    if waiting and not options.force:
        raise Busy(f"session(s) not ready: {', '.join(waiting)}; wait for their owners "
                   "(a new connection of the same uid can SetReady), or commit them as "
                   "they are: kho-agentctl commit --force (over D-Bus, Commit's option "
                   "\"force\": true)")
    # checked before the dry run answers, so that its "would go ahead" holds
    if not ctx.host.kexec.loaded():
        raise NotPrepared("the prepared kernel is no longer loaded (kexec -u or another "
                          "loader?); cancel and prepare again")
    mode = ctx.handoff_mode()
    plan = [f"kernel {ctx.state.target.kernel if ctx.state.target else '?'} is loaded",
            f"{len(ctx.clients)} client session(s), "
            f"{sum(len(c.files) for c in ctx.clients.values())} file(s)",
            f"final manifest to {ctx.store.manifest_path} and session {AGENT_SESSION}",
            f"reboot via {mode}"
            + (" (session fds parked in systemd's fd store, /dev/liveupdate closed)"
               if mode == "fdstore" else "")]
    if options.dry_run:
        return CommitResult(True, None, plan)
    start = time.perf_counter()
    info = ctx.sysinfo()
    # The network was recorded at prepare: reading it again (pyroute2) would add to
    # the blackout for no gain.
    manifest = build_manifest(ctx, info, ctx.state.target.cmdline if ctx.state.target
                              else info.cmdline, ctx.plan, final=True,
                              network=ctx.prepared.network if ctx.prepared else None)
    write_atomic(ctx.store.manifest_path, manifest_to_json(manifest))
    replace_agent_session(ctx, manifest)
    if mode == "fdstore":
        _park_sessions(ctx)
        if ctx.device is not None:  # systemd-shutdown opens it: it opens only once
            ctx.device.close()
            ctx.device = None
    ctx.on_progress(90)
    handoff = time.perf_counter() - start
    # not strict: a state that cannot be saved must not stop the kexec (the next boot
    # finds "prepared" from another boot, which means the same: verify)
    # committed_at: where the history's blackout starts (in the state, which is written here
    # anyway: the history itself is not rewritten inside the blackout)
    ctx.transition(Phase.COMMITTING, "handing off to the loaded kernel", strict=False,
                   handoff_seconds=handoff, committed_at=time.time())
    return plan, mode, handoff
