"""`kho-agentctl kernels`: which installed kernels a live update could go into.

The kernel install hook (/etc/kernel/postinst.d/zz-kho-agent, run by Debian's kernel packages
with the version and the image path) runs `kernels --record VERSION --image PATH`: the image is
compared with the running kernel as `compat` does (read only: nothing is loaded, no kexec) and
the result is kept in STATE_DIR/kernels/VERSION.json. The postrm.d hook runs `--forget
VERSION`. Without either option the records are listed.

The state directory is /var/lib/kho-agent, or $KHO_AGENT_STATE_DIR, or --state-dir.
Exit 0 when the record was written, removed or listed; 2 when it could not be.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import AgentError, InvalidArgument, NotFound, StateCorrupt
from ..kernel.atomicfile import write_atomic
from ..kernel.debugfs import DEFAULT_DEBUGFS
from .common import EXIT_OK, print_json

HELP = "record or list whether a live update into each installed kernel is possible"
STATE_DIR_ENV = "KHO_AGENT_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/kho-agent"
RECORDS = "kernels"
RECORD_SCHEMA = 1
# A kernel release as packages name it (uname -r): one path component, no dot file
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_-]{0,199}")
MAX_RECORD = 256 << 10      # a record is a few KiB; anything bigger is not one of ours
MAX_RECORDS = 1000          # listing stops there: a directory of junk is not read whole
MAX_IMAGE = 1 << 30         # digested up to here; a kernel image is tens of MiB


def state_dir_default() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ": the kernel install hook records "
                       "each kernel package's image (compared with the running kernel as "
                       "`compat` does, nothing loaded), and this lists the records. State "
                       f"directory: --state-dir, else ${STATE_DIR_ENV}, else "
                       f"{DEFAULT_STATE_DIR}.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--record", metavar="VERSION",
                      help="check the image of kernel VERSION and record the result (the "
                           "postinst.d hook)")
    what.add_argument("--forget", metavar="VERSION",
                      help="remove the record of kernel VERSION (the postrm.d hook)")
    p.add_argument("--image", metavar="IMAGE",
                   help="with --record: the kernel image (default /boot/vmlinuz-VERSION)")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help=f"the state directory (default ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debugfs", default=DEFAULT_DEBUGFS, help=argparse.SUPPRESS)
    p.add_argument("--boot-dir", default="/boot", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


@dataclass
class KernelRecord:
    """What the hook found about one installed kernel."""

    version: str
    image: str
    image_size: int | None
    image_mtime: float | None
    image_sha256: str | None
    verdict: str            # compatible, incompatible, unknown (not proven), error (not checked)
    compatible: bool
    reasons: list[str]      # what is not compatible, or what could not be checked
    notes: list[str]        # what the comparison noted besides (where versions came from)
    running_release: str
    checked_at: str
    schema: int = RECORD_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def checked_version(text: str) -> str:
    if not _VERSION.fullmatch(text):
        raise InvalidArgument(f"{text!r} is not a kernel version (letters, digits and . + ~ _ -, "
                              "at most 200, not starting with a dot)")
    return text


def records_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or state_dir_default()) / RECORDS


def _digest(path: str) -> tuple[int, float, str]:
    """(size, mtime, sha256) of a regular file, read through one descriptor (bounded)."""
    from ..digest import SHA256, digest_fd
    from ..kernel.callerfile import open_regular

    with open_regular(path, "kernel image", max_size=MAX_IMAGE) as image:
        digest = digest_fd(image.fd, alg=SHA256)
        return digest.size, image.identity.mtime_ns / 1e9, digest.hexdigest


def _check(args: argparse.Namespace, image: str) -> tuple[str, list[str], list[str]]:
    """(verdict, reasons, notes) of a live update from the running kernel into `image`. Nothing it
    could not read is an error of the command: the record says what was not known."""
    from ..abi.compat import Verdict, compare
    from ..abi.errors import AbiError
    from ..kernel.debugfs import DebugfsError
    from ..kernel.image import ImageError
    from .compat import _image_abi, _running_from_host

    try:
        target, _ = _image_abi(image, "target")
    except (ImageError, AbiError, OSError) as exc:
        return "error", [f"the image cannot be read as a kernel: {exc}"], []
    try:
        running, _ = _running_from_host(args)
    except (DebugfsError, ImageError, AbiError, OSError) as exc:
        return "unknown", [f"the running kernel's handover state is not known: {exc}"], []
    report = compare(running, target)
    reasons = [f"{row.title}: {row.verdict.value}"
               + (f": {row.consequence}" if row.consequence else "")
               + (f" ({row.note})" if row.note else "")
               for row in report.rows if row.verdict is not Verdict.COMPATIBLE and row.reached]
    return report.verdict.value, reasons, list(report.notes)


def record(args: argparse.Namespace) -> KernelRecord:
    version = checked_version(args.record)
    image = args.image or os.path.join(args.boot_dir, f"vmlinuz-{version}")
    size: int | None = None
    mtime: float | None = None
    sha256: str | None = None
    notes: list[str] = []
    try:
        size, mtime, sha256 = _digest(image)
    except AgentError as exc:  # missing, not a regular file, too large, unreadable, changing
        verdict, reasons = "error", [f"the image cannot be read: {exc}"]
    else:
        verdict, reasons, notes = _check(args, image)
    return KernelRecord(version, image, size, mtime, sha256, verdict, verdict == "compatible",
                        reasons, notes, os.uname().release,
                        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record at `path`; None when it went away since it was listed (a --forget). A link
    is not followed: the records are the hook's files, not links to anyone's."""
    from ..engine.phase import read_back

    data = read_back(path, "kernel record", MAX_RECORD, follow_symlinks=False)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateCorrupt(f"{path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str):
        raise StateCorrupt(f"{path} is not a kernel record")
    return doc


def list_records(directory: Path) -> list[dict[str, Any]]:
    """The records, by version; one that cannot be read is listed as such (error key)."""
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".json")
                       and not name.startswith("."))[:MAX_RECORDS]
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            doc = _read_record(directory / name)
        except StateCorrupt as exc:
            found.append({"version": name.removesuffix(".json"), "error": str(exc)})
        else:
            if doc is not None:
                found.append(doc)
    return found


