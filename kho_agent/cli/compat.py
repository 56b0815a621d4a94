"""`kho-agentctl compat`: can the running kernel live-update into this kernel image?

The running side comes from this host: the outgoing KHO state in debugfs (KHO root, LUO,
memblock, kexec-metadata: what will actually be handed over) plus the running kernel's image
(/boot/vmlinuz-RELEASE) for the file handlers, which LUO serializes only inside reboot(). With
--running-image two images are compared offline instead.

Exit 0 compatible, 1 incompatible or not proven compatible, 2 could not run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..abi import KhoInput, Side, decode_state
from ..abi.compat import (
    CompatReport,
    CompatRow,
    Impact,
    KernelAbi,
    Verdict,
    abi_from_payload,
    abi_from_state,
    compare,
)
from ..abi.jsonview import to_json
from ..facts import with_running_image
from ..kernel import debugfs
from ..kernel.image import ImageError, ImageInfo, read_image
from .common import EXIT_FINDINGS, EXIT_OK, print_json

HELP = "compare the handover ABI of the running kernel with a target kernel image"
DEFAULT_BOOT_DIR = "/boot"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 compatible, 1 incompatible "
                       "or not proven compatible, 2 could not run.")
    p.add_argument("--kernel", required=True, metavar="IMAGE",
                   help="the target kernel image (bzImage, vmlinux, arm64 Image or zboot)")
    p.add_argument("--running-image", metavar="IMAGE",
                   help="compare with this image instead of the running kernel (offline)")
    p.add_argument("--json", action="store_true", help="machine-readable output, every row")
    p.add_argument("--debugfs", default=debugfs.DEFAULT_DEBUGFS, help=argparse.SUPPRESS)
    p.add_argument("--boot-dir", default=DEFAULT_BOOT_DIR, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def _image_abi(path: str, role: str) -> tuple[KernelAbi, ImageInfo]:
    try:
        image = read_image(path)  # bounded, regular files only (kernel/image.py)
    except ImageError as exc:
        raise ImageError(f"{role} kernel: {exc}", exc.kind) from exc
    info = image.info
    return abi_from_payload(image.payload, f"image {path}", info.release), info


def _running_from_host(args: argparse.Namespace) -> tuple[KernelAbi, ImageInfo | None]:
    try:
        out_dir = debugfs.kho_dir(args.debugfs, "out")
    except debugfs.DebugfsError as exc:
        raise debugfs.DebugfsError(f"cannot read the running kernel's KHO state: {exc}. To "
                                   "compare two kernel images offline, give --running-image "
                                   "IMAGE", exc.kind) from exc
    out = debugfs.read_snapshot(out_dir)
    state = decode_state(KhoInput(out.fdt, out.sub_blobs, side=Side.OUT))
    incoming = None
    in_dir = os.path.join(os.path.dirname(out_dir), "in")
    if state.compatible is None and os.path.isdir(in_dir):
        snap = debugfs.read_snapshot(in_dir)
        incoming = decode_state(KhoInput(snap.fdt, snap.sub_blobs, side=Side.IN))
    abi = abi_from_state(state, incoming, f"debugfs {out_dir}")
    release = os.uname().release
    abi.release = abi.release or release
    return with_running_image(abi, Path(args.boot_dir) / f"vmlinuz-{release}", release,
                              " (give --running-image IMAGE)")


def _text(versions: tuple[str, ...] | None) -> str:
    if versions is None:
        return "unknown"
    return ", ".join(versions) if versions else "-"


def _image_line(role: str, info: ImageInfo | None) -> str | None:
    if info is None:
        return None
    setup = f", boot protocol {info.setup_version}" if info.setup_version else ""
    return (f"{role}: {info.path}: {info.kind}, {info.compression}{setup}, "
            f"{info.payload_size} bytes decompressed, version {info.kernel_version or 'unknown'}")


VERDICT_TEXT = {
    Verdict.COMPATIBLE: "COMPATIBLE: the target kernel accepts everything the running kernel "
                        "hands over",
    Verdict.INCOMPATIBLE: "INCOMPATIBLE: a live update into this kernel loses or breaks the "
                          "handover (see above); do not kexec into it with preserved state",
    Verdict.UNKNOWN: "NOT PROVEN: some versions could not be determined (see above); treat as "
                     "incompatible until they are",
}


def _row_status(row: CompatRow) -> str:
    if not row.reached:
        return "not reached"
    text = row.verdict.value
    if row.verdict is not Verdict.COMPATIBLE and row.impact is Impact.WARNING:
        text += " (warning)"
    return text


def render(report: CompatReport, images: list[str]) -> str:
    head = ("CONTRACT", "RUNNING", "TARGET", "VERDICT")
    table = [head] + [(r.title, _text(r.running), _text(r.target), _row_status(r))
                      for r in report.rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    lines = [f"running: {report.running.release or 'unknown release'} "
             f"({report.running.source})",
             f"target:  {report.target.release or 'unknown release'} ({report.target.source})",
             *images, ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
              for line in table]
    # Compatible rows keep their notes for --json; the text shows what needs attention.
    # Rows not reached are explained by the row above them that drops the state.
    details = [r for r in report.rows if r.verdict is not Verdict.COMPATIBLE and r.reached]
    if details:
        lines.append("")
    for r in details:
        if r.consequence and r.verdict is Verdict.INCOMPATIBLE:
            lines.append(f"  {r.title}: incompatible: {r.consequence}")
        elif r.consequence:
            lines.append(f"  {r.title}: unknown; on a mismatch {r.consequence}")
        if r.note:
            lines.append(f"  {r.title}: {r.note}")
    if report.notes:
        lines.append("")
        lines += [f"note: {n}" for n in report.notes]
    lines += ["", f"Verdict: {VERDICT_TEXT[report.verdict]}"]
    return "\n".join(lines)


def report_json(report: CompatReport, images: dict[str, ImageInfo | None]) -> dict[str, Any]:
    return {
        "verdict": report.verdict.value,
        "rows": [to_json(r) for r in report.rows],
        "notes": report.notes,
        "running": to_json(report.running),
        "target": to_json(report.target),
        "images": {role: to_json(info) if info else None for role, info in images.items()},
        "findings": [f.to_json() for f in report.findings()],
    }


def run(args: argparse.Namespace) -> int:
    target, target_info = _image_abi(args.kernel, "target")
    running_info: ImageInfo | None
    if args.running_image:
        running, running_info = _image_abi(args.running_image, "running")
    else:
        running, running_info = _running_from_host(args)
    report = compare(running, target)
    if args.json:
        print_json(report_json(report, {"running": running_info, "target": target_info}))
    else:
        images = [line for line in (_image_line("running image", running_info),
                                    _image_line("target image", target_info)) if line]
        print(render(report, images))
    return EXIT_OK if report.verdict is Verdict.COMPATIBLE else EXIT_FINDINGS
