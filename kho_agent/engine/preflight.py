"""Can this host live-update now? A tiered verdict (ok / warning / not-run / blocker), like
`criu check`.

Pure: every fact comes in through `PreflightInputs` (gathered by `facts.py` and the kernel
readers); each check is a small function registered in CHECKS, returning one `Check`. A blocker
means prepare refuses; a warning is printed and recorded in the manifest. A check whose input
is missing (no /dev/liveupdate to look for holders of, no LUO version to take limits from, no
outgoing KHO state to decode) is `not-run`, with the reason: it found nothing wrong because it
looked at nothing, so it is never reported ok. The verdict is the worst tier: `not-run` ranks
above warning (the host may be fine, but this preflight cannot say so) and below blocker.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..abi import registry
from ..abi.compat import CompatReport, Verdict
from ..abi.findings import Finding
from ..abi.formats.records import LuoLimits
from ..facts import FileFacts
from ..kernel.sysinfo import SysInfo, kho_enabled, luo_enabled
from .scratch_plan import ScratchPlan, human

FDSTORE_SYSTEMD = 261  # first systemd that carries LUO session fds through its fd store


class Tier(enum.IntEnum):
    OK = 0
    WARNING = 1
    NOT_RUN = 2     # the check could not run: its message says why
    BLOCKER = 3

    @property
    def label(self) -> str:
        """The name in reports and JSON: ok, warning, not-run, blocker."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> Tier:
        return cls[label.upper().replace("-", "_")]


@dataclass
class Check:
    name: str
    tier: Tier
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "tier": self.tier.label, "message": self.message,
                "fix": self.fix}


# Per LUO ABI (docs/kernel-abi.md §3.2, §3.4), from each version's record: the FDT era had fixed
# caps, the block chains only a chain length (10000 blocks of 51 sessions / 63 files).
LUO_LIMITS: Mapping[str, LuoLimits] = {f.compatible: f.limits for f in registry.LUO_FORMATS}
# the version that holds the most, for the advice when a plan exceeds the running one's
ROOMIEST_LUO = max(reversed(registry.LUO_FORMATS), key=lambda f: f.limits.sessions).compatible


@dataclass
class PlannedSession:
    name: str
    files: list[FileFacts]
    owner_fd_store: bool = False   # kept in its owner's fd store: takes no slot in the agent's


@dataclass
class PreflightInputs:
    sysinfo: SysInfo
    simulated: bool
    device_present: bool
    device_holders: list[int]          # pids other than this process
    kexec_available: bool
    kho_debugfs: bool                  # kho/ exists in debugfs (KHO is active in this boot)
    debugfs_problem: str | None
    running_luo: str | None            # LUO compatible of the running kernel, when known
    compat: CompatReport | None        # None: no target image given
    scratch: ScratchPlan | None
    sessions: list[PlannedSession] = field(default_factory=list)
    outgoing_errors: list[Finding] = field(default_factory=list)
    outgoing_decoded: bool = True      # the outgoing KHO state was read and decoded
    # FileDescriptorStoreMax= of the agent's unit, as systemd passed it ($FDSTORE); 0: the unit
    # has no fd store (kho-agent-fdstore.conf is not installed) or the agent is not a service
    fd_store_slots: int = 0


@dataclass
class PreflightResult:
    checks: list[Check]
    handoff_mode: str

    @property
    def verdict(self) -> Tier:
        return max((c.tier for c in self.checks), default=Tier.OK)

    @property
    def blockers(self) -> list[Check]:
        return [c for c in self.checks if c.tier is Tier.BLOCKER]

    @property
    def not_run(self) -> list[Check]:
        return [c for c in self.checks if c.tier is Tier.NOT_RUN]

    def to_json(self) -> dict[str, object]:
        return {"verdict": self.verdict.label, "handoff_mode": self.handoff_mode,
                "checks": [c.to_json() for c in self.checks]}


def systemd_carries_fd_stores(info: SysInfo) -> bool:
    """PID 1 is a systemd that preserves fd stores through LUO at a kexec (>= 261)."""
    return (info.pid1 == "systemd" and info.systemd_version is not None
            and info.systemd_version >= FDSTORE_SYSTEMD)


