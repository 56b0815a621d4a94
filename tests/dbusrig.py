"""A private D-Bus test rig: a real dbus-daemon per test, kho-agentd as a subprocess, and real
clients (busctl, gdbus, Gio) that may also run as an unprivileged user.

Nothing here touches the machine's own buses: every bus is a dbus-daemon started from a generated
configuration in a temporary directory, and every client is given that bus's address and a clean
environment (no DBUS_SESSION_BUS_ADDRESS or NOTIFY_SOCKET inherited from the test runner).

Typical use in a daemon test::

    with PrivateBus() as bus, Daemon(bus.address, simdir, statedir) as daemon:
        with GioClient(bus.address) as client:
            with client.catch_signal("JobRemoved") as jobs:
                (job,), _ = client.call_values(MANAGER_PATH, MANAGER_IFACE, "Prepare",
                                               "a{sv}", ({},))
                job_id, path, result = jobs.wait(predicate=lambda args: args[1] == job)
        out = busctl(bus.address, "--json=short", "get-property", BUS_NAME, MANAGER_PATH,
                     MANAGER_IFACE, "State", uid=NOBODY)
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import gi

gi.require_version("Gio", "2.0")
gi.require_version("GLib", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO / "tests"
# The service's bus name, object and interface, written out here as a client outside the project
# knows them rather than imported from the product: a rename in the service then fails
# test_constants_match_the_service_contract instead of being followed silently by every test.
BUS_NAME = "org.khoagent.Agent1"
MANAGER_PATH = "/org/khoagent/Agent1"
MANAGER_IFACE = "org.khoagent.Agent1.Manager"
SHIPPED_POLICY = REPO / "etc" / "dbus-1" / "system.d" / "org.khoagent.Agent1.conf"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"

NOBODY = 65534
DEFAULT_TIMEOUT = 10.0
# Unix socket paths are limited to 108 bytes including the NUL (sockaddr_un.sun_path).
_SUN_PATH_MAX = 107
_POLL_S = 0.02
_TAIL_CHARS = 4000

CONNECTION_FLAGS = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)

_DOCTYPE = ('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n')

# The fallback used while etc/dbus-1/system.d/org.khoagent.Agent1.conf does not exist: root may own
# the agent's name and everyone may call it (the daemon does its own authorization).
PERMISSIVE_POLICY = _DOCTYPE + f"""<busconfig>
  <policy user="root">
    <allow own="{BUS_NAME}"/>
  </policy>
  <policy context="default">
    <allow send_destination="{BUS_NAME}"/>
  </policy>
</busconfig>
"""

# The default context of Debian's /usr/share/dbus-1/system.conf: everyone may connect and talk
# to the bus driver; owning names and calling methods need holes punched by policy files.
_SYSTEM_DEFAULT_POLICY = f"""
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="{DBUS_NAME}" send_interface="{DBUS_IFACE}"/>
    <allow send_destination="{DBUS_NAME}" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="{DBUS_NAME}" send_interface="{PROPERTIES_IFACE}"/>
    <allow send_destination="{DBUS_NAME}" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="{DBUS_NAME}" send_interface="{DBUS_IFACE}"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="{DBUS_NAME}" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
"""

_SESSION_DEFAULT_POLICY = """
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
"""

# Inherited variables that would point a child at the machine's buses or a service manager.
_SCRUBBED_ENV = ("DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS", "DBUS_STARTER_ADDRESS",
                 "DBUS_STARTER_BUS_TYPE", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                 "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "INVOCATION_ID", "JOURNAL_STREAM")


class RigError(RuntimeError):
    """The rig could not do what a test asked (a bus or daemon did not start, a client failed)."""


class ClientError(RigError):
    """A client binary (busctl, gdbus, python) exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{' '.join(self.argv)} exited with status {returncode}: "
                         f"{stderr.strip() or stdout.strip() or '(no output)'}")


class SignalTimeout(RigError):
    """The awaited D-Bus signal did not arrive in time."""


class RemoteError(Exception):
    """A D-Bus error reply: `name` is the remote error name, `message` its text."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def wait_readable(fd: int, timeout: float) -> bool:
    """Whether `fd` becomes readable (or hits EOF) within `timeout` seconds. poll(), not
    select(): a test process may hold more than FD_SETSIZE (1024) descriptors."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _tail(text: str) -> str:
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --- the bus -------------------------------------------------------------------------------

