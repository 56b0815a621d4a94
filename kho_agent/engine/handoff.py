"""Hand-off mode `fdstore`: the session fds parked in systemd's fd store across the kexec.

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

from typing import Protocol

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
