"""Job progress that says what a job does (issue 15, "a CLI that tells the truth": a 1 GiB
prepare sat at 0% and jumped to 100%): phase names, and bytes where bytes take the time (the
digests), from the engine through the Job's Phase and Bytes properties to kho-agentctl's line."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from agenthost import JOB_IFACE, Host, create_session, host, invoke, kernel_option
from enginerig import Rig

from kho_agent.cli.bus import JobInfo
from kho_agent.cli.jobs import ProgressView, size_text
from kho_agent.digest import PREAD_CHUNK
from kho_agent.engine import CommitOptions, PrepareOptions

__all__ = ["host"]  # the fixture, imported for pytest

MIB = 1 << 20
PREPARE_PHASES = ["planning: reading the outgoing KHO state", "loading the kernel",
                  "writing the manifest", "preserving the agent's session"]


def _listen(rig: Rig, agent: Any) -> tuple[list[int], list[tuple[str, int, int]]]:
    percents: list[int] = []
    phases: list[tuple[str, int, int]] = []
    agent.set_progress_listener(percents.append,
                                lambda name, done, total: phases.append((name, done, total)))
    return percents, phases


def test_prepare_names_its_phases_and_verify_counts_the_bytes_it_digests(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    sizes = {1: 6 * MIB + 123, 2: 3 * MIB, 3: 4096}
    rig.client("vm-1", {token: os.urandom(size) for token, size in sizes.items()})
    percents, phases = _listen(rig, rig.agent)
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert [name for name, _, _ in phases] == PREPARE_PHASES
    assert percents == sorted(percents) and percents[-1] < 100
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    percents, phases = _listen(rig, agent)
    assert agent.verify().ok
    names = [name for name, _, _ in phases]
    assert names[0] == "retrieving the sessions"
    digesting = [(done, total) for name, done, total in phases if name == "digesting"]
    total = sum(sizes.values())
    # one report per chunk read, monotone, adding up to every byte digested
    assert {t for _, t in digesting} == {total}
    done = [d for d, _ in digesting]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total
    assert len(done) >= total // PREAD_CHUNK
    assert names.index("decoding the incoming and outgoing KHO state") > \
        names.index("digesting")
    assert percents == sorted(percents)


def test_the_job_publishes_its_phases_over_dbus(host: Host) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: os.urandom(2 * MIB)})
    seen: list[str] = []

    def phase_of(args: tuple[Any, ...]) -> bool:
        _iface, changed, _invalidated = args
        if "Phase" in changed:
            seen.append(changed["Phase"])
        return bool(seen) and seen[-1] == PREPARE_PHASES[-1]

    with client.catch_signal("PropertiesChanged", path=None,
                             iface="org.freedesktop.DBus.Properties") as changes, \
            client.catch_signal("JobRemoved") as removed:
        (path,) = invoke(client, "Prepare", "a{sv}", (kernel_option(host),))
        assert removed.wait(30, lambda args: args[1] == path)[2] == "done"
        changes.wait(10, phase_of)
    assert seen == PREPARE_PHASES
    # the properties as the contract declares them (Bytes: (done, total), none counted here)
    assert client.get_property(path, JOB_IFACE, "Phase") == PREPARE_PHASES[-1]
    assert tuple(client.get_property(path, JOB_IFACE, "Bytes")) == (0, 0)


def test_the_progress_line_shows_the_phase_and_its_bytes() -> None:
    stream = io.StringIO()
    view = ProgressView("verify", stream)
    job = JobInfo("/job/1", progress=10, phase="retrieving the sessions")
    view.update(job)
    gib = 1 << 30
    for done in range(0, gib + 1, 16 * MIB):   # the daemon's Bytes, every 1% and more
        job.update({"Progress": 50 + 40 * done // gib, "Phase": "digesting",
                    "Bytes": (done, gib)})
        view.update(job)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "verify: 10% retrieving the sessions"
    assert "verify: 66% digesting 416 MiB / 1.0 GiB" in lines
    assert lines[-1] == "verify: 90% digesting 1.0 GiB / 1.0 GiB"
    assert len(lines) <= 1 + 41 + 11   # a line per percent or tenth of the bytes, no more
    assert size_text(512) == "512 B" and size_text(3 * MIB // 2) == "1.5 MiB"
