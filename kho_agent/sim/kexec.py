"""kexec of the simulated kernel: kexec_file_load (image checks, scratch placement by
kernel/kexec_placement.py, the rule the engine predicts with) and the reboot that freezes and
serializes LUO, writes the handover and boots the loaded kernel."""

from __future__ import annotations

import errno
import time

from ..abi.compat import abi_from_payload
from ..abi.kho_state import ScratchArea, scratch_roles
from ..errors import Busy, InvalidArgument, KernelRefused
from ..kernel.callerfile import RegularFile
from ..kernel.image import MAX_INPUT, ImageError, parse_image
from ..kernel.kexec_placement import kexec_segments, place_segments
from . import boots, rootfs
from . import faults as faults_mod
from .boot import PAGE_SIZE, Scratch
from .boot_record import load, save
from .handover import write_handover
from .kernel import Runtime, boot_after_kexec
from .store import locked
from .versions import SimAbi, check_abi

BOOT_PARAMS = PAGE_SIZE  # struct boot_params + setup_data, one page


def unplaced_segments(scratch: list[Scratch], kernel: int, initrd: int,
                      boot_data: int) -> list[str]:
    """The segments (with their sizes) kexec_file_load finds no room for in the scratch areas,
    placed as the kernel places them (kernel/kexec_placement.py)."""
    areas = [ScratchArea(s.phys, s.size, role)
             for s, role in zip(scratch, scratch_roles(len(scratch)), strict=True)]
    segments = kexec_segments(kernel, initrd, max(len(scratch) - 2, 0), PAGE_SIZE,
                              boot_data=boot_data)
    return [f"{p.segment.label} ({p.segment.memsz} bytes)"
            for p in place_segments(segments, areas) if p.area is None]


