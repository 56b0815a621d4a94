"""kho-agentctl decode/check: outputs, JSON, exit codes, live mode on a moved debugfs root."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cliout import cli_json

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
    doc = cli_json(out)
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
    doc = cli_json(out)
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


def test_a_directory_without_a_kho_state_is_refused_not_passed(
        capsys: pytest.CaptureFixture[str], samples_dir: Path, tmp_path: Path) -> None:
    """Nothing decoded is not a pass: a health check pointed at the wrong directory (an empty
    one, /proc, the parent of kho/out) exits 2 and says so, for check and decode alike."""
    parent = samples_dir / "debugfs" / "stage1-3-loaded"
    assert (parent / "out").is_dir()
    for where, words in ((tmp_path, "holds no KHO state"), (Path("/proc"), "holds no KHO state"),
                         (parent, f"give {parent / 'out'} instead")):
        for command in ("check", "decode"):
            code, out, err = run(capsys, command, str(where))
            assert code == 2 and "InvalidArgument" in err and words in err, (command, where)
            assert "Findings" not in out
        code, _, err = run(capsys, "check", "--in", str(where))
        assert code == 2 and words in err
    # the directory itself still checks, and a KHO boot's kho/out without its fdt still decodes
    assert run(capsys, "check", str(parent / "out"))[0] == 0
    subs_only = tmp_path / "subs-only"
    shutil.copytree(parent / "out" / "sub_fdts", subs_only / "sub_fdts")
    code, out, _ = run(capsys, "check", str(subs_only))
    assert code == 0 and "debugfs-fdt-absent" in out


def test_console_entry_point_runs(samples_dir: Path) -> None:
    case = samples_dir / "case-in-1"
    proc = subprocess.run([sys.executable, "-m", "kho_agent.cli", "check", "--in", str(case)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "luo-v5, liveupdate-number 1" in proc.stdout
    # without memory the session chain is not readable: said as info, not as an error
    assert "[info] memory-unavailable /LUO/sessions-block[0]" in proc.stdout


# --- issue 11, class 8: every failure has a name, and --json prints it ------------------------

def json_error(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object],
                                                                        str]:
    """Run main() with --json among argv; the JSON error document on stdout and stderr."""
    code, out, err = run(capsys, *argv)
    doc: dict[str, object] = cli_json(out)
    assert set(doc) >= {"error", "message", "exit_code"} and doc["exit_code"] == code, doc
    return code, doc, err


@pytest.mark.parametrize("argv,message", [
    (["status", "--json", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--json"], "the following arguments are required: COMMAND"),
    (["prepare", "--kernel", "--json"], "argument --kernel: expected one argument"),
    (["scratch", "--margin", "lots", "--json"], "argument --margin: invalid int value: 'lots'"),
    (["status", "--bus", "nowhere", "--json"], "argument --bus: invalid choice: 'nowhere'"),
    (["check", "--memory", "a", "--kcore", "--js"], "not allowed with argument"),
    (["no-such-command", "--json"], "invalid choice: 'no-such-command'"),
])
def test_usage_errors_print_the_json_error_document(capsys: pytest.CaptureFixture[str],
                                                   argv: list[str], message: str) -> None:
    code, doc, err = json_error(capsys, *argv)
    assert code == 2 and doc["error"] == "InvalidArgument"
    assert message in str(doc["message"])
    # stderr keeps argparse's form: the usage, then the error
    assert err.startswith("usage: kho-agentctl") and f"error: {doc['message']}" in err


def test_prepare_without_kernel_is_the_daemons_target_but_an_initrd_alone_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    """--kernel is optional (the daemon's Target=, kho-agent.conf(5)); an initrd without it is
    refused before the daemon is asked."""
    code, doc, _err = json_error(capsys, "prepare", "--initrd", "/boot/initrd.img", "--json")
    assert code == 2 and doc["error"] == "InvalidArgument"
    assert "--initrd needs --kernel" in str(doc["message"])


@pytest.mark.parametrize("command", ["status", "sessions", "jobs", "manifest", "commit", "cancel",
                                     "verify", "preflight", "scratch"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-inf", "soon"])
def test_bad_timeouts_are_refused_before_anything_is_called(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, value: str) -> None:
    # a bus that does not exist: a call attempted would be DaemonUnreachable instead
    code, doc, _ = json_error(capsys, "--bus-address", f"unix:path={tmp_path}/no-bus",
                              command, "--timeout", value, "--json")
    assert code == 2 and doc["error"] == "InvalidArgument"
    assert "argument --timeout" in str(doc["message"])


def test_errors_before_the_command_runs_print_json(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err = json_error(capsys, "check", "--json")
    assert code == 2 and doc["error"] == "InvalidArgument" and "give FDT" in str(doc["message"])
    assert "kho-agentctl check: InvalidArgument: give FDT" in err
    empty = tmp_path / "debug"
    empty.mkdir()
    code, doc, _ = json_error(capsys, "check", "--live", "--debugfs", str(empty), "--json")
    assert code == 2 and doc["error"] == "NotFound"
    assert "debugfs is not mounted at" in str(doc["message"])
    code, doc, _ = json_error(capsys, "scratch", "--margin", "-5", "--local", "--json")
    assert code == 2 and doc["error"] == "InvalidArgument" and "negative" in str(doc["message"])


def test_an_os_error_reaches_the_user_with_its_errno_name(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from kho_agent.cli import decode

    def broken(_args: object) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(decode, "run", broken)
    code, doc, err = json_error(capsys, "check", "x", "--json")
    assert code == 4 and doc["error"] == "KernelRefused"
    assert doc["errno"] == errno.EBADF and doc["errno_name"] == "EBADF"
    assert "EBADF (Bad file descriptor)" in str(doc["message"])
    assert "EBADF (Bad file descriptor)" in err
    code, out, err = run(capsys, "check", "x")
    assert code == 4 and out == "" and "EBADF (Bad file descriptor)" in err


def test_ctrl_c_is_a_named_error(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from kho_agent.cli import decode

    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "run", interrupted)
    code, doc, _ = json_error(capsys, "decode", "x", "--json")
    assert code == 2 and doc["error"] == "Interrupted"


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_closed_stdout_ends_the_command_quietly(samples_dir: Path,
                                                  json_flag: list[str]) -> None:
    # `kho-agentctl check ... | head -1` once head has exited: the reader is gone before the
    # first write (deterministic, unlike a real head that may read everything first)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run([sys.executable, "-m", "kho_agent.cli", "check", "--in",
                               str(samples_dir / "case-in-1"), *json_flag], stdout=writer,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(writer)
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell shows for a tool SIGPIPE ended
    assert proc.stderr == ""       # no BrokenPipeError, no "Exception ignored"


def test_json_after_a_double_dash_belongs_to_the_command_run() -> None:
    """`inhibit -- kho-agentctl commit --json`: the inner command prints its own document; the
    outer one must not add a second (it did: stdout held two documents)."""
    from kho_agent.cli import wants_json
    assert wants_json(["inhibit", "--why", "x", "--json", "--", "true"])
    assert not wants_json(["inhibit", "--why", "x", "--", "kho-agentctl", "commit", "--json"])
    assert wants_json(["status", "--js"])
