"""Digests where the blake3 module is missing (Debian bookworm has no python3-blake3; the
package only recommends it): new digests are SHA-256, the manifest names the algorithm, and a
verification takes its digests with the manifest's algorithm or fails saying which is missing."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from agenthost import ERR, PAGE, Host, create_session, host, invoke, kernel_option
from enginerig import Rig

from kho_agent import digest
from kho_agent.engine import CommitOptions, Engine, PrepareOptions
from kho_agent.engine import sessions as sessions_mod
from kho_agent.errors import EXIT_CODES
from kho_agent.sim import SimKernel

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "schema" / "manifest-v1.schema.json"

__all__ = ["host"]  # the fixture, imported for pytest


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("fallback", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


@pytest.mark.parametrize("size", [0, 5000, 3 << 20, 6 * digest.PREAD_CHUNK + 7])
def test_sha256_is_hashlibs_over_every_read_path(size: int) -> None:
    """One chunk, several, and the pipelined reader: the same bytes as hashlib's SHA-256."""
    data = os.urandom(size)
    fd = memfd_with(data)
    try:
        result = digest.digest_fd(fd, alg=digest.SHA256)
    finally:
        os.close(fd)
    assert (result.alg, result.size) == ("sha256", size)
    assert result.hexdigest == hashlib.sha256(data).hexdigest()
    assert len(result.hexdigest) == digest.HEX_LENGTHS["sha256"]


def test_an_unknown_algorithm_is_refused_before_anything_is_read() -> None:
    r, w = os.pipe()          # a pipe would be refused with ESPIPE if it were read
    try:
        with pytest.raises(digest.DigestUnavailable) as caught:
            digest.digest_fd(r, alg="md5")
    finally:
        os.close(r)
        os.close(w)
    assert caught.value.name == "NotFound" and EXIT_CODES["NotFound"] == 2
    assert "unknown digest algorithm 'md5'" in caught.value.message


WITHOUT_BLAKE3 = textwrap.dedent("""
    import hashlib, json, os, sys
    sys.modules["blake3"] = None          # import blake3 raises ImportError, as on bookworm
    from kho_agent import digest, imagestrings
    from kho_agent.cli import main
    data = b"bookworm" * 100_000
    fd = os.memfd_create("x", os.MFD_CLOEXEC)
    os.write(fd, data)
    out = {"alg": digest.DIGEST_ALG, "default": digest.digest_fd(fd).hexdigest,
           "sha256": hashlib.sha256(data).hexdigest(),
           "image": imagestrings.image_digest(data)}
    try:
        digest.digest_fd(fd, alg="blake3")
    except digest.DigestUnavailable as exc:
        out["refused"] = [exc.name, exc.message]
    print(json.dumps(out), file=sys.stderr)
    sys.exit(main(["rehearse", "--dir", sys.argv[1]]))
""")


@pytest.fixture
def without_blake3(tmp_path: Path) -> Iterator[tuple[subprocess.CompletedProcess[str], Path]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_BLAKE3, str(tmp_path / "host")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    yield proc, tmp_path / "host"


def test_without_blake3_digests_are_sha256_and_a_live_update_verifies(
        without_blake3: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, host = without_blake3
    assert proc.returncode == 0, proc.stdout + proc.stderr
    facts = json.loads(proc.stderr.strip().splitlines()[-1])
    assert facts["alg"] == "sha256"
    assert facts["default"] == facts["sha256"] == facts["image"]
    name, message = facts["refused"]
    assert name == "NotFound"
    assert "python3-blake3" in message and "no other algorithm" in message
    # the whole rehearsal (prepare, commit, simulated kexec, verify) on SHA-256
    assert "sha256 digest matches" in proc.stdout
    manifest = json.loads((host / "state" / "manifest.json").read_text())
    algs = {f["digest_alg"] for s in manifest["sessions"] for f in s["files"]}
    assert algs == {"sha256"}
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))


def prepare_and_kexec(rig: Rig, data: bytes) -> Engine:
    """One client file of `data`, prepared and committed; the agent of the next boot."""
    rig.client("vm-a", {1: data})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    rig.agent.close()
    return rig.reboot_view()


def manifest_algs(rig: Rig) -> set[str]:
    doc = json.loads((rig.config.state_dir / "manifest.json").read_text())
    return {f["digest_alg"] for s in doc["sessions"] for f in s["files"]}


