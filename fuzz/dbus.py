#!/usr/bin/env python3
"""Fuzz kho-agentd's D-Bus surface for as long as asked (the library is tests/dbusfuzz.py).

    .venv/bin/python fuzz/dbus.py [--calls N] [--seed S] [--batch B] [--commits K]
                                  [--call-timeout SECONDS] [--job-timeout SECONDS]
                                  [--trace FILE] [--summary FILE] [--daemon-source DIR] [--quiet]

Starts its own private system bus (with the shipped policy and a polkit stand-in), a simulated
host and kho-agentd on them, and clients as root, a polkit-authorized uid and nobody; sends N
generated calls (default 5000), checks the daemon's invariants every B calls, and prints the
counts and every distinct finding with its reproduction (seed, call index, the call and the ones
before it). Findings are also printed as they happen unless --quiet. --trace writes every call
and its answer as JSON lines; --summary writes the report as JSON. --daemon-source runs the
daemon (and reads the contract) from another tree, e.g. `git archive HEAD | tar -x -C DIR`.

Needs root (the clients of other uids are started with setpriv). Exit 0: no finding; 1: findings;
2: the fuzzer could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# fuzz/ must not shadow modules by this file's name (dbus): the library lives in tests/
sys.path[0] = str(REPO / "tests")
sys.path.insert(1, str(REPO))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fuzz/dbus.py", description=__doc__.splitlines()[0]
                                if __doc__ else None)
    p.add_argument("--calls", type=int, default=5000, help="calls to send (default 5000)")
    p.add_argument("--seed", type=int, default=1, help="the generator's seed (default 1)")
    p.add_argument("--batch", type=int, default=25,
                   help="calls between invariant checks (default 25)")
    p.add_argument("--commits", type=int, default=None,
                   help="real commits (simulated kexecs) at most (default calls/400)")
    p.add_argument("--call-timeout", type=float, default=5.0,
                   help="an answer later than this is a hang (default 5 s)")
    p.add_argument("--job-timeout", type=float, default=10.0,
                   help="a job or transient State lasting longer is stuck (default 10 s)")
    p.add_argument("--trace", type=Path, help="write every call and answer here (JSON lines)")
    p.add_argument("--summary", type=Path, help="write the report here as JSON")
    p.add_argument("--daemon-source", type=Path, help="run the daemon from this tree")
    p.add_argument("--quiet", action="store_true", help="no findings while running")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.daemon_source is not None:
        # the simulated kernel the fuzzer creates must be the one that tree's daemon runs on
        sys.path.insert(1, str(args.daemon_source.resolve()))
    from dbusfuzz import FuzzerError, run_fuzz
    from dbusrig import RigError

    if os.geteuid() != 0:
        print("fuzz/dbus.py: run it as root (it starts clients as other uids)", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    try:
        report = run_fuzz(args.calls, args.seed, batch=args.batch, commits=args.commits,
                          call_timeout=args.call_timeout, log=log, trace=args.trace,
                          daemon_source=args.daemon_source, job_timeout=args.job_timeout)
    except (FuzzerError, RigError) as exc:
        print(f"fuzz/dbus.py: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    if args.summary:
        args.summary.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
