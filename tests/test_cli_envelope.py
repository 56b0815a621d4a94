"""`kho-agentctl --json` prints exactly one document on stdout for every command and every error:
the envelope of schema/kho-agentctl-v1.schema.json (issue 15: keys differed between commands,
and some errors printed nothing on stdout). Every command of COMMANDS runs here with --json, in
a case that works (the simulated kernel, a daemon on a private bus) and in one that fails."""

from __future__ import annotations

from pathlib import Path

from cliout import envelope
from dbusrig import MANAGER_IFACE, MANAGER_PATH, GioClient
from gi.repository import GLib
from test_ctl import bus, ctl, daemon, kernel, simdir

from kho_agent.cli import COMMANDS
from kho_agent.cli.envelope import SCHEMA
from kho_agent.sim import SimKernel

__all__ = ["bus", "daemon", "kernel", "simdir"]  # fixtures, imported for pytest


def one_envelope(address: str | None, argv: list[str], command: str | None) -> dict[str, object]:
    done = ctl(address, *argv, "--json")
    doc = envelope(done.stdout)   # exactly one JSON document, valid against the schema
    assert doc["schema"] == SCHEMA and doc["command"] == command, (argv, doc)
    assert doc["exit_code"] == done.returncode, (argv, doc, done.stderr)
    if doc["error"] is not None:
        assert doc["ok"] is False
        assert done.stderr.strip(), argv   # and said on stderr, for a human
    return doc


def test_every_command_prints_one_envelope_when_it_works_and_when_it_fails(
        bus: object, daemon: object, kernel: Path, simdir: Path, tmp_path: Path,
        samples_dir: Path) -> None:
    address = bus.address  # type: ignore[attr-defined]
    case = samples_dir / "case-in-1"
    state = ["--in", str(case), "--memory", str(case / "memory.core")]
    nowhere = str(tmp_path / "no-such-file")
    root = str(SimKernel(simdir).host().root)
    # command -> (argv that works, argv that fails); run in this order on one daemon
    cases: list[tuple[str, list[str], list[str]]] = [
        ("decode", ["decode", *state], ["decode", nowhere]),
        ("check", ["check", *state], ["check", nowhere]),
        ("compat", ["compat", "--kernel", str(kernel), "--running-image", str(kernel)],
         ["compat", "--kernel", nowhere]),
        ("scratch", ["scratch", "--kernel", str(kernel)], ["scratch", "--margin", "-1"]),
        ("preflight", ["preflight", "--root", root, "--kernel", str(kernel)],
         ["preflight", "--kernel", nowhere]),
        ("rehearse", ["rehearse", "--dir", str(tmp_path / "r"), "--sessions", "1"],
         ["rehearse", "--sessions", "-1"]),
        ("status", ["status"], ["status", "--timeout", "0"]),
        ("sessions", ["sessions"], ["sessions", "--timeout", "nan"]),
        ("jobs", ["jobs"], ["jobs", "--bogus"]),
        ("manifest", [], ["manifest"]),                     # nothing prepared: NotFound
        ("cancel", [], ["cancel"]),                         # NotPrepared
        ("verify", [], ["verify"]),                         # nothing came through a kexec
        ("prepare", ["prepare", "--kernel", str(kernel)], ["prepare", "--kernel", nowhere]),
        ("manifest", ["manifest"], []),
        ("commit", ["commit", "--dry-run"], ["commit", "--force", "--bogus"]),
        ("cancel", ["cancel"], []),
        ("update", ["update", "--check", "--kernel", str(kernel)],
         ["update", "--ready-timeout", "-1"]),
        ("history", ["history"], ["history", "--last", "x"]),
        # with a command, inhibit's stdout is the command's; without one it holds until
        # stopped: only its refusal is one of ours
        ("inhibit", [], ["inhibit", "--why", "x\n" * 5000]),
        ("kernels", ["kernels", "--state-dir", str(tmp_path / "kernels")],
         ["kernels", "--forget", "../x", "--state-dir", str(tmp_path / "kernels")]),
        ("report", ["report", "--no-journal", "--state-dir", str(tmp_path / "state"),
                    "--output", str(tmp_path / "report.json")],
         ["report", "--no-journal", "--output", str(tmp_path / "no-such-dir" / "r.json")]),
    ]
    seen_ok: set[str] = set()
    seen_failed: set[str] = set()
    for command, works, fails in cases:
        if works:
            doc = one_envelope(address, works, command)
            assert doc["error"] is None and doc["result"] is not None, (works, doc)
            assert doc["exit_code"] in (0, 1), (works, doc)   # 1: a check found something
            seen_ok.add(command)
        if fails:
            doc = one_envelope(address, fails, command)
            assert doc["error"] is not None and doc["exit_code"] >= 2, (fails, doc)
            seen_failed.add(command)
    assert seen_failed == set(COMMANDS), set(COMMANDS) - seen_failed
    assert seen_ok >= set(COMMANDS) - {"verify", "inhibit"}, set(COMMANDS) - seen_ok
    # no command at all, and a command line that does not parse: an envelope too
    assert one_envelope(address, [], None)["error"]["error"] == "InvalidArgument"  # type: ignore[index]
    assert one_envelope(address, ["nonsense"], None)["exit_code"] == 2


def test_a_failed_job_keeps_its_job_document_beside_the_error(
        bus: object, daemon: object, kernel: Path) -> None:
    address = bus.address  # type: ignore[attr-defined]
    with GioClient(address) as owner:   # a session that never says ready: commit refuses
        owner.call(MANAGER_PATH, MANAGER_IFACE, "CreateSession", GLib.Variant("(s)", ("vm-1",)))
        assert ctl(address, "prepare", "--kernel", str(kernel)).returncode == 0
        doc = one_envelope(address, ["commit"], "commit")
    assert doc["error"]["error"] == "Busy" and doc["exit_code"] == 3  # type: ignore[index]
    job = doc["result"]
    assert isinstance(job, dict) and job["type"] == "commit" and job["state"] == "failed", job
    assert str(job["job"]).startswith("/org/khoagent/")
