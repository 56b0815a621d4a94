"""`kho-agentctl inhibit --why TEXT [--who NAME] [-- COMMAND...]`: hold live-update commits off,
as `systemd-inhibit` holds shutdowns off. kho-agentd hands out an inhibitor fd (Inhibit()); the
commits stay refused (Inhibited, exit 3) while it is open. With a COMMAND, the inhibitor lasts
while the command runs and the exit status is the command's; without one, until Ctrl-C or
SIGTERM (exit 0). If this process dies, the kernel closes the fd and the inhibitor goes with it:
it never outlives its holder. `kho-agentctl status` lists who holds what.

With --json and no COMMAND it prints two envelopes, one line each: `{"inhibiting": {"who",
"why"}, "state": "held"}` as soon as the hold is taken, and the same with "released" when it
ends (a refused hold prints the one error envelope)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from gi.repository import GLib

from ..errors import InvalidArgument
from ..service import contract
from ..service import interfaces as api
from . import envelope
from .bus import AgentClient
from .common import EXIT_OK, print_json
from .jobs import add_common_options
from .stops import StopRequests

HELP = "hold live-update commits off while a command runs, or until interrupted"
JSON_LINES = ("With --json and no COMMAND: one JSON line (an envelope whose result has state "
              "'held') as soon as the hold is taken, and a second ('released') when it ends.")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Prepare and cancel are not held. "
                       + JSON_LINES)
    add_common_options(p)
    p.add_argument("--why", required=True, help="why (shown to whoever tries to commit)")
    p.add_argument("--who", default="", help="who holds it (default: your uid)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="run this and release when it exits")
    p.set_defaults(run=run)


def take(client: AgentClient, who: str, why: str) -> int:
    """An inhibitor fd from kho-agentd (the caller closes it to release)."""
    declared = contract.MANAGER.method("Inhibit")
    interactive = sys.stdin is not None and sys.stdin.isatty()
    (_index,), fds = client.call(api.MANAGER_PATH, api.MANAGER_IFACE, "Inhibit",
                                 GLib.Variant(declared.in_type, (who, why)),
                                 reply_type=declared.out_type, interactive=interactive)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise InvalidArgument(f"kho-agentd answered Inhibit with {len(fds)} fds, not one")
    return fds[0]


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    with AgentClient.from_args(args) as client:
        fd = take(client, args.who, args.why)
    try:
        held = {"who": args.who or f"uid {os.getuid()}", "why": args.why}
        # SIGTERM (a supervisor, timeout(1)) or SIGINT releases the hold only after the
        # command it covers has ended: the command gets it too, and is waited for
        with StopRequests() as stops:
            if command:
                return run_covered(command, stops)
            if args.json:
                # a script learns that it holds now, not at release (envelope.py: two lines)
                envelope.print_now("inhibit", {"inhibiting": held, "state": "held"})
            else:
                print(f"holding live-update commits off ({held['who']}: {args.why}); "
                      "Ctrl-C to release", flush=True)
            while stops.requested is None:
                stops.wait()
        if args.json:   # the second line: the hold is released as this process exits
            print_json({"inhibiting": held, "state": "released"})
        return EXIT_OK
    finally:
        os.close(fd)


def run_covered(command: list[str], stops: StopRequests) -> int:
    """Run the command under the hold; its exit status. The first stop request is passed on
    to it (SIGTERM) and it is waited for still: the hold covers it until it has ended; later
    requests change nothing (it has been told, and a Ctrl-C reaches it from the terminal)."""
    # the command does not inherit the inhibitor fd (O_CLOEXEC): the hold is this process's
    child = subprocess.Popen(command)
    pidfd = os.pidfd_open(child.pid)   # readable once it has exited
    try:
        told = False
        while child.poll() is None:
            if stops.requested is not None and not told:
                child.terminate()
                told = True
            stops.wait([pidfd])
        return child.returncode
    finally:
        os.close(pidfd)
