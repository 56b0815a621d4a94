"""The D-Bus contract of kho-agentd, declared once: every method, property and signal of the
Manager, Job and Session interfaces with its signatures, argument names, polkit action and option
keys (one table per interface, as systemd writes its vtables).

Everything else is derived from these tables: the introspection XML the service registers
(`Interface.xml()`), the reply and signal signatures the service sends (objects.py looks each call
up here), the call and reply types of kho-agentctl (cli/bus.py) and of `AgentClient`
(client.py), and the fuzzer's list of what to call (tests/dbusfuzz.py). tests/test_contract.py
checks the shipped bus policy and polkit actions, and the service's handlers, against them.

The names (bus name, paths, actions, option tables) are in interfaces.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .interfaces import (
    ACTION_INHIBIT,
    ACTION_MANAGE,
    ACTION_SESSION,
    COMMIT_OPTIONS,
    JOB_IFACE,
    MANAGER_IFACE,
    PREFLIGHT_OPTIONS,
    PREPARE_OPTIONS,
    SCRATCH_OPTIONS,
    SESSION_IFACE,
    SESSION_OPTIONS,
)

# A method anyone may call: the daemon asks polkit nothing (it may still identify the caller)
READ_ONLY: str | None = None


@dataclass(frozen=True)
class Arg:
    name: str
    signature: str


def quoteattr(value: str) -> str:
    """An XML attribute value, quoted. (xml.sax.saxutils has one, but importing it loads
    urllib.request, http and email: ~30 ms in every kho-agentctl and AgentClient process.)"""
    return '"' + value.translate(_ATTRIBUTE_ESCAPES) + '"'


_ATTRIBUTE_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                    "\n": "&#10;", "\t": "&#9;", "\r": "&#13;"})


def _tuple_type(args: tuple[Arg, ...]) -> str:
    return "(" + "".join(a.signature for a in args) + ")"


def _comment(doc: str, indent: str) -> str:
    if not doc:
        return ""
    text = doc.replace("--", "- -")  # an XML comment must not contain "--"
    lines = text.splitlines()
    body = ("\n" + indent + "     ").join(lines)
    return f"{indent}<!-- {body} -->\n"


@dataclass(frozen=True)
class Method:
    """One method: its arguments in and out (names and types), the polkit action a caller
    other than root needs (READ_ONLY: none), and the keys of its a{sv} options, if it takes
    one (key -> the type of the variant's content)."""

    name: str
    in_args: tuple[Arg, ...] = ()
    out_args: tuple[Arg, ...] = ()
    action: str | None = READ_ONLY
    options: Mapping[str, str] | None = None
    doc: str = ""

    @property
    def in_type(self) -> str:
        """The call's body as a tuple type: "(sa{sv})"."""
        return _tuple_type(self.in_args)

    @property
    def out_type(self) -> str:
        """The reply's body as a tuple type: "(oh)"; "()" for a reply without values."""
        return _tuple_type(self.out_args)

    @property
    def options_position(self) -> int:
        """The position of the a{sv} options argument (ValueError: the method has none)."""
        for position, arg in enumerate(self.in_args):
            if arg.signature == "a{sv}":
                return position
        raise ValueError(f"{self.name} takes no options")

    def xml(self, indent: str) -> str:
        out = _comment(self.doc, indent)
        args = [(a, "in") for a in self.in_args] + [(a, "out") for a in self.out_args]
        if not args:
            return out + f"{indent}<method name={quoteattr(self.name)}/>\n"
        out += f"{indent}<method name={quoteattr(self.name)}>\n"
        for arg, direction in args:
            out += (f"{indent}  <arg name={quoteattr(arg.name)} type={quoteattr(arg.signature)} "
                    f"direction=\"{direction}\"/>\n")
        return out + f"{indent}</method>\n"


@dataclass(frozen=True)
class Property:
    """A read-only property (the agent has no writable one)."""

    name: str
    signature: str
    doc: str = ""

    def xml(self, indent: str) -> str:
        return (_comment(self.doc, indent) + f"{indent}<property name={quoteattr(self.name)} "
                f"type={quoteattr(self.signature)} access=\"read\"/>\n")


@dataclass(frozen=True)
class Signal:
    name: str
    args: tuple[Arg, ...]
    doc: str = ""

    @property
    def type(self) -> str:
        return _tuple_type(self.args)

    def xml(self, indent: str) -> str:
        out = _comment(self.doc, indent) + f"{indent}<signal name={quoteattr(self.name)}>\n"
        for arg in self.args:
            out += f"{indent}  <arg name={quoteattr(arg.name)} type={quoteattr(arg.signature)}/>\n"
        return out + f"{indent}</signal>\n"


@dataclass(frozen=True)
class Interface:
    name: str
    properties: tuple[Property, ...] = ()
    methods: tuple[Method, ...] = ()
    signals: tuple[Signal, ...] = ()
    def __post_init__(self) -> None:
        members: tuple[Property | Method | Signal, ...] = (
            *self.properties, *self.methods, *self.signals)
        names = [m.name for m in members]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{self.name}: declared twice: {', '.join(twice)}")

    def method(self, name: str) -> Method:
        for method in self.methods:
            if method.name == name:
                return method
        raise KeyError(f"{self.name} has no method {name}")

    def prop(self, name: str) -> Property:
        for prop in self.properties:
            if prop.name == name:
                return prop
        raise KeyError(f"{self.name} has no property {name}")

    def signal(self, name: str) -> Signal:
        for signal in self.signals:
            if signal.name == name:
                return signal
        raise KeyError(f"{self.name} has no signal {name}")

    def xml(self) -> str:
        """The introspection XML of this interface (what Gio registers)."""
        indent = "    "
        members: tuple[Property | Method | Signal, ...] = (
            *self.properties, *self.methods, *self.signals)
        body = "".join(m.xml(indent) for m in members)
        return (f"<node>\n  <interface name={quoteattr(self.name)}>\n{body}  </interface>\n"
                "</node>\n")


def _args(*pairs: str) -> tuple[Arg, ...]:
    """Arguments from "name:type" strings (the table stays one line per method)."""
    return tuple(Arg(*pair.split(":", 1)) for pair in pairs)


MANAGER = Interface(
    MANAGER_IFACE,
    properties=(
        Property("State", "s", "idle, preparing, prepared, committing, verifying, verified, "
                 "failed, cancelling"),
        Property("StateMessage", "s"),
        Property("HandoffMode", "s", "direct, fdstore or simulated: how the sessions survive "
                 "the shutdown"),
        Property("RunningKernel", "s"),
        Property("TargetKernel", "s"),
        Property("LiveUpdateNumber", "t", "the running kernel's outgoing liveupdate-number; 0 "
                 "when unknown"),
        Property("LastResult", "s", "JSON of the last result (verify summary, cancel, "
                 "failure); \"\" before any"),
        Property("Simulated", "b"),
        Property("ConfigFiles", "as", "the configuration files kho-agentd read at start, in "
                 "the order they apply (kho-agent.conf(5)); empty: built-in defaults only"),
        Property("ReadyTimeoutUSec", "t", "how long `kho-agentctl update` waits after its "
                 "prepare for the clients to be ready, in microseconds ([Update] "
                 "ReadyTimeoutSec=, kho-agent.conf(5))"),
        Property("Inhibitors", "a(ssut)", "who holds live updates off: (who, why, uid, since "
                 "in microseconds of CLOCK_REALTIME); a commit is refused while any is held"),
    ),
    methods=(
        Method("Preflight", _args("options:a{sv}"), _args("report:s"), READ_ONLY,
               PREFLIGHT_OPTIONS, "options: kernel s, initrd s, kernel_fd h, initrd_fd h "
               "(a target that cannot be opened or read is the error NotFound, "
               "InvalidArgument or PermissionDenied, as in Prepare). "
               "Returns the preflight report as JSON: the verdict "
               "and each check's tier are ok, warning, not-run (the check could not run: its "
               "message says why) or blocker."),
        Method("ScratchPlan", _args("options:a{sv}"), _args("plan:s"), READ_ONLY,
               SCRATCH_OPTIONS, "options: kernel s, initrd s, kernel_fd h, initrd_fd h, margin "
               "d (0..10). Returns the scratch plan as JSON."),
        Method("Prepare", _args("options:a{sv}"), _args("job:o"), ACTION_MANAGE,
               PREPARE_OPTIONS, "options: kernel s or kernel_fd h (neither, or an empty "
               "kernel: the configured Target=, kho-agent.conf(5)), initrd s, initrd_fd h, "
               "cmdline s (absent: the configured command-line policy), scratch s "
               "(keep|auto|value), dry_run b. A dry run's Result also says whether the "
               "target is the kernel running (target_is_running: the same release and uname "
               "-v) and the error a commit would be refused with now by policy, before "
               "anything is prepared (commit_refused: an inhibitor, the maintenance window, "
               "the hand-off mode; null: none), and the error the prepare itself would be "
               "refused with now, from its own checks (prepare_refused: Busy while an update "
               "is prepared or under way, PreflightFailed for a blocker, InvalidArgument for "
               "the command line; null: none; would_prepare is whether it is null)"),
        Method("Commit", _args("options:a{sv}"), _args("job:o"), ACTION_MANAGE,
               COMMIT_OPTIONS, "options: force b, dry_run b"),
        Method("Cancel", (), _args("job:o"), ACTION_MANAGE),
        Method("Verify", (), _args("job:o"), ACTION_MANAGE),
        Method("GetManifest", (), _args("manifest:s"), READ_ONLY,
               doc="the manifest of the prepared (or last committed) update, as JSON"),
        Method("History", (), _args("history:s"), READ_ONLY,
               doc="every live update and attempt on this host, oldest first, kept across "
               "kexecs, as JSON: {schema, entries, problems}"),
        Method("Inhibit", _args("who:s", "why:s"), _args("fd:h"), ACTION_INHIBIT,
               doc="Holds commits off while the returned fd is open (as logind's Inhibit): "
               "close it, or exit, to release. who: a name (default: the caller's uid); why: "
               "required, one line. Prepare and cancel are not held."),
        Method("ListSessions", (), _args("sessions:a(sousbbb)"), READ_ONLY,
               doc="(name, object, owner uid, owner bus name, ready, claimed, incoming)"),
        Method("CreateSession", _args("name:s"), _args("session:o", "fd:h"), ACTION_SESSION,
               doc="Creates an outgoing LUO session and returns its object and fd. Preserve "
               "files through Preserve (the agent records tokens, sizes and digests for the "
               "manifest); files preserved straight into the fd are carried by the kernel but "
               "cannot be verified."),
        Method("CreateSessionWithOptions", _args("name:s", "options:a{sv}"),
               _args("session:o", "fd:h"), ACTION_SESSION, SESSION_OPTIONS,
               "options: digests b (default: the daemon's setting); fd_store b (default "
               "false): the caller keeps the session fd in its own service's fd store "
               "(FileDescriptorStorePreserve= on systemd >= 261), so in hand-off mode fdstore "
               "the agent does not park it and does not retrieve it after the kexec (systemd "
               "hands it to the caller's service)"),
        Method("Preserve", _args("name:s", "fd:h", "token:t"), (), ACTION_SESSION),
        Method("SetReady", _args("name:s", "ready:b"), (), ACTION_SESSION),
        Method("ReleaseSession", _args("name:s"), (), ACTION_SESSION,
               doc="before the kexec: close a session (the kernel unpreserves its files)"),
        Method("RetrieveSession", _args("name:s"), _args("fd:h"), ACTION_SESSION,
               doc="after the kexec: the retrieved session's fd, for its owner"),
        Method("CheckKeptSession", _args("name:s", "session:h"), _args("ok:b", "items:s"),
               ACTION_SESSION,
               doc="after the kexec: a session its owner kept in its own fd store (option "
               "fd_store), handed in by its owner, checked against what the manifest recorded "
               "of it (sizes, seals, digests); the agent reads only and keeps nothing. Returns "
               "whether everything matched and the items as JSON (kind, name, verdict, "
               "detail)."),
        Method("RetrieveFile", _args("name:s", "token:t"), _args("fd:h"), ACTION_SESSION,
               doc="after the kexec: a file of a retrieved session (RETRIEVE_FD through the "
               "agent)"),
        Method("FinishSession", _args("name:s"), (), ACTION_SESSION,
               doc="after the kexec: FINISH a retrieved session (its owner is done with it)"),
    ),
    signals=(
        Signal("JobRemoved", _args("id:u", "job:o", "result:s")),
        Signal("SessionReleased", _args("name:s", "session:o", "reason:s"),
               "A session was closed without its owner asking (the update was cancelled, its "
               "owner disconnected before it preserved anything): its files are no longer "
               "preserved."),
    ),
)

JOB = Interface(
    JOB_IFACE,
    properties=(
        Property("Id", "u"),
        Property("Type", "s", "prepare, commit, cancel, verify"),
        Property("Progress", "u"),
        Property("Phase", "s", "what the job does now (\"digesting\", \"loading the kernel\"); "
                 "\"\" before its first phase"),
        Property("Bytes", "(tt)", "(done, total) bytes of the phase where bytes are what takes "
                 "the time (digesting); (0, 0) otherwise. Published at most every 1% of "
                 "total"),
        Property("State", "s", "running, done, failed, canceled"),
        Property("Result", "s", "when done: the outcome as JSON; when failed: \"\""),
        Property("ErrorName", "s", "when failed: the D-Bus error name and message; else \"\""),
        Property("ErrorMessage", "s"),
    ),
    methods=(
        Method("Cancel", (), (), ACTION_MANAGE,
               doc="a running prepare rolls back at its next step"),
    ),
)

SESSION = Interface(
    SESSION_IFACE,
    properties=(
        Property("Name", "s"),
        Property("Owner", "(us)", "(uid the session belongs to, unique bus name of the owner's "
                 "connection that created it, or after the kexec claimed it; \"\" before the "
                 "owner claimed it). Root may act on a session without becoming its owner."),
        Property("Tokens", "at"),
        Property("Ready", "b"),
        Property("Claimed", "b"),
        Property("Incoming", "b", "true for a session retrieved from the previous kernel"),
    ),
)

INTERFACES: tuple[Interface, ...] = (MANAGER, JOB, SESSION)

MANAGER_XML = MANAGER.xml()
JOB_XML = JOB.xml()
SESSION_XML = SESSION.xml()
