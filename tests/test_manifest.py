"""The manifest: JSON form, validation, atomic writes, the sealed memfd, and verification."""

from __future__ import annotations

import copy
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import jsonschema
import jsonschema.validators
import pytest
from jsonschema import Draft202012Validator

from kho_agent.digest import digest_fd
from kho_agent.engine import manifest as mf
from kho_agent.engine.manifest import (
    AGENT_SESSION,
    MANIFEST_TOKEN,
    FileEntry,
    Manifest,
    Observation,
    ObservedFile,
    ObservedSession,
    SessionEntry,
    SubtreeEntry,
    Verdict,
    compare_manifest,
    manifest_from_fd,
    manifest_from_json,
    manifest_memfd,
    manifest_to_json,
    read_manifest,
)
from kho_agent.errors import (
    InvalidArgument,
    KernelRefused,
    NotFound,
    StateCorrupt,
    StorageFailed,
)
from kho_agent.kernel import callerfile
from kho_agent.kernel.atomicfile import write_atomic
from kho_agent.netstate import Address, Link, NetState, Route

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "schema" / "manifest-v1.schema.json"
DIGEST_A = "a" * 64
DIGEST_B = "b" * 64
NAME_63 = "n" * 63


def netstate() -> NetState:
    return NetState(
        links=[Link("lo", None, "00:00:00:00:00:00", 65536, "UNKNOWN"),
               Link("eth0", None, "02:00:00:00:00:01", 1500, "UP")],
        addresses=[Address("lo", "inet", "127.0.0.1/8"), Address("eth0", "inet", "10.0.0.5/24")],
        routes=[Route("inet", "default", "10.0.0.1", "eth0"),
                Route("inet", "10.0.0.0/24", None, "eth0")])


def sample() -> Manifest:
    return Manifest(
        schema=1,
        created="2026-11-21T10:00:00Z",
        host="host-ü1",
        release_from="7.2.13",
        release_to="7.3.0-rc7",
        boot_id_from="0f6c7d2e-1111-4a4a-9b9b-000000000001",
        abi_from={"kho-root": "kho-v4", "luo": "luo-v5", "handler:memfd": "memfd-v2",
                  "memblock": "memblock-v1"},
        abi_to={"kho-root": "kho-v4", "luo": "luo-v5", "handler:memfd": "memfd-v2",
                "memblock": "memblock-v1"},
        cmdline_to="console=ttyS0 kho=on liveupdate=on",
        scratch={"kho_scratch": None, "areas": [{"addr": 1 << 32, "size": 64 << 20}]},
        liveupdate_number_from=1,
        liveupdate_number_expected=2,
        sessions=[
            SessionEntry("vm-alpha", "uid:0", [
                FileEntry(1, 4 << 20, DIGEST_A, "blake3", 0.012, 0x20),
                FileEntry((1 << 64) - 1, 0, None, None, None, 0),
            ], ready=True, digests=True),
            SessionEntry(NAME_63, "rehearsal", [FileEntry(7, 4096, None, None, None, None)],
                         ready=False, digests=False),
            SessionEntry("vm-é", "uid:1000", [], ready=True, digests=False),
        ],
        subtrees=[SubtreeEntry("kexec-metadata", 73, None), SubtreeEntry("LUO", 32, "luo-v5"),
                  SubtreeEntry("memblock", 405, "memblock-v1")],
        network=netstate().to_json(),
        final=True,
    )


def doc() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(manifest_to_json(sample()))
    return parsed


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


# --- the schema, checked with jsonschema ---------------------------------------------------------

# JSON Schema (draft 6 on) counts 4096.0 as an integer; Python's json keeps it a float and the
# manifest refuses it, so the schema's "integer" is read the strict way here (bool is no integer
# either): a document the schema accepts is one kho-agent reads back.
STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
ManifestValidator = jsonschema.validators.extend(Draft202012Validator, type_checker=STRICT_TYPES)


def schema_errors(value: object, schema: dict[str, Any]) -> list[str]:
    """What jsonschema finds wrong with `value`, one line per error with its JSON path."""
    return sorted(f"{e.json_path}: {e.message}"
                  for e in ManifestValidator(schema).iter_errors(value))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(loaded)  # the schema itself is valid draft 2020-12
    return loaded


# --- JSON form -----------------------------------------------------------------------------------

def test_round_trip_keeps_every_field() -> None:
    m = sample()
    data = manifest_to_json(m)
    back = manifest_from_json(data)
    assert back == m
    assert manifest_to_json(back) == data


