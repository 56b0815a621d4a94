"""Hand-off mode fdstore: session fds parked in the service's fd store at commit, adopted from
it after the kexec (on the simulated kernel, with a store that keeps real duplicates)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kho_agent.engine import CommitOptions, Engine, EngineConfig, PrepareOptions
from kho_agent.engine.handoff import session_fdname, session_from_fdname
from kho_agent.engine.manifest import AGENT_SESSION
from kho_agent.engine.phase import Phase
from kho_agent.errors import AgentError, InvalidArgument, KernelRefused, PreflightFailed
from kho_agent.kernel.sysinfo import read_sysinfo
from kho_agent.service.notify import fdname_is_valid
from kho_agent.sim import SimAbi, SimKernel

# --- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "vm-1", "a", "with space", "colon:s", "50%", "é-utf8", "\x01ctl", "." * 63,
    "\udcff" * 63,  # 63 raw bytes that are not UTF-8 (surrogateescape): the longest escape
])
def test_every_session_name_maps_to_a_valid_fd_name_and_back(name: str) -> None:
    fdname = session_fdname(name)
    assert fdname_is_valid(fdname), fdname
    assert session_from_fdname(fdname) == name


def test_distinct_names_stay_distinct() -> None:
    names = ["a%41", "aA", "a:", "a%3A", "A"]
    assert len({session_fdname(n) for n in names}) == len(names)


@pytest.mark.parametrize("fdname", ["stored", "luo-", "luo-%4", "luo-%zz", "luo-a:b", "luo-%4a"])
def test_foreign_or_malformed_fd_names_are_not_sessions(fdname: str) -> None:
    assert session_from_fdname(fdname) is None


# --- the systemd version of a root that is not the running one ------------------------------------

@pytest.mark.parametrize("library", ["usr/lib/systemd/libsystemd-shared-261.so",
                                     "usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-261.so"])
def test_the_systemd_version_of_an_offline_root_comes_from_its_library(tmp_path: Path,
                                                                       library: str) -> None:
    sim = SimKernel.create(tmp_path / "sim")
    root = sim.host().root
    (root / "proc/1/comm").write_text("systemd\n")
    assert read_sysinfo(root).systemd_version is None
    (root / library).parent.mkdir(parents=True, exist_ok=True)
    (root / library).write_bytes(b"")
    assert read_sysinfo(root).systemd_version == 261


# --- the engine -----------------------------------------------------------------------------------

class DupStore:
    """What systemd's fd store does with what it is given: it keeps its own duplicate."""

    def __init__(self, capacity: int = 16, fail_on: str | None = None) -> None:
        self.capacity = capacity
        self.fds: dict[str, int] = {}
        self.fail_on = fail_on

    def park(self, name: str, fd: int) -> None:
        if name == self.fail_on:
            raise PreflightFailed(f"cannot park {name!r}")
        self.fds[name] = os.dup(fd)

    def unpark(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def hand_back(self) -> dict[str, int]:
        """LISTEN_FDS of the next start: the store's fds, which the receiver then owns."""
        out, self.fds = self.fds, {}
        return out


class Rig:
    def __init__(self, tmp: Path, systemd: int | None = 261) -> None:
        self.tmp = tmp
        self.sim = SimKernel.create(tmp / "sim", systemd_version=systemd)
        self.target = self.sim.write_kernel_image(tmp / "vmlinuz-7.3.1-sim",
                                                  release="7.3.1-sim", abi=SimAbi())
        self.config = EngineConfig(state_dir=tmp / "state")

    def agent(self, store: DupStore | None, stored: dict[str, int] | None = None
              ) -> Engine:
        agent = Engine(SimKernel(self.tmp / "sim").host(), self.config, fd_store=store,
                       stored_sessions=stored)
        agent.start()
        return agent

    def client(self, agent: Engine, name: str, data: bytes) -> None:
        agent.create_session(name, "test")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, data)
        agent.preserve(name, fd, 1)
        os.close(fd)
        agent.set_ready(name, True)


