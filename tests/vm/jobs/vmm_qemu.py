#!/usr/bin/python3
"""A real VM manager, run inside the test guest (as the user `vmm`): it runs a QEMU guest whose
RAM is a memfd this manager created, and carries the running VM through a live update.

    vmm_qemu.py launch DIR SESSION RAM_MIB PAYLOAD
        start the manager (`serve`, in the background) and wait until its VM is counting:
        CreateSessionWithOptions(SESSION, digests=false), a memfd of RAM_MIB as guest RAM,
        qemu-system-x86_64 booting PAYLOAD (the counting boot sector) on it
    vmm_qemu.py suspend DIR
        just before the commit: QMP stop, device state saved with x-ignore-shared into a second
        memfd, both memfds preserved in the session (Preserve: the agent records them),
        SetReady; the VM stays paused in its QEMU until the kexec (or `cont` if it fails)
    vmm_qemu.py resume-in-place DIR
        the commit was refused: `cont`, the VM goes on in the old kernel
    vmm_qemu.py resume DIR SESSION PAYLOAD [--keep-running]
        after the kexec: RetrieveSession, RETRIEVE_FD of both, a new QEMU on the retrieved RAM
        with -incoming, restore, `cont`, then FinishSession; the VM must count on from where it
        stopped. --keep-running leaves it running (for cold-save)
    vmm_qemu.py cold-save DIR IMAGE
        the classic alternative: stop the running VM and save it whole (RAM included) to IMAGE
    vmm_qemu.py cold-restore DIR IMAGE RAM_MIB PAYLOAD
        after a cold reboot: a new QEMU restores the VM from IMAGE and goes on

Every command prints one JSON object (and writes it to DIR/<command>.json) with what it saw and
when (CLOCK_REALTIME and CLOCK_MONOTONIC; the test turns realtime into RTC time with the offset
the runner measured in each kernel, so a blackout spans the kexec).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gi.repository import GLib

from kho_agent.client import AgentClient
from kho_agent.digest import default_algorithm, new_hasher
from kho_agent.errors import AgentError

MIB = 1 << 20
RAM_TOKEN = 1
STATE_TOKEN = 2
COUNT_OFFSET = 0x500     # the payload's counter (count.asm), little-endian dword
COUNT_STEP = 1 << 20     # it prints every 2^20 steps
QEMU = "qemu-system-x86_64"


# --- QMP ------------------------------------------------------------------------------------

class Qmp:
    """The smallest QMP client: one command at a time; events are kept, not waited on."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("r")
        self.events: list[dict[str, Any]] = []
        json.loads(self.reader.readline())  # the greeting
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError(f"QMP closed during {name}")
            reply = json.loads(line)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error'].get('desc')}")
            return reply.get("return")

    def wait_migration(self, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.command("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return dict(info)
            time.sleep(0.01)
        raise TimeoutError("migration did not end")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def qemu_argv(directory: Path, ram_fd: int, ram_mib: int, payload: Path, serial: Path,
              incoming: bool) -> list[str]:
    argv = [QEMU, "-accel", "tcg,tb-size=64", "-machine", "pc,memory-backend=ram0",
            "-m", f"{ram_mib}M",
            "-object", f"memory-backend-file,id=ram0,size={ram_mib}M,"
                       f"mem-path=/proc/self/fd/{ram_fd},share=on",
            "-nodefaults", "-nographic", "-monitor", "none", "-serial", f"file:{serial}",
            "-qmp", f"unix:{directory / 'qmp.sock'},server=on,wait=off",
            "-drive", f"file={payload},format=raw,if=floppy,snapshot=on"]
    return argv + (["-incoming", "defer"] if incoming else [])


class QemuProcess:
    """A QEMU this manager started (a child: waited for, never left behind)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.returncode

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            if self.wait(10) is None:
                os.kill(self.pid, signal.SIGKILL)
                self.wait(10)


def spawn_qemu(argv: list[str], ram_fd: int, log: Path) -> QemuProcess:
    """posix_spawn with an empty signal mask: the manager blocks the signals it waits for, and a
    child inherits the mask (a QEMU that ignores SIGTERM would outlive its manager)."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    os.set_inheritable(ram_fd, True)
    try:
        pid = os.posix_spawnp(argv[0], argv, dict(os.environ), file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)], setsigmask=())
    finally:
        os.set_inheritable(ram_fd, False)
        os.close(out)
    return QemuProcess(pid)