def test_json_is_canonical_utf8_with_sorted_keys() -> None:
    data = manifest_to_json(sample())
    assert data.endswith(b"}\n")
    text = data.decode("utf-8")
    # Non-ASCII stays UTF-8 (no \u escapes), so names read as written.
    assert "vm-é" in text and "\\u" not in text
    # Re-serialising the parsed document with sorted keys gives the same bytes: keys were sorted.
    reparsed = json.loads(text)
    assert (json.dumps(reparsed, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            + "\n") == text
    assert text.count("\n") == 1
    # Field order in the source object does not matter.
    shuffled = dataclasses.replace(sample(), abi_to=dict(reversed(sample().abi_to.items())))
    assert manifest_to_json(shuffled) == data


def test_limits_that_are_valid_are_accepted() -> None:
    d = doc()
    d["sessions"][0]["files"][0]["token"] = (1 << 64) - 1
    d["sessions"][0]["files"][1]["token"] = 0
    d["sessions"][0]["files"][0]["seals"] = (1 << 32) - 1
    d["sessions"][1]["name"] = "é" * 31 + "x"       # 63 bytes of UTF-8, 32 characters
    d["created"] = "2026-11-21T10:00:00.123456+00:00"
    d["network"] = None
    d["liveupdate_number_expected"] = None
    m = manifest_from_json(encode(d))
    assert m.sessions[0].files[0].token == (1 << 64) - 1
    assert m.network is None


def test_schema_matches_the_dataclasses(schema: dict[str, Any]) -> None:
    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert set(schema["properties"]) == names(Manifest) == set(schema["required"])
    defs = schema["$defs"]
    assert set(defs["session"]["properties"]) == names(SessionEntry)
    assert set(defs["file"]["properties"]) == names(FileEntry)
    assert set(defs["subtree"]["properties"]) == names(SubtreeEntry)
    net = defs["netstate"]["properties"]
    assert set(net["links"]["items"]["properties"]) == names(Link)
    assert set(net["addresses"]["items"]["properties"]) == names(Address)
    assert set(net["routes"]["items"]["properties"]) == names(Route)


def test_written_manifests_validate_against_the_schema(schema: dict[str, Any]) -> None:
    assert schema_errors(doc(), schema) == []
    minimal = dataclasses.replace(sample(), sessions=[], subtrees=[], network=None, scratch={},
                                  abi_from={}, abi_to={}, liveupdate_number_from=None,
                                  liveupdate_number_expected=None, final=False)
    assert schema_errors(json.loads(manifest_to_json(minimal)), schema) == []



def test_a_schema_violation_is_reported_at_its_path(schema: dict[str, Any]) -> None:
    d = doc()
    d["sessions"][0]["files"][0]["size"] = -1
    d["final"] = "yes"
    errors = schema_errors(d, schema)
    assert [e.split(":")[0] for e in errors] == ["$.final", "$.sessions[0].files[0].size"]
    # the strict integer: 4096.0 is a float to Python and to the manifest, and so to the schema
    d = doc()
    d["sessions"][0]["files"][0]["size"] = 4096.0
    assert [e.split(":")[0] for e in schema_errors(d, schema)] == ["$.sessions[0].files[0].size"]

def set_at(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets the value at a JSON path like `$.sessions[0].files[1].token`."""
    parts = re.findall(r"\.([^.\[]+)|\[(\d+)\]", path)

    def apply(d: dict[str, Any]) -> None:
        target: Any = d
        keys: list[str | int] = [k if k else int(i) for k, i in parts]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return apply


def delete_at(path: str) -> Callable[[dict[str, Any]], None]:
    head, _, last = path.rpartition(".")

    def apply(d: dict[str, Any]) -> None:
        target: Any = d
        for k, i in re.findall(r"\.([^.\[]+)|\[(\d+)\]", head):
            target = target[k if k else int(i)]
        del target[last]
    return apply


def duplicate_session(d: dict[str, Any]) -> None:
    d["sessions"].append(copy.deepcopy(d["sessions"][0]))


def duplicate_token(d: dict[str, Any]) -> None:
    d["sessions"][0]["files"][1]["token"] = d["sessions"][0]["files"][0]["token"]


def duplicate_subtree(d: dict[str, Any]) -> None:
    d["subtrees"][2]["name"] = "LUO"


F0 = "$.sessions[0].files[0]"
# (id, mutation of the parsed document, JSON path of the error, the schema also rejects it)
CORRUPTIONS: list[tuple[str, Callable[[dict[str, Any]], None], str, bool]] = [
    ("size-as-string", set_at(f"{F0}.size", "4096"), f"{F0}.size", True),
    ("size-as-float", set_at(f"{F0}.size", 4096.0), f"{F0}.size", True),
    ("size-negative", set_at(f"{F0}.size", -1), f"{F0}.size", True),
    ("size-2^64", set_at(f"{F0}.size", 1 << 64), f"{F0}.size", True),
    ("token-2^64", set_at(f"{F0}.token", 1 << 64), f"{F0}.token", True),
    ("token-bool", set_at(f"{F0}.token", True), f"{F0}.token", True),
    ("token-null", set_at(f"{F0}.token", None), f"{F0}.token", True),
    ("seals-2^32", set_at(f"{F0}.seals", 1 << 32), f"{F0}.seals", True),
    ("duplicate-session", duplicate_session, "$.sessions[3].name", False),
    ("duplicate-token", duplicate_token, "$.sessions[0].files[1].token", False),
    ("duplicate-subtree", duplicate_subtree, "$.subtrees[2].name", False),
    ("name-64-bytes", set_at("$.sessions[0].name", "x" * 64), "$.sessions[0].name", True),
    # 32 characters but 64 bytes: the limit is bytes, which JSON Schema cannot say
    ("name-64-utf8-bytes", set_at("$.sessions[0].name", "é" * 32), "$.sessions[0].name", False),
    ("name-empty", set_at("$.sessions[0].name", ""), "$.sessions[0].name", True),
    ("name-nul", set_at("$.sessions[0].name", "a\0b"), "$.sessions[0].name", False),
    ("subtree-slash", set_at("$.subtrees[0].name", "a/b"), "$.subtrees[0].name", True),
    ("schema-2", set_at("$.schema", 2), "$.schema", True),
    ("schema-string", set_at("$.schema", "1"), "$.schema", True),
    ("schema-true", set_at("$.schema", True), "$.schema", True),
    ("schema-missing", delete_at("$.schema"), "$.schema", True),
    ("final-missing", delete_at("$.final"), "$.final", True),
    ("seals-missing", delete_at(f"{F0}.seals"), f"{F0}.seals", True),
    ("unknown-field", set_at("$.extra", 1), "$.extra", True),
    ("unknown-file-field", set_at(f"{F0}.mode", 1), f"{F0}.mode", True),
    ("final-as-int", set_at("$.final", 1), "$.final", True),
    ("sessions-object", set_at("$.sessions", {}), "$.sessions", True),
    ("session-not-object", set_at("$.sessions[1]", "vm"), "$.sessions[1]", True),
    ("digest-short", set_at(f"{F0}.digest", "abc"), f"{F0}.digest", True),
    ("digest-uppercase", set_at(f"{F0}.digest", "A" * 64), f"{F0}.digest", True),
    ("digest-without-alg", set_at(f"{F0}.digest_alg", None), f"{F0}.digest_alg", False),
    ("alg-unknown", set_at(f"{F0}.digest_alg", "sha1"), f"{F0}.digest_alg", True),
    ("digest-in-opted-out-session", set_at("$.sessions[0].digests", False), f"{F0}.digest",
     False),
    ("seconds-negative", set_at(f"{F0}.digest_seconds", -0.5), f"{F0}.digest_seconds", True),
    ("created-not-iso", set_at("$.created", "yesterday"), "$.created", False),
    ("created-not-utc", set_at("$.created", "2026-11-21T10:00:00+02:00"), "$.created", False),
    ("abi-value-int", set_at("$.abi_to.kho", 4), "$.abi_to.kho", True),
    ("number-negative", set_at("$.liveupdate_number_expected", -1),
     "$.liveupdate_number_expected", True),
    ("scratch-array", set_at("$.scratch", []), "$.scratch", True),
    ("network-bad-mtu", set_at("$.network.links[0].mtu", "1500"), "$.network.links[0].mtu",
     True),
    ("network-bad-family", set_at("$.network.routes[0].family", "ipx"),
     "$.network.routes[0].family", True),
    ("network-missing-routes", delete_at("$.network.routes"), "$.network.routes", True),
    ("release-empty", set_at("$.release_to", ""), "$.release_to", True),
]


@pytest.mark.parametrize(("mutate", "path", "schema_rejects"),
                         [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_each_corruption_names_its_json_path(mutate: Callable[[dict[str, Any]], None], path: str,
                                             schema_rejects: bool,
                                             schema: dict[str, Any]) -> None:
    d = doc()
    mutate(d)
    with pytest.raises(StateCorrupt) as caught:
        manifest_from_json(encode(d))
    err = caught.value
    assert isinstance(err, mf.ManifestCorrupt)
    assert err.json_path == path
    assert path in str(err)
    assert err.name == "StateCorrupt" and err.exit_code == 2
    # The schema says the same about every rule it can express.
    assert bool(schema_errors(d, schema)) == schema_rejects


RAW_CORRUPTIONS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated", lambda b: b[: len(b) // 2], "truncated"),
    ("empty", lambda b: b"", "not valid JSON"),
    ("not-utf8", lambda b: b.replace(b"vm-alpha", b"vm-\xff\xfe"), "UTF-8"),
    ("nan", lambda b: b.replace(b'"digest_seconds":0.012', b'"digest_seconds":NaN'),
     "NaN"),
    ("top-level-array", lambda b: b"[" + b + b"]", "expected an object"),
    ("deep-nesting", lambda b: b.replace(b'"scratch":{', b'"scratch":{"x":' + b"[" * 100000
                                         + b"]" * 100000 + b","), "nested too deeply"),
]


@pytest.mark.parametrize(("mutate", "words"), [c[1:] for c in RAW_CORRUPTIONS],
                         ids=[c[0] for c in RAW_CORRUPTIONS])
def test_unreadable_documents_are_state_corrupt(mutate: Callable[[bytes], bytes],
                                                words: str) -> None:
    data = mutate(manifest_to_json(sample()))
    with pytest.raises(StateCorrupt) as caught:
        manifest_from_json(data)
    assert isinstance(caught.value, mf.ManifestCorrupt)
    assert caught.value.json_path == "$"
    assert words in str(caught.value)


def test_duplicate_json_key_is_reported_at_its_path() -> None:
    data = manifest_to_json(sample()).replace(b'"owner":"uid:0",',
                                              b'"owner":"a","owner":"uid:0",', 1)
    with pytest.raises(StateCorrupt) as caught:
        manifest_from_json(data)
    assert isinstance(caught.value, mf.ManifestCorrupt)
    assert caught.value.json_path == "$.sessions[0].owner"


def test_refuses_to_write_what_it_could_not_read_back() -> None:
    bad_name = sample()
    bad_name.sessions[0].name = "x" * 64
    with pytest.raises(InvalidArgument, match=r"\$\.sessions\[0\]\.name"):
        manifest_to_json(bad_name)
    not_json = sample()
    not_json.sessions[0].files[0].digest_seconds = float("nan")
    with pytest.raises(InvalidArgument):
        manifest_to_json(not_json)


# --- files ---------------------------------------------------------------------------------------

def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    write_atomic(tmp_path / "fresh.json", b"x", mode=0o600)
    assert os.stat(tmp_path / "fresh.json").st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("call", "code"), [("write", errno.ENOSPC), ("fsync", errno.EDQUOT),
                                            ("rename", errno.EROFS)])
def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 call: str, code: int) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old manifest")
    real_fsync = os.fsync

    def fail(*args: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, fail)
    with pytest.raises(StorageFailed) as caught:
        write_atomic(target, b"new manifest" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = caught.value
    assert err.errno == code
    assert errno.errorcode[code] in err.message
    assert "left as it was" in err.message
    assert target.read_bytes() == b"old manifest"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_write_atomic_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageFailed) as caught:
        write_atomic(tmp_path / "nope" / "manifest.json", b"x")
    assert caught.value.errno == errno.ENOENT
    assert "does not exist" in caught.value.message


REAL_FS_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    from kho_agent.errors import StorageFailed
    from kho_agent.kernel.atomicfile import write_atomic
    mnt = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    target = mnt / "manifest.json"
    target.write_bytes(b"old manifest")
    out = {}
    try:
        write_atomic(target, b"x" * (1 << 20))
    except StorageFailed as err:
        out["enospc"] = [err.errno, err.message]
    out["after_enospc"] = [target.read_bytes().decode(), sorted(os.listdir(mnt))]
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    try:
        write_atomic(target, b"small")
    except StorageFailed as err:
        out["erofs"] = [err.errno, err.message]
    out["after_erofs"] = [target.read_bytes().decode(), sorted(os.listdir(mnt))]
    print(json.dumps(out))
""")


def test_write_atomic_on_a_real_full_and_read_only_filesystem(tmp_path: Path) -> None:
    """A 64 KiB tmpfs in a private mount namespace: real ENOSPC, then real EROFS."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([unshare, "--mount", "--propagation", "private", sys.executable, "-c",
                           REAL_FS_SCRIPT, str(mnt)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["enospc"][0] == errno.ENOSPC and "ENOSPC" in out["enospc"][1]
    assert out["after_enospc"] == ["old manifest", ["manifest.json"]]
    assert out["erofs"][0] == errno.EROFS and "read-only" in out["erofs"][1]
    assert out["after_erofs"] == ["old manifest", ["manifest.json"]]


def test_read_manifest(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(NotFound, match="prepare"):
        read_manifest(path)
    write_atomic(path, manifest_to_json(sample()))
    assert read_manifest(path) == sample()
    path.write_bytes(manifest_to_json(sample())[:-40])
    with pytest.raises(StateCorrupt) as caught:
        read_manifest(path)
    assert str(path) in str(caught.value)



def test_a_manifest_renamed_into_place_while_it_is_read_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GetManifest runs on a reader thread beside a prepare: the open may find nothing and the
    prepare's rename land before the reader looks again. That is the new manifest, not a
    dangling symlink (seen in CI as StateCorrupt under a hundred readers)."""
    path = tmp_path / "manifest.json"
    real = callerfile.read_regular
    calls: list[int] = []

    def open_before_the_rename(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            try:
                return real(*args, **kwargs)
            finally:
                write_atomic(path, manifest_to_json(sample()))   # the prepare's rename
        return real(*args, **kwargs)

    monkeypatch.setattr(callerfile, "read_regular", open_before_the_rename)
    assert read_manifest(path) == sample()
    assert len(calls) == 2
    # A real dangling symlink is still corrupt, and nothing absent is NotFound.
    path.unlink()
    path.symlink_to(tmp_path / "gone")
    with pytest.raises(StateCorrupt, match="symbolic link to a file that does not exist"):
        read_manifest(path)
    path.unlink()
    with pytest.raises(NotFound, match="prepare"):
        read_manifest(path)

def test_manifest_memfd_is_sealed_and_reads_back() -> None:
    m = sample()
    fd = manifest_memfd(m)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        data = manifest_to_json(m)
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data) + 10, 0) == data
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"X", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"X", len(data))
        # Reading does not depend on, or move, the file position.
        os.lseek(fd, 17, os.SEEK_SET)
        assert manifest_from_fd(fd) == m
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17
        # F_SEAL_SEAL is left off on purpose: further seals can still be added.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    finally:
        os.close(fd)


