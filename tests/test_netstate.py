"""Network state: a real snapshot of this host and of a private namespace, and the diff."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kho_agent import netstate
from kho_agent.netstate import (
    Address,
    Link,
    NetState,
    NetStateFormatError,
    Route,
    diff,
    snapshot,
    snapshot_or_reason,
)

REPO = Path(__file__).resolve().parent.parent
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def test_snapshot_has_loopback() -> None:
    state = snapshot()
    lo = [x for x in state.links if x.name == "lo"]
    assert len(lo) == 1
    assert lo[0].mtu is not None and lo[0].mtu > 0
    assert Address("lo", "inet", "127.0.0.1/8") in state.addresses
    assert all(MAC.match(x.mac) for x in state.links if x.mac is not None)
    # The JSON form carries everything back.
    assert NetState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_snapshot_works_unprivileged() -> None:
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: test_snapshot_has_loopback covers it")
    code = ("import json; from kho_agent.netstate import snapshot; "
            "print(json.dumps(snapshot().to_json()))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], user=65534, group=65534,
                              extra_groups=[], capture_output=True, text=True, cwd=REPO,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    except PermissionError as exc:  # the exec itself: the checkout lies below a 0700 directory
        pytest.skip(f"the interpreter is not usable by nobody here: {exc}")
    if proc.returncode != 0 and "Permission denied" in proc.stderr:
        pytest.skip(f"the interpreter is not usable by nobody here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    state = NetState.from_json(json.loads(proc.stdout))
    assert Address("lo", "inet", "127.0.0.1/8") in state.addresses


NETNS_SCRIPT = textwrap.dedent("""
    import json
    from pyroute2 import IPRoute
    from kho_agent.netstate import snapshot
    with IPRoute() as ipr:
        ipr.link("add", ifname="v0", kind="veth", peer="v1")
        v0 = ipr.link_lookup(ifname="v0")[0]
        v1 = ipr.link_lookup(ifname="v1")[0]
        ipr.link("set", index=v0, mtu=9000, address="02:00:00:00:00:0a")
        ipr.link("set", index=v1, mtu=9000)
        ipr.link("set", index=v1, state="up")
        ipr.link("set", index=v0, state="up")
        ipr.addr("add", index=v0, address="10.9.0.2", prefixlen=24)
        ipr.route("add", dst="0.0.0.0/0", gateway="10.9.0.1", oif=v0)
        ipr.route("add", dst="10.77.0.0/16", gateway="10.9.0.3", oif=v0, table=100)
    print(json.dumps(snapshot().to_json()))
""")


@pytest.mark.parametrize("which", ["venv", "debian"])
def test_snapshot_of_a_namespace_with_a_veth_pair(which: str) -> None:
    python = interpreter_with_pyroute2(which)
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private network namespace")
    proc = subprocess.run([unshare, "--net", python, "-c", NETNS_SCRIPT],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    state = NetState.from_json(json.loads(proc.stdout))
    links = {x.name: x for x in state.links}
    assert links["v0"] == Link("v0", "veth", "02:00:00:00:00:0a", 9000, links["v0"].state)
    assert links["v1"].kind == "veth"
    assert links["lo"].state == "DOWN"  # a new namespace's loopback is down
    assert Address("v0", "inet", "10.9.0.2/24") in state.addresses
    assert Route("inet", "default", "10.9.0.1", "v0") in state.routes
    assert Route("inet", "10.9.0.0/24", None, "v0") in state.routes
    # Only the main table is recorded.
    assert not [r for r in state.routes if r.dst == "10.77.0.0/16"]


def test_snapshot_or_reason_turns_a_failure_into_a_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pyroute2  # type: ignore[import-untyped]

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pyroute2, "IPRoute", refuse)
    state, reason = snapshot_or_reason()
    assert state is None
    assert reason is not None and "Permission denied" in reason
    monkeypatch.undo()
    state, reason = snapshot_or_reason()
    assert state is not None and reason is None


DEBIAN_PYTHON = "/usr/bin/python3"


def interpreter_with_pyroute2(which: str) -> str:
    """This venv's python (PyPI's pyroute2), or Debian's python3 with python3-pyroute2 (0.7 on
    bookworm: what the .deb depends on, and a different API for attributes)."""
    if which == "venv":
        return sys.executable
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import pyroute2"], capture_output=True,
                           timeout=60, check=False) if os.path.exists(DEBIAN_PYTHON) else None
    if probe is None or probe.returncode != 0:
        pytest.skip("Debian's python3-pyroute2 is not installed (.ci/run installs it)")
    return DEBIAN_PYTHON


OBSERVE_CODE = textwrap.dedent("""
    import json, sys
    from kho_agent import netstate
    state, reason = netstate.observe()
    print(json.dumps({"state": state.to_json() if state else None, "reason": reason,
                      "pyroute2_imported": "pyroute2" in sys.modules}))
