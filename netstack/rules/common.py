"""Rule pieces every role shares, written once: INVALID drop, established/loopback accept,
IPv6 off, anti-spoofing, forwarding downstream->upstream, masquerade, virtual-DNS DNAT."""

from __future__ import annotations

from netstack.addressing import VIRTUAL_DNS
from netstack.model import Client
from netstack.rules.nft import (
    ACCEPT,
    COUNTER,
    DROP,
    MASQUERADE,
    ND_TYPES,
    NamedSet,
    Ruleset,
    ct_state,
    dnat4,
    iifname,
    ip_daddr,
    ip_saddr,
    jump,
    l4proto,
    match,
    meta,
    nfproto,
    oifname,
    payload,
    th_dport,
)

LINK_SCOPE6 = [{"prefix": {"addr": "fe80::", "len": 10}},
               {"prefix": {"addr": "ff02::", "len": 16}}]


def base(rs: Ruleset, ipv6: bool, strict_replies: bool = False,
         peers6: list[str] | None = None, offload: list[str] | None = None) -> None:
    """Default-drop input/forward/output (the chain policies), INVALID dropped before any
    accept or NAT, replies and loopback allowed, IPv6 dropped unless configured.
    strict_replies: forward/output accept replies only on the interfaces the role names
    (a kill switch must not let an old connection out another way when its route changes).
    peers6: the global IPv6 addresses of the qube's link peers (netvm, clients): neighbour
    discovery goes out only to them and to link-scope addresses, never to a routed one."""
    # Every forwarded packet came through prerouting, where INVALID and (off) IPv6 are
    # dropped: forward does not ask again, so an established packet meets its accept
    # first (the hot path of the chain: one rule per packet per hop).
    rs["prerouting"].add(ct_state("invalid"), COUNTER, DROP, comment="drop INVALID")
    rs["output"].add(ct_state("invalid"), COUNTER, DROP, comment="drop INVALID")
    if not ipv6:
        for chain in ("prerouting", "output"):
            rs[chain].add(nfproto("ipv6"), COUNTER, DROP, comment="IPv6 is off")
    else:
        nd = match(payload("icmpv6", "type"), {"set": ND_TYPES})
        rs["input"].add(nd, ACCEPT, comment="IPv6 neighbour discovery")
        rs["output"].add(nd, ip_daddr({"set": LINK_SCOPE6 + sorted(peers6 or [])}, six=True),
                         ACCEPT, comment="IPv6 neighbour discovery")
    if offload:  # established flows on the fast path, right before they are accepted
        from netstack import fastpath

        rs.flowtables[fastpath.FLOWTABLE] = list(offload)
        rs["forward"].add(*fastpath.offload_rule(),
                          comment="established flows to the fast path (flowtable)")
    for chain in ("input",) if strict_replies else ("input", "forward", "output"):
        rs[chain].add(ct_state("established", "related"), ACCEPT, comment="replies")
    rs["input"].add(match(meta("iif"), "lo"), ACCEPT, comment="loopback")
    rs["output"].add(match(meta("oif"), "lo"), ACCEPT, comment="loopback")


def antispoof(rs: Ruleset, clients: list[Client]) -> None:
    """A packet from a client link must carry that client's address (dropped in
    prerouting as Qubes does)."""
    for c in clients:
        vif, v4, v6, name = c.vif, c.ipv4, c.ipv6, c.name
        rs["prerouting"].add(iifname(vif), nfproto("ipv4"), ip_saddr(v4, "!="), COUNTER, DROP,
                             comment=f"antispoof {name}")
        if v6:  # exactly its own global and link-local addresses
            rs["prerouting"].add(iifname(vif), nfproto("ipv6"),
                                 ip_saddr({"set": [v6, c.ll or v6]}, "!=", True),
                                 COUNTER, DROP, comment=f"antispoof {name} (IPv6)")
        else:
            rs["prerouting"].add(iifname(vif), nfproto("ipv6"), COUNTER, DROP,
                                 comment=f"antispoof {name} (IPv6 off)")


def provide_network(rs: Ruleset, client_vifs: list[str], upstream_if: str) -> None:
    """Clients may reach only upstream, never each other; replies come back via conntrack.
    Masquerade at every hop as Qubes does, so each netvm needs routes to its own clients
    only."""
    if client_vifs:
        no_qubes(rs, client_vifs)
        rs["forward"].add(iifname(*client_vifs), oifname(upstream_if), ACCEPT,
                          comment="clients -> upstream only")
    rs["nat_postrouting"].add(oifname(upstream_if), MASQUERADE, comment="masquerade upstream")


