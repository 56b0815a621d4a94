"""The names of kho-agentd's D-Bus contract: bus name, object paths, polkit actions, job states
and the option keys of each method. The methods, properties and signals themselves are declared
once in contract.py, which generates the introspection XML.

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
ACTION_INHIBIT = "org.khoagent.Agent1.inhibit"   # Inhibit

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