# --- the guest's RAM and its count ----------------------------------------------------------

def ram_digest(fd: int) -> str:
    """A digest of the whole guest RAM (the test's proof, timed apart from the blackout)."""
    size = os.fstat(fd).st_size
    # the agent's algorithm on this guest: BLAKE3 where python3-blake3 is installed (sid),
    # SHA-256 where it is not (bookworm)
    digest = new_hasher(default_algorithm(), size)
    for offset in range(0, size, 16 * MIB):
        digest.update(memoryview(os.pread(fd, min(16 * MIB, size - offset), offset)))
    return str(digest.hexdigest())


def fill(fd: int, size: int) -> None:
    """Guest RAM that is in use: non-zero pages everywhere, so that a migration with the RAM
    (the cold path) writes all of it, as it would for a real guest; QEMU sends a zero page as
    a flag. The counting boot sector lives in the first pages and overwrites what it uses."""
    block = os.urandom(4 * MIB)
    for offset in range(0, size, len(block)):
        os.pwrite(fd, block[:size - offset], offset)


def count_in_ram(fd: int) -> int:
    return int.from_bytes(os.pread(fd, 4, COUNT_OFFSET), "little")


def counts(serial: Path) -> list[int]:
    """The complete lines the payload printed (8 hex digits each)."""
    try:
        text = serial.read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.split("\n")[:-1]:  # the last piece may be a line being written
        line = line.strip("\r")
        if len(line) == 8:
            try:
                out.append(int(line, 16))
            except ValueError:
                continue
    return out


def wait_counts(serial: Path, at_least: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    seen = counts(serial)
    while len(seen) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = counts(serial)
    return seen


def stamp() -> dict[str, float]:
    return {"realtime": time.clock_gettime(time.CLOCK_REALTIME),
            "monotonic": time.clock_gettime(time.CLOCK_MONOTONIC)}


# --- the commands ---------------------------------------------------------------------------

def serve(directory: Path, session: str, ram_mib: int, payload: Path) -> int:
    """The manager of one VM, in the old kernel: it lives until the kexec ends it."""
    # `suspend` and `resume-in-place` are signals, and SIGTERM (the shutdown, or the end of a
    # test) ends the VM: all blocked before anyone can send them, and waited for
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2,
                                            signal.SIGTERM})
    agent = AgentClient()
    # no digests: the session comes back as soon as the agent retrieved it (and nothing reads
    # the guest RAM at SetReady)
    _path, live_session = agent.create_session(session, digests=False)  # held until the kexec
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, ram_mib * MIB)
    fill(ram, ram_mib * MIB)
    serial = directory / "serial-1.log"
    qemu = spawn_qemu(qemu_argv(directory, ram, ram_mib, payload, serial, incoming=False),
                      ram, directory / "qemu-1.log")
    qmp = Qmp(directory / "qmp.sock")
    seen = wait_counts(serial, 3, 300)
    report: dict[str, Any] = {"pid": os.getpid(), "qemu_pid": qemu.pid, "counts": len(seen),
                              "qemu_version": qmp.command("query-version")["qemu"],
                              "ok": len(seen) >= 3}
    write(directory, "launch", report)
    if not report["ok"]:
        qemu.terminate()
        return 1
    try:
        if signal.sigwait({signal.SIGUSR1, signal.SIGTERM}) == signal.SIGTERM:
            return 0
        report = suspend(directory, agent, session, qmp, ram)
        write(directory, "suspend", report)
        # the kexec ends this process; SIGUSR2 only if the commit did not happen
        if signal.sigwait({signal.SIGUSR2, signal.SIGTERM}) == signal.SIGTERM:
            return 0
        start = time.monotonic()
        # not ready first: the agent must not commit a session whose VM runs again
        agent.set_ready(session, False)
        qmp.command("cont")
        seen_before = len(counts(serial))
        after = wait_counts(serial, seen_before + 2, 120)
        write(directory, "resume-in-place", {"ok": len(after) >= seen_before + 2,
                                             "cont_s": round(time.monotonic() - start, 3),
                                             "running": stamp()})
        signal.sigwait({signal.SIGTERM})
        return 0
    finally:
        qemu.terminate()
        live_session.close()