class SimKexec:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    def available(self) -> bool:
        self._rt.check()
        return True

    def loaded(self) -> bool:
        self._rt.check()
        return self._rt.fresh().loaded is not None

    def load(self, kernel: RegularFile, initrd: RegularFile | None, cmdline: str) -> None:
        rt = self._rt
        rt.check()
        op = "kexec_file_load"
        slow = faults_mod.take(rt.directory, "slow-load")
        if slow is not None:
            time.sleep(float(str(slow["seconds"])))
        fault = faults_mod.take(rt.directory, "load-fails")
        if fault is not None:
            err = int(str(fault["errno"]))
            raise KernelRefused(op, err, "injected fault load-fails")
        try:
            # the kernel reads the whole file (kernel_read_file_from_fd), bounded as it is
            image = parse_image(kernel.read_all(MAX_INPUT), kernel.name)
        except ImageError as exc:
            raise KernelRefused(op, errno.ENOEXEC, str(exc)) from exc
        spoken = abi_from_payload(image.payload, release=image.info.release)
        versions = {key: spoken.contracts[key].primary
                    for key in ("kho-root", "luo", "handler:memfd", "memblock")}
        if not all(versions.values()) or image.info.release is None:
            missing = ", ".join(k for k, v in versions.items() if not v) or "release"
            raise InvalidArgument(f"{kernel}: the simulator boots only kernels with KHO, LUO, a "
                                  f"memfd handler and memblock built in; this image lacks "
                                  f"{missing}")
        abi = SimAbi(str(versions["kho-root"]), str(versions["luo"]),
                     str(versions["handler:memfd"]), str(versions["memblock"]))
        check_abi(abi)
        st = rt.state
        if st.kho_enabled:
            unplaced = unplaced_segments(st.scratch, kernel.size, initrd.size if initrd else 0,
                                         BOOT_PARAMS + len(cmdline) + 1)
            if unplaced:
                raise KernelRefused(op, errno.EADDRNOTAVAIL, f"{', '.join(unplaced)}: no KHO "
                                    "scratch area has room next to the other segments; with KHO "
                                    "every segment must fit in scratch; boot with a larger "
                                    "kho_scratch= or use a smaller initrd")
        record: dict[str, object] = {
            "kernel": kernel.resolved_path(),
            "initrd": initrd.resolved_path() if initrd else None,
            "cmdline": cmdline, "release": image.info.release, "abi": abi.to_json(),
            "kho": st.kho_enabled}
        with locked(rt.directory):
            fresh = load(rt.directory)
            fresh.loaded = record
            save(rt.directory, fresh)
        rootfs.set_kexec_loaded(rt.root, True)

    def unload(self) -> None:
        rt = self._rt
        rt.check()
        with locked(rt.directory):
            fresh = load(rt.directory)
            fresh.loaded = None
            save(rt.directory, fresh)
        rootfs.set_kexec_loaded(rt.root, False)

    def reboot(self, *, via_systemd: bool) -> None:
        """reboot(LINUX_REBOOT_CMD_KEXEC): liveupdate_reboot() (freeze, serialize), the handover,
        then the loaded kernel boots. `via_systemd` makes no difference here (no service
        manager runs in the simulation)."""
        slow = faults_mod.take(self._rt.directory, "slow-reboot")
        if slow is not None:  # outside the lock: the sessions are served meanwhile
            time.sleep(float(str(slow["seconds"])))
        # the kernel serializes the sessions with no session request in flight (handed-out
        # session fds are served on other threads: kernel/sessionwire.py)
        with self._rt.lock:
            self._reboot(via_systemd)

    def _reboot(self, via_systemd: bool) -> None:
        rt = self._rt
        rt.check()
        op = "reboot(LINUX_REBOOT_CMD_KEXEC)"
        st = rt.fresh()
        if st.loaded is None:
            raise KernelRefused(op, errno.EINVAL, "no kernel is loaded; load one with kexec "
                                "first")
        other = rt.foreign_owner()
        if other is not None:
            raise Busy(f"{other} holds the outgoing sessions of this simulated kernel; "
                       "reboot from that process (the simulator keeps outgoing sessions in the "
                       "process that created them)")
        out = rt.outgoing
        handed_over = bool(st.kho_enabled and st.loaded.get("kho"))
        if rt.state.luo_enabled:
            if faults_mod.take(rt.directory, "freeze-fails") is not None:
                raise KernelRefused(op, errno.EINVAL, "a file handler's freeze() failed "
                                    "(injected fault freeze-fails); nothing was changed, the "
                                    "sessions stay preserved")
            out.check_freeze()
        ho = out.serialize() if handed_over else None
        # The next boot is built beside this one and switched to in one step (boots.py): a
        # process killed on the way leaves this boot as it is (less what the dead process
        # held), never a mixture of the two.
        with boots.transition(rt.machine, rt.directory) as boot:
            # read again under the boot's lock, which the transition holds: what it carries
            # over is what the old boot has at the switch
            st = rt.fresh()
            if st.loaded is None:
                raise KernelRefused(op, errno.EINVAL, "the loaded kernel was unloaded meanwhile")
            faults = faults_mod.pending(rt.directory)
            corrupt = faults.pop("corrupt-file", None) if ho is not None else None
            drop = faults.pop("drop-kho", None) is not None
            mismatch = faults.pop("luo-mismatch", None) is not None
            faults_mod.carry(boot, faults)
            rootfs.carry_userspace(rt.directory, boot)
            if ho is not None:
                if corrupt is not None:
                    _corrupt(out, ho.pages, corrupt)
                write_handover(boot, ho, st.scratch, {
                    "from_release": st.release, "from_boot_id": st.boot_id,
                    "from_abi": st.abi.to_json(), "via_systemd": via_systemd})
            boot_after_kexec(boot, st, st.loaded, handed_over=handed_over, drop=drop,
                             luo_mismatch=mismatch)
        rt.kexecd()


def _corrupt(out: object, pages: dict[int, bytes], params: dict[str, object]) -> None:
    """Flip `length` bytes at `offset` of one preserved file's data in the handover."""
    from .outgoing import Outgoing

    assert isinstance(out, Outgoing)
    session, token = str(params["session"]), int(str(params["token"]))
    offset, length = int(str(params["offset"])), int(str(params["length"]))
    target = next((f for s in out.sessions if s.name == session for f in s.files
                   if f.token == token), None)
    if target is None:
        raise InvalidArgument(f"fault corrupt-file: no preserved file {token:#x} in session "
                              f"{session!r}")
    for pos in range(offset, min(offset + length, target.size)):
        page = target.data_pages[pos // PAGE_SIZE]
        data = bytearray(pages[page])
        data[pos % PAGE_SIZE] ^= 0xFF
        pages[page] = bytes(data)
