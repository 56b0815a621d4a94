"""Gather a KhoInput from the command line: a debugfs copy or file, a memory source, live mode."""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack

from ..abi import KhoInput, ScratchArea, Side
from ..abi.kho_state import scratch_roles
from ..errors import InvalidArgument, NotFound, PermissionDenied
from ..kernel import debugfs
from ..kernel.physmem import KCORE_PATH, ElfCoreMemory
from .common import CliError


def add_state_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fdt", nargs="?", metavar="FDT",
                   help="root KHO FDT file, or a directory laid out like debugfs kho/out or "
                        "kho/in (fdt, sub_fdts/, scratch_phys, scratch_len)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--memory", metavar="CORE",
                     help="ELF core with physical addresses in p_paddr (the /proc/kcore layout)")
    mem.add_argument("--kcore", action="store_true", help=f"read physical memory from "
                     f"{KCORE_PATH} (root)")
    p.add_argument("--live", action="store_true",
                   help="read this host's state: debugfs kho/out (kho/in with --in) and "
                        "/proc/kcore")
    p.add_argument("--in", dest="incoming", action="store_true",
                   help="the state is the incoming side after a kexec")
    p.add_argument("--sub-fdts", metavar="DIR",
                   help="directory of subtree blobs (debugfs sub_fdts) when FDT is a file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debugfs", default=debugfs.DEFAULT_DEBUGFS, help=argparse.SUPPRESS)
    p.add_argument("--kcore-path", default=KCORE_PATH, help=argparse.SUPPRESS)


def load_input(args: argparse.Namespace, stack: ExitStack) -> tuple[KhoInput, str]:
    """Return the decoder input and a one-line description of where it came from. Every file is
    read with the bound of its format (kernel/debugfs.py, kernel/physmem.py) and only if it is a
    regular file: a FIFO, a device, a directory or a dangling symlink is refused, never waited on
    or read whole."""
    side = Side.IN if args.incoming else Side.OUT
    if args.live:
        if args.fdt or args.memory:
            raise CliError("--live reads this host; do not also give FDT or --memory")
        path = debugfs.kho_dir(args.debugfs, side.value)
        snap = _state_directory(path)
        mem_path: str | None = args.kcore_path
        source = f"live {path}"
    else:
        if not args.fdt:
            raise CliError("give FDT (a file or a debugfs-style directory), or --live")
        if os.path.isdir(args.fdt):
            snap = _state_directory(args.fdt)
        else:
            snap = debugfs.KhoDebugfsSnapshot(args.fdt, debugfs.read_root_fdt(args.fdt))
        if args.sub_fdts:
            snap.sub_blobs.update(debugfs.read_sub_blobs(args.sub_fdts, "--sub-fdts"))
        mem_path = args.kcore_path if args.kcore else args.memory
        source = args.fdt
    memory = None
    if mem_path:
        memory = stack.enter_context(_open_core(mem_path))
        source += f" + memory {mem_path}"
    roles = scratch_roles(len(snap.scratch_phys))
    scratch = [ScratchArea(p, n, r) for p, n, r in zip(snap.scratch_phys, snap.scratch_len,
                                                       roles, strict=True)]
    return KhoInput(snap.fdt, snap.sub_blobs, scratch, memory, side), source


def _state_directory(path: str) -> debugfs.KhoDebugfsSnapshot:
    """A debugfs-style KHO directory that holds a state. One with neither a root FDT nor a
    subtree blob is refused: decoding nothing finds nothing wrong, and a health check pointed
    at the wrong directory (an empty one, /proc, the parent of kho/out) must not pass."""
    snap = debugfs.read_snapshot(path)
    if snap.fdt is not None or snap.sub_blobs:
        return snap
    inside = [name for name in ("out", "in", "kho") if os.path.isdir(os.path.join(path, name))]
    hint = (f"; it has {', '.join(f'{name}/' for name in inside)}: give "
            f"{os.path.join(path, inside[0])} instead" if inside else "")
    raise InvalidArgument(f"{path} holds no KHO state (no fdt, no sub_fdts/ blobs): it is not "
                          f"a debugfs kho/out or kho/in directory or a copy of one{hint}")


def _open_core(path: str) -> ElfCoreMemory:
    """The memory core, with what to do when it cannot be opened (the errors keep their names:
    NotFound, PermissionDenied, InvalidArgument)."""
    try:
        return ElfCoreMemory(path)
    except PermissionDenied as exc:
        raise PermissionDenied(f"{exc.message}; reading physical memory needs root") from exc
    except NotFound as exc:
        if path == KCORE_PATH:
            raise NotFound(f"{exc.message} (the kernel lacks CONFIG_PROC_KCORE)") from exc
        raise
