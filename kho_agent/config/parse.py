"""The text of kho-agent.conf and its drop-ins -> AgentConfig. Pure: it is handed (path, bytes)
pairs in the order they apply and reads nothing itself.

The syntax is systemd's unit-file syntax, reduced: `[Section]` headers, `Key=Value` lines,
comments on lines of their own starting with `#` or `;`, blank lines. Whitespace around keys and
values is dropped; there are no quotes, no escapes and no continuation lines. Keys are
case-sensitive, as in systemd.

Each file is applied in turn and a later setting of a key replaces an earlier one; a list key
(MaintenanceWindow=, AppendCommandLine=) adds to the list instead, and an empty assignment
clears it (systemd's habit). A scalar key set twice in one file is an error (one of the two is a
mistake and the file alone cannot say which); across files, the later file wins.

Every error is ConfigInvalid, and its message starts `FILE:LINE:` and names the key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigInvalid
from .model import (
    HANDOFF_MODES,
    INITRD_AUTO,
    INITRD_NONE,
    TARGET_NEWEST_COMPATIBLE,
    TARGET_NONE,
    AgentConfig,
    Setting,
)
from .window import WindowSyntaxError, parse_window

VALUE_MAX = 4096          # bytes of one value (a command line fits; the kernel's limit is 2048+)
LIST_MAX = 32             # entries of a list key
SCRATCH_MARGIN_MAX = 10.0          # 1000 %, as the D-Bus ScratchPlan's margin option
CLAIM_GRACE_MAX = 30 * 24 * 3600.0
READY_TIMEOUT_MAX = 24 * 3600.0
HISTORY_MAX = 100_000

_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
               "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
               "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
               "d": 86400.0, "day": 86400.0, "days": 86400.0}
_TIME_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_BOOLEANS = {"1": True, "yes": True, "y": True, "true": True, "t": True, "on": True,
             "0": False, "no": False, "n": False, "false": False, "f": False, "off": False}


class BadValue(ValueError):
    """A value a key does not take; the message says which values it takes."""


# ------------------------------------------------------------------ value parsers

def parse_timespan(value: str) -> float | None:
    """Seconds, systemd-like: `1800`, `30min`, `1h 30min`, `infinity` (None)."""
    if value == "infinity":
        return None
    text = value.replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(text):
        match = _TIME_PART.match(text, pos)
        if match is None or match.group(2) not in _TIME_UNITS:
            raise BadValue(f"{value!r} is not a time span (e.g. 1800, 30min, 2h, infinity)")
        total += float(match.group(1)) * _TIME_UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise BadValue("a time span is required (e.g. 30min, or infinity)")
    return total


def _claim_grace(value: str) -> float | None:
    seconds = parse_timespan(value)
    if seconds is not None and not 1 <= seconds <= CLAIM_GRACE_MAX:
        raise BadValue(f"{value!r} is out of range: 1s .. 30d, or infinity")
    return seconds


def _ready_timeout(value: str) -> float:
    seconds = parse_timespan(value)
    if seconds is None or not 0 <= seconds <= READY_TIMEOUT_MAX:
        raise BadValue(f"{value!r} is out of range: 0 .. 24h (0: the clients must be ready at "
                       "once; an update always ends)")
    return seconds


def _boolean(value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise BadValue(f"{value!r} is not a boolean (yes or no)") from None


def _percent(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if match is None:
        raise BadValue(f"{value!r} is not a percentage (e.g. 25%)")
    fraction = float(match.group(1)) / 100
    if not 0 <= fraction <= SCRATCH_MARGIN_MAX or not math.isfinite(fraction):
        raise BadValue(f"{value!r} is out of range: 0% .. 1000%")
    return fraction


def _absolute_path(value: str, what: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise BadValue(f"{value!r} is not an absolute path ({what})")
    if len(value.encode()) >= 4096:
        raise BadValue(f"the path is longer than 4095 bytes ({what})")
    return os.path.normpath(value)


def _target(value: str) -> str:
    if value in ("", TARGET_NEWEST_COMPATIBLE):
        return value
    return _absolute_path(value, "Target= takes newest-compatible, a kernel image's path, or "
                          "nothing")


def _initrd(value: str) -> str:
    if value in ("", INITRD_AUTO):
        return INITRD_AUTO
    if value == INITRD_NONE:
        return value
    return _absolute_path(value, "Initrd= takes auto, none, or an initrd's path")


def _metrics_directory(value: str) -> str:
    return "" if not value else _absolute_path(value, "MetricsDirectory= takes a directory, "
                                                      "or nothing to write no metrics")


def _handoff(value: str) -> str:
    if value not in HANDOFF_MODES:
        raise BadValue(f"{value!r} is not a hand-off mode ({', '.join(HANDOFF_MODES)})")
    return value


def _history(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= HISTORY_MAX:
        raise BadValue(f"{value!r} is not a count 1 .. {HISTORY_MAX}")
    return int(value)


def _command_line(value: str) -> str | None:
    return value or None


def _words(value: str) -> str:
    return value


def _window(value: str) -> Any:
    try:
        return parse_window(value)
    except WindowSyntaxError as exc:
        raise BadValue(str(exc)) from None


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    field: str
    parse: Callable[[str], Any]
    is_list: bool = False


KEYS: tuple[Key, ...] = (
    Key("Prepare", "Target", "target", _target),
    Key("Prepare", "Initrd", "initrd", _initrd),
    Key("Prepare", "CommandLine", "command_line", _command_line),
    Key("Prepare", "AppendCommandLine", "append_command_line", _words, is_list=True),
    Key("Prepare", "ScratchMargin", "scratch_margin", _percent),
    Key("Commit", "HandoffMode", "handoff_mode", _handoff),
    Key("Commit", "MaintenanceWindow", "maintenance_window", _window, is_list=True),
    Key("Sessions", "ClaimGraceSec", "claim_grace_seconds", _claim_grace),
    Key("Sessions", "Digests", "digests", _boolean),
    Key("Update", "ReadyTimeoutSec", "update_ready_timeout_seconds", _ready_timeout),
    Key("Records", "MetricsDirectory", "metrics_directory", _metrics_directory),
    Key("Records", "HistoryMaxEntries", "history_max_entries", _history),
)
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS))


# ------------------------------------------------------------------ files

def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigInvalid(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at "
                            f"offset {exc.start})") from None


def _apply_file(config: AgentConfig, origins: dict[str, Setting], path: str,
                data: bytes) -> AgentConfig:
    text = _decode(path, data)
    section: str | None = None
    seen: dict[str, int] = {}   # scalar keys set in this file -> line
    values: dict[str, Any] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        where = f"{path}:{number}"
        if line.endswith("\\"):
            raise ConfigInvalid(f"{where}: continuation lines (a trailing backslash) are not "
                                "supported: write the value on one line")
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigInvalid(f"{where}: {line[:80]!r} is not a section header [Name]")
            section = line[1:-1].strip()
            if section not in SECTIONS:
                raise ConfigInvalid(f"{where}: unknown section [{section[:80]}] (known: "
                                    + ", ".join(f"[{s}]" for s in SECTIONS) + ")")
            continue
        if "=" not in line:
            raise ConfigInvalid(f"{where}: {line[:80]!r} is not Key=Value")
        name, value = (part.strip() for part in line.split("=", 1))
        if section is None:
            raise ConfigInvalid(f"{where}: {name[:80]}= comes before any section header")
        key = next((k for k in KEYS if k.section == section and k.name == name), None)
        if key is None:
            elsewhere = [k.section for k in KEYS if k.name == name]
            hint = (f" (it belongs in [{elsewhere[0]}])" if elsewhere
                    else " (known: " + ", ".join(k.name for k in KEYS
                                                 if k.section == section) + ")")
            raise ConfigInvalid(f"{where}: unknown key {name[:80]}= in [{section}]{hint}")
        if len(value.encode()) > VALUE_MAX:
            raise ConfigInvalid(f"{where}: [{section}] {name}=: the value is longer than "
                                f"{VALUE_MAX} bytes")
        if not key.is_list:
            if name in seen:
                raise ConfigInvalid(f"{where}: [{section}] {name}= is set twice in this file "
                                    f"(first on line {seen[name]}); keep one")
            seen[name] = number
        try:
            parsed = key.parse(value) if value or not key.is_list else None
        except BadValue as exc:
            raise ConfigInvalid(f"{where}: [{section}] {name}=: {exc}") from None
        if key.is_list:
            current = values.get(key.field, getattr(config, key.field))
            updated = () if parsed is None else (*current, parsed)
            if len(updated) > LIST_MAX:
                raise ConfigInvalid(f"{where}: [{section}] {name}=: more than {LIST_MAX} "
                                    "entries")
            values[key.field] = updated
        else:
            values[key.field] = parsed
        origins[name] = Setting(path, number)
    return replace(config, **values)


def parse_config(files: Sequence[tuple[str, bytes]],
                 base: AgentConfig | None = None) -> AgentConfig:
    """The configuration the files give, applied in order over `base` (the defaults)."""
    config = base or AgentConfig()
    origins = dict(config.origins)
    for path, data in files:
        config = _apply_file(config, origins, path, data)
    config = replace(config, files=(*config.files, *(path for path, _ in files)),
                     origins=tuple(origins.items()))
    _check_initrd(config)
    return config


def _check_initrd(config: AgentConfig) -> None:
    """Initrd=PATH is the initrd of one kernel: it goes with a Target= path only (with
    newest-compatible the kernel changes as kernels are installed; without a Target= the caller
    names the kernel, and its initrd)."""
    if config.initrd in (INITRD_AUTO, INITRD_NONE) or config.target not in (
            TARGET_NONE, TARGET_NEWEST_COMPATIBLE):
        return
    target = (f"Target={config.target} ({config.origin('Target')})" if config.target
              else "Target= names no kernel")
    raise ConfigInvalid(f"{config.origin('Initrd')}: [Prepare] Initrd={config.initrd}: a path "
                        f"goes with a Target= path only, and {target}; use Initrd=auto (the "
                        "initrd installed beside the kernel) or Initrd=none")


# ------------------------------------------------------------------ back to text

def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _exact(number: float) -> str:
    """A number as it parses back to itself (`:g` would print 30d as 2.592e+06)."""
    return str(int(number)) if number.is_integer() else repr(number)


def format_config(config: AgentConfig) -> str:
    """The effective configuration as a file would say it, each key after a comment saying
    where it was set (`kho-agentd --check-config`); parsed again, it gives the same values."""
    lines = ["# files read: " + (", ".join(config.files) or "none (the built-in defaults)")]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key in (k for k in KEYS if k.section == section):
            value = getattr(config, key.field)
            if key.field == "scratch_margin":
                shown = [f"{_exact(value * 100)}%"]
            elif key.field == "claim_grace_seconds":
                shown = ["infinity" if value is None else f"{_exact(value)}s"]
            elif key.field == "update_ready_timeout_seconds":
                shown = [f"{_exact(value)}s"]
            elif key.is_list:
                shown = [_format_value(v) for v in value] or [""]
            else:
                shown = [_format_value(value)]
            lines.append(f"# {config.origin(key.name)}")
            lines += [f"{key.name}={text}" for text in shown]
    return "\n".join(lines) + "\n"
