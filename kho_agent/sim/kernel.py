"""SimKernel: a simulated KHO/LUO kernel whose state lives in a directory.

    DIR/current            -> boots/<id>, the boot in force (boots.py: how it is switched)
    DIR/boots/<id>/        one boot:
        boot.json          the boot (boot_record.py); shared bookkeeping between processes
        incoming.log       which incoming sessions are retrieved or finished (retrieval.py)
        faults.json        injected faults (faults.py), carried from boot to boot
        userspace.json     the machine's init system, carried from boot to boot
        kernel/            this boot's baseline memory and the incoming memory still reserved
        handover/          what the kexec into this boot handed over (handover.py)
        root/              the fake root: proc, sys, debugfs, dev/liveupdate, boot/ (rootfs.py)
        state.lock         flock()ed for read-modify-write of this boot's files
        liveupdate.lock    locked while a process holds /dev/liveupdate open
        outgoing.lock      locked by the process that holds the outgoing sessions
    DIR/root, boot.json, kernel, handover   -> current/..., stable paths for readers
    DIR/state.lock         the machine lock (boot transitions, recovery)

A process attaches with SimKernel(DIR) and gets a Host whose seams behave like the 7.2/7.3
kernel. Outgoing sessions live in the process that created them (the kernel keeps them while
their files are open); when that process is gone, so are they, as on a real host. What a
process holds (the device, the outgoing sessions) is a lock on an open file, which the host
kernel releases when the process dies however it dies: a killed process never leaves the
simulated kernel believing it still holds them.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from ..abi.memory import SparseMemory
from ..errors import AgentError, Busy, InvalidArgument, NotFound
from ..kernel.host import Host
from ..kernel.physmem import ElfCoreMemory
from . import boots, retrieval, rootfs
from . import faults as faults_mod
from .boot import Memblock, cold_layout, kho_layout, parse_cmdline
from .boot_record import BootState, Incoming, load, save
from .handover import (
    Accepted,
    Panic,
    Received,
    Refused,
    accept,
    clear_handover,
    handover_memory,
    read_handover,
)
from .images import build_bzimage
from .memory import load_core, save_core
from .outgoing import BASELINE_CORE, Outgoing, build_baseline, debugfs_fdt_size, root_fdt
from .store import KEXECD, crash_point, lock_taken, locked, take_lock
from .versions import SimAbi, check_abi

INCOMING_CORE = "kernel/incoming.core"
OWNER_LOCK = "outgoing.lock"
DEFAULT_ABI = SimAbi()
DEMO_RESERVE_MEM = "reserve_mem=1M:4096:kho_demo_rsv"


class Runtime:
    """What one attached SimKernel shares with its seams, devices and sessions.

    `directory` is the directory of the boot this process attached to (boots/<id>): every file
    of the boot is read and written there, so a process whose boot was switched away can touch
    only its own, old boot's files. `machine` is the simulator directory itself."""

    def __init__(self, machine: Path, directory: Path, state: BootState) -> None:
        self.machine = machine
        self.directory = directory
        self.state = state
        self.token = uuid.uuid4().hex
        self.gone = False
        # check() runs on every seam call: its readlink gets ready-made strings
        self._current_link = str(machine / boots.CURRENT)
        self._current_target = boots.link_target(directory)
        self._outgoing: Outgoing | None = None
        self._owner_fd = -1        # holds OWNER_LOCK while this process owns outgoing sessions
        self._incoming_pages: dict[int, bytes] | None = None
        self._handover_memory: ElfCoreMemory | None = None
        self.retrieval = retrieval.RetrievalLog(directory)
        # inode -> incoming session name, for files this process retrieved (EBUSY on preserve)
        self.retrieved_inodes: dict[tuple[int, int], str] = {}
        # what a process of this boot holds (device lock, session fds); released at the kexec
        self.closers: list[Callable[[], None]] = []
        # Session requests arrive on server threads too (kernel/sessionwire.py): they run under this
        # lock, and so do the session operations of the process's own thread.
        self.lock = threading.RLock()

    @property
    def root(self) -> Path:
        """This boot's fake root, where the simulated kernel writes."""
        return self.directory / "root"

    @property
    def host_root(self) -> Path:
        """The stable path of the fake root (DIR/root), which readers are given."""
        return self.machine / "root"

    def check(self) -> None:
        """Raise once the simulated kernel has kexec'd away from this process's boot. Called on
        every seam operation: one readlink of DIR/current."""
        if self.gone:
            raise AgentError(KEXECD)
        try:
            current = os.readlink(self._current_link)
        except OSError:
            current = ""
        if current != self._current_target:
            self.gone = True
            raise AgentError(KEXECD)

    def handover_memory(self) -> ElfCoreMemory | None:
        """The handed-over memory image, opened once per process (thousands of RETRIEVE_FDs
        read from it)."""
        if self._handover_memory is None:
            self._handover_memory = handover_memory(self.directory)
        return self._handover_memory

    def fresh(self) -> BootState:
        return load(self.directory)

    @property
    def outgoing(self) -> Outgoing:
        if self._outgoing is None:
            self._outgoing = Outgoing(self.directory, self.state)
        return self._outgoing

    def claim_outgoing(self) -> None:
        """Outgoing sessions live in one process; another live owner makes this one wait. The
        owner holds a lock on DIR/boots/<id>/outgoing.lock for as long as it has outgoing
        sessions, so an owner that died (SIGKILL included) holds nothing, whatever boot.json
        still says and whoever got its pid since."""
        if self._owner_fd >= 0:
            return
        fd = take_lock(self.directory / OWNER_LOCK)
        if fd is None:
            raise Busy(f"{self._owner_text()} holds the outgoing sessions of this simulated "
                       "kernel; the simulator keeps outgoing sessions in the one process "
                       "that created them: use that process, or end it first")
        self._owner_fd = fd
        with locked(self.directory):
            st = load(self.directory)
            st.outgoing_owner = (os.getpid(), self.token)
            save(self.directory, st)

    def _owner_text(self) -> str:
        owner = self.fresh().outgoing_owner
        return f"process {owner[0]}" if owner is not None else "another process"

    def release_outgoing(self) -> None:
        if self._owner_fd < 0:
            return
        with locked(self.directory):
            st = load(self.directory)
            if st.outgoing_owner == (os.getpid(), self.token):
                st.outgoing_owner = None
                save(self.directory, st)
        os.close(self._owner_fd)
        self._owner_fd = -1

    def foreign_owner(self) -> str | None:
        """Who else holds the outgoing sessions ("process N"), or None."""
        if self._owner_fd >= 0 or not lock_taken(self.directory / OWNER_LOCK):
            return None
        return self._owner_text()

    def incoming_pages(self) -> dict[int, bytes]:
        if self._incoming_pages is None:
            mem = SparseMemory()
            path = self.directory / INCOMING_CORE
            if path.exists():
                load_core(str(path), mem)
            self._incoming_pages = dict(mem.pages())
        return self._incoming_pages

    def sync(self, memory: bool = True) -> None:
        """Make debugfs kho/out current, and /proc/kcore too when `memory` (writing the core
        costs most: skip it when the caller reads no memory). A process that does not own the
        outgoing sessions leaves the owner's files alone."""
        with self.lock:  # two threads reading debugfs would both write it, with one temp name
            self._sync(memory)

    def _sync(self, memory: bool) -> None:
        self.check()
        if self.foreign_owner() is not None:
            return
        out = self.outgoing
        try:
            if out.debugfs_dirty:
                write_debugfs(self.directory, self.state, out)
                out.debugfs_dirty = False
            if memory and out.dirty:
                write_kcore(self.directory, self.state, out, self.incoming_pages())
                out.dirty = False
        except FileNotFoundError:
            self.check()  # the boot was switched away (and removed) meanwhile
            raise

    def kexecd(self) -> None:
        """Everything this process held in the old boot is gone."""
        self.gone = True
        for close in self.closers:
            close()
        self.closers.clear()
        if self._handover_memory is not None:
            self._handover_memory.close()
            self._handover_memory = None
        self.retrieval.close()
        if self._outgoing is not None:
            self._outgoing.release_all()
        if self._owner_fd >= 0:
            os.close(self._owner_fd)
            self._owner_fd = -1


