"""Boot transitions of the simulated kernel are atomic: a process killed with SIGKILL at any step
of one (the kexec of a commit, the cold boot after a panic, create()) leaves the old boot or the
new one, whole, and the next process (an agent, kho-agentd --simulate) runs a whole live update
on it.

The child processes are killed by the simulator's own crash points (kho_agent/sim/store.py):
with KHO_SIM_CRASH_AT=N a process sends itself SIGKILL at the N-th step of its transitions, so
the kill lands exactly between two steps, at each step in turn. A first run with a large N
counts the steps. The exhaustive runs (every N) are marked slow; the default run kills at the
first step, just before and just after the switch to the new boot, and at the last step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from agenthost import PAGE, POLKIT_POLICY, create_session, invoke, kernel_option
from agenthost import Host as AgentHost
from dbusrig import MANAGER_IFACE, MANAGER_PATH, Daemon, GioClient, PrivateBus
from gi.repository import GLib
from test_sim import decode

from kho_agent.abi import Severity
from kho_agent.abi.kho_state import KhoState
from kho_agent.engine import CommitOptions, Engine, EngineConfig, PrepareOptions
from kho_agent.engine.phase import Phase
from kho_agent.errors import NotFound
from kho_agent.kernel.host import Host
from kho_agent.kernel.kexec import load_named
from kho_agent.sim import SimAbi, SimKernel
from kho_agent.sim.boots import BOOTS, CURRENT, LINKS
from kho_agent.sim.images import build_bzimage
from kho_agent.sim.store import CRASH_ENV, TMP_NAME

REPO = Path(__file__).resolve().parent.parent
NEVER = 1_000_000          # a crash point no transition reaches: the run counts the steps
FAST_POINTS = ("1", "switch", "switched", "last")


def content(name: str) -> bytes:
    return (name * 3000).encode()


# The daemon's engine committing a live update: two clients, one memfd made with
# MFD_ALLOW_SEALING (the simulator freezes its size with seals) and one without.
COMMIT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from kho_agent.engine import CommitOptions, Engine, EngineConfig, PrepareOptions
    from kho_agent.sim import SimKernel
    from kho_agent.sim.store import crash_steps

    sim_dir, state_dir, target = (Path(arg) for arg in sys.argv[1:4])
    agent = Engine(SimKernel(sim_dir).host(), EngineConfig(state_dir=state_dir))
    agent.start()
    for name, sealing in (("vm-a", True), ("vm-b", False)):
        agent.create_session(name, "child")
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
        fd = os.memfd_create(name, flags)
        os.write(fd, (name * 3000).encode())
        agent.preserve(name, fd, 1)
        os.close(fd)
        agent.set_ready(name, True)
    agent.prepare(PrepareOptions(kernel=target))
    agent.commit(CommitOptions())
    print("done", crash_steps(), flush=True)
""")

# The next kernel panics at boot (an injected LUO mismatch): the transition ends in a cold boot
# of the kernel that did the kexec, with the panic recorded.
PANIC = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from kho_agent.kernel.kexec import load_named
    from kho_agent.sim import SimKernel
    from kho_agent.sim.store import crash_steps

    sim_dir, target = Path(sys.argv[1]), Path(sys.argv[2])
    sim = SimKernel(sim_dir)
    host = sim.host()
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    os.write(fd, b"lost in the panic")
    host.liveupdate.open().create_session("vm-p").preserve_fd(fd, 1)
    sim.inject("luo-mismatch")
    load_named(host.kexec, target, None, "console=ttyS0 kho=on liveupdate=on")
    host.kexec.reboot(via_systemd=False)
    print("done", crash_steps(), flush=True)
""")

# A new machine over an existing one (or in an empty directory).
CREATE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from kho_agent.sim import SimKernel
    from kho_agent.sim.store import crash_steps

    SimKernel.create(Path(sys.argv[1]), release="7.3.9-new", systemd_version=262)
    print("done", crash_steps(), flush=True)
""")


@dataclass
class Rig:
    tmp: Path
    sim_dir: Path
    state_dir: Path
    target: Path

    @property
    def config(self) -> EngineConfig:
        return EngineConfig(state_dir=self.state_dir)


