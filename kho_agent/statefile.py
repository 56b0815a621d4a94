"""The orchestrator's persisted state: where it was, in which boot, and what it last concluded.

Written atomically on every transition (write, fsync, rename, fsync the directory) so that a
restart, or the next kernel after the kexec, knows where things stood. A file that cannot be read
back is a `StateCorrupt` naming the file; it is never guessed at.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import StateCorrupt
from .manifest import write_atomic

STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
HISTORY_KEPT = 20


class Phase(enum.Enum):
    IDLE = "idle"
    PREPARING = "preparing"
    PREPARED = "prepared"
    COMMITTING = "committing"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    FAILED = "failed"
    CANCELLING = "cancelling"


@dataclass
class Target:
    kernel: str
    initrd: str | None
    cmdline: str


@dataclass
class AgentState:
    phase: Phase = Phase.IDLE
    boot_id: str = ""            # the boot in which this state was written
    updated: str = ""
    message: str = ""
    target: Target | None = None
    loaded_by_us: bool = False   # the kexec image is ours to unload on cancel
    last_result: dict[str, Any] | None = None
    handoff_seconds: float | None = None
    # incoming sessions of this boot finished unclaimed (their memory discarded), for owners
    # that come after the grace period
    discarded: list[str] = field(default_factory=list)
    # incoming sessions retrieved by verify and not yet claimed by their owners: if the agent
    # stops, they close with it (and the kernel finishes them), so a restart reports them lost
    awaiting: list[str] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["phase"] = self.phase.value
        return out


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _parse(data: dict[str, Any], path: Path) -> AgentState:
    try:
        target = data.get("target")
        return AgentState(
            phase=Phase(data["phase"]), boot_id=str(data["boot_id"]),
            updated=str(data.get("updated", "")), message=str(data.get("message", "")),
            target=Target(str(target["kernel"]), target.get("initrd"), str(target["cmdline"]))
            if target else None,
            loaded_by_us=bool(data.get("loaded_by_us", False)),
            last_result=data.get("last_result"),
            handoff_seconds=data.get("handoff_seconds"),
            discarded=[str(n) for n in data.get("discarded", [])],
            awaiting=[str(n) for n in data.get("awaiting", [])],
            history=list(data.get("history", [])))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateCorrupt(f"{path} is not a valid kho-agent state ({type(exc).__name__}: "
                           f"{exc}); move it aside to start over") from exc


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.manifest_path = directory / MANIFEST_FILE

    def load(self) -> AgentState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StateCorrupt(f"{self.path} is not JSON ({exc}); a write was torn or the file "
                               "was edited; move it aside to start over") from exc
        if not isinstance(data, dict):
            raise StateCorrupt(f"{self.path} does not hold a JSON object")
        return _parse(data, self.path)

    def save(self, state: AgentState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state.updated = now()
        state.history = [*state.history, {"at": state.updated, "phase": state.phase.value,
                                          "message": state.message}][-HISTORY_KEPT:]
        write_atomic(self.path, (json.dumps(state.to_json(), indent=2) + "\n").encode())

    def move_aside(self) -> Path:
        """Keep a corrupt state file for inspection and start from IDLE."""
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{datetime.now(UTC):%Y%m%dT%H%M%S}")
        self.path.rename(aside)
        return aside
