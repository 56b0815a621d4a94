"""The one JSON document `kho-agentctl --json` prints on stdout, for every command and every
error (schema/kho-agentctl-v1.schema.json):

    {"schema": "kho-agent/v1", "command": "prepare", "ok": true, "exit_code": 0,
     "result": {...the command's own document...}, "error": null}

`result` is what the command writes with print_json (its keys are the command's, documented in
the README), or null when it failed before writing one; `error` is null, or the error's
AgentError.to_json(): `error` (the name), `message`, `exit_code`, and `errno`/`errno_name` for a
failed system call. `ok` is `exit_code == 0`: a check that found something (exit 1) has a result
and no error. A command needs nothing to adopt it: main() wraps whatever the command printed.

One command is not over when it has something to say: `inhibit --json` without a COMMAND holds
until it is stopped, and a script must learn that it holds. It prints an envelope when the hold
is taken (`print_now`) and the usual one when it ends; both are then one line each (JSON
lines), so a reader takes the first line as "held" and the second as "released". Every line is
an envelope of the same schema.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any, TextIO

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


class Captured(io.StringIO):
    """stdout while a --json command runs: what the command prints is the result of the
    envelope main() prints at its end. `stream` is the real stdout, for `print_now`; once a
    document went there, `streamed` says that the final envelope goes on one line too."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.streamed = False


def print_now(command: str, result: dict[str, Any]) -> None:
    """An envelope (ok, exit code 0, `result`) on one line of the real stdout, now and flushed:
    for a command that holds until stopped, to say what it holds. main() prints the final
    envelope, also on one line, when the command ends."""
    out = sys.stdout
    stream = out.stream if isinstance(out, Captured) else out
    stream.write(one_line(document(command, 0, json.dumps(result), None)))
    stream.flush()
    if isinstance(out, Captured):
        out.streamed = True


def one_line(doc: dict[str, Any]) -> str:
    """An envelope as one line of JSON lines (no newline inside: json.dumps escapes them)."""
    return json.dumps(doc) + "\n"
