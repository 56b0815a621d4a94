"""SSH to a test guest through its forwarded port (tests/vm/qemu.py user_network): the command
lines, one command run, and the options every client of the fleet shares (ssh, Ansible, the
helper scripts tests/vm/fleet.py writes).

The guests are throwaway copies of one image whose host keys every copy shares, on a port of
the host's loopback that the next run gives to another guest: host keys are neither checked nor
remembered (StrictHostKeyChecking=no, UserKnownHostsFile=/dev/null). The key is the image's test
key (tests/vm/rootfs.py make_ssh_access); BatchMode: never a prompt, a refusal is an error.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The options of every connection to a test guest, as `-o` values (Ansible takes the same in
# ansible_ssh_common_args).
COMMON_OPTIONS: tuple[str, ...] = (
    "StrictHostKeyChecking=no",
    "UserKnownHostsFile=/dev/null",
    "IdentitiesOnly=yes",
    "LogLevel=ERROR",
)
# Waiting for a guest under TCG: a connection QEMU accepted but the guest's sshd does not yet
# answer is given this long before ssh gives up (the caller polls again).
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class SshTarget:
    """Where a guest's sshd answers on the host and who logs in."""

    port: int
    key: Path
    host: str = "127.0.0.1"
    user: str = "root"

    def options(self) -> list[str]:
        """The client options (without the command): key, port, no host-key checks."""
        out = ["-i", str(self.key), "-p", str(self.port), "-o", "BatchMode=yes",
               "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
        for option in COMMON_OPTIONS:
            out += ["-o", option]
        return out

    def banner(self, timeout_s: float = 2.0) -> str | None:
        """The server's identification line (``SSH-2.0-...``) if sshd answers within
        ``timeout_s``, else None: a cheap probe to poll with while a guest boots (QEMU accepts
        the connection at once and resets or stalls it until the guest's sshd listens)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
                line = sock.recv(256).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError:  # refused, reset or timed out: not yet
            return None
        return line if line.startswith("SSH-") else None

    def argv(self, command: str) -> list[str]:
        """``ssh ... user@host command``: ``command`` is run by the guest's login shell."""
        return ["ssh", *self.options(), f"{self.user}@{self.host}", command]

    def run(self, command: str, *, timeout_s: float = 120.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the guest; its output as text. A hung connection after
        ``timeout_s`` is a CompletedProcess with returncode 255 and the reason in stderr (what
        ssh itself returns when it cannot connect), so callers test one thing."""
        argv = self.argv(command)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(argv, 255, "",
                                               f"ssh gave no answer within {timeout_s:.0f} s")
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def script(self) -> str:
        """A shell script that logs in to the guest (or runs its arguments there)."""
        return ("#!/bin/sh\n# written by tests/vm/fleet.py: ssh to one guest of the fleet\n"
                f"exec {shlex.join(['ssh', *self.options(), f'{self.user}@{self.host}'])} "
                '"$@"\n')
