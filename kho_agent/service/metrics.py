"""Metrics for node_exporter's textfile collector: `kho_agent.prom` in a directory it reads.

The text exposition format is written here (a few gauges need no library); the tests read it
back with prometheus_client's parser as an independent oracle. The file is replaced atomically
(a temporary file in the same directory, renamed over it): node_exporter never reads half a
file, and it ignores the temporary one (its name does not end in `.prom`).

What is counted comes from the history (engine/history.py), so it survives restarts and kexecs;
as the history is bounded (the newest entries), so are the counts, which is why they are
gauges: a counter must never go down.

`render` is pure; `MetricsWriter` writes, and a directory that is missing or not writable is a
warning logged once (until a write succeeds again), never a failure of the daemon. The warning
says what kho-agent.service's sandbox has to do with it (`sandbox_advice`): the unit lets the
agent write only in its ReadWritePaths=, as root without CAP_DAC_OVERRIDE, so a
MetricsDirectory= elsewhere fails with EROFS (or EACCES) until a drop-in adds it.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config.model import DEFAULT_METRICS_DIRECTORY
from ..engine.history import Attempt, Kind, Verdict
from ..engine.phase import Phase
from ..errors import AgentError, SystemCallFailed, errno_text
from ..kernel.atomicfile import write_atomic

METRICS_FILE = "kho_agent.prom"
DEFAULT_METRICS_DIR = Path(DEFAULT_METRICS_DIRECTORY)  # MetricsDirectory=, kho-agent.conf(5)


@dataclass(frozen=True)
class MetricsInput:
    state: str
    liveupdate_number: int          # the running kernel's outgoing number; 0: unknown
    inhibitors: int
    history: Sequence[Attempt]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, help_text: str,
               samples: Sequence[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            label_text = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
            self.lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text
                              else f"{name} {_number(value)}")


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def render(data: MetricsInput) -> str:
    """The exposition text (ends with a newline)."""
    out = _Text()
    ended = [a for a in data.history if not a.open]
    results = [v.value for v in Verdict if v is not Verdict.PREPARED]
    results += sorted({a.verdict for a in ended} - set(results))  # a newer agent's verdicts
    # a commit refused or failed is counted on the update's record (earlier agents wrote an
    # entry of kind "commit" for each: those count too)
    folded = {Verdict.COMMIT_REFUSED.value: sum(a.commits_refused or 0 for a in data.history),
              Verdict.COMMIT_FAILED.value: sum(a.commits_failed or 0 for a in data.history)}
    out.family("kho_agent_updates",
               "Live-update attempts by result, over the entries the history keeps (bounded: "
               "the newest ones), kept across restarts and kexecs",
               [({"result": r}, sum(1 for a in ended if a.verdict == r) + folded.get(r, 0))
                for r in results])
    blackouts = [a for a in data.history if a.blackout_seconds is not None]
    out.family("kho_agent_last_blackout_seconds",
               "Commit to the next kernel's agent handing the sessions back, of the last live "
               "update that measured it",
               [({}, blackouts[-1].blackout_seconds)] if blackouts and
               blackouts[-1].blackout_seconds is not None else [])
    current = next((a for a in reversed(data.history) if a.open), None)
    carried = data.state in (Phase.PREPARED.value, Phase.COMMITTING.value) and current is not None
    out.family("kho_agent_prepared_sessions",
               "Sessions the prepared live update carries (as recorded at prepare); 0 when "
               "nothing is prepared",
               [({}, (current.sessions or 0) if carried and current is not None else 0)])
    out.family("kho_agent_prepared_bytes",
               "Bytes of the files the prepared live update carries; 0 when nothing is "
               "prepared",
               [({}, (current.bytes or 0) if carried and current is not None else 0)])
    states = [p.value for p in Phase]
    if data.state not in states:
        states.append(data.state)
    out.family("kho_agent_state", "The agent's state: 1 for the current one",
               [({"state": s}, 1 if s == data.state else 0) for s in states])
    verifications = [a for a in ended if a.kind == Kind.UPDATE.value and a.verdict in (
        Verdict.VERIFIED.value, Verdict.VERIFICATION_FAILED.value)]
    last = _epoch(verifications[-1].ended) if verifications else None
    out.family("kho_agent_last_verification_timestamp_seconds",
               "When the last verification ended (Unix time), whatever its verdict",
               [({}, last)] if last is not None else [])
    out.family("kho_agent_kexecs_since_cold_boot",
               "Live-update kexecs since the last cold boot (the running kernel's "
               "liveupdate-number minus one)",
               [({}, data.liveupdate_number - 1)] if data.liveupdate_number > 0 else [])
    out.family("kho_agent_inhibitors", "Inhibitors holding commits off now",
               [({}, data.inhibitors)])
    return "\n".join(out.lines) + "\n"


def sandbox_advice(code: int, directory: Path) -> str | None:
    """What to do when the agent cannot write in `directory` (errno `code`), knowing the
    sandbox of systemd/kho-agent.service; None for an errno the sandbox has no part in."""
    drop_in = (f"add it to the unit with `systemctl edit kho-agent` ([Service] then "
               f"ReadWritePaths={directory}) and restart the agent while no update is prepared, "
               "or set MetricsDirectory= (kho-agent.conf(5)) to a directory the unit already "
               "allows")
    if code == errno.EROFS:
        return (f"{directory} is read-only to kho-agentd: under kho-agent.service that is the "
                "unit's sandbox (ProtectSystem=strict: the agent writes only in its "
                "ReadWritePaths=, /var/lib/kho-agent and /var/lib/prometheus/node-exporter), "
                f"not the filesystem: {drop_in}; outside the unit, the filesystem holding "
                f"{directory} is mounted read-only")
    if code in (errno.EACCES, errno.EPERM):
        return (f"kho-agentd may not create files in {directory}: under kho-agent.service it "
                "runs as root without CAP_DAC_OVERRIDE (CapabilityBoundingSet=), so the "
                "directory's owner and mode must let uid 0 write there (a root-owned directory "
                f"of mode 0755 does); if {directory} is not one of the unit's ReadWritePaths=, "
                f"also {drop_in}")
    return None


class MetricsWriter:
    def __init__(self, directory: Path, log: Callable[[str], None]) -> None:
        self.path = directory / METRICS_FILE
        self._log = log
        self._warned = False
        self._last_written: str | None = None  # the text in the file (no rewrite of the same)

    def write(self, text: str) -> bool:
        """Replace the file; False (and one warning until a write succeeds) when it cannot."""
        if text == self._last_written:
            return True  # nothing changed: no rewrite (each is two fsyncs)
        directory = self.path.parent
        if not directory.is_dir():
            self._warn(f"the metrics directory {directory} does not exist (is node_exporter's "
                       "textfile collector set up?); once it is created, restart the agent "
                       "while no update is prepared: kho-agent.service's sandbox makes a "
                       "directory writable only if it exists when the agent starts")
            return False
        try:
            write_atomic(self.path, text.encode())
        except SystemCallFailed as exc:
            # What failed, its errno and the file left as it was, then the sandbox's part in
            # place of the write's generic advice ("run it as root" to an agent that is root):
            # under kho-agent.service the sandbox is what explains the errno.
            sandbox = sandbox_advice(exc.errno, directory)
            self._warn(exc.message if sandbox is None else
                       f"{exc.op} failed: {errno_text(exc.errno)}: {self.path} was left as it "
                       f"was; {sandbox}")
            return False
        except AgentError as exc:
            self._warn(exc.message)
            return False
        if self._warned:
            self._log(f"metrics: {self.path} is written again")
        self._warned = False
        self._last_written = text
        return True

    def _warn(self, problem: str) -> None:
        if not self._warned:
            self._log(f"warning: metrics not written: {problem}; retried at the next change")
        self._warned = True