def new_rig(tmp: Path, *, machine: bool = True) -> Rig:
    """A simulated machine (or only its directory's parent) and a target kernel image."""
    tmp.mkdir(parents=True, exist_ok=True)
    if machine:
        SimKernel.create(tmp / "sim")
    target = tmp / "vmlinuz-7.3.1-sim"
    target.write_bytes(build_bzimage("7.3.1-sim", SimAbi()))
    return Rig(tmp, tmp / "sim", tmp / "state", target)


def run_child(script: str, args: list[Path], crash_at: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), CRASH_ENV: crash_at}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def count_steps(script: str, args: list[Path]) -> int:
    """The steps of the child's transition: a run that is never killed counts them (on a rig
    of its own: the counted runs start from fresh ones)."""
    code, out, err = run_child(script, args, str(NEVER))
    assert code == 0 and out.startswith("done"), err
    steps = int(out.split()[1])
    assert steps > 10, out
    return steps


def kill_at(script: str, args: list[Path], crash_at: str) -> None:
    code, out, err = run_child(script, args, crash_at)
    assert code == -signal.SIGKILL, f"not killed at {crash_at}: exit {code}\n{out}\n{err}"


# --- what the next process must find -------------------------------------------------------------

def decode_disk(host: Host, side: str) -> KhoState:
    """debugfs kho/<side> and /proc/kcore exactly as the transition left them (no sync)."""
    return decode(host, side, sync=False)


def error_findings(state: KhoState) -> list[str]:
    return [f"{f.code} {f.path}: {f.message}" for f in state.findings
            if f.severity is Severity.ERROR]


def whole(sim_dir: Path) -> SimKernel:
    """Attach as the next process does, and check that one boot, whole, is there."""
    sim = SimKernel(sim_dir)
    boot = os.readlink(sim_dir / CURRENT)
    assert boot.startswith(f"{BOOTS}/")
    # recovery left exactly the current boot: nothing half built, nothing half removed
    assert [p.name for p in (sim_dir / BOOTS).iterdir()] == [boot.split("/")[1]]
    assert not (sim_dir / ".current.new").exists()
    for name in LINKS:
        assert os.readlink(sim_dir / name) == f"{CURRENT}/{name}"
    leftovers = [str(Path(top, f)) for top, _d, files in os.walk(sim_dir) for f in files
                 if TMP_NAME.match(f)]
    assert leftovers == []
    host = sim.host()
    state = json.loads((sim_dir / "boot.json").read_text())
    assert state["boot_id"] == sim.boot_id
    assert host.path("proc/sys/kernel/random/boot_id").read_text().strip() == sim.boot_id
    assert host.path("proc/sys/kernel/osrelease").read_text().strip() == sim.release
    loaded = host.path("sys/kernel/kexec_loaded").read_text().strip()
    assert loaded == ("1" if sim.state.loaded else "0")
    assert error_findings(decode_disk(host, "out")) == []
    if sim.state.kho_boot:
        assert error_findings(decode_disk(host, "in")) == []
        assert (sim_dir / "handover/fdt").read_bytes() == \
            host.path("sys/kernel/debug/kho/in/fdt").read_bytes()
    return sim


def claim_all(agent: Engine, expect: dict[str, bytes]) -> None:
    for name, data in expect.items():
        session = agent.claim_session(name)
        fd = session.retrieve_fd(1)
        try:
            assert os.pread(fd, len(data) + 1, 0) == data
        finally:
            os.close(fd)
        session.finish()
        session.close()


def live_update(rig: Rig, agent: Engine, names: tuple[str, ...]) -> None:
    """A whole prepare / commit / verify on the host the agent runs on."""
    for name in names:
        agent.create_session(name, "next")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, content(name + "-again"))
        agent.preserve(name, fd, 1)
        os.close(fd)
        agent.set_ready(name, True)
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.commit(CommitOptions())
    after = Engine(whole(rig.sim_dir).host(), rig.config)
    assert after.start().verify_pending
    report = after.verify()
    assert report.ok, [(i.kind, i.name, i.detail) for i in report.items
                       if i.verdict.value != "ok"]
    claim_all(after, {name: content(name + "-again") for name in names})
    after.close()


