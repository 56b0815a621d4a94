"""State files of any shape (issue 11, class 5).

Whatever is at the state file's path (a directory, a FIFO, a symlink to one, a device, a loop,
junk, JSON nested past the parser's recursion limit, valid JSON with a field of the wrong type)
is a StateCorrupt, never another exception and never a hang; the engine moves it aside (never
over an earlier aside file), starts from what it can prove, and says so. The same holds for
the manifest and the verification record the engine reads back from its state directory. A
boot that was verified already is not verified again when its state is lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kho_agent.engine import CommitOptions, Engine, EngineConfig, PrepareOptions
from kho_agent.engine import context as engine_context
from kho_agent.engine import phase as statefile
from kho_agent.engine.manifest import read_manifest
from kho_agent.engine.phase import (
    STATE_MAX_BYTES,
    AgentState,
    Phase,
    StateStore,
    Target,
)
from kho_agent.errors import (
    AgentError,
    KernelRefused,
    NotFound,
    NotPrepared,
    StateCorrupt,
    StorageFailed,
)
from kho_agent.kernel import callerfile
from kho_agent.sim import SimAbi, SimKernel

T = TypeVar("T")
HANG_SECONDS = 5.0


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call()` on another thread: a hang (an open that blocks on a FIFO) fails the test
    instead of hanging the suite (unblock_fifos releases the thread afterwards)."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=seconds)
    except FutureTimeout:
        pytest.fail(f"still blocked after {seconds} s (a FIFO opened for reading?)")
    finally:
        pool.shutdown(wait=False)


@pytest.fixture(autouse=True)
def unblock_fifos(tmp_path: Path) -> Iterator[None]:
    """On a failure, a reader may still wait in open() on a FIFO: a writer releases it."""
    yield
    for fifo in tmp_path.rglob("*"):
        if fifo.is_fifo():
            with contextlib.suppress(OSError):  # no reader waiting: nothing to release
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# --- valid content to start from -----------------------------------------------------------------

def valid_state() -> dict[str, Any]:
    """A state as the agent writes it, with every member set."""
    state = AgentState(
        phase=Phase.VERIFIED, boot_id="0f6c7d2e-1111-4a4a-9b9b-000000000001",
        updated="2026-11-21T10:00:00+00:00", message="verified: every preserved item came back",
        target=Target("/boot/vmlinuz-7.3.1", "/boot/initrd.img-7.3.1", "console=ttyS0 kho=on"),
        loaded_by_us=True,
        last_result={"result": "failed", "ok": False, "counts": {"ok": 20, "missing": 1},
                     "failures": [{"kind": "file", "name": "vm-a/1", "verdict": "missing",
                                   "detail": "gone"}],
                     "failures_total": 1, "report": "/var/lib/kho-agent/last-verify.json",
                     "lost_after_verify": ["vm-b"]},
        handoff_seconds=0.25, discarded=["vm-b"], awaiting=["vm-c"],
        history=[{"at": "2026-11-21T10:00:00+00:00", "phase": "verified", "message": "m"}])
    return state.to_json()


def dumps(value: object) -> bytes:
    return json.dumps(value, indent=2).encode()


def with_value(path: tuple[str | int, ...], value: object) -> bytes:
    doc = valid_state()
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return dumps(doc)


def without(*path: str | int) -> bytes:
    doc = valid_state()
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return dumps(doc)


def nested(depth: int) -> object:
    value: object = "deep"
    for _ in range(depth):
        value = [value]
    return value


# --- shapes --------------------------------------------------------------------------------------

Maker = Callable[[Path], None]


def content(data: bytes) -> Maker:
    def make(path: Path) -> None:
        path.write_bytes(data)
    return make


def make_dir(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("kept with the directory")


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_symlink_to_fifo(path: Path) -> None:
    os.mkfifo(path.with_name("a-fifo"))
    path.symlink_to("a-fifo")


def make_loop(path: Path) -> None:
    path.with_name("loop-b").symlink_to(path.name)
    path.symlink_to("loop-b")


def make_dangling(path: Path) -> None:
    path.symlink_to("/nonexistent/kho-agent-state.json")


def make_device(path: Path) -> None:
    if os.geteuid() == 0:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # a /dev/zero of our own
    else:
        path.symlink_to("/dev/zero")


def make_symlink_to_device(path: Path) -> None:
    path.symlink_to("/dev/zero")


def make_socket(path: Path) -> None:
    # bound where the path is short (sun_path holds 108 bytes), then renamed into place
    short = Path(tempfile.mkdtemp(prefix="kho-sock-", dir=path.parent))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(short)  # a relative name: the directory's own path may be long
        sock.bind("s")
    finally:
        os.chdir("/")
        sock.close()
    os.rename(short / "s", path)
    short.rmdir()


def make_huge(path: Path) -> None:
    with path.open("wb") as f:  # sparse: no disk is used
        f.truncate(STATE_MAX_BYTES + 1)


FS_SHAPES: dict[str, tuple[Maker, Callable[[int], bool]]] = {
    "directory": (make_dir, stat.S_ISDIR),
    "fifo": (make_fifo, stat.S_ISFIFO),
    "symlink-to-fifo": (make_symlink_to_fifo, stat.S_ISLNK),
    "symlink-loop": (make_loop, stat.S_ISLNK),
    "dangling-symlink": (make_dangling, stat.S_ISLNK),
    "device": (make_device, lambda m: stat.S_ISCHR(m) or stat.S_ISLNK(m)),
    "symlink-to-device": (make_symlink_to_device, stat.S_ISLNK),
    "socket": (make_socket, stat.S_ISSOCK),
    "huge": (make_huge, stat.S_ISREG),
    "empty": (content(b""), stat.S_ISREG),
}

CONTENT_SHAPES: dict[str, bytes] = {
    "binary-junk": bytes(range(256)) * 8,
    "invalid-utf8": b'{"phase": "idle", "boot_id": "\xff\xfe"}',
    "utf16-json": json.dumps({"phase": "idle", "boot_id": "x"}).encode("utf-16"),
    "utf8-bom": b"\xef\xbb\xbf" + json.dumps({"phase": "idle", "boot_id": "x"}).encode(),
    "truncated": dumps(valid_state())[:-30],
    "deep-nesting": b"[" * 200_000 + b"]" * 200_000,
    "deep-object-nesting": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "nested-in-a-field": with_value(("last_result", "extra"), nested(500)),
    "array": b"[]",
    "string": b'"idle"',
    "number": b"42",
    "null": b"null",
    "nan": with_value(("handoff_seconds",), 0.0).replace(b'"handoff_seconds": 0.0',
                                                         b'"handoff_seconds": NaN'),
    "infinity": with_value(("handoff_seconds",), 0.0).replace(b'"handoff_seconds": 0.0',
                                                              b'"handoff_seconds": Infinity'),
    "overflowing-number": with_value(("handoff_seconds",), 0.0).replace(
        b'"handoff_seconds": 0.0', b'"handoff_seconds": 1e999'),
    "huge-integer": with_value(("handoff_seconds",), 0).replace(
        b'"handoff_seconds": 0', b'"handoff_seconds": ' + b"9" * 5000),
    "duplicate-key": b'{"phase": "idle", "boot_id": "x", "phase": "prepared"}',
    "lone-surrogate": with_value(("message",), "x").replace(b'"message": "x"',
                                                            b'"message": "\\udcff"'),
    "nul-in-string": with_value(("message",), "a\0b"),
    "phase-unknown": with_value(("phase",), "exploded"),
    "phase-not-a-string": with_value(("phase",), 3),
    "phase-missing": without("phase"),
    "boot-id-list": with_value(("boot_id",), ["0f6c7d2e"]),
    "boot-id-null": with_value(("boot_id",), None),
    "boot-id-missing": without("boot_id"),
    "updated-list": with_value(("updated",), []),
    "message-number": with_value(("message",), 5),
    "target-string": with_value(("target",), "/boot/vmlinuz"),
    "target-list": with_value(("target",), ["/boot/vmlinuz", None, ""]),
    "target-kernel-number": with_value(("target", "kernel"), 7),
    "target-initrd-list": with_value(("target", "initrd"), ["/boot/initrd"]),
    "target-cmdline-missing": without("target", "cmdline"),
    "loaded-by-us-string": with_value(("loaded_by_us",), "yes"),
    "loaded-by-us-integer": with_value(("loaded_by_us",), 1),
    "last-result-list": with_value(("last_result",), ["verified"]),
    "last-result-string": with_value(("last_result",), "verified"),
    "last-result-counts-list": with_value(("last_result", "counts"), [1, 2]),
    "last-result-count-string": with_value(("last_result", "counts", "ok"), "20"),
    "last-result-failures-object": with_value(("last_result", "failures"), {}),
    "last-result-failure-no-detail": without("last_result", "failures", 0, "detail"),
    "last-result-ok-string": with_value(("last_result", "ok"), "true"),
    "last-result-result-number": with_value(("last_result", "result"), 1),
    "discarded-string": with_value(("discarded",), "vm-b"),
    "discarded-numbers": with_value(("discarded",), [1, 2]),
    "awaiting-null-name": with_value(("awaiting",), [None]),
    "awaiting-object": with_value(("awaiting",), {"vm-c": True}),
    "awaiting-empty-name": with_value(("awaiting",), [""]),
    "history-object": with_value(("history",), {"at": "x"}),
    "history-numbers": with_value(("history",), [1]),
    "history-entry-number": with_value(("history", 0, "message"), 1),
    "handoff-string": with_value(("handoff_seconds",), "0.25"),
    "handoff-negative": with_value(("handoff_seconds",), -1.0),
    "handoff-boolean": with_value(("handoff_seconds",), True),
    "committed-at-string": with_value(("committed_at",), "2026-12-04T12:00:00Z"),
    "committed-at-negative": with_value(("committed_at",), -5.0),
}


def all_shapes() -> dict[str, Maker]:
    shapes = {name: maker for name, (maker, _kind) in FS_SHAPES.items()}
    shapes.update({name: content(data) for name, data in CONTENT_SHAPES.items()})
    return shapes


SHAPES = all_shapes()


def state_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_of_state_file_is_state_corrupt(tmp_path: Path, shape: str) -> None:
    store = StateStore(state_dir(tmp_path))
    SHAPES[shape](store.path)
    with pytest.raises(StateCorrupt) as caught:
        within(HANG_SECONDS, store.load)
    assert str(store.path) in caught.value.message
    assert caught.value.name == "StateCorrupt" and caught.value.exit_code == 2


def test_an_unreadable_state_file_is_state_corrupt(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(state_dir(tmp_path))
    store.path.write_bytes(dumps(valid_state()))

    def refuse(handle: int, flags: int) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(callerfile, "_reopen", refuse)  # root reads anything: an LSM says no
    with pytest.raises(StateCorrupt, match="Permission denied"):
        store.load()


def test_absent_state_is_a_new_idle_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "state").load() == AgentState()
    assert StateStore(tmp_path / "state").load_or_set_aside().found is False


def test_the_state_as_written_reads_back(tmp_path: Path) -> None:
    store = StateStore(state_dir(tmp_path))
    store.path.write_bytes(dumps(valid_state()))
    loaded = store.load()
    assert loaded.to_json() == valid_state()
    # a symlink to a regular file holding a valid state is read through
    store.path.rename(tmp_path / "elsewhere.json")
    store.path.symlink_to(tmp_path / "elsewhere.json")
    assert store.load() == loaded


def test_a_member_this_version_does_not_know_is_ignored(tmp_path: Path) -> None:
    """A state written by a newer agent survives a downgrade."""
    store = StateStore(state_dir(tmp_path))
    store.path.write_bytes(with_value(("from_the_future",), {"x": [1, 2]}))
    assert store.load().phase is Phase.VERIFIED


def test_save_never_writes_what_load_refuses(tmp_path: Path) -> None:
    """A file name that is not UTF-8 (a lone surrogate in Python), a NUL or an infinite
    duration reach the file as text load takes."""
    store = StateStore(state_dir(tmp_path))
    state = AgentState(message="preparing /boot/vmlinuz-\udcff", handoff_seconds=math.inf,
                       target=Target("/boot/\udcfe", None, "a\0b"))
    store.save(state)
    back = store.load()
    assert back.message == "preparing /boot/vmlinuz-\\udcff"
    assert back.target == Target("/boot/\\udcfe", None, "a\\x00b")
    assert back.handoff_seconds is None
    assert state.message == "preparing /boot/vmlinuz-\udcff"  # memory keeps its values


# --- hypothesis: wrong types on top of a valid state ---------------------------------------------

def clean_text(value: object) -> bool:
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def a_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def a_name(value: object) -> bool:
    return clean_text(value) and value != ""


def a_failure(value: object) -> bool:
    return isinstance(value, dict) and all(
        clean_text(value.get(k)) for k in ("kind", "name", "verdict", "detail"))


def an_entry(value: object) -> bool:
    return isinstance(value, dict) and all(clean_text(v) for v in value.values())


def a_target(value: object) -> bool:
    return value is None or (isinstance(value, dict) and clean_text(value.get("kernel"))
                             and clean_text(value.get("cmdline"))
                             and (value.get("initrd") is None
                                  or clean_text(value.get("initrd"))))


def seconds(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                             and math.isfinite(value) and value >= 0)


def result_members(value: object) -> bool:
    checks: dict[str, Callable[[object], bool]] = {
        "result": clean_text, "reason": clean_text, "report": clean_text,
        "ok": lambda v: isinstance(v, bool), "failures_total": a_count,
        "counts": lambda v: isinstance(v, dict) and all(a_count(c) for c in v.values()),
        "failures": lambda v: isinstance(v, list) and all(a_failure(f) for f in v),
        "lost_after_verify": lambda v: isinstance(v, list) and all(a_name(n) for n in v)}
    return value is None or (isinstance(value, dict) and all(
        check(value[key]) for key, check in checks.items() if key in value))


ACCEPTS: dict[tuple[str | int, ...], Callable[[object], bool]] = {
    ("phase",): lambda v: isinstance(v, str) and v in {p.value for p in Phase},
    ("boot_id",): clean_text,
    ("updated",): clean_text,
    ("message",): clean_text,
    ("target",): a_target,
    ("target", "kernel"): clean_text,
    ("target", "initrd"): lambda v: v is None or clean_text(v),
    ("target", "cmdline"): clean_text,
    ("loaded_by_us",): lambda v: isinstance(v, bool),
    ("last_result",): result_members,
    ("last_result", "result"): clean_text,
    ("last_result", "ok"): lambda v: isinstance(v, bool),
    ("last_result", "counts"): lambda v: isinstance(v, dict) and all(
        a_count(c) for c in v.values()),
    ("last_result", "counts", "ok"): a_count,
    ("last_result", "failures"): lambda v: isinstance(v, list) and all(a_failure(f) for f in v),
    ("last_result", "failures", 0): a_failure,
    ("last_result", "failures", 0, "detail"): clean_text,
    ("last_result", "failures_total"): a_count,
    ("last_result", "lost_after_verify"): lambda v: isinstance(v, list) and all(
        a_name(n) for n in v),
    ("handoff_seconds",): seconds,
    ("discarded",): lambda v: isinstance(v, list) and all(a_name(n) for n in v),
    ("discarded", 0): a_name,
    ("awaiting",): lambda v: isinstance(v, list) and all(a_name(n) for n in v),
    ("awaiting", 0): a_name,
    ("history",): lambda v: isinstance(v, list) and all(an_entry(e) for e in v),
    ("history", 0): an_entry,
    ("history", 0, "at"): clean_text,
}

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from(["idle", "prepared", "", "\0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(sorted(ACCEPTS, key=str)), value=JSON_VALUES)
def test_a_wrong_type_anywhere_is_state_corrupt(tmp_path_factory: pytest.TempPathFactory,
                                                path: tuple[str | int, ...],
                                                value: object) -> None:
    assume(not ACCEPTS[path](value))
    store = StateStore(tmp_path_factory.mktemp("state"))
    store.path.write_bytes(with_value(path, value))
    with pytest.raises(StateCorrupt):
        store.load()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=JSON_VALUES)
def test_any_json_document_is_a_state_or_state_corrupt(tmp_path_factory: pytest.TempPathFactory,
                                                       value: object) -> None:
    store = StateStore(tmp_path_factory.mktemp("state"))
    store.path.write_bytes(json.dumps(value).encode())
    with contextlib.suppress(StateCorrupt):
        store.load()


CLEAN_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8).filter(
        lambda t: "\0" not in t),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6).filter(lambda t: "\0" not in t), inner, max_size=3),
    max_leaves=6)
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)
NAMES = st.lists(TEXT.filter(bool), max_size=4)
STATES = st.builds(
    AgentState, phase=st.sampled_from(Phase), boot_id=TEXT, message=TEXT,
    target=st.none() | st.builds(Target, TEXT, st.none() | TEXT, TEXT),
    loaded_by_us=st.booleans(),
    last_result=st.none() | st.fixed_dictionaries(
        {"result": TEXT}, optional={"reason": TEXT, "ok": st.booleans(),
                                    "counts": st.dictionaries(TEXT, st.integers(0, 10**6)),
                                    "extra": CLEAN_JSON}),
    handoff_seconds=st.none() | st.floats(min_value=0, max_value=1e6),
    discarded=NAMES, awaiting=NAMES)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(state=STATES)
def test_every_state_the_agent_saves_reads_back(tmp_path_factory: pytest.TempPathFactory,
                                                state: AgentState) -> None:
    store = StateStore(tmp_path_factory.mktemp("state"))
    store.save(state)
    assert store.load() == state


# --- moving aside --------------------------------------------------------------------------------

class FrozenClock(datetime):
    """datetime whose now() never advances: every aside name gets the same stamp."""

    @classmethod
    def now(cls, tz: Any = None) -> FrozenClock:
        return cls(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)


def test_two_corruptions_in_the_same_instant_keep_both(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statefile, "datetime", FrozenClock)
    store = StateStore(state_dir(tmp_path))
    store.path.write_bytes(b"first")
    first = store.move_aside()
    store.path.write_bytes(b"second")
    second = store.move_aside()
    assert first != second
    assert first.read_bytes() == b"first" and second.read_bytes() == b"second"
    assert not store.path.exists()


def test_aside_never_replaces_even_an_empty_directory(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """rename(2) replaces an empty directory with a directory: RENAME_NOREPLACE does not."""
    monkeypatch.setattr(statefile, "datetime", FrozenClock)
    store = StateStore(state_dir(tmp_path))
    store.path.mkdir()
    first = store.move_aside()
    store.path.mkdir()
    (store.path / "marker").write_text("second")
    second = store.move_aside()
    assert first.is_dir() and second.is_dir() and first != second
    assert (second / "marker").read_text() == "second"


# --- the engine on the simulated kernel ---------------------------------------------------------

class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sim = SimKernel.create(tmp / "sim")
        self.target = self.sim.write_kernel_image(tmp / "boot" / "vmlinuz-7.3.1-sim",
                                                  release="7.3.1-sim", abi=SimAbi())
        self.config = EngineConfig(state_dir=tmp / "state")
        self.store = StateStore(self.config.state_dir)
        self.agent = self.new_agent()

    def new_agent(self) -> Engine:
        agent = Engine(SimKernel(self.tmp / "sim").host(), self.config)
        self.last_start = within(HANG_SECONDS, agent.start)
        return agent

    def restart(self) -> Engine:
        self.agent.close()
        self.agent = self.new_agent()
        return self.agent

    def client(self, name: str, data: bytes) -> None:
        self.agent.create_session(name, "test")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, data)
        self.agent.preserve(name, fd, 1)
        os.close(fd)
        self.agent.set_ready(name, True)

    def live_update(self) -> Engine:
        """prepare, commit, the simulated kexec, a new agent (not verified yet)."""
        self.client("vm-a", b"alpha" * 1000)
        self.agent.prepare(PrepareOptions(kernel=self.target))
        self.agent.commit(CommitOptions())
        self.agent = self.new_agent()
        return self.agent

    def asides(self, name: str = "state.json") -> list[Path]:
        return sorted(self.config.state_dir.glob(f"{name}.corrupt-*"))

    def loaded(self) -> bool:
        return SimKernel(self.tmp / "sim").host().kexec.loaded()


def phase_of(agent: Engine) -> Phase:
    """The phase now (a function, so that type narrowing of an earlier check does not stick)."""
    return agent.state.phase


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def corrupt_state(rig: Rig, shape: str) -> None:
    path = rig.store.path
    if path.is_dir() and not path.is_symlink():
        raise AssertionError("the state file is a directory already")
    path.unlink(missing_ok=True)
    SHAPES[shape](path)


ENGINE_SHAPES = sorted([*FS_SHAPES, "binary-junk", "deep-nesting", "boot-id-list",
                        "target-string", "last-result-list", "awaiting-object", "nan",
                        "phase-unknown", "lone-surrogate"])


@pytest.mark.parametrize("shape", ENGINE_SHAPES)
def test_the_engine_starts_idle_with_any_shape_kept_aside(rig: Rig, shape: str) -> None:
    rig.agent.close()
    corrupt_state(rig, shape)
    agent = rig.new_agent()
    assert agent.state.phase is Phase.IDLE
    assert rig.last_start.phase is Phase.IDLE and not rig.last_start.verify_pending
    (aside,) = rig.asides()
    message = agent.state.message
    assert "corrupt" in message and str(aside) in message, message
    # the entry itself was moved: a directory as the directory, a symlink as the symlink
    assert FS_SHAPES.get(shape, (None, stat.S_ISREG))[1](os.lstat(aside).st_mode)
    # and the state is a regular file again that reads back
    assert stat.S_ISREG(os.lstat(rig.store.path).st_mode)
    assert rig.store.load().phase is Phase.IDLE
    assert agent.persist_problem is None
    # the next operation works without a restart
    rig.agent = agent
    rig.client("vm-a", b"x")
    agent.prepare(PrepareOptions(kernel=rig.target))
    assert phase_of(agent) is Phase.PREPARED and rig.loaded()
    agent.cancel()
    assert not rig.loaded()


def test_a_start_reads_the_boot_id_alone(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start needs this boot's id only: all of sysinfo forks `systemctl --version` on the running
    root, and kho-agentd read it again after the recovery for that id. A restart that cancels a
    prepared update and the first start after a kexec now read no sysinfo, and hand the boot id
    they read to the daemon."""
    def no_sysinfo(root: Path) -> None:
        raise AssertionError(f"sysinfo of {root} read at start")

    rig.client("vm-a", b"x")
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    with monkeypatch.context() as patch:
        patch.setattr(engine_context, "read_sysinfo", no_sysinfo)
        agent = rig.restart()
    assert agent.state.phase is Phase.IDLE and "restarted while prepared" in agent.state.message
    assert rig.last_start.boot_id == SimKernel(rig.tmp / "sim").boot_id
    assert agent.state.boot_id == rig.last_start.boot_id   # the cancel was stamped with it
    rig.client("vm-a", b"x")
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.commit(CommitOptions())
    with monkeypatch.context() as patch:
        patch.setattr(engine_context, "read_sysinfo", no_sysinfo)
        rig.agent = rig.new_agent()
    assert rig.last_start.verify_pending
    after = SimKernel(rig.tmp / "sim").boot_id
    assert rig.last_start.boot_id == after and after != agent.state.boot_id


