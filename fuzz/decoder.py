#!/usr/bin/env python3
"""Coverage-guided fuzzing of the KHO/LUO decoder with atheris (libFuzzer for Python).

    python fuzz/decoder.py [libFuzzer flags] CORPUS_DIR...   fuzz (see fuzz/run-decoder)
    python fuzz/decoder.py CRASH_FILE                          replay one input

Every module under kho_agent.abi and kho_agent.kernel.physmem is instrumented (bytecode edges
and comparisons); the harness and the standard library are not, so coverage counts only decoder
code. The targets, the input format and the oracle are in harness.py.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["kho_agent.abi", "kho_agent.kernel.physmem"]):
    import harness


def test_one_input(data: bytes) -> None:
    harness.run_one(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
