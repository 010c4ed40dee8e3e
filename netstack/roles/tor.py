"""`tor` (sys-whonix): a Whonix-style gateway. New TCP (SYN) from clients is redirected to
Tor's TransPort, DNS to its DNSPort; everything else from clients is dropped and nothing is
ever forwarded (forwarding is off too). The gateway's own output is only the tor process
(uid) toward its netvm. A dead tor means refused connections, never clear traffic."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netstack.addressing import VIRTUAL_DNS
from netstack.config import Qube
from netstack.errors import ConfigError
from netstack.model import Daemon, QubeInfo
from netstack.roles.base import LiveFacts, QubeContext, Role
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
from netstack.tor.gateway import DNS_PORT, TRANS_PORT, TorInfo, tor_uid, torrc

if TYPE_CHECKING:
    from netstack.audit.properties import AuditContext, QubeView, Result
    from netstack.reconcile import Runtime
    from netstack.state import State

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
    config_keys = frozenset({"bridges"})
    strict_replies = True
    protection = "tor"

    def validate(self, q: Qube) -> None:
        bridges = q.settings.get("bridges", [])
        if not isinstance(bridges, list) or not all(isinstance(b, str) for b in bridges):
            raise ConfigError(f"qube {q.name!r} field 'bridges'",
                              "must be a list of Bridge lines",
                              'e.g. bridges = ["obfs4 192.0.2.7:443 FINGERPRINT cert=... '
                              'iat-mode=0"]')

    def info(self, ctx: QubeContext) -> TorInfo:
        return TorInfo(ctx.qube.name, ctx.netns, ctx.addr.ipv4, ctx.state_dir,
                       lab_network=ctx.lab, bridges=list(ctx.qube.settings.get("bridges", [])))

    def sysctls(self, ctx: QubeContext) -> dict[str, str]:
        return common.sysctls(False, ctx.ipv6)  # a gateway proxies, it never forwards

    def rules(self, ctx: QubeContext, info: TorInfo, rs: Ruleset) -> None:
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
        # by name: nftables resolves it when the ruleset is loaded (the plan stays pure)
        rs["output"].add(oifname(ctx.upstream_if), match(meta("skuid"), info.user), ACCEPT,
                         comment="tor's own traffic upstream")

    def daemons(self, ctx: QubeContext, info: TorInfo) -> list[Daemon]:
        return [Daemon(info.daemon_name, info.netns, ("tor", "-f", info.torrc_path), True,
                       requires=info.torrc_path,
                       monitor=("netstack.tor.control:watch", info.control_socket))]

    # --- run time -----------------------------------------------------------------------
    def prepare(self, q: QubeInfo, rt: Runtime) -> None:
        """The DataDirectory belongs to the tor user (tor drops root after binding its
        ports); the torrc goes last: the supervisor starts tor when it appears."""
        info = q.info
        assert isinstance(info, TorInfo)
        rt.make_dir(info.datadir, 0o700, owner=info.user)
        rt.write(info.torrc_path, torrc(info, rt.lab_dirauths if info.lab_network else ()))

    def leak_zone(self, outer: str) -> str:
        return "tor-out" if outer == "plain" else outer

    # --- proofs and status --------------------------------------------------------------
    def audit(self, view: QubeView, ctx: AuditContext) -> list[Result]:
        info = view.qube.info
        assert isinstance(info, TorInfo)
        return super().audit(view, ctx) + tor_gateway(view, tor_uid(info.user))

    def status(self, q: QubeInfo, live: LiveFacts) -> dict[str, Any]:
        """From the supervisor's monitor of tor's control port (see tor.control.watch)."""
        info = q.info
        assert isinstance(info, TorInfo)
        child = live.children.get(info.daemon_name) or {}
        t = dict(child.get("health") or {"error": "no report from the supervisor yet",
                                         "bootstrap": None})
        if child and not child.get("alive"):
            t = {"error": "tor is not running", "bootstrap": None}
        t["restarts"] = child.get("restarts")
        return {"tor": t}

    def wait_ready(self, q: QubeInfo, st: State, timeout: float,
                   progress: Callable[[int, str], None]) -> float:
        from netstack.tor.control import wait_bootstrap

        info = q.info
        assert isinstance(info, TorInfo)
        return wait_bootstrap(info.control_socket, timeout, progress)

    def health(self, entry: dict[str, Any]) -> list[str]:
        t = entry["tor"]
        if t.get("error"):
            return [f"tor: {t['error']}"]
        if t.get("bootstrap") != 100:
            return [f"tor bootstrapped {t.get('bootstrap')}% only"]
        return []

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        t = entry["tor"]
        if t.get("error"):
            return [f"tor: {t['error']}"]
        return [f"tor {t['version']}: bootstrap {t['bootstrap']}%, "
                f"{t['circuits_built']} circuits built, restarts {t['restarts']}"]


def tor_gateway(q: QubeView, uid: int) -> list[Result]:
    from netstack.audit import properties as p
    from netstack.audit.evaluator import Evaluator, Outcome, Packet
    from netstack.audit.evaluator import Ruleset as EvRuleset

    fwd = [Packet(iifname=c.vif, oifname=o, saddr=c.ipv4, daddr=d, l4proto=l4, ct_state=ct,
                  tcp_flags=fl)
           for c in q.clients for o in p.ifaces(q) for d in ("198.51.100.80", "10.137.0.1")
           for l4 in ("tcp", "udp", "icmp", "gre") for ct in p.CT_STATES
           for fl in (p.FLAGS if l4 == "tcp" else p.FLAGS[:1])]
    fwd += [Packet(family="ipv6", iifname=c.vif, oifname=o, saddr=s, daddr="2001:db8::80",
                   l4proto=l4, ct_state=ct)
            for c in q.clients for s in (c.ipv6, c.ll, "fe80::1") if s
            for o in p.ifaces(q) for l4 in ("tcp", "udp", "icmpv6") for ct in p.CT_STATES]
    r1 = p.check("Tor gateway forwards nothing", q, "forward", fwd,
                 lambda pk, o: o.verdict == "accept", "nothing from clients is ever forwarded")
    ports = sorted(set(p.constants(q, "port", ("input", "prerouting"))
                       + [22, 53, 9050, 9051, TRANS_PORT, DNS_PORT]))
    inp = [Packet(iifname=c.vif, saddr=c.ipv4, daddr=q.address, l4proto=l4, dport=pt,
                  ct_state="new", ct_status=st)
           for c in q.clients for l4 in ("tcp", "udp", "icmp") for pt in ports
           for st in (frozenset(), frozenset({"dnat"}))]

    def bad_in(pk: Packet, o: Outcome) -> bool:
        ok = "dnat" in pk.ct_status and ((pk.l4proto, pk.dport) in
                                          (("tcp", TRANS_PORT), ("udp", DNS_PORT)))
        return o.verdict == "accept" and not ok
    r2 = p.check("only TransPort and DNSPort from clients", q, "input", inp, bad_in,
                 f"clients reach only redirected TCP to {TRANS_PORT} and DNS to {DNS_PORT}")
    ctl = [pk for pk in inp if pk.dport in (9050, 9051)]
    r3 = p.check("control port unreachable", q, "input", ctl,
                 lambda pk, o: o.verdict == "accept",
                 "no TCP port 9050/9051 from clients (the control port is a unix socket)")
    outp = [Packet(oifname=q.upstream_if, saddr=q.address, daddr=d, l4proto=l4, dport=443,
                   ct_state=ct, skuid=u)
            for d in ("203.0.113.41", "198.51.100.80") for l4 in ("tcp", "udp")
            for ct in ("new", "established") for u in (0, 1000, uid, None)]
    r4 = p.check("gateway output only from tor", q, "output", outp,
                 lambda pk, o: o.verdict == "accept" and pk.skuid != uid,
                 f"to {q.upstream_if} only processes of uid {uid} (tor) send")
    syn = [Packet(iifname=c.vif, saddr=c.ipv4, daddr="198.51.100.80", l4proto="tcp", dport=80,
                  ct_state="new", tcp_flags=fl) for c in q.clients for fl in p.FLAGS]
    ev = Evaluator(EvRuleset(q.ruleset))

    def redirected(pk: Packet) -> bool:
        o = ev.run_hook("prerouting", pk)
        return any(s.action == "redirect" for s in o.trace)
    wrong = [pk for pk in syn if redirected(pk) != (pk.tcp_flags == frozenset({"syn"}))]
    r5 = p.Result("only new SYNs are redirected", q.name, "PASS" if not wrong else "FAIL",
                  "a TCP packet is redirected to TransPort only if it is a bare SYN",
                  wrong[0].describe() if wrong else None, classes=len(syn))
    return [r1, r2, r3, r4, r5]