# --- the kexec of a commit -----------------------------------------------------------------------

def after_killed_commit(rig: Rig) -> str:
    """Check the host after the committing agent was killed; return which boot it found."""
    sim = whole(rig.sim_dir)
    agent = Engine(sim.host(), rig.config)
    recovery = agent.start()
    if sim.boot_count == 2:
        # killed after the switch: the live update happened; the next agent proves it
        assert sim.state.kho_boot and recovery.verify_pending
        report = agent.verify()
        assert report.ok, [(i.kind, i.name, i.detail) for i in report.items
                           if i.verdict.value != "ok"]
        claim_all(agent, {"vm-a": content("vm-a"), "vm-b": content("vm-b")})
        found = "new"
    else:
        # killed before the switch: the old boot, less what the dead agent held
        assert sim.boot_count == 1 and not sim.state.kho_boot
        assert recovery.phase is Phase.IDLE, recovery.message
        assert sim.host().liveupdate.holders() == []
        found = "old"
    live_update(rig, agent, ("vm-a", "vm-b"))
    agent.close()
    return found


def commit_points(rig: Rig) -> int:
    return count_steps(COMMIT, [rig.sim_dir, rig.state_dir, rig.target])


def kill_commit(tmp: Path, point: str) -> str:
    rig = new_rig(tmp)
    kill_at(COMMIT, [rig.sim_dir, rig.state_dir, rig.target], point)
    return after_killed_commit(rig)


def resolve(point: str, total: int) -> str:
    return str(total) if point == "last" else point


def test_commit_killed_at_named_steps(tmp_path: Path) -> None:
    total = commit_points(new_rig(tmp_path / "count"))
    found = {point: kill_commit(tmp_path / point, resolve(point, total))
             for point in FAST_POINTS}
    assert found == {"1": "old", "switch": "old", "switched": "new", "last": "new"}


@pytest.mark.slow
def test_commit_killed_at_every_step(tmp_path: Path) -> None:
    total = commit_points(new_rig(tmp_path / "count"))
    found = [kill_commit(tmp_path / str(n), str(n)) for n in range(1, total + 1)]
    # one switch: every kill before it finds the old boot, every kill after it the new one
    switch = found.index("new")
    assert found == ["old"] * switch + ["new"] * (total - switch), found
    print(f"commit transition: {total} crash points, switch after step {switch}")


# --- the cold boot after a panic -----------------------------------------------------------------

def after_killed_panic(rig: Rig) -> str:
    sim = whole(rig.sim_dir)
    if sim.boot_count == 1:
        assert sim.panics == [] and sim.faults() == {"luo-mismatch": {}}
        sim.clear_faults()
        found = "old"
    else:
        # the kexec'd kernel panicked; the machine came back with a cold boot of the old one
        assert sim.boot_count == 3 and len(sim.panics) == 1 and sim.faults() == {}
        assert sim.release == "7.3.0-sim" and not sim.state.kho_boot
        found = "new"
    agent = Engine(sim.host(), rig.config)
    agent.start()
    live_update(rig, agent, ("vm-p",))
    agent.close()
    return found


def kill_panic(tmp: Path, point: str) -> str:
    rig = new_rig(tmp)
    kill_at(PANIC, [rig.sim_dir, rig.target], point)
    return after_killed_panic(rig)


def test_panic_reboot_killed_at_named_steps(tmp_path: Path) -> None:
    rig = new_rig(tmp_path / "count")
    total = count_steps(PANIC, [rig.sim_dir, rig.target])
    found = {point: kill_panic(tmp_path / point, resolve(point, total))
             for point in FAST_POINTS}
    assert found == {"1": "old", "switch": "old", "switched": "new", "last": "new"}


@pytest.mark.slow
def test_panic_reboot_killed_at_every_step(tmp_path: Path) -> None:
    rig = new_rig(tmp_path / "count")
    total = count_steps(PANIC, [rig.sim_dir, rig.target])
    found = [kill_panic(tmp_path / str(n), str(n)) for n in range(1, total + 1)]
    switch = found.index("new")
    assert found == ["old"] * switch + ["new"] * (total - switch), found
    print(f"panic transition: {total} crash points, switch after step {switch}")


# --- create() ------------------------------------------------------------------------------------

