"""The D-Bus contract of kho-agentd: names, object paths and introspection XML.

Shaped like systemd's org.freedesktop.sysupdate1: long operations return a Job object path at
once and end with the Manager's JobRemoved signal; read-only calls need no privilege. The service
side registers these interfaces with Gio directly (not pydbus), because CreateSession,
RetrieveSession and Preserve pass unix fds, which pydbus cannot (platform notes).

Options dictionaries (a{sv}) accept only the keys listed per method; an unknown key, a wrong
variant type, a number out of its range or a string longer than its bound is InvalidArgument and
changes nothing.

Files: `kernel`/`initrd` name a file the daemon opens, for root callers only; any caller may
pass the open file instead as `kernel_fd`/`initrd_fd` (an index into the message's unix fds),
and then `kernel`/`initrd` is only the name shown. An unprivileged caller's files are thereby
opened with its own rights: the daemon never opens a path on its behalf.
"""

from __future__ import annotations

BUS_NAME = "org.khoagent.Agent1"
MANAGER_PATH = "/org/khoagent/Agent1"
MANAGER_IFACE = "org.khoagent.Agent1.Manager"
JOB_IFACE = "org.khoagent.Agent1.Job"
SESSION_IFACE = "org.khoagent.Agent1.Session"
JOB_PATH_PREFIX = MANAGER_PATH + "/job/"
SESSION_PATH_PREFIX = MANAGER_PATH + "/session/"
ERROR_PREFIX = "org.khoagent.Agent1.Error."

# polkit actions (one per class of verb, as sysupdate1 has)
ACTION_MANAGE = "org.khoagent.Agent1.manage"     # Prepare, Commit, Cancel, Verify
ACTION_SESSION = "org.khoagent.Agent1.session"   # CreateSession, Preserve, SetReady, ...

# Job.State values and JobRemoved results
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELED = "canceled"

# Option keys per method: name -> D-Bus signature of the variant's content
FILE_OPTIONS = {"kernel": "s", "initrd": "s", "kernel_fd": "h", "initrd_fd": "h"}
PREFLIGHT_OPTIONS = dict(FILE_OPTIONS)
SCRATCH_OPTIONS = {**FILE_OPTIONS, "margin": "d"}
PREPARE_OPTIONS = {**FILE_OPTIONS, "cmdline": "s", "scratch": "s", "dry_run": "b"}
# Bounds of option values (a caller is never trusted to be reasonable): strings by key, in
# bytes; numbers by key, inclusive.
STRING_MAX = {"kernel": 4095, "initrd": 4095, "cmdline": 65536, "scratch": 64}
NUMBER_RANGE = {"margin": (0.0, 10.0)}   # the scratch margin: 0 .. 1000 %
COMMIT_OPTIONS = {"force": "b", "dry_run": "b"}
SESSION_OPTIONS = {"digests": "b", "fd_store": "b"}

