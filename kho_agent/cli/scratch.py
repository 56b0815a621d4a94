"""`kho-agentctl scratch`: are the KHO scratch areas big enough, and what should kho_scratch= be?

Reads the host facts (sysinfo), the current scratch areas from KHO debugfs (out/scratch_phys and
out/scratch_len) and the sizes of the next kernel and initrd, then prints reserved against
recommended with the breakdown and both command-line forms.

Exit 0 sufficient, 1 too small or not proven (areas unknown, segments do not fit), 2 could not run.

Asks kho-agentd (ScratchPlan over D-Bus) by default; `--local` (or the hidden `--root`) computes
the plan in this process, and so does `--next-excludes-hugetlb`, an option the daemon's
ScratchPlan does not take. When no daemon answers and neither was given, the plan is computed
here with one note on stderr (not when one is there but does not answer: DaemonNotResponding).

--kernel and --initrd are opened here in both modes (regular files only, never blocking) and
sent to kho-agentd as fds; in --local mode the kernel is read here with the bound of
kernel/image.py and the initrd is only sized (kexec_file_load takes at most INITRD_MAX).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..abi.jsonview import to_json
from ..abi.kho_state import ScratchArea, scratch_roles
from ..engine.scratch_plan import (
    DEFAULT_MARGIN_PERCENT,
    ScratchItem,
    ScratchPlan,
    human,
    plan_scratch,
)
from ..errors import AgentError, InvalidArgument
from ..kernel import debugfs
from ..kernel.callerfile import RegularFile, open_regular
from ..kernel.image import (
    IMAGE_HEADER_BYTES,
    MAX_INPUT,
    ImageError,
    image_memory_size,
    parse_image,
)
from ..kernel.kexec_placement import KexecSegment, Placement
from ..kernel.kho_scratch import KernReserved, ScratchSizes
from ..kernel.sysinfo import SysInfo, kho_enabled, read_sysinfo
from ..service import interfaces as api
from ..service.errors import DaemonUnreachable
from .bus import (
    DEFAULT_CALL_TIMEOUT,
    KEXEC_FILE_SIZE_MAX,
    AgentClient,
    TargetFiles,
    add_bus_options,
    add_timeout_option,
    open_target_files,
    options,
)
from .common import EXIT_FINDINGS, EXIT_OK, print_json

HELP = "compare the reserved KHO scratch areas with what the next live update needs"
# an initrd larger than kexec_file_load takes cannot be loaded: no input for a plan either
INITRD_MAX = KEXEC_FILE_SIZE_MAX

def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 sufficient, 1 too small "
                       "or not proven, 2 could not run.")
    p.add_argument("--kernel", metavar="IMAGE",
                   help="the next kernel image (default: /boot/vmlinuz-<running release>)")
    p.add_argument("--initrd", metavar="FILE",
                   help="the next kernel's initrd (default: /boot/initrd.img-<running release>)")
    p.add_argument("--margin", metavar="PCT", type=int, default=DEFAULT_MARGIN_PERCENT,
                   help=f"headroom on top of the need, in percent (default "
                        f"{DEFAULT_MARGIN_PERCENT})")
    p.add_argument("--next-excludes-hugetlb", action="store_true",
                   help="the next kernel is 7.3 or later: boot-time HugeTLB pages need no scratch")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--local", action="store_true",
                   help="compute the plan in this process instead of asking kho-agentd")
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    add_bus_options(p)
    add_timeout_option(p, DEFAULT_CALL_TIMEOUT, "the call to kho-agentd")
    p.set_defaults(run=run)


@dataclass
class FileSize:
    path: str
    memory: int               # bytes it takes in memory once loaded
    how: str                  # where `memory` comes from


def kernel_memory_size(path: str) -> FileSize:
    """How much memory a kernel image takes once kexec loads it (kernel/image.py
    image_memory_size());
    compressed images without such a header (arm64 Image.gz, zboot) are decompressed first. A
    regular file only, of at most MAX_INPUT bytes (kernel/image.py's bound)."""
    with open_regular(path, "kernel image", max_size=MAX_INPUT) as opened:
        return _kernel_memory_size(path, opened)


def _kernel_memory_size(path: str, opened: RegularFile) -> FileSize:
    sized = image_memory_size(opened.read_at(0, IMAGE_HEADER_BYTES), opened.size)
    if sized is not None:
        return FileSize(path, *sized)
    try:
        image = parse_image(opened.read_all(MAX_INPUT), path)
    except ImageError as exc:
        raise InvalidArgument(f"the kernel image: {exc}") from exc
    payload = image.payload
    sized = image_memory_size(payload[:IMAGE_HEADER_BYTES], len(payload))
    if sized is not None:
        return FileSize(path, *sized)
    return FileSize(path, len(payload), f"{image.info.kind} payload size")


def _file_size(path: str, what: str) -> FileSize:
    """The size of a regular file (opened, not read: a FIFO, a device or a directory is
    refused)."""
    with open_regular(path, what, max_size=INITRD_MAX) as opened:
        return FileSize(path, opened.size, "file size")


def _boot_file(root: Path, names: tuple[str, ...]) -> str | None:
    for name in names:
        path = root / "boot" / name
        if path.is_file():
            return str(path)
    return None


@dataclass
class Inputs:
    info: SysInfo
    areas: list[ScratchArea]
    kho_boot: bool
    areas_note: str | None
    kernel: FileSize | None
    initrd: FileSize | None
    running_kernel: FileSize | None
    running_initrd: FileSize | None
    guessed_next: bool


def _areas(root: Path, info: SysInfo) -> tuple[list[ScratchArea], bool, str | None]:
    mount = str(root / "sys/kernel/debug")
    kho_boot = os.path.isdir(os.path.join(mount, "kho", "in"))
    try:
        snap = debugfs.read_snapshot(debugfs.kho_dir(mount, "out"))
    except debugfs.DebugfsError as exc:
        why = str(exc)
        if not kho_enabled(info) and "does not exist" in why:
            why += " (the command line has no kho=on)"
        return [], kho_boot, f"scratch areas unknown: {why}"
    roles = scratch_roles(len(snap.scratch_phys))
    areas = [ScratchArea(p, n, r) for p, n, r in zip(snap.scratch_phys, snap.scratch_len, roles,
                                                      strict=True)]
    if not areas:
        return [], kho_boot, f"scratch areas unknown: {snap.path} lists no scratch areas"
    return areas, kho_boot, None


def gather(args: argparse.Namespace) -> Inputs:
    root = Path(args.root if args.root is not None else "/")
    info = read_sysinfo(root)
    areas, kho_boot, areas_note = _areas(root, info)
    release = info.release
    running_kernel_path = _boot_file(root, (f"vmlinuz-{release}", f"bzImage-{release}"))
    running_initrd_path = _boot_file(root, (f"initrd.img-{release}", f"initramfs-{release}.img",
                                            f"initrd-{release}"))
    running_kernel = kernel_memory_size(running_kernel_path) if running_kernel_path else None
    running_initrd = (_file_size(running_initrd_path, "initrd") if running_initrd_path
                      else None)
    guessed = False
    kernel: FileSize | None
    initrd: FileSize | None
    if args.kernel:
        kernel = kernel_memory_size(args.kernel)
    else:
        kernel, guessed = running_kernel, running_kernel is not None
    if args.initrd:
        initrd = _file_size(args.initrd, "initrd")
    elif args.kernel:
        initrd = None  # a new kernel without --initrd boots without one
    else:
        initrd = running_initrd
    return Inputs(info, areas, kho_boot, areas_note, kernel, initrd, running_kernel,
                  running_initrd, guessed)


def build_plan(inputs: Inputs, args: argparse.Namespace) -> ScratchPlan:
    plan = plan_scratch(
        inputs.info, inputs.areas, kho_boot=inputs.kho_boot,
        image_bytes=inputs.kernel.memory if inputs.kernel else None,
        initrd_bytes=inputs.initrd.memory if inputs.initrd else None,
        running_image_bytes=inputs.running_kernel.memory if inputs.running_kernel else None,
        running_initrd_bytes=inputs.running_initrd.memory if inputs.running_initrd else None,
        margin=args.margin / 100, exclude_hugetlb=args.next_excludes_hugetlb)
    if inputs.areas_note:
        plan.notes.insert(0, inputs.areas_note)
    if inputs.guessed_next:
        plan.notes.append("no --kernel given: the running kernel's image and initrd from /boot "
                          "stand in for the next kernel's")
    return plan


def verdict(plan: ScratchPlan) -> str:
    if plan.sufficient:
        return "SUFFICIENT: the scratch areas hold the next boot's early memory and segments"
    if not plan.reserved:
        return ("NOT PROVEN: the current scratch areas are unknown; boot with the recommended "
                "kho_scratch= and check again")
    return "TOO SMALL: see the warnings; set the recommended kho_scratch= and cold boot"


def render(plan: ScratchPlan, inputs: Inputs | None) -> str:
    """The plan as text; `inputs` (the host and file facts) are known when computed here, not
    when the plan came from kho-agentd."""
    boot = "KHO boot (areas inherited)" if plan.kho_boot else "cold boot"
    nodes = ", ".join(str(n) for n in plan.node_ids)
    if inputs is None:
        lines = [f"host (as kho-agentd sees it): NUMA node(s) with memory: {nodes}, {boot}"]
    else:
        info = inputs.info
        lines = [f"host: {info.release} ({info.machine}), MemTotal {human(info.mem_total)}, "
                 f"NUMA node(s) with memory: {nodes}, {boot}"]
        for role, f in (("next kernel", inputs.kernel), ("next initrd", inputs.initrd)):
            if f is not None:
                lines.append(f"{role}: {f.path}: {human(f.memory)} in memory ({f.how})")
    k = plan.kern
    per_node = ", ".join(f"node {n} {human(v)}" for n, v in sorted(k.per_node.items()))
    lines += ["", f"kernel-reserved memory ({plan.kern_source}): below 4 GiB {human(k.low)}, "
              f"total {human(k.total)}" + (f", {per_node}" if per_node else "")]
    if plan.preserved_left_out:
        lines.append(f"  left out: {human(plan.preserved_left_out)} preserved by the previous "
                     "kernel (not kernel-reserved, never in scratch)")
    for item in plan.estimate:
        lines.append(f"  {item.label:<36} {human(item.bytes):>12}  {item.note}")
    req, rec = plan.required, plan.recommended
    lines += ["", f"{'AREA':<8} {'ADDRESS':>18} {'RESERVED':>12} {'REQUIRED':>12} "
              f"{'RECOMMENDED':>12}"]
    wanted = [("lowmem", req.lowmem, rec.lowmem), ("global", req.global_, rec.global_)]
    wanted += [(f"node {i}", req.pernode, rec.pernode) for i in range(len(plan.node_ids))]
    have = {a.role: a for a in plan.reserved}
    for role, need, want in wanted:
        area = have.pop(role, None)
        addr = f"{area.phys:#x}" if area else "-"
        size = human(area.size) if area else "unknown"
        lines.append(f"{role:<8} {addr:>18} {size:>12} {human(need):>12} {human(want):>12}")
    for area in have.values():
        lines.append(f"{area.role:<8} {area.phys:>#18x} {human(area.size):>12}")
    if plan.reserved:
        lines.append(f"{'total':<8} {'':>18} {human(plan.reserved_total):>12}")
    lines += ["", "recommended, broken down:"]
    for item in plan.breakdown:
        lines.append(f"  {item.label:<52} {human(item.bytes):>12}  {item.note}")
    lines.append(f"  {'total':<52} {human(rec.total(len(plan.node_ids))):>12}")
    lines += ["", f"recommended: {plan.absolute_form()}"]
    if plan.percent is not None:
        lines.append(f"         or: {plan.percent_form()}  (the smallest scale that gives at "
                     "least these sizes here)")
    if plan.segments:
        lines += ["", "next kernel's kexec segments in the current areas:"]
        for p in plan.segments:
            where = f"{p.area} at {p.phys:#x}" if p.area is not None and p.phys is not None \
                else "NO ROOM"
            lines.append(f"  {p.segment.label:<28} {human(p.segment.memsz):>12}  {where}")
        if plan.initrd_limit is not None:
            lines.append(f"  until the next cold boot: an initrd of up to "
                         f"{human(plan.initrd_limit)} fits next to this kernel")
    if plan.warnings:
        lines.append("")
        lines += [f"warning: {w}" for w in plan.warnings]
    if plan.notes:
        lines.append("")
        lines += [f"note: {n}" for n in plan.notes]
    lines += ["", f"Verdict: {verdict(plan)}"]
    return "\n".join(lines)


def report_json(plan: ScratchPlan, inputs: Inputs | None) -> dict[str, Any]:
    """`host` and `inputs` are null when the plan came from kho-agentd (it sends the plan)."""
    out: dict[str, Any] = {
        "sufficient": plan.sufficient,
        "verdict": verdict(plan).split(":")[0].lower().replace(" ", "_"),
        "host": None, "inputs": None, "plan": plan.to_json()}
    if inputs is not None:
        info = inputs.info
        out["host"] = {"release": info.release, "machine": info.machine,
                       "mem_total": info.mem_total, "page_size": info.page_size,
                       "nodes": [n.nid for n in info.nodes],
                       "kho_enabled": kho_enabled(info), "kho_boot": plan.kho_boot}
        out["inputs"] = {role: to_json(f) if f else None
                         for role, f in (("kernel", inputs.kernel), ("initrd", inputs.initrd),
                                         ("running_kernel", inputs.running_kernel),
                                         ("running_initrd", inputs.running_initrd))}
    return out


def plan_from_json(raw: dict[str, Any]) -> ScratchPlan:
    """A ScratchPlan back from its to_json() form (what kho-agentd's ScratchPlan returns)."""
    def sizes(d: dict[str, Any]) -> ScratchSizes:
        return ScratchSizes(int(d["lowmem"]), int(d["global_"]), int(d["pernode"]))

    def items(rows: list[dict[str, Any]]) -> list[ScratchItem]:
        return [ScratchItem(str(r["label"]), int(r["bytes"]), str(r.get("note", "")))
                for r in rows]

    try:
        kern = raw["kern"]
        return ScratchPlan(
            reserved=[ScratchArea(int(a["phys"]), int(a["size"]), str(a["role"]))
                      for a in raw["reserved"]],
            reserved_total=int(raw["reserved_total"]),
            recommended=sizes(raw["recommended"]),
            percent=None if raw["percent"] is None else int(raw["percent"]),
            breakdown=items(raw["breakdown"]),
            warnings=[str(w) for w in raw["warnings"]],
            notes=[str(n) for n in raw["notes"]],
            sufficient=bool(raw["sufficient"]),
            required=sizes(raw["required"]),
            kernel_default=sizes(raw["kernel_default"]),
            # JSON object keys are strings; the node ids are ints
            kern=KernReserved(int(kern["low"]), int(kern["total"]),
                              {int(k): int(v) for k, v in kern["per_node"].items()}),
            kern_source=str(raw["kern_source"]),
            estimated=bool(raw["estimated"]),
            estimate=items(raw["estimate"]),
            segments=[Placement(KexecSegment(**p["segment"]), p["area"], p["phys"])
                      for p in raw["segments"]],
            node_ids=[int(n) for n in raw["node_ids"]],
            alignment=int(raw["alignment"]),
            margin=float(raw["margin"]),
            kho_boot=bool(raw["kho_boot"]),
            preserved_left_out=int(raw.get("preserved_left_out", 0)),
            initrd_limit=None if raw.get("initrd_limit") is None else int(raw["initrd_limit"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AgentError(f"kho-agentd sent a scratch plan this kho-agentctl cannot read "
                         f"({type(exc).__name__}: {exc}); are both the same version? "
                         "--local computes the plan here") from exc


def bus_plan(args: argparse.Namespace, files: TargetFiles) -> ScratchPlan:
    opts = options({**files.options, "margin": args.margin / 100}, api.SCRATCH_OPTIONS)
    with AgentClient.from_args(args) as client:
        (text,) = client.manager("ScratchPlan", opts, fds=files.fds)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AgentError(f"kho-agentd sent a scratch plan that is not JSON ({exc}); are both "
                         "the same version? --local computes the plan here") from exc
    return plan_from_json(raw)


def run(args: argparse.Namespace) -> int:
    if args.margin < 0:
        raise InvalidArgument(f"--margin {args.margin} is negative; give 0 or more")
    inputs: Inputs | None = None
    local = args.local or args.root is not None or args.next_excludes_hugetlb
    with ExitStack() as stack:
        # opened (and refused) here in both modes, before anything is asked or computed
        files = open_target_files(args.kernel, args.initrd, stack)
        if not local:
            try:
                plan = bus_plan(args, files)
            except DaemonUnreachable as exc:
                print(f"kho-agentctl scratch: note: {exc.message.split(';')[0]}; computing the "
                      "plan in this process instead (--local)", file=sys.stderr)
                local = True
        if local:
            inputs = gather(args)
            plan = build_plan(inputs, args)
    if args.json:
        print_json(report_json(plan, inputs))
    else:
        print(render(plan, inputs))
    return EXIT_OK if plan.sufficient else EXIT_FINDINGS
