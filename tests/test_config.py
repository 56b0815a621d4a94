"""kho-agent.conf(5): the parser on text (every error names file:line and the key), the
precedence of the files, the maintenance window and the choice of the target kernel."""

from __future__ import annotations

import errno
import os
from datetime import datetime
from pathlib import Path

import pytest
from nodac import python_without_dac

from kho_agent.config import AgentConfig, config_files, load_config, parse_config
from kho_agent.config.load import CONFIG_FILE_MAX
from kho_agent.config.target import (
    KernelCandidate,
    configured_initrd,
    initrd_beside,
    installed_kernels,
    newest_passing,
    release_key,
)
from kho_agent.config.window import (
    WindowSyntaxError,
    next_opening,
    parse_window,
    window_allows,
)
from kho_agent.errors import REGISTRY, AgentError, ConfigInvalid

REPO = Path(__file__).resolve().parent.parent


def parse(text: str | bytes, path: str = "/etc/kho-agent/agent.conf") -> AgentConfig:
    data = text.encode() if isinstance(text, str) else text
    return parse_config([(path, data)])


# ------------------------------------------------------------------ parser

def test_no_file_is_todays_behaviour() -> None:
    config = parse_config([])
    assert config == AgentConfig()
    assert (config.target, config.command_line, config.append_command_line) == ("", None, ())
    assert (config.scratch_margin, config.claim_grace_seconds, config.digests) == (0.25, 1800.0,
                                                                                  True)
    assert (config.handoff_mode, config.maintenance_window) == ("auto", ())
    assert config.command_line_for("root=/dev/vda kho=on") is None  # the engine reuses it


def test_every_key_is_parsed() -> None:
    config = parse("""
# a comment
; another
[Prepare]
Target = newest-compatible
CommandLine=root=/dev/vda ro
AppendCommandLine=quiet
AppendCommandLine=mitigations=auto
ScratchMargin=50%

[Commit]
HandoffMode=fdstore
MaintenanceWindow=Mon..Fri 02:00-04:00
MaintenanceWindow=Sat,Sun 22:00-06:00

[Sessions]
ClaimGraceSec=1h 30min
Digests=no

[Records]
MetricsDirectory=/run/metrics/
HistoryMaxEntries=50
""")
    assert config.target == "newest-compatible"
    assert config.command_line_for("ignored") == "root=/dev/vda ro quiet mitigations=auto"
    assert config.scratch_margin == 0.5
    assert config.handoff_mode == "fdstore"
    assert [str(w) for w in config.maintenance_window] == ["Mon..Fri 02:00-04:00",
                                                          "Sat,Sun 22:00-06:00"]
    assert config.claim_grace_seconds == 5400.0 and config.digests is False
    assert config.metrics_directory == "/run/metrics" and config.history_max_entries == 50
    assert config.origin("Digests") == "/etc/kho-agent/agent.conf:18"
    assert config.origin("CommandLine") == "/etc/kho-agent/agent.conf:6"


def test_append_command_line_goes_after_the_running_one_and_an_empty_value_clears() -> None:
    config = parse_config([("/a.conf", b"[Prepare]\nAppendCommandLine=quiet\n"),
                           ("/b.conf", b"[Prepare]\nAppendCommandLine=\nAppendCommandLine=x=1\n")])
    assert config.command_line_for("root=/dev/vda kho=on ") == "root=/dev/vda kho=on x=1"
    assert parse("[Sessions]\nClaimGraceSec=infinity\n").claim_grace_seconds is None


