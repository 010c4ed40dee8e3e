"""The qube table: load a TOML config and validate it into a Topology.

The topology is the one source of truth; everything else is derived from it by pure
functions. Validation never touches the host, so an invalid config changes nothing.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netstack.errors import ConfigError

KINDS = ("net", "firewall", "vpn", "tor", "app")
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
# A qube name becomes part of a namespace name (nst-STACK-QUBE) and of file paths under
# /etc/netns; keep it to what every tool accepts.
QUBE_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAX_QUBES = 250  # one /24 of 10.137.0.0/16 for qube addresses, .1-.250

COMMON_KEYS = {"kind", "netvm", "label"}
KIND_KEYS: dict[str, set[str]] = {
    "net": {"address", "gateway", "dns"},
    "firewall": set(),
    "vpn": {"type", "config", "dns"},
    "tor": {"bridges"},
    "app": set(),
}
STACK_KEYS = {"ipv6"}
TOP_KEYS = {"qubes", "stack"}


@dataclass(frozen=True)
class Qube:
    """One network compartment as written in the config."""

    name: str
    kind: str
    netvm: str | None
    label: str
    settings: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def provides_network(self) -> bool:
        return self.kind != "app"


@dataclass(frozen=True)
class Topology:
    """Validated qubes forming a tree rooted at the one `net` qube."""

    qubes: tuple[Qube, ...]
    ipv6: bool = False
    source: str = "<memory>"

    def __getitem__(self, name: str) -> Qube:
        for q in self.qubes:
            if q.name == name:
                return q
        raise KeyError(name)

    @property
    def root(self) -> Qube:
        return next(q for q in self.qubes if q.kind == "net")

    def children(self, name: str) -> list[Qube]:
        """Qubes whose netvm is `name`, sorted by name so derived data is deterministic."""
        return sorted((q for q in self.qubes if q.netvm == name), key=lambda q: q.name)

    def tree_order(self) -> list[Qube]:
        """Breadth-first from the net qube; siblings by name. Defines qube ids."""
        order, queue = [], [self.root]
        while queue:
            q = queue.pop(0)
            order.append(q)
            queue.extend(self.children(q.name))
        return order

    def chain_to_root(self, name: str) -> list[Qube]:
        """The qube and its netvms up to sys-net, in that order."""
        out = [self[name]]
        while out[-1].netvm:
            out.append(self[out[-1].netvm])
        return out


def load(path: str | Path) -> Topology:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}",
                          "give the path of a TOML config") from None
    return parse(text, source=str(p))


def parse(text: str, source: str = "<memory>") -> Topology:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"Cannot declare \('qubes', '([^']+)'\) twice", msg)
        if m:
            raise ConfigError(f"qube {m.group(1)}", "duplicate qube name",
                              "give every qube a unique name") from None
        raise ConfigError(source, f"not valid TOML: {msg}") from None
    return validate(data, source=source)


def _check_keys(where: str, got: dict, allowed: set[str]) -> None:
    for key in got:
        if key not in allowed:
            raise ConfigError(where, f"unknown key {key!r}",
                              f"allowed keys: {', '.join(sorted(allowed))}")


def validate(data: dict[str, Any], source: str = "<memory>") -> Topology:
    """Turn parsed TOML into a Topology, or raise ConfigError naming qube and field."""
    _check_keys("top level", data, TOP_KEYS)
    stack = data.get("stack", {})
    if not isinstance(stack, dict):
        raise ConfigError("stack", "must be a table", "write [stack]")
    _check_keys("[stack]", stack, STACK_KEYS)
    ipv6 = stack.get("ipv6", False)
    if not isinstance(ipv6, bool):
        raise ConfigError("[stack] field 'ipv6'", "must be true or false")
    raw = data.get("qubes")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("top level", "no qubes defined", "add tables like [qubes.sys-net]")
    if len(raw) > MAX_QUBES:
        raise ConfigError("qubes", f"{len(raw)} qubes, at most {MAX_QUBES} are supported")

    qubes: list[Qube] = []
    for name, body in raw.items():
        where = f"qube {name!r}"
        if not QUBE_NAME_RE.match(name) or name.endswith("-"):
            raise ConfigError(where, "invalid name",
                              "use 1-31 characters a-z, 0-9 and '-', starting with a letter")
        if not isinstance(body, dict):
            raise ConfigError(where, "must be a table", f"write [qubes.{name}]")
        kind = body.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where} field 'kind'", f"{kind!r} is not a kind",
                              f"use one of {', '.join(KINDS)}")
        _check_keys(where, body, COMMON_KEYS | KIND_KEYS[kind])
        label = body.get("label", "gray")
        if label not in LABELS:
            raise ConfigError(f"{where} field 'label'", f"{label!r} is not a label",
                              f"use one of {', '.join(LABELS)}")
        netvm = body.get("netvm")
        if kind == "net":
            if netvm is not None:
                raise ConfigError(f"{where} field 'netvm'", "a net qube owns the uplink",
                                  "remove netvm from the net qube")
        elif not isinstance(netvm, str):
            raise ConfigError(f"{where} field 'netvm'", "missing",
                              "name the qube this one gets network from")
        settings = {k: v for k, v in body.items() if k not in COMMON_KEYS}
        qubes.append(Qube(name, kind, netvm, label, settings))

    by_name = {q.name: q for q in qubes}
    nets = [q.name for q in qubes if q.kind == "net"]
    if not nets:
        raise ConfigError("qubes", "no qube of kind 'net'", "add one net qube (the uplink)")
    if len(nets) > 1:
        raise ConfigError(f"qube {nets[1]!r} field 'kind'",
                          f"two net qubes ({', '.join(nets)})", "keep exactly one net qube")
    for q in qubes:
        if q.netvm is None:
            continue
        where = f"qube {q.name!r} field 'netvm'"
        if q.netvm not in by_name:
            raise ConfigError(where, f"unknown qube {q.netvm!r}",
                              f"use one of {', '.join(sorted(by_name))}")
        if q.netvm == q.name:
            raise ConfigError(where, "a qube cannot be its own netvm")
        if by_name[q.netvm].kind == "app":
            raise ConfigError(where, f"{q.netvm!r} is an app qube and provides no network",
                              "use a net, firewall, vpn or tor qube as netvm")
    for q in qubes:  # every chain must end at the net qube, else there is a cycle
        seen = [q.name]
        cur = q
        while cur.netvm is not None:
            cur = by_name[cur.netvm]
            if cur.name in seen:
                cycle = " -> ".join(seen[seen.index(cur.name):] + [cur.name])
                raise ConfigError(f"qube {q.name!r} field 'netvm'", f"cycle {cycle}",
                                  "make the netvm chain end at the net qube")
            seen.append(cur.name)
    for q in qubes:
        _validate_kind_settings(q)
    return Topology(tuple(qubes), ipv6=ipv6, source=source)


def _validate_kind_settings(q: Qube) -> None:
    where = f"qube {q.name!r}"
    s = q.settings
    if q.kind == "net":
        for key in ("address", "gateway"):
            if key in s and not isinstance(s[key], str):
                raise ConfigError(f"{where} field {key!r}", "must be a string",
                                  'e.g. address = "192.168.1.50/24"')
        if "dns" in s and (not isinstance(s["dns"], list)
                           or not all(isinstance(x, str) for x in s["dns"])):
            raise ConfigError(f"{where} field 'dns'", "must be a list of addresses",
                              'e.g. dns = ["192.168.1.1"]')
        _check_ip_fields(q)
    bridges = s.get("bridges", [])
    if q.kind == "tor" and (not isinstance(bridges, list)
                            or not all(isinstance(b, str) for b in bridges)):
        raise ConfigError(f"{where} field 'bridges'", "must be a list of Bridge lines",
                          'e.g. bridges = ["obfs4 192.0.2.7:443 FINGERPRINT cert=... iat-mode=0"]')
    if q.kind == "vpn":
        if s.get("type") not in ("wireguard", "openvpn"):
            raise ConfigError(f"{where} field 'type'", f"{s.get('type')!r} is not a VPN type",
                              'use type = "wireguard" or type = "openvpn"')
        if not isinstance(s.get("config"), str):
            raise ConfigError(f"{where} field 'config'", "missing",
                              "give the path of the provider's .conf or .ovpn file")


def _check_ip_fields(q: Qube) -> None:
    import ipaddress

    s = q.settings
    try:
        if "address" in s:
            ipaddress.ip_interface(s["address"])
        if "gateway" in s:
            ipaddress.ip_address(s["gateway"])
        for d in s.get("dns", []):
            ipaddress.ip_address(d)
    except ValueError as e:
        raise ConfigError(f"qube {q.name!r}", f"bad address: {e}") from None
