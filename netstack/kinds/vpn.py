"""`vpn` (sys-proxyvm): everything from its clients leaves only through the tunnel; its own
output to the uplink is only the tunnel transport (fwmark + endpoint address, protocol and
port); DNS goes to the VPN's resolver through the tunnel. The rules are in place before the
tunnel starts and stay when it dies: a dead VPN means dropped traffic, never clear."""

from __future__ import annotations

import ipaddress
import sys
from typing import TYPE_CHECKING

from netstack.addressing import ip_version
from netstack.errors import ConfigError
from netstack.kinds.spec import KindSpec, KindTraits, QubeContext
from netstack.model import Daemon, QubeInfo, Tunnel
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
from netstack.vpn import portfwd
from netstack.vpn.info import ENDPOINT_SET, ENDPOINT_SET6, VpnInfo, set_elements, transport

if TYPE_CHECKING:
    from netstack.audit.properties import AuditContext, QubeView, Result
    from netstack.config import Qube

SET_TYPE = ["ipv4_addr", "inet_proto", "inet_service"]
SET_TYPE6 = ["ipv6_addr", "inet_proto", "inet_service"]


class VpnSpec(KindSpec):
    kind = "vpn"
    config_keys = frozenset({"type", "config", "dns", "backend", "failover_after",
                             "forward"})
    traits = KindTraits(strict_replies=True, protection="vpn", privacy=1)

    def validate(self, q: Qube) -> None:
        where, s = f"qube {q.name!r}", q.settings
        if s.get("type") not in ("wireguard", "openvpn"):
            raise ConfigError(f"{where} field 'type'", "missing" if s.get("type") is None
                              else f"{s.get('type')!r} is not a VPN type",
                              'use type = "wireguard" or type = "openvpn"')
        c = s.get("config")
        if isinstance(c, list):
            if not c or not all(isinstance(x, str) and x for x in c):
                raise ConfigError(f"{where} field 'config'", "must be a non-empty list of "
                                  "paths", 'e.g. config = ["se-1.conf", "se-2.conf"]')
            if len(set(c)) != len(c):
                raise ConfigError(f"{where} field 'config'", "names a file twice",
                                  "list each server's file once")
        elif not isinstance(c, str) or not c:
            raise ConfigError(f"{where} field 'config'", "missing" if c is None else
                              f"{c!r} must be a path or a list of paths",
                              "give the path of the provider's .conf or .ovpn file, or a "
                              "list of them (servers to fail over between)")
        fa = s.get("failover_after", 20)
        if isinstance(fa, bool) or not isinstance(fa, int | float) or not 2 <= fa <= 3600:
            raise ConfigError(f"{where} field 'failover_after'", f"{fa!r} is not seconds "
                              "(2-3600)", "e.g. failover_after = 20")
        if "backend" in s and (s["type"] != "wireguard"
                               or s["backend"] not in ("auto", "kernel", "wireguard-go")):
            raise ConfigError(f"{where} field 'backend'", f"{s['backend']!r} is not a "
                              f"{s['type']} backend",
                              'for WireGuard use "auto", "kernel" or "wireguard-go"; '
                              "OpenVPN has none")
        dns = s.get("dns", [])
        if not isinstance(dns, list) or not all(isinstance(d, str) for d in dns):
            raise ConfigError(f"{where} field 'dns'", "must be a list of addresses",
                              'e.g. dns = ["10.64.0.1"]')
        for d in dns:
            if ip_version(d) != 4:
                raise ConfigError(f"{where} field 'dns'", f"{d!r} is not an IPv4 address",
                                  "give the VPN resolver's IPv4 address (the virtual DNS "
                                  "is IPv4)")
        portfwd.parse(q.name, s.get("forward"))

    def host_caps(self, q: Qube) -> set[str]:
        wants = q.settings.get("type") == "wireguard" and \
            q.settings.get("backend", "auto") != "wireguard-go"
        return {"wireguard"} if wants else set()

    def provider_refs(self, q: Qube) -> list[str]:
        from netstack.vpn.runtime import provider_refs

        return provider_refs(q)

    def info(self, ctx: QubeContext) -> VpnInfo:
        from netstack.vpn import runtime

        info = runtime.vpn_info(ctx.qube, ctx.provider, ctx.addr.qid, ctx.stack,
                                ctx.addr.gateway4 or "", ctx.addr.gateway6, ctx.state_dir,
                                ctx.caps.wireguard)
        udp_blocker(ctx, info)
        info.forwards = portfwd.parse(ctx.qube.name, ctx.qube.settings.get("forward"))
        portfwd.check_targets(ctx.qube.name, info.forwards,
                              {c.name: ctx.topo[c.name].kind for c in ctx.clients})
        return info

    def rules(self, ctx: QubeContext, info: VpnInfo, rs: Ruleset) -> None:
        # Literal endpoints are in the set from the first transaction on; names are added
        # once resolved through sys-net, before the tunnel daemon may start.
        v4, v6 = set_elements(transport(info, None))
        rs.add_set(NamedSet(ENDPOINT_SET, SET_TYPE, v4))
        rs.add_set(NamedSet(ENDPOINT_SET6, SET_TYPE6, v6))
        tun, up = info.dev, ctx.upstream_if
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
        rs["output"].add(oifname(up), match(meta("mark"), info.fwmark), l4proto("tcp", "udp"),
                         in_set(concat(payload("ip", "daddr"), meta("l4proto"),
                                       payload("th", "dport")), ENDPOINT_SET),
                         COUNTER, ACCEPT, comment="VPN transport")
        rs["output"].add(oifname(up), match(meta("mark"), info.fwmark), l4proto("tcp", "udp"),
                         in_set(concat(payload("ip6", "daddr"), meta("l4proto"),
                                       payload("th", "dport")), ENDPOINT_SET6),
                         COUNTER, ACCEPT, comment="VPN transport (IPv6)")
        rs["nat_postrouting"].add(oifname(tun), MASQUERADE, comment="masquerade tunnel")
        common.dns_dnat(rs, clients, info.dns)
        portfwd.rules(rs, info.forwards, tun, {c.name: c for c in ctx.clients})

    def daemons(self, ctx: QubeContext, info: VpnInfo) -> list[Daemon]:
        from netstack.vpn import runtime

        monitor = ("netstack.vpn.failover:watch", failover_spec_path(info)) \
            if info.servers else ()
        out = [Daemon(info.daemon_name, info.netns, runtime.daemon_argv(info), True,
                      (sys.executable, "-m", "netstack.vpn.hook", info.spec_path),
                      requires=info.spec_path, monitor=monitor)]
        if any(f.natpmp for f in info.forwards):  # asks the gateway, renews, fills the sets
            spec = portfwd.spec_path(info.state_dir, info.qube)
            out.append(Daemon(f"{info.daemon_name}-forward", info.netns,
                              (sys.executable, "-m", "netstack.vpn.portfwd_run", spec),
                              True, requires=spec))
        return out

    def tunnel(self, q: QubeInfo) -> Tunnel:
        info = q.info
        assert isinstance(info, VpnInfo)
        return Tunnel(info.dev, info.fwmark, tuple(info.routes), info.upstream_if)

    def leak_zone(self, outer: str) -> str:
        return "vpn-out"

    # --- proofs -------------------------------------------------------------------------
    def audit(self, view: QubeView, ctx: AuditContext) -> list[Result]:
        info = view.qube.info
        assert isinstance(info, VpnInfo)
        want = set(transport(info.current(), ctx.resolved.get(view.qube.name)))
        return super().audit(view, ctx) + kill_switch(view, self.tunnel(view.qube),
                                                      ctx.endpoints) \
            + [endpoint_set(view, want), inbound_only_forwarded(view, info)]