def test_manifest_from_a_garbage_fd_is_state_corrupt() -> None:
    fd = os.memfd_create("garbage", os.MFD_CLOEXEC)
    try:
        os.write(fd, b"\x00" * 100)
        with pytest.raises(StateCorrupt, match="memfd"):
            manifest_from_fd(fd)
    finally:
        os.close(fd)
    with pytest.raises(KernelRefused) as caught:
        manifest_from_fd(fd)
    assert caught.value.errno == errno.EBADF


# --- verification --------------------------------------------------------------------------------

def healthy(m: Manifest) -> Observation:
    sessions = [ObservedSession(s.name, [ObservedFile(f.token, f.size, f.digest, f.seals, None)
                                         for f in s.files], None) for s in m.sessions]
    sessions.append(ObservedSession(AGENT_SESSION, [ObservedFile(MANIFEST_TOKEN, 3000, None,
                                                                 0xe, None)], None))
    return Observation(
        boot_id="0f6c7d2e-2222-4a4a-9b9b-000000000002", release=m.release_to, kho_boot=True,
        liveupdate_number=m.liveupdate_number_expected, previous_release=m.release_from,
        abi=dict(m.abi_to), sessions=sessions, subtrees=copy.deepcopy(m.subtrees),
        network=copy.deepcopy(m.network), disk_manifest_matches_memfd=True)


