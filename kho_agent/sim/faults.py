"""Injected faults, persisted in `faults.json` in the current boot's directory so that every
process (the one that reboots, the one that opens the device after the reboot) sees them. A boot
transition carries the faults it did not consume into the next boot (`carry`).

Every fault fires once and is consumed when it fires:

    freeze-fails        the next reboot() fails in freeze with EINVAL; nothing changes
    corrupt-file        session=NAME token=N [offset=0] [length=1]: the next reboot flips
                        `length` bytes of that file's data at `offset` in the handover
    drop-kho            the next kernel ignores the handover (no incoming state at all)
    corrupt-handover    the next first open of /dev/liveupdate after a live update fails with EIO
                        (sticky for that boot, like a deserialization failure)
    luo-mismatch        the next kernel speaks another LUO version: it panics at boot, and the
                        machine comes back with a cold boot
    load-fails          errno=N: the next kexec load fails with that errno
    slow-load           seconds=S: the next kexec load takes S seconds more (a kernel that
                        verifies a large image's signature, or measures it for IMA)
    slow-reboot         seconds=S: the next reboot() starts S seconds late (a slow shutdown:
                        `systemctl kexec` stopping the services first)
"""

from __future__ import annotations

import errno as errno_mod
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument, StateCorrupt
from .store import locked, write_atomic, write_new

FAULTS_FILE = "faults.json"


@dataclass(frozen=True)
class FaultSpec:
    required: dict[str, type]
    optional: dict[str, tuple[type, object]]


FAULTS: dict[str, FaultSpec] = {
    "freeze-fails": FaultSpec({}, {}),
    "corrupt-file": FaultSpec({"session": str, "token": int},
                              {"offset": (int, 0), "length": (int, 1)}),
    "drop-kho": FaultSpec({}, {}),
    "corrupt-handover": FaultSpec({}, {}),
    "luo-mismatch": FaultSpec({}, {}),
    "load-fails": FaultSpec({}, {"errno": (int, errno_mod.ENOMEM)}),
    "slow-load": FaultSpec({"seconds": float}, {}),
    "slow-reboot": FaultSpec({"seconds": float}, {}),
}


def validate(name: str, params: dict[str, object]) -> dict[str, object]:
    """Check a fault and its parameters; return the parameters with defaults filled in."""
    spec = FAULTS.get(name)
    if spec is None:
        raise InvalidArgument(f"unknown fault {name!r}; known faults: {', '.join(FAULTS)}")
    out: dict[str, object] = {}
    for key, value in params.items():
        kind = spec.required.get(key) or (spec.optional[key][0] if key in spec.optional
                                          else None)
        if kind is None:
            allowed = [*spec.required, *spec.optional]
            raise InvalidArgument(f"fault {name!r} takes no parameter {key!r} (it takes: "
                                  f"{', '.join(allowed) or 'none'})")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidArgument(f"fault {name!r}: {key} must be {kind.__name__}, not "
                                  f"{value!r}")
        out[key] = value
    for key in spec.required:
        if key not in out:
            raise InvalidArgument(f"fault {name!r} needs the parameter {key!r}")
    for key, (_, default) in spec.optional.items():
        out.setdefault(key, default)
    for key in ("offset", "length", "errno", "token"):
        if key in out and int(str(out[key])) < 0:
            raise InvalidArgument(f"fault {name!r}: {key} must not be negative")
    if "seconds" in out and not 0 <= float(str(out["seconds"])) <= 600:
        raise InvalidArgument(f"fault {name!r}: seconds must be from 0 to 600")
    return out


def _read(directory: Path) -> dict[str, dict[str, object]]:
    path = directory / FAULTS_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StateCorrupt(f"{path} cannot be read ({exc}); delete it to clear the faults") \
            from exc
    if not isinstance(raw, dict):
        raise StateCorrupt(f"{path} is not a JSON object; delete it to clear the faults")
    return {str(k): dict(v) for k, v in raw.items() if isinstance(v, dict)}


def inject(directory: Path, name: str, params: dict[str, object]) -> None:
    checked = validate(name, params)
    with locked(directory):
        faults = _read(directory)
        faults[name] = checked
        write_atomic(directory / FAULTS_FILE, json.dumps(faults, indent=1).encode())


def clear(directory: Path) -> None:
    with locked(directory):
        (directory / FAULTS_FILE).unlink(missing_ok=True)


def pending(directory: Path) -> dict[str, dict[str, object]]:
    return _read(directory)


def take(directory: Path, name: str) -> dict[str, object] | None:
    """Consume a fault: return its parameters if it was injected, else None."""
    with locked(directory):
        faults = _read(directory)
        params = faults.pop(name, None)
        if params is not None:
            write_atomic(directory / FAULTS_FILE, json.dumps(faults, indent=1).encode())
        return params


def carry(directory: Path, faults: dict[str, dict[str, object]]) -> None:
    """Write the faults left after a transition into the next boot being built."""
    if faults:
        write_new(directory / FAULTS_FILE, json.dumps(faults, indent=1).encode())
