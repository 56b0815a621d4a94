"""kho_agent.prom for node_exporter's textfile collector: the text is read back with
prometheus_client's parser (an independent oracle), the writer's atomic replacement and its
missing directory, and a real kho-agentd writing it as its state and history change."""

from __future__ import annotations

import errno
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from cliout import cli_json
from dbusrig import NOBODY, Daemon, PrivateBus
from nodac import python_without_dac
from prometheus_client.parser import text_string_to_metric_families
from test_ctl import bus, ctl, kernel, simdir

from kho_agent.engine.history import Attempt
from kho_agent.service.metrics import (
    METRICS_FILE,
    MetricsInput,
    MetricsWriter,
    render,
    sandbox_advice,
)

__all__ = ["bus", "kernel", "simdir"]  # fixtures, imported for pytest

WAIT_S = 10.0


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, as prometheus_client reads the text."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _attempt(n: int, verdict: str, **changes: object) -> Attempt:
    values: dict[str, object] = {"id": f"a{n}", "kind": "update",
                                 "started": "2026-12-04T12:00:00+00:00", "verdict": verdict,
                                 "ended": "2026-12-04T12:00:05+00:00", "release_from": "7.2"}
    values.update(changes)
    return Attempt(**values)  # type: ignore[arg-type]


def test_the_text_reads_back_with_prometheus_clients_parser() -> None:
    history = [
        _attempt(1, "verified", blackout_seconds=2.25, ended="2026-12-04T12:00:05+00:00"),
        _attempt(2, "verification failed", ended="2026-12-04T13:00:00+00:00"),
        _attempt(3, "commit refused", kind="commit"),
        _attempt(4, "cancelled"),
        _attempt(5, 'a "newer"\nverdict\\'),
        _attempt(6, "prepared", ended=None, sessions=3, bytes=1 << 30, commits_refused=4,
                 commits_failed=1),
    ]
    got = parse(render(MetricsInput("prepared", 3, 2, history)))
    assert got[("kho_agent_updates", (("result", "verified"),))] == 1
    assert got[("kho_agent_updates", (("result", "verification failed"),))] == 1
    # an earlier agent's entry of its own, and the refusals counted on the open update
    assert got[("kho_agent_updates", (("result", "commit refused"),))] == 1 + 4
    assert got[("kho_agent_updates", (("result", "commit failed"),))] == 1
    assert got[("kho_agent_updates", (("result", "cancelled"),))] == 1
    assert got[("kho_agent_updates", (("result", "prepare failed"),))] == 0
    assert got[("kho_agent_updates", (("result", 'a "newer"\nverdict\\'),))] == 1
    assert ("kho_agent_updates", (("result", "prepared"),)) not in got  # open: not a result
    assert got[("kho_agent_last_blackout_seconds", ())] == 2.25
    assert got[("kho_agent_prepared_sessions", ())] == 3
    assert got[("kho_agent_prepared_bytes", ())] == 1 << 30
    assert got[("kho_agent_state", (("state", "prepared"),))] == 1
    assert got[("kho_agent_state", (("state", "idle"),))] == 0
    assert sum(v for (name, _), v in got.items() if name == "kho_agent_state") == 1
    assert got[("kho_agent_last_verification_timestamp_seconds", ())] == datetime(
        2026, 12, 4, 13, 0, 0, tzinfo=UTC).timestamp()
    assert got[("kho_agent_kexecs_since_cold_boot", ())] == 2
    assert got[("kho_agent_inhibitors", ())] == 2


def test_what_is_not_known_is_left_out_not_made_up() -> None:
    got = parse(render(MetricsInput("idle", 0, 0, [])))
    names = {name for name, _ in got}
    assert "kho_agent_last_blackout_seconds" not in names
    assert "kho_agent_last_verification_timestamp_seconds" not in names
    assert "kho_agent_kexecs_since_cold_boot" not in names
    assert got[("kho_agent_prepared_sessions", ())] == 0
    assert got[("kho_agent_updates", (("result", "verified"),))] == 0


def test_a_missing_directory_is_one_warning_and_then_written(tmp_path: Path) -> None:
    logged: list[str] = []
    writer = MetricsWriter(tmp_path / "node-exporter", logged.append)
    text = render(MetricsInput("idle", 1, 0, []))
    assert writer.write(text) is False and writer.write(text) is False
    assert len(logged) == 1 and "does not exist" in logged[0]
    (tmp_path / "node-exporter").mkdir()
    assert writer.write(text) is True
    assert (tmp_path / "node-exporter" / METRICS_FILE).read_text() == text
    assert [p.name for p in (tmp_path / "node-exporter").iterdir()] == [METRICS_FILE]
    assert "written again" in logged[-1]


