"""The Debian package (packaging/debian, built by packaging/build_deb.py): what it ships, what it
depends on, what lintian says, and that an upgrade does not stop or restart a daemon that holds a
live update (its maintainer scripts run here against a real dbus-daemon and kho-agentd).

The package is built once per module in a temporary copy of the tree (~10 s, so the tests
that need it are marked slow); without the build tools (packaging/debian/control,
Build-Depends; .ci/run installs them) those tests skip, saying which tool is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import packaging_scripts
import pytest
from agenthost import Host, create_session, host, invoke, kernel_option
from dbusrig import PrivateBus

REPO = Path(__file__).resolve().parent.parent
RESTART_CHECK = REPO / "packaging" / "debian" / "kho-agent-restart-check"
UNIT = "kho-agent.service"

__all__ = ["host"]  # the fixture, used by name


build_deb = packaging_scripts.load("build_deb")
install_data = packaging_scripts.load("install_data")


@dataclass(frozen=True)
class Built:
    deb: Path
    control: dict[str, str]
    files: dict[str, str]          # path in the package -> its ls-style mode string
    scripts: dict[str, str]        # maintainer script name -> text


def _control(deb: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        if line.startswith(" ") and key:
            fields[key] += "\n" + line
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    missing = [t for t in ("dpkg-buildpackage", "dh", "lintian")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install the Build-Depends of "
                    "packaging/debian/control, and lintian; .ci/run does)")
    out = tmp_path_factory.mktemp("deb")
    deb = build_deb.build_deb(out, log=out / "build.log")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True,
                             text=True).stdout
    files = {}
    for line in listing.splitlines():
        fields = line.split(None, 5)
        files[fields[5].split(" -> ")[0].removeprefix(".")] = fields[0]
    control_dir = out / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control_dir)], check=True)
    scripts = {name: (control_dir / name).read_text()
               for name in ("preinst", "postinst", "prerm", "postrm")
               if (control_dir / name).exists()}
    yield Built(deb, _control(deb), files, scripts)


@pytest.mark.slow  # builds the package (~10 s, once per module)
def test_the_build_leaves_the_checkout_alone(built: Built) -> None:
    assert not (REPO / "debian").exists() and not (REPO / ".pybuild").exists()
    assert not list(REPO.parent.glob("kho-agent_*"))
    assert built.deb.name == "kho-agent_0.1.0_all.deb"


@pytest.mark.slow  # builds the package (~10 s, once per module)
def test_the_package_ships_every_file_the_install_table_declares(built: Built) -> None:
    wanted = {p.target for p in install_data.plan(Path("/"), "/usr", package=True)}
    assert "/usr/share/kho-agent/kho-agent-fdstore.conf" in wanted
    wanted |= {"/usr/bin/kho-agentd", "/usr/bin/kho-agentctl",
               "/usr/libexec/kho-agent/restart-check",
               "/usr/lib/python3/dist-packages/kho_agent/daemon.py",
               "/usr/share/doc/kho-agent/copyright"}
    assert wanted <= built.files.keys(), sorted(wanted - built.files.keys())
    assert built.files["/usr/libexec/kho-agent/restart-check"].startswith("-rwxr-xr-x")
    # in /usr only (sid refuses files in the aliased /lib); Python in the version-neutral
    # directory, so the same package works with sid's 3.14
    assert not [f for f in built.files if f.startswith(("/lib/", "/bin/", "/sbin/"))]
    assert not [f for f in built.files if f.startswith("/usr/lib/python3.")]
    # the drop-in for systemd >= 261 is not where systemd would read it
    assert not [f for f in built.files if "kho-agent.service.d" in f]
    # present in the tree, so installed (man pages, completion, configuration: other branches)
    optional = {"completion/bash/kho-agentctl": "/usr/share/bash-completion/completions/"
                "kho-agentctl",
                "completion/zsh/_kho-agentctl": "/usr/share/zsh/vendor-completions/_kho-agentctl",
                "etc/kho-agent/agent.conf": "/etc/kho-agent/agent.conf"}
    for source, target in optional.items():
        assert ((REPO / source).is_file()) == (target in built.files), source
    for page in REPO.glob("man/*.[1-8]"):
        section = page.suffix[1:]
        assert f"/usr/share/man/man{section}/{page.name}.gz" in built.files, page


def _relations(value: str) -> list[list[tuple[str, str | None]]]:
    """'a (>= 1), b | c' -> [[("a", ">= 1")], [("b", None), ("c", None)]]"""
    out = []
    for group in value.split(","):
        alternatives = []
        for alternative in group.split("|"):
            m = re.fullmatch(r"\s*([a-z0-9.+-]+)(?::any)?\s*(?:\(([^)]*)\))?\s*", alternative)
            assert m, alternative
            alternatives.append((m.group(1), m.group(2)))
        out.append(alternatives)
    return out


def _candidate(package: str) -> str | None:
    policy = subprocess.run(["apt-cache", "policy", package], capture_output=True,
                            text=True).stdout
    m = re.search(r"Candidate: (\S+)", policy)
    return None if m is None or m.group(1) == "(none)" else m.group(1)


def _satisfied(version: str, constraint: str | None) -> bool:
    if constraint is None:
        return True
    op, wanted = constraint.split()
    op = {">=": "ge", "<=": "le", ">>": "gt", "<<": "lt", "=": "eq"}[op]
    return subprocess.run(["dpkg", "--compare-versions", version, op, wanted]).returncode == 0


@pytest.mark.slow  # builds the package (~10 s, once per module)
def test_the_dependencies_are_debians_and_installable_here(built: Built) -> None:
    """Every Depends has a candidate on this (bookworm) machine that meets its version; blake3
    only recommended (bookworm has none); nothing from pip."""
    if shutil.which("apt-cache") is None:
        pytest.skip("apt-cache not installed")
    depends = _relations(built.control["Depends"])
    names = {name for group in depends for name, _ in group}
    assert {"python3", "python3-gi", "python3-systemd", "python3-pyroute2",
            "python3-zstandard", "python3-lz4", "dbus"} <= names
    assert not [n for n in names if "blake3" in n]
    assert "python3-blake3" in built.control["Recommends"]
    unmet = []
    for group in depends:
        if not any((v := _candidate(name)) is not None and _satisfied(v, constraint)
                   for name, constraint in group):
            unmet.append(group)
    assert not unmet, f"not installable on this machine: {unmet}"


@pytest.mark.slow  # builds the package (~10 s, once per module)
def test_lintian_finds_no_error(built: Built) -> None:
    result = subprocess.run(["lintian", "--pedantic", "-I", str(built.deb)],
                            capture_output=True, text=True)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert not [t for t in tags if t.startswith("E: ")], result.stdout
    # every warning is fixed or overridden with a reason in the package
    assert not [t for t in tags if t.startswith("W: ")], result.stdout


# --- the maintainer scripts, run for real -----------------------------------------------------

class Scripts:
    """The package's maintainer scripts, runnable here: the paths of the host they act on
    (/run/systemd/system, /etc/systemd/system, the installed restart-check) point into a
    temporary directory and at packaging/debian's restart-check, and the commands that would act
    on the machine's systemd (deb-systemd-invoke, deb-systemd-helper, systemctl, py3compile,
    systemd-tmpfiles) are stand-ins that log their arguments. busctl is the real one, on the
    private bus the test's daemon runs on."""

    STUBS = ("deb-systemd-invoke", "deb-systemd-helper", "systemctl", "systemd-tmpfiles",
             "py3compile", "pypy3compile", "py3clean", "pypy3clean")

    def __init__(self, built: Built, tmp: Path, bus_address: str, systemd_version: int) -> None:
        self.tmp = tmp
        self.log = tmp / "calls.log"
        self.etc = tmp / "etc-systemd-system"
        (tmp / "run-systemd-system").mkdir()
        stubs = tmp / "bin"
        stubs.mkdir()
        for name in self.STUBS:
            version = (f'[ "$1" = --version ] && echo "systemd {systemd_version} '
                       f'({systemd_version}.1)"\n' if name == "systemctl" else "")
            stub = stubs / name
            stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{self.log}"\n{version}exit 0\n')
            stub.chmod(0o755)
        self.env = {"PATH": f"{stubs}:/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": bus_address,
                    "LC_ALL": "C"}
        self.paths = {"/run/systemd/system": str(tmp / "run-systemd-system"),
                      "/etc/systemd/system": str(self.etc),
                      "/usr/libexec/kho-agent/restart-check": str(RESTART_CHECK)}
        self.scripts = {}
        for name, text in built.scripts.items():
            for real, here in self.paths.items():
                text = text.replace(real, here)
            path = tmp / name
            path.write_text(text)
            path.chmod(0o755)
            self.scripts[name] = path

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        return subprocess.run([str(self.scripts[script]), *args], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()


def _acts_on_unit(calls: list[str], *verbs: str) -> list[str]:
    return [c for c in calls if c.startswith("deb-systemd-invoke ")
            and c.split()[1] in verbs and UNIT in c]


def _scripts(built: Built, tmp: Path, address: str, version: int = 252) -> Scripts:
    for real in ("/run/systemd/system", "/usr/libexec/kho-agent/restart-check"):
        assert real in built.scripts["postinst"], real   # the paths the stand-ins replace
    return Scripts(built, tmp, address, version)


@pytest.mark.slow  # builds the package (~10 s, once per module)
def test_an_upgrade_leaves_a_prepared_daemon_running(built: Built, host: Host,
                                                      tmp_path: Path) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: b"guest memory" * 100})
    result, job = host.run_job(client, "Prepare", kernel_option(host))
    assert result == "done", job
    assert host.prop("State") == "prepared"
    scripts = _scripts(built, tmp_path, host.bus.address)

    old_prerm = scripts.run("prerm", "upgrade", "0.1.1")      # (the new version's, here)
    assert old_prerm.returncode == 0, old_prerm.stderr
    assert _acts_on_unit(scripts.calls(), "stop", "restart", "try-restart") == []
    postinst = scripts.run("postinst", "configure", "0.0.9")
    assert postinst.returncode == 0, postinst.stderr
    assert _acts_on_unit(scripts.calls(), "stop", "restart", "try-restart", "reload") == []
    assert "was not restarted: kho-agentd holds a live update (state prepared)" \
        in postinst.stderr
    assert "systemctl restart kho-agent.service" in postinst.stderr
    # a removal is refused while the update is held, and stops nothing
    removal = scripts.run("prerm", "remove")
    assert removal.returncode == 1
    assert "not removed" in removal.stderr and "kho-agentctl cancel" in removal.stderr
    assert _acts_on_unit(scripts.calls(), "stop") == []
    assert host.prop("State") == "prepared" and host.daemon.returncode is None
    invoke(client, "Cancel")
    host.wait_state("idle")


