"""engine/preflight.py: the tiered verdict, one condition at a time, plus `kho-agentctl preflight`.

The inputs are built by hand around a healthy host read with `read_sysinfo` from a fake root;
each test changes one fact and checks that exactly the check it concerns moves. File facts come
from real file descriptors (memfds, a hugetlb memfd, a pipe, a named tmpfs file).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cliout import cli_json

from kho_agent.abi.compat import (
    KHO_ROOT_MISMATCH,
    CompatReport,
    KernelAbi,
    Verdict,
    abi_from_payload,
    compare,
)
from kho_agent.abi.findings import Severity, make
from kho_agent.abi.kho_state import ScratchArea
from kho_agent.cli import main
from kho_agent.engine.preflight import (
    Check,
    PlannedSession,
    PreflightInputs,
    PreflightResult,
    Tier,
    handoff_mode,
    preflight,
    render,
)
from kho_agent.engine.scratch_plan import plan_scratch
from kho_agent.errors import AgentError, InvalidArgument, NotFound
from kho_agent.facts import FileFacts, TargetFiles, file_facts, target_image
from kho_agent.kernel.sysinfo import SysInfo, read_sysinfo
from kho_agent.sim import SimAbi, SimKernel

MiB = 1 << 20
GiB = 1 << 30
MEM_AVAILABLE_KB = 1_950_000        # the fake root's MemAvailable
MEM_AVAILABLE = MEM_AVAILABLE_KB * 1024

# The checks `kho-agentctl preflight --json` reports (the names are its stable interface).
CHECK_NAMES = {"kho", "liveupdate", "device-holder", "kexec-file-load", "target-abi", "scratch",
               "free-memory", "preservable-files", "luo-limits", "handoff",
               "kexec-load-service", "debugfs", "outgoing-state", "lockdown"}

PAYLOAD_NEW = b"\0kho-v4\0luo-v5\0memfd-v2\0memblock-v1\0"
PAYLOAD_OLD = b"\0kho-v3\0luo-v1\0memfd-v1\0"

# memblock_debug_show() layout: one 40 MiB RSV_KERN region at 256 MiB on node 0, so this kernel's
# own reservations need 40 MiB in the lowmem and node 0 scratch areas.
MEMBLOCK_TEXT = "   0: 0x0000000010000000..0x00000000127fffff    0 RSV_KERN\n"


# --- a healthy host ------------------------------------------------------------------------------

def put(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_root(root: Path, *, cmdline: str = "console=ttyS0 kho=on liveupdate=on",
              pid1: str = "systemd", lockdown: str | None = None,
              load_kexec: str | None = None) -> Path:
    put(root, "proc/sys/kernel/osrelease", "7.3.0-kho\n")
    put(root, "proc/cmdline", cmdline + "\n")
    put(root, "proc/sys/kernel/random/boot_id", "6f8515e3-2fdc-4179-8329-a9789f3f2fe4\n")
    put(root, "proc/meminfo", f"MemTotal:        4080616 kB\nMemFree:         1900000 kB\n"
                              f"MemAvailable:    {MEM_AVAILABLE_KB} kB\n")
    put(root, "proc/1/comm", pid1 + "\n")
    put(root, "sys/kernel/debug/memblock/reserved", MEMBLOCK_TEXT)
    if lockdown is not None:
        put(root, "sys/kernel/security/lockdown", lockdown + "\n")
    if load_kexec is not None:
        put(root, "etc/default/kexec",
            f"# Defaults for kexec initscript\nLOAD_KEXEC={load_kexec}\n")
    return root


def sysinfo(tmp_path: Path, *, cmdline: str = "console=ttyS0 kho=on liveupdate=on",
            pid1: str = "systemd", lockdown: str | None = None,
            load_kexec: str | None = None) -> SysInfo:
    root = fake_root(tmp_path / "root", cmdline=cmdline, pid1=pid1, lockdown=lockdown,
                     load_kexec=load_kexec)
    return read_sysinfo(root)


def scratch_areas(lowmem: int, node0: int) -> list[ScratchArea]:
    return [ScratchArea(0x40000000, lowmem, "lowmem"), ScratchArea(0x100000000, 0, "global"),
            ScratchArea(0x80000000, node0, "node 0")]


def compat_report(running: bytes, target: bytes) -> CompatReport:
    return compare(abi_from_payload(running, "image running", "7.3.0-kho"),
                   abi_from_payload(target, "image target", "7.3.1-kho"))


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """File descriptors a test opens, closed afterwards."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def memfd(fds: list[int], *, data: int = 0, size: int | None = None, flags: int = 0) -> FileFacts:
    """Facts of a real memfd with `data` bytes written and then truncated to `size`."""
    fd = os.memfd_create("preflight-test", flags)
    fds.append(fd)
    if data:
        os.write(fd, b"\xa5" * data)
    if size is not None:
        os.ftruncate(fd, size)
    return file_facts(fd)