def test_verify_takes_the_digest_with_the_manifests_algorithm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest written with SHA-256, verified where blake3 is installed: SHA-256 again (with
    blake3 the digests would differ and the verification would report a mismatch)."""
    rig = Rig(tmp_path)
    monkeypatch.setattr(sessions_mod, "digest_fd",
                        functools.partial(digest.digest_fd, alg=digest.SHA256))
    data = os.urandom(50_000)
    agent = prepare_and_kexec(rig, data)
    monkeypatch.undo()
    assert manifest_algs(rig) == {"sha256"}
    report = agent.verify()
    digests = [i for i in report.items if i.kind == "file-digest"]
    assert report.ok, [(i.kind, i.detail) for i in report.items if i.verdict.value != "ok"]
    assert [i.expected for i in digests] == [hashlib.sha256(data).hexdigest()]
    assert "sha256 digest matches" in digests[0].detail
    agent.close()


def blake3_update_verified_without_blake3(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """An update prepared with blake3; the agent of the next boot, blake3 gone from it."""
    if not digest.available(digest.BLAKE3):
        pytest.skip("needs the blake3 module to write the manifest")
    agent = prepare_and_kexec(rig, b"x" * 10_000)
    assert manifest_algs(rig) == {"blake3"}
    monkeypatch.setattr(digest, "_BLAKE3", None)      # the module is gone after the kexec
    return agent


@pytest.mark.parametrize("restart", [False, True], ids=["same-agent", "restarted-agent"])
def test_a_blake3_manifest_where_blake3_is_missing_is_refused_before_any_retrieval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restart: bool) -> None:
    """The kernel hands each session out once: a verification that retrieved the sessions and
    only then found it cannot take their digests was lost for good. It is refused before
    anything is retrieved or recorded, and runs for real once blake3 is there (a restart of
    the agent is how an installed module gets loaded)."""
    rig = Rig(tmp_path)
    agent = blake3_update_verified_without_blake3(rig, monkeypatch)
    state_before = (rig.config.state_dir / "state.json").read_bytes()
    with pytest.raises(digest.DigestUnavailable) as caught:
        agent.verify()
    assert caught.value.name == "NotFound" and EXIT_CODES["NotFound"] == 2
    message = caught.value.message
    assert "blake3 is not installed" in message and "python3-blake3" in message
    assert "retrieved no session" in message and "restart" in message
    assert rig.sim.retrieved_sessions() == set()  # not the VM's, not the agent's own
    # the state is the kexec's still (verification pending), on disk; memory says why
    assert (rig.config.state_dir / "state.json").read_bytes() == state_before
    assert "could not run" in agent.state.message
    monkeypatch.undo()                                  # blake3 installed
    if restart:
        agent.close()
        agent = rig.new_agent()
    report = agent.verify()
    assert report.ok, [(i.kind, i.detail) for i in report.items if i.verdict.value != "ok"]
    digests = [i for i in report.items if i.kind == "file-digest"]
    assert len(digests) == 1 and "blake3 digest matches" in digests[0].detail
    assert "vm-a" in rig.sim.retrieved_sessions()
    agent.close()


def test_without_the_disk_manifest_blake3_missing_fails_the_files_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk copy lost: the algorithms are known only from the agent's own session, which
    the kernel hands out once, so the verification goes on (a refusal would leave the VMs'
    sessions with no manifest to verify them against) and fails each such file with the
    reason."""
    rig = Rig(tmp_path)
    agent = blake3_update_verified_without_blake3(rig, monkeypatch)
    (rig.config.state_dir / "manifest.json").unlink()
    report = agent.verify()
    assert not report.ok
    failed = [i for i in report.items if i.verdict.value == "failed"]
    assert [i.kind for i in failed] == ["file"], [(i.kind, i.detail) for i in failed]
    assert "blake3 is not installed" in failed[0].detail
    assert "python3-blake3" in failed[0].detail
    agent.close()


# kho-agentd in a process where `import blake3` fails, as on a host without python3-blake3
NO_BLAKE3_DAEMON = ("import sys; sys.modules['blake3'] = None; "
                    "from kho_agent import daemon; sys.exit(daemon.main(sys.argv[1:]))")


def test_the_daemon_refuses_it_too_and_verifies_once_restarted_with_blake3(host: Host) -> None:
    """The daemon's verification at its start and a Verify job take the same check (both
    begin in engine/verify.py): refused, nothing retrieved, and the restart that loads the
    installed module verifies."""
    if not digest.available(digest.BLAKE3):
        pytest.skip("needs the blake3 module to write the manifest")
    client = host.client()
    create_session(client, "vm-a", {1: os.urandom(3 * PAGE)})
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    manifest = json.loads(invoke(client, "GetManifest")[0])
    assert {f["digest_alg"] for s in manifest["sessions"] for f in s["files"]} == {"blake3"}
    assert host.run_job(client, "Commit", {})[0] == "done"
    host.restart_wait_exit()
    with_blake3 = host.daemon.argv
    host.daemon.argv = [sys.executable, "-c", NO_BLAKE3_DAEMON]
    host.daemon.start()
    deadline = time.monotonic() + 30    # its own verification at start, refused
    while "could not run" not in str(host.prop("StateMessage")):
        assert time.monotonic() < deadline, host.daemon.stderr_text()
        time.sleep(0.05)
    client = host.client()
    result, job = host.run_job(client, "Verify")
    assert (result, job["ErrorName"]) == ("failed", ERR + "NotFound"), job
    assert "python3-blake3" in job["ErrorMessage"]
    assert "retrieved no session" in job["ErrorMessage"]
    assert invoke(client, "ListSessions") == ([],)
    assert SimKernel(host.sim_dir).retrieved_sessions() == set()
    host.daemon.stop()
    host.daemon.argv = with_blake3
    host.daemon.start()
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    assert "vm-a" in SimKernel(host.sim_dir).retrieved_sessions()