def after_killed_create(rig: Rig, existed: bool) -> str:
    try:
        sim = whole(rig.sim_dir)
    except NotFound:
        # killed before the first boot of a new directory: no machine yet, and the daemon's
        # start (kho_agent.daemon.build_host) creates one
        assert not existed and not (rig.sim_dir / "boot.json").exists()
        SimKernel.create(rig.sim_dir)
        sim = whole(rig.sim_dir)
        found = "none"
    else:
        if sim.release == "7.3.9-new":
            assert sim.host().path("proc/1/comm").read_text() == "systemd\n"
            found = "new"
        else:
            assert existed and sim.release == "7.3.0-sim"
            assert sim.host().path("proc/1/comm").read_text() == "sim-init\n"
            found = "old"
        assert sim.boot_count == 1
    agent = Engine(sim.host(), rig.config)
    agent.start()
    live_update(rig, agent, ("vm-c",))
    agent.close()
    return found


def kill_create(tmp: Path, point: str, existed: bool) -> str:
    rig = new_rig(tmp, machine=existed)
    kill_at(CREATE, [rig.sim_dir], point)
    return after_killed_create(rig, existed)


@pytest.mark.parametrize("existed", [True, False])
def test_create_killed_at_named_steps(tmp_path: Path, existed: bool) -> None:
    rig = new_rig(tmp_path / "count", machine=existed)
    total = count_steps(CREATE, [rig.sim_dir])
    found = {point: kill_create(tmp_path / point, resolve(point, total), existed)
             for point in FAST_POINTS}
    before = "old" if existed else "none"
    assert found == {"1": before, "switch": before, "switched": "new", "last": "new"}


@pytest.mark.slow
@pytest.mark.parametrize("existed", [True, False])
def test_create_killed_at_every_step(tmp_path: Path, existed: bool) -> None:
    rig = new_rig(tmp_path / "count", machine=existed)
    total = count_steps(CREATE, [rig.sim_dir])
    found = [kill_create(tmp_path / str(n), str(n), existed) for n in range(1, total + 1)]
    switch = found.index("new")
    before = "old" if existed else "none"
    assert found == [before] * switch + ["new"] * (total - switch), found
    print(f"create transition ({'over a machine' if existed else 'new directory'}): "
          f"{total} crash points, switch after step {switch}")


# --- kho-agentd killed in its simulated commit, and started again on the host ------------------

def wait_exit(daemon: Daemon, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while daemon.returncode is None and time.monotonic() < deadline:
        time.sleep(0.02)
    code = daemon.returncode
    assert code is not None, "the daemon did not end in its commit"
    return code


def retrieve_bytes(host: AgentHost, client: GioClient, name: str, token: int) -> bytes:
    _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                              GLib.Variant("(s)", (name,)))
    os.close(fds[0])
    _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveFile",
                              GLib.Variant("(st)", (name, token)))
    try:
        return os.pread(fds[0], 1 << 20, 0)
    finally:
        os.close(fds[0])
        invoke(client, "FinishSession", "s", (name,))


@pytest.mark.parametrize(("point", "boot"), [("switch", "old"), ("switched", "new")])
def test_daemon_killed_in_its_commit_starts_again(tmp_path: Path, point: str,
                                                  boot: str) -> None:
    """The issue's case: kho-agentd --simulate SIGKILLed while its commit switches boots (just
    before the switch, just after it); started again, it finds a usable host and the state it
    left, and the next live update works."""
    rig = new_rig(tmp_path)
    ram = os.urandom(2 * PAGE) + b"tail"
    with PrivateBus(extra_policy=POLKIT_POLICY) as bus, \
            Daemon(bus.address, rig.sim_dir, rig.state_dir, ["--polkit-bus", "served"],
                   env={CRASH_ENV: point}) as daemon:
        host = AgentHost(bus, rig.sim_dir, rig.state_dir, rig.target, daemon)
        try:
            client = host.client()
            create_session(client, "vm-1", {1: ram})
            result, job = host.run_job(client, "Prepare", kernel_option(host))
            assert result == "done", job
            invoke(client, "Commit", "a{sv}", ({},))
            assert wait_exit(daemon) == -signal.SIGKILL, daemon.stderr_text()
            daemon.env_overrides.pop(CRASH_ENV)
            sim = whole(rig.sim_dir)
            assert sim.boot_count == (2 if boot == "new" else 1)
            daemon.start()
            if boot == "new":
                assert host.wait_state("verified", "failed") == "verified", \
                    host.prop("LastResult")
                assert retrieve_bytes(host, host.client(), "vm-1", 1) == ram
            else:
                # the commit never happened: the restarted daemon says so, and the kernel it
                # had loaded is unloaded
                assert host.wait_state("idle") == "idle"
                assert "restarted while committing" in host.prop("LastResult")
            client = host.client()
            create_session(client, "vm-2", {1: b"second life"})
            result, job = host.run_job(client, "Prepare", kernel_option(host))
            assert result == "done", job
            result, job = host.run_job(client, "Commit", {})
            assert result == "done", job
            host.restart()
            assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
            assert retrieve_bytes(host, host.client(), "vm-2", 1) == b"second life"
        finally:
            for each in host.clients:
                each.close()