def healthy(tmp_path: Path, fds: list[int], info: SysInfo | None = None) -> PreflightInputs:
    info = info or sysinfo(tmp_path)
    return PreflightInputs(
        sysinfo=info, simulated=False, device_present=True, device_holders=[],
        kexec_available=True, kho_debugfs=True, debugfs_problem=None, running_luo="luo-v5",
        compat=compat_report(PAYLOAD_NEW, PAYLOAD_NEW),
        scratch=plan_scratch(info, scratch_areas(100 * MiB, 100 * MiB)),
        sessions=[PlannedSession("vm-1", [memfd(fds, data=64 * 1024)])])


def check(result: PreflightResult, name: str) -> Check:
    found = [c for c in result.checks if c.name == name]
    assert len(found) == 1, f"{name} reported {len(found)} times"
    return found[0]


def only_blocker(inputs: PreflightInputs, name: str) -> Check:
    result = preflight(inputs)
    assert [c.name for c in result.blockers] == [name]
    assert result.verdict is Tier.BLOCKER
    blocker = result.blockers[0]
    assert blocker.fix, f"blocker {name} gives no fix"
    return blocker


# --- the healthy baseline ------------------------------------------------------------------------

def test_healthy_host_is_ok(tmp_path: Path, fds: list[int]) -> None:
    inputs = healthy(tmp_path, fds)
    assert inputs.scratch is not None and inputs.scratch.sufficient
    assert inputs.compat is not None and inputs.compat.verdict is Verdict.COMPATIBLE
    result = preflight(inputs)
    assert result.verdict is Tier.OK
    assert result.blockers == []
    assert {c.name for c in result.checks} == CHECK_NAMES
    assert all(c.tier is Tier.OK for c in result.checks)
    # systemd as PID 1 on a fake root: its version is not asked, so the agent holds the fds
    assert result.handoff_mode == "direct"


# --- blockers, one at a time ---------------------------------------------------------------------

def test_kho_off(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path, cmdline="console=ttyS0 liveupdate=on")
    inputs = dataclasses.replace(healthy(tmp_path, fds, info), kho_debugfs=False)
    blocker = only_blocker(inputs, "kho")
    assert "KHO is not enabled" in blocker.message
    assert blocker.fix is not None and "kho=on" in blocker.fix


def test_kho_debugfs_alone_proves_kho_on(tmp_path: Path, fds: list[int]) -> None:
    # CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT kernels run KHO without kho=on on the command line
    info = sysinfo(tmp_path, cmdline="console=ttyS0 liveupdate=on")
    assert check(preflight(healthy(tmp_path, fds, info)), "kho").tier is Tier.OK


def test_liveupdate_missing_without_cmdline_switch(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path, cmdline="console=ttyS0 kho=on")
    inputs = dataclasses.replace(healthy(tmp_path, fds, info), device_present=False)
    blocker = only_blocker(inputs, "liveupdate")
    assert "/dev/liveupdate is missing" in blocker.message
    assert "liveupdate=on is not on the command line" in blocker.message
    assert blocker.fix is not None and "liveupdate=on" in blocker.fix


def test_liveupdate_missing_with_cmdline_switch(tmp_path: Path, fds: list[int]) -> None:
    inputs = dataclasses.replace(healthy(tmp_path, fds), device_present=False)
    blocker = only_blocker(inputs, "liveupdate")
    assert "/dev/liveupdate is missing" in blocker.message
    # liveupdate=on was given, so the cause is the kernel, not the command line
    assert "not on the command line" not in blocker.message
    assert "CONFIG_LIVEUPDATE" in blocker.message
    assert blocker.fix is not None and "CONFIG_LIVEUPDATE" in blocker.fix