@pytest.mark.slow  # builds the package (~10 s, once per module)
def test_an_upgrade_restarts_an_idle_daemon_and_a_removal_stops_it(built: Built, host: Host,
                                                                   tmp_path: Path) -> None:
    assert host.prop("State") == "idle"
    scripts = _scripts(built, tmp_path, host.bus.address)
    postinst = scripts.run("postinst", "configure", "0.0.9")
    assert postinst.returncode == 0, postinst.stderr
    assert _acts_on_unit(scripts.calls(), "try-restart") == [
        f"deb-systemd-invoke try-restart {UNIT}"]
    assert _acts_on_unit(scripts.calls(), "stop", "restart") == []
    removal = scripts.run("prerm", "remove")
    assert removal.returncode == 0, removal.stderr
    assert _acts_on_unit(scripts.calls(), "stop") == [f"deb-systemd-invoke stop {UNIT}"]


@pytest.mark.slow  # builds the package (~10 s, once per module)
def test_a_removal_that_cannot_tell_says_what_works_without_the_daemon(built: Built,
                                                                       tmp_path: Path) -> None:
    """restart-check could not read the daemon's state (here: no bus at all). The removal is
    refused, but not with `kho-agentctl cancel`, which asks the same bus: it says how to see
    why, and the override, which then stops the daemon."""
    scripts = _scripts(built, tmp_path, f"unix:path={tmp_path}/no-bus")
    removal = scripts.run("prerm", "remove")
    assert removal.returncode == 1
    assert "not removed: whether kho-agentd holds a live update is unknown: the system bus " \
        "cannot be asked" in removal.stderr
    assert "kho-agentctl cancel" not in removal.stderr
    assert "systemctl status kho-agent.service" in removal.stderr
    assert "KHO_AGENT_REMOVE_WHILE_HELD=yes" in removal.stderr
    assert _acts_on_unit(scripts.calls(), "stop") == []
    scripts.env["KHO_AGENT_REMOVE_WHILE_HELD"] = "yes"
    removal = scripts.run("prerm", "remove")
    assert removal.returncode == 0, removal.stderr
    assert _acts_on_unit(scripts.calls(), "stop") == [f"deb-systemd-invoke stop {UNIT}"]


