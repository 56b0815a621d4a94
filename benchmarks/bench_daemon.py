"""Daemon figures on a private dbus-daemon with kho-agentd --simulate, as ratios to floors
measured in the same run (benchmarks/README.md).

    .venv/bin/python benchmarks/bench_daemon.py [--calls 2000]

    Get Manager.State         median round trip, over org.freedesktop.DBus.GetId on the same bus
                              answered by the bus daemon itself (target: within 3x, issue 4)
    Preflight                 informational: its work (reading the host, decoding the target
                              image) has no bare counterpart on the bus
    kho-agentctl status       a cold process, best of 5, over a bare python3 that imports Gio,
                              connects to the bus and calls GetId (the least a Python client does)
    daemon RSS, idle          over the RSS of that bare python3 + Gio, connected and idle

Exit status: 0 when every target ratio is met, 1 when one is missed, 2 when `status` fails.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dbusrig import (  # noqa: E402
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    MANAGER_IFACE,
    MANAGER_PATH,
    Daemon,
    GioClient,
    PrivateBus,
)
from gi.repository import GLib  # noqa: E402
from ratios import (  # noqa: E402
    EXIT_BROKEN,
    Ratio,
    exit_status,
    fmt_mib,
    print_table,
)

from kho_agent.sim import SimAbi, SimKernel  # noqa: E402

GET_TARGET = 3.0      # issue 4
STATUS_TARGET = 2.5   # kho-agentctl status over a bare python3 + Gio GetId
RSS_TARGET = 2.0      # the idle daemon over a bare python3 + Gio on the bus
STATUS_RUNS = 5

# The floor client: a bare python3 that imports Gio, connects to the bus and asks the bus daemon
# its id; with "idle", it then waits (for its RSS to be read) until its stdin closes.
BARE_CLIENT = """
import sys
from gi.repository import Gio
flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
         | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
bus = Gio.DBusConnection.new_for_address_sync(sys.argv[1], flags, None, None)
bus.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId",
              None, None, Gio.DBusCallFlags.NONE, -1, None)
if sys.argv[2:] == ["idle"]:
    print("ready", flush=True)
    sys.stdin.read()
"""


def per_call(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(median, p99) seconds per call."""
    for _ in range(min(50, calls)):  # warm up
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def rss_bytes(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return float("nan")


def cold_runs(argv: list[str], runs: int) -> tuple[list[float], subprocess.CompletedProcess[str]]:
    times = []
    done = None
    for _ in range(runs):
        t = time.perf_counter()
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t)
        if done.returncode:
            break
    assert done is not None
    return times, done


def bare_client_rss(address: str) -> float:
    with subprocess.Popen([sys.executable, "-c", BARE_CLIENT, address, "idle"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.5)  # as long as the daemon is given to settle
        rss = rss_bytes(proc.pid)
        proc.stdin.close()
    return rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kho-bench-daemon-") as tmp:
        root = Path(tmp)
        sim = SimKernel.create(root / "sim")
        target = sim.write_kernel_image(root / "vmlinuz-next", release="7.3.1-sim",
                                        abi=SimAbi())
        with PrivateBus() as bus, Daemon(bus.address, root / "sim", root / "state") as daemon, \
                GioClient(bus.address) as client:
            time.sleep(0.5)  # let the start-up refresh settle before measuring idle
            idle = rss_bytes(daemon.pid)
            bare_rss = bare_client_rss(bus.address)
            floor = per_call(lambda: client.call(DBUS_PATH, DBUS_IFACE, "GetId",
                                                 dest=DBUS_NAME), args.calls)
            get = per_call(lambda: client.get_property(MANAGER_PATH, MANAGER_IFACE, "State"),
                           args.calls)
            options = GLib.Variant("(a{sv})", ({"kernel": GLib.Variant("s", str(target))},))
            preflight = per_call(lambda: client.call(MANAGER_PATH, MANAGER_IFACE, "Preflight",
                                                     options), max(20, args.calls // 50))
            ctl = [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address,
                   "status"]
            bare = [sys.executable, "-c", BARE_CLIENT, bus.address]
            status_times: list[float] = []
            bare_times: list[float] = []
            for _ in range(STATUS_RUNS):  # alternating, so that load hits both alike
                times, done = cold_runs(ctl, 1)
                status_times += times
                if done.returncode:
                    print(f"kho-agentctl status failed ({done.returncode}): "
                          f"{done.stderr.strip()[:300]}", file=sys.stderr)
                    return EXIT_BROKEN
                times, done = cold_runs(bare, 1)
                bare_times += times
                if done.returncode:
                    print(f"the bare client failed: {done.stderr.strip()[:300]}", file=sys.stderr)
                    return EXIT_BROKEN
            after = rss_bytes(daemon.pid)
    print(f"{'call':<34} {'median':>10} {'p99':>10} {'x floor':>8}")
    for label, (med, p99) in (("org.freedesktop.DBus.GetId (floor)", floor),
                              ("Get Manager.State", get), ("Preflight (simulated host)",
                                                           preflight)):
        print(f"{label:<34} {med * 1e6:>8.0f}us {p99 * 1e6:>8.0f}us {med / floor[0]:>7.1f}x")
    print(f"kho-agentctl status: {', '.join(f'{t * 1e3:.0f}' for t in status_times)} ms; "
          f"bare python3 + Gio GetId: {', '.join(f'{t * 1e3:.0f}' for t in bare_times)} ms")
    print(f"daemon RSS idle {fmt_mib(idle)}, after the calls {fmt_mib(after)}; bare python3 + Gio "
          f"on the bus {fmt_mib(bare_rss)}\n")
    times = [
        Ratio("Get Manager.State (median)", get[0], "GetId on the same bus", floor[0],
              GET_TARGET),
        Ratio("Preflight (median)", preflight[0], "GetId on the same bus", floor[0], None),
        Ratio("kho-agentctl status (best of 5)", min(status_times), "bare python3 + Gio GetId",
              min(bare_times), STATUS_TARGET),
    ]
    memory = [Ratio("daemon RSS, idle", idle, "bare python3 + Gio, idle", bare_rss, RSS_TARGET)]
    print_table(times)
    print()
    print_table(memory, fmt_mib)
    print(f"(python {sys.version.split()[0]}; {args.calls} calls; private bus; simulated host)")
    return exit_status(times + memory)


if __name__ == "__main__":
    raise SystemExit(main())
