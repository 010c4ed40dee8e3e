"""Port forwarding through a VPN qube, the pure half: the `forward` key of a VPN qube
parsed and checked, the nft rules that DNAT the forwarded port from the tunnel (and only
from the tunnel) to one client qube, the typed files the renewer and `status` share, and
what a client is handed (a file in its sandbox, variables for `exec`).

    [[qube]]
    name = "sys-proxyvm"
    kind = "vpn"
    forward = [{port = "natpmp", gateway = "10.2.0.1", to = "work:51413"}]   # ProtonVPN
    # or a port the provider forwards for good (AirVPN):  {port = 41234, to = "work:51413"}

A static port arrives on the tunnel as itself; a NAT-PMP port is asked of the gateway
through the tunnel, renewed at half its lifetime by the supervisor's renewer
(netstack/vpn/portfwd_run.py), and known to the rules through a named set that holds
exactly the ports the gateway granted (empty: nothing is forwarded; fail closed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from netstack.addressing import ip_version
from netstack.errors import ConfigError
from netstack.rules.nft import (
    ACCEPT,
    COUNTER,
    NamedSet,
    Ruleset,
    concat,
    ct,
    dnat4,
    iifname,
    in_set,
    ip_daddr,
    l4proto,
    match,
    meta,
    oifname,
    payload,
)

PROTOS = ("tcp", "udp")
DEFAULT_LIFETIME = 60  # what ProtonVPN's instructions ask for (natpmpc ... 60)
SET_TYPE = ["inet_proto", "inet_service"]
FORWARD_DIR = "forward"  # under the stack's public dir: one directory per client qube
FORWARD_INSIDE = "/run/netstack-forward"  # where a client's directory appears in its sandbox
FIX = ('e.g. forward = [{port = "natpmp", gateway = "10.2.0.1", to = "work:51413"}] '
       '(a provider that assigns ports by NAT-PMP) or [{port = 41234, to = "work:51413"}] '
       "(a port the provider forwards for good)")


@dataclass(frozen=True)
class Forward:
    """One `forward` entry. public None: the gateway assigns it (NAT-PMP)."""

    index: int
    public: int | None
    qube: str
    port: int  # the client's own port the connections are sent to
    protos: tuple[str, ...] = PROTOS
    gateway: str | None = None  # NAT-PMP only
    lifetime: int = DEFAULT_LIFETIME  # NAT-PMP only: seconds asked for each mapping

    @property
    def natpmp(self) -> bool:
        return self.public is None

    @property
    def set_name(self) -> str:
        """The named set of the ports the gateway granted for this entry."""
        return f"vpn_forward{self.index}"

    def describe(self) -> str:
        src = "NAT-PMP" if self.natpmp else str(self.public)
        return f"{src}/{'+'.join(self.protos)} -> {self.qube}:{self.port}"


def _port(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536


def parse(name: str, raw: Any) -> list[Forward]:
    """The `forward` list of VPN qube `name`, checked field by field; each error is one
    line naming the field and the fix."""
    where = f"qube {name!r} field 'forward'"
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise ConfigError(where, "must be a list of tables", FIX)
    out: list[Forward] = []
    keys = {"port", "to", "proto", "gateway", "lifetime"}
    for i, x in enumerate(raw):
        w = f"{where} entry {i + 1}"
        unknown = sorted(set(x) - keys)
        if unknown:
            raise ConfigError(w, f"unknown key {unknown[0]!r}",
                              "the keys are port, to, proto, gateway, lifetime")
        port = x.get("port")
        if port != "natpmp" and not _port(port):
            raise ConfigError(f"{w} 'port'", "missing" if port is None else
                              f"{port!r} is neither a port (1-65535) nor \"natpmp\"",
                              'give the port the provider forwards, or port = "natpmp" '
                              "for one it assigns")
        to = x.get("to")
        qube, _, tport = to.rpartition(":") if isinstance(to, str) else ("", "", "")
        if not qube or not tport.isdigit() or not _port(int(tport)):
            raise ConfigError(f"{w} 'to'", "missing" if to is None else
                              f"{to!r} is not QUBE:PORT",
                              'name the client qube and its port, e.g. to = "work:51413"')
        proto = x.get("proto", "both")
        if proto not in ("tcp", "udp", "both"):
            raise ConfigError(f"{w} 'proto'", f"{proto!r} is not a protocol",
                              'use proto = "tcp", "udp" or "both" (the default)')
        protos = PROTOS if proto == "both" else (proto,)
        gw, life = x.get("gateway"), x.get("lifetime", DEFAULT_LIFETIME)
        if port == "natpmp":
            if not isinstance(gw, str) or ip_version(gw) != 4:
                raise ConfigError(f"{w} 'gateway'", "missing" if gw is None else
                                  f"{gw!r} is not an IPv4 address",
                                  "give the provider's NAT-PMP gateway inside the tunnel, "
                                  'e.g. gateway = "10.2.0.1" (ProtonVPN)')
            if isinstance(life, bool) or not isinstance(life, int) or not 2 <= life <= 3600:
                raise ConfigError(f"{w} 'lifetime'", f"{life!r} is not seconds (2-3600)",
                                  "e.g. lifetime = 60 (renewed at half of it)")
        else:
            extra = "gateway" if "gateway" in x else "lifetime" if "lifetime" in x else None
            if extra:
                raise ConfigError(f"{w} '{extra}'", "only means something with "
                                  'port = "natpmp"', f"remove {extra}, or use "
                                  'port = "natpmp" for a port the provider assigns')
        f = Forward(i, None if port == "natpmp" else port, qube, int(tport), protos,
                    gw if port == "natpmp" else None, life if port == "natpmp" else 0)
        for o in out:
            clash = set(o.protos) & set(f.protos)
            if clash and f.public is not None and o.public == f.public:
                raise ConfigError(f"{w} 'port'", f"{f.public} is forwarded twice",
                                  "forward each public port to one qube")
            if clash and (o.qube, o.port) == (f.qube, f.port):
                raise ConfigError(f"{w} 'to'", f"{to} is the target of entry {o.index + 1} "
                                  "too", "forward one public port to each qube port")
        if f.natpmp and any(o.natpmp for o in out):
            raise ConfigError(f"{w} 'port'", 'a second port = "natpmp"',
                              "a NAT-PMP gateway assigns one port per tunnel: ask once")
        out.append(f)
    return out


def check_targets(vpn: str, forwards: list[Forward], clients: dict[str, str]) -> None:
    """Each target is an app qube that is a direct client of the VPN qube (clients: name
    -> kind): the DNAT sends the connection down that client's link, and nothing in
    between would let it in."""
    for f in forwards:
        where = f"qube {vpn!r} field 'forward' entry {f.index + 1} 'to'"
        if f.qube not in clients:
            raise ConfigError(where, f"{f.qube!r} is not a client of {vpn!r}",
                              f"set netvm = {vpn!r} on {f.qube!r}, or forward to a qube "
                              f"whose netvm is {vpn!r}")
        if clients[f.qube] != "app":
            raise ConfigError(where, f"{f.qube!r} is a {clients[f.qube]} qube",
                              "forward to an app qube (where the service runs)")


def forwards_to(qube: str, forwards: list[Forward]) -> list[Forward]:
    return [f for f in forwards if f.qube == qube]


# --- rules ------------------------------------------------------------------------------

def sets(forwards: list[Forward]) -> list[NamedSet]:
    """One set per NAT-PMP entry: (protocol, port) the gateway granted, filled at run
    time by the renewer (empty in the plan: nothing is forwarded until a grant)."""
    return [NamedSet(f.set_name, SET_TYPE) for f in forwards if f.natpmp]


def rules(rs: Ruleset, forwards: list[Forward], tun: str, clients: dict[str, Any]) -> None:
    """In the VPN qube: from the tunnel only, the forwarded port is DNATed to the client
    (prerouting), and forward accepts a new connection into the client's link only when
    conntrack says it was DNATed there (so a packet the tunnel addresses to the client
    directly, or on any other port, meets the forward chain's drop)."""
    for f in forwards:
        c = clients[f.qube]
        for s in sets([f]):
            rs.add_set(s)
        sel = [iifname(tun), l4proto(*f.protos)]
        if f.natpmp:
            sel.append(in_set(concat(meta("l4proto"), payload("th", "dport")), f.set_name))
        else:
            sel.append(match(payload("th", "dport"), f.public))
        rs["nat_prerouting"].add(*sel, COUNTER, dnat4(c.ipv4, f.port),
                                 comment=f"forward {f.describe()}")
        rs["forward"].add(iifname(tun), oifname(c.vif), ip_daddr(c.ipv4), l4proto(*f.protos),
                          match(payload("th", "dport"), f.port),
                          match(ct("status"), "dnat", "in"), COUNTER, ACCEPT,
                          comment=f"forwarded {f.describe()}")


def client_rules(rs: Ruleset, forwards: list[Forward], upstream_if: str, own: str) -> None:
    """In the client qube: the forwarded connections come in from its netvm's link to its
    own address and port (nothing else is asked for)."""
    for f in forwards:
        rs["input"].add(iifname(upstream_if), ip_daddr(own), l4proto(*f.protos),
                        match(payload("th", "dport"), f.port), ACCEPT,
                        comment=f"forwarded port {f.port} (through the VPN)")


def granted_ports(ruleset: dict[str, Any], f: Forward) -> list[tuple[str, int]]:
    """(protocol, port) elements of an entry's set in a ruleset (`nft -j` shape)."""
    out = []
    for i in ruleset.get("nftables", []):
        s = i.get("set")
        if s and s.get("name") == f.set_name:
            for e in s.get("elem", []):
                c = e.get("concat") if isinstance(e, dict) else None
                if c and len(c) == 2:
                    out.append((str(c[0]), int(c[1])))
    return sorted(out)


def set_commands(f: Forward, public: int | None) -> list[dict[str, Any]]:
    """Replace the set's elements: the granted port for each protocol (none: empty)."""
    from netstack.rules.nft import set_commands as replace

    elems = [{"concat": [p, public]} for p in f.protos] if public else []
    return replace(f.set_name, elems)


def held_set_commands(forwards: list[Forward], st: ForwardState | None, now: float,
                      grace: float = 0.0) -> list[dict[str, Any]]:
    """Each NAT-PMP set as the renewer last filled it, from its state file: the grant in
    force (until `grace` seconds past its expiry: the renewer empties the set on its next
    pass, within a second), else empty. For a reload (put back) and `status` (compare)."""
    grants = {g.index: g for g in st.grants} if st else {}
    out: list[dict[str, Any]] = []
    for f in forwards:
        if f.natpmp:
            g = grants.get(f.index)
            live = g is not None and g.public_port and g.expires_at is not None and \
                g.expires_at + grace > now
            out += set_commands(f, g.public_port if live and g else None)
    return out


def read_state(path: str) -> ForwardState | None:
    """None when not written yet or damaged (status then shows no grant)."""
    from netstack import codec
    from netstack.errors import DamagedFile

    try:
        return codec.read(path, ForwardState)
    except (OSError, DamagedFile):
        return None


# --- the renewer's spec and state (typed files, netstack.codec) --------------------------

@dataclass
class Grant:
    """What the gateway granted (or the config states) for one entry, for status and the
    client."""

    index: int
    qube: str
    port: int  # the client's port
    protos: list[str]
    public_port: int | None = None
    public_address: str | None = None
    static: bool = False
    lifetime: int = 0  # granted seconds (NAT-PMP)
    renewed_at: float | None = None
    expires_at: float | None = None
    renewals: int = 0  # successful asks since the renewer started
    error: str | None = None  # the last ask's failure (the set is emptied at expiry)


@dataclass
class ForwardState:
    """`vpn-QUBE.forward`: written by the renewer (and by `up` for static ports)."""

    grants: list[Grant] = field(default_factory=list)


@dataclass
class RenewerSpec:
    qube: str
    netns: str
    state_path: str
    public_dir: str  # the stack's public dir: clients' forward directories go under it
    forwards: list[Forward] = field(default_factory=list)


def state_path(state_dir: str, qube: str) -> str:
    return os.path.join(state_dir, f"vpn-{qube}.forward")


def spec_path(state_dir: str, qube: str) -> str:
    return os.path.join(state_dir, f"vpn-{qube}.forward.json")


def client_dir(public_dir: str, qube: str) -> str:
    return os.path.join(public_dir, FORWARD_DIR, qube)


def client_files(grants: list[Grant]) -> dict[str, str]:
    """What a client qube reads in FORWARD_INSIDE: `port-PORT` (the public port that
    reaches its PORT), `address` (the public address, when known) and `env` (the same as
    variables, which `exec` sets: NETSTACK_FORWARD_PORT is the first entry's, by the
    client's port)."""
    out: dict[str, str] = {}
    env: list[str] = []
    granted = sorted((g for g in grants if g.public_port), key=lambda g: g.port)
    for g in granted:
        out[f"port-{g.port}"] = f"{g.public_port}\n"
        env.append(f"NETSTACK_FORWARD_PORT_{g.port}={g.public_port}")
    if granted:
        env.insert(0, f"NETSTACK_FORWARD_PORT={granted[0].public_port}")
        addr = next((g.public_address for g in granted if g.public_address), None)
        if addr:
            out["address"] = f"{addr}\n"
            env.insert(1, f"NETSTACK_FORWARD_ADDRESS={addr}")
    out["env"] = "".join(f"{e}\n" for e in env)
    return out


def publication(spec: RenewerSpec, st: ForwardState
                ) -> tuple[list[tuple[str, int]], list[tuple[str, str, int]]]:
    """What publishing a state means on disk: (directories with their modes, top down;
    files with their text and modes): the state file (root's), and each client's
    directory, world-readable (the sandbox's account reads it through a read-only bind)
    under directories nobody may list."""
    from netstack.codec import encode

    dirs = [(spec.public_dir, 0o711), (os.path.join(spec.public_dir, FORWARD_DIR), 0o711)]
    files = [(spec.state_path, encode(st), 0o600)]
    by_qube: dict[str, list[Grant]] = {}
    for g in st.grants:
        by_qube.setdefault(g.qube, []).append(g)
    for qube, grants in sorted(by_qube.items()):
        d = client_dir(spec.public_dir, qube)
        dirs.append((d, 0o755))
        files += [(os.path.join(d, name), text, 0o644)
                  for name, text in client_files(grants).items()]
    return dirs, files


def read_env(text: str) -> dict[str, str]:
    """The variables of a client's `env` file (KEY=VALUE lines; others ignored)."""
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and k.startswith("NETSTACK_FORWARD_") and k.replace("_", "").isalnum():
            out[k] = v
    return out
