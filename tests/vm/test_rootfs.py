"""The guest image's recipe without building it: the agent layer's key covers everything that
goes into the Debian package it installs, and the releases ask for what the package needs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from . import rootfs

REPO = rootfs.REPO


def _load(name: str, path: Path) -> ModuleType:
    # from its path: "packaging" is not a Python package
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_agent_key_covers_what_the_package_is_built_from() -> None:
    """A change to any of these must rebuild the image: the code, the debian/ directory and
    its maintainer scripts, every data file install_data.py maps, man pages, completion."""
    inputs = {p.relative_to(REPO).as_posix() for p in rootfs.package_inputs()}
    install_data = _load("kho_install_data_rootfs", REPO / "packaging" / "install_data.py")
    wanted = {row.source for row in install_data.DATA_FILES}
    wanted |= {p.relative_to(REPO).as_posix() for d in ("packaging/debian", "man", "completion")
               for p in (REPO / d).rglob("*") if p.is_file()}
    wanted |= {"pyproject.toml", "README.md", "packaging/install_data.py",
               "packaging/build_deb.py", "kho_agent/__init__.py", "kho_agent/cli/__init__.py"}
    assert wanted - inputs == set()
    # and not the tests or the docs: editing those must not rebuild the image
    assert not {name for name in inputs if name.startswith(("tests/", "docs/"))}


def _package_names(field: str) -> list[str]:
    control = (REPO / "packaging" / "debian" / "control").read_text()
    match = re.search(rf"^{field}:(.*?)(?=^\S)", control, re.MULTILINE | re.DOTALL)
    assert match is not None, field
    names = re.findall(r"^\s*([a-z0-9][a-z0-9+.-]+)", match.group(1).replace(",", "\n"),
                       re.MULTILINE)
    return [n for n in names if not n.startswith("$")]


def test_each_release_has_the_packages_dependencies() -> None:
    """dpkg -i runs offline in the image: the base must hold every Depends, the Recommends as
    the release has them (python3-blake3 only in sid: its digest algorithm), and no pip."""
    depends = _package_names("Depends")
    assert "python3-gi" in depends and "dbus" in depends  # the parse found the list
    for release in rootfs.GUESTS.values():
        assert set(depends) <= set(release.packages), release.name
        assert {"polkitd", "kexec-tools", "man-db"} <= set(release.packages), release.name
        assert ("python3-blake3" in release.packages) == (release.digest_alg == "blake3")
        assert not {"python3-pip", "python3-wheel"} & set(release.packages), release.name
