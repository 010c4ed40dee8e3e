"""`tor` (sys-whonix): a Whonix-style gateway. New TCP (SYN) from clients is redirected to
Tor's TransPort, DNS to its DNSPort; everything else from clients is dropped and nothing is
ever forwarded (forwarding is off too). The gateway's own output is only the tor process
(uid) toward its netvm. A dead tor means refused connections, never clear traffic."""

from __future__ import annotations

from netstack.addressing import VIRTUAL_DNS
from netstack.roles.base import Daemon, QubeContext, Role
from netstack.rules import common
from netstack.rules.nft import (
    ACCEPT,
    COUNTER,
    Ruleset,
    anon_set,
    ct_state,
    iifname,
    ip_daddr,
    l4proto,
    match,
    meta,
    oifname,
    payload,
    redirect,
)
from netstack.tor.gateway import DNS_PORT, TRANS_PORT, TorInfo

# Never sent into Tor: the gateway itself and local ranges (a TestingTorNetwork exit would
# connect to them; on the public network they are a LAN probe).
NOT_VIA_TOR = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
               "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3"]


def _prefixes(nets: list[str]) -> dict:
    return {"set": [{"prefix": {"addr": n.split("/")[0], "len": int(n.split("/")[1])}}
                    for n in nets]}


def tcp_syn_only() -> dict:
    return match({"&": [payload("tcp", "flags"), ["fin", "syn", "rst", "ack"]]}, "syn")


class TorRole(Role):
    kind = "tor"
    strict_replies = True

    def info(self, ctx: QubeContext) -> TorInfo:
        return ctx.extra["tor"]

    def sysctls(self, ctx: QubeContext) -> dict[str, str]:
        return common.sysctls(False, ctx.ipv6)  # a gateway proxies, it never forwards

    def rules(self, ctx: QubeContext, rs: Ruleset) -> None:
        t = self.info(ctx)
        clients = ctx.client_vifs
        if clients:
            rs["nat_prerouting"].add(iifname(*clients), ip_daddr(anon_set(list(VIRTUAL_DNS))),
                                     l4proto("udp"), match(payload("udp", "dport"), 53),
                                     COUNTER, redirect(DNS_PORT), comment="DNS -> DNSPort")
            rs["nat_prerouting"].add(iifname(*clients), l4proto("tcp"),
                                     ip_daddr(_prefixes(NOT_VIA_TOR), "!="), tcp_syn_only(),
                                     COUNTER, redirect(TRANS_PORT), comment="TCP SYN -> TransPort")
            for port, proto, what in ((TRANS_PORT, "tcp", "TransPort"),
                                      (DNS_PORT, "udp", "DNSPort")):
                rs["input"].add(iifname(*clients), l4proto(proto),
                                match(payload(proto, "dport"), port),
                                match({"ct": {"key": "status"}}, "dnat", "in"), ACCEPT,
                                comment=f"redirected to {what}")
            rs["output"].add(oifname(*clients), ct_state("established", "related"), ACCEPT,
                             comment="replies to clients")
        rs["output"].add(oifname(ctx.upstream_if), match(meta("skuid"), t.uid), ACCEPT,
                         comment="tor's own traffic upstream")

    def daemons(self, ctx: QubeContext) -> list[Daemon]:
        t = self.info(ctx)
        return [Daemon(f"tor-{ctx.qube.name}", t.netns, ("tor", "-f", t.torrc_path), True,
                       requires=t.torrc_path)]
