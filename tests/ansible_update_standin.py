"""A STAND-IN for `kho-agentctl update`, used by tests/test_ansible.py ONLY to try the rolling
playbook's control flow while the real command (issue 16, section 1: the host side) is written
on another branch. When both land, the test points `rolling_update_ctl` at the real kho-agentctl
and this file goes.

    python ansible_update_standin.py --bus-address ADDR update [--check] --json
    python ansible_update_standin.py --bus-address ADDR ARGS...    (the real kho-agentctl)

`update` does, with the real kho-agentctl, the steps the real command is specified to take,
without the waiting and the refusals it adds: the target is the daemon's Target= (what
`prepare --dry-run` resolves); it is "up-to-date" when its release, read from the image's file
name (vmlinuz-RELEASE, as the test names them), is the running one; a dry run with a blocker is
PreflightFailed; otherwise prepare, then commit (a refusal cancels). It prints one envelope as
`kho-agentctl --json` does (kho_agent/cli/envelope.py), with the result keys of the interface.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

EXIT_REFUSED = 3


def ctl(address: str, *argv: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "kho_agent.cli", "--bus-address", address,
                           *argv, "--json"], capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    return done.returncode, json.loads(done.stdout)


def envelope(result: dict[str, Any] | None, error: dict[str, Any] | None,
             exit_code: int) -> int:
    print(json.dumps({"schema": "kho-agent/v1", "command": "update", "ok": exit_code == 0,
                      "exit_code": exit_code, "result": result, "error": error}, indent=2))
    return exit_code


def update(address: str, check: bool) -> int:
    _, status = ctl(address, "status")
    props = status["result"]["properties"]
    running = props["RunningKernel"]
    code, dry = ctl(address, "prepare", "--dry-run")
    if dry["error"] is not None:
        return envelope(None, dry["error"], code)
    plan = dry["result"]["result"]
    kernel = str(plan["kernel"])
    release = os.path.basename(kernel).removeprefix("vmlinuz-")
    result: dict[str, Any] = {
        "running": {"release": running, "version": ""},
        "target": {"kernel": kernel, "initrd": plan.get("initrd"), "release": release,
                   "version": ""},
        "live_update_number": props["LiveUpdateNumber"], "preflight": plan["preflight"],
        "waited_ready_s": 0.0}
    if release == running:
        return envelope({**result, "outcome": "up-to-date"}, None, 0)
    if plan["preflight"]["verdict"] == "blocker":
        blockers = [c["message"] for c in plan["preflight"]["checks"] if c["tier"] == "blocker"]
        return envelope(None, {"error": "PreflightFailed", "exit_code": EXIT_REFUSED,
                               "message": "; ".join(blockers)}, EXIT_REFUSED)
    if check:
        return envelope({**result, "outcome": "would-update"}, None, 0)
    code, prepared = ctl(address, "prepare")
    if prepared["error"] is not None:
        return envelope(None, prepared["error"], code)
    code, committed = ctl(address, "commit")
    if committed["error"] is not None:
        ctl(address, "cancel")
        return envelope(None, committed["error"], code)
    return envelope({**result, "outcome": "committing"}, None, 0)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "--bus-address" and argv[2] == "update":
        return update(argv[1], "--check" in argv[3:])
    return subprocess.run([sys.executable, "-m", "kho_agent.cli", *argv], check=False,
                          stdin=subprocess.DEVNULL).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
