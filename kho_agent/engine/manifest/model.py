"""The manifest: what a live update is expected to carry (the records), written before the
kexec and checked after it.

It is written in two places (design decision 2): atomically on disk in the state directory, and
as a sealed memfd preserved at token 0 of the agent's own LUO session, so that verification after
the reboot does not depend on the disk. codec.py turns it into JSON and back (validating
everything), compare.py lines it up with what a new boot observed.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1
MANIFEST_TOKEN = 0
AGENT_SESSION = "kho-agent"

# F_SEAL_* (include/uapi/linux/fcntl.h)
F_SEAL_SEAL = 0x01
F_SEAL_SHRINK = 0x02
F_SEAL_GROW = 0x04
F_SEAL_WRITE = 0x08
F_SEAL_FUTURE_WRITE = 0x10
F_SEAL_EXEC = 0x20
# The manifest memfd cannot change, but may still be sealed further: F_SEAL_SEAL is left out on
# purpose (see the platform notes on seals and restored memfds).
MANIFEST_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
# A memfd restored with F_SEAL_EXEC and an executable mode gets the write seals added by the
# kernel when the seals are re-applied (0x20 comes back as 0x3e; platform notes).
EXEC_IMPLIED_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE

# --- records ------------------------------------------------------------------------------------

@dataclass
class FileEntry:
    token: int
    size: int
    digest: str | None          # hex; None when digests are off for the session
    digest_alg: str | None      # "blake3"
    digest_seconds: float | None
    seals: int | None


@dataclass
class SessionEntry:
    name: str
    owner: str                  # "uid:1000" (service/auth.py, Caller.owner) or "rehearsal"
    files: list[FileEntry]
    ready: bool
    digests: bool               # per-session opt-in
    # The owner keeps the session fd in its own service's fd store (hand-off mode fdstore):
    # systemd hands the session to that service after the kexec, not to the agent, which then
    # does not retrieve it. Written only when true (older manifests have no such field).
    owner_fd_store: bool = False


@dataclass
class SubtreeEntry:
    name: str
    size: int | None
    compatible: str | None


@dataclass
class Manifest:
    schema: int
    created: str                # ISO 8601 UTC
    host: str
    release_from: str
    release_to: str
    boot_id_from: str
    # contract key (abi/compat.py) -> version spoken: {"kho-root": "kho-v4", "luo": "luo-v5",
    # "handler:memfd": "memfd-v2", "memblock": "memblock-v1", ...}
    abi_from: dict[str, str]
    abi_to: dict[str, str]
    cmdline_to: str
    # {"areas": [{"role", "phys", "size"}], "kho_scratch": the kho_scratch= in effect or None,
    #  "recommended": the kho_scratch= the scratch plan recommends or None}
    scratch: dict[str, object]
    liveupdate_number_from: int | None
    liveupdate_number_expected: int | None
    sessions: list[SessionEntry]
    subtrees: list[SubtreeEntry]
    network: dict[str, object] | None   # NetState.to_json()
    final: bool                 # False at prepare, True at commit