def write_debugfs(directory: Path, state: BootState, out: Outgoing) -> None:
    """debugfs kho/out: the root FDT (truncated as 7.2/7.3 froze it) and the sub-blobs. The
    root FDT's memory-map root is fixed at boot (the radix root is the first page of the map
    window; kho-v1 has none before finalize), so this needs no map encoding."""
    if not state.kho_enabled:
        return
    fdt: bytes | None = root_fdt(state, state.baseline.memmap)
    if state.abi.debugfs_fdt_truncated:
        # the size debugfs froze at kho_init(); a KHO boot shows no out/fdt
        fdt = None if state.kho_boot or fdt is None else fdt[:debugfs_fdt_size(state)]
    rootfs.write_out(directory / "root", fdt, out.sub_blobs())


def write_kcore(directory: Path, state: BootState, out: Outgoing,
                incoming: dict[int, bytes]) -> None:
    """/proc/kcore: the incoming pages still reserved, the outgoing memory with the root FDT,
    and the live preserved-memory map."""
    memmap, meta = out.live_map()
    if state.kho_enabled:
        if memmap != state.baseline.memmap:
            raise AgentError(f"internal: the live memory map root moved ({memmap:#x}, boot put "
                             f"it at {state.baseline.memmap:#x})")
        out.memory.write(state.baseline.root, root_fdt(state, memmap))
    pages = dict(incoming)
    pages.update(out.memory.pages())
    pages.update(meta.pages())
    rootfs.write_core(directory / "root", "proc/kcore", pages)