def item(report: mf.VerifyReport, kind: str, name: str) -> mf.VerifyItem:
    found = [i for i in report.items if i.kind == kind and i.name == name]
    assert len(found) == 1, f"{kind} {name}: {found}"
    return found[0]


def test_healthy_observation_verifies() -> None:
    m = sample()
    report = compare_manifest(m, healthy(m))
    assert report.ok
    assert report.failures() == []
    verdicts = {i.verdict for i in report.items}
    assert verdicts <= {Verdict.OK, Verdict.UNCHECKED}
    for name in ("boot_id", "kho_boot", "liveupdate_number", "previous_release", "release"):
        assert item(report, "proof", name).verdict is Verdict.OK
    for s in m.sessions:
        assert item(report, "session", s.name).verdict is Verdict.OK
        for f in s.files:
            assert item(report, "file", f"{s.name}/{f.token}").verdict is Verdict.OK
            assert item(report, "file-size", f"{s.name}/{f.token}").verdict is Verdict.OK
    assert item(report, "file-digest", "vm-alpha/1").verdict is Verdict.OK
    # Digests off for that session: not compared, not a failure.
    assert item(report, "file-digest", f"{NAME_63}/7").verdict is Verdict.UNCHECKED
    assert item(report, "session", AGENT_SESSION).verdict is Verdict.OK
    assert item(report, "network", "state").verdict is Verdict.OK
    assert "frees the LUO blob" in item(report, "subtree", "LUO").detail
    out = report.to_json()
    json.dumps(out)  # plain JSON all the way down
    assert out["ok"] is True
    counts = out["counts"]
    assert isinstance(counts, dict) and sum(counts.values()) == len(report.items)


