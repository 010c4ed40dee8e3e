"""The address plan: pure, deterministic, derived from the topology.

Qube addresses come from 10.137.0.0/16 as in Qubes OS: every qube has one address
10.137.0.<qid>, used as a /32 on its upstream link and on every link to its own clients,
so each link is point-to-point with /32 routes. IPv6 (only when configured) follows Qubes:
fd09:24ef:4179::<the IPv4 address as its last 32 bits>.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netstack.config import Topology


QUBE_PREFIX = ipaddress.ip_network("10.137.0.0/16")
IPV6_PREFIX = ipaddress.ip_network("fd09:24ef:4179::/64")
VIRTUAL_DNS = ("10.139.1.1", "10.139.1.2")

# The lab internet: documentation ranges only, linked to nothing outside the stack.
LAB_ISP_ROUTER = "192.0.2.1"
LAB_ISP_CUSTOMER = "192.0.2.2"
LAB_ISP_PREFIXLEN = 24
LAB_HOST_GATEWAY = "198.51.100.1"  # the ISP router's address on every host link
LAB_DOMAIN = "lab.test"


@dataclass(frozen=True)
class QubeAddr:
    qid: int
    ipv4: str
    ipv6: str | None
    gateway4: str | None  # the netvm's address
    gateway6: str | None
    ll: str | None = None  # IPv6 link-local, fixed (the kernel makes none: addr_gen_mode 1)
    gateway_ll: str | None = None


def is_ip(s: str) -> bool:
    """An IPv4 or IPv6 literal (never a name to resolve)."""
    return ip_version(s) is not None


def ip_version(s: str) -> int | None:
    try:
        return ipaddress.ip_address(s).version
    except ValueError:
        return None


def qube_ipv4(qid: int) -> str:
    return str(QUBE_PREFIX.network_address + qid)


def qube_ipv6(ipv4: str) -> str:
    return str(IPV6_PREFIX.network_address + int(ipaddress.IPv4Address(ipv4)))


def qube_ll(ipv4: str) -> str:
    """A qube's IPv6 link-local address, derived like its global one (fe80::a89:N), so
    anti-spoofing can admit exactly it instead of all of fe80::/10."""
    return str(ipaddress.IPv6Address("fe80::") + int(ipaddress.IPv4Address(ipv4)))


def plan_addresses(topo: Topology, pinned: dict[str, int] | None = None
                   ) -> dict[str, QubeAddr]:
    """qid in breadth-first tree order from the net qube, starting at 1. `pinned`: qids of
    qubes already running (a live change keeps every running qube's address and links);
    new qubes take the lowest free qid."""
    out: dict[str, QubeAddr] = {}
    pinned = {k: v for k, v in (pinned or {}).items() if k in {q.name for q in topo.qubes}}
    used = set(pinned.values())
    free = (i for i in range(1, 255) if i not in used)
    order = topo.tree_order()
    fresh = {q.name: i for i, q in enumerate(order, start=1)} if not pinned else {}
    for q in order:
        qid = pinned.get(q.name) or fresh.get(q.name) or next(free)
        v4 = qube_ipv4(qid)
        v6 = qube_ipv6(v4) if topo.ipv6 else None
        ll = qube_ll(v4) if topo.ipv6 else None
        gw = out[q.netvm] if q.netvm else None
        out[q.name] = QubeAddr(qid, v4, v6, gw.ipv4 if gw else None, gw.ipv6 if gw else None,
                               ll, gw.ll if gw else None)
    return out


@dataclass(frozen=True)
class LabHost:
    """A host of the simulated internet."""

    name: str
    address: str
    fqdn: str


TOR_LAB_HOSTS = [("auth1", "203.0.113.21"), ("auth2", "203.0.113.22"),
                 ("auth3", "203.0.113.23"), ("relay1", "203.0.113.31"),
                 ("exit1", "203.0.113.41"), ("exit2", "203.0.113.42")]


SINK = "198.51.100.99"


LAB_BRIDGE = ("bridge1", "203.0.113.51")


def lab_hosts(tor: bool = False, sink: bool = False, bridge: bool = False) -> list[LabHost]:
    """The built-in lab's hosts; with `tor`, also a private Tor network's nodes; with
    `sink`, the offline internet's catch-all host."""
    hosts = [
        LabHost("web", "198.51.100.80", f"web.{LAB_DOMAIN}"),
        LabHost("dns", "198.51.100.53", f"dns.{LAB_DOMAIN}"),
        LabHost("vpn", "203.0.113.10", f"vpn.{LAB_DOMAIN}"),
    ]
    if tor:
        hosts += [LabHost(n, a, f"{n}.tor.{LAB_DOMAIN}") for n, a in TOR_LAB_HOSTS]
    if sink:
        hosts.append(LabHost("sink", SINK, f"sink.{LAB_DOMAIN}"))
    if tor and bridge:  # an obfs4 bridge of the private network (a gateway uses lab:obfs4)
        n, a = LAB_BRIDGE
        hosts.append(LabHost(n, a, f"{n}.tor.{LAB_DOMAIN}"))
    return hosts


def lab_dns_server() -> str:
    return next(h.address for h in lab_hosts() if h.name == "dns")
