"""The check of what came back: `compare_manifest()` lines the manifest up with an
`Observation` gathered on the new boot and gives a verdict per item: proof that this boot came
through the live update (design decision 3), ABI, sessions, tokens, sizes, digests, seals, KHO
subtrees and the network. Pure: the observation is gathered elsewhere (verifyrun.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ...netstate import NetStateFormatError
from ...netstate import diff as netstate_diff
from .model import (
    AGENT_SESSION,
    EXEC_IMPLIED_SEALS,
    F_SEAL_EXEC,
    MANIFEST_TOKEN,
    FileEntry,
    Manifest,
    SessionEntry,
    SubtreeEntry,
)

# --- observation and verification --------------------------------------------------------------

@dataclass
class ObservedFile:
    token: int
    size: int
    digest: str | None          # same algorithm as the manifest's entry
    seals: int | None
    error: str | None           # RETRIEVE_FD failed: why


@dataclass
class ObservedSession:
    name: str
    files: list[ObservedFile] | None    # None: could not retrieve (error says why)
    error: str | None


@dataclass
class Observation:
    boot_id: str
    release: str
    kho_boot: bool                       # incoming KHO FDT present
    liveupdate_number: int | None
    previous_release: str | None         # from kexec-metadata
    abi: dict[str, str]
    sessions: list[ObservedSession]
    subtrees: list[SubtreeEntry]
    network: dict[str, object] | None
    disk_manifest_matches_memfd: bool | None


class Verdict(enum.Enum):
    OK = "ok"
    MISMATCH = "mismatch"       # present, but differs from what was recorded
    MISSING = "missing"         # recorded, not found after the update
    EXTRA = "extra"             # found, not recorded (information)
    UNCHECKED = "unchecked"     # could not or need not be compared (information)
    FAILED = "failed"           # a proof did not hold, or something could not be retrieved


FAILING_VERDICTS = frozenset({Verdict.MISMATCH, Verdict.MISSING, Verdict.FAILED})


@dataclass
class VerifyItem:
    kind: str       # proof, abi, manifest, session, file, file-size, file-digest, file-seals,
                    # subtree, subtree-size, subtree-compatible, network
    name: str
    verdict: Verdict
    expected: object
    observed: object
    detail: str


@dataclass
class VerifyReport:
    items: list[VerifyItem]
    ok: bool          # no MISMATCH, MISSING or FAILED item

    def failures(self) -> list[VerifyItem]:
        return [item for item in self.items if item.verdict in FAILING_VERDICTS]

    def to_json(self) -> dict[str, object]:
        counts = {v.value: 0 for v in Verdict}
        for item in self.items:
            counts[item.verdict.value] += 1
        return {
            "ok": self.ok,
            "counts": counts,
            "items": [{"kind": i.kind, "name": i.name, "verdict": i.verdict.value,
                       "expected": i.expected, "observed": i.observed, "detail": i.detail}
                      for i in self.items],
        }


def _seals_text(seals: int) -> str:
    return f"0x{seals:x}"


class _Report:
    def __init__(self) -> None:
        self.items: list[VerifyItem] = []

    def add(self, kind: str, name: str, verdict: Verdict, expected: object, observed: object,
            detail: str) -> None:
        self.items.append(VerifyItem(kind, name, verdict, expected, observed, detail))


def _check_proof(m: Manifest, obs: Observation, r: _Report) -> None:
    if obs.boot_id != m.boot_id_from:
        r.add("proof", "boot_id", Verdict.OK, f"not {m.boot_id_from}", obs.boot_id,
              "This is a new boot: the boot id changed since the manifest was written.")
    else:
        r.add("proof", "boot_id", Verdict.FAILED, f"not {m.boot_id_from}", obs.boot_id,
              "The boot id is the one recorded at prepare: this host has not rebooted since. "
              "Run verify after the live update.")
    if obs.kho_boot:
        r.add("proof", "kho_boot", Verdict.OK, True, True,
              "This boot came through KHO: the previous kernel's handover was found.")
    else:
        r.add("proof", "kho_boot", Verdict.FAILED, True, False,
              "This boot did not come through KHO: no incoming handover was found (a cold "
              "reboot, a kexec loaded without kexec_file_load, or the new kernel rejected the "
              "handover). Preserved memory and sessions did not survive.")

    expected_n, observed_n = m.liveupdate_number_expected, obs.liveupdate_number
    if expected_n is None:
        r.add("proof", "liveupdate_number", Verdict.UNCHECKED, None, observed_n,
              "No liveupdate number was recorded at prepare, so it cannot be compared.")
    elif observed_n is None:
        r.add("proof", "liveupdate_number", Verdict.UNCHECKED, expected_n, None,
              "The liveupdate number of this boot could not be read (the kernel only logs it "
              "at boot: 'luo: Retrieved live update data, liveupdate number: N').")
    elif observed_n == expected_n:
        r.add("proof", "liveupdate_number", Verdict.OK, expected_n, observed_n,
              f"The liveupdate number is {observed_n}, as expected after this live update.")
    else:
        r.add("proof", "liveupdate_number", Verdict.MISMATCH, expected_n, observed_n,
              f"The liveupdate number is {observed_n}, not the expected {expected_n}: this boot "
              "is not the one that follows the recorded live update (another kexec happened "
              "in between, or the LUO state was not carried).")

    if obs.previous_release is None:
        r.add("proof", "previous_release", Verdict.UNCHECKED, m.release_from, None,
              "The previous kernel's release could not be read from the kexec metadata.")
    elif obs.previous_release == m.release_from:
        r.add("proof", "previous_release", Verdict.OK, m.release_from, obs.previous_release,
              f"The kexec metadata names {obs.previous_release} as the previous kernel, the "
              "one the manifest was written on.")
    else:
        r.add("proof", "previous_release", Verdict.MISMATCH, m.release_from,
              obs.previous_release,
              f"The kexec metadata names {obs.previous_release} as the previous kernel, but "
              f"the manifest was written on {m.release_from}: another kernel ran in between.")

    if obs.release == m.release_to:
        r.add("proof", "release", Verdict.OK, m.release_to, obs.release,
              f"The running kernel is {obs.release}, the target recorded at prepare.")
    else:
        r.add("proof", "release", Verdict.MISMATCH, m.release_to, obs.release,
              f"The running kernel is {obs.release}, not the target {m.release_to} recorded "
              "at prepare: a different kernel was booted.")


def _check_abi(m: Manifest, obs: Observation, r: _Report) -> None:
    for contract in sorted(m.abi_to):
        want = m.abi_to[contract]
        have = obs.abi.get(contract)
        if have is None:
            r.add("abi", contract, Verdict.UNCHECKED, want, None,
                  f"The {contract} ABI version of the running kernel could not be determined; "
                  f"{want} was expected.")
        elif have == want:
            r.add("abi", contract, Verdict.OK, want, have,
                  f"The running kernel speaks {have} for {contract}, as predicted at prepare.")
        else:
            r.add("abi", contract, Verdict.MISMATCH, want, have,
                  f"The running kernel speaks {have} for {contract}, but {want} was predicted "
                  "at prepare: the booted kernel is not the one that was checked.")
    for contract in sorted(set(obs.abi) - set(m.abi_to)):
        r.add("abi", contract, Verdict.EXTRA, None, obs.abi[contract],
              f"The running kernel also speaks {obs.abi[contract]} ({contract}), which the "
              "manifest did not record.")


def _check_seals(label: str, want: int | None, have: int | None, r: _Report) -> None:
    if want is None or have is None:
        r.add("file-seals", label, Verdict.UNCHECKED, want, have,
              f"Seals of {label} were not recorded on both sides, so they were not compared.")
    elif want == have:
        r.add("file-seals", label, Verdict.OK, want, have,
              f"Seals of {label} are {_seals_text(have)}, as before.")
    elif want & F_SEAL_EXEC and have == want | EXEC_IMPLIED_SEALS:
        r.add("file-seals", label, Verdict.OK, want, have,
              f"Seals of {label} came back as {_seals_text(have)} instead of "
              f"{_seals_text(want)}: the kernel adds the write seals when it restores a memfd "
              "sealed with F_SEAL_EXEC (MFD_NOEXEC_SEAL). Expected kernel behaviour, but the "
              "restored file can no longer be written or mapped writable.")
    else:
        r.add("file-seals", label, Verdict.MISMATCH, want, have,
              f"Seals of {label} are {_seals_text(have)}, not {_seals_text(want)} as "
              "recorded: the file's write or size protection changed across the update.")


def _check_file(session: SessionEntry, entry: FileEntry, got: ObservedFile | None,
                r: _Report) -> None:
    label = f"{session.name}/{entry.token}"
    if got is None:
        r.add("file", label, Verdict.MISSING, entry.size, None,
              f"Token {entry.token} of session {session.name} did not come back: its "
              f"{entry.size} bytes are lost.")
        return
    if got.error is not None:
        r.add("file", label, Verdict.FAILED, entry.size, None,
              f"Token {entry.token} of session {session.name} could not be retrieved: "
              f"{got.error}.")
        return
    r.add("file", label, Verdict.OK, "present", "present",
          f"Token {entry.token} of session {session.name} was retrieved.")
    if got.size == entry.size:
        r.add("file-size", label, Verdict.OK, entry.size, got.size,
              f"{label} is {got.size} bytes, as before.")
    else:
        r.add("file-size", label, Verdict.MISMATCH, entry.size, got.size,
              f"{label} is {got.size} bytes, but {entry.size} were preserved.")
    if entry.digest is None or got.digest is None:
        if not session.digests:
            why = "digests are off for this session"
        elif entry.digest is None:
            why = "no digest was taken before the update"
        else:
            why = "no digest was taken after the update"
        r.add("file-digest", label, Verdict.UNCHECKED, entry.digest, got.digest,
              f"Content of {label} was not compared: {why}.")
    elif entry.digest == got.digest:
        r.add("file-digest", label, Verdict.OK, entry.digest, got.digest,
              f"Content of {label} is identical ({entry.digest_alg} digest matches).")
    else:
        r.add("file-digest", label, Verdict.MISMATCH, entry.digest, got.digest,
              f"Content of {label} differs from what was preserved ({entry.digest_alg} "
              "digest mismatch): the data changed after the digest was taken, or was "
              "corrupted in the handover.")
    _check_seals(label, entry.seals, got.seals, r)


def _check_session(entry: SessionEntry, got: ObservedSession | None, r: _Report) -> None:
    count = len(entry.files)
    if got is None and entry.owner_fd_store:
        r.add("session", entry.name, Verdict.UNCHECKED, count, None,
              f"Session {entry.name} ({count} files, owner {entry.owner}) is kept in its "
              "owner's fd store: systemd hands it to the owner's service after the update, "
              "the agent does not retrieve or check it.")
        return
    if got is None:
        r.add("session", entry.name, Verdict.MISSING, count, None,
              f"Session {entry.name} ({count} files, owner {entry.owner}) did not come back "
              "after the update.")
        return
    if got.files is None:
        why = got.error or "no reason given"
        r.add("session", entry.name, Verdict.FAILED, count, None,
              f"Session {entry.name} could not be retrieved: {why}.")
        return
    r.add("session", entry.name, Verdict.OK, count, len(got.files),
          f"Session {entry.name} was retrieved.")
    by_token = {f.token: f for f in got.files}
    for item in entry.files:
        _check_file(entry, item, by_token.get(item.token), r)
    recorded = {f.token for f in entry.files}
    for extra in got.files:
        if extra.token not in recorded:
            r.add("file", f"{entry.name}/{extra.token}", Verdict.EXTRA, None, extra.size,
                  f"Session {entry.name} holds token {extra.token}, which the manifest did not "
                  "record.")


def check_session(entry: SessionEntry, got: ObservedSession) -> list[VerifyItem]:
    """The items of one recorded session against what was read of it (a session its owner kept
    in its own fd store and handed in after the update). Pure."""
    report = _Report()
    _check_session(entry, got, report)
    return report.items


def _check_agent_session(got: ObservedSession, r: _Report) -> None:
    """The agent's own session, when the observer reports it and the manifest does not list it
    (it cannot record the memfd that holds itself): it must be back with the manifest memfd at
    token 0. Whether that copy was usable is the `manifest copies` item."""
    if got.files is None:
        r.add("session", AGENT_SESSION, Verdict.FAILED, "present", None,
              f"The agent's own session {AGENT_SESSION} could not be retrieved: "
              f"{got.error or 'no reason given'}.")
        return
    tokens = {f.token: f for f in got.files}
    manifest_file = tokens.get(MANIFEST_TOKEN)
    if manifest_file is None:
        r.add("file", f"{AGENT_SESSION}/{MANIFEST_TOKEN}", Verdict.MISSING, "present", None,
              f"The manifest memfd (token {MANIFEST_TOKEN}) is missing from the agent's "
              "session.")
    elif manifest_file.error is not None:
        r.add("file", f"{AGENT_SESSION}/{MANIFEST_TOKEN}", Verdict.FAILED, "present", None,
              f"The manifest memfd could not be retrieved: {manifest_file.error}.")
    else:
        r.add("session", AGENT_SESSION, Verdict.OK, "present", "present",
              f"The agent's own session came back with the manifest memfd ({manifest_file.size} "
              "bytes).")
    for extra in got.files:
        if extra.token != MANIFEST_TOKEN:
            r.add("file", f"{AGENT_SESSION}/{extra.token}", Verdict.EXTRA, None, extra.size,
                  f"The agent's session holds token {extra.token}, which it did not put there.")


def _check_sessions(m: Manifest, obs: Observation, r: _Report) -> None:
    observed = {s.name: s for s in obs.sessions}
    recorded = {s.name for s in m.sessions}
    for entry in m.sessions:
        _check_session(entry, observed.get(entry.name), r)
    if AGENT_SESSION not in recorded and AGENT_SESSION in observed:
        _check_agent_session(observed[AGENT_SESSION], r)
    for got in obs.sessions:
        if got.name not in recorded and got.name != AGENT_SESSION:
            files = "could not be retrieved" if got.files is None else f"{len(got.files)} files"
            r.add("session", got.name, Verdict.EXTRA, None,
                  None if got.files is None else len(got.files),
                  f"Session {got.name} ({files}) came back but is not in the manifest: it was "
                  "created outside the prepared live update.")


LUO_SUBTREE = "LUO"


def _check_subtrees(m: Manifest, obs: Observation, r: _Report) -> None:
    observed = {t.name: t for t in obs.subtrees}
    if m.subtrees and not observed:
        for entry in m.subtrees:
            r.add("subtree", entry.name, Verdict.UNCHECKED, entry.size, None,
                  f"No incoming KHO subtrees were visible, so {entry.name} was not checked "
                  "(debugfs not mounted, or the kernel lacks KEXEC_HANDOVER_DEBUGFS).")
        return
    for entry in m.subtrees:
        got = observed.get(entry.name)
        if got is None:
            r.add("subtree", entry.name, Verdict.MISSING, entry.size, None,
                  f"KHO subtree {entry.name} was handed over by the previous kernel but is not "
                  "in the incoming handover.")
            continue
        luo_note = (" Its content is not checked: the kernel frees the LUO blob at boot, and "
                    "the sessions are checked through /dev/liveupdate instead."
                    if entry.name == LUO_SUBTREE else "")
        r.add("subtree", entry.name, Verdict.OK, "present", "present",
              f"KHO subtree {entry.name} arrived.{luo_note}")
        if entry.size is None or got.size is None:
            r.add("subtree-size", entry.name, Verdict.UNCHECKED, entry.size, got.size,
                  f"The size of KHO subtree {entry.name} was not known on both sides.")
        elif entry.size == got.size:
            r.add("subtree-size", entry.name, Verdict.OK, entry.size, got.size,
                  f"KHO subtree {entry.name} is {got.size} bytes, as handed over.")
        else:
            r.add("subtree-size", entry.name, Verdict.MISMATCH, entry.size, got.size,
                  f"KHO subtree {entry.name} is {got.size} bytes, but {entry.size} were handed "
                  "over: it changed after the manifest was written.")
        if entry.compatible is not None and got.compatible is not None:
            verdict = Verdict.OK if entry.compatible == got.compatible else Verdict.MISMATCH
            text = ("as handed over" if verdict is Verdict.OK
                    else f"but {entry.compatible} was handed over")
            r.add("subtree-compatible", entry.name, verdict, entry.compatible, got.compatible,
                  f"KHO subtree {entry.name} is {got.compatible}, {text}.")
    recorded = {t.name for t in m.subtrees}
    for got in obs.subtrees:
        if got.name not in recorded:
            r.add("subtree", got.name, Verdict.EXTRA, None, got.size,
                  f"KHO subtree {got.name} arrived but was not recorded in the manifest.")


def _check_network(m: Manifest, obs: Observation, r: _Report) -> None:
    if m.network is None or obs.network is None:
        side = "before" if m.network is None else "after"
        r.add("network", "state", Verdict.UNCHECKED, m.network is not None,
              obs.network is not None,
              f"The network configuration was not recorded {side} the update, so it was not "
              "compared.")
        return
    try:
        changes = netstate_diff(m.network, obs.network)
    except NetStateFormatError as err:
        r.add("network", "state", Verdict.UNCHECKED, None, None,
              f"The observed network state is unreadable ({err}), so it was not compared.")
        return
    if not changes:
        r.add("network", "state", Verdict.OK, None, None,
              "Links, addresses and main-table routes are the same as before the update.")
    for change in changes:
        r.add("network", "change", Verdict.UNCHECKED, None, None,
              f"Network (information only): {change}.")


def _check_manifest_copies(m: Manifest, obs: Observation, r: _Report) -> None:
    same = obs.disk_manifest_matches_memfd
    if same is None:
        r.add("manifest", "copies", Verdict.UNCHECKED, True, None,
              "Only one copy of the manifest was available (disk or the agent's LUO session), "
              "so the two were not compared.")
    elif same:
        r.add("manifest", "copies", Verdict.OK, True, True,
              "The manifest on disk and the copy carried through the kexec are identical.")
    else:
        r.add("manifest", "copies", Verdict.MISMATCH, True, False,
              "The manifest on disk and the copy carried through the kexec in the agent's LUO "
              "session do not agree: the carried copy differs, or was lost or unreadable. One "
              "of them changed after the commit, or the handover damaged it.")
    if m.final:
        r.add("manifest", "final", Verdict.OK, True, True,
              "The manifest was finalised at commit.")
    else:
        r.add("manifest", "final", Verdict.UNCHECKED, True, False,
              "The manifest is the one written at prepare and was never finalised: the host "
              "kexec'd without `kho-agentctl commit` (e.g. a plain systemctl kexec), so "
              "digests taken at commit are absent.")


CHECKS: tuple[Callable[[Manifest, Observation, _Report], None], ...] = (
    _check_proof, _check_abi, _check_manifest_copies, _check_sessions, _check_subtrees,
    _check_network)


def compare_manifest(m: Manifest, obs: Observation) -> VerifyReport:
    """A verdict per item: proof of the live update, ABI, the manifest's two copies, sessions,
    tokens (size, digest, seals), KHO subtrees, network. Pure."""
    report = _Report()
    for check in CHECKS:
        check(m, obs, report)
    ok = not any(item.verdict in FAILING_VERDICTS for item in report.items)
    return VerifyReport(report.items, ok)
