"""kho-agentctl decode/check: outputs, JSON, exit codes, live mode on a moved debugfs root."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kho_agent.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_decode_tree_and_exit_0(samples_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = samples_dir / "case-out-1"
    code, out, _ = run(capsys, "decode", str(case), "--memory", str(case / "memory.core"))
    assert code == 0
    assert "root compatible kho-v4, 405-byte FDT" in out
    assert "1094 block(s) in 72 extent(s)" in out
    assert "reserve_mem 'kho_demo_rsv' (reserve-mem-v1): 0x7c300000 + 1 MiB" in out
    assert "Findings: 0 error(s)" in out


def test_check_json_incoming(samples_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = samples_dir / "case-in-1"
    code, out, _ = run(capsys, "check", "--in", str(case), "--memory",
                       str(case / "memory.core"), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["summary"]["error"] == 0
    state = doc["state"]
    assert state["side"] == "in" and state["compatible"] == "kho-v4"
    luo = next(s for s in state["subtrees"] if s["name"] == "LUO")["decoded"]
    assert luo["compatible"] == "luo-v5"
    sessions = {s["name"]: s for s in luo["sessions"]}
    assert len(sessions) == 9
    demo = sessions["kho-demo"]["files"]
    assert [(f["token"], f["compatible"], f["handler"]["size"]) for f in demo] == [
        (0x1001, "memfd-v2", 4096), (0x1002, "memfd-v2", 4194304)]
    assert all(set(f) == {"code", "severity", "path", "message"} for f in state["findings"])


def test_check_exits_1_on_error_findings(samples_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    case = tmp_path / "case"
    shutil.copytree(samples_dir / "case-out-1", case)
    luo = case / "sub_fdts" / "LUO"
    luo.write_bytes(b"luo-v9\0\0" + luo.read_bytes()[8:])  # a future LUO version
    code, out, _ = run(capsys, "check", str(case))
    assert code == 1
    assert "[error] compatible-unknown /LUO: LUO compatible 'luo-v9' is unknown" in out
    # decode shows the same state but does not judge it
    code, _, _ = run(capsys, "decode", str(case))
    assert code == 0


def make_debugfs(root: Path, samples_dir: Path, snapshot: str) -> Path:
    for side in ("out", "in"):
        src = samples_dir / "debugfs" / snapshot / side
        if src.is_dir():
            shutil.copytree(src, root / "kho" / side)
    return root


def test_live_reads_debugfs_and_kcore(samples_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    debugfs = make_debugfs(tmp_path / "debug", samples_dir, "stage1-3-loaded")
    kcore = samples_dir / "case-out-1" / "memory.core"
    code, out, _ = run(capsys, "check", "--live", "--json", "--debugfs", str(debugfs),
                       "--kcore-path", str(kcore))
    assert code == 0
    doc = json.loads(out)
    assert doc["source"].startswith(f"live {debugfs}/kho/out")
    codes = {f["code"] for f in doc["state"]["findings"]}
    assert "debugfs-fdt-truncated" in codes
    assert doc["state"]["memmap"]["extents"]["block_count"] == 1094
    assert [a["role"] for a in doc["state"]["scratch"]] == ["lowmem", "global", "node 0"]


@pytest.mark.parametrize("layout,incoming,message", [
    ("empty", False, "debugfs is not mounted at"),
    ("no-kho", False, "KHO is off (boot with kho=on)"),
    ("out-only", True, "this boot did not come through KHO"),
])
def test_live_cannot_run_exit_2(samples_dir: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], layout: str,
                                incoming: bool, message: str) -> None:
    debugfs = tmp_path / "debug"
    debugfs.mkdir()
    if layout == "no-kho":
        (debugfs / "tracing").mkdir()
    elif layout == "out-only":
        make_debugfs(debugfs, samples_dir, "stage1-1-boot")
    argv = ["check", "--live", "--debugfs", str(debugfs)] + (["--in"] if incoming else [])
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert message in err


def test_unreadable_inputs_exit_2(samples_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", str(tmp_path / "missing.dtb"))
    assert code == 2 and "missing.dtb" in err
    case = samples_dir / "case-out-1"
    code, _, err = run(capsys, "check", str(case / "fdt"), "--memory", str(tmp_path))
    assert code == 2 and str(tmp_path) in err
    code, _, err = run(capsys, "check", str(case / "fdt"), "--memory", str(case / "fdt"))
    assert code == 2 and "not an ELF core" in err
    code, _, err = run(capsys, "check")
    assert code == 2 and "give FDT" in err


def test_console_entry_point_runs(samples_dir: Path) -> None:
    case = samples_dir / "case-in-1"
    proc = subprocess.run([sys.executable, "-m", "kho_agent.cli", "check", "--in", str(case)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "luo-v5, liveupdate-number 1" in proc.stdout
    # without memory the session chain is not readable: said as info, not as an error
    assert "[info] memory-unavailable /LUO/sessions-block[0]" in proc.stdout
