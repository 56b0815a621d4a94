"""Who is calling, and may they: the caller's uid from the bus, root always, others through
polkit (one action per class of verb). Every call is asynchronous: the main loop never waits on
the bus daemon or on polkit (which may be asking a human for a password)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gi.repository import Gio, GLib

from ..errors import AgentError, PermissionDenied

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
POLKIT_ALLOW_USER_INTERACTION = 1
CALL_TIMEOUT_MS = 25_000  # polkit may wait for an authentication agent


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


class Authorizer:
    def __init__(self, bus: Gio.DBusConnection, polkit_bus: Gio.DBusConnection | None) -> None:
        """`polkit_bus` is the system bus when the daemon serves the system bus; None on a
        private or session bus, where polkit cannot identify callers and only root may act."""
        self.bus = bus
        self.polkit_bus = polkit_bus

    def identify(self, sender: str, done: IdentifyDone) -> None:
        def replied(conn: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                reply = conn.call_finish(result)
            except GLib.Error as exc:
                done(None, PermissionDenied(f"cannot tell who {sender} is: {exc.message}"))
                return
            done(Caller(sender, int(reply.unpack()[0])), None)

        self.bus.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                      "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)),
                      GLib.VariantType.new("(u)"), Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS,
                      None, replied)

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

        def replied(conn: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            try:
                reply = conn.call_finish(result)
            except GLib.Error as exc:
                done(PermissionDenied(f"polkit could not be asked about {action} ({exc.message}); "
                                      "run as root, or start polkit"))
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
        self.polkit_bus.call(POLKIT_NAME, POLKIT_PATH, POLKIT_IFACE, "CheckAuthorization",
                             GLib.Variant("((sa{sv})sa{ss}us)", (subject, action, {}, flags, "")),
                             GLib.VariantType.new("((bba{ss}))"), Gio.DBusCallFlags.NONE,
                             CALL_TIMEOUT_MS, None, replied)