def handoff_mode(info: SysInfo, simulated: bool, fd_store_slots: int = 0) -> str:
    """Who holds the session fds through shutdown (design.md decision 1): systemd's fd store
    where systemd carries it and the agent's unit has one (kho-agent-fdstore.conf), else the
    agent itself."""
    if simulated and info.pid1 != "systemd":
        # a simulated machine whose PID 1 is systemd rehearses that systemd's mode
        return "simulated"
    if info.pid1 != "systemd":
        return "reboot-syscall"
    if systemd_carries_fd_stores(info) and fd_store_slots > 0:
        return "fdstore"
    return "direct"


def _kho(i: PreflightInputs) -> Check:
    if kho_enabled(i.sysinfo) or i.kho_debugfs:
        return Check("kho", Tier.OK, "KHO is enabled in this boot")
    return Check("kho", Tier.BLOCKER, "KHO is not enabled in this boot (no kho=on on the "
                 "command line, no kho/ in debugfs)", "add kho=on liveupdate=on to the kernel "
                 "command line and boot cold")


def _luo(i: PreflightInputs) -> Check:
    if i.device_present:
        return Check("liveupdate", Tier.OK, "/dev/liveupdate is present")
    why = ("liveupdate=on is not on the command line" if not luo_enabled(i.sysinfo)
           else "the kernel lacks CONFIG_LIVEUPDATE or LUO disabled itself (see dmesg)")
    return Check("liveupdate", Tier.BLOCKER, f"/dev/liveupdate is missing: {why}",
                 "boot with kho=on liveupdate=on on a kernel built with CONFIG_LIVEUPDATE")


def _holders(i: PreflightInputs) -> Check:
    if not i.device_present:
        return Check("device-holder", Tier.NOT_RUN, "not run: /dev/liveupdate does not exist, "
                     "so no holder can be looked for", "see the liveupdate check")
    if not i.device_holders:
        return Check("device-holder", Tier.OK, "no other process holds /dev/liveupdate")
    pids = ", ".join(str(p) for p in i.device_holders)
    return Check("device-holder", Tier.BLOCKER, f"/dev/liveupdate is held by pid {pids}; it "
                 "opens only once", "stop the other live-update agent (or the test) first")


def _kexec(i: PreflightInputs) -> Check:
    if i.kexec_available:
        return Check("kexec-file-load", Tier.OK, "kexec_file_load is available")
    return Check("kexec-file-load", Tier.BLOCKER, "kexec_file_load is not available on this "
                 "kernel (ENOSYS); it is the only loader that carries KHO",
                 "use a kernel built with CONFIG_KEXEC_FILE")


def _target(i: PreflightInputs) -> Check:
    if i.compat is None:
        return Check("target-abi", Tier.WARNING, "no target kernel given: ABI compatibility "
                     "not checked", "pass --kernel IMAGE")
    report = i.compat
    if report.verdict is Verdict.COMPATIBLE:
        return Check("target-abi", Tier.OK, f"target {report.target.release or '?'} accepts "
                     "every contract the running kernel hands over")
    bad = [r for r in report.rows if r.reached and r.verdict is not Verdict.COMPATIBLE]
    text = "; ".join(f"{r.title}: running {', '.join(r.running or ()) or '?'}, target "
                     f"{', '.join(r.target or ()) or '?'}"
                     + (f" ({r.consequence})" if r.consequence else "") for r in bad)
    if report.verdict is Verdict.INCOMPATIBLE:
        return Check("target-abi", Tier.BLOCKER, f"target kernel is incompatible: {text}",
                     "pick a target kernel that speaks the same KHO, LUO and file-handler "
                     "versions (kho-agentctl compat --kernel IMAGE shows them)")
    return Check("target-abi", Tier.BLOCKER, f"compatibility is not proven: {text}",
                 "run kho-agentctl compat --kernel IMAGE; provide the running kernel's image "
                 "in /boot")


def _scratch(i: PreflightInputs) -> Check:
    plan = i.scratch
    if plan is None:
        return Check("scratch", Tier.WARNING, "scratch areas were not sized (no target image)")
    if not plan.sufficient:
        return Check("scratch", Tier.BLOCKER, "; ".join(plan.warnings) or "scratch too small",
                     f"boot cold with {plan.absolute_form()} (see kho-agentctl scratch)")
    if plan.warnings:
        return Check("scratch", Tier.WARNING, "; ".join(plan.warnings),
                     f"consider {plan.absolute_form()} at the next cold boot")
    # Said on every boot, the cold one first: the areas never change until the next cold boot,
    # so how far they go is what decides whether a later update in the chain needs one.
    until = ("" if plan.initrd_limit is None else
             f"; until the next cold boot they take an initrd of up to "
             f"{human(plan.initrd_limit)} with this kernel")
    return Check("scratch", Tier.OK, f"scratch areas hold the next kernel "
                 f"({plan.reserved_total >> 20} MiB reserved{until})")


