"""kho-agentd with a configuration (kho-agent.conf(5)), as a real process on a private bus, on
the simulated kernel: it reports the files it read, takes the target and command line from them
when Prepare names none, holds commits outside the maintenance window and to the configured
hand-off mode, and refuses to start (exit 2, naming file:line) on a configuration it cannot use."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from agenthost import Host, create_session, invoke
from dbusrig import Daemon, PrivateBus, RemoteError, client_env
from gi.repository import GLib

from kho_agent import daemon as agentd
from kho_agent.engine import EngineConfig
from kho_agent.service.journal import LOG_ERR, Event
from kho_agent.sim import SimAbi, SimKernel

REPO = Path(__file__).resolve().parent.parent
OLD_ABI = SimAbi(kho="kho-v3", luo="luo-v1", memfd="memfd-v2")   # a kernel we cannot go to
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def closed_window() -> str:
    """A window on the day after tomorrow only: closed now, whatever the time of day."""
    return f"{DAY_NAMES[(datetime.now() + timedelta(days=2)).weekday()]} 00:00-24:00"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def start(tmp_path: Path, bus: PrivateBus, root: Path) -> Host:
    sim_dir = tmp_path / "sim"
    sim = SimKernel.create(sim_dir)
    target = sim.write_kernel_image(tmp_path / "vmlinuz-7.3.1-sim", release="7.3.1-sim",
                                    abi=SimAbi())
    boot = root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    # the newest installed kernel speaks an ABI the running one cannot hand over to: skipped
    sim.write_kernel_image(boot / "vmlinuz-7.10.0-sim", release="7.10.0-sim", abi=OLD_ABI)
    sim.write_kernel_image(boot / "vmlinuz-7.9.2-sim", release="7.9.2-sim", abi=SimAbi())
    sim.write_kernel_image(boot / "vmlinuz-7.1.0-sim", release="7.1.0-sim", abi=SimAbi())
    daemon = Daemon(bus.address, sim_dir, tmp_path / "state", ["--config-root", str(root)])
    daemon.start()
    return Host(bus, sim_dir, tmp_path / "state", target, daemon)


@pytest.fixture
def configured(tmp_path: Path) -> Iterator[Host]:
    root = tmp_path / "root"
    write(root / "etc/kho-agent/agent.conf", "[Sessions]\nClaimGraceSec=10min\n")
    write(root / "usr/lib/kho-agent/agent.conf.d/10-vendor.conf",
          "[Prepare]\nTarget=/nonexistent/vmlinuz\n")
    write(root / "etc/kho-agent/agent.conf.d/10-vendor.conf",   # replaces the vendor's
          "[Prepare]\nTarget=newest-compatible\nAppendCommandLine=fleet.test=1\n")
    write(root / "run/kho-agent/agent.conf.d/50-window.conf",
          f"[Commit]\nMaintenanceWindow={closed_window()}\n")
    with PrivateBus() as bus:
        host = start(tmp_path, bus, root)
        try:
            yield host
        finally:
            for client in host.clients:
                client.close()
            host.daemon.close()


def test_the_daemon_reports_and_logs_the_files_it_read(configured: Host) -> None:
    root = configured.daemon.command[configured.daemon.command.index("--config-root") + 1]
    expected = [f"{root}/etc/kho-agent/agent.conf",
                f"{root}/etc/kho-agent/agent.conf.d/10-vendor.conf",
                f"{root}/run/kho-agent/agent.conf.d/50-window.conf"]
    assert configured.prop("ConfigFiles") == expected
    assert "configuration: " + ", ".join(expected) in configured.daemon.stderr_text()
    done = subprocess.run([sys.executable, "-m", "kho_agent.cli", "--bus-address",
                           configured.bus.address, "status"], capture_output=True, text=True,
                          timeout=60, env=client_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert f"  configuration:  {expected[0]}\n" in done.stdout
    assert f"                  {expected[2]}\n" in done.stdout


def test_prepare_without_a_kernel_takes_the_newest_compatible_and_the_command_line(
        configured: Host) -> None:
    # kho-agentctl prepare without --kernel: the daemon's Target= (a dry run changes nothing)
    done = subprocess.run([sys.executable, "-m", "kho_agent.cli", "--bus-address",
                           configured.bus.address, "prepare", "--dry-run"], capture_output=True,
                          text=True, timeout=120, env=client_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: prepare would load " in done.stdout
    assert "/boot/vmlinuz-7.9.2-sim (initrd none)" in done.stdout
    assert configured.prop("State") == "idle"
    client = configured.client()
    result, props = configured.run_job(client, "Prepare", {})
    assert result == "done", props
    data = json.loads(props["Result"])
    assert data["prepared"].endswith("/boot/vmlinuz-7.9.2-sim")   # 7.10.0 was refused
    assert data["cmdline"].split()[-1] == "fleet.test=1"
    log = configured.daemon.stderr_text()
    assert "Target=newest-compatible: skipped 7.10.0-sim:" in log
    assert "/etc/kho-agent/agent.conf.d/10-vendor.conf:2): chose" in log


def test_a_configured_kernel_path_takes_the_initrd_installed_beside_it(tmp_path: Path) -> None:
    """Target=/boot/vmlinuz-X was loaded without an initrd, where newest-compatible takes
    /boot/initrd.img-X: Initrd=auto (the default) takes it for a path too."""
    root = tmp_path / "root"
    kernel = root / "boot/vmlinuz-7.9.2-sim"
    write(root / "etc/kho-agent/agent.conf", f"[Prepare]\nTarget={kernel}\n")
    initrd = write(root / "boot/initrd.img-7.9.2-sim", "an initrd\n" * 100)
    with PrivateBus() as bus:
        host = start(tmp_path, bus, root)
        try:
            done = subprocess.run([sys.executable, "-m", "kho_agent.cli", "--bus-address",
                                   bus.address, "prepare", "--dry-run", "--json"],
                                  capture_output=True, text=True, timeout=120, env=client_env(),
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stdout + done.stderr
            plan = json.loads(done.stdout)["result"]["result"]   # the job's, in the envelope
            assert (plan["kernel"], plan["initrd"]) == (str(kernel), str(initrd)), plan
            assert f"{kernel} with initrd {initrd} (Initrd=auto)" in host.daemon.stderr_text()
        finally:
            host.daemon.close()


def test_a_commit_outside_the_window_is_refused_and_force_overrides(configured: Host) -> None:
    client = configured.client()
    create_session(client, "vm1", {1: b"guest" * 100})
    result, props = configured.run_job(client, "Prepare", {
        "kernel": GLib.Variant("s", str(configured.target))})
    assert result == "done", props
    result, props = configured.run_job(client, "Commit", {})
    assert result == "failed"
    assert props["ErrorName"] == "org.khoagent.Agent1.Error.PreflightFailed"
    assert "outside the maintenance window (MaintenanceWindow=" in props["ErrorMessage"]
    assert "50-window.conf:2" in props["ErrorMessage"]
    assert "--force" in props["ErrorMessage"]
    assert configured.prop("State") == "prepared"   # nothing changed
    result, props = configured.run_job(client, "Commit", {
        "force": GLib.Variant("b", True), "dry_run": GLib.Variant("b", True)})
    assert result == "done", props


def test_a_host_that_offers_another_hand_off_mode_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "etc/kho-agent/agent.conf", "[Commit]\nHandoffMode=fdstore\n")
    with PrivateBus() as bus:
        host = start(tmp_path, bus, root)
        try:
            client = host.client()
            result, props = host.run_job(client, "Prepare", {
                "kernel": GLib.Variant("s", str(host.target))})
            assert result == "done", props
            result, props = host.run_job(client, "Commit", {"dry_run": GLib.Variant("b", True)})
            assert result == "failed"
            assert "requires hand-off mode fdstore (HandoffMode=" in props["ErrorMessage"]
            assert f"{root}/etc/kho-agent/agent.conf:2" in props["ErrorMessage"]
            result, props = host.run_job(client, "Cancel")
            assert result == "done", props
            # without a Target=, Prepare still needs a kernel, and says where to set one
            with pytest.raises(RemoteError) as refused:
                invoke(client, "Prepare", "a{sv}", ({},))
            assert refused.value.name.endswith(".InvalidArgument")
            assert "the configuration names no Target=" in refused.value.message
        finally:
            for client in host.clients:
                client.close()
            host.daemon.close()


def test_the_command_line_overrides_the_file_and_the_engine_gets_every_key(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "etc/kho-agent/agent.conf", "[Prepare]\nScratchMargin=60%\n[Commit]\n"
          "HandoffMode=reboot\nMaintenanceWindow=Mon 01:00-02:00\n[Sessions]\n"
          "ClaimGraceSec=2h\nDigests=yes\n")
    args = agentd.parse_args(["--config-root", str(root)])
    engine = agentd.engine_config(agentd.effective_config(args), tmp_path)
    assert (engine.scratch_margin, engine.claim_grace_seconds, engine.digests) == (0.6, 7200,
                                                                                  True)
    assert engine.handoff_required == "reboot-syscall"
    assert [str(w) for w in engine.maintenance_window] == ["Mon 01:00-02:00"]
    assert engine.origin("HandoffMode") == f"{root}/etc/kho-agent/agent.conf:4"
    args = agentd.parse_args(["--config-root", str(root), "--claim-grace", "0", "--no-digests"])
    engine = agentd.engine_config(agentd.effective_config(args), tmp_path)
    assert (engine.claim_grace_seconds, engine.digests) == (None, False)
    # no file: today's defaults
    default = agentd.engine_config(agentd.effective_config(
        agentd.parse_args(["--config-root", str(tmp_path / "empty")])), tmp_path)
    assert default == EngineConfig(state_dir=tmp_path)


@pytest.mark.parametrize(("name", "text", "where"), [
    ("agent.conf", "[Commit]\nMaintenanceWindow=Mon..Fri 02:00-04:00\nHandoffMode=kexec\n",
     "etc/kho-agent/agent.conf:3: [Commit] HandoffMode=: 'kexec'"),
    ("agent.conf.d/20-typo.conf", "[Sessions]\nDigest=no\n",
     "etc/kho-agent/agent.conf.d/20-typo.conf:2: unknown key Digest="),
])
def test_a_bad_configuration_stops_the_start_with_exit_2(tmp_path: Path, name: str, text: str,
                                                         where: str) -> None:
    root = tmp_path / "root"
    write(root / "etc/kho-agent" / name, text)
    sim_dir = tmp_path / "sim"
    SimKernel.create(sim_dir)
    with PrivateBus() as bus:
        done = subprocess.run(
            [sys.executable, "-m", "kho_agent.daemon", "--bus-address", bus.address,
             "--simulate", str(sim_dir), "--state-dir", str(tmp_path / "state"),
             "--config-root", str(root)],
            capture_output=True, text=True, timeout=60, env=client_env(),
            stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    # the journal entry (MESSAGE_ID of Event.CONFIG_INVALID, priority err), echoed to stderr
    # when stderr is not the journal
    assert f"kho-agentd: [config-invalid] ConfigInvalid: {root}/{where}" in done.stderr
    assert Event.CONFIG_INVALID.priority == LOG_ERR
    assert not (tmp_path / "state").exists()   # stopped before anything was touched
    unit = (REPO / "systemd/kho-agent.service").read_text()
    assert "\nRestartPreventExitStatus=2\n" in unit   # so systemd does not loop on it


def test_check_config_prints_the_effective_configuration_or_names_the_error(
        tmp_path: Path) -> None:
    """`kho-agentd --check-config`: what an operator runs before restarting the agent (a
    restart while prepared drops the sessions; a bad file would keep it down)."""
    root = tmp_path / "root"
    path = write(root / "etc/kho-agent/agent.conf.d/30-w.conf",
                 "[Commit]\nMaintenanceWindow=Sat 01:00-02:00\n")

    def check(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kho_agent.daemon", "--check-config",
                               "--config-root", str(root), *extra], capture_output=True,
                              text=True, timeout=60, env=client_env(), stdin=subprocess.DEVNULL)
    done = check("--no-digests")
    assert done.returncode == 0, done.stderr
    assert f"# {path}:2\nMaintenanceWindow=Sat 01:00-02:00\n" in done.stdout
    assert "# the command line (--no-digests)\nDigests=no\n" in done.stdout
    path.write_text("[Commit]\nMaintenanceWindow=Sat 01:00\n")
    done = check()
    assert done.returncode == 2 and done.stdout == ""
    assert f"kho-agentd: ConfigInvalid: {path}:2: [Commit] MaintenanceWindow=" in done.stderr


def test_check_config_applies_every_command_line_override(tmp_path: Path) -> None:
    """`--check-config --metrics-dir DIR` printed the file's MetricsDirectory= (the daemon would
    have written elsewhere): every option that overrides a key is in the printed configuration,
    with the option as its origin."""
    root = tmp_path / "root"
    write(root / "etc/kho-agent/agent.conf", "[Records]\nMetricsDirectory=/var/lib/node\n")

    def check(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "kho_agent.daemon", "--check-config",
                               "--config-root", str(root), *extra], capture_output=True,
                              text=True, timeout=60, env=client_env(), stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        return done.stdout
    assert f"# {root}/etc/kho-agent/agent.conf:2\nMetricsDirectory=/var/lib/node\n" in check()
    assert ("# the command line (--metrics-dir)\nMetricsDirectory=/srv/metrics\n"
            in check("--metrics-dir", "/srv/metrics"))
    assert "# the command line (--metrics-dir)\nMetricsDirectory=\n" in check("--metrics-dir", "")
    assert "# the command line (--claim-grace)\nClaimGraceSec=90s\n" in check("--claim-grace",
                                                                             "90")
    # a simulated host writes no metrics unless something names a directory: said so
    (root / "etc/kho-agent/agent.conf").unlink()
    simulated = check("--simulate", str(tmp_path / "sim"))
    assert "# the command line (--simulate: no metrics unless" in simulated
    assert "\nMetricsDirectory=\n" in simulated
    assert not (tmp_path / "sim").exists()   # --check-config touches nothing
