"""Exported objects on a Gio connection: one interface of the contract (contract.py) per
registration, methods dispatched to Python callables, properties read from a getter,
PropertiesChanged emitted on request. Every reply, property value and signal is typed by the
contract's declaration of it: a handler passes values, never a signature.

Gio rather than pydbus on the service side: methods here pass unix fds (pydbus cannot), and the
error names must be exactly ours (`org.khoagent.Agent1.Error.<Name>`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gi.repository import Gio, GLib

from ..errors import AgentError, InvalidArgument
from .contract import Interface, Method

PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
# Up to GLib 2.82, PyGObject's register_object is g_dbus_connection_register_object_with_closures,
# whose closure marshaller hands the method invocation over with one reference more than the
# binding ever drops (GLib issue 3560; GLib 2.84 added ..._closures2 with sane counting). Each
# answered call then kept its message, its arguments and every fd it carried, for ever: any
# caller could exhaust the daemon's fds and memory with refused calls. The extra reference is
# dropped once the call is answered, and only where register_object is the old function.
def _invocation_keeps_extra_ref() -> bool:
    register = Gio.DBusConnection.register_object
    get_symbol = getattr(register, "get_symbol", None)
    if get_symbol is None:
        # newer PyGObject (sid's 3.58) overrides register_object in Python, as a call of
        # ..._closures2 where GLib has it: the introspected function is not reachable here.
        return not hasattr(Gio.DBusConnection, "register_object_with_closures2")
    return bool(get_symbol() == "g_dbus_connection_register_object_with_closures")


_INVOCATION_KEEPS_EXTRA_REF = _invocation_keeps_extra_ref()
MESSAGE_MAX = 4096  # an error message longer than this is cut: callers may send megabytes


@dataclass
class Call:
    """One incoming method call: its arguments, the caller, and the way to answer it."""

    sender: str
    path: str
    declared: Method
    args: tuple[Any, ...]
    invocation: Gio.DBusMethodInvocation
    answered: bool = False

    @property
    def method(self) -> str:
        return self.declared.name

    @property
    def interactive(self) -> bool:
        flags = self.invocation.get_message().get_flags()
        return bool(flags & Gio.DBusMessageFlags.ALLOW_INTERACTIVE_AUTHORIZATION)

    def fd(self, index: int) -> int:
        """The unix fd an `h` argument refers to: a new descriptor the caller must close."""
        fds = self.invocation.get_message().get_unix_fd_list()
        if fds is None or not 0 <= index < fds.get_length():
            raise InvalidArgument(f"{self.method}: fd argument {index} was not passed (send the "
                                  "fd in the message's unix fd list)")
        try:
            fd: int = fds.get(index)
        except GLib.Error as exc:
            raise InvalidArgument(f"{self.method}: the passed fd cannot be used: "
                                  f"{exc.message}") from exc
        return fd

    def option_signatures(self, position: int) -> dict[str, str]:
        """The variant type of each a{sv} entry at argument `position` (Python values lose
        the difference between e.g. `t` and `x`)."""
        variant = self.invocation.get_parameters().get_child_value(position)
        out: dict[str, str] = {}
        for i in range(variant.n_children()):
            entry = variant.get_child_value(i)
            key = entry.get_child_value(0).get_string()
            out[key] = entry.get_child_value(1).get_variant().get_type_string()
        return out

    def options(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The method's a{sv} argument: (its values, the variant type of each entry)."""
        position = self.declared.options_position
        return self.args[position], self.option_signatures(position)

    def reply(self, *values: Any, fds: list[int] | None = None) -> None:
        """Answer with the method's declared out arguments; `fds` are duplicated into the reply
        (the caller keeps its own)."""
        variant = GLib.Variant(self.declared.out_type, values) if self.declared.out_args \
            else None
        if fds:
            fd_list = Gio.UnixFDList.new()
            for fd in fds:
                fd_list.append(fd)  # dups
            self.invocation.return_value_with_unix_fd_list(variant, fd_list)
        else:
            self.invocation.return_value(variant)
        self._answered()

    def fail(self, exc: AgentError) -> None:
        message = exc.message
        if len(message) > MESSAGE_MAX:
            message = message[:MESSAGE_MAX] + f"... ({len(exc.message)} characters)"
        self.invocation.return_dbus_error(exc.dbus_name, message)
        self._answered()

    def _answered(self) -> None:
        """The call is over: the fds it carried are closed now (not when a garbage collector
        gets to a cycle that holds the message), and the invocation is let go."""
        if self.answered:
            return
        self.answered = True
        invocation = self.invocation
        fds = invocation.get_message().get_unix_fd_list()
        if fds is not None:
            for fd in fds.steal_fds():  # what the handler kept, it took with fd(): dups
                os.close(fd)
        if _INVOCATION_KEEPS_EXTRA_REF:
            invocation._unref()
        self.invocation = None  # closures that still hold this Call do not hold the message


Handler = Callable[[Call], None]
Getter = Callable[[str], Any]   # a property's value, as Python (its type is the contract's)


class ExportedObject:
    def __init__(self, bus: Gio.DBusConnection, path: str, declared: Interface,
                 methods: dict[str, Handler], getter: Getter) -> None:
        """Register `declared` at `path`: `methods` must handle exactly its methods."""
        unknown = sorted(set(methods) - {m.name for m in declared.methods})
        missing = sorted({m.name for m in declared.methods} - set(methods))
        if unknown or missing:
            raise ValueError(f"{declared.name} at {path}: handlers for undeclared methods "
                             f"{unknown}, declared methods without one {missing}")
        self.bus = bus
        self.path = path
        self.declared = declared
        self.interface = Gio.DBusNodeInfo.new_for_xml(declared.xml()).interfaces[0]
        self.methods = methods
        self.getter = getter
        self.registration = bus.register_object(path, self.interface, self._method_call,
                                                self._get_property, None)

    def _method_call(self, _conn: Gio.DBusConnection, sender: str, path: str, _iface: str,
                     method: str, params: GLib.Variant,
                     invocation: Gio.DBusMethodInvocation) -> None:
        # Gio checked the name and the signature against the XML: both are declared
        call = Call(sender, path, self.declared.method(method), tuple(params.unpack()),
                    invocation)
        handler = self.methods[method]
        try:
            handler(call)
        except AgentError as exc:  # raised before any work started: nothing changed
            call.fail(exc)

    def _get_property(self, _conn: Gio.DBusConnection, _sender: str, _path: str, _iface: str,
                      name: str) -> GLib.Variant:
        return self.value(name)

    def value(self, name: str) -> GLib.Variant:
        """A property's value, typed as the contract declares it."""
        return GLib.Variant(self.declared.prop(name).signature, self.getter(name))

    def changed(self, names: list[str]) -> None:
        if not names or self.registration == 0:
            return
        values = {n: self.value(n) for n in names}
        self.bus.emit_signal(None, self.path, PROPERTIES_IFACE, "PropertiesChanged",
                             GLib.Variant("(sa{sv}as)", (self.interface.name, values, [])))

    def emit(self, signal: str, *values: Any) -> None:
        """Emit a signal of the interface with its declared arguments."""
        self.bus.emit_signal(None, self.path, self.declared.name, signal,
                             GLib.Variant(self.declared.signal(signal).type, values))

    def unregister(self) -> None:
        if self.registration:
            self.bus.unregister_object(self.registration)
            self.registration = 0
