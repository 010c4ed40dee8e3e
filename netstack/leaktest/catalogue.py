"""The probe catalogue: named cases a hostile workstation (root, raw sockets) sends, each
with the property it checks. Every packet carries the case's unique marker in its payload,
so a packet seen where it must not be is traced back to its case.

`legit` names the chains in which a case's packets may legitimately travel on (a VPN-only
chain carries UDP and ICMP through the tunnel; a Tor gateway carries only TCP and DNS):
"vpn", "plain" (no tunnel) and "tor". Outside those, the marker must never leave the
workstation's own link.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OPEN = frozenset({"vpn", "plain"})
# an address of Tor's automap range (VirtualAddrNetworkIPv4 10.192.0.0/10), as DNSPort
# answers a .onion name with (netstack.tor.gateway.VIRTUAL_NET)
AUTOMAPPED = "10.192.0.5"
ALL = frozenset({"vpn", "plain", "tor"})
NONE: frozenset[str] = frozenset()


@dataclass
class Case:
    name: str
    property: str
    packets: list[dict[str, Any]] = field(default_factory=list)
    tool: list[str] | None = None  # a real client run inside the workstation
    legit: frozenset[str] = NONE
    marker: str = ""
    control: str | None = None  # a case whose answer must be seen (or not): see battery


@dataclass(frozen=True)
class Target:
    ws_addr: str
    gateway: str  # the workstation's netvm address
    upstream: tuple[str, ...]  # addresses of the qubes above the gateway
    siblings: tuple[str, ...]  # other workstations' addresses
    web: str
    dns: str
    web_name: str
    dns_virtual: str = "10.139.1.1"
    ipv6: bool = False  # the stack has IPv6 on
    gateway6: str = ""  # the netvm's global IPv6 address (what it would have, when off)
    ws6: str = ""  # the workstation's global and link-local IPv6 addresses
    ws_ll: str = ""


def cases(t: Target) -> list[Case]:
    c: list[Case] = []

    def add(name: str, prop: str, pkts: list[dict], legit=NONE, tool=None) -> None:
        c.append(Case(name, prop, pkts, tool, frozenset(legit)))

    add("tcp-syn-ip", "TCP only through the chain", [{"dst": t.web, "proto": "tcp",
                                                     "dport": 80, "flags": "S"}], OPEN)
    # an address of Tor's automap range, as DNSPort answers NAME.onion: behind a Tor gateway
    # the SYN goes to TransPort (which refuses an address it never handed out), so its
    # marker never leaves the workstation's link; forwarded, it would
    add("tcp-syn-automap", "a SYN to Tor's automap range goes only to TransPort, never "
        "forwarded", [{"dst": AUTOMAPPED, "proto": "tcp", "dport": 80, "flags": "S"}], OPEN)
    add("tcp-get-name", "a real HTTP GET by name leaves only through the chain", [],
        ALL, ["curl", "-sS", "-o", "/dev/null", "--max-time", "4",
              f"http://{t.web_name}/MARKER"])
    add("dns-lookup-name", "a real lookup goes only through the chain's resolver", [],
        ALL, ["timeout", "3", "getent", "hosts", "MARKER.lab.test"])
    for name, flags in (("fin", "F"), ("finack", "FA"), ("rst", "R"), ("null", ""),
                        ("xmas", "FPU")):
        add(f"tcp-{name}", "INVALID TCP never leaves", [{"dst": t.web, "proto": "tcp",
                                                       "dport": 80, "flags": flags}])
    add("tcp-ack", "a bare ACK is not a new connection through Tor",
        [{"dst": t.web, "proto": "tcp", "dport": 80, "flags": "A"}], OPEN)
    for name, port in (("dns-direct", 53), ("ntp", 123), ("quic", 443), ("ssdp", 1900),
                       ("random", 47123)):
        dst = t.dns if port == 53 else t.web
        add(f"udp-{name}", "UDP other than DNS to the chain's resolver is not carried by Tor",
            [{"dst": dst, "proto": "udp", "dport": port}], OPEN)
    add("dns-tcp-direct", "DNS over TCP to a resolver of our choice",
        [{"dst": t.dns, "proto": "tcp", "dport": 53, "flags": "S"}], OPEN)
    add("icmp-echo", "ICMP", [{"dst": t.web, "proto": "icmp"}], OPEN)
    add("icmp-timestamp", "ICMP", [{"dst": t.web, "proto": "icmp", "icmp_type": 13}], OPEN)
    add("traceroute", "TTL 1..4 reveals no hop beyond the gateway",
        [{"dst": t.web, "proto": "udp", "dport": 33434 + i, "ttl": i} for i in range(1, 5)],
        OPEN)
    v6 = frozenset({"plain"}) if t.ipv6 else NONE  # with IPv6 on, a plain chain forwards it
    six = "IPv6 only where the chain forwards it" if t.ipv6 else "IPv6 never"
    add("ipv6-nd-gateway", "the gateway answers IPv6 neighbour discovery iff IPv6 is on",
        [{"dst": solicited_node(t.gateway6), "tgt": t.gateway6, "src": t.ws_ll or "fe80::1",
          "proto": "ns6", "bare": True}])
    c[-1].control = "nd-reply"
    add("ipv6-own-global", six, [{"dst": "2001:db8::80", "src": t.ws6 or "2001:db8::5",
                                  "proto": "tcp6", "dport": 80, "via": t.gateway}], v6)
    add("ipv6-linklocal", "IPv6 never", [{"dst": "ff02::1", "src": "fe80::1",
                                          "proto": "udp6", "dport": 9}])
    add("ipv6-global", "IPv6 never", [{"dst": "2001:db8::80", "src": "2001:db8::5",
                                       "proto": "tcp6", "dport": 80, "via": t.gateway}])
    add("ipv6-gateway", "IPv6 never", [{"dst": "fd09:24ef:4179::a89:1", "proto": "icmp6",
                                        "via": t.gateway}])
    add("ipv6-ndp", "IPv6 never", [{"dst": "ff02::1:ff00:1", "proto": "ns6"}])
    add("ipv6-ra", "IPv6 never", [{"dst": "ff02::1", "proto": "ra6"}])
    add("arp-upstream", "ARP does not cross the gateway",
        [{"dst": a, "proto": "arp", "src": t.ws_addr} for a in t.upstream[:2]])
    add("dhcp", "no DHCP beyond the link", [{"dst": "255.255.255.255", "src": "0.0.0.0",
                                             "proto": "udp", "sport": 68, "dport": 67}])
    add("mdns", "no multicast beyond the link", [{"dst": "224.0.0.251", "proto": "udp",
                                                  "sport": 5353, "dport": 5353}])
    add("llmnr", "no multicast beyond the link", [{"dst": "224.0.0.252", "proto": "udp",
                                                   "dport": 5355}])
    add("broadcast", "no broadcast beyond the link", [{"dst": "255.255.255.255",
                                                       "proto": "udp", "dport": 9}])
    add("ssdp-multicast", "no multicast beyond the link", [{"dst": "239.255.255.250",
                                                            "proto": "udp", "dport": 1900}])
    for name, src in (("sibling", t.siblings[0] if t.siblings else "10.137.0.250"),
                      ("upstream", t.upstream[0] if t.upstream else t.gateway),
                      ("zero", "0.0.0.0"), ("loopback", "127.0.0.1"), ("lab", t.dns)):
        add(f"spoof-{name}", "anti-spoofing at the first hop",
            [{"dst": t.web, "src": src, "proto": "udp", "dport": 9},
             {"dst": t.web, "src": src, "proto": "tcp", "dport": 80, "flags": "S"}])
    add("gw-control-port", "the control port only through the filter (nothing of it "
        "goes further)", [{"dst": t.gateway, "proto": "tcp", "dport": 9051, "flags": "S"}])
    add("gw-socks-port", "the SOCKS port is the gateway's own (nothing of it goes further)",
        [{"dst": t.gateway, "proto": "tcp", "dport": 9050, "flags": "S"}])
    add("gw-transport-direct", "TransPort only via the redirect",
        [{"dst": t.gateway, "proto": "tcp", "dport": 9040, "flags": "S"}])
    add("gw-dnsport-direct", "DNSPort only via the redirect",
        [{"dst": t.gateway, "proto": "udp", "dport": 5400}])
    add("gw-loopback", "127.0.0.1 via the gateway",
        [{"dst": "127.0.0.1", "via": t.gateway, "proto": "tcp", "dport": 9051, "flags": "S"}])
    add("upstream-qubes", "no path to upstream qubes",
        [{"dst": a, "proto": "tcp", "dport": p, "flags": "S"} for a in t.upstream
         for p in (22, 53)])
    add("fragments", "fragments", [{"dst": t.web, "proto": "udp", "dport": 9, "size": 3000,
                                    "frag": 512}], OPEN)
    add("overlapping-fragments", "overlapping fragments",
        [{"dst": t.web, "proto": "udp", "dport": 9, "size": 1600, "frag": 512,
          "overlap": True}], OPEN)
    add("ip-options", "IP options", [{"dst": t.web, "proto": "udp", "dport": 9,
                                      "options": "rr"}], OPEN)
    for name, num in (("gre", 47), ("esp", 50), ("sctp", 132), ("raw253", 253)):
        add(f"proto-{name}", "other IP protocols are not carried by Tor",
            [{"dst": t.web, "proto": "ip", "ipproto": num}], OPEN)
    add("oversized", "oversized datagrams", [{"dst": t.web, "proto": "udp", "dport": 9,
                                              "size": 60000, "frag": 1480}], OPEN)
    return c


def stamp(cs: list[Case], run_id: str) -> list[Case]:
    """Give every case its unique marker, in every packet and tool argument, and its own
    source ports (a shared 5-tuple would make an INVALID probe part of another case's
    connection)."""
    base = 20000 + int(run_id, 16) % 20000
    for i, case in enumerate(cs):
        case.marker = f"nstk{run_id}c{i:03d}"
        for j, p in enumerate(case.packets):
            p["payload"] = case.marker
            p.setdefault("sport", base + i * 8 + j)
        if case.tool:
            case.tool = [a.replace("MARKER", case.marker) for a in case.tool]
    return cs


def solicited_node(addr: str) -> str:
    """The multicast group a neighbour solicitation for `addr` goes to (RFC 4291)."""
    import ipaddress

    low = int(ipaddress.IPv6Address(addr)) & 0xFFFFFF
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | low))
