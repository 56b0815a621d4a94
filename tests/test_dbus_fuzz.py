"""kho-agentd's D-Bus surface, fuzzed in a bounded count (tests/dbusfuzz.py; issue 11).

One run with a fixed seed: root, a uid polkit authorizes and nobody call every method and
property with hostile arguments, fds of every kind and wrong signatures, and live updates run
through simulated kexecs; after every batch the daemon must be alive and consistent. The counts
are printed (also without -s) and written to dbus-fuzz-summary.{txt,json} in
$KHO_AGENT_FUZZ_OUT (else the test's tmp directory). Longer runs: `fuzz/dbus.py --calls N`.

KHO_AGENT_DBUS_FUZZ_CALLS and KHO_AGENT_DBUS_FUZZ_SEED change the count and the seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dbusfuzz import Report, load_contract, run_fuzz

CALLS = int(os.environ.get("KHO_AGENT_DBUS_FUZZ_CALLS", "500"))
SEED = int(os.environ.get("KHO_AGENT_DBUS_FUZZ_SEED", "11"))
BATCH = 25


def _write_summary(report: Report, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dbus-fuzz-summary.json").write_text(json.dumps(report.to_json(), indent=1))
    text = directory / "dbus-fuzz-summary.txt"
    text.write_text(report.render() + "\n")
    return text


def _uncovered(report: Report) -> list[str]:
    """Methods of the contract the run never called: a new method the generator cannot build,
    or a count too small to reach it."""
    called = set(report.stats.methods)
    wanted = {m.name for i in load_contract().values() for m in i.methods}
    wanted |= {"Get", "GetAll", "Set"}
    return sorted(wanted - called)


def test_the_dbus_surface_survives_the_fuzzer(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the fuzzer runs the daemon and clients of other uids: it needs root")
    # the fixtures must be reachable by the unprivileged clients: not under pytest's 0700 tmp
    # a prepare on the simulated kernel takes well under a second: 5 s is stuck
    report = run_fuzz(CALLS, SEED, batch=BATCH, job_timeout=5.0)
    summary = _write_summary(report, Path(os.environ.get("KHO_AGENT_FUZZ_OUT", tmp_path)))
    with capsys.disabled():  # the counts belong in the CI log, -s or not
        print(f"\n{report.render()}\n(summary: {summary})")
    stats = report.stats
    assert stats.total >= CALLS
    assert stats.batches >= CALLS // BATCH - 1
    assert all(stats.calls[i] > 0 for i in report.identities), stats.calls
    assert stats.commits >= 1, "no live update went through a simulated kexec"
    assert not _uncovered(report), f"never called: {_uncovered(report)}"
    assert stats.signals.get("JobRemoved", 0) > 0
    assert not report.findings, report.render()


def test_the_oracles_flag_what_they_should() -> None:
    """The per-call checks on their own, on messages the daemon has sent at some point."""
    from dbusfuzz import bare_strerror, documented_error_names, options_for, split_signature

    assert bare_strerror("/k: File name too long") == "File name too long"
    assert bare_strerror("[Errno 2] No such file or directory: 'x'") == "[Errno N]"
    assert bare_strerror("PRESERVE_FD failed: EBUSY (Device or resource busy): in use") is None
    assert bare_strerror("session 'vm-1' belongs to uid 0") is None
    names = documented_error_names()
    assert "org.khoagent.Agent1.Error.KernelRefused" in names
    assert "org.khoagent.Agent1.Error.DaemonUnreachable" in names   # the README's table
    assert split_signature("sa{sv}(ii)at") == ["s", "a{sv}", "(ii)", "at"]
    keys = {"prepare": {"kernel": "s"}, "scratch": {"margin": "d"}, "session": {"x": "b"}}
    assert options_for("ScratchPlan", keys) == {"margin": "d"}
    assert options_for("CreateSessionWithOptions", keys) == {"x": "b"}
    assert options_for("Commit", keys) == {}