def suspend(directory: Path, agent: AgentClient, session: str, qmp: Qmp,
            ram: int) -> dict[str, Any]:
    stopped = stamp()
    qmp.command("stop")
    paused = stamp()
    t = time.monotonic()
    digest = ram_digest(ram)                      # the test's proof, not the manager's work
    digest_s = time.monotonic() - t
    count = count_in_ram(ram)
    state = os.memfd_create("vm-device-state", os.MFD_CLOEXEC)
    t = time.monotonic()
    qmp.command("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
    qmp.command("migrate", uri=f"exec:cat > /proc/{os.getpid()}/fd/{state}")
    migration = qmp.wait_migration()
    migrate_s = time.monotonic() - t
    state_bytes = os.fstat(state).st_size
    t = time.monotonic()
    agent.preserve(session, ram, RAM_TOKEN)
    agent.preserve(session, state, STATE_TOKEN)
    preserve_s = time.monotonic() - t
    t = time.monotonic()
    agent.set_ready(session)
    ready_s = time.monotonic() - t
    os.close(state)
    return {"ok": migration.get("status") == "completed", "stopped": stopped,
            "paused": paused, "ready": stamp(), "ram_digest": digest,
            "ram_bytes": os.fstat(ram).st_size, "count_at_stop": count,
            "digest_s": round(digest_s, 3), "migrate_s": round(migrate_s, 3),
            "migration": migration, "state_bytes": state_bytes,
            "preserve_s": round(preserve_s, 3), "ready_s": round(ready_s, 3)}


def restore_and_cont(qmp: Qmp, uri: str, ram: int, serial: Path,
                     timeout: float) -> dict[str, Any]:
    """A QEMU started with -incoming defer: restore from `uri`, digest the RAM it restored on
    (the test's proof, timed apart), `cont`, and wait for the VM to count on."""
    t = time.monotonic()
    qmp.command("migrate-incoming", uri=uri)
    migration = qmp.wait_migration(timeout)
    while qmp.command("query-status")["status"] == "inmigrate":
        time.sleep(0.01)
    restore_s = time.monotonic() - t
    status = qmp.command("query-status")["status"]
    count = count_in_ram(ram)
    t = time.monotonic()
    digest = ram_digest(ram)
    digest_s = time.monotonic() - t
    qmp.command("cont")
    running = stamp()
    after = wait_counts(serial, 3, 300)
    return {"ok": migration.get("status") == "completed" and len(after) >= 3,
            "running": running, "status_after_restore": status, "count_at_restore": count,
            "count_later": count_in_ram(ram), "ram_digest": digest,
            "restore_s": round(restore_s, 3), "digest_s": round(digest_s, 3),
            "migration": migration}


def resume(directory: Path, session: str, payload: Path, keep_running: bool) -> dict[str, Any]:
    started = stamp()
    agent = AgentClient()
    # right after the kexec the agent may not be on the bus yet, or still retrieving: wait
    live_session = agent.retrieve_session(session, wait_s=300)
    ram = live_session.retrieve_fd(RAM_TOKEN)
    state = live_session.retrieve_fd(STATE_TOKEN)
    retrieved = stamp()
    ram_mib = os.fstat(ram).st_size // MIB
    serial = directory / "serial-2.log"
    qemu = spawn_qemu(qemu_argv(directory, ram, ram_mib, payload, serial, incoming=True),
                      ram, directory / "qemu-2.log")
    qmp = Qmp(directory / "qmp.sock")
    version = qmp.command("query-version")["qemu"]
    qmp.command("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
    restored = restore_and_cont(qmp, f"exec:cat /proc/{os.getpid()}/fd/{state}", ram, serial,
                                timeout=300)
    if keep_running:  # `cold-save` takes it from here, through the QMP socket
        (directory / "qemu.json").write_text(json.dumps({"pid": qemu.pid, "ram_fd": ram}))
    else:
        qmp.command("quit")
        qemu.wait(30)
        qemu.terminate()
    qmp.close()
    # Done with the session: the agent finishes it in the kernel and forgets it (a FINISH
    # through the fd alone would leave the agent listing a session that is gone)
    live_session.close()
    agent.finish_session(session)
    os.close(ram)
    os.close(state)
    return {**restored, "started": started, "retrieved": retrieved, "ram_bytes": ram_mib * MIB,
            "qemu_version": version}


def cold_save(directory: Path, image: Path) -> dict[str, Any]:
    """The classic alternative, before a cold reboot: stop the VM and save it whole (device
    state and all of its RAM) to a file on disk."""
    qmp = Qmp(directory / "qmp.sock")
    stopped = stamp()
    qmp.command("stop")
    # QEMU's guest RAM: the fd number it was given (posix_spawn keeps numbers)
    running = json.loads((directory / "qemu.json").read_text())
    ram = os.open(f"/proc/{running['pid']}/fd/{running['ram_fd']}", os.O_RDONLY | os.O_CLOEXEC)
    t = time.monotonic()
    digest = ram_digest(ram)
    digest_s = time.monotonic() - t
    count = count_in_ram(ram)
    os.close(ram)
    t = time.monotonic()
    # this QEMU was restored with x-ignore-shared: the whole VM goes to disk, its RAM included
    qmp.command("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": False}])
    qmp.command("migrate", uri=f"exec:cat > {image}")
    migration = qmp.wait_migration(1800)
    subprocess.run(["sync", str(image)], check=False)
    save_s = time.monotonic() - t
    qmp.command("quit")
    return {"ok": migration.get("status") == "completed", "stopped": stopped,
            "saved": stamp(), "ram_digest": digest, "count_at_stop": count,
            "image_bytes": image.stat().st_size, "save_s": round(save_s, 3),
            "digest_s": round(digest_s, 3), "migration": migration}


