"""The Ansible collection (packaging/ansible): ansible-lint's production profile, the playbooks'
syntax, the agent role's drop-in (ansible_connection=local), and the rolling update played
against three "hosts" that are three simulated daemons (`kho-agentd --simulate`), each on its
own private dbus-daemon with a VM session to carry. Skipped without ansible-playbook (.ci/run
installs Debian's ansible-core and ansible-lint; the default test run does not need them).

Each host's kexec is the simulated one: the daemon's process ends as the host would, and the
test starts it again (the next boot), as the QEMU suite's guests boot their new kernel. The
rolling update goes through Ansible's ssh connection plugin with a stand-in ssh program
(KEXEC_SSH) that runs commands here and drops the first connection after a host's boot id
changed, as the kexec drops a real one (and one more where a test asks: the network's blip).

Everything the playbook runs on a host is the real kho-agentctl (`update` included), except
systemctl and journalctl, stand-ins that say what a test wrote for them (there is no systemd to
ask here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ansiblerig import COLLECTION, link_collection, recap
from dbusrig import (
    MANAGER_IFACE,
    MANAGER_PATH,
    Daemon,
    GioClient,
    PrivateBus,
    RigError,
    client_env,
)
from test_ctl import INCOMPATIBLE, create_ready_session

from kho_agent.sim import SimKernel
from kho_agent.sim.versions import SimAbi

REPO = Path(__file__).resolve().parent.parent
PLAYBOOKS = COLLECTION / "playbooks"
# kho-agentctl as the hosts run it
CTL = [sys.executable, "-m", "kho_agent.cli"]
PLAYBOOK_TIMEOUT = 300.0
OLD, NEW = "7.3.0-sim", "7.3.1-sim"

pytestmark = pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                                reason="ansible-playbook is not installed (.ci/run installs "
                                "Debian's ansible-core)")


def ansible_env(tmp_path: Path) -> dict[str, str]:
    """ansible-* with the collection found where it is in the checkout (a collections tree in
    tmp_path whose khoagent/liveupdate is a link to packaging/ansible), nothing read from or
    written to the machine's ~/.ansible, and no colours."""
    collections = link_collection(tmp_path)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return client_env({"HOME": str(home), "ANSIBLE_COLLECTIONS_PATH": str(collections),
                       "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_NOCOLOR": "1",
                       "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                       "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3", "NO_COLOR": "1"})


def run(argv: list[str], env: dict[str, str], cwd: Path = REPO
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, check=False,
                          timeout=PLAYBOOK_TIMEOUT, stdin=subprocess.DEVNULL)


def failures(output: str) -> dict[str, str]:
    """host -> the message of its failed task (`fatal: [host]: FAILED! => {...}`)."""
    return {m.group(1): json.loads(m.group(2))["msg"]
            for m in re.finditer(r"^fatal: \[(\S+)\]: FAILED! => (\{.*\})$", output, re.M)}


# --- lint and syntax ------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("ansible-lint") is None, reason="ansible-lint is not installed")
def test_ansible_lint_passes_with_the_production_profile(tmp_path: Path) -> None:
    done = run(["ansible-lint", "--offline", "--profile", "production", "--nocolor"],
               ansible_env(tmp_path), cwd=COLLECTION)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Passed with production profile: 0 failure(s), 0 warning(s)" in output, output


def test_the_collection_builds_and_its_playbooks_pass_the_syntax_check(tmp_path: Path) -> None:
    env = ansible_env(tmp_path)
    built = run(["ansible-galaxy", "collection", "build", "--output-path", str(tmp_path),
                 str(COLLECTION)], env)
    assert built.returncode == 0, built.stdout + built.stderr
    (tarball,) = tmp_path.glob("khoagent-liveupdate-*.tar.gz")
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    assert {"MANIFEST.json", "playbooks/rolling_update.yml",
            "roles/rolling_update/tasks/main.yml", "roles/agent/tasks/main.yml",
            "roles/agent/templates/agent.conf.j2"} <= names, sorted(names)
    # installed as an operator installs it (no network: a local tarball without dependencies),
    # where nothing else provides it (the checkout's link is not on this path)
    installed = tmp_path / "installed"
    env["ANSIBLE_COLLECTIONS_PATH"] = str(installed)
    done = run(["ansible-galaxy", "collection", "install", "--offline", "-p", str(installed),
                str(tarball)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (installed / "ansible_collections" / "khoagent" / "liveupdate" / "MANIFEST.json"
            ).is_file()
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[kho_fleet]\nhost-a\nhost-b\n")
    for playbook in ("khoagent.liveupdate.rolling_update", "khoagent.liveupdate.agent"):
        checked = run(["ansible-playbook", "-i", str(inventory), "--syntax-check", playbook], env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = run(["ansible-playbook", "-i", str(inventory), "--list-hosts",
                  "khoagent.liveupdate.rolling_update"], env)
    assert re.search(r"hosts \(2\):\s+host-[ab]\s+host-[ab]\s*$", listed.stdout), listed.stdout


# --- the agent role -------------------------------------------------------------------------

# The agent role writes where the daemon reads, /etc/kho-agent: the play runs in a private mount
# namespace whose /etc is an overlay with its upper directory in the test's root, so that what it
# writes lands in ROOT/etc and this machine's /etc is not touched.
PRIVATE_ETC = ('mount -t overlay overlay -o "lowerdir=/etc,upperdir=$0/etc,workdir=$0/work" /etc '
               '&& exec "$@"')


def in_private_etc(root: Path, argv: list[str]) -> list[str]:
    """`argv` run with /etc overlaid by ROOT/etc (ROOT/work: the overlay's work directory)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_ETC,
            str(root), *argv]


@dataclass
class AgentHost:
    """The agent role's programs moved under tmp_path, and the /etc it writes to."""

    root: Path
    inventory: Path
    env: dict[str, str]

    @property
    def dropin(self) -> Path:
        return self.root / "etc" / "kho-agent" / "agent.conf.d" / "50-ansible.conf"

    def play(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return run(in_private_etc(self.root, [
            "ansible-playbook", "-i", str(self.inventory), str(PLAYBOOKS / "agent.yml"),
            "-e", "kho_become=false", *extra]), self.env)


@pytest.fixture
def agent_host(tmp_path: Path) -> AgentHost:
    if os.geteuid() != 0:
        pytest.skip("the agent role makes its files root's (CI runs as root)")
    root = tmp_path / "root"
    (root / "etc" / "kho-agent" / "agent.conf.d").mkdir(parents=True)
    (root / "work").mkdir()
    probe = subprocess.run(in_private_etc(root, ["true"]), capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot overlay /etc in a private mount namespace: {probe.stderr.strip()}")
    # kho-agentd --check-config reads the configuration under --config-root (the role's scratch
    # root, or this host's root for the whole-configuration check)
    agentd = tmp_path / "kho-agentd"
    agentd.write_text("#!/bin/sh\n"
                      f"[ \"$2\" = --config-root ] || set -- \"$@\" --config-root {root}\n"
                      f"PYTHONPATH={REPO} exec {sys.executable} -m kho_agent.daemon \"$@\"\n")
    # restart-check: an update is held, so the role must not restart the daemon
    check = tmp_path / "restart-check"
    check.write_text("#!/bin/sh\necho 'kho-agentd holds a live update (state prepared)'\n"
                     "exit 1\n")
    for program in (agentd, check):
        program.chmod(0o755)
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"kho_fleet": {"hosts": {"host-a": {
        "ansible_connection": "local", "agent_agentd": str(agentd),
        "agent_restart_check": str(check), "agent_service_started": False}}}}))
    return AgentHost(root, inventory, ansible_env(tmp_path))


def test_the_agent_role_writes_a_dropin_the_daemon_reads(agent_host: AgentHost) -> None:
    config = {"agent_target": "newest-compatible", "agent_initrd": "none",
              "agent_handoff_mode": "fdstore",
              "agent_maintenance_windows": ["Mon..Fri 02:00-04:00", "Sat,Sun 00:00-06:00"],
              "agent_claim_grace_sec": "45min", "agent_digests": False,
              "agent_metrics_directory": "", "agent_history_max_entries": 50}
    checked = agent_host.play("-e", json.dumps(config), "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert recap(checked.stdout)["host-a"]["changed"] == 1   # it would write the drop-in
    assert not agent_host.dropin.exists()

    done = agent_host.play("-e", json.dumps(config))
    assert done.returncode == 0, done.stdout + done.stderr
    text = agent_host.dropin.read_text()
    sections = re.findall(r"^\[(\w+)\]$", text, re.M)
    assert sections == ["Prepare", "Commit", "Sessions", "Records"], text
    assignments = [line for line in text.splitlines() if "=" in line and not line.startswith("#")]
    assert assignments == ["Target=newest-compatible", "Initrd=none", "HandoffMode=fdstore",
                           "MaintenanceWindow=", "MaintenanceWindow=Mon..Fri 02:00-04:00",
                           "MaintenanceWindow=Sat,Sun 00:00-06:00", "ClaimGraceSec=45min",
                           "Digests=no", "MetricsDirectory=", "HistoryMaxEntries=50"], text
    # the daemon reads it as meant: --check-config prints each key's effective value
    shown = subprocess.run([sys.executable, "-m", "kho_agent.daemon", "--check-config",
                            "--config-root", str(agent_host.root)], capture_output=True,
                           text=True, env=client_env(), check=False)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^HandoffMode=fdstore$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^Digests=no$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^Initrd=none$", shown.stdout, re.M), shown.stdout
    # restart-check said an update is held: not restarted, and the play says so
    assert "kho-agent was not restarted: kho-agentd holds a live update" in done.stdout
    assert recap(done.stdout)["host-a"]["changed"] == 1

    again = agent_host.play("-e", json.dumps(config))
    assert again.returncode == 0, again.stdout + again.stderr
    assert recap(again.stdout)["host-a"]["changed"] == 0
    assert "was not restarted" not in again.stdout


def test_the_agent_role_refuses_a_value_the_daemon_would_refuse(agent_host: AgentHost) -> None:
    done = agent_host.play("-e", "agent_handoff_mode=kexec")
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(r"host-a: kho-agentd refuses the configuration this role would write "
                     r"\(the host keeps its own\): .*\[Commit\] HandoffMode=: 'kexec' is not a "
                     r"hand-off mode", done.stdout), done.stdout
    assert not agent_host.dropin.exists()
    # an initrd's path goes with a kernel's path only, not with newest-compatible
    done = agent_host.play("-e", json.dumps({"agent_target": "newest-compatible",
                                             "agent_initrd": "/boot/initrd.img-7.3.1"}))
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(r"host-a: kho-agentd refuses the configuration this role would write "
                     r"\(the host keeps its own\): .*\[Prepare\] Initrd=/boot/initrd.img-7.3.1: a "
                     r"path goes with a Target= path only", done.stdout), done.stdout
    assert not agent_host.dropin.exists()


# --- the rolling update -----------------------------------------------------------------------

# The transport: Ansible's ssh connection plugin with this program as its ssh executable
# (pipelining on: the module goes on stdin, no file transfer). It runs the command on this
# machine, as ssh would on the host, except for the first connection after the host's boot id
# changed: that one fails as ssh does when the kexec took the host away under it (exit 255, which
# Ansible reports as unreachable). So every kexec costs the play one lost connection, whichever
# task meets it, as on real hosts. A test drops one more connection, not a kexec, by making the
# file HOST.blip (the connection that finds it removes it; the first command that runs after it
# makes HOST.answered). The commands run with the ssh
# directory's bin first on PATH: the stand-ins for systemctl and journalctl (SYSTEMCTL and
# JOURNALCTL).
KEXEC_SSH = """\
import os, subprocess, sys
args = sys.argv[1:]
if "-O" in args:                      # ControlMaster check/stop (connection reset)
    sys.exit(0)
host, command = args[-2], args[-1]
state = os.path.join(os.environ["KHO_TEST_SSH_DIR"], host)
with open(state + ".boot_id_path") as f:
    boot_id_path = f.read()
def boot_id():
    with open(boot_id_path) as f:
        return f.read().strip()
def lost(now):
    with open(state + ".seen", "w") as f:
        f.write(now)
    with open(state + ".lost", "a") as f:
        f.write(now + "\\n")
    sys.stderr.write(f"Connection to {host} closed by remote host.\\n")
    sys.exit(255)
before = boot_id()
seen = open(state + ".seen").read() if os.path.exists(state + ".seen") else before
if seen != before:
    lost(before)
if os.path.exists(state + ".blip"):   # the network, not the kexec
    os.unlink(state + ".blip")
    with open(state + ".blips", "a") as f:
        f.write(before + "\\n")
    sys.stderr.write(f"Connection to {host} closed by remote host.\\n")
    sys.exit(255)
with open(state + ".seen", "w") as f:
    f.write(before)
bin_dir = os.path.join(os.environ["KHO_TEST_SSH_DIR"], "bin")
env = dict(os.environ, PATH=bin_dir + ":" + os.environ["PATH"], KHO_TEST_HOST_STATE=state)
done = subprocess.run(["sh", "-c", command], capture_output=True, env=env)
after = boot_id()
if after != before:                   # the kexec came while the command ran: it died with it
    lost(after)
if os.path.exists(state + ".blips"):  # the host answered again after a blip
    open(state + ".answered", "w").close()
sys.stdout.buffer.write(done.stdout)
sys.stderr.buffer.write(done.stderr)
sys.exit(done.returncode)
"""

# `systemctl show UNIT -p ...` as the test has it for a host (HOST.unit: the KEY=VALUE lines
# systemctl would print), and `systemctl is-system-running` (HOST.system-state, or running);
# without HOST.unit,
# systemctl's answer where systemd does not run.
SYSTEMCTL = """\
#!/bin/sh
if [ "$1" = show ] && [ -f "$KHO_TEST_HOST_STATE.unit" ]; then
    exec cat "$KHO_TEST_HOST_STATE.unit"
fi
if [ "$1" = is-system-running ] && [ -f "$KHO_TEST_HOST_STATE.unit" ]; then
    cat "$KHO_TEST_HOST_STATE.system-state" 2>/dev/null || echo running
    exit 0
fi
echo "System has not been booted with systemd as init system (PID 1). Can't operate." >&2
exit 1
"""
# `journalctl --unit UNIT ...`: HOST.journal.
JOURNALCTL = """\
#!/bin/sh
[ -f "$KHO_TEST_HOST_STATE.journal" ] && exec cat "$KHO_TEST_HOST_STATE.journal"
echo "No journal files were found." >&2
exit 1
"""


@dataclass
class SimHost:
    """One "host": a private bus, a simulated kernel running OLD, a daemon whose Target= is an
    image of `target_abi`, and a VM manager holding one ready session."""

    name: str
    bus: PrivateBus
    daemon: Daemon
    simdir: Path
    result: Path
    content: bytes
    ssh: Path
    ssh_dir: Path

    @property
    def boot_id_path(self) -> Path:
        return self.simdir / "root" / "proc" / "sys" / "kernel" / "random" / "boot_id"

    def lost_connections(self) -> list[str]:
        """The boot ids at which the transport dropped a connection (one per kexec)."""
        lost = self.ssh_dir / f"{self.name}.lost"
        return lost.read_text().split() if lost.exists() else []

    def blips(self) -> list[str]:
        """The boot ids at which the transport dropped a connection for HOST.blip."""
        blips = self.ssh_dir / f"{self.name}.blips"
        return blips.read_text().split() if blips.exists() else []

    def state_file(self, suffix: str) -> Path:
        """HOST.SUFFIX in the transport's directory (unit, journal, blip)."""
        return self.ssh_dir / f"{self.name}.{suffix}"

    def ctl(self, *argv: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "kho_agent.cli", "--bus-address",
                               self.bus.address, *argv, "--json"], capture_output=True,
                              text=True, env=client_env(), check=False)
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = self.ctl("status")["result"]["properties"]
        return props

    def history(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.ctl("history")["result"]["entries"]
        return entries

    def unit(self, *options: str) -> str:
        """kho-agent-update.service's part: `update --json` in the background, its document
        written when it ends."""
        ctl = shlex.join([*CTL, "--bus-address", self.bus.address, "update", *options, "--json"])
        return shlex.join(["setsid", "--fork", "sh", "-c",
                           'exec </dev/null >/dev/null 2>&1; $0 >"$1.part"; mv "$1.part" "$1"',
                           ctl, str(self.result)])

    def hostvars(self) -> dict[str, Any]:
        ctl = shlex.join([*CTL, "--bus-address", self.bus.address])
        unit = self.unit()
        return {"ansible_connection": "ssh", "ansible_pipelining": True,
                "ansible_ssh_executable": str(self.ssh), "rolling_update_ctl": ctl,
                "rolling_update_start_command": unit,
                "rolling_update_result_path": str(self.result),
                "rolling_update_boot_id_path": str(self.boot_id_path)}


class NextBoots:
    """Starts a host's daemon again once the simulated kexec ended it, as the next boot starts
    kho-agent.service; stops watching at close."""

    def __init__(self, hosts: list[SimHost]) -> None:
        self.hosts = hosts
        self.held: set[str] = set()   # hosts whose agent does not come back (a test's fault)
        self.boots: dict[str, int] = {host.name: 0 for host in hosts}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for host in self.hosts:
                code = host.daemon.returncode
                if code is None or host.name in self.held:
                    continue
                if code != 0:
                    self.errors.append(f"{host.name}: kho-agentd exited {code}: "
                                       f"{host.daemon.stderr_text()[-2000:]}")
                    return
                try:
                    host.daemon.start()
                except RigError as err:
                    self.errors.append(f"{host.name}: the next boot's kho-agentd: {err}")
                    return
                self.boots[host.name] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Fleet:
    hosts: list[SimHost]
    inventory: Path
    env: dict[str, str]
    boots: NextBoots

    def play(self, *extra: str) -> subprocess.CompletedProcess[str]:
        done = run(["ansible-playbook", "-i", str(self.inventory),
                    str(PLAYBOOKS / "rolling_update.yml"), "-e", "kho_become=false",
                    "-e", "rolling_update_poll_interval=1", *extra], self.env)
        assert not self.boots.errors, self.boots.errors
        return done

    def host(self, name: str) -> SimHost:
        return next(host for host in self.hosts if host.name == name)


def make_fleet(tmp_path: Path, stack: contextlib.ExitStack,
               target_abis: dict[str, SimAbi]) -> Fleet:
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir()
    ssh = tmp_path / "kexec-ssh"
    ssh.write_text(f"#!{sys.executable}\n{KEXEC_SSH}")
    ssh.chmod(0o755)
    (ssh_dir / "bin").mkdir()
    for name, text in (("systemctl", SYSTEMCTL), ("journalctl", JOURNALCTL)):
        (ssh_dir / "bin" / name).write_text(text)
        (ssh_dir / "bin" / name).chmod(0o755)
    hosts = []
    for index, (name, abi) in enumerate(target_abis.items()):
        base = tmp_path / name
        simdir = base / "sim"
        SimKernel.create(simdir, release=OLD)
        image = SimKernel(simdir).write_kernel_image(base / "boot" / f"vmlinuz-{NEW}",
                                                     release=NEW, abi=abi)
        config = base / "root" / "etc" / "kho-agent"
        config.mkdir(parents=True)
        (config / "agent.conf").write_text(f"[Prepare]\nTarget={image}\n")
        bus = stack.enter_context(PrivateBus("system"))
        daemon = stack.enter_context(Daemon(bus.address, simdir, base / "state",
                                            ["--config-root", str(base / "root")]))
        content = os.urandom(64 * 1024) + bytes([index])
        client = stack.enter_context(GioClient(bus.address))
        create_ready_session(client, "vm-1", 7, content)
        host = SimHost(name, bus, daemon, simdir, base / "update.json", content, ssh, ssh_dir)
        (ssh_dir / f"{name}.boot_id_path").write_text(str(host.boot_id_path))
        hosts.append(host)
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"kho_fleet": {"hosts": {h.name: h.hostvars()
                                                             for h in hosts}}}))
    boots = NextBoots(hosts)
    stack.callback(boots.close)
    env = ansible_env(tmp_path)
    env["KHO_TEST_SSH_DIR"] = str(ssh_dir)
    return Fleet(hosts, inventory, env, boots)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        yield make_fleet(tmp_path, stack, {"h1": SimAbi(), "h2": SimAbi(), "h3": SimAbi()})


@pytest.fixture
def fleet_with_a_bad_target(tmp_path: Path) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        yield make_fleet(tmp_path, stack, {"h1": SimAbi(), "h2": INCOMPATIBLE,
                                           "h3": SimAbi()})


def test_check_mode_then_a_rolling_update_then_nothing_to_do(fleet: Fleet) -> None:
    checked = fleet.play("--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert {name: row["changed"] for name, row in recap(checked.stdout).items()} == \
        {"h1": 0, "h2": 0, "h3": 0}
    for host in fleet.hosts:
        assert f"{host.name}: would-update: {OLD} -> {NEW}" in checked.stdout
        props = host.properties()
        assert (props["State"], props["LiveUpdateNumber"]) == ("idle", 1), props
        assert host.history() == []
        assert not host.result.exists()

    done = fleet.play("-e", "kho_serial=1")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = recap(done.stdout)
    assert set(rows) == {"h1", "h2", "h3"}
    for host in fleet.hosts:
        assert rows[host.name]["failed"] == 0 and rows[host.name]["changed"] >= 1, rows
        assert re.search(rf"{host.name}: live update #2 verified: {OLD} -> {NEW} \(boot "
                         r"[-0-9a-f]+ -> [-0-9a-f]+\), 1 session\(s\), 1 file\(s\), "
                         rf"{len(host.content)} bytes", done.stdout), done.stdout
        props = host.properties()
        assert (props["State"], props["RunningKernel"], props["LiveUpdateNumber"]) == \
            ("verified", NEW, 2), props
        (entry,) = host.history()
        assert (entry["verdict"], entry["release_from"], entry["release_to"]) == \
            ("verified", OLD, NEW)
        assert fleet.boots.boots[host.name] == 1
        # the connection the kexec cut was expected: one lost, at the new boot, and the play
        # went on
        assert host.lost_connections() == [host.boot_id_path.read_text().strip()]
    # serial: 1: one host at a time, in inventory order
    order = [m.group(1) for m in re.finditer(r"^PLAY \[.*\]|^ok: \[(h\d)\] => \{\n\s+\"msg\": "
                                             r"\"h\d: live update", done.stdout, re.M)
             if m.group(1)]
    assert order == ["h1", "h2", "h3"], order

    again = fleet.play()
    assert again.returncode == 0, again.stdout + again.stderr
    assert {name: row["changed"] for name, row in recap(again.stdout).items()} == \
        {"h1": 0, "h2": 0, "h3": 0}
    for host in fleet.hosts:
        assert f"{host.name}: up to date, running {NEW}: nothing to do" in again.stdout
        assert host.properties()["LiveUpdateNumber"] == 2


def test_a_refused_host_stops_the_rollout_and_is_named(fleet_with_a_bad_target: Fleet) -> None:
    fleet = fleet_with_a_bad_target
    # a dry run of the whole fleet in one batch: every host's answer, then the play fails
    checked = fleet.play("--check", "-e", "kho_serial=100%")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    for name in ("h1", "h3"):
        assert f"{name}: would-update: {OLD} -> {NEW}" in checked.stdout, checked.stdout
    assert re.search(r"h2: kho-agent refuses the update: PreflightFailed: .*target kernel is "
                     r"incompatible", checked.stdout), checked.stdout
    assert all(host.properties()["State"] == "idle" for host in fleet.hosts)

    done = fleet.play("-e", "kho_serial=1")
    assert done.returncode == 2, done.stdout + done.stderr
    rows = recap(done.stdout)
    assert rows["h1"]["failed"] == 0 and rows["h1"]["changed"] >= 1, rows
    assert rows["h2"]["failed"] == 1 and rows["h2"]["changed"] == 0, rows
    assert "h3" not in rows, rows   # its batch never started
    assert re.fullmatch(r"h2: kho-agent refuses the update: PreflightFailed: .*target kernel "
                        r"is incompatible.*", failures(done.stdout)["h2"]), done.stdout
    assert set(failures(done.stdout)) == {"h2"}
    assert fleet.host("h1").properties()["LiveUpdateNumber"] == 2
    for name in ("h2", "h3"):
        props = fleet.host(name).properties()
        assert (props["State"], props["RunningKernel"], props["LiveUpdateNumber"]) == \
            ("idle", OLD, 1), props
        assert fleet.host(name).history() == []


def test_an_update_that_fails_on_the_host_is_reported_from_its_document(fleet: Fleet) -> None:
    # h1's VM manager has a second session it never marks ready: the check passes (readiness is
    # not known before the prepare), the unit prepares, the clients are not ready in time, the
    # update is cancelled and the unit's document says why
    h1 = fleet.host("h1")
    with GioClient(h1.bus.address) as laggard:
        laggard.call_values(MANAGER_PATH, MANAGER_IFACE, "CreateSession", "s", ("vm-2",))
        unit = h1.unit("--ready-timeout", "1")
        done = fleet.play("-e", "kho_serial=1", "-e",
                          json.dumps({"rolling_update_start_command": unit}), "--limit", "h1,h2")
    assert done.returncode == 2, done.stdout + done.stderr
    rows = recap(done.stdout)
    assert rows["h1"]["failed"] == 1 and "h2" not in rows, rows
    found = re.fullmatch(r"h1: the live update failed: (\w+): (.*) \(the host stays in its "
                         rf"boot ([-0-9a-f]+), release {re.escape(OLD)}\)",
                         failures(done.stdout)["h1"])
    assert found, done.stdout
    document = json.loads(h1.result.read_text())
    assert (found.group(1), found.group(2)) == (document["error"]["error"],
                                                document["error"]["message"])
    assert "vm-2" in found.group(2), found.group(2)
    assert found.group(3) == h1.boot_id_path.read_text().strip()
    props = h1.properties()
    assert (props["State"], props["RunningKernel"], props["LiveUpdateNumber"]) == \
        ("idle", OLD, 1), props
    assert h1.lost_connections() == []
    assert fleet.host("h2").properties()["LiveUpdateNumber"] == 1


def test_a_host_that_neither_leaves_nor_reports_fails_at_the_bound_and_is_named(
        fleet: Fleet) -> None:
    # a start command that starts nothing: no kexec, no document
    done = fleet.play("-e", "kho_serial=1", "-e", "rolling_update_timeout=2", "-e",
                      json.dumps({"rolling_update_start_command": "true"}), "--limit", "h1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert recap(done.stdout)["h1"]["failed"] == 1
    message = failures(done.stdout)["h1"]
    assert re.fullmatch(r"h1: no new boot and no result from the update after 2 s \(still boot "
                        rf"[-0-9a-f]+, release {re.escape(OLD)}; the update's document: none\); "
                        r"see `systemctl status kho-agent-update.service` and `kho-agentctl "
                        r"status` on the host", message), message
    assert fleet.host("h1").properties()["State"] == "idle"


def test_a_host_whose_agent_does_not_verify_fails_at_the_bound_and_is_named(
        fleet: Fleet) -> None:
    # the kexec happens, but kho-agentd does not start in the new boot
    fleet.boots.held.add("h1")
    done = fleet.play("-e", "kho_serial=1", "-e", "rolling_update_verify_timeout=2", "--limit",
                      "h1,h2")
    assert done.returncode == 2, done.stdout + done.stderr
    rows = recap(done.stdout)
    assert rows["h1"]["failed"] == 1 and "h2" not in rows, rows
    h1 = fleet.host("h1")
    new_boot = h1.boot_id_path.read_text().strip()
    message = failures(done.stdout)["h1"]
    assert message.startswith(f"h1: the host came back (boot {new_boot}) but kho-agent did not "
                              "verify the live update: state unknown: "), message
    assert h1.lost_connections() == [new_boot]


def test_a_host_whose_memory_came_back_damaged_stops_the_rollout(fleet: Fleet) -> None:
    # the kexec flips a byte of h1's guest memory: the agent's verification fails, and so does
    # the host, with the agent's state and last result; h2 is not touched
    h1 = fleet.host("h1")
    SimKernel(h1.simdir).inject("corrupt-file", session="vm-1", token=7, offset=100)
    done = fleet.play("-e", "kho_serial=1", "--limit", "h1,h2")
    assert done.returncode == 2, done.stdout + done.stderr
    rows = recap(done.stdout)
    assert rows["h1"]["failed"] == 1 and "h2" not in rows, rows
    message = failures(done.stdout)["h1"]
    assert re.match(r"h1: the host came back \(boot [-0-9a-f]+\) but kho-agent did not verify "
                    r"the live update: state failed: .*; last result: failed \(1 mismatch, \d+ "
                    r"ok\); mismatch: file-digest vm-1/7: ", message), message
    assert h1.properties()["State"] == "failed"
    assert fleet.host("h2").properties()["LiveUpdateNumber"] == 1


def blip_then(host: SimHost, then: str, *, interim: bool) -> str:
    """A start command that arms a dropped connection (HOST.blip, for the next command: the
    role's first poll) and runs `then` in the background once the host answered again after
    it (HOST.answered), so that the kexec comes after the role got over the blip. `interim`:
    the unit's document says "committing" first, as kho-agentctl's does once the commit job
    returned and the kexec is under way."""
    interim_doc = json.dumps({"ok": True, "result": {"outcome": "committing"}})
    script = ("{ [ -z \"$4\" ] || printf '%s\\n' \"$4\" >\"$3\"; } && touch \"$0\" && "
              "setsid --fork sh -c 'while [ ! -e \"$0\" ]; do sleep 0.05; done; "
              "exec sh -c \"$1\"' \"$1\" \"$2\" </dev/null >/dev/null 2>&1")
    return shlex.join(["sh", "-c", script, str(host.state_file("blip")),
                       str(host.state_file("answered")), then, str(host.result),
                       interim_doc if interim else ""])


@pytest.mark.parametrize("interim", [False, True], ids=["while-preparing", "after-committing"])
def test_a_lost_connection_that_is_not_the_kexec_does_not_end_the_wait(
        fleet: Fleet, interim: bool) -> None:
    # the first poll after the start loses its connection (the network, not the kexec: the
    # update starts only after it); the role waits for the host, polls again, meets the kexec's
    # lost connection, and verifies the update
    h1 = fleet.host("h1")
    start = blip_then(h1, h1.unit(), interim=interim)
    done = fleet.play("-e", json.dumps({"rolling_update_start_command": start}), "--limit", "h1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert recap(done.stdout)["h1"]["failed"] == 0
    assert re.search(rf"h1: live update #2 verified: {OLD} -> {NEW}", done.stdout), done.stdout
    new_boot = h1.boot_id_path.read_text().strip()
    assert len(h1.blips()) == 1 and h1.blips() != [new_boot], h1.blips()
    assert h1.lost_connections() == [new_boot]
    assert h1.properties()["LiveUpdateNumber"] == 2


UNIT_DEAD = "ActiveState=inactive\nSubState=dead\nResult=success\nExecMainStatus=0\n"


@pytest.mark.parametrize("how", ["dependency", "exit-code"])
def test_a_unit_that_ends_without_a_document_fails_the_host_at_once(fleet: Fleet,
                                                                    how: str) -> None:
    # systemd's word on the unit while the role waits: a start job for a unit whose dependency
    # (kho-agent.service) failed ends without running it, the unit as it was (its invocation
    # too), and nothing written; a unit whose command failed before it printed ends failed,
    # in a new invocation, with systemd's empty file. The bound (600 s) is not waited for.
    h1 = fleet.host("h1")
    h1.state_file("unit").write_text(UNIT_DEAD + "InvocationID=0a0a\n")
    if how == "dependency":
        h1.state_file("journal").write_text(
            "Dependency failed for kho-agent live update (check, prepare, wait for the "
            "clients, commit).\n")
        start = "true"
    else:
        h1.state_file("journal").write_text("Traceback (most recent call last):\n"
                                            "ModuleNotFoundError: No module named 'kho_agent'\n")
        failed = ("ActiveState=failed\nSubState=failed\nResult=exit-code\nExecMainStatus=1\n"
                  "InvocationID=0b0b\n")
        start = shlex.join(["sh", "-c", 'printf "%s" "$0" >"$1" && : >"$2"', failed,
                            str(h1.state_file("unit")), str(h1.result)])
    done = fleet.play("-e", "rolling_update_timeout=600", "-e",
                      json.dumps({"rolling_update_start_command": start}), "--limit", "h1")
    assert done.returncode == 2, done.stdout + done.stderr
    message = failures(done.stdout)["h1"]
    if how == "dependency":
        assert re.fullmatch(
            r"h1: kho-agent-update.service did not run \(a dependency failed, such as "
            r"kho-agent.service\?\) without writing a result: systemd says ActiveState=inactive, "
            r"SubState=dead, Result=success, ExecMainStatus=0; its journal: Dependency failed for "
            r"kho-agent live update \(check, prepare, wait for the clients, commit\). \(the host "
            rf"stays in its boot [-0-9a-f]+, release {re.escape(OLD)}\)", message), message
    else:
        assert re.fullmatch(
            r"h1: kho-agent-update.service ended without writing a result: systemd says "
            r"ActiveState=failed, SubState=failed, Result=exit-code, ExecMainStatus=1; its "
            r"journal: Traceback \(most recent call last\): / ModuleNotFoundError: No module "
            r"named 'kho_agent' \(the host stays in its boot [-0-9a-f]+, release "
            rf"{re.escape(OLD)}\)", message), message
    assert h1.properties()["State"] == "idle"


def test_a_unit_stopped_by_the_shutdown_for_the_kexec_is_not_a_failure(fleet: Fleet) -> None:
    # the `systemctl kexec` of a commit stops the unit with the rest of the host: while systemd
    # says the host is stopping, a unit that ended without a document is the kexec on its way
    h1 = fleet.host("h1")
    h1.state_file("unit").write_text(UNIT_DEAD + "InvocationID=0a0a\n")
    h1.state_file("system-state").write_text("stopping\n")
    done = fleet.play("--limit", "h1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"h1: live update #2 verified: {OLD} -> {NEW}", done.stdout), done.stdout


def test_a_host_that_rebooted_cold_fails_as_soon_as_it_is_back(fleet: Fleet) -> None:
    # the new kernel panics (another LUO version) and the machine resets into the old kernel,
    # a cold boot: a new boot id, but not a live update; the verification's bound (600 s) is not
    # waited for
    h1 = fleet.host("h1")
    SimKernel(h1.simdir).inject("luo-mismatch")
    done = fleet.play("-e", "rolling_update_verify_timeout=600", "--limit", "h1")
    assert done.returncode == 2, done.stdout + done.stderr
    new_boot = h1.boot_id_path.read_text().strip()
    message = failures(done.stdout)["h1"]
    assert message.startswith(f"h1: host rebooted cold: boot {new_boot}, release {OLD}, "
                              "LiveUpdateNumber 1 where the live update's is 2 "), message
    assert h1.lost_connections() == [new_boot]
