"""packaging/install_data.py: kho-agent's data files land where a distribution package puts them."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import packaging_scripts
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "packaging" / "install_data.py"


inst = packaging_scripts.load("install_data")


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _docs_table() -> dict[str, str]:
    """Source -> installed path, from the table at the top of docs/systemd.md (the spec)."""
    table: dict[str, str] = {}
    for line in (REPO / "docs" / "systemd.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2:
            continue
        source = re.fullmatch(r"`([^`]+)`", cells[0])
        target = re.match(r"`(/[^`]+)`", cells[1])
        if source and target:
            path = target.group(1)
            # "`/usr/share/dbus-1/system-services/`": a directory, the file keeps its name
            table[source.group(1)] = path + Path(source.group(1)).name if path.endswith("/") \
                else path
    return table


def test_table_matches_the_documented_install_locations() -> None:
    documented = _docs_table()
    assert len(documented) == 13, documented  # the parser found the whole table
    ours = {row.source: inst.target_path(row, "/usr") for row in inst.DATA_FILES}
    assert ours == documented


def test_created_directories_are_the_tmpfiles_ones() -> None:
    """What install_data.py makes by hand is what systemd-tmpfiles would make at boot."""
    wanted = []
    for line in (REPO / "systemd" / "kho-agent.tmpfiles").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "d":
            wanted.append((fields[1], int(fields[2], 8)))
    assert wanted, "no d lines in systemd/kho-agent.tmpfiles"
    assert sorted(wanted) == sorted(inst.DATA_DIRS_CREATED)


def test_every_data_file_of_the_repository_has_a_row() -> None:
    """A file added to systemd/ etc/ share/ catalog/ packaging/kernel/ must be added to the table
    too."""
    in_repo = {str(p.relative_to(REPO)) for d in inst.DATA_DIRS for p in (REPO / d).rglob("*")
               if p.is_file()}
    assert in_repo, "no data files found: wrong repository root?"
    assert in_repo == {row.source for row in inst.DATA_FILES}


def _mode_of(source: str) -> int:
    """The kernel hooks are run by run-parts, which skips files that are not executable;
    everything else is data."""
    return 0o755 if source.startswith("packaging/kernel/") else 0o644


def test_install_places_every_file_with_content_and_mode(tmp_path: Path,
                                                         strict_umask: None) -> None:
    dest = tmp_path / "root"
    out = io.StringIO()
    assert inst.main(["--destdir", str(dest)], out=out) == 0
    installed = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    expected = {t.lstrip("/") for src, t in _docs_table().items()
                if src != "systemd/kho-agent-fdstore.conf"}
    assert installed == expected
    for row in inst.DATA_FILES:
        if row.fdstore_only:
            continue
        target = dest / inst.target_path(row, "/usr").lstrip("/")
        assert target.read_bytes() == (REPO / row.source).read_bytes()
        assert stat.S_IMODE(target.stat().st_mode) == _mode_of(row.source)
    # directories readable by dbus-daemon and polkitd (not root) despite the umask 077; the
    # state directory, which the unit's ReadWritePaths= needs to exist, is root's alone
    state = dest / "var/lib/kho-agent"
    assert state.is_dir() and not any(state.iterdir())
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for directory in (p for p in dest.rglob("*") if p.is_dir() and p != state):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    assert "journalctl --update-catalog" in out.getvalue()


def test_fdstore_drop_in_only_on_request(tmp_path: Path) -> None:
    drop_in = "etc/systemd/system/kho-agent.service.d/fdstore.conf"
    assert inst.main(["--destdir", str(tmp_path / "a")], out=io.StringIO()) == 0
    assert not (tmp_path / "a" / drop_in).exists()
    assert inst.main(["--destdir", str(tmp_path / "b"), "--fdstore"], out=io.StringIO()) == 0
    assert (tmp_path / "b" / drop_in).read_bytes() == \
        (REPO / "systemd/kho-agent-fdstore.conf").read_bytes()


def test_prefix_moves_everything_but_etc(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    assert inst.main(["--destdir", str(dest), "--prefix", "/usr/local/", "--fdstore"],
                     out=io.StringIO()) == 0
    files = {"/" + str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert "/usr/local/lib/systemd/system/kho-agent.service" in files
    assert "/usr/local/share/polkit-1/actions/org.khoagent.Agent1.policy" in files
    assert "/etc/systemd/system/kho-agent.service.d/fdstore.conf" in files
    assert all(f.startswith(("/usr/local/", "/etc/")) for f in files), files


def test_reinstall_replaces_stale_files(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    unit = dest / "usr/lib/systemd/system/kho-agent.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("stale\n")
    unit.chmod(0o600)
    assert inst.main(["--destdir", str(dest)], out=io.StringIO()) == 0
    assert unit.read_bytes() == (REPO / "systemd/kho-agent.service").read_bytes()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    # no temporary files left beside it
    assert sorted(p.name for p in unit.parent.iterdir()) == [
        "kho-agent-update.service", "kho-agent-update.timer", "kho-agent-verified.target",
        "kho-agent.service"]


def test_dry_run_prints_the_plan_and_installs_nothing(tmp_path: Path) -> None:
    """Run as a distribution's build would: the system interpreter, the script by path."""
    dest = tmp_path / "root"
    proc = subprocess.run(["/usr/bin/python3", str(SCRIPT), "--destdir", str(dest), "--dry-run",
                           "--fdstore"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not dest.exists()
    for source, target in _docs_table().items():
        assert (f"install {source} -> {dest}{target} (mode {_mode_of(source):04o})"
                in proc.stdout)
    assert f"mkdir {dest}/var/lib/kho-agent (mode 0700)" in proc.stdout


def test_bad_prefix_and_unwritable_destdir_say_what_to_do(tmp_path: Path) -> None:
    err = io.StringIO()
    assert inst.main(["--destdir", str(tmp_path), "--prefix", "usr"], out=io.StringIO(),
                     err=err) == 1
    assert "--prefix must be an absolute path" in err.getvalue()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = io.StringIO()
    assert inst.main(["--destdir", str(blocker)], out=io.StringIO(), err=err) == 1
    assert re.search(r"cannot (install|create) ", err.getvalue()), err.getvalue()
    assert "--destdir" in err.getvalue()


def test_package_mode_ships_the_fdstore_drop_in_where_systemd_does_not_read_it(
        tmp_path: Path) -> None:
    """--package (packaging/debian/rules): every row, the drop-in for systemd >= 261 under
    /usr/share/kho-agent (the postinst enables it), and no state directory (tmpfiles)."""
    targets = {p.name: p.target for p in inst.plan(tmp_path, "/usr", package=True)}
    assert targets.keys() == {row.source for row in inst.DATA_FILES}
    assert targets["systemd/kho-agent-fdstore.conf"] == \
        "/usr/share/kho-agent/kho-agent-fdstore.conf"
    assert not [t for t in targets.values() if t.startswith("/etc/systemd")]
    with pytest.raises(inst.InstallError, match="exclude each other"):
        inst.plan(tmp_path, "/usr", fdstore=True, package=True)
    out, err = io.StringIO(), io.StringIO()
    assert inst.main(["--destdir", str(tmp_path), "--package"], out, err) == 0, err.getvalue()
    assert (tmp_path / "usr/share/kho-agent/kho-agent-fdstore.conf").is_file()
    assert not (tmp_path / "var/lib/kho-agent").exists()


@pytest.mark.slow
def test_building_the_package_prints_no_deprecation_warning(tmp_path: Path) -> None:
    """A newcomer's first command printed about forty lines of setuptools deprecation warnings
    (issue 15: the license as a TOML table). pip builds in an isolated environment with the
    newest setuptools, as it does for a newcomer; the sources are copied so that the build
    writes nothing into the checkout."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).write_bytes((REPO / name).read_bytes())
    for path in (REPO / "kho_agent").rglob("*.py"):
        target = source / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", str(source),
                           "-w", str(tmp_path / "wheels")],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 and "Could not find a version that satisfies" in done.stdout + \
            done.stderr:
        pytest.skip("no package index reachable for pip's isolated build")
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    warnings = [line for line in output.splitlines() if "deprecat" in line.lower()]
    assert warnings == [], warnings[:10]
    assert len(list((tmp_path / "wheels").glob("kho_agent-*.whl"))) == 1