def cold_restore(directory: Path, image: Path, ram_mib: int, payload: Path) -> dict[str, Any]:
    """After the cold reboot: a new QEMU restores the whole VM from the file."""
    started = stamp()
    ram = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, ram_mib * MIB)
    serial = directory / "serial-3.log"
    qemu = spawn_qemu(qemu_argv(directory, ram, ram_mib, payload, serial, incoming=True),
                      ram, directory / "qemu-3.log")
    qmp = Qmp(directory / "qmp.sock")
    restored = restore_and_cont(qmp, f"exec:cat {image}", ram, serial, timeout=1800)
    qmp.command("quit")
    qemu.wait(30)
    qemu.terminate()
    return {**restored, "started": started}


def write(directory: Path, name: str, report: dict[str, Any]) -> None:
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def wait_for(path: Path, timeout: float, pid: int | None = None) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
        time.sleep(0.05)
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    command, directory = argv[1], Path(argv[2])
    try:
        if command == "serve":
            return serve(directory, argv[3], int(argv[4]), Path(argv[5]))
        if command == "launch":
            directory.mkdir(parents=True, exist_ok=True)
            with (directory / "manager.log").open("ab") as log:
                proc = subprocess.Popen([sys.executable, __file__, "serve", *argv[2:6]],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
            (directory / "manager.pid").write_text(str(proc.pid))
            report = wait_for(directory / "launch.json", 600, proc.pid) or \
                {"ok": False, "error": "the manager died: see manager.log"}
        elif command in ("suspend", "resume-in-place"):
            pid = int((directory / "manager.pid").read_text())
            os.kill(pid, signal.SIGUSR1 if command == "suspend" else signal.SIGUSR2)
            report = wait_for(directory / f"{command}.json", 600, pid) or \
                {"ok": False, "error": "the manager died: see manager.log"}
        elif command == "resume":
            directory.mkdir(parents=True, exist_ok=True)
            report = resume(directory, argv[3], Path(argv[4]), "--keep-running" in argv[5:])
            write(directory, "resume", report)
        elif command == "cold-save":
            report = cold_save(directory, Path(argv[3]))
            write(directory, "cold-save", report)
        elif command == "cold-restore":
            directory.mkdir(parents=True, exist_ok=True)
            report = cold_restore(directory, Path(argv[3]), int(argv[4]), Path(argv[5]))
            write(directory, "cold-restore", report)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (GLib.Error, AgentError, OSError, RuntimeError, ValueError) as exc:
        report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        write(directory, f"{command}-error", report)
    print(json.dumps(report))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