@pytest.mark.slow  # builds the package (~10 s, once per module)
@pytest.mark.parametrize(("version", "linked"), [(252, False), (262, True)])
def test_a_first_install_enables_the_fdstore_drop_in_only_on_systemd_261(
        built: Built, tmp_path: Path, version: int, linked: bool) -> None:
    with PrivateBus() as bus:                        # no daemon on it
        scripts = _scripts(built, tmp_path, bus.address, version)
        postinst = scripts.run("postinst", "configure", "")
        assert postinst.returncode == 0, postinst.stderr
        dropin = scripts.etc / "kho-agent.service.d" / "fdstore.conf"
        assert dropin.is_symlink() == linked
        if linked:
            assert os.readlink(dropin) == "/usr/share/kho-agent/kho-agent-fdstore.conf"
        # a fresh install starts the daemon (it holds nothing yet)
        assert _acts_on_unit(scripts.calls(), "start") == [f"deb-systemd-invoke start {UNIT}"]
        # an upgrade never changes the mode: the administrator owns the link after the install
        if linked:
            dropin.unlink()
        scripts.run("postinst", "configure", "0.0.9")
        assert not dropin.is_symlink()


# --- restart-check on its own ----------------------------------------------------------------

def _check(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RESTART_CHECK)], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": address})


