"""The systemd, D-Bus, polkit and journal-catalog files of kho-agent, checked by the programs that
read them on a real host, plus the cross-references between them and the code.

- systemd-analyze verify / security (offline), and systemd's own unit loader (`systemd --test`,
  run as nobody since it refuses root) for the dependencies that decide whether the agent
  survives the shutdown on the way to a kexec;
- a private system-type dbus-daemon with the shipped bus policy and activation file;
- polkitd itself, in a private mount namespace, reading the shipped actions and the rules example
  of docs/systemd.md;
- `journalctl --root=... --update-catalog` for the message catalog.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbusrig import NOBODY, GioClient, PrivateBus, gdbus, require_run_as

from kho_agent import daemon
from kho_agent.cli import build_parser
from kho_agent.service import contract, notify
from kho_agent.service import interfaces as api
from kho_agent.service.journal import Event

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "kho-agent.service"
DROPIN = REPO / "systemd" / "kho-agent-fdstore.conf"
TARGET = REPO / "systemd" / "kho-agent-verified.target"
UPDATE = REPO / "systemd" / "kho-agent-update.service"
TIMER = REPO / "systemd" / "kho-agent-update.timer"
BUS_POLICY = REPO / "etc" / "dbus-1" / "system.d" / "org.khoagent.Agent1.conf"
ACTIVATION = REPO / "share" / "dbus-1" / "system-services" / "org.khoagent.Agent1.service"
POLKIT_POLICY = REPO / "share" / "polkit-1" / "actions" / "org.khoagent.Agent1.policy"
CATALOG = REPO / "catalog" / "kho-agent.catalog"
DOCS = REPO / "docs" / "systemd.md"

SYSTEMD_BINARY = Path("/usr/lib/systemd/systemd")
# The exposure this unit reaches (systemd-analyze security, 0..10, lower is better), in the
# tenths `--threshold=` takes: a change that weakens the sandbox fails here.
EXPOSURE_DIRECT = 21
EXPOSURE_FDSTORE = 21
EXPOSURE_UPDATE = 14   # kho-agent-update.service
# Keys of the fdstore drop-in newer than some systemd this test may run on: (key, first version).
NEWER_KEYS = {"FileDescriptorStorePreserve": 254}


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"not installed here: {', '.join(missing)}")


def systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys stay repeated."""
    entries = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, key: str, section: str | None = None) -> list[str]:
    return [v for s, k, v in unit_entries(path) if k == key and section in (None, s)]


@pytest.fixture
def unit_dir() -> Iterator[Path]:
    """A world-readable directory holding the units (`systemd --test` runs as nobody), with a
    separate /var and a tmpfs /tmp as mount units: a host where a mount stopped at shutdown
    could take the agent with it."""
    directory = Path(tempfile.mkdtemp(prefix="kho-units-", dir="/tmp"))
    directory.chmod(0o755)
    for unit in (UNIT, TARGET, UPDATE, TIMER):
        shutil.copy(unit, directory)
    (directory / "var.mount").write_text("[Mount]\nWhat=/dev/vdb\nWhere=/var\nType=ext4\n")
    (directory / "tmp.mount").write_text("[Mount]\nWhat=tmpfs\nWhere=/tmp\nType=tmpfs\n")
    for path in directory.iterdir():
        path.chmod(0o644)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def add_dropin(directory: Path) -> None:
    dropins = directory / "kho-agent.service.d"
    dropins.mkdir(mode=0o755)
    shutil.copy(DROPIN, dropins / "fdstore.conf")
    (dropins / "fdstore.conf").chmod(0o644)


# --- systemd-analyze ------------------------------------------------------------------------

def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    need("systemd-analyze")
    units = [str(unit_dir / name) for name in ("kho-agent.service", "kho-agent-verified.target",
                                               "kho-agent-update.service",
                                               "kho-agent-update.timer")]
    for with_dropin in (False, True):
        if with_dropin:
            add_dropin(unit_dir)
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                              capture_output=True, text=True, timeout=60, check=False)
        # warnings still exit 0: any output at all is a finding
        assert (done.returncode, done.stdout) == (0, ""), with_dropin
        assert unexpected_lines(done.stderr) == [], with_dropin


