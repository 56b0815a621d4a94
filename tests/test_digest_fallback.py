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
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from enginerig import Rig

from kho_agent import digest
from kho_agent.engine import CommitOptions, Engine, PrepareOptions
from kho_agent.engine import sessions as sessions_mod
from kho_agent.errors import EXIT_CODES

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "schema" / "manifest-v1.schema.json"


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


def test_a_blake3_manifest_where_blake3_is_missing_fails_verification_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not digest.available(digest.BLAKE3):
        pytest.skip("needs the blake3 module to write the manifest")
    rig = Rig(tmp_path)
    agent = prepare_and_kexec(rig, b"x" * 10_000)
    assert manifest_algs(rig) == {"blake3"}
    monkeypatch.setattr(digest, "_BLAKE3", None)      # the module is gone after the kexec
    report = agent.verify()
    assert not report.ok
    failed = [i for i in report.items if i.verdict.value == "failed"]
    assert [i.kind for i in failed] == ["file"], [(i.kind, i.detail) for i in failed]
    assert "blake3 is not installed" in failed[0].detail
    assert "python3-blake3" in failed[0].detail
    agent.close()
