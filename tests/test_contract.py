"""The D-Bus contract declared once (kho_agent/service/contract.py) against everything that must
agree with it: the shipped bus policy and polkit actions, the service's handlers, the generated
introspection XML; and the error registry (kho_agent/errors.py) against the client's mapping and
the documentation."""

from __future__ import annotations

import errno
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import gi
import pytest

gi.require_version("Gio", "2.0")
from gi.repository import Gio  # noqa: E402

from kho_agent import errors as errors_mod  # noqa: E402
from kho_agent.errors import (  # noqa: E402
    REGISTRY,
    AgentError,
    KernelRefused,
    StorageFailed,
    SystemCallFailed,
)
from kho_agent.service import contract  # noqa: E402
from kho_agent.service import interfaces as api  # noqa: E402
from kho_agent.service.errors import from_dbus  # noqa: E402
from kho_agent.service.manager import JOB_HANDLERS, MANAGER_HANDLERS  # noqa: E402
from kho_agent.service.objects import ExportedObject  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUS_POLICY = REPO / "etc" / "dbus-1" / "system.d" / "org.khoagent.Agent1.conf"
POLKIT_POLICY = REPO / "share" / "polkit-1" / "actions" / "org.khoagent.Agent1.policy"
READ_ONLY_COMMENT = "read-only"


# --- the bus policy and polkit --------------------------------------------------------------

def policy_groups() -> dict[tuple[str, str], str]:
    """(interface, member) -> the group the shipped bus policy lists it under: the comment
    before it, "read-only" or the polkit action it names."""
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    root = ET.parse(BUS_POLICY, parser).getroot()
    default = next(p for p in root.iter("policy") if p.get("context") == "default")
    groups: dict[tuple[str, str], str] = {}
    group = ""
    for element in default:
        if element.tag is ET.Comment:
            text = element.text or ""
            if READ_ONLY_COMMENT in text:
                group = READ_ONLY_COMMENT
            else:
                found = re.search(r"org\.khoagent\.Agent1\.\w+", text)
                assert found, f"a comment in the bus policy names no group: {text!r}"
                group = found.group(0)
        elif element.tag == "allow" and element.get("send_interface", "").startswith(
                "org.khoagent."):
            key = (element.attrib["send_interface"], element.attrib["send_member"])
            assert key not in groups, f"{key} is listed twice"
            groups[key] = group
    return groups


def declared_groups() -> dict[tuple[str, str], str]:
    return {(iface.name, m.name): m.action or READ_ONLY_COMMENT
            for iface in contract.INTERFACES for m in iface.methods}


def test_the_bus_policy_allows_every_declared_method_under_its_polkit_action() -> None:
    assert policy_groups() == declared_groups()


def test_the_polkit_policy_declares_exactly_the_actions_the_contract_uses() -> None:
    root = ET.parse(POLKIT_POLICY).getroot()
    shipped = {a.attrib["id"] for a in root.iter("action")}
    used = {m.action for iface in contract.INTERFACES for m in iface.methods if m.action}
    assert shipped == used == {api.ACTION_MANAGE, api.ACTION_SESSION, api.ACTION_INHIBIT}


def test_a_policy_check_would_see_a_method_in_the_wrong_group() -> None:
    """The comparison can fail: a method moved to another group is a difference."""
    groups = declared_groups()
    groups[(api.MANAGER_IFACE, "Prepare")] = READ_ONLY_COMMENT
    assert policy_groups() != groups


# --- the handlers ---------------------------------------------------------------------------

def test_every_declared_method_has_a_handler_and_every_handler_a_declaration() -> None:
    assert set(MANAGER_HANDLERS) == {m.name for m in contract.MANAGER.methods}
    assert set(JOB_HANDLERS) == {m.name for m in contract.JOB.methods}
    assert not contract.SESSION.methods


@pytest.mark.parametrize("methods", [
    {"Frobnicate": lambda call: None},                      # undeclared
    {name: (lambda call: None) for name in list(MANAGER_HANDLERS)[1:]},   # one missing
])
def test_an_object_is_not_exported_with_a_handler_table_that_differs(
        methods: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"undeclared|without one"):
        ExportedObject(None, api.MANAGER_PATH, contract.MANAGER, methods,  # type: ignore[arg-type]
                       lambda name: None)


# --- the generated XML ----------------------------------------------------------------------

@pytest.mark.parametrize("declared", contract.INTERFACES, ids=lambda i: i.name)
def test_the_generated_xml_is_what_the_declarations_say(declared: contract.Interface) -> None:
    info = Gio.DBusNodeInfo.new_for_xml(declared.xml()).lookup_interface(declared.name)
    assert [(m.name, [(a.name, a.signature) for a in m.in_args],
             [(a.name, a.signature) for a in m.out_args]) for m in info.methods] == [
        (m.name, [(a.name, a.signature) for a in m.in_args],
         [(a.name, a.signature) for a in m.out_args]) for m in declared.methods]
    assert [(p.name, p.signature) for p in info.properties] == [
        (p.name, p.signature) for p in declared.properties]
    assert all(not p.flags & Gio.DBusPropertyInfoFlags.WRITABLE for p in info.properties)
    assert [(s.name, [a.signature for a in s.args]) for s in info.signals] == [
        (s.name, [a.signature for a in s.args]) for s in declared.signals]
    for member in (*declared.methods, *declared.properties, *declared.signals):
        if member.doc:   # the documentation travels with the XML
            assert member.doc.split()[0] in declared.xml()