""")


@pytest.mark.parametrize("argv0", ["python3", "kho-agentd"])
def test_observe_reads_the_network_in_a_child_without_importing_pyroute2_here(
        argv0: str, tmp_path: Path) -> None:
    # The daemon observes on a worker thread; pyroute2's first import there once starved its
    # main loop until systemd's watchdog fired. observe() must leave this process without it.
    # kho-agent.service runs python3 with argv[0] "kho-agentd": sys.executable is then a
    # program of that name in PATH (here one that would only print "wrong"), not python.
    if argv0 == "kho-agentd":  # the child is then /proc/self/exe: Debian's python, as on a host
        interpreter_with_pyroute2("debian")
    decoy = tmp_path / "kho-agentd"
    decoy.write_text("#!/bin/sh\necho wrong\n")
    decoy.chmod(0o755)
    path = [str(tmp_path), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    env = dict(os.environ, PATH=os.pathsep.join(path))
    proc = subprocess.run([argv0, "-c", OBSERVE_CODE], executable=sys.executable, env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["reason"] is None
    assert answer["pyroute2_imported"] is False
    observed = NetState.from_json(answer["state"])
    assert Address("lo", "inet", "127.0.0.1/8") in observed.addresses
    assert {x.name for x in observed.links} == {x.name for x in snapshot().links}


def test_observe_passes_on_the_childs_reason(tmp_path: Path) -> None:
    fake = tmp_path / "pyroute2"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no pyroute2 on this host')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, "-c", OBSERVE_CODE], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["state"] is None
    assert answer["reason"] == ("network state not recorded: pyroute2 is not importable "
                                "(no pyroute2 on this host)")


def test_observe_turns_a_broken_or_hung_reader_into_a_reason(tmp_path: Path) -> None:
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'Traceback: it broke' >&2\nexit 7\n")
    hanging = tmp_path / "hanging"
    hanging.write_text("#!/bin/sh\nexec sleep 30\n")
    garbled = tmp_path / "garbled"
    garbled.write_text("#!/bin/sh\necho '{\"state\": {\"links\": 3}}'\n")
    for script in (failing, hanging, garbled):
        script.chmod(0o755)
    assert netstate.observe(interpreter=str(failing)) == (
        None, "network state not recorded: the reader exited with 7 (Traceback: it broke)")
    assert netstate.observe(timeout=0.5, interpreter=str(hanging)) == (
        None, "network state not recorded: reading it took longer than 0.5 s")
    state, reason = netstate.observe(interpreter=str(garbled))
    assert state is None and reason is not None
    assert "not understood" in reason and "addresses: required field is missing" in reason
    state, reason = netstate.observe(interpreter=str(tmp_path / "missing"))
    assert state is None and reason is not None and "cannot start" in reason


def before_state() -> NetState:
    return NetState(
        links=[Link("lo", None, "00:00:00:00:00:00", 65536, "UNKNOWN"),
               Link("eth0", None, "02:00:00:00:00:01", 1500, "UP"),
               Link("eth1", None, "02:00:00:00:00:02", 1500, "UP"),
               Link("br0", "bridge", "02:00:00:00:00:03", 1500, "UP"),
               Link("tap9", "tun", "02:00:00:00:00:09", 1500, "UP")],
        addresses=[Address("lo", "inet", "127.0.0.1/8"),
                   Address("eth0", "inet", "10.0.0.5/24"),
                   Address("eth1", "inet", "10.1.0.5/24"),
                   Address("br0", "inet6", "fd00::5/64")],
        routes=[Route("inet", "default", "10.0.0.1", "eth0"),
                Route("inet", "10.0.0.0/24", None, "eth0"),
                Route("inet", "10.1.0.0/24", None, "eth1"),
                Route("inet", "10.50.0.0/16", "10.1.0.1", "eth1")])


def test_diff_of_identical_states_is_empty() -> None:
    assert diff(before_state(), before_state()) == []
    assert diff(before_state().to_json(), NetState.from_json(before_state().to_json())) == []


def test_diff_describes_every_kind_of_change() -> None:
    after = NetState(
        links=[Link("lo", None, "00:00:00:00:00:00", 65536, "UNKNOWN"),
               Link("eth0", None, "02:00:00:00:00:01", 9000, "DOWN"),
               # eth1 came back as enp2s0 (same MAC): a renamed device, not a loss
               Link("enp2s0", None, "02:00:00:00:00:02", 1500, "UP"),
               Link("br0", "bridge", "02:00:00:00:00:03", 1500, "UP"),
               Link("vxlan7", "vxlan", "02:00:00:00:00:07", 1450, "UP")],
        addresses=[Address("lo", "inet", "127.0.0.1/8"),
                   Address("eth0", "inet", "10.0.0.6/24"),
                   Address("enp2s0", "inet", "10.1.0.5/24"),
                   Address("br0", "inet6", "fd00::5/64")],
        routes=[Route("inet", "default", "10.0.0.254", "eth0"),
                Route("inet", "10.0.0.0/24", None, "eth0"),
                Route("inet", "10.1.0.0/24", None, "enp2s0"),
                Route("inet6", "fd00:1::/64", None, "br0")])
    changes = diff(before_state(), after)

    def one(*words: str) -> str:
        hits = [c for c in changes if all(w in c for w in words)]
        assert len(hits) == 1, (words, changes)
        return hits[0]

    one("eth0", "MTU", "1500", "9000")
    one("eth0", "state", "UP", "DOWN")
    one("eth1", "enp2s0", "named")
    one("tap9", "tun", "gone")
    one("vxlan7", "vxlan", "new")
    one("10.0.0.5/24", "eth0", "gone")
    one("10.0.0.6/24", "eth0", "new")
    one("default", "10.0.0.1", "10.0.0.254", "changed")
    one("10.50.0.0/16", "via 10.1.0.1 dev eth1", "gone")
    one("fd00:1::/64", "new")
    # The renamed interface kept its address and route: nothing reported about them.
    assert not [c for c in changes if "10.1.0.5/24" in c or "10.1.0.0/24" in c]
    assert len(changes) == 10


def test_from_json_names_the_bad_field() -> None:
    good = before_state().to_json()
    bad = json.loads(json.dumps(good))
    bad["routes"][1]["family"] = "ipx"
    with pytest.raises(NetStateFormatError) as caught:
        NetState.from_json(bad)
    assert caught.value.path == "routes[1].family"
    bad = json.loads(json.dumps(good))
    del bad["links"][0]["mtu"]
    with pytest.raises(NetStateFormatError) as caught:
        netstate.diff(bad, good)
    assert caught.value.path == "links[0].mtu"
    with pytest.raises(NetStateFormatError):
        NetState.from_json([])