def unexpected_lines(stderr: str) -> list[str]:
    """stderr of systemd-analyze minus the one line that is unavoidable here: on systemd < 254
    FileDescriptorStorePreserve= (the point of the fdstore drop-in, for systemd >= 261) is an
    unknown key. Any other line, or that line on a systemd that knows the key, is a finding."""
    version = systemd_version()
    newer = [key for key, since in NEWER_KEYS.items() if version < since]
    return [line for line in stderr.splitlines()
            if not any(f"Unknown key '{key}' in section [Service], ignoring." in line
                       for key in newer)]


def test_dropin_uses_no_key_this_systemd_does_not_know_except_newer_ones(
        unit_dir: Path) -> None:
    # `verify` keeps quiet about unknown keys in drop-ins; `security` loads the same unit and
    # says it. On systemd < 254 FileDescriptorStorePreserve= is unknown (it is what the
    # drop-in is for, on >= 261): that one line is expected here, nothing else.
    need("systemd-analyze")
    add_dropin(unit_dir)
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           str(unit_dir / "kho-agent.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    unknown = set(re.findall(r"Unknown key '([A-Za-z]+)'", done.stderr))
    version = systemd_version()
    assert unknown == {key for key, since in NEWER_KEYS.items() if version < since}
    assert unexpected_lines(done.stderr) == []


def security(unit: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           *args, str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize(("with_dropin", "threshold"), [(False, EXPOSURE_DIRECT),
                                                        (True, EXPOSURE_FDSTORE)])
def test_security_exposure_and_every_remaining_exposure_is_justified(
        unit_dir: Path, with_dropin: bool, threshold: int) -> None:
    need("systemd-analyze")
    if with_dropin:
        add_dropin(unit_dir)
    unit = unit_dir / "kho-agent.service"
    text = security(unit).stdout
    match = re.search(r"Overall exposure level for kho-agent\.service: (\d+\.\d+)", text)
    assert match, text
    print(f"systemd-analyze security ({'fdstore' if with_dropin else 'direct'}): "
          f"{match.group(1)}")
    assert security(unit, f"--threshold={threshold}").returncode == 0, text
    rows = json.loads(security(unit, "--json=short").stdout)
    exposed = sorted(row["name"] for row in rows if row["set"] is False)
    assert exposed, "the agent needs root: some exposure must remain"
    docs = DOCS.read_text()
    unexplained = [name for name in exposed if f"`{name}`" not in docs]
    assert unexplained == [], "docs/systemd.md must justify every remaining exposure"


# --- systemd's own unit loader --------------------------------------------------------------

def loaded_unit(directory: Path, unit: str) -> str:
    """The state dump of `unit` as systemd 252+ loads it (`systemd --test --system`), with
    every implicit dependency added."""
    if os.geteuid() != 0:
        pytest.skip("dropping to nobody for `systemd --test` needs root")
    need("setpriv")
    if not SYSTEMD_BINARY.exists():
        pytest.skip(f"{SYSTEMD_BINARY} is not installed")
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         str(SYSTEMD_BINARY), "--system", "--test", f"--unit={unit}", "--log-target=console"],
        env={"SYSTEMD_UNIT_PATH": f"{directory}:", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    start = out.find(f"-> Unit {unit}:")
    assert start >= 0, out[-2000:]
    end = out.find("\t-> Unit ", start + 1)
    return out[start:end if end > 0 else None]


def dependencies(dump: str) -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {}
    for match in re.finditer(r"^\t\t(\w+): (\S+) \(", dump, re.MULTILINE):
        deps.setdefault(match.group(1), set()).add(match.group(2))
    return deps


def test_direct_mode_has_nothing_that_would_stop_it_at_shutdown(unit_dir: Path) -> None:
    dump = loaded_unit(unit_dir, "kho-agent.service")
    deps = dependencies(dump)
    assert "DefaultDependencies: no" in dump
    # a stop of any of these propagates to the agent; system.slice is perpetual
    for kind in ("Requires", "Requisite", "BindsTo", "PartOf"):
        assert deps.get(kind, set()) <= {"system.slice"}, (kind, deps.get(kind))
    assert "shutdown.target" not in deps.get("Conflicts", set())
    # it still starts at boot after the file systems and the bus
    assert {"sysinit.target", "local-fs.target", "dbus.socket"} <= deps["After"]
    assert {"sysinit.target", "dbus.socket"} <= deps["Wants"]
    # argv[0] is what systemd-shutdown reads in /proc/PID/cmdline
    assert "Command Line: @kho-agentd -m kho_agent.daemon --bus system" in dump


def test_fdstore_mode_is_an_ordinary_service_again(unit_dir: Path) -> None:
    add_dropin(unit_dir)
    dump = loaded_unit(unit_dir, "kho-agent.service")
    deps = dependencies(dump)
    assert "DefaultDependencies: yes" in dump
    assert "shutdown.target" in deps["Conflicts"] and "shutdown.target" in deps["Before"]
    # stopped before /var is unmounted: it writes its state on the way down
    assert "var.mount" in deps["Requires"] and "var.mount" in deps["After"]
    assert "Command Line: /usr/bin/python3 -m kho_agent.daemon --bus system" in dump
    assert "File Descriptor Store Max: 1024" in dump


def test_verified_target_is_conditioned_on_the_flag_the_notifier_writes(
        unit_dir: Path) -> None:
    dump = loaded_unit(unit_dir, "kho-agent-verified.target")
    flag = notify.DEFAULT_RUNTIME_DIR / notify.VERIFIED_FLAG
    assert f"ConditionPathExists: {flag} " in dump
    assert "kho-agent.service" in dependencies(dump)["After"]
    assert values(UNIT, "RuntimeDirectory") == [notify.DEFAULT_RUNTIME_DIR.name]
    assert TARGET.name == notify.VERIFIED_TARGET


def test_exec_start_runs_the_daemon_with_arguments_it_accepts() -> None:
    (exec_start,) = values(UNIT, "ExecStart", "Service")
    path, argv0, *args = exec_start.split()
    assert path == "@/usr/bin/python3" and argv0 == "@kho-agentd"
    assert args[:2] == ["-m", "kho_agent.daemon"]
    parsed = daemon.parse_args(args[2:])
    assert parsed.bus == "system" and parsed.bus_address is None and parsed.simulate is None
    dropin_exec = [v for v in values(DROPIN, "ExecStart", "Service") if v]
    assert dropin_exec == [exec_start.replace("@/usr/bin/python3 @kho-agentd",
                                              "/usr/bin/python3")]
    assert values(UNIT, "BusName") == [api.BUS_NAME]


def test_the_update_unit_runs_kho_agentctl_update_and_leaves_its_result_in_run(
        unit_dir: Path) -> None:
    dump = loaded_unit(unit_dir, "kho-agent-update.service")
    deps = dependencies(dump)
    assert "kho-agent.service" in deps["Requires"] and "kho-agent.service" in deps["After"]
    # an ordinary unit: stopped on the way to the kexec it starts, never holding it up
    assert "DefaultDependencies: yes" in dump and "shutdown.target" in deps["Conflicts"]
    assert values(UPDATE, "Type") == ["oneshot"]
    assert values(UPDATE, "WantedBy") == []   # started on demand, never enabled
    (exec_start,) = values(UPDATE, "ExecStart", "Service")
    python, dash_m, module, *argv = exec_start.split()
    assert (python, dash_m, module) == ("/usr/bin/python3", "-m", "kho_agent.cli")
    parsed = build_parser().parse_args(argv)
    assert parsed.command == "update" and parsed.json and not parsed.check
    assert parsed.kernel is None and parsed.ready_timeout is None   # the configuration's
    # the result file is in the daemon's runtime directory, which outlives its restarts
    (output,) = values(UPDATE, "StandardOutput")
    assert output == f"truncate:{notify.DEFAULT_RUNTIME_DIR}/update.json"
    assert values(UNIT, "RuntimeDirectoryPreserve") == ["yes"]


def test_the_update_unit_is_sandboxed(unit_dir: Path) -> None:
    """A D-Bus client as root: no capability, no network, a read-only system."""
    need("systemd-analyze")
    unit = unit_dir / "kho-agent-update.service"
    assert security(unit, f"--threshold={EXPOSURE_UPDATE}").returncode == 0, \
        security(unit).stdout
    assert values(UPDATE, "CapabilityBoundingSet") == [""]
    assert values(UPDATE, "RestrictAddressFamilies") == ["AF_UNIX"]


def test_the_timer_starts_the_update_unit_and_is_only_an_example(unit_dir: Path) -> None:
    dump = loaded_unit(unit_dir, "kho-agent-update.timer")
    assert "kho-agent-update.service" in dependencies(dump)["Triggers"]
    assert values(TIMER, "WantedBy") == ["timers.target"]
    # the package enables the daemon only (packaging/debian/rules)
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    assert re.findall(r"^\tdh_installsystemd .*", rules, re.MULTILINE) == [
        "\tdh_installsystemd --no-stop-on-upgrade --no-restart-after-upgrade kho-agent.service"]


# --- the D-Bus policy -----------------------------------------------------------------------

def interface_methods() -> dict[str, set[str]]:
    methods: dict[str, set[str]] = {}
    for xml in (contract.MANAGER_XML, contract.JOB_XML, contract.SESSION_XML):
        for iface in ET.fromstring(xml).iter("interface"):
            methods[iface.attrib["name"]] = {m.attrib["name"] for m in iface.iter("method")}
    return methods


def test_bus_policy_lists_exactly_the_methods_of_the_interfaces() -> None:
    root = ET.parse(BUS_POLICY).getroot()
    policies = {(p.get("user"), p.get("context")): p for p in root.iter("policy")}
    owner = policies[("root", None)]
    assert any(a.attrib == {"own": api.BUS_NAME} for a in owner.iter("allow"))
    default = policies[(None, "default")]
    assert [d.attrib for d in default.iter("deny")] == [{"send_destination": api.BUS_NAME}]
    allowed: dict[str, set[str]] = {}
    for allow in default.iter("allow"):
        if "send_interface" in allow.attrib:
            assert allow.get("send_destination") == api.BUS_NAME
            allowed.setdefault(allow.attrib["send_interface"], set()).add(
                allow.get("send_member", "*"))
    expected = {iface: members for iface, members in interface_methods().items() if members}
    expected.update({"org.freedesktop.DBus.Introspectable": {"*"},
                     "org.freedesktop.DBus.Peer": {"*"},
                     "org.freedesktop.DBus.Properties": {"Get", "GetAll"}})
    assert allowed == expected


def remote_error(done: subprocess.CompletedProcess[str]) -> str | None:
    """The D-Bus error name of a failed `gdbus call`, None if it succeeded."""
    if done.returncode == 0:
        return None
    match = re.search(r"GDBus\.Error:([\w.]+)", done.stderr)
    assert match, done.stderr
    return match.group(1)


def test_system_bus_with_the_shipped_policy() -> None:
    need("dbus-daemon", "gdbus")
    require_run_as(NOBODY)
    services = ACTIVATION.parent
    with PrivateBus("system", policy="shipped", shipped_policy=BUS_POLICY,
                    extra_policy=f"<servicedir>{services}</servicedir>") as bus, \
            GioClient(bus.address) as agent:
        assert agent.request_name(api.BUS_NAME) == 1  # root owns it
        (names,), _ = agent.call_values("/org/freedesktop/DBus", "org.freedesktop.DBus",
                                        "ListActivatableNames", dest="org.freedesktop.DBus")
        assert api.BUS_NAME in names  # the activation file parses

        def as_nobody(iface: str, member: str, *args: str,
                      dest: str = api.BUS_NAME, path: str = api.MANAGER_PATH) -> str | None:
            return remote_error(gdbus(bus.address, "call", "--dest", dest, "--object-path",
                                      path, "--method", f"{iface}.{member}", *args,
                                      uid=NOBODY, timeout=10))

        denied = "org.freedesktop.DBus.Error.AccessDenied"
        assert as_nobody("org.freedesktop.DBus", "RequestName", api.BUS_NAME, "4",
                         dest="org.freedesktop.DBus", path="/org/freedesktop/DBus") == denied
        # the bus lets these through to the agent, which has nothing registered here and
        # answers that itself (Introspect even succeeds): anything but AccessDenied proves
        # that the policy let them pass
        for iface, member, args in [
                (api.MANAGER_IFACE, "GetManifest", ()),
                (api.MANAGER_IFACE, "Prepare", ("@a{sv} {}",)),
                (api.MANAGER_IFACE, "CreateSession", ("'vm'",)),
                (api.JOB_IFACE, "Cancel", ()),
                ("org.freedesktop.DBus.Properties", "GetAll", (f"'{api.MANAGER_IFACE}'",)),
                ("org.freedesktop.DBus.Introspectable", "Introspect", ())]:
            assert as_nobody(iface, member, *args) != denied, member
        # and keeps out what the interfaces do not offer
        assert as_nobody("org.freedesktop.DBus.Properties", "Set", f"'{api.MANAGER_IFACE}'",
                         "'State'", "<'idle'>") == denied
        assert as_nobody(api.MANAGER_IFACE, "Reboot") == denied


def test_activation_file_names_the_unit() -> None:
    lines = ACTIVATION.read_text().splitlines()
    body = [line for line in lines if line and not line.startswith("#")]
    assert body[0] == "[D-BUS Service]"
    fields = dict(line.split("=", 1) for line in body[1:])
    assert fields["Name"] == api.BUS_NAME
    assert fields["SystemdService"] == UNIT.name
    assert fields["User"] == "root"


# --- polkit ---------------------------------------------------------------------------------

def test_polkit_policy_declares_the_actions_the_daemon_checks() -> None:
    text = POLKIT_POLICY.read_text()
    assert "<!DOCTYPE policyconfig" in text
    root = ET.fromstring(text)
    actions = {a.attrib["id"]: a for a in root.iter("action")}
    assert set(actions) == {api.ACTION_MANAGE, api.ACTION_SESSION, api.ACTION_INHIBIT}
    for action in actions.values():
        defaults = action.find("defaults")
        assert defaults is not None
        assert {d.tag: d.text for d in defaults} == {
            "allow_any": "auth_admin_keep", "allow_inactive": "auth_admin_keep",
            "allow_active": "auth_admin_keep"}
        assert (action.findtext("description") or "").strip()
        assert (action.findtext("message") or "").strip()


def rules_example() -> str:
    docs = DOCS.read_text()
    match = re.search(r"<!-- polkit-rules-example -->\s*```js\n(.*?)```", docs, re.DOTALL)
    assert match, "docs/systemd.md lost its polkit rules example"
    return match.group(1)


POLKIT_SCRIPT = r"""
set -eu
mount --bind "$T/actions" /usr/share/polkit-1/actions
mount --bind "$T/rules" /etc/polkit-1/rules.d
mount -t tmpfs -o mode=0755 tmpfs /usr/share/polkit-1/rules.d
mkdir -p /run/dbus
mount --bind "$T/run" /run/dbus
PK=; S=
trap 'set +e; kill $(cat /run/dbus/pid 2>/dev/null) $PK $S 2>/dev/null; wait' EXIT
dbus-daemon --system --fork
setpriv --reuid=polkitd --regid=polkitd --init-groups /usr/lib/polkit-1/polkitd --no-debug \
    >/dev/null 2>&1 &
PK=$!
setpriv --reuid=nobody --regid=nogroup --clear-groups sleep 60 &
S=$!
for i in $(seq 100); do
    pkaction --action-id org.khoagent.Agent1.manage >/dev/null 2>&1 && break
    sleep 0.05
done
pkaction --verbose --action-id org.khoagent.Agent1.manage
pkaction --verbose --action-id org.khoagent.Agent1.session
rc=0; pkcheck --action-id org.khoagent.Agent1.session --process $S >/dev/null 2>&1 || rc=$?
echo "SESSION_RC=$rc"
rc=0; pkcheck --action-id org.khoagent.Agent1.manage --process $S >/dev/null 2>&1 || rc=$?
echo "MANAGE_RC=$rc"
"""


def test_polkitd_reads_the_actions_and_the_documented_rule_works(tmp_path: Path) -> None:
    """polkitd itself, in a private mount namespace (the host's polkit and buses untouched):
    the actions parse with the defaults we wrote, and the rules example of docs/systemd.md,
    with its group replaced by nobody's, gives a VM manager the session action and nothing
    more."""
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace for polkitd needs root")
    need("unshare", "setpriv", "dbus-daemon", "pkaction", "pkcheck")
    if not Path("/usr/lib/polkit-1/polkitd").exists():
        pytest.skip("polkitd is not installed")
    try:
        import pwd

        polkitd_uid = pwd.getpwnam("polkitd").pw_uid
    except KeyError:
        pytest.skip("no polkitd user")
    for sub in ("actions", "rules", "run"):
        (tmp_path / sub).mkdir()
    tmp_path.chmod(0o755)
    shutil.copy(POLKIT_POLICY, tmp_path / "actions")
    (tmp_path / "rules" / "50-kho-agent-vmm.rules").write_text(
        rules_example().replace('"kho-vmm"', '"nogroup"'))
    os.chown(tmp_path / "rules", polkitd_uid, 0)
    os.chown(tmp_path / "rules" / "50-kho-agent-vmm.rules", polkitd_uid, 0)
    (tmp_path / "rules").chmod(0o700)
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c",
                           POLKIT_SCRIPT], env={**os.environ, "T": str(tmp_path)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for action in (api.ACTION_MANAGE, api.ACTION_SESSION):
        block = done.stdout.split(f"{action}:", 1)[1]
        for kind in ("any", "inactive", "active"):
            assert re.search(rf"implicit {kind}:\s+auth_admin_keep", block), block
    # 0: authorized by the rule; 2: would need an administrator's password (pkcheck(1))
    assert "SESSION_RC=0" in done.stdout
    assert "MANAGE_RC=2" in done.stdout


# --- the journal catalog --------------------------------------------------------------------

def catalog_entries() -> dict[str, dict[str, str]]:
    """Our own reading of the catalog format: `-- <32 hex>` starts an entry, header lines
    (Key: value) until a blank line, then the body."""
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    in_header = False
    for line in CATALOG.read_text().splitlines():
        if line.startswith("-- "):
            message_id = line[3:].strip()
            assert re.fullmatch(r"[0-9a-f]{32}", message_id), line
            assert message_id not in entries, f"{message_id} twice"
            current = entries[message_id] = {"body": ""}
            in_header = True
        elif current is None:
            assert line == "" or line.startswith("#"), f"text before the first entry: {line!r}"
        elif in_header:
            if line == "":
                in_header = False
                continue
            key, sep, value = line.partition(": ")
            assert sep and re.fullmatch(r"[A-Z][A-Za-z-]*", key), f"bad header {line!r}"
            current[key] = value
        else:
            current["body"] += line + "\n"
    return entries


def test_catalog_has_one_entry_per_event() -> None:
    entries = catalog_entries()
    assert set(entries) == {event.message_id for event in Event}
    for message_id, entry in entries.items():
        assert entry.get("Subject"), message_id
        assert entry["body"].strip(), message_id
    # the fields the texts refer to are ones the agent sends (KHO_AGENT_ + a field name)
    used = set(re.findall(r"@([A-Z0-9_]+)@", CATALOG.read_text()))
    assert used and all(name.startswith("KHO_AGENT_") for name in used)


def test_journalctl_builds_the_catalog_database(tmp_path: Path) -> None:
    need("journalctl")
    catalog_dir = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir)
    done = subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog",
                             "--no-pager"], capture_output=True, text=True, timeout=60,
                            check=True).stdout
    ids = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert ids == {event.message_id for event in Event}