@pytest.mark.parametrize(("text", "line", "words"), [
    ("[Nope]\n", 1, "unknown section [Nope]"),
    ("Target=/boot/vmlinuz\n", 1, "Target= comes before any section"),
    ("[Prepare]\nTraget=/x\n", 2, "unknown key Traget="),
    ("[Sessions]\nHandoffMode=auto\n", 2, "HandoffMode= in [Sessions] (it belongs in [Commit])"),
    ("[Prepare]\nTarget\n", 2, "is not Key=Value"),
    ("[Prepare\n", 1, "is not a section header"),
    ("[Prepare]\nTarget=boot/vmlinuz\n", 2, "[Prepare] Target=: 'boot/vmlinuz' is not an "
     "absolute path"),
    ("[Prepare]\nScratchMargin=25\n", 2, "[Prepare] ScratchMargin=: '25' is not a percentage"),
    ("[Prepare]\nScratchMargin=1001%\n", 2, "out of range: 0% .. 1000%"),
    ("[Commit]\nHandoffMode=kexec\n", 2, "[Commit] HandoffMode=: 'kexec' is not a hand-off mode"),
    ("[Commit]\nMaintenanceWindow=Mon..Fry 02:00-04:00\n", 2, "'Fry' is not a day"),
    ("[Commit]\nMaintenanceWindow=02:00-02:00\n", 2, "is empty"),
    ("[Commit]\nMaintenanceWindow=25:00-26:00\n", 2, "is not a time of day"),
    ("[Sessions]\nClaimGraceSec=soon\n", 2, "[Sessions] ClaimGraceSec=: 'soon' is not a time "
     "span"),
    ("[Sessions]\nClaimGraceSec=0\n", 2, "out of range: 1s .. 30d"),
    ("[Sessions]\nClaimGraceSec=31d\n", 2, "out of range"),
    ("[Sessions]\nDigests=maybe\n", 2, "[Sessions] Digests=: 'maybe' is not a boolean"),
    ("[Records]\nHistoryMaxEntries=0\n", 2, "is not a count 1 .. 100000"),
    ("[Records]\nHistoryMaxEntries=-5\n", 2, "is not a count"),
    ("[Records]\nMetricsDirectory=metrics\n", 2, "not an absolute path"),
    ("[Prepare]\nCommandLine=a \\\n", 2, "continuation lines"),
    ("[Prepare]\nTarget=/a\n\nTarget=/b\n", 4, "Target= is set twice in this file (first on "
     "line 2)"),
    ("[Prepare]\nCommandLine=" + "x" * 5000 + "\n", 2, "longer than 4096 bytes"),
    ("[Commit]\n" + "MaintenanceWindow=02:00-03:00\n" * 33, 34, "more than 32 entries"),
])
def test_every_error_names_the_file_line_and_key(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigInvalid) as caught:
        parse(text, "/etc/kho-agent/agent.conf.d/10-fleet.conf")
    assert caught.value.message.startswith(f"/etc/kho-agent/agent.conf.d/10-fleet.conf:{line}: ")
    assert words in caught.value.message
    assert caught.value.exit_code == 2 and caught.value.name == "ConfigInvalid"


def test_non_utf8_names_its_line() -> None:
    with pytest.raises(ConfigInvalid, match=r"^/x\.conf:3: not UTF-8 \(byte 0xe9"):
        parse(b"[Prepare]\n# caf\xc3\xa9 is fine\n# caf\xe9 is not\n", "/x.conf")


def test_a_scalar_key_set_again_in_a_later_file_wins() -> None:
    config = parse_config([("/etc/a.conf", b"[Sessions]\nDigests=no\n"),
                           ("/etc/b.conf", b"[Sessions]\nDigests=yes\n")])
    assert config.digests is True and config.origin("Digests") == "/etc/b.conf:2"
    assert config.files == ("/etc/a.conf", "/etc/b.conf")


def test_config_invalid_is_registered_with_exit_2() -> None:
    (entry,) = [e for e in REGISTRY if e.error is ConfigInvalid]
    assert (entry.name, entry.exit_code) == ("ConfigInvalid", 2)


