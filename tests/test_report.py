"""`kho-agentctl report`: one JSON file, bounded, with no link followed out of the directories it
reads, written 0600, with and without a daemon (a real kho-agentd --simulate on a private bus)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dbusrig import Daemon, PrivateBus, client_env

from kho_agent.cli import bugreport as report_cmd
from kho_agent.sim import SimKernel

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "data" / "kho-samples" / "debugfs" / "stage1-3-loaded"
NO_BUS = "unix:path=/nonexistent/kho-agent-report-test"


def make_host(tmp_path: Path) -> dict[str, Path]:
    """A state directory with what the agent writes and what an adversary could put there, a
    configuration directory, and a debugfs copy of a real sample."""
    state = tmp_path / "state"
    (state / "kernels").mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"phase": "idle"}))
    (state / "manifest.json").write_text("x" * (report_cmd.MAX_TEXT_FILE + 100))  # too big
    secret = tmp_path / "outside-secret"
    secret.write_text("do not copy me")
    (state / "last-verify.json").symlink_to(secret)  # a link out: not followed
    (state / "kernels" / "7.3.1.json").write_text(json.dumps({"version": "7.3.1"}))
    os.mkfifo(state / "kernels" / "7.4.json")  # would block a blocking open
    config = tmp_path / "etc"
    (config / "agent.conf.d").mkdir(parents=True)
    (config / "agent.conf").write_text("[agent]\nscratch_margin = 10%\n")
    (config / "agent.conf.d" / "10-window.conf").write_text("[window]\n")
    debugfs = tmp_path / "debug"
    shutil.copytree(SAMPLES, debugfs / "kho")
    return {"state": state, "config": config, "debugfs": debugfs, "secret": secret}


def run_report(tmp_path: Path, host: dict[str, Path], bus: str, *extra: str) -> dict[str, Any]:
    output = tmp_path / "out" / "report.json"
    output.parent.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "kho_agent.cli", "report", "--output", str(output),
         "--state-dir", str(host["state"]), "--config-dir", str(host["config"]),
         "--debugfs", str(host["debugfs"]), "--bus-address", bus, *extra],
        capture_output=True, text=True, timeout=120, env=client_env(), check=False)
    assert done.returncode == 0, done.stderr
    assert f"wrote {output}" in done.stdout
    assert os.listdir(output.parent) == ["report.json"]  # no temporary file left
    assert output.stat().st_mode & 0o777 == 0o600
    doc: dict[str, Any] = json.loads(output.read_text())
    return doc


def by_name(files: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {Path(f["path"]).name: f for f in files}


def test_report_without_a_daemon(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    doc = run_report(tmp_path, host, NO_BUS, "--no-journal")
    assert doc["schema"] == 1 and doc["kind"] == "kho-agent-report"
    assert "no keys, tokens or passwords" in doc["secrets"]
    assert doc["version"]["package"]
    assert "luo-v5" in doc["version"]["formats"]["luo"]
    assert doc["host"]["kernel_release"] == os.uname().release
    assert doc["host"]["cmdline"] == Path("/proc/cmdline").read_text().strip()
    # no daemon: said so, with the error's name
    assert doc["status"]["exit_code"] == 2
    assert doc["status"]["stdout"]["error"]["error"] == "DaemonUnreachable"  # the envelope
    assert doc["status"]["daemon"].startswith("did not answer")
    # preflight ran here instead (its own fallback) and gave its JSON report
    assert "verdict" in doc["preflight"]["stdout"]["result"]

    files = by_name(doc["state"]["files"])
    assert json.loads(files["state.json"]["text"]) == {"phase": "idle"}
    assert files["manifest.json"]["truncated"] is True
    assert len(files["manifest.json"]["text"]) == report_cmd.MAX_TEXT_FILE
    assert files["last-verify.json"] == {"path": str(host["state"] / "last-verify.json"),
                                         "error": "a symbolic link: not followed"}
    kernels = by_name(doc["state"]["kernels"])
    assert json.loads(kernels["7.3.1.json"]["text"]) == {"version": "7.3.1"}
    assert kernels["7.4.json"]["error"] == "not a regular file: not read"
    assert "do not copy me" not in json.dumps(doc)

    blobs = by_name(doc["kho_debugfs"]["files"])
    fdt = (SAMPLES / "out" / "fdt").read_bytes()
    assert base64.b64decode(blobs["fdt"]["base64"]) == fdt
    assert blobs["fdt"]["sha256"] == hashlib.sha256(fdt).hexdigest()
    assert "LUO" in blobs  # the sub_fdts directory is walked too

    config = by_name(doc["config"]["files"])
    assert config["agent.conf"]["text"].startswith("[agent]")
    assert config["10-window.conf"]["text"] == "[window]\n"
    assert doc["journal"] == {"error": "left out (--no-journal)"}


def test_report_journal_part_is_there_or_says_why(tmp_path: Path) -> None:
    doc = run_report(tmp_path, make_host(tmp_path), NO_BUS)
    journal = doc["journal"]
    if shutil.which("journalctl") is None:
        assert journal == {"error": "journalctl is not installed"}
    else:
        assert journal["command"][:3] == ["journalctl", "-u", "kho-agent"]
        assert "-n" in journal["command"] and "500" in journal["command"]


def test_report_with_a_daemon_has_its_status(tmp_path: Path) -> None:
    simdir = tmp_path / "sim"
    SimKernel.create(simdir)
    host = make_host(tmp_path)
    with PrivateBus("system") as bus, Daemon(bus.address, simdir, host["state"]):
        doc = run_report(tmp_path, host, bus.address, "--no-journal")
    assert doc["status"]["exit_code"] == 0, doc["status"]
    assert doc["status"]["daemon"] == "answered"
    assert "State" in json.dumps(doc["status"]["stdout"])
    assert doc["preflight"]["stdout"]["result"]["verdict"] in ("ok", "warning", "not-run",
                                                           "blocker")


def test_report_to_stdout(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "kho_agent.cli", "report", "-o", "-", "--no-journal",
         "--state-dir", str(host["state"]), "--config-dir", str(host["config"]),
         "--debugfs", str(tmp_path / "nodebugfs"), "--bus-address", NO_BUS],
        capture_output=True, text=True, timeout=120, env=client_env(), check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["kho_debugfs"]["files"][0]["error"] == "ENOENT (No such file or directory)"


def test_read_file_refuses_a_link_to_a_directory(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path)
    assert report_cmd.read_file(tmp_path / "loop", 10).error == "a symbolic link: not followed"


def test_report_that_cannot_be_written_is_storage_failed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # in this process: loading the command's module must leave main()'s error path intact
    from kho_agent.cli import main

    code = main(["report", "--no-journal", "--output", str(tmp_path / "missing" / "r.json"),
                 "--state-dir", str(tmp_path), "--config-dir", str(tmp_path),
                 "--debugfs", str(tmp_path), "--bus-address", NO_BUS])
    assert code == 2
    assert "kho-agentctl report: StorageFailed: writing" in capsys.readouterr().err
