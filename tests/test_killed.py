"""The agent killed with SIGKILL in every phase, in a real child process, then restarted: the
restarted agent reports what is true (nothing of a killed process's preservation survives), the
kernel is left clean, and a new cycle works.

The child runs the engine on the simulated kernel and stops inside the operation by blocking in
a seam (it prints where it is, then waits), so the kill lands in that phase, not near it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kho_agent.engine import CommitOptions, Engine, EngineConfig, PrepareOptions
from kho_agent.engine.phase import Phase
from kho_agent.errors import KernelRefused
from kho_agent.sim import SimAbi, SimKernel

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from kho_agent.engine import CommitOptions, Engine, EngineConfig, PrepareOptions, verify
    from kho_agent.sim import SimKernel

    sim_dir, state_dir = Path(sys.argv[1]), Path(sys.argv[2])
    target, stop = sys.argv[3], sys.argv[4]

    def halt(where):
        print(where, flush=True)
        sys.stdin.read()           # until killed
        raise SystemExit("not killed")

    def stop_in(obj, name):
        def blocked(*args, **kwargs):
            halt(stop)
        setattr(obj, name, blocked)

    host = SimKernel(sim_dir).host()
    agent = Engine(host, EngineConfig(state_dir=state_dir))
    agent.start()
    if stop == "verifying":
        real = verify.retrieve_session
        def retrieve_one_then_halt(ctx, device, entry, problem, run):
            result = real(ctx, device, entry, problem, run)
            halt(stop)             # one session retrieved and held, the others not yet
        verify.retrieve_session = retrieve_one_then_halt
        agent.verify()
        raise SystemExit("verify returned")
    for name in ("vm-a", "vm-b"):
        agent.create_session(name, "child")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, name.encode() * 100)
        agent.preserve(name, fd, 1)
        os.close(fd)
        agent.set_ready(name, True)
    if stop == "preparing":
        stop_in(host.kexec, "load")
    agent.prepare(PrepareOptions(kernel=Path(target)))
    if stop == "prepared":
        halt(stop)
    if stop == "cancelling":
        stop_in(host.kexec, "unload")
        agent.cancel()
    if stop == "committing":
        stop_in(host.kexec, "reboot")
    agent.commit(CommitOptions())
    print("committed", flush=True)
""")


class Host:
    """The simulated machine and the agent's state directory the processes share."""

    def __init__(self, tmp: Path) -> None:
        self.sim_dir = tmp / "sim"
        self.state_dir = tmp / "state"
        sim = SimKernel.create(self.sim_dir)
        self.target = sim.write_kernel_image(tmp / "vmlinuz-next", release="7.3.1-sim",
                                             abi=SimAbi())

    def run_child(self, stop: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.sim_dir), str(self.state_dir),
             str(self.target), stop], cwd=REPO, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def kill_at(self, stop: str) -> None:
        child = self.run_child(stop)
        try:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            if line != stop:
                _, err = child.communicate(timeout=30)
                pytest.fail(f"the child did not reach {stop!r}: {line!r}\n{err}")
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            assert child.returncode == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdin, child.stdout, child.stderr):
                if stream is not None:
                    stream.close()

    def agent(self) -> Engine:
        agent = Engine(SimKernel(self.sim_dir).host(), EngineConfig(self.state_dir))
        agent.start()
        return agent

    def state(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.state_dir / "state.json").read_text())
        return data


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def _new_cycle_works(host: Host, agent: Engine) -> None:
    """The same session names and a new prepare/commit/verify: nothing was left behind."""
    for name in ("vm-a", "vm-b"):
        agent.create_session(name, "again")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, b"second life")
        agent.preserve(name, fd, 1)
        os.close(fd)
        agent.set_ready(name, True)
    agent.prepare(PrepareOptions(kernel=host.target))
    agent.commit(CommitOptions())
    report = host.agent().verify()
    assert report.ok, [(i.kind, i.name, i.detail) for i in report.failures()]


@pytest.mark.parametrize("stop", ["preparing", "prepared", "cancelling", "committing"])
def test_killed_before_the_kexec(host: Host, stop: str) -> None:
    boot_before = SimKernel(host.sim_dir).boot_id
    host.kill_at(stop)
    assert host.state()["phase"] == stop                      # what the file said at the kill
    agent = host.agent()
    sim = SimKernel(host.sim_dir)
    assert sim.boot_id == boot_before                         # no kexec happened
    assert agent.state.phase is Phase.IDLE
    assert "nothing is preserved" in agent.state.message and stop in agent.state.message
    assert host.state()["last_result"] == {"result": "cancelled",
                                           "reason": agent.state.message}
    assert not sim.host().kexec.loaded()                      # unloaded, not left armed
    assert not (host.state_dir / "manifest.json").exists()    # no claim of a preservation
    _new_cycle_works(host, agent)


def test_killed_while_verifying(host: Host) -> None:
    child = host.run_child("none")  # no stop: the child prepares and commits, its sessions live
    out, err = child.communicate(timeout=60)
    assert out.strip() == "committed", err
    host.kill_at("verifying")       # in the new boot: one session retrieved, then killed
    assert host.state()["phase"] == "verifying"
    again = host.agent()
    assert again.state.phase is Phase.FAILED and "interrupted" in again.state.message
    dev = SimKernel(host.sim_dir).host().liveupdate.open()
    with pytest.raises(KernelRefused) as exc:   # the killed process held it: finished on exit
        dev.retrieve_session("vm-a")
    assert exc.value.errno == errno.ENOENT
    vm_b = dev.retrieve_session("vm-b")         # never retrieved: still there for its owner
    fd = vm_b.retrieve_fd(1)
    assert os.pread(fd, 400, 0) == b"vm-b" * 100
    os.close(fd)
    vm_b.finish()
    vm_b.close()
    dev.close()