def test_list_sessions_is_declared_with_the_owners_bus_name() -> None:
    """The drift of issue 14: kho-agentctl described a(soubbbb); there is one declaration."""
    assert contract.MANAGER.method("ListSessions").out_type == "(a(sousbbb))"


def test_every_method_with_options_takes_one_a_sv() -> None:
    for iface in contract.INTERFACES:
        for method in iface.methods:
            has_dict = any(a.signature == "a{sv}" for a in method.in_args)
            assert has_dict == (method.options is not None), method.name
            if method.options is not None:
                assert method.in_args[method.options_position].name == "options"


# --- the error registry ---------------------------------------------------------------------

def test_every_class_takes_its_name_and_exit_code_from_the_registry() -> None:
    names = [e.name for e in REGISTRY]
    assert len(names) == len(set(names))
    for entry in REGISTRY:
        assert entry.error.name == entry.name
        assert entry.error.exit_code == entry.exit_code
    assert errors_mod.EXIT_CODES["StorageFailed"] == errors_mod.EXIT_CANNOT_RUN
    assert errors_mod.EXIT_CODES["KernelRefused"] == errors_mod.EXIT_KERNEL


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.on_bus and e.error is not AgentError],
                         ids=lambda e: e.name)
def test_the_client_rebuilds_every_error_the_daemon_sends(entry: errors_mod.Registered) -> None:
    message = "PRESERVE_FD failed: EBUSY (Device or resource busy): the file is in use"
    rebuilt = from_dbus(errors_mod.DBUS_ERROR_PREFIX + entry.name, message)
    assert type(rebuilt) is entry.error
    assert (rebuilt.name, rebuilt.exit_code, rebuilt.message) == (entry.name, entry.exit_code,
                                                                  message)
    assert rebuilt.args == (message,)
    if isinstance(rebuilt, SystemCallFailed):
        assert rebuilt.errno == errno.EBUSY
        assert rebuilt.to_json()["errno_name"] == "EBUSY"


def test_an_unknown_error_name_stays_a_plain_agent_error() -> None:
    rebuilt = from_dbus("org.freedesktop.DBus.Error.Frob", "no")
    assert type(rebuilt) is AgentError and rebuilt.message == "org.freedesktop.DBus.Error.Frob: no"
    client_only = from_dbus(errors_mod.DBUS_ERROR_PREFIX + "DaemonUnreachable", "x")
    assert type(client_only) is AgentError


def test_storage_failed_is_not_the_kernel_refusing() -> None:
    err = StorageFailed("creating the state directory /x", errno.ENOSPC, "free some space")
    assert not isinstance(err, KernelRefused)
    assert "ENOSPC (No space left on device)" in err.message
    assert err.to_json()["errno"] == errno.ENOSPC and err.exit_code == 2


def test_errno_text_names_the_errno_with_its_text() -> None:
    """The one spelling every message naming an errno uses (SystemCallFailed's included)."""
    assert errors_mod.errno_text(errno.EBADF) == "EBADF (Bad file descriptor)"
    assert errors_mod.errno_text(OSError(errno.EROFS, "ignored", "/x")) \
        == "EROFS (Read-only file system)"
    assert errors_mod.errno_text(OSError("no errno")) == "EIO (Input/output error)"
    assert errors_mod.errno_text(100000) == "100000 (Unknown error 100000)"


def readme_error_rows() -> dict[str, tuple[int, str]]:
    text = (REPO / "README.md").read_text()
    return {name: (int(code), meaning) for name, code, meaning in
            re.findall(r"^\| `(\w+)` \| (\d+) \| (.*) \|$", text, re.MULTILINE)}


def test_the_readme_lists_exactly_the_registered_errors() -> None:
    assert readme_error_rows() == {e.name: (e.exit_code, e.meaning) for e in REGISTRY}


def test_the_docs_name_only_registered_errors() -> None:
    registered = {e.name for e in REGISTRY}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named = set(re.findall(r"org\.khoagent\.Agent1\.Error\.(\w+)", doc.read_text()))
        assert named <= registered, doc.name


def test_the_calls_the_docs_show_have_the_declared_arguments() -> None:
    """`SetReady(name, true)` in a document: a member of the contract, with as many arguments
    as it declares (in arguments of a method, the arguments of a signal)."""
    members: dict[str, int] = {}
    for iface in contract.INTERFACES:
        members.update({m.name: len(m.in_args) for m in iface.methods})
        members.update({s.name: len(s.args) for s in iface.signals})
    seen = 0
    for doc in (REPO / "README.md", REPO / "docs" / "vmm-integration.md",
                REPO / "docs" / "systemd.md"):
        for name, args in re.findall(r"`([A-Z]\w+)\(([^`)]*)\)`", doc.read_text()):
            if name not in members:
                continue   # not ours (a Python class, a systemd call)
            count = len(re.split(r",\s*(?![^{]*})", args)) if args.strip() else 0
            assert count == members[name], f"{doc.name}: {name}({args})"
            seen += 1
    assert seen >= 8
