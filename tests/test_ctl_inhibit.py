"""`kho-agentctl inhibit -- COMMAND` under repeated stop signals, against a real kho-agentd on
a private bus (the simulated kernel): the hold covers the command until it has ended, however
many times the holder is told to stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from dbusrig import Daemon, PrivateBus, client_env
from test_ctl import bus, daemon, prop, simdir

__all__ = ["bus", "daemon", "simdir"]  # fixtures, imported for pytest

WAIT_S = 10.0

# stands for a migration that finishes its step when told to stop: it says so on each SIGTERM,
# and ends (status 7) once its stdin closes
COMMAND = r"""
import signal, sys
signal.signal(signal.SIGTERM, lambda *_: print("term", flush=True))
print("ready", flush=True)
sys.stdin.read()
sys.exit(7)
"""


def held_by(bus: PrivateBus) -> list[str]:
    return [str(why) for _who, why, *_rest in prop(bus, "Inhibitors")]


def wait_held(bus: PrivateBus, wanted: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while held_by(bus) != wanted:
        assert time.monotonic() < deadline, held_by(bus)
        time.sleep(0.05)


def test_a_second_stop_signal_still_waits_for_the_covered_command(bus: PrivateBus,
                                                                  daemon: Daemon) -> None:
    """The first SIGTERM is passed on to the command and the holder waits for it; a second one
    (a supervisor insisting) used to raise inside that wait: a traceback, the hold released
    while the command still ran, its status lost."""
    holder = subprocess.Popen(
        [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address, "inhibit",
         "--why", "migration", "--", sys.executable, "-c", COMMAND],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=client_env())
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        wait_held(bus, ["migration"])
        holder.send_signal(signal.SIGTERM)
        assert holder.stdout.readline() == "term\n"  # passed on; the command runs on
        holder.send_signal(signal.SIGTERM)
        holder.send_signal(signal.SIGINT)
        assert holder.poll() is None and held_by(bus) == ["migration"]
        holder.stdin.close()  # the command ends its step
        assert holder.wait(WAIT_S) == 7, holder.stderr.read() if holder.stderr else ""
        assert holder.stderr is not None and "Traceback" not in holder.stderr.read()
        assert holder.stdout.read() == ""  # the later stops were not passed on again
        wait_held(bus, [])
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
