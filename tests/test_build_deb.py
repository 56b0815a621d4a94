"""packaging/build_deb.py without building: its reading of packaging/debian/control (the one list
of build tools and dependencies: .ci/run, quickstart.sh and tests/vm ask build_deb.py for them),
and the tree it gives dpkg-buildpackage (what the package is built from, and nothing else).
tests/test_debian_package.py builds the package."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import packaging_scripts
import pytest

build_deb = packaging_scripts.load("build_deb")
install_data = packaging_scripts.load("install_data")
REPO = build_deb.REPO

# dpkg's own reading of a relation field (libdpkg-perl, which dpkg-buildpackage uses): the first
# alternative of each relation, substitution variables dropped.
DPKG_NAMES = r"""
use Dpkg::Control::Info; use Dpkg::Deps;
my ($file, $package, @fields) = @ARGV;
my $control = Dpkg::Control::Info->new($file);
my $para = $package eq "" ? $control->get_source : $control->get_pkg_by_name($package);
for my $field (@fields) {
    next unless defined $para->{$field};
    (my $value = $para->{$field}) =~ s/\$\{[^}]+\}//g;
    my $deps = deps_parse($value, build_dep => $package eq "") or die "cannot parse $field";
    for my $dep ($deps->get_deps) {
        my @alternatives = $dep->isa("Dpkg::Deps::OR") ? $dep->get_deps : ($dep);
        print $alternatives[0]->{package}, "\n";
    }
}
"""


def dpkg_names(package: str, *fields: str) -> list[str]:
    if shutil.which("perl") is None or subprocess.run(
            ["perl", "-MDpkg::Deps", "-e", "1"], capture_output=True, check=False).returncode:
        pytest.skip("libdpkg-perl not installed (dpkg-dev, which .ci/run installs, brings it)")
    return subprocess.run(["perl", "-e", DPKG_NAMES, str(build_deb.CONTROL), package, *fields],
                          capture_output=True, text=True, check=True).stdout.split()


def test_build_depends_of_the_real_control_file_are_what_dpkg_reads_there() -> None:
    names = dpkg_names("", "Build-Depends", "Build-Depends-Indep", "Build-Depends-Arch")
    assert "debhelper-compat" in names  # a virtual package with a version: (= 13)
    assert build_deb.build_depends() == ["build-essential",
                                         *(build_deb.PROVIDERS.get(n, n) for n in names)]
    assert "debhelper" in build_deb.build_depends()
    assert "lintian" not in build_deb.build_depends()  # .ci/run adds it, for the tests


@pytest.mark.parametrize("field", ["Depends", "Recommends"])
def test_binary_relations_of_the_real_control_file_are_what_dpkg_reads_there(
        field: str) -> None:
    names = dpkg_names(build_deb.PACKAGE, field)
    assert names and build_deb.binary_relations(field) == names


def test_relation_names_drop_versions_and_qualifiers_and_take_the_first_alternative() -> None:
    value = ("debhelper-compat (= 13),\n python3-gi (>= 3.42) | python3-gi-cairo,"
             " ${misc:Depends}, python3:any (<< 4~), libc6 (>>2.36-9+deb12u1) ,, g++")
    assert build_deb.relation_names(value) == ["debhelper-compat", "python3-gi", "python3",
                                               "libc6", "g++"]
    assert build_deb.relation_names("") == []


@pytest.mark.parametrize("relation", ["foo [amd64]", "foo <!nocheck>", "Foo", "foo (>= )",
                                      "foo (~ 1)", "foo bar"])
def test_a_relation_it_does_not_understand_is_refused_not_guessed(relation: str) -> None:
    with pytest.raises(build_deb.BuildError, match="not a relation this reader understands"):
        build_deb.relation_names(f"dbus, {relation}")


def test_control_paragraphs_join_continuations_and_skip_comments() -> None:
    text = ("Source: kho-agent\n# a comment\nBuild-Depends: aa,\n  bb (>= 1),\n\tcc\n\n\n"
            "Package: kho-agent\ndepends: dd\n")
    assert build_deb.control_paragraphs(text) == [
        {"source": "kho-agent", "build-depends": "aa,\nbb (>= 1),\ncc"},
        {"package": "kho-agent", "depends": "dd"}]
    for bad in (" starts with a continuation\n", "Source kho-agent\n"):
        with pytest.raises(build_deb.BuildError, match="control line 1"):
            build_deb.control_paragraphs(bad)


def test_build_depends_needs_the_source_paragraph(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.write_text("Source: another\nBuild-Depends: aa\n")
    with pytest.raises(build_deb.BuildError, match="no paragraph with source: kho-agent"):
        build_deb.build_depends(control)


def test_print_build_deps_runs_on_the_system_python_alone() -> None:
    """.ci/run asks for the list before quickstart.sh made the venv: Debian's python3, no site
    packages (-S), nothing from the environment (-I)."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("no /usr/bin/python3")
    done = subprocess.run([str(python), "-I", "-S", str(REPO / "packaging" / "build_deb.py"),
                           "--print-build-deps"], capture_output=True, text=True, check=True,
                          cwd="/", env={})
    assert done.stdout == " ".join(build_deb.build_depends()) + "\n"
    assert done.stderr == ""


def test_the_build_tree_holds_what_the_package_is_built_from_and_nothing_else(
        tmp_path: Path) -> None:
    """stage() copies package_files() (the list tests/vm keys its guest image on), and they are
    what debian/rules and pybuild read; not the tests, the docs or quickstart.sh."""
    tree = tmp_path / "kho-agent"
    build_deb.stage(tree)
    staged = {p.relative_to(tree).as_posix() for p in tree.rglob("*")
              if (p.is_file() or p.is_symlink()) and p.relative_to(tree).parts[0] != "debian"}
    listed = {p.as_posix() for p in build_deb.package_files()}
    assert staged == listed
    debian = {p.relative_to(tree / "debian").as_posix() for p in (tree / "debian").rglob("*")
              if p.is_file()}
    assert debian == {p.relative_to(REPO / "packaging" / "debian").as_posix()
                      for p in (REPO / "packaging" / "debian").rglob("*") if p.is_file()}
    needed = {row.source for row in install_data.DATA_FILES}
    needed |= {p.relative_to(REPO).as_posix() for d in ("man", "completion")
               for p in (REPO / d).rglob("*") if p.is_file()}
    needed |= {p.relative_to(REPO).as_posix() for p in (REPO / "kho_agent").rglob("*.py")}
    needed |= {"pyproject.toml", "README.md", "LICENSE", "packaging/install_data.py"}
    assert needed - staged == set()
    assert not {name for name in staged
                if name.startswith(("tests/", "docs/", "benchmarks/", "fuzz/", ".ci/"))
                or name == "quickstart.sh"}