def udp_blocker(ctx: QubeContext, info: VpnInfo) -> None:
    """A transport over UDP (WireGuard always, OpenVPN's `proto udp`) behind a gateway
    that carries no UDP (Tor) could never connect: refused when the plan is made (`up`,
    `plan`, `attach`), before anything changes, instead of a tunnel that never comes up."""
    protos = {e.proto for srv in (info.servers or [info]) for e in srv.endpoints}
    if "udp" not in protos:
        return
    by_name = {q.name: q for q in ctx.topo.qubes}
    cur = ctx.qube
    while cur.netvm is not None and cur.netvm in by_name:
        cur = by_name[cur.netvm]
        if not ctx.topo.kinds[cur.kind].carries_udp:
            what = "WireGuard" if info.type == "wireguard" else "this OpenVPN server (proto udp)"
            raise ConfigError(f"qube {ctx.qube.name!r} field 'netvm'",
                              f"{what} needs UDP, and {cur.name!r} (kind {cur.kind}) "
                              "carries TCP only",
                              "put the VPN qube before the Tor gateway (Tor over VPN), or "
                              "use an OpenVPN server with proto tcp")


def failover_spec_path(info: VpnInfo) -> str:
    return info.server_path(info.spec_path, 0).replace(".s0.", ".failover.")


