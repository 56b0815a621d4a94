"""kho-agentctl --json's stdout, read as its consumers should: exactly one envelope
(schema/kho-agentctl-v1.schema.json, checked here with jsonschema), whose `result` is the
command's document and whose `error` the failure's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "kho-agentctl-v1.schema.json"
_VALIDATOR = Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def envelope(stdout: str) -> dict[str, Any]:
    """The one JSON document on stdout, valid against the schema (AssertionError if not)."""
    doc = json.loads(stdout)  # one document: json.loads refuses anything after it
    problems = sorted(f"{e.json_path}: {e.message}" for e in _VALIDATOR.iter_errors(doc))
    assert problems == [], (problems, stdout[:2000])
    assert isinstance(doc, dict)
    return doc


def cli_json(stdout: str) -> Any:
    """The command's document, or on failure the error's (`error`, `message`, `exit_code`)."""
    doc = envelope(stdout)
    return doc["result"] if doc["error"] is None else doc["error"]
