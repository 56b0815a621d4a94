"""sd_notify, the fd store, LISTEN_FDS and the verified target, for kho-agentd under systemd.

The notify protocol is spoken directly over an AF_UNIX datagram socket rather than through
systemd-python's `systemd.daemon.notify`. That function can carry fd-store fds (its `fds=`
argument sends them as SCM_RIGHTS: `notify("FDSTORE=1\nFDNAME=x", fds=[fd])` delivers the fd,
tried with systemd-python 235); it is not used because:
- it raises an OSError when the socket is stale or gone (FileNotFoundError, ECONNREFUSED), and in
  hand-off mode "direct" the agent outlives PID 1's notify socket (systemd-shutdown replaces
  PID 1 while the agent still holds the sessions): a watchdog ping then must fail quietly with
  the reason kept (`last_error`), and the limits systemd and the kernel put on one message
  (NOTIFY_BUFFER_MAX, SCM_MAX_FD) are checked here before anything is sent;
- one small code path for every message, whose bytes a test captures on a real socket, and no
  C extension on the daemon's path to PID 1.

Without NOTIFY_SOCKET (not started by systemd: a terminal, the tests, `--simulate`) every message
is a no-op that returns False. A message that cannot be delivered also returns False and leaves
the reason in `Notifier.last_error`; nothing here raises for a lost notification, except
`start_verified_target`, whose failure an operator has to see.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import subprocess
import tempfile
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AgentError, InvalidArgument, NotFound, errno_text

# The kernel refuses more fds than this in one SCM_RIGHTS message (include/net/scm.h SCM_MAX_FD).
SCM_MAX_FD = 253
# systemd reads at most this many bytes of one notification (NOTIFY_BUFFER_MAX = PIPE_BUF).
NOTIFY_BUFFER_MAX = 4096
STATUS_MAX = 1024  # bytes of STATUS= text kept; the rest of a long message is cut
# systemd's fdname_is_valid(): at most 255 printable ASCII characters, none of them ':'.
FDNAME_MAX = 255
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START

VERIFIED_TARGET = "kho-agent-verified.target"
VERIFIED_FLAG = "verified"  # in the runtime directory; kho-agent-verified.target's condition
DEFAULT_RUNTIME_DIR = Path("/run/kho-agent")  # RuntimeDirectory=kho-agent
SYSTEMCTL_TIMEOUT = 30.0  # seconds; `start --no-block` only queues a job


def fdname_is_valid(name: str) -> bool:
    """What systemd accepts as FDNAME= (and hands back in LISTEN_FDNAMES): 1..255 printable ASCII
    characters without ':'. A LUO session name may hold any byte: fdstore.session_fdname maps
    it."""
    return (0 < len(name) <= FDNAME_MAX
            and all(" " <= ch < "\x7f" and ch != ":" for ch in name))


def _one_line(text: str, limit: int) -> str:
    """`text` as a single notify value: every control character (a newline would start another
    assignment, e.g. a forged READY=1) becomes a space, and it is cut to `limit` UTF-8 bytes."""
    flat = "".join(" " if ch < " " or ch == "\x7f" else ch for ch in text)
    raw = flat.encode("utf-8")
    if len(raw) <= limit:
        return flat
    return raw[:limit].decode("utf-8", errors="ignore")


def _socket_address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as an address for sendmsg: a path, or '@name' for an abstract socket. Other
    forms (systemd's vsock: notation, for guests) are not ours to serve: None."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", errors="surrogateescape")
    if value.startswith("/"):
        return value
    return None


@dataclass
class Notifier:
    """The service side of systemd's notify protocol for one process.

    Build it with `Notifier.from_env()` at start; it reads NOTIFY_SOCKET, WATCHDOG_USEC,
    WATCHDOG_PID, FDSTORE and RUNTIME_DIRECTORY once. `last_error` holds the reason the latest
    message could not be sent (None after a delivered one)."""

    socket_path: str | None = None           # NOTIFY_SOCKET as given ("/run/..." or "@name")
    watchdog_usec: int | None = None         # WATCHDOG_USEC, when meant for this process
    fdstore_max: int = 0                     # FDSTORE: FileDescriptorStoreMax= (systemd >= 254)
    runtime_dir: Path = DEFAULT_RUNTIME_DIR  # RUNTIME_DIRECTORY (first entry)
    environ: MutableMapping[str, str] = field(default_factory=lambda: os.environ)
    last_error: str | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None,
                 pid: int | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        me = os.getpid() if pid is None else pid
        watchdog = None
        usec = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for: a child that inherited the
        # environment must not ping in its parent's name
        if usec.isdigit() and int(usec) > 0 and (not owner or owner == str(me)):
            watchdog = int(usec)
        fdstore = env.get("FDSTORE", "")
        runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return cls(socket_path=env.get("NOTIFY_SOCKET") or None,
                   watchdog_usec=watchdog,
                   fdstore_max=int(fdstore) if fdstore.isdigit() else 0,
                   runtime_dir=Path(runtime) if runtime else DEFAULT_RUNTIME_DIR,
                   environ=env)

    @property
    def enabled(self) -> bool:
        """Started by systemd with a notify socket."""
        return self.socket_path is not None

    # ------------------------------------------------------------------ the messages

    def notify(self, state: str, fds: Sequence[int] = ()) -> bool:
        """Send one notification (newline-separated assignments) with `fds` attached as
        SCM_RIGHTS. True when the datagram was delivered to the socket."""
        if self.socket_path is None:
            return False
        address = _socket_address(self.socket_path)
        if address is None:
            self.last_error = f"NOTIFY_SOCKET={self.socket_path!r} is not a path or @name"
            return False
        data = state.encode("utf-8")
        if len(data) > NOTIFY_BUFFER_MAX:
            self.last_error = (f"notification of {len(data)} bytes is longer than systemd reads "
                               f"({NOTIFY_BUFFER_MAX})")
            return False
        if len(fds) > SCM_MAX_FD:
            self.last_error = f"{len(fds)} fds in one message; the kernel takes {SCM_MAX_FD}"
            return False
        ancillary = []
        if fds:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", fds).tobytes()))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendmsg([data], ancillary, 0, address)
        except OSError as exc:
            # the manager is gone (ECONNREFUSED/ENOENT after PID 1 handed over to
            # systemd-shutdown), its queue is full (EAGAIN), or an fd is bad (EBADF)
            self.last_error = f"sd_notify to {self.socket_path}: {errno_text(exc)}"
            return False
        self.last_error = None
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: the bus name is owned and the agent answers (Type=notify start-up ends)."""
        state = "READY=1"
        if status is not None:
            state += "\nSTATUS=" + _one_line(status, STATUS_MAX)
        return self.notify(state)

    def status(self, text: str) -> bool:
        """STATUS=: the one line `systemctl status kho-agent` shows."""
        return self.notify("STATUS=" + _one_line(text, STATUS_MAX))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1. Without a watchdog for this process it is not sent at all."""
        if self.watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """How often to ping, in seconds: half of WATCHDOG_USEC (sd_watchdog_enabled's advice),
        or None when systemd does not watch this process."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: during start-up or stop, ask for `seconds` more than the unit's
        timeout (e.g. while a long verification runs before READY=1)."""
        if seconds <= 0:
            raise InvalidArgument(f"extend_timeout needs a positive number of seconds, not "
                                  f"{seconds}")
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    # ------------------------------------------------------------------ the fd store

    def store_fds(self, name: str, fds: Sequence[int], *, poll: bool = False) -> bool:
        """Park `fds` in the unit's fd store under `name` (FDSTORE=1, FDNAME=): systemd keeps
        duplicates and hands them back in LISTEN_FDS after a restart, and with
        FileDescriptorStorePreserve=yes on systemd >= 261 across a kexec (LUO session fds and
        memfds). More than SCM_MAX_FD fds go in several messages under the same name.

        `poll=False` sends FDPOLL=0: systemd does not watch the fds for POLLHUP (session fds and
        memfds cannot be polled). False when nothing could be stored: no notify socket, no fd
        store for this service (FDSTORE unset or 0), or a send failed (`last_error`; messages
        sent before it stay stored). Every stored fd needs `remove_fds` when its session ends,
        or systemd keeps the session alive."""
        if not fdname_is_valid(name):
            raise InvalidArgument(f"{name!r} is not a valid fd store name: use 1 to "
                                  f"{FDNAME_MAX} printable ASCII characters without ':'")
        if not fds:
            raise InvalidArgument(f"store_fds({name!r}) got no fds to store")
        if self.socket_path is None:
            return False
        if self.fdstore_max <= 0:
            self.last_error = ("this service has no fd store (FDSTORE is unset or 0): install "
                               "kho-agent-fdstore.conf, which sets FileDescriptorStoreMax=")
            return False
        header = f"FDSTORE=1\nFDNAME={name}" + ("" if poll else "\nFDPOLL=0")
        for start in range(0, len(fds), SCM_MAX_FD):
            if not self.notify(header, fds[start:start + SCM_MAX_FD]):
                return False
        return True

    def remove_fds(self, name: str) -> bool:
        """FDSTOREREMOVE=1: systemd closes every fd it stores under `name`."""
        if not fdname_is_valid(name):
            raise InvalidArgument(f"{name!r} is not a valid fd store name: use 1 to "
                                  f"{FDNAME_MAX} printable ASCII characters without ':'")
        return self.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")

    def listen_fds(self, pid: int | None = None) -> dict[str, list[int]]:
        """The fds systemd passed at start (LISTEN_FDS from fd 3 on, named by LISTEN_FDNAMES),
        grouped by name in order; {} when there are none or they are meant for another process
        (LISTEN_PID). Each gets FD_CLOEXEC, so no child inherits a session; the three variables
        are removed from the environment either way, as sd_listen_fds(unset_environment=1)
        does."""
        env = self.environ
        count_text = env.pop("LISTEN_FDS", None)
        owner = env.pop("LISTEN_PID", None)
        names_text = env.pop("LISTEN_FDNAMES", None)
        me = os.getpid() if pid is None else pid
        if count_text is None or owner is None or owner != str(me):
            return {}
        if not count_text.isdigit():
            raise InvalidArgument(f"LISTEN_FDS={count_text!r} is not a number of fds")
        count = int(count_text)
        if count == 0:
            return {}
        names = names_text.split(":") if names_text is not None else ["unknown"] * count
        if len(names) != count:
            raise InvalidArgument(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS="
                                  f"{count}: the environment does not come from systemd")
        out: dict[str, list[int]] = {}
        for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names,
                            strict=True):
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            except OSError as exc:
                raise InvalidArgument(f"LISTEN_FDS={count} but fd {fd} is not open "
                                      f"({errno_text(exc)}): the environment does not come "
                                      "from systemd") from exc
            out.setdefault(name, []).append(fd)
        return out

    # ------------------------------------------------------------------ the verified target

    def start_verified_target(self, summary: str, systemctl: str = "systemctl") -> bool:
        """After a successful verification: write `<runtime dir>/verified` (the target's
        ConditionPathExists=, with `summary` in it) and queue kho-agent-verified.target with
        `systemctl start --no-block`. Units ordered after the target start then.

        False (nothing done) when not started by systemd. Raises NotFound when systemctl is
        missing and AgentError when it fails; the flag is written either way, since the
        verification did succeed. Blocks for the systemctl process: call it off the main loop."""
        if self.socket_path is None:
            return False
        self._write_flag(summary)
        command = [systemctl, "start", "--no-block", VERIFIED_TARGET]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=SYSTEMCTL_TIMEOUT)
        except FileNotFoundError as exc:
            raise NotFound(f"{systemctl} not found: cannot start {VERIFIED_TARGET}; units "
                           f"ordered after it will not run") from exc
        except subprocess.TimeoutExpired as exc:
            raise AgentError(f"`{' '.join(command)}` did not return within "
                             f"{SYSTEMCTL_TIMEOUT:.0f} s; check `systemctl list-jobs`") from exc
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout.strip() or "no output"
            raise AgentError(f"`{' '.join(command)}` failed with exit status "
                             f"{proc.returncode}: {detail}")
        return True

    def _write_flag(self, summary: str) -> None:
        directory = self.runtime_dir
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{VERIFIED_FLAG}.", dir=directory)
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(summary if summary.endswith("\n") else summary + "\n")
                os.chmod(tmp, 0o644)  # the condition is evaluated by PID 1, others may read it
                os.replace(tmp, directory / VERIFIED_FLAG)
            except OSError:
                os.unlink(tmp)
                raise
        except OSError as exc:
            raise AgentError(f"cannot write {directory / VERIFIED_FLAG} ({errno_text(exc)}):"
                             f" {VERIFIED_TARGET} would not be reached; is RuntimeDirectory="
                             "kho-agent set in the unit?") from exc