def kill_switch(q: QubeView, tun: Tunnel, endpoints: set[tuple[str, str, int]]) -> list[Result]:
    """Forwarded client traffic only into the tunnel; the qube's own output to its uplink
    only the tunnel transport (mark + endpoint), whoever sends it (any socket owner, or
    none)."""
    from netstack.audit import properties as p
    from netstack.audit.space import Domains

    extra = Domains()
    for a, _proto, port in endpoints:
        n = int(ipaddress.ip_address(a))
        extra.interval(f"daddr{ipaddress.ip_address(a).version}", n, n)
        extra.interval("dport", port, port)
    extra.interval("mark", tun.fwmark, tun.fwmark)
    out = []
    total = 0
    for c in q.clients:
        start = {**p.not_sockets("forward"), "iif": p.one_of("iif", c.vif),
                 "oif": p.none_of("oif", tun.dev)}
        r = p.check("kill switch (forward)", q, "forward", start, p.accepted, "", extra)
        total += r.classes
        if r.status != "PASS":
            out.append(r)
            break
    else:
        out.append(p.Result("kill switch (forward)", q.name, "PASS",
                            f"client traffic is forwarded only into {tun.dev}", classes=total))
    allowed = [p.box(mark=p.one_of("mark", tun.fwmark),
                     family=p.one_of("family", f"ipv{ipaddress.ip_address(a).version}"),
                     **{p.addr_field(a, "daddr"): p.one_of(p.addr_field(a, "daddr"), a)},
                     l4proto=p.one_of("l4proto", proto), dport=p.one_of("dport", port))
               for a, proto, port in sorted(endpoints)]
    start = {**p.not_sockets("output"), "oif": p.one_of("oif", q.upstream_if)}
    r = p.check("kill switch (own output)", q, "output", start,
                p.dropped_or_allowed(allowed + p.link_nd(q)),
                f"to {q.upstream_if} only the tunnel transport leaves (fwmark "
                f"{tun.fwmark:#x} to " + ", ".join(f"{a}:{po}/{pr}"
                                                  for a, pr, po in sorted(endpoints))
                + "), whoever sends it", extra)
    return out + [r]


def endpoint_set(q: QubeView, want: set[tuple[str, str, int]]) -> Result:
    """The kill switch admits exactly the endpoints resolved at `up`, nothing more."""
    from netstack.audit.properties import Result

    got: set[tuple[str, str, int]] = set()
    found = False
    for i in q.ruleset.get("nftables", []):
        s = i.get("set")
        if s and s["name"] in (ENDPOINT_SET, ENDPOINT_SET6):
            found = True
            for e in s.get("elem", []):
                c = e.get("concat") if isinstance(e, dict) else None
                if c:
                    got.add((c[0], c[1], c[2]))
    extra = got - want
    status = "PASS" if found and not extra and got else "FAIL"
    return Result("VPN endpoints exactly as resolved", q.name, status,
                  f"set {ENDPOINT_SET} = {sorted(got)}; resolved {sorted(want)}",
                  {"unexpected": [list(e) for e in sorted(extra)]} if extra else None,
                  [f"{q.name} -> set {ENDPOINT_SET} -> element {a} . {pr} . {po}: not the "
                   "current server's transport" for a, pr, po in sorted(extra)])