# ------------------------------------------------------------------ files

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_drop_ins_etc_over_run_over_usr_lib_in_lexical_order(tmp_path: Path) -> None:
    root = tmp_path
    write(root / "usr/lib/kho-agent/agent.conf", "[Sessions]\nDigests=no\n")   # shadowed
    main = write(root / "etc/kho-agent/agent.conf", "[Sessions]\nClaimGraceSec=10min\n")
    write(root / "usr/lib/kho-agent/agent.conf.d/20-vendor.conf", "[Sessions]\nDigests=no\n")
    write(root / "usr/lib/kho-agent/agent.conf.d/50-x.conf", "[Sessions]\nClaimGraceSec=1h\n")
    run_50 = write(root / "run/kho-agent/agent.conf.d/50-x.conf",
                   "[Sessions]\nClaimGraceSec=2h\n")
    etc_20 = write(root / "etc/kho-agent/agent.conf.d/20-vendor.conf",
                   "[Sessions]\nDigests=yes\n")
    vendor_10 = write(root / "usr/lib/kho-agent/agent.conf.d/10-base.conf",
                      "[Prepare]\nScratchMargin=40%\n")
    write(root / "etc/kho-agent/agent.conf.d/README", "not a drop-in")
    write(root / "etc/kho-agent/agent.conf.d/90-off.conf.disabled", "[Nope]\n")
    assert config_files(root) == [main, vendor_10, etc_20, run_50]
    config = load_config(root)
    assert config.files == tuple(str(p) for p in (main, vendor_10, etc_20, run_50))
    assert config.digests is True               # /etc's 20-vendor.conf replaced /usr/lib's
    assert config.claim_grace_seconds == 7200   # /run's 50-x.conf replaced /usr/lib's
    assert config.scratch_margin == 0.4


def test_a_link_to_dev_null_masks_a_vendor_drop_in(tmp_path: Path) -> None:
    write(tmp_path / "usr/lib/kho-agent/agent.conf.d/20-vendor.conf", "[Sessions]\nDigests=no\n")
    (tmp_path / "etc/kho-agent/agent.conf.d").mkdir(parents=True)
    os.symlink(os.devnull, tmp_path / "etc/kho-agent/agent.conf.d/20-vendor.conf")
    assert config_files(tmp_path) == []
    assert load_config(tmp_path) == AgentConfig()


def test_the_main_file_falls_back_to_usr_lib(tmp_path: Path) -> None:
    vendor = write(tmp_path / "usr/lib/kho-agent/agent.conf", "[Sessions]\nDigests=no\n")
    assert config_files(tmp_path) == [vendor]
    assert load_config(tmp_path).digests is False


