"""`kho-agentctl rehearse`: a whole live-update cycle on the simulated kernel.

preflight -> prepare (sessions with memfds of known content) -> commit -> simulated kexec ->
verify, with a readable report or --json. Runs on any machine (no KHO kernel needed). Exit 0 when
every step holds, 1 when the rehearsal found a problem, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ..rehearsal import FAULTS, rehearse, render
from ..sim import SimAbi
from .common import EXIT_FINDINGS, EXIT_OK, CliError, print_json

HELP = "rehearse a whole live update on the simulated kernel"
TARGET_ABIS = {"same": SimAbi(), "old": SimAbi(kho="kho-v3", luo="luo-v1", memfd="memfd-v1")}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 every step held, 1 a "
                       "problem was found, 2 could not run.")
    p.add_argument("--dir", type=Path, metavar="DIR",
                   help="keep the simulated host here (default: a temporary directory, removed "
                   "afterwards unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--sessions", type=int, default=3, metavar="N",
                   help="client sessions, each with three memfds (default 3)")
    p.add_argument("--fault", choices=sorted(FAULTS), help="inject a fault into the simulated "
                   "kernel to see how the agent reacts")
    p.add_argument("--target-abi", choices=sorted(TARGET_ABIS), default="same",
                   help="ABI of the target kernel: 'same' as the running one, or 'old' "
                   "(kho-v3/luo-v1/memfd-v1: an incompatible target that prepare must refuse)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.sessions < 0 or args.sessions > 10_000:
        raise CliError("--sessions must be 0..10000")
    if args.dir is not None and args.dir.exists() and not args.dir.is_dir():
        raise CliError(f"--dir {args.dir} exists and is not a directory; give a directory (it "
                       "is created when absent)")
    temp = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="kho-rehearsal-")) if temp else args.dir
    target = TARGET_ABIS[args.target_abi]
    try:
        result = rehearse(directory, sessions=args.sessions, fault=args.fault, target_abi=target)
    finally:
        if temp and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print_json(result.to_json())
    else:
        print(render(result))
    return EXIT_OK if result.ok else EXIT_FINDINGS
