"""Errors on the bus: every AgentError becomes `org.khoagent.Agent1.Error.<Name>` with its message
(a KernelRefused keeps the kernel's errno in the message: "PRESERVE_FD failed: EBUSY (...)"), and
the argument checks that turn a malformed call into InvalidArgument before anything changes."""

from __future__ import annotations

import errno as errno_mod
import math
import re
from typing import Any

from .. import errors as errors_mod
from ..errors import AgentError, InvalidArgument, KernelRefused
from .interfaces import ERROR_PREFIX

INTERNAL = ERROR_PREFIX + "Failed"
# "... failed: EBUSY (Device or resource busy): ..." as KernelRefused formats it
_ERRNO_IN_MESSAGE = re.compile(r"failed: (E[A-Z0-9]+) \(")


def errno_from_message(message: str) -> int | None:
    """The errno a KernelRefused message carries, for clients that get it over D-Bus."""
    found = _ERRNO_IN_MESSAGE.search(message)
    if found is None:
        return None
    value = getattr(errno_mod, found.group(1), None)
    return value if isinstance(value, int) else None


def from_dbus(name: str, message: str) -> AgentError:
    """Rebuild an agent error from a D-Bus error (client side), keeping its name and exit code.
    A name that is not ours (the bus refused, a timeout) is a plain AgentError."""
    short = name[len(ERROR_PREFIX):] if name.startswith(ERROR_PREFIX) else None
    for cls in (errors_mod.InvalidArgument, errors_mod.Busy, errors_mod.NotPrepared,
                errors_mod.PreflightFailed, errors_mod.AbiMismatch, errors_mod.PermissionDenied,
                errors_mod.NotFound, errors_mod.StateCorrupt, errors_mod.VerificationFailed):
        if cls.name == short:
            return cls(message)
    if short == KernelRefused.name:
        err = errno_from_message(message) or errno_mod.EIO
        refused = KernelRefused("", err, "")
        refused.message = message  # the daemon's text, verbatim
        refused.args = (message,)
        return refused
    return AgentError(f"{name}: {message}" if short is None else message)


def check_options(options: dict[str, Any], allowed: dict[str, str], method: str,
                  signatures: dict[str, str]) -> dict[str, Any]:
    """Validate an a{sv} dictionary: known keys only, each with the variant type the contract
    gives, non-negative finite numbers. `signatures` maps each key to the signature the variant
    actually had (GLib keeps it; Python values alone cannot tell `t` from `x`)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        want = allowed.get(key)
        if want is None:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidArgument(f"{method}: unknown option {key!r} (known: {known})")
        got = signatures.get(key)
        if got != want:
            raise InvalidArgument(f"{method}: option {key!r} must be of type {want!r}, not "
                                  f"{got!r}")
        if want == "d" and (not math.isfinite(value) or value < 0):
            raise InvalidArgument(f"{method}: option {key!r} must be a finite number >= 0")
        if want == "s" and "\0" in value:
            raise InvalidArgument(f"{method}: option {key!r} contains a NUL byte")
        out[key] = value
    return out