BusKind = Literal["system", "session"]
PolicyChoice = Literal["auto", "shipped", "permissive"]


class PrivateBus:
    """A real dbus-daemon on a unix socket in a fresh, world-traversable temporary directory.

    kind="system": `<type>system</type>`, EXTERNAL auth, Debian's default-deny system policy, and
    an `<includedir>` holding the agent's policy: `policy="auto"` copies `shipped_policy` if it
    exists, else writes PERMISSIVE_POLICY; "shipped" requires the file; "permissive" always uses
    the fallback. kind="session": everyone may own and call anything.
    `extra_policy` is raw XML placed after the includedir (so it can override both).
    `limits` sets `<limit name=...>` values (e.g. max_connections_per_user).
    """

    def __init__(self, kind: BusKind = "system", *, policy: PolicyChoice = "auto",
                 shipped_policy: Path = SHIPPED_POLICY, extra_policy: str = "",
                 limits: Mapping[str, int] | None = None, start_timeout: float = 5.0,
                 base_dir: Path | None = None) -> None:
        self.kind = kind
        self.policy = policy
        self.shipped_policy = shipped_policy
        self.extra_policy = extra_policy
        self.limits = dict(limits or {})
        self.start_timeout = start_timeout
        self.base_dir = base_dir
        self.policy_source = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._address: str | None = None
        self._final_stderr: str | None = None

    # paths -----------------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RigError("the private bus is not started")
        return self._dir

    @property
    def socket_path(self) -> Path:
        return self.directory / "bus"

    @property
    def config_path(self) -> Path:
        return self.directory / "bus.conf"

    @property
    def policy_dir(self) -> Path:
        return self.directory / "policy.d"

    @property
    def address(self) -> str:
        if self._address is None:
            raise RigError("the private bus is not started")
        return self._address

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RigError("the private bus is not started")
        return self._proc.pid

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> PrivateBus:
        if self._proc is not None:
            raise RigError("the private bus is already started")
        base = self.base_dir if self.base_dir is not None else Path("/tmp")
        self._dir = Path(tempfile.mkdtemp(prefix="kho-dbus-", dir=base))
        # nobody must reach the socket: mkdtemp makes the directory 0700
        self._dir.chmod(0o755)
        if len(str(self.socket_path).encode()) > _SUN_PATH_MAX:
            self._cleanup_dir()
            raise RigError(f"socket path {self.socket_path} is longer than a unix socket allows; "
                           "pass a shorter base_dir")
        started = False
        try:
            self.policy_dir.mkdir()
            self.policy_dir.chmod(0o755)
            self._install_agent_policy()
            self.config_path.write_text(self._config_text())
            self._spawn()
            started = True
        finally:
            if not started:
                self.stop()
        return self

    def _install_agent_policy(self) -> None:
        if self.kind == "session":
            self.policy_source = "session (everyone may own and call anything)"
            return
        target = self.policy_dir / f"{BUS_NAME}.conf"
        use_shipped = self.policy == "shipped" or (
            self.policy == "auto" and self.shipped_policy.is_file())
        if use_shipped:
            if not self.shipped_policy.is_file():
                raise RigError(f"policy='shipped' but {self.shipped_policy} does not exist")
            shutil.copyfile(self.shipped_policy, target)
            self.policy_source = f"shipped: {self.shipped_policy}"
        else:
            target.write_text(PERMISSIVE_POLICY)
            self.policy_source = "permissive"

    def _config_text(self) -> str:
        policy = _SYSTEM_DEFAULT_POLICY if self.kind == "system" else _SESSION_DEFAULT_POLICY
        limits = "".join(f'  <limit name="{name}">{value}</limit>\n'
                         for name, value in sorted(self.limits.items()))
        return (_DOCTYPE + "<busconfig>\n"
                f"  <type>{self.kind}</type>\n"
                "  <auth>EXTERNAL</auth>\n"
                f"  <listen>unix:path={self.socket_path}</listen>\n"
                f"{policy}"
                f"{limits}"
                f"  <includedir>{self.policy_dir}</includedir>\n"
                f"{self.extra_policy}\n"
                "</busconfig>\n")

    def _spawn(self) -> None:
        stderr_log = (self.directory / "dbus-daemon.stderr").open("wb")
        with stderr_log:
            self._proc = subprocess.Popen(
                ["dbus-daemon", "--nofork", "--print-address=1",
                 f"--config-file={self.config_path}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_log,
                env=client_env(), start_new_session=True)
        assert self._proc.stdout is not None
        with self._proc.stdout as out:
            line = self._read_address_line(out.fileno())
        if not line:
            try:
                # the pipe closed: dbus-daemon is exiting (a config error); get its status
                rc: int | None = self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                rc = None
            state = f"exited with status {rc}" if rc is not None else "printed no address"
            raise RigError(f"dbus-daemon {state} within {self.start_timeout:.1f} s; config "
                           f"{self.config_path}; stderr:\n{_tail(self.stderr_text())}")
        self._address = line

    def _read_address_line(self, fd: int) -> str:
        # dbus-daemon prints the address once it listens; read it without blocking past the
        # deadline (a config error makes it exit and close the pipe instead).
        deadline = time.monotonic() + self.start_timeout
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ""
            if not wait_readable(fd, remaining):
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            data += chunk
        return data.split(b"\n", 1)[0].decode().strip()

    def install_policy(self, name: str, text: str) -> Path:
        """Write a policy file into the bus's includedir; call reload() to apply it."""
        if "/" in name or not name.endswith(".conf"):
            raise RigError(f"policy file name {name!r} must be a plain *.conf name")
        path = self.policy_dir / name
        path.write_text(text)
        return path

    def reload(self) -> None:
        """Reload the configuration: SIGHUP (as an admin would), then a synchronous ReloadConfig
        call, whose reply comes only after the files are read again: a SIGHUP alone is handled
        at some later main-loop turn, so a test could race it."""
        if self._proc is None or self._proc.poll() is not None:
            raise RigError("the private bus is not running")
        self._proc.send_signal(signal.SIGHUP)
        with GioClient(self.address) as client:
            client.call(DBUS_PATH, DBUS_IFACE, "ReloadConfig", dest=DBUS_NAME)

    def stderr_text(self) -> str:
        if self._final_stderr is not None:
            return self._final_stderr
        if self._dir is None:
            return ""
        return _read_text(self._dir / "dbus-daemon.stderr")

    def stop(self) -> None:
        """Terminate dbus-daemon (SIGKILL if SIGTERM is not enough), wait, remove the directory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, timeout=5.0)
        if self._dir is not None:
            self._final_stderr = _read_text(self._dir / "dbus-daemon.stderr")
        self._address = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    assert proc.returncode is not None
    return proc.returncode


# --- environment and privilege dropping -----------------------------------------------------

def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for client processes: a standard PATH, C.UTF-8, no colours or pager,
    PYTHONPATH with the repository and tests/ (so `import kho_agent` and `import dbusrig` work),
    and nothing that points at the machine's buses."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/",
        "SYSTEMD_COLORS": "0",
        "SYSTEMD_PAGER": "",
        "PAGER": "cat",
        "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS_DIR}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if extra:
        env.update(extra)
    return env


def as_user(uid: int, gid: int | None = None) -> list[str]:
    """The argv prefix that runs a command as uid (and its primary group, or gid), with no
    supplementary groups: `setpriv --reuid=UID --regid=GID --clear-groups --`."""
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise RigError(f"uid {uid} has no passwd entry; pass its gid explicitly") from None
    setpriv = shutil.which("setpriv", path=client_env()["PATH"])
    if setpriv is None:
        raise RigError("setpriv (util-linux) is not installed: cannot drop privileges")
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def _run(argv: list[str], *, uid: int | None, timeout: float, check: bool,
         env: Mapping[str, str] | None = None,
         input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    full = (as_user(uid) if uid is not None else []) + argv
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              env=client_env(env), input=input_text,
                              stdin=None if input_text is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RigError(f"{' '.join(full)} did not finish within {timeout:.1f} s") from exc
    if check and done.returncode != 0:
        raise ClientError(full, done.returncode, done.stdout, done.stderr)
    return done


def why_cannot_run_as(uid: int, *, python: bool = False) -> str | None:
    """None if this machine can run clients as uid, else the reason (for pytest.skip).

    Without python: setpriv and busctl work as uid. With python: this interpreter (sys.executable)
    can import Gio, kho_agent and dbusrig as uid; it cannot when the interpreter or the checkout
    sits below a directory uid cannot traverse (pyenv under /root, mode 700)."""
    if os.geteuid() != 0:
        return "dropping privileges needs root"
    try:
        as_user(uid)
    except RigError as exc:
        return str(exc)
    if python:
        argv = [sys.executable, "-c",
                "import gi; gi.require_version('Gio', '2.0'); from gi.repository import Gio; "
                "import kho_agent, dbusrig"]
    else:
        argv = ["busctl", "--version"]
    try:
        done = _run(argv, uid=uid, timeout=DEFAULT_TIMEOUT, check=False)
    except RigError as exc:
        return str(exc)
    if done.returncode != 0:
        return (f"{argv[0]} cannot run as uid {uid} (status {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}")
    return None


def can_run_as(uid: int, *, python: bool = False) -> bool:
    return why_cannot_run_as(uid, python=python) is None


def require_run_as(uid: int, *, python: bool = False) -> None:
    """Skip the calling test, with the reason, when clients cannot run as uid here."""
    import pytest

    reason = why_cannot_run_as(uid, python=python)
    if reason is not None:
        pytest.skip(f"cannot run {'python ' if python else ''}clients as uid {uid}: {reason}")


# --- command-line clients -------------------------------------------------------------------

def busctl(address: str, *args: str, uid: int | None = None, timeout: float = DEFAULT_TIMEOUT,
           check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real `busctl --address=ADDRESS ARGS...` (as uid if given)."""
    # busctl's own --timeout makes a hung call fail with a message instead of our kill
    argv = ["busctl", f"--address={address}", f"--timeout={max(1, int(timeout) - 1)}",
            "--no-pager", *args]
    return _run(argv, uid=uid, timeout=timeout, check=check)


def gdbus(address: str, subcommand: str, *args: str, uid: int | None = None,
          timeout: float = DEFAULT_TIMEOUT,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real `gdbus SUBCOMMAND --address ADDRESS ARGS...` (as uid if given)."""
    return _run(["gdbus", subcommand, "--address", address, *args], uid=uid, timeout=timeout,
                check=check)


def call_json(address: str, path: str, iface: str, method: str, signature: str = "",
              *values: str, dest: str = BUS_NAME, uid: int | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Call a method with `busctl --json=short call` and return the parsed reply,
    {"type": SIGNATURE, "data": [VALUES...]}. Values are busctl's textual arguments (for "as",
    give the count first). Raises ClientError (with busctl's stderr) when the call fails."""
    argv = ["--json=short", "call", dest, path, iface, method]
    if signature:
        argv += [signature, *values]
    done = busctl(address, *argv, uid=uid, timeout=timeout, check=True)
    if not done.stdout.strip():
        # a method with no out arguments prints nothing
        return {"type": "", "data": []}
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


def get_property(address: str, path: str, iface: str, name: str, *, dest: str = BUS_NAME,
                 uid: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A property's value read with `busctl --json=short get-property` (JSON-decoded data)."""
    done = busctl(address, "--json=short", "get-property", dest, path, iface, name, uid=uid,
                  timeout=timeout, check=True)
    return json.loads(done.stdout)["data"]


def python_as(uid: int, code: str, *args: str, timeout: float = DEFAULT_TIMEOUT,
              check: bool = False,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `sys.executable -c CODE ARGS...` as uid (tests/ is on PYTHONPATH: `import dbusrig`)."""
    return _run([sys.executable, "-c", code, *args], uid=uid, timeout=timeout, check=check,
                env=env)


# --- Gio client -----------------------------------------------------------------------------

def _remote_error(err: GLib.Error) -> RemoteError | None:
    if not Gio.DBusError.is_remote_error(err):
        return None
    name = Gio.DBusError.get_remote_error(err)
    # Gio.DBusError.strip_remote_error edits a C copy of the error in PyGObject, not our object:
    # strip the "GDBus.Error:NAME: " prefix here.
    message = err.message
    prefix = f"GDBus.Error:{name}: "
    if message.startswith(prefix):
        message = message[len(prefix):]
    return RemoteError(name, message)


class GioClient:
    """A Gio connection to a private bus, for what busctl and pydbus cannot do: unix-fd passing,
    exact remote error names, and signals. The caller owns every fd a call returns."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        try:
            self.connection: Gio.DBusConnection = Gio.DBusConnection.new_for_address_sync(
                address, CONNECTION_FLAGS, None, None)
        except GLib.Error as err:
            raise RigError(f"cannot connect to {address}: {err.message}") from err

    @property
    def unique_name(self) -> str:
        name: str = self.connection.get_unique_name()
        return name

    def call(self, path: str, iface: str, method: str, args: GLib.Variant | None = None,
             fds: Sequence[int] = (), *, dest: str = BUS_NAME, reply_type: str | None = None,
             timeout: float | None = None) -> tuple[GLib.Variant, list[int]]:
        """Call a method; `args` is a tuple variant (e.g. GLib.Variant("(sh)", ("vm", 0)) where
        h values index `fds`). Returns the reply tuple and the fds it carried (h values in the
        reply index that list). A D-Bus error raises RemoteError."""
        if args is not None and not args.get_type_string().startswith("("):
            raise TypeError(f"args must be a tuple variant, not {args.get_type_string()!r}")
        fd_list = Gio.UnixFDList.new()
        for fd in fds:
            fd_list.append(fd)  # appends a dup: the caller keeps its fd
        wait = self.timeout if timeout is None else timeout
        try:
            reply, out_fds = self.connection.call_with_unix_fd_list_sync(
                dest, path, iface, method, args,
                GLib.VariantType.new(reply_type) if reply_type else None,
                Gio.DBusCallFlags.NONE, int(wait * 1000), fd_list, None)
        except GLib.Error as err:
            remote = _remote_error(err)
            if remote is not None:
                raise remote from err
            raise
        received: list[int] = list(out_fds.steal_fds()) if out_fds is not None else []
        return reply, received

    def call_values(self, path: str, iface: str, method: str, signature: str = "",
                    values: tuple[Any, ...] = (), fds: Sequence[int] = (), *,
                    dest: str = BUS_NAME,
                    timeout: float | None = None) -> tuple[tuple[Any, ...], list[int]]:
        """call() with the in-arguments given as a signature and Python values; returns the
        unpacked reply tuple and the received fds."""
        args = GLib.Variant(f"({signature})", values) if signature else None
        reply, received = self.call(path, iface, method, args, fds, dest=dest, timeout=timeout)
        unpacked: tuple[Any, ...] = tuple(reply.unpack())
        return unpacked, received

    def get_property(self, path: str, iface: str, name: str, *, dest: str = BUS_NAME) -> Any:
        (value,), _ = self.call_values(path, PROPERTIES_IFACE, "Get", "ss", (iface, name),
                                       dest=dest)
        return value

    def name_owner(self, name: str) -> str | None:
        """The unique name owning `name`, or None."""
        try:
            (owner,), _ = self.call_values(DBUS_PATH, DBUS_IFACE, "GetNameOwner", "s", (name,),
                                           dest=DBUS_NAME)
        except RemoteError as err:
            if err.name == "org.freedesktop.DBus.Error.NameHasNoOwner":
                return None
            raise
        result: str = owner
        return result

    def request_name(self, name: str, flags: int = 4) -> int:
        """RequestName (flags default DO_NOT_QUEUE); returns the bus's reply code
        (1 primary owner, 2 in queue, 3 exists, 4 already owner)."""
        (code,), _ = self.call_values(DBUS_PATH, DBUS_IFACE, "RequestName", "su", (name, flags),
                                      dest=DBUS_NAME)
        result: int = code
        return result

    def catch_signal(self, member: str = "JobRemoved", *, path: str | None = MANAGER_PATH,
                     iface: str | None = MANAGER_IFACE,
                     sender: str | None = BUS_NAME) -> SignalCatcher:
        """A subscription to open *before* triggering the work whose signal you want."""
        return SignalCatcher(self.connection, member=member, path=path, iface=iface,
                             sender=sender)

    def close(self) -> None:
        if not self.connection.is_closed():
            with contextlib.suppress(GLib.Error):
                self.connection.close_sync(None)

    def __enter__(self) -> GioClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


SignalArgs = tuple[Any, ...]


class SignalCatcher:
    """Collects one signal on a connection in a private GLib main context, so waiting for it
    neither needs nor disturbs any other main loop. Use as a context manager."""

    def __init__(self, connection: Gio.DBusConnection, *, member: str, path: str | None,
                 iface: str | None, sender: str | None) -> None:
        self.connection = connection
        self.member = member
        self.path = path
        self.iface = iface
        self.sender = sender
        self.received: list[SignalArgs] = []
        self._context = GLib.MainContext.new()
        self._subscription: int | None = None

    def _on_signal(self, _conn: Gio.DBusConnection, _sender: str, _path: str, _iface: str,
                   _member: str, parameters: GLib.Variant) -> None:
        self.received.append(tuple(parameters.unpack()))

    def subscribe(self) -> SignalCatcher:
        # Gio delivers a subscription's signals to the context that is thread-default when it
        # subscribes: make that our private context.
        self._context.push_thread_default()
        try:
            self._subscription = self.connection.signal_subscribe(
                self.sender, self.iface, self.member, self.path, None,
                Gio.DBusSignalFlags.NONE, self._on_signal)
        finally:
            self._context.pop_thread_default()
        # A signal emitted right after our call could still beat the AddMatch to the bus; a round
        # trip to the bus orders it: the bus handles our AddMatch before this call.
        self.connection.call_sync(DBUS_NAME, DBUS_PATH, "org.freedesktop.DBus.Peer", "Ping",
                                  None, None, Gio.DBusCallFlags.NONE, 5000, None)
        return self

    def wait(self, timeout: float = 5.0,
             predicate: Callable[[SignalArgs], bool] | None = None) -> SignalArgs:
        """The first received signal's arguments (matching `predicate` if given) not yet
        returned by an earlier wait; raises SignalTimeout after `timeout` seconds."""
        if self._subscription is None:
            raise RigError("SignalCatcher.wait() before subscribe()")
        deadline = time.monotonic() + timeout
        # a periodic source bounds each blocking iteration, so the deadline is checked
        tick = GLib.timeout_source_new(int(_POLL_S * 1000))
        tick.set_callback(lambda *_: True)
        tick.attach(self._context)
        try:
            while True:
                for index, args in enumerate(self.received):
                    if predicate is None or predicate(args):
                        del self.received[index]
                        return args
                if time.monotonic() >= deadline:
                    break
                self._context.iteration(True)
        finally:
            tick.destroy()
        seen = ", ".join(repr(args) for args in self.received) or "none"
        raise SignalTimeout(f"no {self.member} signal from {self.sender} on {self.path}"
                            f"{' matching the predicate' if predicate else ''} within "
                            f"{timeout:.1f} s; other signals seen: {seen}")

    def close(self) -> None:
        if self._subscription is not None:
            self.connection.signal_unsubscribe(self._subscription)
            self._subscription = None
            # let Gio release the subscription's callback data, queued on our context
            while self._context.iteration(False):
                pass

    def __enter__(self) -> SignalCatcher:
        return self.subscribe()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def wait_signal(address: str, *, trigger: Callable[[], object] | None = None,
                member: str = "JobRemoved", path: str | None = MANAGER_PATH,
                iface: str | None = MANAGER_IFACE, sender: str | None = BUS_NAME,
                predicate: Callable[[SignalArgs], bool] | None = None,
                timeout: float = 5.0) -> SignalArgs:
    """Subscribe to a signal (JobRemoved on the Manager by default), run `trigger` (if any),
    and return the first matching signal's arguments; SignalTimeout after `timeout` s."""
    with GioClient(address) as client, client.catch_signal(
            member, path=path, iface=iface, sender=sender) as catcher:
        if trigger is not None:
            trigger()
        return catcher.wait(timeout, predicate)


# --- the daemon under test -------------------------------------------------------------------

class Daemon:
    """kho-agentd as a subprocess on a private bus:
    `ARGV --bus-address ADDR [--simulate SIMDIR] --state-dir STATEDIR EXTRA...` where ARGV is
    `sys.executable -m kho_agent.daemon` unless `argv` replaces it (for tests of the rig). It runs
    from the repository with PYTHONPATH=repo. start() returns once `name` has a new owner, and
    fails with the daemon's stderr if it exits first or takes longer than start_timeout.
    start() may be called again after stop()/kill() (a restart); `owner` is the current run's
    unique bus name."""

    def __init__(self, bus_address: str, simulate_dir: Path | None, state_dir: Path,
                 extra_args: Sequence[str] = (), *, argv: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None, start_timeout: float = 10.0,
                 name: str = BUS_NAME, log_dir: Path | None = None) -> None:
        self.bus_address = bus_address
        # fds the next start() passes to the daemon (same numbers), e.g. for LISTEN_FDS
        self.pass_fds: tuple[int, ...] = ()
        self.simulate_dir = simulate_dir
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.argv = list(argv) if argv is not None else [sys.executable, "-m", "kho_agent.daemon"]
        self.env_overrides = dict(env or {})
        self.start_timeout = start_timeout
        self.name = name
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir if log_dir is not None else Path(
            tempfile.mkdtemp(prefix="kho-agentd-log-"))
        self.owner: str | None = None
        self.runs = 0
        self._proc: subprocess.Popen[bytes] | None = None
        # the last run's output, kept when close() removes the log directory
        self._final_output: tuple[str, str] | None = None

    @property
    def command(self) -> list[str]:
        cmd = [*self.argv, "--bus-address", self.bus_address]
        if self.simulate_dir is not None:
            cmd += ["--simulate", str(self.simulate_dir)]
        return [*cmd, "--state-dir", str(self.state_dir), *self.extra_args]

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RigError("the daemon was never started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit status (negative: killed by that signal) after."""
        return None if self._proc is None else self._proc.poll()

    def _stderr_path(self) -> Path:
        return self.log_dir / f"daemon-{self.runs}.stderr"

    def stderr_text(self) -> str:
        """The current (or last) run's stderr, also after close()."""
        if self._final_output is not None:
            return self._final_output[1]
        return _read_text(self._stderr_path()) if self.runs else ""

    def stdout_text(self) -> str:
        if self._final_output is not None:
            return self._final_output[0]
        return _read_text(self.log_dir / f"daemon-{self.runs}.stdout") if self.runs else ""

    def _env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in _SCRUBBED_ENV}
        env["PYTHONPATH"] = str(REPO)
        env.update(self.env_overrides)
        return env

    def start(self) -> Daemon:
        if self._proc is not None and self._proc.poll() is None:
            raise RigError(f"the daemon is already running (pid {self._proc.pid})")
        with GioClient(self.bus_address) as watcher:
            # after a kill the bus may still list the dead process for a moment: only a new
            # owner proves that this run is up
            previous = watcher.name_owner(self.name)
            self.runs += 1
            self.owner = None
            self._final_output = None
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with self._stderr_path().open("wb") as err, \
                    (self.log_dir / f"daemon-{self.runs}.stdout").open("wb") as out:
                self._proc = subprocess.Popen(self.command, cwd=REPO, env=self._env(),
                                              stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                              start_new_session=True, pass_fds=self.pass_fds)
            deadline = time.monotonic() + self.start_timeout
            while True:
                try:
                    status = self._proc.wait(timeout=_POLL_S)
                except subprocess.TimeoutExpired:
                    status = None
                if status is not None:
                    raise RigError(
                        f"the daemon exited with status {status} before owning {self.name}; "
                        f"command: {' '.join(self.command)}\n"
                        f"stderr:\n{_tail(self.stderr_text()) or '(empty)'}")
                owner = watcher.name_owner(self.name)
                if owner is not None and owner != previous:
                    self.owner = owner
                    return self
                if time.monotonic() >= deadline:
                    break
            self.kill()
            held = f" (still held by {previous})" if previous else ""
            raise RigError(
                f"the daemon did not own {self.name}{held} within {self.start_timeout:.1f} s; "
                f"killed it; command: {' '.join(self.command)}\n"
                f"stderr:\n{_tail(self.stderr_text()) or '(empty)'}")

    def stop(self, timeout: float = 5.0, *, check: bool = True) -> int | None:
        """SIGTERM, wait up to `timeout`; returns the exit status. If it does not exit in time
        it is SIGKILLed and (with check) RigError says so, with its stderr."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
                if check:
                    raise RigError(f"the daemon did not exit within {timeout:.1f} s of SIGTERM; "
                                   f"killed it; stderr:\n{_tail(self.stderr_text())}") from None
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL and reap; returns the exit status (-9 unless it had already exited)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5.0)
        return proc.returncode

    def close(self, *, check: bool = True) -> None:
        """stop(), then remove the log directory if the rig made it."""
        try:
            self.stop(check=check)
        finally:
            if self._own_log_dir and self.log_dir.exists():
                self._final_output = (self.stdout_text(), self.stderr_text())
                shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        started = False
        try:
            self.start()
            started = True
        finally:
            if not started:
                self.close(check=False)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(check=exc is None)