def test_other_holder(tmp_path: Path, fds: list[int]) -> None:
    inputs = dataclasses.replace(healthy(tmp_path, fds), device_holders=[4242, 4343])
    blocker = only_blocker(inputs, "device-holder")
    assert "4242" in blocker.message and "4343" in blocker.message


def test_kexec_file_load_unavailable(tmp_path: Path, fds: list[int]) -> None:
    inputs = dataclasses.replace(healthy(tmp_path, fds), kexec_available=False)
    blocker = only_blocker(inputs, "kexec-file-load")
    assert "kexec_file_load is not available" in blocker.message
    assert blocker.fix is not None and "CONFIG_KEXEC_FILE" in blocker.fix


@pytest.mark.parametrize("content", [None, b"not a kernel image" * 64])
def test_unreadable_target(tmp_path: Path, fds: list[int], content: bytes | None) -> None:
    path = tmp_path / "vmlinuz-next"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AgentError) as exc, TargetFiles.open(path, None) as files:
        target_image(files.kernel)
    assert isinstance(exc.value, NotFound if content is None else InvalidArgument)
    assert str(path) in exc.value.message  # raised as is: test_ctl holds every command to it


def test_incompatible_target(tmp_path: Path, fds: list[int]) -> None:
    report = compat_report(PAYLOAD_NEW, PAYLOAD_OLD)
    assert report.verdict is Verdict.INCOMPATIBLE
    inputs = dataclasses.replace(healthy(tmp_path, fds), compat=report)
    blocker = only_blocker(inputs, "target-abi")
    assert blocker.message.startswith("target kernel is incompatible")
    assert "KHO root: running kho-v4, target kho-v3" in blocker.message
    assert KHO_ROOT_MISMATCH in blocker.message
    # the next kernel never reads LUO once it drops the KHO root: that row is not a cause
    assert "luo-v1" not in blocker.message
    assert blocker.fix is not None and "compat" in blocker.fix


def test_unproven_compatibility_blocks(tmp_path: Path, fds: list[int]) -> None:
    # nothing known about the running kernel: not incompatible, but not proven either
    report = compare(KernelAbi(source="none"), abi_from_payload(PAYLOAD_NEW, "image target"))
    assert report.verdict is Verdict.UNKNOWN
    inputs = dataclasses.replace(healthy(tmp_path, fds), compat=report)
    blocker = only_blocker(inputs, "target-abi")
    assert blocker.message.startswith("compatibility is not proven")
    assert "KHO root" in blocker.message


def test_scratch_not_sufficient(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path)
    plan = plan_scratch(info, scratch_areas(4 * MiB, 4 * MiB))
    assert not plan.sufficient
    inputs = dataclasses.replace(healthy(tmp_path, fds, info), scratch=plan)
    blocker = only_blocker(inputs, "scratch")
    # the kernel's own 40 MiB do not fit in 4 MiB areas
    assert "lowmem scratch area is 4.0 MiB" in blocker.message
    assert "node 0 scratch area is 4.0 MiB" in blocker.message
    assert blocker.fix is not None and plan.absolute_form() in blocker.fix
    assert plan.absolute_form().startswith("kho_scratch=")


def test_holes_larger_than_mem_available(tmp_path: Path, fds: list[int]) -> None:
    sparse = memfd(fds, size=4 * GiB)   # a real memfd: 4 GiB of holes, no pages yet
    assert sparse.allocated < sparse.size
    inputs = dataclasses.replace(healthy(tmp_path, fds),
                                 sessions=[PlannedSession("vm-1", [sparse])])
    blocker = only_blocker(inputs, "free-memory")
    holes = (sparse.size - sparse.allocated) >> 20
    assert f"{holes} MiB needed, {MEM_AVAILABLE >> 20} MiB available" in blocker.message