Mutation = Callable[[Manifest, Observation], None]


def _obs_file(obs: Observation, session: str, token: int) -> ObservedFile:
    s = next(x for x in obs.sessions if x.name == session)
    assert s.files is not None
    return next(f for f in s.files if f.token == token)


def _drop_session(name: str) -> Mutation:
    def apply(m: Manifest, obs: Observation) -> None:
        obs.sessions = [s for s in obs.sessions if s.name != name]
    return apply


def _drop_token(m: Manifest, obs: Observation) -> None:
    s = obs.sessions[0]
    assert s.files is not None
    s.files = [f for f in s.files if f.token != 1]


def _session_error(m: Manifest, obs: Observation) -> None:
    obs.sessions[0].files = None
    obs.sessions[0].error = "RETRIEVE_SESSION failed: ENOENT"


def _agent_session_error(m: Manifest, obs: Observation) -> None:
    obs.sessions[-1].files = None
    obs.sessions[-1].error = "RETRIEVE_SESSION failed: EIO"


def _agent_token_gone(m: Manifest, obs: Observation) -> None:
    obs.sessions[-1].files = []


def _subtree_gone(m: Manifest, obs: Observation) -> None:
    obs.subtrees = [t for t in obs.subtrees if t.name != "memblock"]


def _set(attr: str, value: object) -> Mutation:
    def apply(m: Manifest, obs: Observation) -> None:
        setattr(obs, attr, value)
    return apply