# --- a directory of the single-boot layout of earlier versions ---------------------------------

ATTACH = textwrap.dedent("""
    import sys
    from pathlib import Path
    from kho_agent.sim import SimKernel
    from kho_agent.sim.store import crash_steps

    SimKernel(Path(sys.argv[1]))
    print("done", crash_steps(), flush=True)
""")


def legacy_machine(tmp: Path) -> tuple[Rig, str]:
    """A machine after a live update that handed over session "old" (one file), rewritten in
    the layout of earlier versions: the boot's files at the top of the directory."""
    rig = new_rig(tmp)
    sim = SimKernel(rig.sim_dir)
    host = sim.host()
    fd = os.memfd_create("old", os.MFD_ALLOW_SEALING)
    os.write(fd, content("old"))
    host.liveupdate.open().create_session("old").preserve_fd(fd, 1)
    os.close(fd)
    load_named(host.kexec, rig.target, None, "console=ttyS0 kho=on liveupdate=on")
    host.kexec.reboot(via_systemd=False)
    boot = Path(os.path.realpath(rig.sim_dir / CURRENT))
    boot_id = SimKernel(rig.sim_dir).boot_id
    for name in (*LINKS, CURRENT):
        (rig.sim_dir / name).unlink()
    for entry in boot.iterdir():
        if entry.name not in ("state.lock", "outgoing.lock"):
            entry.rename(rig.sim_dir / entry.name)
    shutil.rmtree(rig.sim_dir / BOOTS)
    return rig, boot_id


def after_killed_migration(rig: Rig, boot_id: str) -> None:
    sim = whole(rig.sim_dir)
    assert sim.boot_id == boot_id and sim.boot_count == 2 and sim.state.kho_boot
    device = sim.host().liveupdate.open()
    session = device.retrieve_session("old")
    fd = session.retrieve_fd(1)
    try:
        assert os.pread(fd, 1 << 16, 0) == content("old")
    finally:
        os.close(fd)
    session.close()
    device.close()
    agent = Engine(sim.host(), rig.config)
    agent.start()
    live_update(rig, agent, ("vm-m",))
    agent.close()


def test_single_boot_layout_becomes_the_first_boot(tmp_path: Path) -> None:
    rig, boot_id = legacy_machine(tmp_path / "count")
    total = count_steps(ATTACH, [rig.sim_dir])
    after_killed_migration(rig, boot_id)
    for point in ("switch", "switched", str(total)):
        rig, boot_id = legacy_machine(tmp_path / point)
        kill_at(ATTACH, [rig.sim_dir], point)
        after_killed_migration(rig, boot_id)


@pytest.mark.slow
def test_single_boot_layout_migration_killed_at_every_step(tmp_path: Path) -> None:
    rig, _boot_id = legacy_machine(tmp_path / "count")
    total = count_steps(ATTACH, [rig.sim_dir])
    for n in range(1, total + 1):
        rig, boot_id = legacy_machine(tmp_path / str(n))
        kill_at(ATTACH, [rig.sim_dir], str(n))
        after_killed_migration(rig, boot_id)
    print(f"migration of the single-boot layout: {total} crash points")