def finish_boot(directory: Path, state: BootState, mb: Memblock, incoming_pages: dict[int, bytes],
                in_tree: tuple[bytes, dict[str, bytes]] | None) -> BootState:
    """Allocate what the kernel preserves at boot, save the boot and write the fake root, all
    into `directory`, the new boot being built (boots.transition)."""
    memory = SparseMemory()
    build_baseline(state, mb, memory)
    state.reserved = mb.merged()
    crash_point()
    (directory / "kernel").mkdir(parents=True, exist_ok=True)
    save_core(str(directory / BASELINE_CORE), dict(memory.pages()))
    if incoming_pages:
        crash_point()
        save_core(str(directory / INCOMING_CORE), incoming_pages)
    save(directory, state)
    rootfs.write_boot(directory / "root", state, mb, in_tree)
    out = Outgoing(directory, state)
    write_debugfs(directory, state, out)
    write_kcore(directory, state, out, incoming_pages)
    return state


def cold_boot(directory: Path, *, release: str, abi: SimAbi, cmdline: str, memory_mib: int,
              nodes: int, boot_count: int, panics: list[dict[str, object]],
              notes: list[str]) -> BootState:
    cmd = parse_cmdline(cmdline)
    mb, scratch, regions = cold_layout(memory_mib, nodes, cmd)
    sizes = {r.name: r.size for r in cmd.reserve_mem}
    state = BootState(
        boot_count=boot_count, boot_id=str(uuid.uuid4()), release=release, abi=abi,
        cmdline=cmdline, memory_mib=memory_mib, nodes=nodes, kho_enabled=cmd.kho,
        luo_enabled=cmd.luo, scratch=scratch, reserved=[],
        reserve_mem={n: (p, sizes[n]) for n, p in regions.items()} if cmd.kho else {},
        liveupdate_number=1, kexec_count=1, kho_boot=False, previous_release=None,
        panics=panics, notes=notes + [f"Malformed early option '{w}'" for w in cmd.malformed])
    return finish_boot(directory, state, mb, {}, None)


def boot_after_kexec(directory: Path, prev: BootState, loaded: dict[str, object], *,
                     handed_over: bool, drop: bool, luo_mismatch: bool) -> BootState:
    """The kexec'd kernel boots into `directory` (the new boot, with the handover written
    into it): takes the handover (or not), panics, or comes up."""
    abi = SimAbi.from_json(loaded["abi"])
    release, cmdline = str(loaded["release"]), str(loaded["cmdline"])
    cmd = parse_cmdline(cmdline)
    rec = read_handover(directory) if handed_over else None
    result: Accepted | Refused | Panic | None
    if drop and rec is not None:
        result = Refused(["KHO: handover ignored (injected fault drop-kho)",
                          "KHO: disabling KHO revival"])
    elif isinstance(rec, str):
        result = Refused([f"KHO: {rec}", "KHO: disabling KHO revival"])
    elif isinstance(rec, Received):
        result = accept(rec, abi, cmd, luo_mismatch=luo_mismatch)
    else:
        result = None
    panics = list(prev.panics)
    count = prev.boot_count + 1
    if isinstance(result, Accepted):
        preserved = result.preserved
        layout = kho_layout(prev.memory_mib, prev.nodes, cmd, result.scratch, preserved,
                            result.revived)
        if isinstance(layout, str):
            result = Panic(layout)
        else:
            mb, regions = layout
            sizes = {r.name: r.size for r in cmd.reserve_mem}
            state = BootState(
                boot_count=count, boot_id=str(uuid.uuid4()), release=release, abi=abi,
                cmdline=cmdline, memory_mib=prev.memory_mib, nodes=prev.nodes,
                kho_enabled=cmd.kho, luo_enabled=cmd.luo,
                scratch=result.scratch if cmd.kho else [], reserved=[],
                reserve_mem={n: (p, sizes[n]) for n, p in regions.items()} if cmd.kho else {},
                liveupdate_number=(result.luo_number or 0) + 1,
                kexec_count=result.kexec_count + 1, kho_boot=True,
                previous_release=result.previous_release,
                incoming=Incoming(present=result.luo_number is not None),
                panics=panics, notes=result.notes)
            return finish_boot(directory, state, mb, result.pages,
                               (rec.root_blob, result.in_blobs)
                               if isinstance(rec, Received) and cmd.kho else None)
    if isinstance(result, Panic):
        panics.append({"boot": count, "release": release, "message": result.message})
        clear_handover(directory)
        # panic=-1: the machine resets and the firmware boots the installed default kernel,
        # the one that did the kexec; nothing of the handover survives a cold boot
        return cold_boot(directory, release=prev.release, abi=prev.abi, cmdline=prev.cmdline,
                         memory_mib=prev.memory_mib, nodes=prev.nodes, boot_count=count + 1,
                         panics=panics, notes=[f"cold boot after a panic of {release}"])
    notes = result.notes if isinstance(result, Refused) else []
    return cold_boot(directory, release=release, abi=abi, cmdline=cmdline,
                     memory_mib=prev.memory_mib, nodes=prev.nodes, boot_count=count,
                     panics=panics, notes=notes)