UNIT = Path(__file__).resolve().parent.parent / "systemd" / "kho-agent.service"


def test_a_directory_the_unit_may_not_write_says_how_to_allow_it(tmp_path: Path) -> None:
    """EACCES as kho-agent.service meets it (root without CAP_DAC_OVERRIDE, a directory root
    does not own): the warning said "run it as root or fix the permissions" to an agent that
    runs as root; it now also names the unit's sandbox and the drop-in that allows a directory,
    after what the write itself said (what failed, its errno, the file left as it was)."""
    directory = tmp_path / "collector"
    directory.mkdir(mode=0o755)
    os.chown(directory, NOBODY, NOBODY)
    done = python_without_dac(
        "from pathlib import Path\nfrom kho_agent.service.metrics import MetricsWriter\n"
        f"writer = MetricsWriter(Path({str(directory)!r}), print)\n"
        "print(writer.write('kho_agent_inhibitors 0\\n'))\n")
    assert done.returncode == 0, done.stderr
    warning, result = done.stdout.splitlines()
    assert result == "False" and list(directory.iterdir()) == []
    target = directory / METRICS_FILE
    assert warning.startswith(f"warning: metrics not written: writing {target} failed: "
                              f"EACCES (Permission denied): {target} was left as it was; ")
    assert "run it as root" not in warning  # it is root: the sandbox's advice replaces that
    assert "without CAP_DAC_OVERRIDE" in warning
    assert f"`systemctl edit kho-agent` ([Service] then ReadWritePaths={directory})" in warning


def test_the_read_only_advice_names_the_units_own_sandbox() -> None:
    """EROFS is what ProtectSystem=strict gives outside ReadWritePaths=: the advice says so, and
    names the paths the unit really lets the agent write."""
    unit = UNIT.read_text()
    assert "\nProtectSystem=strict\n" in unit
    writable = [line.split("=", 1)[1].lstrip("-") for line in unit.splitlines()
                if line.startswith("ReadWritePaths=")]
    assert writable == ["/var/lib/kho-agent", "/var/lib/prometheus/node-exporter"]
    advice = sandbox_advice(errno.EROFS, Path("/srv/metrics"))
    assert advice is not None
    assert "ProtectSystem=strict" in advice and " and ".join(writable) in advice
    assert "`systemctl edit kho-agent` ([Service] then ReadWritePaths=/srv/metrics)" in advice
    assert "/srv/metrics" in str(sandbox_advice(errno.EACCES, Path("/srv/metrics")))
    assert sandbox_advice(errno.ENOSPC, Path("/srv/metrics")) is None   # not the sandbox's


def _wait_for(path: Path, sample: tuple[str, tuple[tuple[str, str], ...]], value: float
              ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    deadline = time.monotonic() + WAIT_S
    got: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    while time.monotonic() < deadline:
        if path.exists():
            got = parse(path.read_text())
            if got.get(sample) == value:
                return got
        time.sleep(0.05)
    raise AssertionError(f"{sample} never became {value} in {path}: {got}")


def test_the_daemon_writes_its_metrics_as_things_change(bus: PrivateBus, simdir: Path,
                                                        tmp_path: Path, kernel: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    path = metrics / METRICS_FILE
    with Daemon(bus.address, simdir, tmp_path / "state", ["--metrics-dir", str(metrics)]):
        got = _wait_for(path, ("kho_agent_state", (("state", "idle"),)), 1)
        assert got[("kho_agent_kexecs_since_cold_boot", ())] == 0
        assert ctl(bus.address, "prepare", "--kernel", str(kernel)).returncode == 0
        _wait_for(path, ("kho_agent_state", (("state", "prepared"),)), 1)
        commit = [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, "commit"]
        refused = ctl(bus.address, "inhibit", "--why", "test", "--", *commit)
        assert refused.returncode == 3, refused.stderr  # Inhibited
        _wait_for(path, ("kho_agent_updates", (("result", "commit refused"),)), 1)
        assert ctl(bus.address, "cancel").returncode == 0
        got = _wait_for(path, ("kho_agent_updates", (("result", "cancelled"),)), 1)
        assert got[("kho_agent_state", (("state", "idle"),))] == 1
        history = cli_json(ctl(bus.address, "history", "--json").stdout)
        # the refusal is counted on the update it was for, and still in the metric
        assert [(e["verdict"], e["commits_refused"]) for e in history["entries"]] == [
            ("cancelled", 1)]
        assert got[("kho_agent_updates", (("result", "commit refused"),))] == 1