def test_holes_above_half_of_mem_available_warn(tmp_path: Path, fds: list[int]) -> None:
    sparse = memfd(fds, size=MEM_AVAILABLE * 3 // 4)
    inputs = dataclasses.replace(healthy(tmp_path, fds),
                                 sessions=[PlannedSession("vm-1", [sparse])])
    result = preflight(inputs)
    assert result.blockers == []
    assert check(result, "free-memory").tier is Tier.WARNING


def named_tmpfs_file(fds: list[int]) -> FileFacts:
    """A tmpfs file that still has its name in /dev/shm when its facts are taken."""
    try:
        fd, name = tempfile.mkstemp(prefix="kho-preflight-test-", dir="/dev/shm")
    except OSError as exc:
        pytest.skip(f"no /dev/shm here: {exc.strerror}")
    fds.append(fd)
    try:
        return file_facts(fd)
    finally:
        os.unlink(name)


def pipe_end(fds: list[int]) -> FileFacts:
    r, w = os.pipe()
    fds.extend([r, w])
    return file_facts(r)


@pytest.mark.parametrize("kind, cause", [
    ("hugetlb", "hugetlb memfd"),
    ("pipe", "not a memfd or shmem file"),
    ("linked", "still has a name"),
])
def test_unpreservable_file(tmp_path: Path, fds: list[int], kind: str, cause: str) -> None:
    if kind == "hugetlb":
        facts = memfd(fds, flags=os.MFD_HUGETLB)
    elif kind == "pipe":
        facts = pipe_end(fds)
    else:
        facts = named_tmpfs_file(fds)
        if not facts.shmem:
            pytest.skip("/dev/shm is not tmpfs here")
    good = memfd(fds, data=4096)
    inputs = dataclasses.replace(healthy(tmp_path, fds),
                                 sessions=[PlannedSession("vm-7", [good, facts])])
    blocker = only_blocker(inputs, "preservable-files")
    assert f"vm-7: fd {facts.fd}" in blocker.message
    assert cause in blocker.message
    # only the bad file is named, not the good memfd next to it
    assert f"fd {good.fd} " not in blocker.message


@pytest.mark.parametrize("luo, files, tier", [
    ("luo-v1", 128, Tier.OK),        # LUO_FILE_PGCNT = 2 pages of 64-byte entries: 128 files
    ("luo-v1", 129, Tier.BLOCKER),
    ("luo-v5", 129, Tier.OK),        # luo-v5 removed the per-session cap
])
def test_luo_files_per_session(tmp_path: Path, fds: list[int], luo: str, files: int,
                               tier: Tier) -> None:
    one = memfd(fds, data=4096)
    many = [dataclasses.replace(one, fd=1000 + n) for n in range(files)]
    inputs = dataclasses.replace(healthy(tmp_path, fds), running_luo=luo,
                                 sessions=[PlannedSession("vm-1", many)])
    if tier is Tier.BLOCKER:
        blocker = only_blocker(inputs, "luo-limits")
        assert f"{files} files in one session" in blocker.message
        assert luo in blocker.message
        assert blocker.fix is not None and "luo-v5" in blocker.fix
    else:
        assert preflight(inputs).verdict is Tier.OK


@pytest.mark.parametrize("planned, tier", [(818, Tier.OK), (819, Tier.BLOCKER)])
def test_luo_v1_session_cap_counts_the_agent_session(tmp_path: Path, fds: list[int],
                                                     planned: int, tier: Tier) -> None:
    # luo-v1 holds 819 sessions (16 pages of 80-byte entries); the agent's own manifest
    # session is one of them
    inputs = dataclasses.replace(healthy(tmp_path, fds), running_luo="luo-v1",
                                 sessions=[PlannedSession(f"vm-{n}", []) for n in range(planned)])
    assert check(preflight(inputs), "luo-limits").tier is tier


def test_unknown_luo_version_is_not_run_never_ok(tmp_path: Path, fds: list[int]) -> None:
    """Limits that are not known were not checked, with sessions or without: not-run, never ok."""
    inputs = dataclasses.replace(healthy(tmp_path, fds), running_luo=None)
    for planned in (inputs, dataclasses.replace(inputs, sessions=[])):
        result = preflight(planned)
        limits = check(result, "luo-limits")
        assert limits.tier is Tier.NOT_RUN and limits.message.startswith("not run: ")
        assert "LUO version is unknown" in limits.message and limits.fix
        assert result.verdict is Tier.NOT_RUN and result.not_run == [limits]
    unknown = check(preflight(dataclasses.replace(inputs, running_luo="luo-v99")), "luo-limits")
    assert unknown.tier is Tier.NOT_RUN and "luo-v99 is not one" in unknown.message


def test_a_host_without_kho_reports_what_it_could_not_check(tmp_path: Path,
                                                           fds: list[int]) -> None:
    """No /dev/liveupdate, no KHO debugfs: the holder, limits and outgoing-state checks looked
    at nothing, so none of them is ok (they said so before: issue 15)."""
    info = sysinfo(tmp_path, cmdline="console=ttyS0")
    inputs = dataclasses.replace(
        healthy(tmp_path, fds, info), device_present=False, kho_debugfs=False,
        debugfs_problem="/sys/kernel/debug/kho does not exist", running_luo=None,
        outgoing_decoded=False)
    result = preflight(inputs)
    tiers = {c.name: c.tier for c in result.checks}
    assert {name for name, tier in tiers.items() if tier is Tier.NOT_RUN} == \
        {"device-holder", "luo-limits", "outgoing-state"}
    assert tiers["kho"] is Tier.BLOCKER and tiers["liveupdate"] is Tier.BLOCKER
    assert result.verdict is Tier.BLOCKER
    text = render(result)
    for name in ("device-holder", "luo-limits", "outgoing-state"):
        line = next(line for line in text.splitlines() if f" {name} " in line)
        assert line.startswith("not-run ") and "not run: " in line, line
    assert "no other process holds" not in text and "has no error findings" not in text
    # with the blockers gone, what is left is a verdict of its own, not ok
    ran = dataclasses.replace(inputs, sysinfo=sysinfo(tmp_path), kho_debugfs=True,
                              device_present=True)
    assert preflight(ran).verdict is Tier.NOT_RUN
    assert preflight(ran).to_json()["verdict"] == "not-run"


def test_kexec_load_service_enabled(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path, load_kexec="true")
    assert info.load_kexec_at_shutdown is True
    blocker = only_blocker(healthy(tmp_path, fds, info), "kexec-load-service")
    assert "LOAD_KEXEC=true" in blocker.message
    assert blocker.fix is not None and "LOAD_KEXEC=false" in blocker.fix


def test_kexec_load_service_disabled(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path, load_kexec="false")
    assert preflight(healthy(tmp_path, fds, info)).verdict is Tier.OK


def test_outgoing_error_findings(tmp_path: Path, fds: list[int]) -> None:
    errors = [make("not-preserved", "/LUO/sessions[0]", "session block at 0x1000 is not "
                   "preserved", Severity.ERROR),
              make("chain-cycle", "/LUO/files", "file chain loops", Severity.ERROR)]
    inputs = dataclasses.replace(healthy(tmp_path, fds), outgoing_errors=errors)
    blocker = only_blocker(inputs, "outgoing-state")
    assert blocker.message.startswith("2 error finding(s)")
    assert "not-preserved at /LUO/sessions[0]" in blocker.message
    assert "check --live" in (blocker.fix or "")


# --- warnings ------------------------------------------------------------------------------------

def only_warnings(inputs: PreflightInputs) -> set[str]:
    result = preflight(inputs)
    assert result.blockers == []
    assert result.verdict is Tier.WARNING
    return {c.name for c in result.checks if c.tier is Tier.WARNING}


def test_no_target_warns(tmp_path: Path, fds: list[int]) -> None:
    inputs = dataclasses.replace(healthy(tmp_path, fds), compat=None, scratch=None)
    assert only_warnings(inputs) == {"target-abi", "scratch"}
    assert "--kernel" in (check(preflight(inputs), "target-abi").fix or "")


def test_debugfs_problem_warns(tmp_path: Path, fds: list[int]) -> None:
    problem = "/sys/kernel/debug/kho does not exist"
    inputs = dataclasses.replace(healthy(tmp_path, fds), debugfs_problem=problem)
    assert only_warnings(inputs) == {"debugfs"}
    # without the state itself, the check of its findings did not run
    unread = preflight(dataclasses.replace(inputs, outgoing_decoded=False))
    assert check(unread, "outgoing-state").tier is Tier.NOT_RUN
    assert check(unread, "debugfs").tier is Tier.WARNING
    warning = check(preflight(inputs), "debugfs")
    assert problem in warning.message
    assert warning.fix is not None and "mount -t debugfs" in warning.fix


def test_lockdown_warns(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path, lockdown="none [integrity] confidentiality")
    assert info.lockdown == "integrity"
    inputs = healthy(tmp_path, fds, info)
    assert only_warnings(inputs) == {"lockdown"}
    assert "'integrity'" in check(preflight(inputs), "lockdown").message


def test_lockdown_none_is_ok(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path, lockdown="[none] integrity confidentiality")
    assert preflight(healthy(tmp_path, fds, info)).verdict is Tier.OK


def test_pid1_not_systemd_warns(tmp_path: Path, fds: list[int]) -> None:
    info = sysinfo(tmp_path, pid1="init")
    inputs = healthy(tmp_path, fds, info)
    assert only_warnings(inputs) == {"handoff"}
    result = preflight(inputs)
    assert result.handoff_mode == "reboot-syscall"
    assert "PID 1 is init" in check(result, "handoff").message


# --- hand-off mode -------------------------------------------------------------------------------

@pytest.mark.parametrize("pid1, version, simulated, slots, mode", [
    ("systemd", 252, False, 0, "direct"),     # measured on 252: the agent survives the final kill
    ("systemd", 252, False, 1024, "direct"),  # a store on 252 is not carried through a kexec
    ("systemd", 260, False, 1024, "direct"),
    ("systemd", 261, False, 1024, "fdstore"),  # 261 is the first LUO-aware fd store
    ("systemd", 262, False, 1024, "fdstore"),
    # 262 without kho-agent-fdstore.conf: the unit has no store, the agent holds the sessions
    ("systemd", 262, False, 0, "direct"),
    ("systemd", None, False, 1024, "direct"),  # version unknown: no fd store assumed
    ("init", None, False, 0, "reboot-syscall"),
    (None, None, False, 0, "reboot-syscall"),
    # a simulated machine rehearses the mode of the systemd it pretends to run
    ("systemd", 261, True, 1024, "fdstore"),
    ("systemd", 261, True, 0, "direct"),
    ("systemd", 252, True, 0, "direct"),
    ("sim-init", None, True, 0, "simulated"),
    ("init", None, True, 0, "simulated"),
])
def test_handoff_mode(tmp_path: Path, pid1: str | None, version: int | None, simulated: bool,
                      slots: int, mode: str) -> None:
    info = dataclasses.replace(sysinfo(tmp_path), pid1=pid1, systemd_version=version)
    assert handoff_mode(info, simulated, slots) == mode


def test_handoff_check_names_the_systemd_version(tmp_path: Path, fds: list[int]) -> None:
    info = dataclasses.replace(sysinfo(tmp_path), systemd_version=261)
    inputs = dataclasses.replace(healthy(tmp_path, fds, info), fd_store_slots=16)
    result = preflight(inputs)
    assert result.handoff_mode == "fdstore"
    assert check(result, "handoff").tier is Tier.OK
    assert "systemd 261" in check(result, "handoff").message
    assert "16 slots" in check(result, "handoff").message


def test_a_carrying_systemd_without_the_drop_in_warns_and_names_the_fix(
        tmp_path: Path, fds: list[int]) -> None:
    """The mode is direct (the agent holds /dev/liveupdate), and systemd-shutdown then cannot
    carry anything of its own: not silent."""
    info = dataclasses.replace(sysinfo(tmp_path), systemd_version=262)
    result = preflight(healthy(tmp_path, fds, info))
    assert result.handoff_mode == "direct"
    found = check(result, "handoff")
    assert found.tier is Tier.WARNING
    assert "/dev/liveupdate" in found.message and "fd stores of other services" in found.message
    assert found.fix is not None and "kho-agent-fdstore.conf" in found.fix


def test_more_sessions_than_fd_store_slots_is_a_blocker(tmp_path: Path, fds: list[int]) -> None:
    info = dataclasses.replace(sysinfo(tmp_path), systemd_version=262)
    # one client session and the agent's own: two slots needed
    inputs = dataclasses.replace(healthy(tmp_path, fds, info), fd_store_slots=1)
    blocker = only_blocker(inputs, "handoff")
    assert "need 2 fd store slots, the unit has 1" in blocker.message
    assert blocker.fix is not None and "FileDescriptorStoreMax=" in blocker.fix
    assert preflight(dataclasses.replace(inputs, fd_store_slots=2)).verdict is Tier.OK


# --- output --------------------------------------------------------------------------------------

def mixed_result(tmp_path: Path, fds: list[int]) -> PreflightResult:
    """One blocker (kexec), one warning (debugfs), the rest ok."""
    return preflight(dataclasses.replace(healthy(tmp_path, fds), kexec_available=False,
                                         debugfs_problem="no debugfs"))


def test_render(tmp_path: Path, fds: list[int]) -> None:
    result = mixed_result(tmp_path, fds)
    text = render(result)
    lines = text.splitlines()
    for c in result.checks:
        assert any(c.name in line and c.message in line for line in lines), c.name
    assert lines[-1] == "verdict: blocker (hand-off mode: direct)"
    # a fix line follows each non-ok check, and only those
    fixes = [line.strip() for line in lines if line.strip().startswith("fix: ")]
    assert fixes == [f"fix: {c.fix}" for c in result.checks if c.tier is not Tier.OK]
    assert lines[0].split()[0] in {"ok", "warning", "not-run", "blocker"}


def test_render_ok(tmp_path: Path, fds: list[int]) -> None:
    text = render(preflight(healthy(tmp_path, fds)))
    assert text.splitlines()[-1] == "verdict: ok (hand-off mode: direct)"
    assert "fix:" not in text


def test_to_json_round_trip(tmp_path: Path, fds: list[int]) -> None:
    result = mixed_result(tmp_path, fds)
    data = json.loads(json.dumps(result.to_json()))
    assert data["verdict"] == "blocker"
    assert data["handoff_mode"] == "direct"
    checks = data["checks"]
    assert [c["name"] for c in checks] == [c.name for c in result.checks]
    tiers = {c["name"]: c["tier"] for c in checks}
    assert tiers["kexec-file-load"] == "blocker"
    assert tiers["debugfs"] == "warning"
    assert tiers["kho"] == "ok"
    for raw, original in zip(checks, result.checks, strict=True):
        assert raw["tier"] == raw["tier"].lower()
        assert Tier.from_label(raw["tier"]) is original.tier
        assert raw["message"] == original.message
        assert raw["fix"] == original.fix


# --- kho-agentctl preflight on a simulated root ---------------------------------------------------

def kexec_file_load_errno() -> int | None:
    """The errno of kexec_file_load(-1, -1, 0, NULL, 0) on this machine: EBADF when the
    syscall exists (the bad fd fails before any image is built), ENOSYS when it does not."""
    numbers = {"x86_64": 320, "aarch64": 294}
    number = numbers.get(os.uname().machine)
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(number), ctypes.c_long(-1), ctypes.c_long(-1),
                          ctypes.c_ulong(0), None, ctypes.c_ulong(0))
    return 0 if result == 0 else ctypes.get_errno()


