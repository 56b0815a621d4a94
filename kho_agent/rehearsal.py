"""A whole live-update cycle on the simulated kernel, in one process:

    preflight -> prepare (sessions with memfds of known content) -> commit -> simulated kexec
    -> a new agent instance (as after the reboot) -> verify -> the clients check their bytes

This is `kho-agentctl rehearse`: it exercises the same engine, manifest and decoder code as
a real host, on any machine, and shows what the agent would do and find.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import CommitOptions, Engine, EngineConfig, PrepareOptions
from .engine.manifest import VerifyReport
from .engine.preflight import PreflightResult
from .errors import AgentError
from .sim import SimAbi, SimKernel

PAGE = 4096
TARGET_RELEASE = "7.3.1-sim"

# What `--fault` injects into the simulated kernel, and what the rehearsal expects to see.
FAULTS: dict[str, tuple[str, dict[str, object]]] = {
    "freeze-fails": ("freeze-fails", {}),
    "torn-manifest": ("corrupt-file", {"session": "kho-agent", "token": 0, "offset": 10}),
    "drop-kho": ("drop-kho", {}),
    "corrupt-handover": ("corrupt-handover", {}),
    "luo-mismatch": ("luo-mismatch", {}),
}


@dataclass
class ClientFile:
    token: int
    content: bytes           # what the client expects back (holes read as zeros)
    size: int
    sealed: bool = False


@dataclass
class ClientPlan:
    name: str
    files: list[ClientFile]


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class RehearsalResult:
    directory: Path
    steps: list[Step] = field(default_factory=list)
    preflight: PreflightResult | None = None
    report: VerifyReport | None = None
    handoff_seconds: float | None = None
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "directory": str(self.directory),
            "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail,
                       "seconds": round(s.seconds, 4)} for s in self.steps],
            "preflight": self.preflight.to_json() if self.preflight else None,
            "verify": self.report.to_json() if self.report else None,
            "handoff_seconds": self.handoff_seconds, "bytes_checked": self.bytes_checked,
        }


def client_plans(sessions: int, seed: int = 7) -> list[ClientPlan]:
    """Sessions standing in for VMs: a one-page memfd, a sparse one with a hole, a sealed one."""
    rng = random.Random(seed)
    plans = []
    for i in range(sessions):
        one = rng.randbytes(PAGE)
        sparse = rng.randbytes(PAGE) + bytes(2 * PAGE) + rng.randbytes(PAGE // 2)
        sealed = f"vm-{i} config: memory=4G vcpus=2\n".encode() * 8
        plans.append(ClientPlan(f"vm-{i}", [
            ClientFile(0x10, one, len(one)),
            ClientFile(0x20, sparse, len(sparse)),
            ClientFile(0x30, sealed, len(sealed), sealed=True),
        ]))
    return plans


def _memfd(f: ClientFile) -> int:
    fd = os.memfd_create(f"rehearsal-{f.token:#x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, f.size)
    # write around the hole so the file really is sparse
    for start in range(0, f.size, PAGE):
        chunk = f.content[start:start + PAGE]
        if chunk.strip(b"\0"):
            os.pwrite(fd, chunk, start)
    if f.sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


class _Clock:
    def __init__(self, result: RehearsalResult) -> None:
        self.result = result

    def step(self, name: str, ok: bool, detail: str, started: float) -> Step:
        step = Step(name, ok, detail, time.perf_counter() - started)
        self.result.steps.append(step)
        return step


def rehearse(directory: Path, *, sessions: int = 3, fault: str | None = None,
             target_abi: SimAbi | None = None) -> RehearsalResult:
    result = RehearsalResult(directory)
    clock = _Clock(result)
    t = time.perf_counter()
    sim = SimKernel.create(directory / "sim")
    host = sim.host()
    target = sim.write_kernel_image(directory / "boot" / f"vmlinuz-{TARGET_RELEASE}",
                                    release=TARGET_RELEASE, abi=target_abi or SimAbi())
    config = EngineConfig(state_dir=directory / "state")
    engine = Engine(host, config)
    engine.start()
    clock.step("boot", True, f"simulated kernel {sim.release} booted cold in {directory / 'sim'}",
               t)

    plans = client_plans(sessions)
    t = time.perf_counter()
    try:
        for plan in plans:
            engine.create_session(plan.name, "rehearsal")
            for f in plan.files:
                fd = _memfd(f)
                try:
                    engine.preserve(plan.name, fd, f.token)
                finally:
                    os.close(fd)  # the kernel and the agent hold their own references
            engine.set_ready(plan.name, True)
    except AgentError as exc:
        clock.step("sessions", False, exc.message, t)
        engine.close()
        return result
    files = sum(len(p.files) for p in plans)
    clock.step("sessions", True, f"{len(plans)} session(s), {files} memfd(s) preserved and "
               "ready (digests taken)", t)

    t = time.perf_counter()
    try:
        result.preflight = engine.gather_preflight(target, None)
    except AgentError as exc:  # the target cannot be read
        clock.step("preflight", False, f"{exc.name}: {exc.message}", t)
        engine.close()
        return result
    blockers = result.preflight.blockers
    clock.step("preflight", not blockers, f"verdict {result.preflight.verdict.label}"
               + (": " + "; ".join(c.message for c in blockers) if blockers else ""), t)

    t = time.perf_counter()
    try:
        manifest = engine.prepare(PrepareOptions(kernel=target))
    except AgentError as exc:
        clock.step("prepare", False, f"{exc.name}: {exc.message}", t)
        engine.close()
        return result
    clock.step("prepare", True, f"{TARGET_RELEASE} loaded with kexec_file_load; manifest of "
               f"{len(manifest.sessions)} session(s) written to disk and session kho-agent", t)

    if fault is not None:
        name, params = FAULTS[fault]
        sim.inject(name, **params)
    t = time.perf_counter()
    try:
        commit = engine.commit(CommitOptions())
    except AgentError as exc:
        clock.step("commit", False, f"{exc.name}: {exc.message}", t)
        engine.close()
        return result
    result.handoff_seconds = commit.handoff_seconds
    clock.step("commit", True, f"handed off in {(commit.handoff_seconds or 0) * 1000:.1f} ms; "
               "simulated kexec done", t)

    # The old process is gone with the old kernel: a new one attaches to the new boot.
    t = time.perf_counter()
    sim = SimKernel(directory / "sim")
    engine = Engine(sim.host(), config)
    recovery = engine.start()
    clock.step("reboot", recovery.verify_pending, f"booted {sim.release} (boot "
               f"{sim.boot_count}); {recovery.message}", t)

    t = time.perf_counter()
    try:
        result.report = engine.verify()
    except AgentError as exc:
        clock.step("verify", False, f"{exc.name}: {exc.message}", t)
        engine.close()
        return result
    bad = [i for i in result.report.items if i.verdict.value in ("mismatch", "missing", "failed")]
    clock.step("verify", result.report.ok, f"{len(result.report.items)} item(s) checked"
               + (": " + "; ".join(i.detail for i in bad[:5]) if bad else ", all as recorded"),
               t)

    t = time.perf_counter()
    problems, checked = _clients_check(engine, plans)
    result.bytes_checked = checked
    clock.step("clients", not problems, "; ".join(problems[:5]) if problems else
               f"every client retrieved its session and found its {checked} bytes intact", t)
    engine.close()
    return result


def _clients_check(engine: Engine, plans: list[ClientPlan]) -> tuple[list[str], int]:
    """What a VMM does after the reboot: claim its session, read every file, finish."""
    problems: list[str] = []
    checked = 0
    for plan in plans:
        try:
            session = engine.claim_session(plan.name)
        except AgentError as exc:
            problems.append(f"{plan.name}: {exc.message}")
            continue
        for f in plan.files:
            try:
                fd = session.retrieve_fd(f.token)
            except AgentError as exc:
                problems.append(f"{plan.name} token {f.token:#x}: {exc.message}")
                continue
            try:
                data = _read_all(fd)
            finally:
                os.close(fd)
            if data != f.content:
                problems.append(f"{plan.name} token {f.token:#x}: content differs "
                                f"({len(data)} bytes back, {len(f.content)} expected)")
            checked += len(data)
        session.finish()
        session.close()
    return problems, checked


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
        return bytes(view)


def render(result: RehearsalResult) -> str:
    lines = [f"Rehearsal on the simulated kernel ({result.directory})", ""]
    for s in result.steps:
        lines.append(f"  {'ok  ' if s.ok else 'FAIL'} {s.name:10} {s.detail}  "
                     f"[{s.seconds * 1000:.0f} ms]")
    if result.report is not None:
        lines += ["", "Verification:"]
        for item in result.report.items:
            lines.append(f"  {item.verdict.value:9} {item.kind:10} {item.name}: {item.detail}")
    lines += ["", "Result: " + ("the live update would keep every preserved byte"
                                if result.ok else "the rehearsal found a problem (see FAIL)")]
    return "\n".join(lines)
