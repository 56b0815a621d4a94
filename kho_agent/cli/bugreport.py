"""`kho-agentctl report`: one JSON file with what a bug report needs.

One document, not an archive: it is read with any JSON tool, attached to an issue as it is, and
every part says whether it was collected or why not. It holds the version, the kernel release
and command line, kho-agentd's status (over D-Bus when it answers, else the error saying why
not), the preflight report, the agent's state files (state.json, manifest.json,
last-verify.json, the kernel records), the KHO debugfs files, the unit's recent journal and the
configuration files. None of these hold secrets (no keys, tokens or passwords are kept by the
agent); the manifest names the preserving processes and their files, which the reader of the
report sees.

Every file is read bounded, opened without following a symbolic link, and only if it is a
regular file; the commands it runs have a timeout. It works without a daemon. The report is
written atomically, mode 0600 (the journal lines may name other services).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..about import known_formats, package_version
from ..engine.history import HISTORY_FILE
from ..engine.phase import LAST_VERIFY_FILE, MANIFEST_FILE, STATE_FILE
from ..errors import errno_text
from ..kernel.atomicfile import write_atomic
from ..kernel.debugfs import DEFAULT_DEBUGFS
from .bus import add_bus_options
from .common import EXIT_OK, print_json
from .kernels import DEFAULT_STATE_DIR, STATE_DIR_ENV, state_dir_default

HELP = "write one file (JSON) with what a bug report needs"
REPORT_SCHEMA = 1
DEFAULT_CONFIG_DIR = "/etc/kho-agent"
# the engine's own names for them (the report must follow a rename)
STATE_FILES = (STATE_FILE, MANIFEST_FILE, LAST_VERIFY_FILE, HISTORY_FILE)
MAX_TEXT_FILE = 1 << 20         # one state or configuration file
MAX_BINARY_FILE = 256 << 10     # one debugfs blob (an FDT is a few KiB)
MAX_FILES = 200                 # per directory walked
MAX_DEBUGFS_TOTAL = 4 << 20     # all debugfs blobs together
MAX_COMMAND_OUTPUT = 2 << 20    # what a command run here may add
COMMAND_TIMEOUT = 20.0          # seconds, per command run here
JOURNAL_LINES = 500
NO_SECRETS = ("kho-agent keeps no secrets: its state, manifest, verification records, kernel "
              "records and configuration hold no keys, tokens or passwords; the manifest names "
              "the processes that preserve memory and their files")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ": version, kernel, kho-agentd's "
                       "status, preflight, the state files, the KHO debugfs state, the unit's "
                       "journal and the configuration; written atomically, mode 0600. Works "
                       "without a daemon.")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="where to write it (default kho-agent-report-HOST-TIME.json here); "
                        "- for standard output")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help=f"the agent's state directory (default ${STATE_DIR_ENV} or "
                        f"{DEFAULT_STATE_DIR})")
    p.add_argument("--config-dir", metavar="DIR", default=DEFAULT_CONFIG_DIR,
                   help=f"the configuration directory (default {DEFAULT_CONFIG_DIR})")
    p.add_argument("--no-journal", action="store_true", help="leave the journal out")
    p.add_argument("--json", action="store_true",
                   help="say where the report went as JSON (the report itself is JSON already)")
    p.add_argument("--debugfs", default=DEFAULT_DEBUGFS, help=argparse.SUPPRESS)
    add_bus_options(p)
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class FileRead:
    """One file as the report holds it: its text (or base64 for binary), or why not."""

    path: str
    size: int | None = None
    text: str | None = None
    base64: str | None = None
    sha256: str | None = None
    truncated: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None and v is not False}


def _why(exc: OSError) -> str:
    return errno_text(exc.errno) if exc.errno is not None else str(exc)


def read_file(path: Path, limit: int, *, binary: bool = False) -> FileRead:
    """A regular file, read through one descriptor opened without following a link and without
    blocking (a FIFO is refused, not waited on), at most `limit` bytes of it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return FileRead(str(path), error="a symbolic link: not followed")
        return FileRead(str(path), error=_why(exc))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return FileRead(str(path), error="not a regular file: not read")
        chunks: list[bytes] = []
        remaining = limit + 1
        while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 16))):
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        return FileRead(str(path), error=_why(exc))
    finally:
        os.close(fd)
    data = b"".join(chunks)
    truncated = len(data) > limit
    data = data[:limit]
    if not binary:
        try:
            return FileRead(str(path), st.st_size, text=data.decode(), truncated=truncated)
        except UnicodeDecodeError:
            pass  # kept as bytes below
    return FileRead(str(path), st.st_size, base64=base64.b64encode(data).decode(),
                    sha256=hashlib.sha256(data).hexdigest(), truncated=truncated)