def _file(attr: str, value: object) -> Mutation:
    def apply(m: Manifest, obs: Observation) -> None:
        setattr(_obs_file(obs, "vm-alpha", 1), attr, value)
    return apply


def _abi(m: Manifest, obs: Observation) -> None:
    obs.abi["handler:memfd"] = "memfd-v3"


def _subtree_size(m: Manifest, obs: Observation) -> None:
    obs.subtrees[2].size = 406


def _subtree_compat(m: Manifest, obs: Observation) -> None:
    obs.subtrees[2].compatible = "memblock-v2"


def _seals_changed(m: Manifest, obs: Observation) -> None:
    m.sessions[0].files[1].seals = 0x8
    _obs_file(obs, "vm-alpha", (1 << 64) - 1).seals = 0xa


FAILING: list[tuple[str, Mutation, str, str, Verdict]] = [
    ("same-boot", _set("boot_id", sample().boot_id_from), "proof", "boot_id", Verdict.FAILED),
    ("cold-boot", _set("kho_boot", False), "proof", "kho_boot", Verdict.FAILED),
    ("number", _set("liveupdate_number", 3), "proof", "liveupdate_number", Verdict.MISMATCH),
    ("previous", _set("previous_release", "7.1.0"), "proof", "previous_release",
     Verdict.MISMATCH),
    ("release", _set("release", "7.2.13"), "proof", "release", Verdict.MISMATCH),
    ("abi", _abi, "abi", "handler:memfd", Verdict.MISMATCH),
    ("session-gone", _drop_session("vm-alpha"), "session", "vm-alpha", Verdict.MISSING),
    ("session-error", _session_error, "session", "vm-alpha", Verdict.FAILED),
    ("token-gone", _drop_token, "file", "vm-alpha/1", Verdict.MISSING),
    ("token-error", _file("error", "RETRIEVE_FD failed: EIO"), "file", "vm-alpha/1",
     Verdict.FAILED),
    ("size", _file("size", 4096), "file-size", "vm-alpha/1", Verdict.MISMATCH),
    ("digest", _file("digest", DIGEST_B), "file-digest", "vm-alpha/1", Verdict.MISMATCH),
    ("seals", _seals_changed, "file-seals", f"vm-alpha/{(1 << 64) - 1}", Verdict.MISMATCH),
    ("agent-session-error", _agent_session_error, "session", AGENT_SESSION, Verdict.FAILED),
    ("manifest-token-gone", _agent_token_gone, "file", f"{AGENT_SESSION}/0", Verdict.MISSING),
    ("subtree-gone", _subtree_gone, "subtree", "memblock", Verdict.MISSING),
    ("subtree-size", _subtree_size, "subtree-size", "memblock", Verdict.MISMATCH),
    ("subtree-compatible", _subtree_compat, "subtree-compatible", "memblock", Verdict.MISMATCH),
    ("copies-differ", _set("disk_manifest_matches_memfd", False), "manifest", "copies",
     Verdict.MISMATCH),
]


