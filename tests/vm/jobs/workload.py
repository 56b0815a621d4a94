#!/usr/bin/python3
"""A VM manager stand-in, run inside the test guest (as the user `vmm`): it keeps "guest memory"
in memfds across a live update through kho-agent, and proves afterwards that every byte came
back.

    workload.py preserve SESSION OUT.json [BIG_MIB]
                                            before the update: CreateSession over D-Bus, memfds
                                            with known content, half preserved straight into
                                            the session fd (PRESERVE_FD ioctl), half through the
                                            agent (Preserve, so the agent digests them), ready
    workload.py check SESSION OUT.json [BIG_MIB]
                                            after the update: RetrieveSession, RETRIEVE_FD of
                                            every token, every byte compared, FINISH

The content is a function of (token, offset), so the check recomputes it instead of trusting a
file written before the reboot. Each command writes a JSON report to OUT.json and exits 0 only
if everything held.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from gi.repository import GLib

from kho_agent.client import AgentClient
from kho_agent.errors import AgentError

PAGE = 4096
MIB = 1 << 20

# token -> (size, the offsets of the pages that are written; None: every page), how preserved
FILES: dict[int, tuple[int, list[int] | None, str]] = {
    1: (PAGE, None, "ioctl"),
    2: (PAGE, None, "agent"),
    3: (PAGE, None, "ioctl"),
    4: (4 * MIB + 123, [0, 200 * PAGE, 4 * MIB], "ioctl"),   # sparse, odd size
    5: (256 * MIB, None, "agent"),                            # the big one
}
BIG_TOKEN = 5


def block(token: int, offset: int, length: int) -> bytes:
    """The content at `offset`: each 4 KiB page starts with its token and offset, then a byte
    pattern of both; so a page in the wrong place, or from another file, shows."""
    out = bytearray()
    pos = offset
    while len(out) < length:
        page = pos // PAGE
        head = f"token {token} page {page} ".encode()
        fill = bytes([(token * 31 + page) & 0xFF]) * (PAGE - len(head))
        chunk = head + fill
        start = pos % PAGE
        take = min(PAGE - start, length - len(out))
        out += chunk[start:start + take]
        pos += take
    return bytes(out)


def expected(token: int) -> tuple[int, str]:
    """(size, sha256 of the whole file as the reader sees it, holes as zeros)."""
    size, pages, _how = FILES[token]
    digest = hashlib.sha256()
    written = set(range(0, size, PAGE)) if pages is None else {p for p in pages if p < size}
    for offset in range(0, size, MIB):
        length = min(MIB, size - offset)
        buf = bytearray(length)
        for page in range(offset, offset + length, PAGE):
            if page in written:
                n = min(PAGE, size - page)
                buf[page - offset:page - offset + n] = block(token, page, n)
        digest.update(buf)
    return size, digest.hexdigest()


def make_memfd(token: int) -> int:
    size, pages, _how = FILES[token]
    fd = os.memfd_create(f"guest-ram-{token}", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    offsets = range(0, size, PAGE) if pages is None else [p for p in pages if p < size]
    if pages is None:
        for offset in range(0, size, MIB):
            os.pwrite(fd, block(token, offset, min(MIB, size - offset)), offset)
    else:
        for offset in offsets:
            os.pwrite(fd, block(token, offset, min(PAGE, size - offset)), offset)
    return fd


def file_hash(fd: int) -> tuple[int, str]:
    size = os.fstat(fd).st_size
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(MIB, size - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return size, digest.hexdigest()


def preserve(name: str) -> dict[str, object]:
    agent = AgentClient()
    path, session = agent.create_session(name)
    report: dict[str, object] = {"session": name, "path": path, "files": {}}
    files: dict[str, object] = {}
    for token, (_size, _pages, how) in FILES.items():
        start = time.monotonic()
        fd = make_memfd(token)
        written = time.monotonic() - start
        if how == "ioctl":
            session.preserve_fd(fd, token)
        else:
            agent.preserve(name, fd, token)
        files[str(token)] = {"how": how, "size": os.fstat(fd).st_size,
                             "write_s": round(written, 3),
                             "preserve_s": round(time.monotonic() - start - written, 3)}
        os.close(fd)
    report["files"] = files
    start = time.monotonic()
    agent.set_ready(name)
    report["ready_s"] = round(time.monotonic() - start, 3)
    # The agent keeps its own reference to the session until the kexec: this one may go.
    session.close()
    report["ok"] = True
    return report


def check(name: str) -> dict[str, object]:
    session = AgentClient().retrieve_session(name, wait_s=120)
    files: dict[str, object] = {}
    ok = True
    for token in FILES:
        want_size, want_hash = expected(token)
        try:
            fd = session.retrieve_fd(token)
        except AgentError as exc:  # one lost file: report it, check the others
            files[str(token)] = {"ok": False, "error": f"{exc.name}: {exc.message}"}
            ok = False
            continue
        size, digest = file_hash(fd)
        os.close(fd)
        good = size == want_size and digest == want_hash
        ok = ok and good
        files[str(token)] = {"ok": good, "size": size, "want_size": want_size,
                             "sha256": digest, "want_sha256": want_hash}
    session.finish()
    session.close()
    return {"session": name, "files": files, "ok": ok,
            "bytes_checked": sum(FILES[t][0] for t in FILES)}


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5) or argv[1] not in ("preserve", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    command, name, out = argv[1:4]
    if len(argv) == 5:  # the big file's size in MiB (both commands must be given the same)
        _size, pages, how = FILES[BIG_TOKEN]
        FILES[BIG_TOKEN] = (int(argv[4]) * MIB, pages, how)
    try:
        report = preserve(name) if command == "preserve" else check(name)
    except GLib.Error as exc:
        report = {"ok": False, "error": f"D-Bus: {exc.message}"}
    except AgentError as exc:
        report = {"ok": False, "error": f"{exc.name}: {exc.message}"}
    except OSError as exc:
        report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({"workload": command, "ok": report.get("ok"),
                      "error": report.get("error")}))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