def _regular_names(directory: Path) -> tuple[list[Path], str | None]:
    """The entries of a directory (sorted, at most MAX_FILES), or why it cannot be listed."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return [], _why(exc)
    try:
        names = sorted(os.listdir(fd))
    finally:
        os.close(fd)
    return [directory / name for name in names[:MAX_FILES]], None


def state_files(state_dir: Path) -> dict[str, Any]:
    files = [read_file(state_dir / name, MAX_TEXT_FILE).to_json() for name in STATE_FILES]
    kernels, error = _regular_names(state_dir / "kernels")
    listing, listing_error = _regular_names(state_dir)
    return {"path": str(state_dir),
            "entries": [p.name for p in listing] if listing_error is None else listing_error,
            "files": files,
            "kernels": [read_file(p, MAX_TEXT_FILE).to_json() for p in kernels
                        if p.name.endswith(".json")] if error is None else error}


def debugfs_files(debugfs: Path) -> dict[str, Any]:
    """The files under DEBUGFS/kho (out, in, their sub_fdts), bounded in count and bytes."""
    root = debugfs / "kho"
    found: list[dict[str, Any]] = []
    total = 0
    pending = [root]
    while pending and len(found) < MAX_FILES:
        directory = pending.pop(0)
        entries, error = _regular_names(directory)
        if error is not None:
            found.append({"path": str(directory), "error": error})
            continue
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                pending.append(path)
                continue
            if total >= MAX_DEBUGFS_TOTAL:
                found.append({"path": str(path), "error": "left out: the report's debugfs "
                              f"budget ({MAX_DEBUGFS_TOTAL} bytes) is spent"})
                continue
            read = read_file(path, min(MAX_BINARY_FILE, MAX_DEBUGFS_TOTAL - total), binary=True)
            total += read.size or 0
            found.append(read.to_json())
    return {"path": str(root), "files": found}


def config_files(config_dir: Path) -> dict[str, Any]:
    files = [read_file(config_dir / "agent.conf", MAX_TEXT_FILE).to_json()]
    dropins, error = _regular_names(config_dir / "agent.conf.d")
    files += [read_file(p, MAX_TEXT_FILE).to_json() for p in dropins]
    return {"path": str(config_dir), "files": files,
            **({"drop_ins": error} if error is not None else {})}


def run_command(argv: list[str]) -> dict[str, Any]:
    """A command's exit code and output (bounded), or why it did not run."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return {"command": argv, "error": f"{argv[0]} is not installed"}
    except subprocess.TimeoutExpired:
        return {"command": argv, "error": f"no answer within {COMMAND_TIMEOUT:g} s"}
    except OSError as exc:
        return {"command": argv, "error": str(exc)}
    result: dict[str, Any] = {"command": argv, "exit_code": done.returncode}
    for name, data in (("stdout", done.stdout), ("stderr", done.stderr)):
        text = data[:MAX_COMMAND_OUTPUT].decode(errors="replace")
        try:
            result[name] = json.loads(text) if name == "stdout" and text.startswith("{") \
                else text
        except json.JSONDecodeError:
            result[name] = text
        if len(data) > MAX_COMMAND_OUTPUT:
            result[f"{name}_truncated"] = True
    return result


def _ctl(args: argparse.Namespace, *words: str) -> list[str]:
    bus = (["--bus-address", args.bus_address] if getattr(args, "bus_address", None)
           else ["--bus", args.bus] if getattr(args, "bus", None) else [])
    return [sys.executable, "-m", "kho_agent.cli", *words, *bus]


def _first_line(path: str) -> str | None:
    read = read_file(Path(path), 64 << 10)
    return read.text.strip() if read.text is not None else read.error


def collect(args: argparse.Namespace) -> dict[str, Any]:
    uname = os.uname()
    journal: dict[str, Any]
    if args.no_journal:
        journal = {"error": "left out (--no-journal)"}
    elif shutil.which("journalctl") is None:
        journal = {"error": "journalctl is not installed"}
    else:
        journal = run_command(["journalctl", "-u", "kho-agent", "-n", str(JOURNAL_LINES),
                               "--no-pager", "-o", "short-iso"])
    status = run_command(_ctl(args, "status", "--json"))
    status["daemon"] = ("answered" if status.get("exit_code") == 0
                        else "did not answer: the error is in stdout/stderr")
    return {
        "schema": REPORT_SCHEMA,
        "kind": "kho-agent-report",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "secrets": NO_SECRETS,
        "version": {"package": package_version(), "formats": known_formats(),
                    "python": sys.version.split()[0]},
        "host": {"hostname": socket.gethostname(), "kernel_release": uname.release,
                 "kernel_version": uname.version, "machine": uname.machine,
                 "cmdline": _first_line("/proc/cmdline")},
        "status": status,
        "preflight": run_command(_ctl(args, "preflight", "--json")),
        "state": state_files(Path(args.state_dir or state_dir_default())),
        "kho_debugfs": debugfs_files(Path(args.debugfs)),
        "journal": journal,
        "config": config_files(Path(args.config_dir)),
    }


def default_output() -> Path:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"kho-agent-report-{socket.gethostname()}-{when}.json")


def run(args: argparse.Namespace) -> int:
    collected = collect(args)
    if args.output == "-" and args.json:
        print_json(collected)  # in the envelope, as every --json document
        return EXIT_OK
    document = json.dumps(collected, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(document)
        return EXIT_OK
    output = Path(args.output) if args.output else default_output()
    write_atomic(output, document.encode(), mode=0o600)
    if args.json:
        print_json({"written": str(output), "bytes": len(document)})
    else:
        print(f"wrote {output} ({len(document)} bytes); attach it to the bug report")
    return EXIT_OK
