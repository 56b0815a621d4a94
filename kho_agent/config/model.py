"""The configuration kho-agentd runs with: one frozen record, its defaults equal to the agent's
behaviour without any file (and to the command-line defaults of kho-agentd)."""

from __future__ import annotations

from dataclasses import dataclass

from .window import Window

# Target=: prepare without a kernel is refused (the operator names one), or the newest installed
# kernel that passes the preflight gate, or a fixed path
TARGET_NONE = ""
TARGET_NEWEST_COMPATIBLE = "newest-compatible"
# Initrd=: the initrd of the configured Target=: the one installed beside the kernel
# (initrd.img-RELEASE for vmlinuz-RELEASE), none, or a fixed path (with a Target= path only)
INITRD_AUTO = "auto"
INITRD_NONE = "none"

# HandoffMode=: the mode this host must hand off in; "auto" takes what the host offers
HANDOFF_MODES = ("auto", "direct", "fdstore", "reboot")
# how the engine (preflight.handoff_mode) names each configured mode
ENGINE_HANDOFF_NAME = {"direct": "direct", "fdstore": "fdstore", "reboot": "reboot-syscall"}

DEFAULT_METRICS_DIRECTORY = "/var/lib/prometheus/node-exporter"
# the history (engine/history.py) also stays under 1 MiB, oldest entries dropped first
DEFAULT_HISTORY_MAX_ENTRIES = 200
DEFAULT_READY_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class Setting:
    """Where a value came from: the file and line (for messages that must name it)."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


@dataclass(frozen=True)
class AgentConfig:
    # [Prepare]
    target: str = TARGET_NONE
    initrd: str = INITRD_AUTO
    command_line: str | None = None          # None: the running kernel's command line
    append_command_line: tuple[str, ...] = ()
    scratch_margin: float = 0.25             # 25 %, the engine's default
    # [Commit]
    handoff_mode: str = "auto"
    maintenance_window: tuple[Window, ...] = ()   # empty: commits are allowed at any time
    # [Sessions]
    claim_grace_seconds: float | None = 1800.0   # None: wait until an operator finishes them
    digests: bool = True
    # [Update]: `kho-agentctl update` (kho-agent-update.service) waits this long after its
    # prepare for the clients to be ready, then cancels
    update_ready_timeout_seconds: float = DEFAULT_READY_TIMEOUT_SECONDS
    # [Records]
    metrics_directory: str = DEFAULT_METRICS_DIRECTORY   # "": no metrics written
    history_max_entries: int = DEFAULT_HISTORY_MAX_ENTRIES
    # the files read, in the order they were applied (later ones win)
    files: tuple[str, ...] = ()
    # where a setting came from, by key name ("HandoffMode" -> file:line), for messages
    origins: tuple[tuple[str, Setting], ...] = ()

    def command_line_for(self, running: str) -> str | None:
        """The next kernel's command line when prepare names none: CommandLine= or the
        running kernel's, then AppendCommandLine= words; None (the engine reuses the running
        one) when neither key is set."""
        if self.command_line is None and not self.append_command_line:
            return None
        base = self.command_line if self.command_line is not None else running
        return " ".join(part for part in (base.strip(), *self.append_command_line) if part)

    def origin(self, key: str) -> str:
        """`file:line` of the setting of `key`, or "the default"."""
        for name, where in self.origins:
            if name == key:
                return str(where)
        return "the default"
