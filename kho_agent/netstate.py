"""The host's network configuration before and after a live update, and what changed.

A new kernel can rename interfaces, lose an address or a route that only a running daemon had
added, or bring a link up with another MTU. The agent records links, addresses and the main
routing table in the manifest and reports the differences after the update. Differences are
information for the operator, never a verification failure: the network is configured by other
software, which may legitimately do things differently on the new boot.

Reading uses rtnetlink dumps through pyroute2, which need no privilege. pyroute2 is imported only
inside `snapshot()`: the import alone costs ~0.13 s and most commands never need it. The daemon
reads the network through `observe()`, in a child process (`python3 -m kho_agent.netstate`):
bookworm's pyroute2 0.7 loads every plugin through importlib.metadata on its first import (365
modules, a few extension modules among them), and under TCG that import on the daemon's worker
thread starved the main loop until systemd's watchdog killed the agent mid-verification.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

MAIN_TABLE = 254  # RT_TABLE_MAIN

FAMILIES: dict[int, str] = {int(socket.AF_INET): "inet", int(socket.AF_INET6): "inet6"}


class NetStateFormatError(ValueError):
    """A recorded network state is not in the shape `NetState.to_json()` writes. `path` is
    relative to the state's own object (`links[2].mtu`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


@dataclass(frozen=True, order=True)
class Link:
    name: str
    kind: str | None      # IFLA_INFO_KIND (veth, bridge, ...); None for plain devices and lo
    mac: str | None
    mtu: int | None
    state: str            # operational state: UP, DOWN, UNKNOWN (lo), LOWERLAYERDOWN, ...


@dataclass(frozen=True, order=True)
class Address:
    ifname: str
    family: str           # inet | inet6
    address: str          # address/prefix, e.g. 127.0.0.1/8


@dataclass(frozen=True, order=True)
class Route:
    family: str
    dst: str              # prefix, or "default"
    gateway: str | None
    dev: str | None

    def describe(self) -> str:
        text = f"{self.dst}"
        if self.gateway is not None:
            text += f" via {self.gateway}"
        if self.dev is not None:
            text += f" dev {self.dev}"
        return text


@dataclass
class NetState:
    links: list[Link] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "links": [{"name": x.name, "kind": x.kind, "mac": x.mac, "mtu": x.mtu,
                       "state": x.state} for x in sorted(self.links)],
            "addresses": [{"ifname": x.ifname, "family": x.family, "address": x.address}
                          for x in sorted(self.addresses)],
            "routes": [{"family": x.family, "dst": x.dst, "gateway": x.gateway, "dev": x.dev}
                       for x in sorted(self.routes, key=_route_key)],
        }

    @classmethod
    def from_json(cls, data: object) -> NetState:
        """Rebuild a state from `to_json()` output; NetStateFormatError names the first
        problem."""
        top = _object(data, "", {"links", "addresses", "routes"})
        links = [Link(name=_text(item, f"links[{i}]", "name"),
                      kind=_text_or_none(item, f"links[{i}]", "kind"),
                      mac=_text_or_none(item, f"links[{i}]", "mac"),
                      mtu=_mtu(item, f"links[{i}]"),
                      state=_text(item, f"links[{i}]", "state"))
                 for i, item in _records(top, "links", {"name", "kind", "mac", "mtu", "state"})]
        addresses = [Address(ifname=_text(item, f"addresses[{i}]", "ifname"),
                             family=_family(item, f"addresses[{i}]"),
                             address=_text(item, f"addresses[{i}]", "address"))
                     for i, item in _records(top, "addresses", {"ifname", "family", "address"})]
        routes = [Route(family=_family(item, f"routes[{i}]"),
                        dst=_text(item, f"routes[{i}]", "dst"),
                        gateway=_text_or_none(item, f"routes[{i}]", "gateway"),
                        dev=_text_or_none(item, f"routes[{i}]", "dev"))
                  for i, item in _records(top, "routes", {"family", "dst", "gateway", "dev"})]
        return cls(links, addresses, routes)


