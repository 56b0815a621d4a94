"""`kho-agentctl preflight`: can this host live-update (into that kernel)?

Tiered like `criu check`: ok / warning / blocker per check, with the fix for each. Exit 0 no
blocker, 1 at least one blocker, 2 could not run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..kernel.host import real_host
from ..orchestrator import EngineConfig, Orchestrator
from ..preflight import Tier, render
from .common import EXIT_FINDINGS, EXIT_OK, print_json

HELP = "check whether this host can live-update, with a tiered verdict"
DEFAULT_STATE_DIR = Path("/var/lib/kho-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 no blocker, 1 blockers, "
                       "2 could not run.")
    p.add_argument("--kernel", type=Path, metavar="IMAGE", help="target kernel image")
    p.add_argument("--initrd", type=Path, metavar="FILE", help="target initrd")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    host = real_host(args.root)
    # Preflight reads; it never writes state, so the state directory is not touched.
    agent = Orchestrator(host, EngineConfig(state_dir=DEFAULT_STATE_DIR))
    result = agent.gather_preflight(args.kernel, args.initrd)
    if args.json:
        print_json(result.to_json())
    else:
        print(render(result))
    return EXIT_FINDINGS if result.verdict is Tier.BLOCKER else EXIT_OK