def test_cli_preflight_json_on_sim_root(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    probe = kexec_file_load_errno()
    if probe is None:
        pytest.skip(f"no kexec_file_load number known for {os.uname().machine}")
    sim = SimKernel.create(tmp_path / "sim")
    sim_root = sim.host().root
    # the same ABI as the running simulated kernel: nothing to be incompatible about
    image = sim.write_kernel_image(tmp_path / "vmlinuz-next", release="7.3.1-sim", abi=sim.abi)
    assert sim.abi == SimAbi()
    capsys.readouterr()
    code = main(["preflight", "--root", str(sim_root), "--kernel", str(image), "--json"])
    data = cli_json(capsys.readouterr().out)

    tiers = {c["name"]: c["tier"] for c in data["checks"]}
    assert set(tiers) == CHECK_NAMES
    assert set(tiers.values()) <= {"ok", "warning", "not-run", "blocker"}
    # real seams pointed at the sim root: the device node is a plain marker file there, and the
    # sim boots with kho=on liveupdate=on and writes KHO debugfs
    assert tiers["kho"] == "ok"
    assert tiers["liveupdate"] == "ok"
    assert tiers["device-holder"] == "ok"
    assert tiers["debugfs"] == "ok"
    assert tiers["target-abi"] == "ok"
    # kexec availability is probed on the real kernel, whatever the root
    assert tiers["kexec-file-load"] == ("blocker" if probe == errno.ENOSYS else "ok")
    pid1 = (sim_root / "proc/1/comm").read_text().strip()
    # real_host is not simulated, and systemd's version is asked only on the real root
    assert data["handoff_mode"] == ("direct" if pid1 == "systemd" else "reboot-syscall")
    blocked = "blocker" in tiers.values()
    assert data["verdict"] == ("blocker" if blocked else
                               "warning" if "warning" in tiers.values() else "ok")
    assert code == (1 if blocked else 0)
    if probe == errno.ENOSYS:  # this machine: no kexec_file_load
        assert code == 1 and data["verdict"] == "blocker"