def _memory(i: PreflightInputs) -> Check:
    holes = sum(max(f.size - f.allocated, 0) for s in i.sessions for f in s.files)
    avail = i.sysinfo.mem_available
    if holes == 0:
        return Check("free-memory", Tier.OK, "preserved files have no holes to fill")
    if holes > avail:
        return Check("free-memory", Tier.BLOCKER, f"preservation allocates every hole: "
                     f"{holes >> 20} MiB needed, {avail >> 20} MiB available",
                     "fill or shrink the sparse memfds, or free memory")
    tier = Tier.WARNING if holes > avail // 2 else Tier.OK
    return Check("free-memory", tier, f"preservation allocates {holes >> 20} MiB for holes; "
                 f"{avail >> 20} MiB available")


def _files(i: PreflightInputs) -> Check:
    bad: list[str] = []
    for s in i.sessions:
        for f in s.files:
            if f.hugetlb:
                bad.append(f"{s.name}: fd {f.fd} is a hugetlb memfd (LUO refuses it: ENOENT)")
            elif not f.shmem:
                bad.append(f"{s.name}: fd {f.fd} is not a memfd or shmem file (ENOENT)")
            elif f.linked:
                bad.append(f"{s.name}: fd {f.fd} is a tmpfs file that still has a name "
                           "(LUO takes only unlinked ones: ENOENT)")
    if bad:
        return Check("preservable-files", Tier.BLOCKER, "; ".join(bad),
                     "preserve memfds created without MFD_HUGETLB, or unlinked tmpfs files")
    return Check("preservable-files", Tier.OK, "every planned file is a preservable memfd")


def _limits(i: PreflightInputs) -> Check:
    limits = LUO_LIMITS.get(i.running_luo or "")
    if limits is None:
        source = ("no LUO subtree in the outgoing KHO state" if i.outgoing_decoded
                  else "the outgoing KHO state could not be read")
        why = (f"LUO version {i.running_luo} is not one this agent knows the limits of"
               if i.running_luo else f"the running kernel's LUO version is unknown ({source})")
        return Check("luo-limits", Tier.NOT_RUN, f"not run: {why}, so the "
                     f"{len(i.sessions) + 1} planned session(s) cannot be held to its limits",
                     "make KHO debugfs readable (see the debugfs check) on a kernel with LUO"
                     if not i.running_luo else "use a kho-agent that knows this LUO version")
    count = len(i.sessions) + 1  # the agent's own session
    widest = max((len(s.files) for s in i.sessions), default=0)
    if count > limits.sessions or widest > limits.files_per_session:
        return Check("luo-limits", Tier.BLOCKER, f"{count} sessions / {widest} files in one "
                     f"session exceed {i.running_luo}'s limits ({limits.sessions} sessions, "
                     f"{limits.files_per_session} files per session: {limits.errno_name})",
                     f"spread files over fewer sessions or use a kernel with {ROOMIEST_LUO}")
    return Check("luo-limits", Tier.OK, f"{count} session(s) within {i.running_luo}'s limits")


def _handoff(i: PreflightInputs) -> Check:
    mode = handoff_mode(i.sysinfo, i.simulated, i.fd_store_slots)
    version = i.sysinfo.systemd_version
    if mode == "direct" and systemd_carries_fd_stores(i.sysinfo):
        return Check("handoff", Tier.WARNING, f"systemd {version} carries fd stores through "
                     "the kexec, but kho-agent.service has no fd store: the agent holds "
                     "/dev/liveupdate through the shutdown, so systemd-shutdown cannot open it "
                     "and the fd stores of other services (FileDescriptorStorePreserve=) and "
                     "systemd's own state (its kexec count) are lost at this kexec",
                     "install systemd/kho-agent-fdstore.conf as /etc/systemd/system/"
                     "kho-agent.service.d/fdstore.conf, then systemctl daemon-reload and "
                     "restart kho-agent while it is idle")
    parked = sum(1 for s in i.sessions if not s.owner_fd_store)
    if mode == "fdstore" and parked + 1 > i.fd_store_slots:
        return Check("handoff", Tier.BLOCKER, f"{parked} session(s) and the agent's own need "
                     f"{parked + 1} fd store slots, the unit has {i.fd_store_slots}",
                     "raise FileDescriptorStoreMax= in kho-agent.service.d/fdstore.conf")
    if mode == "reboot-syscall":
        return Check("handoff", Tier.WARNING, f"PID 1 is {i.sysinfo.pid1 or 'unknown'}, not "
                     "systemd: the agent reboots with reboot(LINUX_REBOOT_CMD_KEXEC) itself, "
                     "without an orderly shutdown", "run under systemd for an orderly shutdown")
    text = {"fdstore": f"systemd {version} carries the session fds in the agent's fd store "
                       f"({i.fd_store_slots} slots)",
            "direct": f"systemd {version or '?'}: the agent survives the "
                      "final kill (argv[0] starting with @) and holds the sessions",
            "simulated": "simulated kernel: the rehearsal holds the sessions in process"}[mode]
    return Check("handoff", Tier.OK, text)


