"""`kho-agentctl cancel`: undo a prepare before the commit (a kho-agentd job): the loaded kernel
is unloaded, the sessions are released and the manifest removed; nothing preserved is lost."""

from __future__ import annotations

import argparse

from .jobs import add_job_options, plain_outcome, run_job

HELP = "undo a prepare: unload the kernel, release the sessions (a kho-agentd job)"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 cancelled, 2 cannot run, "
                       "3 refused (nothing to cancel, another job runs).")
    add_job_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_job(args, "cancel", "Cancel", None, plain_outcome)