def client_firewalls(rs: Ruleset, clients: list[Client], lists: dict[str, tuple],
                     ipv6: bool) -> None:
    """Qubes' per-qube rules (rules/qubefw.py), whatever the netvm's kind: each new
    connection of a client with a list meets its own chain in prerouting, after
    anti-spoofing and before any NAT, so the rules judge the destination the qube asked for
    (behind a Tor gateway: before the redirect to TransPort/DNSPort). The chain ends in a
    drop; an accept only ends prerouting, the netvm's own rules still follow."""
    from netstack.addressing import VIRTUAL_DNS
    from netstack.rules import qubefw

    for c in clients:
        if c.name not in lists:
            continue
        qubefw.add_client_rules(rs, c.qid, c.name, lists[c.name], VIRTUAL_DNS, ipv6)
        rs["prerouting"].add(iifname(c.vif), ct_state("new"), jump(qubefw.chain_name(c.name)),
                             comment=f"{c.name}'s firewall rules")


def no_qubes(rs: Ruleset, client_vifs: list[str]) -> None:
    """A client never reaches another qube's address (upstream qubes included), whatever the
    route: the qube network is not forwarded into an uplink or a tunnel."""
    rs["forward"].add(iifname(*client_vifs), ip_daddr({"prefix": {"addr": "10.137.0.0",
                                                                  "len": 16}}),
                      COUNTER, DROP, comment="no qube addresses")


def own_output_upstream(rs: Ruleset, upstream_if: str) -> None:
    rs["output"].add(oifname(upstream_if), ACCEPT, comment="own traffic to upstream")


def dns_dnat(rs: Ruleset, client_vifs: list[str], resolvers: list[str]) -> None:
    """The virtual DNS addresses 10.139.1.1/.2 go to real resolvers (clients and self)."""
    if not resolvers:
        return
    for i, vaddr in enumerate(VIRTUAL_DNS):
        target = resolvers[min(i, len(resolvers) - 1)]
        sel = [ip_daddr(vaddr), l4proto("tcp", "udp"), th_dport(53)]
        if client_vifs:
            rs["nat_prerouting"].add(iifname(*client_vifs), *sel, COUNTER, dnat4(target),
                                     comment=f"virtual DNS {vaddr} -> {target}")
        rs["nat_output"].add(*sel, dnat4(target), comment=f"own DNS {vaddr} -> {target}")


def dns_dnat_map(rs: Ruleset, client_vifs: list[str], map_name: str) -> None:
    """The virtual DNS addresses go to resolvers known only at run time (a DHCP lease):
    a map filled and emptied with the lease. With the map empty nothing is rewritten, and
    a lookup still addressed to a virtual DNS address is dropped, never routed on."""
    rs.add_set(NamedSet(map_name, "ipv4_addr", map="ipv4_addr"))
    sel = [ip_daddr({"set": list(VIRTUAL_DNS)}), l4proto("tcp", "udp"), th_dport(53)]
    to = {"dnat": {"family": "ip", "addr": {"map": {"key": payload("ip", "daddr"),
                                                    "data": f"@{map_name}"}}}}
    if client_vifs:
        rs["nat_prerouting"].add(iifname(*client_vifs), *sel, COUNTER, to,
                                 comment="virtual DNS -> the lease's resolvers")
    rs["nat_output"].add(*sel, to, comment="own DNS -> the lease's resolvers")
    for chain in ("forward", "output"):
        rs[chain].add(ip_daddr({"set": list(VIRTUAL_DNS)}), COUNTER, DROP,
                      comment="virtual DNS without a lease: dropped")


def sysctls(provides_network: bool, ipv6: bool) -> dict[str, str]:
    """Forwarding only where a qube provides network (new namespaces start with it off);
    IPv6 disabled before any link exists unless configured."""
    s = {
        "net/ipv4/ip_forward": "1" if provides_network else "0",
        "net/ipv6/conf/all/disable_ipv6": "0" if ipv6 else "1",
        "net/ipv6/conf/default/disable_ipv6": "0" if ipv6 else "1",
    }
    if ipv6:
        s["net/ipv6/conf/all/forwarding"] = "1" if provides_network else "0"
        # no address of the kernel's own making (netstack sets fixed link-local ones) and
        # no router advertisement taken from a client
        s["net/ipv6/conf/default/addr_gen_mode"] = "1"
        s["net/ipv6/conf/all/accept_ra"] = "0"
        s["net/ipv6/conf/default/accept_ra"] = "0"
    return s