class SimKernel:
    """A simulated kernel in `directory`: attach to the current boot, or create() a cold one."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        boot: Path | None = None
        state: BootState | None = None
        if boots.looks_like_machine(self.directory):  # leave any other directory untouched
            with locked(self.directory):
                # under the machine lock: no transition switches boots between these lines
                boot = boots.recover(self.directory)
                state = load(boot) if boot is not None else None
        if boot is None or state is None:
            raise NotFound(f"{directory} is not a simulated kernel directory (it has no boot); "
                           "create one with SimKernel.create() or 'kho-agentd --simulate'")
        self._rt = Runtime(self.directory, boot, state)

    @classmethod
    def create(cls, directory: Path, *, release: str = "7.3.0-sim", abi: SimAbi = DEFAULT_ABI,
               memory_mib: int = 4096, nodes: int = 1,
               cmdline: str = "console=ttyS0 kho=on liveupdate=on",
               reserve_mem: bool = True, systemd_version: int | None = None) -> SimKernel:
        """A cold boot of a new machine in `directory` (made if missing), in one transition: a
        process killed while creating leaves the machine that was there, or the new one. With
        `systemd_version` the simulated machine's PID 1 is that systemd (its hand-off mode
        follows, e.g. fdstore from 261 on); without, PID 1 is a plain init and the hand-off
        mode is "simulated"."""
        check_abi(abi)
        if not release or any(c.isspace() for c in release) or len(release) > 64:
            raise InvalidArgument(f"release {release!r} must be 1..64 characters without spaces")
        directory = Path(directory)
        if reserve_mem and "reserve_mem=" not in cmdline:
            cmdline = f"{cmdline} {DEMO_RESERVE_MEM}".strip()
        with boots.transition(directory, None) as boot:
            if systemd_version is not None:
                rootfs.write_userspace(boot, systemd_version)
            cold_boot(boot, release=release, abi=abi, cmdline=cmdline, memory_mib=memory_mib,
                      nodes=nodes, boot_count=1, panics=[], notes=[])
        return cls(directory)

    # --- the current boot ---------------------------------------------------------------------
    @property
    def state(self) -> BootState:
        return self._rt.state

    @property
    def boot_count(self) -> int:
        return self._rt.state.boot_count

    @property
    def boot_id(self) -> str:
        return self._rt.state.boot_id

    @property
    def release(self) -> str:
        return self._rt.state.release

    @property
    def abi(self) -> SimAbi:
        return self._rt.state.abi

    @property
    def liveupdate_number(self) -> int:
        """The outgoing liveupdate number (1 after a cold boot, previous + 1 after an update)."""
        return self._rt.state.liveupdate_number

    @property
    def panics(self) -> list[str]:
        """Panic messages of kernels that failed to boot here, oldest first."""
        return [str(p["message"]) for p in self._rt.fresh().panics]

    @property
    def notes(self) -> list[str]:
        """What this boot's kernel logged about the handover (KHO/LUO/memblock lines)."""
        return list(self._rt.state.notes)

    def retrieved_sessions(self) -> set[str]:
        """The incoming sessions RETRIEVE_SESSION handed out in this boot, by any process
        (finished since or not): what its retrieval log (retrieval.py) records."""
        log = retrieval.RetrievalLog(self._rt.directory)
        try:
            return log.ever_retrieved()
        finally:
            log.close()

    def host(self) -> Host:
        from .kexec import SimKexec
        from .liveupdate import SimLiveUpdate

        self._rt.check()
        return Host(root=self._rt.host_root, liveupdate=SimLiveUpdate(self._rt),
                    kexec=SimKexec(self._rt), simulated=True, sync=self._rt.sync)

    def write_kernel_image(self, path: Path, *, release: str, abi: SimAbi) -> Path:
        """A synthetic bzImage of a kernel with that release and ABI."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build_bzimage(release, abi))
        return path

    def inject(self, fault: str, **params: object) -> None:
        self._rt.check()
        faults_mod.inject(self._rt.directory, fault, params)

    def clear_faults(self) -> None:
        self._rt.check()
        faults_mod.clear(self._rt.directory)

    def faults(self) -> dict[str, dict[str, object]]:
        return faults_mod.pending(self._rt.directory)