# --- validation helpers for from_json ---------------------------------------------------------

def _object(value: object, path: str, keys: set[str]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise NetStateFormatError(path, f"expected an object, found {_type_name(value)}")
    missing = sorted(keys - value.keys())
    if missing:
        raise NetStateFormatError(_join(path, missing[0]), "required field is missing")
    unknown = sorted(k for k in value if k not in keys)
    if unknown:
        raise NetStateFormatError(_join(path, str(unknown[0])), "unknown field")
    return value


def _records(top: dict[str, object], key: str,
             keys: set[str]) -> list[tuple[int, dict[str, object]]]:
    items = top[key]
    if not isinstance(items, list):
        raise NetStateFormatError(key, f"expected an array, found {_type_name(items)}")
    return [(i, _object(item, f"{key}[{i}]", keys)) for i, item in enumerate(items)]


def _text(obj: dict[str, object], path: str, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value:
        raise NetStateFormatError(_join(path, key),
                                  f"expected a non-empty string, found {_type_name(value)}")
    return value


def _text_or_none(obj: dict[str, object], path: str, key: str) -> str | None:
    return None if obj[key] is None else _text(obj, path, key)


def _mtu(obj: dict[str, object], path: str) -> int | None:
    value = obj["mtu"]
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
        raise NetStateFormatError(_join(path, "mtu"),
                                  f"expected an integer 0..2^32-1, found {value!r}")
    return value


def _family(obj: dict[str, object], path: str) -> str:
    value = _text(obj, path, "family")
    if value not in FAMILIES.values():
        raise NetStateFormatError(_join(path, "family"),
                                  f"expected one of {sorted(FAMILIES.values())}, found {value!r}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _route_key(route: Route) -> tuple[str, str, str, str]:
    return (route.family, route.dst, route.gateway or "", route.dev or "")


# --- reading the live state -------------------------------------------------------------------

def snapshot() -> NetState:
    """Links, addresses and main-table routes of the current network namespace.

    Raises whatever pyroute2 or the socket raises (OSError, pyroute2.NetlinkError);
    `snapshot_or_reason()` is the form the engine uses.
    """
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    # Attributes through get_attr(): pyroute2 0.9's msg.get() also finds attributes by name,
    # but Debian's 0.7 (bookworm, the package's dependency) looks only at the header fields
    # there and answers None, which recorded a host without links or addresses.

    with IPRoute() as ipr:
        link_msgs = list(ipr.get_links())
        addr_msgs = list(ipr.get_addr())
        route_msgs = list(ipr.get_routes())
    names: dict[int, str] = {}
    links: list[Link] = []
    for msg in link_msgs:
        name = msg.get_attr("IFLA_IFNAME")
        if name is None:
            continue
        names[int(msg["index"])] = str(name)
        kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        mac = msg.get_attr("IFLA_ADDRESS")
        mtu = msg.get_attr("IFLA_MTU")
        links.append(Link(name=str(name), kind=None if kind is None else str(kind),
                          mac=None if mac is None else str(mac),
                          mtu=None if mtu is None else int(mtu),
                          state=str(msg.get_attr("IFLA_OPERSTATE") or "UNKNOWN")))
    addresses: list[Address] = []
    for msg in addr_msgs:
        family = FAMILIES.get(int(msg["family"]))
        # IFA_LOCAL is the interface's own address; on point-to-point links IFA_ADDRESS is
        # the peer's.
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if family is None or addr is None:
            continue
        addresses.append(Address(ifname=names.get(int(msg["index"]), f"if{msg['index']}"),
                                 family=family, address=f"{addr}/{msg['prefixlen']}"))
    routes: list[Route] = []
    for msg in route_msgs:
        family = FAMILIES.get(int(msg["family"]))
        table = msg.get_attr("RTA_TABLE")
        if family is None or (table if table is not None else msg["table"]) != MAIN_TABLE:
            continue
        dst = msg.get_attr("RTA_DST")
        oif = msg.get_attr("RTA_OIF")
        gateway = msg.get_attr("RTA_GATEWAY")
        routes.append(Route(
            family=family,
            dst="default" if dst is None else f"{dst}/{msg['dst_len']}",
            gateway=None if gateway is None else str(gateway),
            dev=None if oif is None else names.get(int(oif), f"if{oif}")))
    return NetState(sorted(links), sorted(addresses), sorted(routes, key=_route_key))


def snapshot_or_reason() -> tuple[NetState | None, str | None]:
    """`snapshot()`, or None and a sentence saying why the network state could not be read."""
    try:
        from pyroute2.netlink.exceptions import (  # type: ignore[import-untyped]
            NetlinkError,
        )
    except ImportError as err:
        return None, f"network state not recorded: pyroute2 is not importable ({err})"
    try:
        return snapshot(), None
    except NetlinkError as err:
        return None, f"network state not recorded: rtnetlink refused the dump ({err})"
    except OSError as err:
        return None, f"network state not recorded: the netlink socket failed ({err})"


# A TCG guest takes seconds for the import; a hung dump is not waited for longer than this.
OBSERVE_TIMEOUT_S = 120.0


def running_interpreter() -> str:
    """The interpreter running this process, to start a child with. sys.executable is not
    enough: kho-agent.service starts python3 with argv[0] "kho-agentd" (ExecStart=@), and
    Python derives sys.executable from argv[0], so it is empty, or another program called
    kho-agentd found in PATH. It is kept when it is the same file as /proc/self/exe (a venv's
    python is a symlink to it, and the venv's packages come with its name)."""
    exe = os.path.realpath("/proc/self/exe")
    if sys.executable and os.path.realpath(sys.executable) == exe:
        return sys.executable
    return exe


def observe(timeout: float = OBSERVE_TIMEOUT_S,
            interpreter: str | None = None) -> tuple[NetState | None, str | None]:
    """`snapshot_or_reason()` run in a child interpreter, so that neither pyroute2's import nor
    the dump holds this process's GIL: the daemon's main loop keeps answering (and pinging
    the watchdog) meanwhile. Never raises for a failure of the child: it becomes the reason."""
    python = interpreter or running_interpreter()
    try:
        proc = subprocess.run([python, "-m", "kho_agent.netstate"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return None, f"network state not recorded: reading it took longer than {timeout:g} s"
    except OSError as err:
        return None, f"network state not recorded: cannot start {python} ({err})"
    if proc.returncode != 0:
        last = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        return None, (f"network state not recorded: the reader exited with {proc.returncode} "
                      f"({last[0][:300]})")
    try:
        answer = json.loads(proc.stdout)
        if isinstance(answer, dict) and isinstance(answer.get("reason"), str):
            return None, str(answer["reason"])
        if not isinstance(answer, dict):
            raise NetStateFormatError("", "expected an object with 'state' or 'reason'")
        return NetState.from_json(answer.get("state")), None
    except (ValueError, NetStateFormatError) as err:  # JSONDecodeError is a ValueError
        return None, f"network state not recorded: the reader's answer is not understood ({err})"


def main() -> int:
    """`python3 -m kho_agent.netstate`: one JSON object on stdout, {"state": ...} or
    {"reason": ...}; what `observe()` reads."""
    state, reason = snapshot_or_reason()
    print(json.dumps({"state": state.to_json()} if state is not None else {"reason": reason}))
    return 0


# --- comparing ----------------------------------------------------------------------------------

def _as_state(value: NetState | dict[str, object]) -> NetState:
    return value if isinstance(value, NetState) else NetState.from_json(value)


def _describe_link(link: Link) -> str:
    return f"interface {link.name}" + (f" ({link.kind})" if link.kind else "")


def _renames(gone: dict[str, Link], new: dict[str, Link]) -> dict[str, str]:
    """Old name -> new name for links that disappeared and reappeared under another name with
    the same MAC address (a new kernel may name devices differently). Only unambiguous pairs."""
    no_mac = {"00:00:00:00:00:00", None}
    gone_by_mac = Counter(x.mac for x in gone.values() if x.mac not in no_mac)
    new_by_mac = Counter(x.mac for x in new.values() if x.mac not in no_mac)
    pairs: dict[str, str] = {}
    for old in gone.values():
        if old.mac in no_mac or gone_by_mac[old.mac] != 1 or new_by_mac[old.mac] != 1:
            continue
        pairs[old.name] = next(x.name for x in new.values() if x.mac == old.mac)
    return pairs


def _link_changes(before: Link, after: Link, label: str) -> list[str]:
    out: list[str] = []
    for attr, what in (("kind", "kind"), ("mac", "MAC address"), ("mtu", "MTU"),
                       ("state", "state")):
        old, new = getattr(before, attr), getattr(after, attr)
        if old != new:
            out.append(f"{label}: {what} changed from {old if old is not None else 'none'} "
                       f"to {new if new is not None else 'none'}")
    return out


def diff(before: NetState | dict[str, object], after: NetState | dict[str, object]) -> list[str]:
    """Sentences describing how `after` differs from `before` (empty when they are the same)."""
    old, new = _as_state(before), _as_state(after)
    out: list[str] = []

    old_links = {x.name: x for x in old.links}
    new_links = {x.name: x for x in new.links}
    gone = {n: x for n, x in old_links.items() if n not in new_links}
    added = {n: x for n, x in new_links.items() if n not in old_links}
    renames = _renames(gone, added)
    for name in sorted(old_links):
        if name in new_links:
            out += _link_changes(old_links[name], new_links[name], f"interface {name}")
        elif name in renames:
            target = renames[name]
            out.append(f"interface {name} is now named {target} (same MAC address "
                       f"{old_links[name].mac})")
            out += _link_changes(old_links[name], new_links[target], f"interface {target}")
        else:
            out.append(f"{_describe_link(old_links[name])} is gone")
    renamed_to = set(renames.values())
    out += [f"{_describe_link(new_links[n])} is new" for n in sorted(added)
            if n not in renamed_to]

    # An address that only moved with a renamed interface is not a change worth reporting.
    rename_map = renames
    old_addrs = {(rename_map.get(a.ifname, a.ifname), a.family, a.address) for a in old.addresses}
    new_addrs = {(a.ifname, a.family, a.address) for a in new.addresses}
    out += [f"address {addr} on {ifname} is gone"
            for ifname, _family, addr in sorted(old_addrs - new_addrs)]
    out += [f"address {addr} on {ifname} is new"
            for ifname, _family, addr in sorted(new_addrs - old_addrs)]

    def renamed(route: Route) -> Route:
        dev = rename_map.get(route.dev, route.dev) if route.dev is not None else None
        return Route(route.family, route.dst, route.gateway, dev)

    # Compared under the new interface names, described under the names they had.
    old_routes = {renamed(r): r for r in old.routes}
    new_routes = set(new.routes)
    lost = sorted((r for key, r in old_routes.items() if key not in new_routes), key=_route_key)
    gained = sorted(new_routes - old_routes.keys(), key=_route_key)
    lost_by_dst = Counter((r.family, r.dst) for r in lost)
    gained_by_dst = Counter((r.family, r.dst) for r in gained)
    changed = {k for k in lost_by_dst if lost_by_dst[k] == 1 and gained_by_dst.get(k) == 1}
    for route in lost:
        if (route.family, route.dst) in changed:
            replacement = next(r for r in gained if (r.family, r.dst) == (route.family, route.dst))
            out.append(f"route {route.describe()} changed to {replacement.describe()}")
        else:
            out.append(f"route {route.describe()} is gone")
    out += [f"route {r.describe()} is new" for r in gained if (r.family, r.dst) not in changed]
    return out


if __name__ == "__main__":
    sys.exit(main())
