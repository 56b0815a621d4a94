"""systemd's fd store as the agent's SessionFdStore (hand-off mode fdstore: engine/handoff.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..engine.handoff import session_fdname, session_from_fdname
from ..errors import AgentError, PreflightFailed
from .notify import Notifier


@dataclass
class NotifierSessionStore:
    """Parks session fds with FDSTORE=1 (FDPOLL=0: session fds cannot be polled) under the
    session's own FDNAME, and drops them with FDSTOREREMOVE=1."""

    notifier: Notifier

    @property
    def capacity(self) -> int:
        return self.notifier.fdstore_max

    def park(self, name: str, fd: int) -> None:
        if not self.notifier.store_fds(session_fdname(name), [fd]):
            raise PreflightFailed(f"cannot park session {name!r} in systemd's fd store: "
                                  f"{self.notifier.last_error or 'no notify socket'}; the "
                                  "update stays prepared")

    def unpark(self, name: str) -> None:
        if not self.notifier.remove_fds(session_fdname(name)):
            raise AgentError(f"FDSTOREREMOVE for session {name!r} was not delivered: "
                             f"{self.notifier.last_error or 'no notify socket'}")


def take_stored_sessions(listened: Mapping[str, list[int]],
                         log: Callable[[str], None]) -> dict[str, int]:
    """The session fds among those systemd passed at start (LISTEN_FDS), by session name. Fds
    under other names are not the agent's: they are closed, as is any second fd stored under
    one session's name (one session is one fd)."""
    sessions: dict[str, int] = {}
    for fdname, fds in listened.items():
        name = session_from_fdname(fdname)
        if name is None:
            log(f"closing {len(fds)} fd(s) named {fdname!r} from the fd store: not a session")
            for fd in fds:
                os.close(fd)
            continue
        sessions[name] = fds[0]
        for extra in fds[1:]:
            log(f"closing an extra fd stored for session {name!r}")
            os.close(extra)
    return sessions
