"""The guest image's recipe without building it: the agent layer's key covers everything that
goes into the Debian package it installs, and the releases ask for what the package needs."""

from __future__ import annotations

from . import rootfs

REPO = rootfs.REPO


def test_the_agent_key_covers_what_the_package_is_built_from_and_nothing_else() -> None:
    """The key's files are build_deb.py's package_files(), the list its build tree is staged
    from (tests/test_build_deb.py checks that tree against the list and against what the build
    needs): a change to any of them rebuilds the image, and a change to anything else
    (quickstart.sh, the tests, the docs) does not. The old key took every top-level file."""
    inputs = {p.relative_to(REPO).as_posix() for p in rootfs.package_inputs()}
    assert inputs == {p.as_posix() for p in rootfs.BUILD_DEB.package_files(REPO)}
    assert {"kho_agent/daemon.py", "packaging/debian/control", "pyproject.toml"} <= inputs
    assert not {name for name in inputs
                if name.startswith(("tests/", "docs/", ".ci/")) or name == "quickstart.sh"}


def test_each_release_has_the_packages_dependencies() -> None:
    """dpkg -i runs offline in the image: the base must hold every Depends, the Recommends as
    the release has them (python3-blake3 only in sid: its digest algorithm), and no pip."""
    depends = rootfs.BUILD_DEB.binary_relations("Depends")
    assert "python3-gi" in depends and "dbus" in depends  # the parse found the list
    for release in rootfs.GUESTS.values():
        assert set(depends) <= set(release.packages), release.name
        assert {"polkitd", "kexec-tools", "man-db"} <= set(release.packages), release.name
        assert ("python3-blake3" in release.packages) == (release.digest_alg == "blake3")
        assert not {"python3-pip", "python3-wheel"} & set(release.packages), release.name
