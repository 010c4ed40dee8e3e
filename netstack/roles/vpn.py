"""`vpn` (sys-proxyvm): everything from its clients leaves only through the tunnel; its own
output to the uplink is only the tunnel transport (fwmark + endpoint address, protocol and
port); DNS goes to the VPN's resolver through the tunnel. The rules are in place before the
tunnel starts and stay when it dies: a dead VPN means dropped traffic, never clear."""

from __future__ import annotations

import sys

from netstack.roles.base import Daemon, QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import (
    ACCEPT,
    COUNTER,
    MASQUERADE,
    NamedSet,
    Ruleset,
    concat,
    ct_state,
    iifname,
    in_set,
    l4proto,
    match,
    meta,
    oifname,
    payload,
)
from netstack.vpn.runtime import ENDPOINT_SET, VpnInfo, daemon_argv


class VpnRole(Role):
    kind = "vpn"
    strict_replies = True

    def info(self, ctx: QubeContext) -> VpnInfo:
        return ctx.extra["vpn"]

    def rules(self, ctx: QubeContext, rs: Ruleset) -> None:
        v = self.info(ctx)
        rs.add_set(NamedSet(ENDPOINT_SET, ["ipv4_addr", "inet_proto", "inet_service"],
                            [{"concat": [e["host"], e["proto"], e["port"]]}
                             for e in v.literal_endpoints()]))
        tun, up = v.dev, ctx.upstream_if
        clients = ctx.client_vifs
        if clients:
            common.no_qubes(rs, clients)
            rs["forward"].add(iifname(*clients), oifname(tun), ACCEPT,
                              comment="clients -> tunnel only")
            rs["forward"].add(iifname(tun), oifname(*clients),
                              ct_state("established", "related"), ACCEPT,
                              comment="replies from the tunnel")
            rs["output"].add(oifname(*clients), ct_state("established", "related"), ACCEPT,
                             comment="replies to clients")
        rs["output"].add(oifname(tun), ACCEPT, comment="own traffic through the tunnel")
        rs["output"].add(oifname(up), match(meta("mark"), v.fwmark), l4proto("tcp", "udp"),
                         in_set(concat(payload("ip", "daddr"), meta("l4proto"),
                                       payload("th", "dport")), ENDPOINT_SET),
                         COUNTER, ACCEPT, comment="VPN transport")
        rs["nat_postrouting"].add(oifname(tun), MASQUERADE, comment="masquerade tunnel")
        common.dns_dnat(rs, clients, v.dns)

    def daemons(self, ctx: QubeContext) -> list[Daemon]:
        v = self.info(ctx)
        return [Daemon(f"vpn-{ctx.qube.name}", v.netns, daemon_argv(v), True,
                       (sys.executable, "-m", "netstack.vpn.hook", v.spec_path),
                       requires=v.spec_path)]
