"""Daemon benchmarks on a private dbus-daemon with kho-agentd --simulate: a property Get round trip
and a Preflight call beside org.freedesktop.DBus.GetId on the same bus (the floor), as ratios; the
daemon's idle RSS; the wall time of `kho-agentctl status` (a cold process).

    .venv/bin/python benchmarks/bench_daemon.py [--calls 2000]

Targets (issue 4): Get within 3x of the floor, idle RSS under 60 MiB, status under 250 ms.
Figures are printed, not asserted.
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

from kho_agent.sim import SimAbi, SimKernel  # noqa: E402


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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
            idle = rss_mib(daemon.pid)
            floor = per_call(lambda: client.call(DBUS_PATH, DBUS_IFACE, "GetId",
                                                 dest=DBUS_NAME), args.calls)
            get = per_call(lambda: client.get_property(MANAGER_PATH, MANAGER_IFACE, "State"),
                           args.calls)
            options = GLib.Variant("(a{sv})", ({"kernel": GLib.Variant("s", str(target))},))
            preflight = per_call(lambda: client.call(MANAGER_PATH, MANAGER_IFACE, "Preflight",
                                                     options), max(20, args.calls // 50))
            status_times = []
            ctl = [sys.executable, "-m", "kho_agent.cli", "--bus-address", bus.address,
                   "status"]
            for _ in range(5):
                t = time.perf_counter()
                done = subprocess.run(ctl, cwd=REPO, capture_output=True, text=True,
                                      check=False)
                status_times.append(time.perf_counter() - t)
            after = rss_mib(daemon.pid)
    print(f"{'call':<34} {'median':>10} {'p99':>10} {'x floor':>8}")
    for label, (med, p99) in (("org.freedesktop.DBus.GetId (floor)", floor),
                              ("Get Manager.State", get), ("Preflight (simulated host)",
                                                           preflight)):
        print(f"{label:<34} {med * 1e6:>8.0f}us {p99 * 1e6:>8.0f}us {med / floor[0]:>7.1f}x")
    ratio = get[0] / floor[0]
    print(f"Get within 3x of the floor: {'PASS' if ratio <= 3 else 'MISS'} ({ratio:.1f}x)")
    print(f"daemon RSS idle {idle:.1f} MiB, after the calls {after:.1f} MiB: "
          f"{'PASS' if idle < 60 else 'MISS'} (target < 60 MiB)")
    if done.returncode == 0:
        best = min(status_times)
        print(f"kho-agentctl status wall time: best {best * 1000:.0f} ms, median "
              f"{statistics.median(status_times) * 1000:.0f} ms of 5: "
              f"{'PASS' if best < 0.25 else 'MISS'} (target < 250 ms)")
    else:
        print(f"kho-agentctl status failed ({done.returncode}): {done.stderr.strip()[:300]}")
    print(f"(python {sys.version.split()[0]}; {args.calls} calls; private bus; simulated host)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