@pytest.mark.parametrize("shape", ["directory", "fifo", "oversized", "dangling"])
def test_a_file_of_the_wrong_shape_is_named(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "etc/kho-agent/agent.conf.d/30-bad.conf"
    path.parent.mkdir(parents=True)
    if shape == "directory":
        path.mkdir()
    elif shape == "fifo":
        os.mkfifo(path)   # opened without blocking: refused, never read
    elif shape == "oversized":
        path.write_text("# x\n" * (CONFIG_FILE_MAX // 4 + 1))
    else:
        os.symlink(tmp_path / "nowhere", path)
    with pytest.raises(ConfigInvalid) as caught:
        load_config(tmp_path)
    assert caught.value.message.startswith(f"{path}: ")
    expected = {"directory": "a directory", "fifo": "a FIFO", "oversized": "more than the 65536",
                "dangling": "does not exist"}[shape]
    assert expected in caught.value.message


def test_a_drop_in_directory_that_is_a_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "etc/kho-agent/agent.conf.d", "oops")
    with pytest.raises(ConfigInvalid, match=r"agent\.conf\.d: not a directory"):
        load_config(tmp_path)


def test_the_shipped_default_file_parses_to_the_defaults() -> None:
    """etc/kho-agent/agent.conf has every key commented out with its default; uncommented,
    each gives the default again."""
    text = (REPO / "etc/kho-agent/agent.conf").read_text()
    assert parse(text) == replace_files(AgentConfig(), ("/etc/kho-agent/agent.conf",))
    uncommented = "\n".join(line[1:] if line.startswith("#") and "=" in line else line
                            for line in text.splitlines())
    config = parse(uncommented)
    assert replace_files(config, ()) == AgentConfig(), uncommented
    named = {line.split("=", 1)[0].lstrip("#") for line in text.splitlines()
             if line.startswith("#") and "=" in line and " " not in line.split("=", 1)[0]}
    from kho_agent.config.parse import KEYS
    assert named == {k.name for k in KEYS}


def test_the_man_page_documents_every_key() -> None:
    from kho_agent.config.parse import KEYS, SECTIONS
    text = (REPO / "man/kho-agent.conf.5").read_text()
    for key in KEYS:
        assert f".BR {key.name} =" in text or f"{key.name}=" in text, key.name
    for section in SECTIONS:
        assert f"[{section}]" in text


def replace_files(config: AgentConfig, files: tuple[str, ...]) -> AgentConfig:
    from dataclasses import replace
    return replace(config, files=files, origins=())


# ------------------------------------------------------------------ the window

def at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M")   # 2026-12-07 is a Monday


@pytest.mark.parametrize(("window", "inside", "outside"), [
    ("Mon..Fri 02:00-04:00", ["2026-12-07 02:00", "2026-12-11 03:59"],
     ["2026-12-07 04:00", "2026-12-07 01:59", "2026-12-12 03:00"]),
    ("Fri 23:00-01:00", ["2026-12-11 23:00", "2026-12-12 00:59"],
     ["2026-12-12 23:30", "2026-12-11 00:30", "2026-12-12 01:00"]),
    ("Fri..Mon 00:00-24:00", ["2026-12-13 12:00", "2026-12-07 23:59", "2026-12-11 00:00"],
     ["2026-12-08 00:00", "2026-12-10 23:59"]),
    ("22:00-06:00", ["2026-12-08 05:59", "2026-12-08 22:00"], ["2026-12-08 06:00"]),
    ("sunday,Wed 10:00-11:00", ["2026-12-13 10:30", "2026-12-09 10:00"], ["2026-12-14 10:30"]),
])
def test_window_allows(window: str, inside: list[str], outside: list[str]) -> None:
    windows = (parse_window(window),)
    for when in inside:
        assert window_allows(windows, at(when)), when
    for when in outside:
        assert not window_allows(windows, at(when)), when


def test_no_window_allows_always_and_has_no_opening() -> None:
    assert window_allows((), at("2026-12-07 12:00"))
    assert next_opening((), at("2026-12-07 12:00")) is None


def test_next_opening() -> None:
    windows = (parse_window("Mon..Fri 02:00-04:00"), parse_window("Sat 22:00-23:00"))
    assert next_opening(windows, at("2026-12-07 03:00")) == at("2026-12-07 03:00")  # inside
    assert next_opening(windows, at("2026-12-07 04:00")) == at("2026-12-08 02:00")
    assert next_opening(windows, at("2026-12-11 05:00")) == at("2026-12-12 22:00")
    assert next_opening(windows, at("2026-12-12 23:00")) == at("2026-12-14 02:00")
    assert next_opening((parse_window("Mon 02:00-03:00"),),
                        at("2026-12-07 03:00")) == at("2026-12-14 02:00")


@pytest.mark.parametrize("text", ["", "Mon", "Mon..Fri 2-4", "Mon Tue 02:00-03:00",
                                  "Mon 02:00-03:00-04:00", "Mon,,Tue 02:00-03:00",
                                  "Mon 24:00-01:00", "Mon 02:60-03:00"])
def test_window_syntax_errors(text: str) -> None:
    with pytest.raises(WindowSyntaxError):
        parse_window(text)


# ------------------------------------------------------------------ the target kernel

def test_releases_order_as_versions() -> None:
    releases = ["6.12.9-amd64", "6.12.10-amd64", "6.1.0-28-amd64", "6.12.9", "7.0.0-sim"]
    assert sorted(releases, key=release_key) == ["6.1.0-28-amd64", "6.12.9", "6.12.9-amd64",
                                                 "6.12.10-amd64", "7.0.0-sim"]


def test_the_newest_kernel_that_passes_the_gate_is_chosen(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    for release in ("6.12.9", "6.12.10", "6.2.0"):
        (boot / f"vmlinuz-{release}").write_bytes(b"k")
    (boot / "initrd.img-6.12.9").write_bytes(b"i")
    (boot / "vmlinuz-6.99.0.dpkg-new").write_bytes(b"k")   # a half-installed package
    (boot / "vmlinuz-7.0.0").mkdir()                       # not a regular file
    os.symlink(boot / "vmlinuz-6.12.10", boot / "vmlinuz-8.0.0")   # links are not followed
    candidates = installed_kernels(boot)
    assert sorted(c.release for c in candidates) == ["6.12.10", "6.12.9", "6.2.0"]
    asked: list[str] = []

    def gate(candidate: KernelCandidate) -> str | None:
        asked.append(candidate.release)
        return "ABI mismatch: luo 2 vs 1" if candidate.release == "6.12.10" else None
    selection = newest_passing(candidates, gate)
    assert selection.chosen is not None
    assert (selection.chosen.release, selection.chosen.kernel,
            selection.chosen.initrd) == ("6.12.9", boot / "vmlinuz-6.12.9",
                                         boot / "initrd.img-6.12.9")
    assert asked == ["6.12.10", "6.12.9"]   # newest first, stops at the first that passes
    nothing = newest_passing(candidates, lambda c: f"no {c.release}")
    assert nothing.chosen is None
    assert nothing.explain() == "6.12.10: no 6.12.10; 6.12.9: no 6.12.9; 6.2.0: no 6.2.0"
    assert "no kernel is installed" in newest_passing([], gate).explain()


def test_initrd_takes_auto_none_or_a_path_that_goes_with_a_target_path() -> None:
    assert parse("").initrd == "auto"
    assert parse("[Prepare]\nInitrd=none\n").initrd == "none"
    assert parse("[Prepare]\nInitrd=\n").initrd == "auto"   # empty: back to the default
    config = parse("[Prepare]\nTarget=/boot/vmlinuz-7\nInitrd=/boot/./initramfs-7.img\n")
    assert (config.target, config.initrd) == ("/boot/vmlinuz-7", "/boot/initramfs-7.img")
    assert parse("[Prepare]\nTarget=newest-compatible\nInitrd=none\n").initrd == "none"
    with pytest.raises(ConfigInvalid) as caught:
        parse("[Prepare]\nInitrd=initrd.img\n")
    assert "[Prepare] Initrd=: 'initrd.img' is not an absolute path (Initrd= takes auto, " \
           "none, or an initrd's path)" in caught.value.message
    for target, said in (("newest-compatible", "Target=newest-compatible (/d.conf:2)"),
                         ("", "Target= names no kernel")):
        with pytest.raises(ConfigInvalid) as caught:
            parse_config([("/d.conf", f"[Prepare]\nTarget={target}\n".encode()),
                          ("/e.conf", b"[Prepare]\nInitrd=/boot/initrd.img-7\n")])
        assert caught.value.message.startswith("/e.conf:2: [Prepare] Initrd=/boot/initrd.img-7: "
                                               f"a path goes with a Target= path only, and "
                                               f"{said}"), caught.value.message


def test_the_initrd_of_a_configured_kernel_is_the_one_installed_beside_it(
        tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    for name in ("vmlinuz-6.12.9", "initrd.img-6.12.9", "vmlinuz-6.12.10", "bzImage"):
        (boot / name).write_bytes(b"x")
    (boot / "initrd.img-6.12.10").mkdir()   # not a regular file: no initrd
    os.symlink("boot/vmlinuz-6.12.9", tmp_path / "vmlinuz")     # Debian's links in /
    os.symlink("boot/initrd.img-6.12.9", tmp_path / "initrd.img")
    assert initrd_beside(boot / "vmlinuz-6.12.9") == boot / "initrd.img-6.12.9"
    assert initrd_beside(tmp_path / "vmlinuz") == tmp_path / "initrd.img"
    assert initrd_beside(boot / "vmlinuz-6.12.10") is None
    assert initrd_beside(boot / "bzImage") is None
    assert initrd_beside(boot / "vmlinuz-7.0") is None    # no such kernel, no such initrd
    kernel = boot / "vmlinuz-6.12.9"
    assert configured_initrd(kernel, "auto") == boot / "initrd.img-6.12.9"
    assert configured_initrd(kernel, "none") is None
    assert configured_initrd(kernel, "/srv/initrd") == Path("/srv/initrd")


@pytest.mark.parametrize(("make", "error", "errno_name"), [
    ("file", "NotFound", "ENOTDIR"), ("missing", "NotFound", "ENOENT")])
def test_a_boot_directory_that_cannot_be_listed_names_it_and_the_errno(
        tmp_path: Path, make: str, error: str, errno_name: str) -> None:
    """It was PreflightFailed "cannot list /boot: Not a directory": the errno's name and the
    class an unreadable kernel path gets (callerfile) are what an operator keys on."""
    boot = tmp_path / "boot"
    if make == "file":
        boot.write_bytes(b"not a directory")
    with pytest.raises(AgentError) as refused:
        installed_kernels(boot)
    assert refused.value.name == error
    assert refused.value.message == (f"the boot directory (Target=newest-compatible) {boot} "
                                     f"cannot be listed: {errno_name} "
                                     f"({os.strerror(getattr(errno, errno_name))})")


def test_a_boot_directory_the_agent_may_not_read_is_permission_denied(tmp_path: Path) -> None:
    """EACCES as the unit meets it: root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH."""
    boot = tmp_path / "boot"
    boot.mkdir(mode=0o000)
    done = python_without_dac(
        "import sys\nfrom kho_agent.config.target import installed_kernels\n"
        "from kho_agent.errors import AgentError\n"
        f"try:\n    installed_kernels({str(boot)!r})\nexcept AgentError as exc:\n"
        "    print(exc.name, exc.message)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"PermissionDenied the boot directory (Target=newest-compatible) "
                           f"{boot} cannot be listed: EACCES (Permission denied)\n")


def test_a_drop_in_directory_that_cannot_be_listed_names_the_errno(tmp_path: Path) -> None:
    """It said "cannot list it: Permission denied": the errno's name too, as everywhere."""
    dropins = tmp_path / "etc/kho-agent/agent.conf.d"
    dropins.mkdir(parents=True, mode=0o000)
    done = python_without_dac(
        "from pathlib import Path\nfrom kho_agent.config import load_config\n"
        "from kho_agent.errors import ConfigInvalid\n"
        f"try:\n    load_config(Path({str(tmp_path)!r}))\nexcept ConfigInvalid as exc:\n"
        "    print(exc.message)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{dropins}: cannot list it: EACCES (Permission denied)\n"


def test_the_effective_configuration_prints_as_a_file_that_parses_to_it() -> None:
    from kho_agent.config.parse import format_config
    config = parse_config([
        ("/etc/kho-agent/agent.conf", b"[Prepare]\nTarget=/boot/vmlinuz-7\nCommandLine=ro\n"
         b"AppendCommandLine=a=1\nAppendCommandLine=b\nScratchMargin=12.5%\n[Commit]\n"
         b"HandoffMode=direct\nMaintenanceWindow=Fri 23:00-01:00\n"
         b"MaintenanceWindow=Sat,Sun 00:00-24:00\n[Sessions]\nClaimGraceSec=infinity\n"
         b"Digests=off\n[Records]\nMetricsDirectory=\nHistoryMaxEntries=7\n")])
    text = format_config(config)
    assert "# /etc/kho-agent/agent.conf:10\nMaintenanceWindow=Fri 23:00-01:00\n" \
           "MaintenanceWindow=Sat,Sun 00:00-24:00\n" in text
    again = parse_config([("/printed", text.encode())])
    assert replace_files(again, ()) == replace_files(config, ())
    assert format_config(AgentConfig()).startswith("# files read: none")


@pytest.mark.parametrize("grace", ["30d", "1234567", "1.5s"])
def test_a_long_or_fractional_grace_prints_as_it_parses(grace: str) -> None:
    """`:g` printed ClaimGraceSec=30d as 2.592e+06s, which the parser refuses."""
    from kho_agent.config.parse import format_config
    config = parse_config([("/etc/kho-agent/agent.conf",
                            f"[Sessions]\nClaimGraceSec={grace}\n".encode())])
    again = parse_config([("/printed", format_config(config).encode())])
    assert again.claim_grace_seconds == config.claim_grace_seconds
