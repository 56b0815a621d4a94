#!/usr/bin/python3
"""A VM manager that keeps its fds in its own unit's fd store, systemd's native way, run inside
the test guest as kho-test-keeper.service (written by run.py: User=vmm, Type=notify,
FileDescriptorStorePreserve=yes).

    keeper.py OUT_DIR

It writes OUT_DIR/keeper-<boot id>.json on every start, and ends its start (READY=1) after.
Started with no session of its own anywhere (the first boot) it puts two things in its fd store:
  - `plain`: a memfd with known content, which systemd-shutdown (>= 261) preserves in its own
    session `systemd`;
  - `session`: the fd of session `keeper-1`, created through kho-agent with the option
    `fd_store` (so the agent leaves it to this store), with a memfd preserved in it through the
    agent (Preserve, so the agent records and digests it), set ready.
Started again after the update it takes its session from where it came back: from its fd store
(LISTEN_FDS; hand-off mode fdstore; it then hands the session fd to the agent, which checks
what it recorded of it: CheckKeptSession) or, when the store came back empty (mode direct:
systemd carried no store), from the agent (RetrieveSession); and it checks every byte it finds. The
report says where each thing came from and `ok`; the process then stays (a manager keeps
running).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kho_agent.client import AgentClient, session_from_fd
from kho_agent.errors import AgentError, NotFound
from kho_agent.kernel.liveupdate import LiveUpdateSession
from systemd import daemon

SESSION = "keeper-1"
PLAIN_SIZE = 1 << 20
GUEST_SIZE = 4 << 20
TOKEN = 1


def content(label: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{label} {counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def memfd_with(label: str, size: int) -> int:
    fd = os.memfd_create(label, os.MFD_CLOEXEC)
    os.write(fd, content(label, size))
    return fd


def read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def store(fd: int, name: str) -> None:
    # FDPOLL=0: a LUO session fd cannot be polled; the barrier makes sure systemd has taken the
    # fds before the caller goes on (or closes its own)
    sent = daemon.notify(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", fds=[fd])
    if not sent:
        raise RuntimeError(f"FDSTORE of {name} was not delivered")


def start(report: dict[str, Any]) -> None:
    plain = memfd_with("plain", PLAIN_SIZE)
    store(plain, "plain")
    client = AgentClient()
    # fd_store: this session's fd goes to our own fd store, so the agent must not park it in
    # its store too (systemd hands a session to one store only)
    _path, session = client.create_session(SESSION, digests=True, fd_store=True)
    guest = memfd_with("guest", GUEST_SIZE)
    client.preserve(SESSION, guest, TOKEN)
    client.set_ready(SESSION)
    store(session.fileno(), "session")
    report["stored"] = ["plain", "session"]
    report["ok"] = True


def listened() -> dict[str, int]:
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    return {names[i] if i < len(names) else f"fd{i}": 3 + i for i in range(count)}


def check_session(session_fd: int, checks: dict[str, Any]) -> None:
    checks["session_link"] = os.readlink(f"/proc/self/fd/{session_fd}")
    session = session_from_fd(session_fd, SESSION, incoming=True)
    guest = session.retrieve_fd(TOKEN)
    checks["session"] = read_all(guest) == content("guest", GUEST_SIZE)
    os.close(guest)
    # the manager keeps its session (and its fd in the store) for as long as its VM runs


def resume_from_store(report: dict[str, Any], fds: dict[str, int]) -> None:
    checks: dict[str, Any] = {}
    if "plain" in fds:
        checks["plain"] = read_all(fds["plain"]) == content("plain", PLAIN_SIZE)
    agent_ok = False
    if "session" in fds:
        check_session(fds["session"], checks)
        # and the agent checks what it recorded of it, through the fd handed in
        agent_ok, items = AgentClient().check_kept_session(SESSION, fds["session"])
        report["agent_check"] = {"ok": agent_ok, "items": items}
    report["checks"] = checks
    report["ok"] = checks.get("plain") is True and checks.get("session") is True and agent_ok


def resume_from_agent(report: dict[str, Any], session: LiveUpdateSession) -> None:
    checks: dict[str, Any] = {}
    check_session(session.fileno(), checks)
    report["checks"] = checks
    report["ok"] = checks.get("session") is True


def main() -> int:
    out = Path(sys.argv[1])
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    fds = listened()
    report: dict[str, Any] = {"ok": False, "pid": os.getpid(), "started": time.time(),
                              "listened": sorted(fds)}
    try:
        if fds:
            report["resumed_from"] = "fd store"
            resume_from_store(report, fds)
        else:
            client = AgentClient()
            try:
                session = client.retrieve_session(SESSION, wait_s=300)
            except NotFound:   # nothing came back anywhere: a first start
                report["resumed_from"] = None
                start(report)
            else:
                report["resumed_from"] = "agent"
                resume_from_agent(report, session)
    except (AgentError, OSError, RuntimeError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    (out / f"keeper-{boot_id}.json").write_text(json.dumps(report, indent=1))
    daemon.notify("READY=1")
    while True:  # a manager keeps running; the unit is stopped at shutdown
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