def test_two_corrupt_starts_in_the_same_second_keep_both(rig: Rig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statefile, "datetime", FrozenClock)
    rig.agent.close()
    corrupt_state(rig, "binary-junk")
    rig.restart()
    corrupt_state(rig, "directory")
    rig.restart()
    first, second = rig.asides()
    assert first.read_bytes() == CONTENT_SHAPES["binary-junk"] and second.is_dir()
    assert str(second) in rig.agent.state.message


def test_a_corrupt_state_that_cannot_be_moved_is_kept_and_nothing_is_prepared(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.agent.close()
    corrupt_state(rig, "boot-id-list")

    def read_only(source: Path, destination: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(source))

    monkeypatch.setattr(statefile, "rename_noreplace", read_only)
    agent = rig.restart()
    assert agent.state.phase is Phase.IDLE and not rig.last_start.verify_pending
    assert "could not be moved aside" in agent.state.message and "EROFS" in agent.state.message
    assert "refused" in agent.state.message and agent.persist_problem
    assert rig.store.path.read_bytes() == CONTENT_SHAPES["boot-id-list"]  # not written over
    rig.client("vm-a", b"x")
    with pytest.raises(StateCorrupt, match="still in place"):
        agent.prepare(PrepareOptions(kernel=rig.target))
    assert agent.state.phase is Phase.IDLE and not rig.loaded()
    assert rig.store.path.read_bytes() == CONTENT_SHAPES["boot-id-list"]
    # the operator makes the directory writable again: the next prepare keeps the file first
    monkeypatch.undo()
    agent.prepare(PrepareOptions(kernel=rig.target))
    (aside,) = rig.asides()
    assert aside.read_bytes() == CONTENT_SHAPES["boot-id-list"]
    saved = rig.store.load()
    assert saved.phase is Phase.PREPARED
    assert any(str(aside) in entry["message"] for entry in saved.history)


def test_a_state_file_that_cannot_be_moved_aside_is_a_storage_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's own directory refused, not the kernel: StorageFailed, with the errno."""
    path = tmp_path / "state.json"
    path.write_text("junk")

    def read_only(source: Path, destination: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(source))

    monkeypatch.setattr(statefile, "rename_noreplace", read_only)
    with pytest.raises(StorageFailed) as caught:
        statefile.move_aside(path)
    assert not isinstance(caught.value, KernelRefused)
    assert caught.value.errno == errno.EROFS and "EROFS" in caught.value.message
    assert caught.value.to_json()["error"] == "StorageFailed"


def test_a_state_directory_that_cannot_be_written_still_starts(rig: Rig) -> None:
    rig.agent.close()
    directory = rig.config.state_dir
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()
    directory.write_text("a file where the state directory should be")
    agent = rig.new_agent()
    assert agent.state.phase is Phase.IDLE
    assert "could not be saved" in agent.state.message and agent.persist_problem
    rig.agent = agent
    with pytest.raises(AgentError):
        agent.prepare(PrepareOptions(kernel=rig.target))
    assert agent.state.phase is Phase.IDLE and not rig.loaded()


# --- a boot that was verified already ------------------------------------------------------------

@pytest.mark.parametrize("shape", ["directory", "fifo", "binary-junk", "deep-nesting",
                                   "phase-unknown", "absent"])
def test_a_verified_boot_is_not_verified_again_when_its_state_is_lost(rig: Rig,
                                                                      shape: str) -> None:
    agent = rig.live_update()
    assert rig.last_start.verify_pending
    assert agent.verify().ok
    agent.close()
    rig.store.path.unlink()
    if shape != "absent":
        SHAPES[shape](rig.store.path)
    again = rig.new_agent()
    assert not rig.last_start.verify_pending, rig.last_start
    assert again.state.phase is Phase.VERIFIED
    assert "verified already" in again.state.message
    assert again.state.last_result is not None and again.state.last_result["ok"] is True
    assert again.state.last_result["counts"]["ok"] > 0
    with pytest.raises(NotPrepared, match="verified already"):
        again.verify()
    again.close()


def test_a_failed_verification_stays_failed_not_verified_again(rig: Rig) -> None:
    rig.client("vm-a", b"payload")
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.sim.inject("corrupt-handover")
    rig.agent.commit(CommitOptions())
    agent = rig.new_agent()
    assert not agent.verify().ok
    failures = agent.state.last_result["failures_total"] if agent.state.last_result else 0
    agent.close()
    corrupt_state(rig, "binary-junk")
    again = rig.new_agent()
    assert again.state.phase is Phase.FAILED and not rig.last_start.verify_pending
    assert again.state.last_result is not None
    assert again.state.last_result["failures_total"] == failures > 0


def test_an_intact_state_not_saved_after_verification_is_not_verified_again(rig: Rig) -> None:
    agent = rig.live_update()
    before = rig.store.path.read_bytes()  # committing, of the boot before
    assert agent.verify().ok
    agent.close()
    rig.store.path.write_bytes(before)  # as if the save after verification had failed
    again = rig.new_agent()
    assert again.state.phase is Phase.VERIFIED and not rig.last_start.verify_pending


def test_an_intact_state_of_the_boot_before_verifies_whatever_an_older_record_is(
        rig: Rig) -> None:
    """The common first start after a kexec: the state says the update is committed; a record
    that is not of this boot (here junk) is not even parsed."""
    rig.client("vm-a", b"alpha")
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    rig.store.last_verify_path.write_bytes(b"junk of an earlier boot")
    agent = rig.new_agent()
    assert rig.last_start.verify_pending, rig.last_start
    assert agent.verify().ok


@pytest.mark.parametrize("record", ["binary-junk", "directory", "fifo"])
def test_when_the_record_is_lost_too_nothing_is_verified_on_its_own(rig: Rig,
                                                                    record: str) -> None:
    agent = rig.live_update()
    assert agent.verify().ok
    agent.close()
    corrupt_state(rig, "directory")
    rig.store.last_verify_path.unlink()
    SHAPES[record](rig.store.last_verify_path)
    again = rig.new_agent()
    assert again.state.phase is Phase.IDLE and not rig.last_start.verify_pending
    assert "cannot be told" in again.state.message and "kho-agentctl verify" in again.state.message


def test_the_first_start_after_the_kexec_with_a_corrupt_state_verifies(rig: Rig) -> None:
    rig.client("vm-a", b"alpha")
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    corrupt_state(rig, "fifo")
    agent = rig.new_agent()
    assert agent.state.phase is Phase.IDLE and rig.last_start.verify_pending
    assert agent.verify().ok
    assert phase_of(agent) is Phase.VERIFIED


@pytest.mark.parametrize("shape", ["directory", "fifo", "symlink-to-fifo", "dangling-symlink"])
def test_a_manifest_of_any_shape_is_kept_aside_and_verify_uses_the_carried_copy(
        rig: Rig, shape: str) -> None:
    rig.client("vm-a", b"alpha")
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    rig.store.manifest_path.unlink()
    SHAPES[shape](rig.store.manifest_path)
    agent = rig.new_agent()
    assert rig.last_start.verify_pending
    (aside,) = rig.asides("manifest.json")
    assert str(aside) in rig.last_start.message
    report = within(HANG_SECONDS, agent.verify)
    assert report.ok, [(i.kind, i.detail) for i in report.failures()]


def test_a_prepare_of_this_boot_is_cancelled_when_its_state_is_lost(rig: Rig) -> None:
    rig.client("vm-a", b"alpha")
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert rig.loaded()
    rig.agent.close()
    corrupt_state(rig, "symlink-to-fifo")
    agent = rig.new_agent()
    assert agent.state.phase is Phase.IDLE and not rig.last_start.verify_pending
    assert "corrupt" in agent.state.message and "Run prepare again" in agent.state.message
    assert not rig.loaded() and not rig.store.manifest_path.exists()
    rig.agent = agent
    rig.client("vm-a", b"alpha")
    agent.prepare(PrepareOptions(kernel=rig.target))
    assert phase_of(agent) is Phase.PREPARED


def test_a_prepare_after_a_verified_live_update_is_not_verified_when_lost(rig: Rig) -> None:
    """Incoming KHO state is there (this boot came through a live update), but the lost state
    had prepared the next one: nothing to verify, and the kernel loaded for it goes."""
    agent = rig.live_update()
    assert agent.verify().ok
    claimed = agent.claim_session("vm-a")
    claimed.finish()
    claimed.close()
    rig.client("vm-b", b"beta")
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.close()
    corrupt_state(rig, "nan")
    again = rig.new_agent()
    assert again.state.phase is Phase.IDLE and not rig.last_start.verify_pending
    assert not rig.loaded()


def test_a_non_file_manifest_is_moved_aside_at_any_start(rig: Rig) -> None:
    """A directory at manifest.json would make every prepare fail (rename over a directory)."""
    rig.agent.close()
    rig.store.manifest_path.mkdir()
    agent = rig.new_agent()
    (aside,) = rig.asides("manifest.json")
    assert aside.is_dir() and str(aside) in agent.state.message
    rig.agent = agent
    rig.client("vm-a", b"x")
    agent.prepare(PrepareOptions(kernel=rig.target))
    assert stat.S_ISREG(os.lstat(rig.store.manifest_path).st_mode)


# --- the other files read back: manifest and verification record --------------------------------

MANIFEST_SHAPES = ["directory", "fifo", "symlink-to-fifo", "symlink-loop", "dangling-symlink",
                   "device", "symlink-to-device", "socket", "empty", "binary-junk",
                   "deep-nesting", "nan", "lone-surrogate", "array"]


@pytest.mark.parametrize("shape", MANIFEST_SHAPES)
def test_read_manifest_of_any_shape_is_state_corrupt(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "manifest.json"
    SHAPES[shape](path)
    with pytest.raises(StateCorrupt) as caught:
        within(HANG_SECONDS, lambda: read_manifest(path))
    assert str(path) in caught.value.message


def test_read_manifest_refuses_a_huge_file_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with path.open("wb") as f:
        f.truncate(300 << 20)
    with pytest.raises(StateCorrupt, match="more than"):
        read_manifest(path)
    with pytest.raises(NotFound):
        read_manifest(tmp_path / "absent.json")


RECORD_SHAPES = {
    **{name: SHAPES[name] for name in ["directory", "fifo", "symlink-to-fifo", "symlink-loop",
                                       "dangling-symlink", "device", "socket", "empty",
                                       "binary-junk", "deep-nesting", "array", "nan"]},
    "no-boot": content(dumps({"ok": True, "counts": {"ok": 0}, "items": []})),
    "ok-string": content(dumps({"ok": "yes", "counts": {}, "items": []})),
    "items-object": content(dumps({"ok": True, "counts": {}, "items": {}})),
    "item-verdict-unknown": content(dumps({"ok": True, "counts": {}, "items": [
        {"kind": "proof", "name": "boot_id", "verdict": "great", "expected": None,
         "observed": "b", "detail": ""}]})),
    "boot-id-list": content(dumps({"ok": True, "counts": {}, "items": [
        {"kind": "proof", "name": "boot_id", "verdict": "ok", "expected": None,
         "observed": ["b"], "detail": ""}]})),
    "ok-but-failed": content(dumps({"ok": True, "counts": {}, "items": [
        {"kind": "proof", "name": "boot_id", "verdict": "ok", "expected": None,
         "observed": "b", "detail": ""},
        {"kind": "file", "name": "vm/1", "verdict": "missing", "expected": 1,
         "observed": None, "detail": "gone"}]})),
}


@pytest.mark.parametrize("shape", sorted(RECORD_SHAPES))
def test_a_verification_record_of_any_shape_is_state_corrupt(tmp_path: Path,
                                                             shape: str) -> None:
    store = StateStore(state_dir(tmp_path))
    RECORD_SHAPES[shape](store.last_verify_path)
    with pytest.raises(StateCorrupt):
        within(HANG_SECONDS, store.read_last_verify)


def test_the_verification_record_names_its_boot(rig: Rig) -> None:
    assert rig.store.read_last_verify() is None
    agent = rig.live_update()
    assert agent.verify().ok
    record = rig.store.read_last_verify()
    assert record is not None and record.ok
    assert record.boot_id == agent.sysinfo().boot_id


class DupStore:
    """systemd's fd store as the engine sees it: it keeps its own duplicate of what is parked
    (tests/test_fdstore.py has the full stand-in)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.capacity = 16

    def park(self, name: str, fd: int) -> None:
        self.fds[name] = os.dup(fd)

    def unpark(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)


def test_sessions_handed_back_by_the_fd_store_mean_this_boot_is_not_verified_yet(
        tmp_path: Path) -> None:
    """State and record both unreadable, but systemd's fd store hands session fds back: that
    happens only at the first start after the kexec, so verification runs, with them."""
    sim = SimKernel.create(tmp_path / "sim", systemd_version=261)
    target = sim.write_kernel_image(tmp_path / "vmlinuz", release="7.3.1-sim", abi=SimAbi())
    config = EngineConfig(state_dir=tmp_path / "state")
    store = DupStore()
    agent = Engine(SimKernel(tmp_path / "sim").host(), config, fd_store=store)
    agent.start()
    agent.create_session("vm-a", "test")
    fd = os.memfd_create("vm-a", os.MFD_CLOEXEC)
    os.write(fd, b"guest ram")
    agent.preserve("vm-a", fd, 1)
    os.close(fd)
    agent.set_ready("vm-a", True)
    agent.prepare(PrepareOptions(kernel=target))
    agent.commit(CommitOptions())
    paths = StateStore(config.state_dir)
    paths.path.write_bytes(b"\0junk")
    paths.last_verify_path.write_bytes(b"junk from an earlier boot")
    handed_back, store.fds = store.fds, {}
    after = DupStore()
    after.fds = {name: os.dup(fd) for name, fd in handed_back.items()}
    agent = Engine(SimKernel(tmp_path / "sim").host(), config, fd_store=after,
                   stored_sessions=handed_back)
    recovery = agent.start()
    assert recovery.verify_pending and agent.state.phase is Phase.IDLE
    assert agent._ctx.stored_sessions  # kept for verification, not released
    report = agent.verify()
    assert report.ok, [(i.name, i.detail) for i in report.failures()]
    agent.close()


def test_a_file_renamed_into_place_while_it_is_read_back_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon reads its records on reader threads beside the engine that rewrites them: a
    record absent at the open and renamed into place before the check is the new record, not
    a dangling symlink (a StateCorrupt that would move a good file aside)."""
    path = tmp_path / "last-verify.json"
    real = callerfile.read_regular
    calls: list[int] = []

    def open_before_the_rename(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        try:
            return real(*args, **kwargs)
        finally:
            if len(calls) == 1:
                path.write_text("{}")

    monkeypatch.setattr(callerfile, "read_regular", open_before_the_rename)
    assert statefile.read_back(path, "verification record", 1 << 20) == b"{}"
    assert len(calls) == 2
    path.unlink()
    path.symlink_to("nowhere")
    with pytest.raises(StateCorrupt, match="symbolic link to 'nowhere'"):
        statefile.read_back(path, "verification record", 1 << 20)
    path.unlink()
    assert statefile.read_back(path, "verification record", 1 << 20) is None


def test_read_back_without_following_links_refuses_a_link_even_to_a_regular_file(
        tmp_path: Path) -> None:
    """A directory whose entries must be the agent's own files (the kernel records) reads them
    with follow_symlinks=False: a link to a regular file elsewhere is refused, not read."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"version": "leaked"}')
    path = tmp_path / "7.1.json"
    path.symlink_to(secret)
    assert statefile.read_back(path, "kernel record", 1 << 20) == secret.read_bytes()
    with pytest.raises(StateCorrupt, match="is a symbolic link, not a regular file"):
        statefile.read_back(path, "kernel record", 1 << 20, follow_symlinks=False)
    path.unlink()
    path.symlink_to("nowhere")
    with pytest.raises(StateCorrupt, match="is a symbolic link, not a regular file"):
        statefile.read_back(path, "kernel record", 1 << 20, follow_symlinks=False)
    path.unlink()
    assert statefile.read_back(path, "kernel record", 1 << 20, follow_symlinks=False) is None
    path.write_text("{}")
    assert statefile.read_back(path, "kernel record", 1 << 20, follow_symlinks=False) == b"{}"