@pytest.mark.parametrize(("mutate", "kind", "name", "verdict"), [c[1:] for c in FAILING],
                         ids=[c[0] for c in FAILING])
def test_each_failure_has_its_verdict(mutate: Mutation, kind: str, name: str,
                                      verdict: Verdict) -> None:
    m = sample()
    obs = healthy(m)
    mutate(m, obs)
    report = compare_manifest(m, obs)
    assert not report.ok
    got = item(report, kind, name)
    assert got.verdict is verdict
    assert got.detail.endswith(".") and len(got.detail) > 30
    # Only the item that was broken fails (a missing session also hides its files).
    assert {(i.kind, i.name) for i in report.failures()} == {(kind, name)}


def _extra_session(m: Manifest, obs: Observation) -> None:
    obs.sessions.append(ObservedSession("stray", [], None))


def _extra_token(m: Manifest, obs: Observation) -> None:
    files = obs.sessions[0].files
    assert files is not None
    files.append(ObservedFile(99, 4096, None, None, None))


def _extra_subtree(m: Manifest, obs: Observation) -> None:
    obs.subtrees.append(SubtreeEntry("kho_test", 100, "kho-test-v1"))


def _no_subtrees(m: Manifest, obs: Observation) -> None:
    obs.subtrees = []


def _no_digest_after(m: Manifest, obs: Observation) -> None:
    _obs_file(obs, "vm-alpha", 1).digest = None


def _extra_abi(m: Manifest, obs: Observation) -> None:
    obs.abi["flb"] = "luo-flb-v1"


def _missing_abi(m: Manifest, obs: Observation) -> None:
    del obs.abi["handler:memfd"]


def _not_final(m: Manifest, obs: Observation) -> None:
    m.final = False


def _luo_freed(m: Manifest, obs: Observation) -> None:
    obs.subtrees[1].size = None


INFORMATIONAL: list[tuple[str, Mutation, str, str, Verdict]] = [
    ("extra-session", _extra_session, "session", "stray", Verdict.EXTRA),
    ("extra-token", _extra_token, "file", "vm-alpha/99", Verdict.EXTRA),
    ("extra-subtree", _extra_subtree, "subtree", "kho_test", Verdict.EXTRA),
    ("extra-abi", _extra_abi, "abi", "flb", Verdict.EXTRA),
    ("missing-abi", _missing_abi, "abi", "handler:memfd", Verdict.UNCHECKED),
    ("no-subtrees-visible", _no_subtrees, "subtree", "LUO", Verdict.UNCHECKED),
    ("luo-size-unknown", _luo_freed, "subtree-size", "LUO", Verdict.UNCHECKED),
    ("no-digest-after", _no_digest_after, "file-digest", "vm-alpha/1", Verdict.UNCHECKED),
    ("number-unreadable", _set("liveupdate_number", None), "proof", "liveupdate_number",
     Verdict.UNCHECKED),
    ("previous-unreadable", _set("previous_release", None), "proof", "previous_release",
     Verdict.UNCHECKED),
    ("one-copy", _set("disk_manifest_matches_memfd", None), "manifest", "copies",
     Verdict.UNCHECKED),
    ("not-final", _not_final, "manifest", "final", Verdict.UNCHECKED),
    ("no-network-after", _set("network", None), "network", "state", Verdict.UNCHECKED),
]


def test_agent_session_not_reported_is_left_to_the_copies_item() -> None:
    """An observer that reads the manifest memfd itself need not list the agent's session; the
    `copies` item then says whether the carried copy was usable."""
    m = sample()
    obs = healthy(m)
    _drop_session(AGENT_SESSION)(m, obs)
    report = compare_manifest(m, obs)
    assert report.ok
    assert not [i for i in report.items if i.name == AGENT_SESSION]
    obs.disk_manifest_matches_memfd = False  # the carried copy was lost
    report = compare_manifest(m, obs)
    assert not report.ok
    assert "lost" in item(report, "manifest", "copies").detail


def test_agent_session_listed_in_the_manifest_is_checked_like_any_other() -> None:
    m = sample()
    m.sessions.append(SessionEntry(AGENT_SESSION, "kho-agent", [FileEntry(0, 3000, None, None,
                                                                          None, 0xe)],
                                   ready=True, digests=False))
    obs = healthy(m)
    obs.sessions = [s for s in obs.sessions if s.name != AGENT_SESSION]
    report = compare_manifest(m, obs)
    assert item(report, "session", AGENT_SESSION).verdict is Verdict.MISSING
    assert not report.ok


