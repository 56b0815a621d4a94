"""The manifest, in three parts: the records (model.py), their JSON form and files (codec.py),
and the check of what came back after the kexec (compare.py). The names the rest of the agent
uses are re-exported here."""

from .codec import (
    MANIFEST_MAX_BYTES,
    ManifestCorrupt,
    manifest_from_fd,
    manifest_from_json,
    manifest_memfd,
    manifest_to_json,
    read_manifest,
)
from .compare import (
    FAILING_VERDICTS,
    Observation,
    ObservedFile,
    ObservedSession,
    Verdict,
    VerifyItem,
    VerifyReport,
    check_session,
    compare_manifest,
)
from .model import (
    AGENT_SESSION,
    MANIFEST_TOKEN,
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    SessionEntry,
    SubtreeEntry,
)

__all__ = [
    "AGENT_SESSION", "FAILING_VERDICTS", "MANIFEST_MAX_BYTES", "MANIFEST_TOKEN", "SCHEMA_VERSION",
    "FileEntry", "Manifest", "ManifestCorrupt", "Observation", "ObservedFile", "ObservedSession",
    "SessionEntry", "SubtreeEntry", "Verdict", "VerifyItem", "VerifyReport", "check_session",
    "compare_manifest", "manifest_from_fd", "manifest_from_json", "manifest_memfd",
    "manifest_to_json", "read_manifest",
]