def _kexec_load_service(i: PreflightInputs) -> Check:
    if i.sysinfo.load_kexec_at_shutdown:
        return Check("kexec-load-service", Tier.BLOCKER, "Debian's kexec-load service is "
                     "enabled (LOAD_KEXEC=true in /etc/default/kexec): at shutdown it loads its "
                     "own kernel without KHO over the agent's", "set LOAD_KEXEC=false in "
                     "/etc/default/kexec")
    return Check("kexec-load-service", Tier.OK, "no service reloads kexec at shutdown")


def _debugfs(i: PreflightInputs) -> Check:
    if i.debugfs_problem is None:
        return Check("debugfs", Tier.OK, "KHO debugfs is readable: the outgoing state is checked")
    return Check("debugfs", Tier.WARNING, f"{i.debugfs_problem}; the outgoing KHO state "
                 "cannot be decoded and checked before the kexec",
                 "mount debugfs (mount -t debugfs none /sys/kernel/debug) on a kernel with "
                 "CONFIG_KEXEC_HANDOVER_DEBUGFS")


def _outgoing(i: PreflightInputs) -> Check:
    if not i.outgoing_decoded:
        return Check("outgoing-state", Tier.NOT_RUN, "not run: the outgoing KHO state could "
                     "not be read, so it was not checked for errors", "see the debugfs check")
    if not i.outgoing_errors:
        return Check("outgoing-state", Tier.OK, "the outgoing KHO state has no error findings")
    first = i.outgoing_errors[0]
    return Check("outgoing-state", Tier.BLOCKER, f"{len(i.outgoing_errors)} error finding(s) in "
                 f"the outgoing KHO state, first: {first.code} at {first.path}: {first.message}",
                 "run kho-agentctl check --live for the full list")


def _lockdown(i: PreflightInputs) -> Check:
    mode = i.sysinfo.lockdown
    if mode in (None, "none"):
        return Check("lockdown", Tier.OK, "kernel lockdown is off")
    return Check("lockdown", Tier.WARNING, f"kernel lockdown is '{mode}': kexec_file_load "
                 "accepts only signed images (EPERM/EKEYREJECTED otherwise)",
                 "use a signed target image")


CHECKS: dict[str, Callable[[PreflightInputs], Check]] = {
    "kho": _kho,
    "liveupdate": _luo,
    "device-holder": _holders,
    "kexec-file-load": _kexec,
    "target-abi": _target,
    "scratch": _scratch,
    "free-memory": _memory,
    "preservable-files": _files,
    "luo-limits": _limits,
    "handoff": _handoff,
    "kexec-load-service": _kexec_load_service,
    "debugfs": _debugfs,
    "outgoing-state": _outgoing,
    "lockdown": _lockdown,
}


def preflight(inputs: PreflightInputs) -> PreflightResult:
    return PreflightResult([check(inputs) for check in CHECKS.values()],
                           handoff_mode(inputs.sysinfo, inputs.simulated,
                                        inputs.fd_store_slots))


def render(result: PreflightResult) -> str:
    width = max(len(c.name) for c in result.checks)
    lines = []
    for c in result.checks:
        lines.append(f"{c.tier.label:8} {c.name.ljust(width)}  {c.message}")
        if c.fix and c.tier is not Tier.OK:
            lines.append(f"{'':8} {'':{width}}  fix: {c.fix}")
    lines.append(f"verdict: {result.verdict.label} (hand-off mode: {result.handoff_mode})")
    return "\n".join(lines)