@pytest.mark.parametrize(("mutate", "kind", "name", "verdict"),
                         [c[1:] for c in INFORMATIONAL], ids=[c[0] for c in INFORMATIONAL])
def test_informational_items_do_not_fail(mutate: Mutation, kind: str, name: str,
                                         verdict: Verdict) -> None:
    m = sample()
    obs = healthy(m)
    mutate(m, obs)
    report = compare_manifest(m, obs)
    assert item(report, kind, name).verdict is verdict
    assert report.ok, report.failures()


@pytest.mark.parametrize(("recorded", "restored", "verdict"), [
    (0x20, 0x3e, Verdict.OK),        # MFD_NOEXEC_SEAL: the kernel adds the write seals
    (0x21, 0x3f, Verdict.OK),        # the same with F_SEAL_SEAL
    (0x20, 0x28, Verdict.MISMATCH),  # only some write seals: not the kernel's doing
    (0x0, 0x1e, Verdict.MISMATCH),   # no F_SEAL_EXEC: write seals appearing is a change
    (0x3e, 0x20, Verdict.MISMATCH),  # seals lost
])
def test_seal_comparison_knows_the_exec_seal_rule(recorded: int, restored: int,
                                                  verdict: Verdict) -> None:
    m = sample()
    obs = healthy(m)
    m.sessions[0].files[0].seals = recorded
    _obs_file(obs, "vm-alpha", 1).seals = restored
    got = item(compare_manifest(m, obs), "file-seals", "vm-alpha/1")
    assert got.verdict is verdict
    if verdict is Verdict.OK:
        assert "F_SEAL_EXEC" in got.detail


def test_network_differences_are_reported_but_never_fail() -> None:
    m = sample()
    obs = healthy(m)
    after = netstate()
    after.routes = [Route("inet", "default", "10.0.0.254", "eth0"),
                    Route("inet", "10.0.0.0/24", None, "eth0")]
    after.addresses = after.addresses[:1]
    obs.network = after.to_json()
    report = compare_manifest(m, obs)
    changes = [i for i in report.items if i.kind == "network"]
    assert len(changes) == 2
    assert all(i.verdict is Verdict.UNCHECKED for i in changes)
    text = " ".join(i.detail for i in changes)
    assert "10.0.0.1" in text and "10.0.0.254" in text and "10.0.0.5/24" in text
    assert report.ok


def test_end_to_end_with_real_memfds() -> None:
    """Digests and seals taken from real memfds before and after, as the engine would."""
    payload = os.urandom(3 << 20)
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, payload)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        before = digest_fd(fd)
        assert before.hexdigest == blake3.blake3(payload).hexdigest()
        m = dataclasses.replace(sample(), sessions=[SessionEntry(
            "vm", "uid=0", [FileEntry(5, before.size, before.hexdigest, before.alg,
                                      before.seconds, fcntl.fcntl(fd, fcntl.F_GET_SEALS))],
            ready=True, digests=True)])
        m = manifest_from_json(manifest_to_json(m))

        def observe() -> Observation:
            obs = healthy(m)
            after = digest_fd(fd)
            obs.sessions[0].files = [ObservedFile(5, os.fstat(fd).st_size, after.hexdigest,
                                                  fcntl.fcntl(fd, fcntl.F_GET_SEALS), None)]
            return obs

        assert compare_manifest(m, observe()).ok
        # one byte of guest memory changes (to another value: a random byte is 0x01 once in 256)
        os.pwrite(fd, bytes([payload[12345] ^ 1]), 12345)
        report = compare_manifest(m, observe())
        assert not report.ok
        assert item(report, "file-digest", "vm/5").verdict is Verdict.MISMATCH
    finally:
        os.close(fd)


def test_a_session_its_owner_keeps_is_marked_only_when_it_is(schema: dict[str, Any]) -> None:
    """`owner_fd_store` is written only when true, so manifests of agents before it still
    read, and so do the new ones."""
    m = sample()
    kept = dataclasses.replace(m, sessions=[dataclasses.replace(m.sessions[0],
                                                                owner_fd_store=True)])
    data = manifest_to_json(kept)
    assert manifest_from_json(data) == kept
    assert json.loads(data)["sessions"][0]["owner_fd_store"] is True
    assert schema_errors(json.loads(data), schema) == []
    assert "owner_fd_store" not in manifest_to_json(m).decode()
    d = json.loads(data)
    d["sessions"][0]["owner_fd_store"] = "yes"
    with pytest.raises(StateCorrupt, match=r"sessions\[0\]\.owner_fd_store"):
        manifest_from_json(encode(d))