def test_restart_check_without_a_daemon_or_a_bus(tmp_path: Path) -> None:
    if shutil.which("busctl") is None:
        pytest.skip("busctl (systemd) not installed")
    with PrivateBus() as bus:
        quiet = _check(bus.address)
    assert (quiet.returncode, quiet.stdout.strip()) == (0, "kho-agentd is not running")
    gone = _check(f"unix:path={tmp_path}/no-bus")
    assert gone.returncode == 2
    assert gone.stdout.startswith("the system bus cannot be asked whether kho-agentd runs")


def test_restart_check_knows_the_bus_names_and_every_state() -> None:
    """Its names are the daemon's, and each State of the contract is in exactly one of its
    answers: a new state must be classified (restartable or not) before it ships."""
    from kho_agent.engine.phase import Phase
    from kho_agent.service import interfaces
    text = RESTART_CHECK.read_text()
    assert stat.S_IMODE(RESTART_CHECK.stat().st_mode) & 0o111 == 0o111
    assert f"name={interfaces.BUS_NAME}\n" in text
    assert f"path={interfaces.MANAGER_PATH}\n" in text
    assert f"iface={interfaces.MANAGER_IFACE}\n" in text
    cases = re.findall(r"^\s+([a-z|]+)\)\s*$", text, re.MULTILINE)
    classified = [state for case in cases for state in case.split("|")]
    assert sorted(classified) == sorted(p.value for p in Phase)


def test_restart_check_counts_sessions_at_rest(host: Host) -> None:
    """Idle is not enough: a session a client created for the next update, or an incoming one
    its owner has not claimed after a verified update, is closed by a stop as well."""
    if shutil.which("busctl") is None:
        pytest.skip("busctl (systemd) not installed")
    empty = _check(host.bus.address)
    assert (empty.returncode, empty.stdout.strip()) == (
        0, "kho-agentd holds no live update and no session (state idle)")
    client = host.client()
    create_session(client, "vm-1", {1: b"guest memory" * 100})
    created = _check(host.bus.address)
    assert (created.returncode, created.stdout.strip()) == (
        1, "kho-agentd holds 1 session(s) (state idle): a stop would close them")
    result, job = host.run_job(client, "Prepare", kernel_option(host))
    assert result == "done", job
    result, job = host.run_job(client, "Commit", {})
    assert result == "done", job
    host.restart()                                  # the next boot: verified, vm-1 unclaimed
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    verified = _check(host.bus.address)
    assert (verified.returncode, verified.stdout.strip()) == (
        1, "kho-agentd holds 1 session(s) (state verified): a stop would close them")