MANAGER_XML = """
<node>
  <interface name="org.khoagent.Agent1.Manager">
    <!-- idle, preparing, prepared, committing, verifying, verified, failed, cancelling -->
    <property name="State" type="s" access="read"/>
    <property name="StateMessage" type="s" access="read"/>
    <!-- direct, fdstore or simulated: how the sessions survive the shutdown -->
    <property name="HandoffMode" type="s" access="read"/>
    <property name="RunningKernel" type="s" access="read"/>
    <property name="TargetKernel" type="s" access="read"/>
    <!-- the running kernel's outgoing liveupdate-number; 0 when unknown -->
    <property name="LiveUpdateNumber" type="t" access="read"/>
    <!-- JSON of the last result (verify summary, cancel, failure); "" before any -->
    <property name="LastResult" type="s" access="read"/>
    <property name="Simulated" type="b" access="read"/>

    <!-- options: kernel s, initrd s, kernel_fd h, initrd_fd h. Returns the preflight report
         as JSON. -->
    <method name="Preflight">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="report" type="s" direction="out"/>
    </method>
    <!-- options: kernel s, initrd s, kernel_fd h, initrd_fd h, margin d (0..10). Returns the
         scratch plan as JSON. -->
    <method name="ScratchPlan">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="plan" type="s" direction="out"/>
    </method>
    <!-- options: kernel s or kernel_fd h (one required), initrd s, initrd_fd h, cmdline s,
         scratch s (keep|auto|value), dry_run b -->
    <method name="Prepare">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="job" type="o" direction="out"/>
    </method>
    <!-- options: force b, dry_run b -->
    <method name="Commit">
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="job" type="o" direction="out"/>
    </method>
    <method name="Cancel">
      <arg name="job" type="o" direction="out"/>
    </method>
    <method name="Verify">
      <arg name="job" type="o" direction="out"/>
    </method>
    <!-- the manifest of the prepared (or last committed) update, as JSON -->
    <method name="GetManifest">
      <arg name="manifest" type="s" direction="out"/>
    </method>
    <!-- (name, object, owner uid, owner bus name, ready, claimed, incoming) -->
    <method name="ListSessions">
      <arg name="sessions" type="a(sousbbb)" direction="out"/>
    </method>
    <!-- Creates an outgoing LUO session and returns its object and fd. Preserve files through
         Preserve (the agent records tokens, sizes and digests for the manifest); files
         preserved straight into the fd are carried by the kernel but cannot be verified. -->
    <method name="CreateSession">
      <arg name="name" type="s" direction="in"/>
      <arg name="session" type="o" direction="out"/>
      <arg name="fd" type="h" direction="out"/>
    </method>
    <!-- options: digests b (default: the daemon's setting); fd_store b (default false): the
         caller keeps the session fd in its own service's fd store (FileDescriptorStorePreserve=
         on systemd >= 261), so in hand-off mode fdstore the agent does not park it and does not
         retrieve it after the kexec (systemd hands it to the caller's service) -->
    <method name="CreateSessionWithOptions">
      <arg name="name" type="s" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="session" type="o" direction="out"/>
      <arg name="fd" type="h" direction="out"/>
    </method>
    <method name="Preserve">
      <arg name="name" type="s" direction="in"/>
      <arg name="fd" type="h" direction="in"/>
      <arg name="token" type="t" direction="in"/>
    </method>
    <method name="SetReady">
      <arg name="name" type="s" direction="in"/>
      <arg name="ready" type="b" direction="in"/>
    </method>
    <!-- before the kexec: close a session (the kernel unpreserves its files) -->
    <method name="ReleaseSession">
      <arg name="name" type="s" direction="in"/>
    </method>
    <!-- after the kexec: the retrieved session's fd, for its owner -->
    <method name="RetrieveSession">
      <arg name="name" type="s" direction="in"/>
      <arg name="fd" type="h" direction="out"/>
    </method>
    <!-- after the kexec: a session its owner kept in its own fd store (option fd_store),
         handed in by its owner, checked against what the manifest recorded of it (sizes,
         seals, digests); the agent reads only and keeps nothing. Returns whether everything
         matched and the items as JSON (kind, name, verdict, detail). -->
    <method name="CheckKeptSession">
      <arg name="name" type="s" direction="in"/>
      <arg name="session" type="h" direction="in"/>
      <arg name="ok" type="b" direction="out"/>
      <arg name="items" type="s" direction="out"/>
    </method>
    <!-- after the kexec: a file of a retrieved session (RETRIEVE_FD through the agent) -->
    <method name="RetrieveFile">
      <arg name="name" type="s" direction="in"/>
      <arg name="token" type="t" direction="in"/>
      <arg name="fd" type="h" direction="out"/>
    </method>
    <!-- after the kexec: FINISH a retrieved session (its owner is done with it) -->
    <method name="FinishSession">
      <arg name="name" type="s" direction="in"/>
    </method>
    <signal name="JobRemoved">
      <arg name="id" type="u"/>
      <arg name="job" type="o"/>
      <arg name="result" type="s"/>
    </signal>
    <!-- A session was closed without its owner asking (the update was cancelled, its owner
         disconnected before it preserved anything): its files are no longer preserved. -->
    <signal name="SessionReleased">
      <arg name="name" type="s"/>
      <arg name="session" type="o"/>
      <arg name="reason" type="s"/>
    </signal>
  </interface>
</node>
"""

JOB_XML = """
<node>
  <interface name="org.khoagent.Agent1.Job">
    <property name="Id" type="u" access="read"/>
    <!-- prepare, commit, cancel, verify -->
    <property name="Type" type="s" access="read"/>
    <property name="Progress" type="u" access="read"/>
    <!-- running, done, failed, canceled -->
    <property name="State" type="s" access="read"/>
    <!-- when done: the outcome as JSON; when failed: "" -->
    <property name="Result" type="s" access="read"/>
    <!-- when failed: the D-Bus error name and message; else "" -->
    <property name="ErrorName" type="s" access="read"/>
    <property name="ErrorMessage" type="s" access="read"/>
    <method name="Cancel"/>
  </interface>
</node>
"""

SESSION_XML = """
<node>
  <interface name="org.khoagent.Agent1.Session">
    <property name="Name" type="s" access="read"/>
    <!-- (uid the session belongs to, unique bus name of the owner's connection that created
         it, or after the kexec claimed it; "" before the owner claimed it). Root may act on a
         session without becoming its owner. -->
    <property name="Owner" type="(us)" access="read"/>
    <property name="Tokens" type="at" access="read"/>
    <property name="Ready" type="b" access="read"/>
    <property name="Claimed" type="b" access="read"/>
    <!-- true for a session retrieved from the previous kernel -->
    <property name="Incoming" type="b" access="read"/>
  </interface>
</node>
"""


def escape_path_component(name: str) -> str:
    """A session name as an object path element: systemd's bus_label_escape rule (every byte
    outside [A-Za-z0-9] becomes _xx in hex; the empty string becomes "_")."""
    if not name:
        return "_"
    out = []
    for byte in name.encode("utf-8", errors="surrogateescape"):
        ch = chr(byte)
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)

