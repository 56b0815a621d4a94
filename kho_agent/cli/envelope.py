"""The one JSON document `kho-agentctl --json` prints on stdout, for every command and every
error (schema/kho-agentctl-v1.schema.json):

    {"schema": "kho-agent/v1", "command": "prepare", "ok": true, "exit_code": 0,
     "result": {...the command's own document...}, "error": null}

`result` is what the command writes with print_json (its keys are the command's, documented in
the README), or null when it failed before writing one; `error` is null, or the error's
AgentError.to_json(): `error` (the name), `message`, `exit_code`, and `errno`/`errno_name` for a
failed system call. `ok` is `exit_code == 0`: a check that found something (exit 1) has a result
and no error. A command needs nothing to adopt it: main() wraps whatever the command printed.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import AgentError

SCHEMA = "kho-agent/v1"


def document(command: str | None, exit_code: int, printed: str,
             error: AgentError | None) -> dict[str, Any]:
    """The envelope around what the command printed (`printed`: its print_json output, or
    nothing). A command that printed anything but one JSON document is a bug: it is reported
    as such instead of being passed on as a result nobody can parse."""
    result: Any = None
    text = printed.strip()
    if text:
        try:
            result = json.loads(text)
        except json.JSONDecodeError:
            bug = AgentError(f"kho-agentctl {command or ''} printed something that is not one "
                             f"JSON document on stdout (a bug): {text[:200]!r}")
            if error is None:
                error, exit_code = bug, bug.exit_code
            result = None
    return {"schema": SCHEMA, "command": command, "ok": exit_code == 0 and error is None,
            "exit_code": exit_code, "result": result,
            "error": error.to_json() if error is not None else None}
