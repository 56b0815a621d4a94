"""Who is calling, and may they: the caller's uid from the bus, root always, others through
polkit (one action per class of verb). Every call is asynchronous: the main loop never waits on
the bus daemon or on polkit (which may be asking a human for a password).

Under load the daemon's own questions are the risk: the bus allows one connection a bounded
number of calls awaiting replies (max_replies_per_connection, 128 on Debian's system bus), and
beyond it the bus answers with an error instead of forwarding, which once made authorized
callers PermissionDenied. So:
- a caller's uid is asked once per connection and cached until that connection goes away (a
  unique bus name is never reused, and its uid cannot change);
- questions for the same thing (uid of one sender; one action for one sender) share one call;
- at most MAX_IN_FLIGHT questions to the bus driver and polkit are outstanding; the rest wait in
  order. A burst is served, slower, never refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gi.repository import Gio, GLib

from ..errors import AgentError, Busy, PermissionDenied

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
POLKIT_ALLOW_USER_INTERACTION = 1
CALL_TIMEOUT_MS = 25_000  # polkit may wait for an authentication agent
# well below the bus's per-connection reply limit (128), leaving room for the daemon's other
# calls (systemd, the notify path)
MAX_IN_FLIGHT = 32
# distinct callers whose uid is remembered; connections that vanish are dropped at once, this
# only bounds a flood of short-lived connections whose NameOwnerChanged is still in flight
MAX_CACHED_CALLERS = 4096
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
# The bus errors that mean "the caller is gone" (not "the bus is overloaded")
_GONE = ("org.freedesktop.DBus.Error.NameHasNoOwner",)
# ... and those that mean "not now": the caller may try again, it is not refused
_TRANSIENT = ("org.freedesktop.DBus.Error.LimitsExceeded", "org.freedesktop.DBus.Error.NoReply",
              "org.freedesktop.DBus.Error.Timeout", "org.freedesktop.DBus.Error.TimedOut")


def _remote_name(error: GLib.Error | None) -> str | None:
    if error is None:
        return None
    name: str | None = Gio.DBusError.get_remote_error(error)
    return name


@dataclass(frozen=True)
class Caller:
    sender: str   # unique bus name, e.g. ":1.42"
    uid: int

    @property
    def owner(self) -> str:
        """How a session's owner is recorded in the manifest (survives the kexec)."""
        return f"uid:{self.uid}"


def owner_uid(owner: str) -> int | None:
    """The uid in a manifest owner string ("uid:1000"); None for other forms."""
    if owner.startswith("uid:") and owner[4:].isdigit():
        return int(owner[4:])
    return None


IdentifyDone = Callable[[Caller | None, AgentError | None], None]
AuthorizeDone = Callable[[AgentError | None], None]
Reply = Callable[[GLib.Variant | None, GLib.Error | None], None]


@dataclass
class _Question:
    bus: Gio.DBusConnection
    dest: str
    path: str
    iface: str
    method: str
    args: GLib.Variant
    reply_type: str
    answers: list[Reply]