def inbound_only_forwarded(q: QubeView, info: VpnInfo) -> Result:
    """Inbound only on the forwarded port, only from the tunnel: what comes in from the
    tunnel is DNATed only on a forwarded public port (static, or an element of the set the
    renewer fills with the gateway's grant), and a new connection from the tunnel is
    forwarded only to its target qube's address and port on that qube's link; nothing new
    from the uplink is forwarded, and nothing new from the tunnel or the uplink reaches
    the VPN qube itself. A new connection starts without NAT status: only this qube's
    prerouting can give it the DNAT the forward rule asks for."""
    from netstack.audit import properties as p
    from netstack.audit.space import Pred

    tun = info.dev
    clients = {c.name: c for c in q.clients}
    fwd = [f for f in info.forwards if f.qube in clients]
    public: list[tuple[tuple[str, ...], list[int]]] = []
    for f in fwd:
        ports = [f.public] if f.public else sorted(
            {po for pr, po in portfwd.granted_ports(q.ruleset, f) if pr in f.protos})
        public.append((f.protos, [x for x in ports if x]))
    by_proto: dict[str, set[int]] = {}
    for protos, ports in public:
        for pr in protos:
            by_proto.setdefault(pr, set()).update(ports)
    fwd_ok = [p.box(oif=p.one_of("oif", clients[f.qube].vif),
                    daddr4=p.one_of("daddr4", clients[f.qube].ipv4),
                    l4proto=p.one_of("l4proto", *f.protos), dport=p.one_of("dport", f.port),
                    ct_status=Pred(lambda s: s is not None and "dnat" in s))
              for f in fwd]
    new = p.one_of("ct_state", *p.NEW_FLOWS)
    unnatted = Pred(lambda s: s is None or "dnat" not in s)

    def natted(verdict: str, trace: list, nat: list) -> list | None:
        """Judge: no packet of the region is DNATed (or redirected) at all."""
        return [] if any("dnat" in n or "redirect" in n for n in nat) else None

    # prerouting: from the tunnel, only a forwarded (protocol, public port) is DNATed (the
    # DNAT rewrites the port, so each region is the packets as they arrive)
    pre = {**p.not_sockets("prerouting"), "iif": p.one_of("iif", tun)}
    parts = [("prerouting", {**pre, "l4proto": p.none_of("l4proto", *by_proto)}, natted)]
    parts += [("prerouting", {**pre, "l4proto": p.one_of("l4proto", pr),
                              "dport": p.none_of("dport", *sorted(ports))}, natted)
              for pr, ports in sorted(by_proto.items())]
    parts += [
        # forward: a new connection from the tunnel only to a target's address and port,
        # on its link, with the DNAT only this qube's prerouting gives
        ("forward", {**p.not_sockets("forward"), "iif": p.one_of("iif", tun),
                     "ct_state": new, "ct_status": unnatted}, p.dropped_or_allowed(fwd_ok)),
        ("forward", {**p.not_sockets("forward"), "iif": p.one_of("iif", q.upstream_if),
                     "ct_state": new}, p.accepted),
        ("input", {**p.not_sockets("input"), "iif": p.one_of("iif", tun, q.upstream_if),
                   "ct_state": new}, p.dropped_or_allowed(p.link_nd(q, egress=False)))]
    what = "; ".join(f"{tun} {'+'.join(protos)} port "
                     f"{','.join(map(str, ports)) or '(none granted)'} -> {f.qube}:{f.port}"
                     for (protos, ports), f in zip(public, fwd, strict=True))
    return p.all_of("inbound only on the forwarded port, only from the tunnel", q, parts,
                    (f"new connections come in only as {what}" if fwd else
                     f"no new connection comes in from {tun} or {q.upstream_if}") +
                    f"; nothing new from {q.upstream_if} is forwarded, nothing new reaches "
                    "the VPN qube itself")