def _line(doc: dict[str, Any]) -> str:
    if "error" in doc:
        return f"{doc['version']}: unreadable record: {doc['error']}"
    head = (f"{doc.get('version')}: {doc.get('verdict')} (checked {doc.get('checked_at')} "
            f"from {doc.get('running_release')}; {doc.get('image')})")
    reasons = doc.get("reasons") or []
    return "\n".join([head, *(f"  {r}" for r in reasons if isinstance(r, str))])


def run(args: argparse.Namespace) -> int:
    directory = records_dir(args)
    if args.image and not args.record:
        raise InvalidArgument("--image goes with --record VERSION")
    if args.record:
        found = record(args)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(directory / f"{found.version}.json",
                     (json.dumps(found.to_json(), indent=2) + "\n").encode())
        if args.json:
            print_json(found.to_json())
        else:
            print(_line(found.to_json()))
        return EXIT_OK
    if args.forget:
        path = directory / f"{checked_version(args.forget)}.json"
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise NotFound(f"no record of kernel {args.forget} in {directory}") from None
        if args.json:
            print_json({"version": args.forget, "removed": True})
        else:
            print(f"{args.forget}: record removed")
        return EXIT_OK
    docs = list_records(directory)
    if args.json:
        print_json({"kernels": docs})
    elif not docs:
        print(f"no kernel recorded in {directory} (the kernel install hook records each "
              "kernel package installed)")
    else:
        print("\n".join(_line(doc) for doc in docs))
    return EXIT_OK