class Authorizer:
    def __init__(self, bus: Gio.DBusConnection, polkit_bus: Gio.DBusConnection | None) -> None:
        """`polkit_bus` is the system bus when the daemon serves the system bus; None on a
        private or session bus, where polkit cannot identify callers and only root may act."""
        self.bus = bus
        self.polkit_bus = polkit_bus
        self.uids: dict[str, int] = {}
        self._asked: dict[tuple[str, ...], _Question] = {}
        self._waiting: deque[tuple[tuple[str, ...], _Question]] = deque()
        self._in_flight = 0
        self.gone_callbacks: list[Callable[[str], None]] = []
        # unique names whose connection closed lately (they are never reused): a call that
        # finishes after its caller left can tell
        self._gone: dict[str, None] = {}
        self._watch = bus.signal_subscribe(
            DBUS_NAME, DBUS_NAME, "NameOwnerChanged", DBUS_PATH, None,
            Gio.DBusSignalFlags.NONE, self._name_owner_changed)

    def gone(self, sender: str) -> bool:
        """The caller's connection has closed (as far as the bus told us yet)."""
        return sender in self._gone

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        self.bus.signal_unsubscribe(self._watch)

    def _name_owner_changed(self, _conn: Gio.DBusConnection, _sender: str, _path: str,
                            _iface: str, _signal: str, params: GLib.Variant) -> None:
        name, _old, new = params.unpack()
        if name.startswith(":") and not new:
            self.uids.pop(name, None)
            self._gone[name] = None
            if len(self._gone) > MAX_CACHED_CALLERS:
                del self._gone[next(iter(self._gone))]
            for callback in self.gone_callbacks:
                callback(name)

    # ------------------------------------------------------------------ the question queue

    def _ask(self, key: tuple[str, ...], question: _Question) -> None:
        shared = self._asked.get(key)
        if shared is not None:  # the same question is on its way: share its answer
            shared.answers.extend(question.answers)
            return
        self._asked[key] = question
        if self._in_flight >= MAX_IN_FLIGHT:
            self._waiting.append((key, question))
            return
        self._send(key, question)

    def _send(self, key: tuple[str, ...], q: _Question) -> None:
        self._in_flight += 1

        def replied(conn: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            self._in_flight -= 1
            self._asked.pop(key, None)
            reply: GLib.Variant | None = None
            error: GLib.Error | None = None
            try:
                reply = conn.call_finish(result)
            except GLib.Error as exc:
                error = exc
            for answer in q.answers:
                answer(reply, error)
            while self._waiting and self._in_flight < MAX_IN_FLIGHT:
                self._send(*self._waiting.popleft())

        q.bus.call(q.dest, q.path, q.iface, q.method, q.args,
                   GLib.VariantType.new(q.reply_type), Gio.DBusCallFlags.NONE,
                   CALL_TIMEOUT_MS, None, replied)

    # ------------------------------------------------------------------ identity

    def identify(self, sender: str, done: IdentifyDone) -> None:
        uid = self.uids.get(sender)
        if uid is not None:
            done(Caller(sender, uid), None)
            return

        def answered(reply: GLib.Variant | None, error: GLib.Error | None) -> None:
            if reply is None:
                message = error.message if error is not None else "no answer"
                if _remote_name(error) in _GONE:
                    done(None, PermissionDenied(f"cannot tell who {sender} is: {message}"))
                else:
                    done(None, Busy(f"cannot ask the bus who {sender} is now ({message}); "
                                    "try again"))
                return
            uid = int(reply.unpack()[0])
            if len(self.uids) >= MAX_CACHED_CALLERS:
                self.uids.pop(next(iter(self.uids)))
            self.uids[sender] = uid
            done(Caller(sender, uid), None)

        self._ask(("uid", sender), _Question(
            self.bus, DBUS_NAME, DBUS_PATH, DBUS_NAME, "GetConnectionUnixUser",
            GLib.Variant("(s)", (sender,)), "(u)", [answered]))

    # ------------------------------------------------------------------ polkit

    def authorize(self, caller: Caller, action: str, interactive: bool,
                  done: AuthorizeDone) -> None:
        if caller.uid == 0:
            done(None)
            return
        if self.polkit_bus is None:
            done(PermissionDenied(f"uid {caller.uid} may not do this: it needs root or the "
                                  f"polkit action {action}, and polkit is only consulted on "
                                  "the system bus"))
            return

        def answered(reply: GLib.Variant | None, error: GLib.Error | None) -> None:
            if reply is None:
                message = error.message if error is not None else "no answer"
                if _remote_name(error) in _TRANSIENT:
                    done(Busy(f"polkit did not answer about {action} in time ({message}); "
                              "try again"))
                else:
                    done(PermissionDenied(f"polkit could not be asked about {action} "
                                          f"({message}); run as root, or start polkit"))
                return
            authorized, challenge, _details = reply.unpack()[0]
            if authorized:
                done(None)
            elif challenge:
                done(PermissionDenied(f"{action} needs authentication: call with interactive "
                                      "authorization allowed (e.g. busctl without "
                                      "--allow-interactive-authorization=no) or as root"))
            else:
                done(PermissionDenied(f"uid {caller.uid} is not allowed {action} (polkit said "
                                      "no); ask an administrator for a polkit rule"))

        subject = ("system-bus-name", {"name": GLib.Variant("s", caller.sender)})
        flags = POLKIT_ALLOW_USER_INTERACTION if interactive else 0
        self._ask(("polkit", caller.sender, action, str(flags)), _Question(
            self.polkit_bus, POLKIT_NAME, POLKIT_PATH, POLKIT_IFACE, "CheckAuthorization",
            GLib.Variant("((sa{sv})sa{ss}us)", (subject, action, {}, flags, "")),
            "((bba{ss}))", [answered]))
