"""The kernel install hooks (packaging/kernel/post{inst,rm}.d/zz-kho-agent) run for real, as
Debian's kernel packages run them, and `kho-agentctl kernels` that records and lists."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cliout import cli_json
from test_compat import LUO_MISMATCH, V73, fake_host, write_image

from kho_agent.cli import main

REPO = Path(__file__).resolve().parent.parent
POSTINST = REPO / "packaging" / "kernel" / "postinst.d" / "zz-kho-agent"
POSTRM = REPO / "packaging" / "kernel" / "postrm.d" / "zz-kho-agent"


def ctl_wrapper(tmp_path: Path, host: list[str]) -> str:
    """A kho-agentctl that reads the fake host (a debugfs copy, a /boot) instead of this one."""
    wrapper = tmp_path / "kho-agentctl"
    extra = " ".join(f"'{word}'" for word in host)
    wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m kho_agent.cli \"$@\" {extra}\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def hook(script: Path, state: Path, ctl: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "KHO_AGENTCTL": ctl, "KHO_AGENT_STATE_DIR": str(state)}
    return subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120,
                          env=env, check=False)


def test_postinst_records_a_compatible_kernel_and_postrm_removes_it(tmp_path: Path) -> None:
    ctl = ctl_wrapper(tmp_path, fake_host(tmp_path, boot=V73))
    image = write_image(tmp_path / "vmlinuz-7.3.1", *V73)
    state = tmp_path / "state"
    done = hook(POSTINST, state, ctl, "7.3.1", image)
    assert done.returncode == 0 and done.stdout == ""
    assert "7.3.1: compatible" in done.stderr
    record = json.loads((state / "kernels" / "7.3.1.json").read_text())
    assert record["version"] == "7.3.1" and record["image"] == image
    assert record["compatible"] is True and record["verdict"] == "compatible"
    assert record["reasons"] == []
    assert record["image_sha256"] == hashlib.sha256(Path(image).read_bytes()).hexdigest()
    assert record["image_size"] == os.path.getsize(image)
    assert (state / "kernels" / "7.3.1.json").stat().st_mode & 0o777 == 0o644

    listed = subprocess.run([ctl, "kernels", "--json"], capture_output=True, text=True,
                            timeout=120, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "KHO_AGENT_STATE_DIR": str(state)})
    assert [k["version"] for k in cli_json(listed.stdout)["kernels"]] == ["7.3.1"]

    done = hook(POSTRM, state, ctl, "7.3.1", image)
    assert done.returncode == 0
    assert not (state / "kernels" / "7.3.1.json").exists()
    # removing again (a purge after a remove) is quiet and still exit 0
    assert hook(POSTRM, state, ctl, "7.3.1", image).returncode == 0


def test_postinst_records_an_incompatible_kernel_with_the_reason(tmp_path: Path) -> None:
    ctl = ctl_wrapper(tmp_path, fake_host(tmp_path, boot=V73))
    image = write_image(tmp_path / "vmlinuz-7.4.0", "kho-v4", "luo-v4", "memfd-v2", "memblock-v1")
    state = tmp_path / "state"
    done = hook(POSTINST, state, ctl, "7.4.0", image)
    assert done.returncode == 0
    record = json.loads((state / "kernels" / "7.4.0.json").read_text())
    assert (record["verdict"], record["compatible"]) == ("incompatible", False)
    assert any(r.startswith("LUO: incompatible") and LUO_MISMATCH in r
               for r in record["reasons"]), record["reasons"]


def test_postinst_default_image_path_and_a_non_kernel_are_recorded_not_fatal(
        tmp_path: Path) -> None:
    host = fake_host(tmp_path, boot=V73)
    ctl = ctl_wrapper(tmp_path, host)
    boot = Path(host[host.index("--boot-dir") + 1])
    (boot / "vmlinuz-7.3.2").write_bytes(b"not a kernel at all" * 10)
    state = tmp_path / "state"
    done = hook(POSTINST, state, ctl, "7.3.2")  # no $2: /boot/vmlinuz-VERSION
    assert done.returncode == 0
    record = json.loads((state / "kernels" / "7.3.2.json").read_text())
    assert record["image"] == str(boot / "vmlinuz-7.3.2")
    assert (record["verdict"], record["compatible"]) == ("error", False)
    assert "cannot be read as a kernel" in record["reasons"][0]


def test_postinst_never_fails_the_installation(tmp_path: Path) -> None:
    ctl = ctl_wrapper(tmp_path, fake_host(tmp_path, boot=V73))
    image = write_image(tmp_path / "vmlinuz-7.3.1", *V73)
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    done = hook(POSTINST, not_a_dir, ctl, "7.3.1", image)
    assert done.returncode == 0
    assert "could not record whether a live update into 7.3.1 is possible" in done.stderr
    # no kho-agentctl at all (the package removed, its hook left): silent, exit 0
    done = hook(POSTINST, tmp_path / "s2", str(tmp_path / "nowhere" / "kho-agentctl"),
                "7.3.1", image)
    assert (done.returncode, done.stderr) == (0, "")
    # called without a version: says so, exit 0
    done = hook(POSTINST, tmp_path / "s3", ctl)
    assert done.returncode == 0 and "without a kernel version" in done.stderr
    assert not (tmp_path / "s3").exists()


def test_kernels_refuses_a_version_that_is_not_one_file_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("../../etc/passwd", ".hidden", "a/b", ""):
        code = main(["kernels", "--record", bad, "--image", "/dev/null",
                     "--state-dir", str(tmp_path)])
        assert code == 2
        assert "InvalidArgument" in capsys.readouterr().err
    assert not (tmp_path / "kernels").exists()
    assert main(["kernels", "--forget", "7.3.9", "--state-dir", str(tmp_path)]) == 2
    assert "NotFound: no record of kernel 7.3.9" in capsys.readouterr().err


def test_kernels_lists_unreadable_records_without_following_links(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = tmp_path / "kernels"
    records.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"version": "leaked"}))
    (records / "7.1.json").symlink_to(secret)
    (records / "7.2.json").write_text("{not json")
    os.mkfifo(records / "7.3.json")  # would block a reader that opens it blocking
    assert main(["kernels", "--state-dir", str(tmp_path), "--json"]) == 0
    docs = cli_json(capsys.readouterr().out)["kernels"]
    assert [d["version"] for d in docs] == ["7.1", "7.2", "7.3"]
    assert all("error" in d for d in docs)
    assert main(["kernels", "--state-dir", str(tmp_path / "empty")]) == 0
    assert "no kernel recorded" in capsys.readouterr().out
    (records / "7.2.json").write_text("{}")
    assert main(["kernels", "--forget", "7.2", "--state-dir", str(tmp_path), "--json"]) == 0
    assert cli_json(capsys.readouterr().out) == {"version": "7.2", "removed": True}
    assert not (records / "7.2.json").exists() and (records / "7.1.json").is_symlink()


def test_kernels_records_an_image_it_cannot_read_as_an_error_without_blocking(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The image is opened as callerfile opens any named file (a FIFO never blocks the hook, a
    sparse file larger than any kernel image is refused before a read) and the refusal is the
    record's reason, not a failure of the command."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge"
    with huge.open("wb") as sparse:
        sparse.truncate((1 << 30) + 1)
    expected = {"fifo": "is a FIFO, not a regular file", "huge": "more than the 1073741824",
                "missing": "does not exist"}
    for name, reason in expected.items():
        code = main(["kernels", "--record", "7.3.1", "--image", str(tmp_path / name),
                     "--state-dir", str(tmp_path / "state"), "--json"])
        assert code == 0
        record = cli_json(capsys.readouterr().out)
        assert (record["verdict"], record["image_sha256"]) == ("error", None), record
        [said] = record["reasons"]
        assert said.startswith(f"the image cannot be read: kernel image {tmp_path / name} ")
        assert reason in said, said
