"""kho-agentd: the D-Bus daemon. It is built in the daemon issue (#4); until then it says so."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    del argv
    print("kho-agentd: the daemon (D-Bus service, session delegation) is not built yet; "
          "use kho-agentctl decode/check/compat", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