def test_commit_parks_every_session_and_the_next_boot_adopts_them(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    store = DupStore()
    agent = rig.agent(store)
    assert agent.handoff_mode() == "fdstore"
    rig.client(agent, "vm:1", b"guest ram" * 100)
    agent.prepare(PrepareOptions(kernel=rig.target))
    result = agent.commit(CommitOptions())
    assert "fd store" in result.plan[-1]
    assert sorted(store.fds) == sorted([AGENT_SESSION, "vm:1"])
    assert sorted(agent.parked) == sorted([AGENT_SESSION, "vm:1"])
    assert agent._ctx.device is None  # closed for systemd-shutdown
    # the next boot: the store hands the fds back, the agent adopts instead of retrieving
    stored = store.hand_back()
    store_after = DupStore()
    store_after.fds = {name: os.dup(fd) for name, fd in stored.items()}
    agent = rig.agent(store_after, stored)
    report = agent.verify()
    assert report.ok, [(i.name, i.detail) for i in report.failures()]
    assert agent._ctx.stored_sessions == {}
    assert store_after.fds == {}  # adopted sessions leave the store
    session = agent.claim_session("vm:1")
    fd = session.retrieve_fd(1)
    assert os.pread(fd, 1000, 0) == b"guest ram" * 100
    os.close(fd)
    session.finish()
    session.close()
    agent.close()


def test_a_store_too_small_refuses_the_commit_and_parks_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    store = DupStore(capacity=2)
    agent = rig.agent(store)
    rig.client(agent, "vm-1", b"x")
    agent.prepare(PrepareOptions(kernel=rig.target))  # vm-1 and the agent's own: 2 slots
    rig.client(agent, "vm-2", b"y")                   # one more after prepare
    with pytest.raises(PreflightFailed, match="FileDescriptorStoreMax"):
        agent.commit(CommitOptions())
    assert store.fds == {} and agent.parked == []
    assert agent.state.phase is Phase.PREPARED
    agent.cancel()
    agent.close()


def test_prepare_refuses_when_the_sessions_outnumber_the_store(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    store = DupStore(capacity=1)
    agent = rig.agent(store)
    rig.client(agent, "vm-1", b"x")
    with pytest.raises(PreflightFailed, match="need 2 fd store slots, the unit has 1"):
        agent.prepare(PrepareOptions(kernel=rig.target))
    assert store.fds == {} and agent.state.phase is Phase.IDLE
    assert not rig.sim.host().kexec.loaded()
    agent.close()


def test_a_failed_park_takes_back_what_was_parked(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    store = DupStore(fail_on=AGENT_SESSION)  # clients go first, the agent's own last
    agent = rig.agent(store)
    rig.client(agent, "vm-1", b"x")
    agent.prepare(PrepareOptions(kernel=rig.target))
    with pytest.raises(PreflightFailed, match="cannot park"):
        agent.commit(CommitOptions())
    assert store.fds == {} and agent.parked == []
    assert agent.state.phase is Phase.PREPARED
    assert rig.sim.host().kexec.loaded()  # still prepared: a retry or a cancel is possible
    agent.cancel()
    agent.close()


def test_a_refused_kexec_takes_the_sessions_back_from_the_store(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    store = DupStore()
    agent = rig.agent(store)
    rig.client(agent, "vm-1", b"x")
    agent.prepare(PrepareOptions(kernel=rig.target))
    rig.sim.inject("freeze-fails")
    with pytest.raises(KernelRefused):
        agent.commit(CommitOptions())
    assert store.fds == {} and agent.parked == []
    assert agent.state.phase is Phase.PREPARED
    agent.close()


def test_without_a_store_the_agent_holds_the_sessions_itself(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    agent = rig.agent(None)
    assert agent.handoff_mode() == "direct"
    rig.client(agent, "vm-1", b"x")
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.commit(CommitOptions())
    assert agent.parked == []
    agent = rig.agent(None)
    assert agent.verify().ok
    agent.close()


def test_fds_handed_back_in_the_same_boot_are_released(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    agent = rig.agent(DupStore())
    rig.client(agent, "vm-1", b"x")
    handle = agent._ctx.clients["vm-1"].handle
    stray = os.dup(handle.fileno())
    agent.close()
    store = DupStore()
    store.fds["vm-1"] = os.dup(stray)
    agent = rig.agent(store, {"vm-1": stray})
    assert agent._ctx.stored_sessions == {} and store.fds == {}
    assert "released 1: vm-1" in agent.state.message
    with pytest.raises(OSError):
        os.fstat(stray)  # closed by the agent
    state = json.loads((rig.config.state_dir / "state.json").read_text())
    assert "released" in state["message"]
    agent.close()


def test_the_name_systemd_uses_for_its_own_session_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    agent = rig.agent(DupStore())
    with pytest.raises(InvalidArgument, match="systemd's own"):
        agent.create_session("systemd", "test")
    assert agent._ctx.clients == {}
    agent.close()


def test_sessions_the_manifest_does_not_list_are_released_at_verify(tmp_path: Path) -> None:
    """The store hands back a session the manifest does not list (here a manifest without
    sessions): nobody will claim it, so verify releases it (the store's copy included), also
    when there is no session of the manifest to retrieve."""
    rig = Rig(tmp_path)
    store = DupStore()
    agent = rig.agent(store)
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.commit(CommitOptions())
    stored = store.hand_back()
    assert sorted(stored) == [AGENT_SESSION]
    stray = SimKernel(tmp_path / "sim").host().liveupdate.open()
    extra = stray.create_session("stray")  # a session of this boot, not in the manifest
    stored["stray"] = os.dup(extra.fileno())
    store_after = DupStore()
    store_after.fds = {name: os.dup(fd) for name, fd in stored.items()}
    agent = rig.agent(store_after, stored)
    assert agent.verify().ok
    assert agent._ctx.stored_sessions == {} and store_after.fds == {}
    extra.close()
    stray.close()
    agent.close()


# --- a session its owner keeps in its own fd store (option fd_store) ------------------------------

def owner_keeps(rig: Rig, agent: Engine, name: str, data: bytes) -> int:
    """A manager in systemd's native way: its session fd goes to its own service's fd store
    (here: a duplicate it keeps), its memfd is preserved through the agent."""
    handle = agent.create_session(name, "test", owner_fd_store=True)
    own_store = os.dup(handle.fileno())
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    agent.preserve(name, fd, 1)
    os.close(fd)
    agent.set_ready(name, True)
    return own_store


def test_a_session_its_owner_keeps_is_neither_parked_nor_retrieved(tmp_path: Path) -> None:
    """systemd hands a session to one fd store only (found on systemd 262: the second
    RETRIEVE_SESSION of a name fails with EINVAL and that unit's entry is dropped), so the agent
    must not park a session its owner stores itself, nor try to retrieve it afterwards."""
    rig = Rig(tmp_path)
    store = DupStore()
    agent = rig.agent(store)
    rig.client(agent, "vm-1", b"held by the agent")
    own_store = owner_keeps(rig, agent, "keeper-1", b"kept by its owner")
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.commit(CommitOptions())
    assert sorted(store.fds) == sorted([AGENT_SESSION, "vm-1"])   # not keeper-1
    written = json.loads(agent.manifest_path.read_text())
    flags = {s["name"]: s.get("owner_fd_store", False) for s in written["sessions"]}
    assert flags == {"vm-1": False, "keeper-1": True}
    after = rig.agent(DupStore(), store.hand_back())
    report = after.verify()
    assert report.ok, [(i.name, i.detail) for i in report.failures()]
    kept = next(i for i in report.items if i.kind == "session" and i.name == "keeper-1")
    assert kept.verdict.value == "unchecked" and "owner's fd store" in kept.detail
    with pytest.raises(AgentError):
        after.claim_session("keeper-1")   # not the agent's to hand out
    os.close(own_store)
    # the agent left it in the kernel for systemd to retrieve (the simulated kernel's
    # sessions live in its agent's process, so this retrieves it the way PID 1 would)
    session = after._ctx.open_device().retrieve_session("keeper-1")
    fd = session.retrieve_fd(1)
    assert os.pread(fd, 100, 0) == b"kept by its owner"
    # the owner hands its fd in: the agent checks what it recorded, and reads only
    checked = after.check_kept_session("keeper-1", session)
    assert [(i.kind, i.verdict.value) for i in checked] == [
        ("session", "ok"), ("file", "ok"), ("file-size", "ok"), ("file-digest", "ok"),
        ("file-seals", "ok")], [(i.kind, i.name, i.verdict, i.detail) for i in checked]
    os.pwrite(fd, b"K", 0)   # one byte of the owner's memory changes
    checked = after.check_kept_session("keeper-1", session)
    changed = {i.kind: i for i in checked}["file-digest"]
    assert changed.verdict.value == "mismatch", [(i.kind, i.verdict, i.detail) for i in checked]
    os.close(fd)
    with pytest.raises(AgentError, match="not one its owner kept"):
        after.check_kept_session("vm-1", session)
    session.finish()
    session.close()
    after.close()


def test_without_a_store_a_session_its_owner_keeps_is_carried_by_the_agent(
        tmp_path: Path) -> None:
    """In mode direct the agent holds /dev/liveupdate through the shutdown: systemd carries
    no fd store at all (measured on 262), so the agent holds and retrieves every session."""
    rig = Rig(tmp_path)
    agent = rig.agent(None)
    assert agent.handoff_mode() == "direct"
    own_store = owner_keeps(rig, agent, "keeper-1", b"kept by its owner")
    os.close(own_store)   # lost with the owner's fd store
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.commit(CommitOptions())
    written = json.loads(agent.manifest_path.read_text())
    assert "owner_fd_store" not in written["sessions"][0]
    after = rig.agent(None)
    report = after.verify()
    assert report.ok, [(i.name, i.detail) for i in report.failures()]
    session = after.claim_session("keeper-1")
    fd = session.retrieve_fd(1)
    assert os.pread(fd, 100, 0) == b"kept by its owner"
    os.close(fd)
    session.finish()
    session.close()
    after.close()
