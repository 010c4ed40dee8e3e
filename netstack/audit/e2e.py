"""End to end: no packet from a workstation reaches sys-net's uplink except as VPN
transport. The whole region of the workstation's possible packets (every field free over
all its classes, the classes of every hop's ruleset and routes together) is walked hop by
hop: prerouting with its NAT, the routing decision (the region split by the route each
destination takes, the kernel's live routes or the plan's and the tunnel's), forward,
postrouting with masquerade; what enters a tunnel becomes the tunnel's transport packet,
which must pass the VPN qube's own output. A class ends blocked (a drop, no route,
forwarding off), proxied (delivered to a local socket: the Tor gateway), or on the ISP link,
where it must be VPN transport."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import MOVES, Evaluator, Explosion, Packet, Ruleset, packet_of
from netstack.audit.properties import Result
from netstack.audit.space import NO_IFACE, Domains, Pred, Unsupported, eq_pred
from netstack.model import Plan, QubeInfo, Route
from netstack.names import vif


def _net(dst: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if dst in ("default", "default6"):
        return ipaddress.ip_network("0.0.0.0/0" if dst == "default" else "::/0")
    return ipaddress.ip_network(dst, strict=False)


def _route_of(routes: list[Route], a: int, version: int) -> str | None:
    """Longest-prefix match; None when nothing routes it."""
    addr = ipaddress.ip_address(a) if version == 4 else ipaddress.IPv6Address(a)
    best, dev = -1, None
    for r in routes:
        net = _net(r.dst)
        if net.version == version and addr in net and net.prefixlen > best:
            best, dev = net.prefixlen, r.dev
    return dev


@dataclass
class Walk:
    plan: Plan
    rulesets: dict[str, Ruleset]
    endpoints: set[tuple[str, str, int]]
    net: dict[str, dict[str, Any]] | None
    ev: Evaluator
    tally: dict[str, int] = field(default_factory=dict)
    fail: tuple[str, Any, list[str]] | None = None
    transport_seen: dict[tuple, str] = field(default_factory=dict)

    def routes(self, q: QubeInfo) -> list[Route]:
        if self.net:  # the kernel's routes: the tunnel's are there only while it runs
            return list(self.net[q.netns]["routes"])
        routes = [r for r in self.plan.routes if r.ns == q.netns]
        tun = q.tunnel
        if tun:  # the tunnel's routes, set by its post-start hook
            extra = [Route(q.netns, r, tun.dev) for r in tun.routes]
            extra += [Route(q.netns, f"{e[0]}/32", tun.upstream_if) for e in self.endpoints]
            replaced = {_net(r.dst) for r in extra}
            routes = [r for r in routes if _net(r.dst) not in replaced] + extra
        return routes

    def local(self, q: QubeInfo) -> set[int]:
        if self.net:
            addrs = self.net[q.netns]["addrs"]
        else:
            addrs = [a.cidr.split("/")[0] for a in self.plan.addrs if a.ns == q.netns]
        return {int(ipaddress.ip_address(a)) for a in addrs}

    def end(self, what: str, trace: list[str], taint: list[str]) -> None:
        w = self.ev.point()
        if w is None:
            return
        self.tally[what] = self.tally.get(what, 0) + 1
        if what == "LEAK" and not taint and isinstance(w, dict):
            self.fail = ("FAIL", packet_of(w), trace)
            raise Done
        if (what in ("LEAK", "unknown") or taint) and self.fail is None:
            self.fail = ("UNPROVEN", packet_of(w) if isinstance(w, dict) else None,
                         trace + [f"not understood: {'; '.join(taint) or 'a hop'}"])

    def set_field(self, f: str, value: Any, then: Callable[[], None]) -> None:
        """Rewrite a field (NAT): the constraints on its old value no longer apply."""
        self.ev.rewrite(f, eq_pred([value]), then)

    def narrowed(self, b: dict[str, Pred], then: Callable[[], None]) -> None:
        u = self.ev.narrow(b)
        if u is None:
            return
        try:
            if self.ev.point() is not None:
                then()
        finally:
            self.ev.restore(u)

    # --- one hop ----------------------------------------------------------------------
    def hop(self, q: QubeInfo, trace: list[str], taint: list[str], depth: int = 0) -> None:
        if depth > 12:
            self.end("unknown", trace + ["too many hops"], taint)
            return
        rs = self.rulesets[q.netns]

        def prerouting(trace: list[str], taint: list[str]) -> None:
            def pre(ev: Evaluator, verdict: str, tr: list, nat: list, tn: list[str]) -> None:
                t = trace + [f"{q.name}: prerouting {verdict}" + (f" ({tr[-1]})" if tr else "")]
                if verdict != "accept":
                    self.end("blocked", t, taint + tn)
                    return
                self.after_nat(q, list(nat), t, taint + tn, depth)
            self.ev.explore("prerouting", {"oif": eq_pred([NO_IFACE])}, pre, rs=rs)

        if not rs.has_hook("ingress"):
            prerouting(trace, taint)
            return

        def ingress(ev: Evaluator, verdict: str, tr: list, nat: list, tn: list[str]) -> None:
            # the device's ingress chains come first: drop ends the packet, fwd sends it
            # out of another device past every other hook here, dup sends a copy so
            t = trace + [f"{q.name}: ingress {verdict}" + (f" ({tr[-1]})" if tr else "")]
            if verdict == "accept":
                prerouting(trace + ([t[-1]] if tr else []), taint + tn)
            elif verdict.startswith(MOVES):
                dev = verdict.split(" ", 1)[1]
                self.set_field("oif", dev, lambda: self.leave(q, dev, t, taint + tn, depth,
                                                              egress=False))
            else:
                self.end("blocked", t, taint + tn)
        self.ev.explore("ingress", {"oif": eq_pred([NO_IFACE])}, ingress, rs=rs)

    def after_nat(self, q: QubeInfo, nat: list, trace: list[str], taint: list[str],
                  depth: int) -> None:
        if nat:
            n = nat.pop(0)
            kind, arg = next(iter(n.items()))
            fam = self.family()
            d = f"daddr{6 if fam == 'ipv6' else 4}"
            if kind == "redirect":
                addr = q.ipv6 if fam == "ipv6" else q.ipv4
                port = (arg or {}).get("port")

                def go() -> None:
                    self.after_nat(q, nat, trace, taint, depth)
                status = frozenset({"dnat"})
                self.set_field(d, int(ipaddress.ip_address(addr)), lambda: self.set_field(
                    "ct_status", status, (lambda: self.set_field("dport", port, go))
                    if port else go))
                return
            if kind == "dnat":
                port = arg.get("port")

                def go2() -> None:
                    self.after_nat(q, nat, trace, taint, depth)
                self.set_field(d, int(ipaddress.ip_address(arg["addr"])), lambda:
                               self.set_field("ct_status", frozenset({"dnat"}),
                                              (lambda: self.set_field("dport", port, go2))
                                              if port else go2))
                return
            self.after_nat(q, nat, trace, taint, depth)  # snat/masquerade in prerouting: n/a
            return
        fam = self.family()
        d = f"daddr{6 if fam == 'ipv6' else 4}"
        local = frozenset(self.local(q))
        # delivered here: the Tor gateway's proxies (or nothing listening)
        self.narrowed({d: Pred(lambda a, s=local: a in s or (fam == "ipv4" and a >> 24 == 127))},
                      lambda: self.input(q, trace, taint))
        self.narrowed({d: Pred(lambda a, s=local: a not in s and not
                               (fam == "ipv4" and a >> 24 == 127))},
                      lambda: self.route(q, fam, d, trace, taint, depth))

    def family(self) -> str:
        f = self.ev.box["family"]
        return "ipv4" if f.test("ipv4") else "ipv6"

    def input(self, q: QubeInfo, trace: list[str], taint: list[str]) -> None:
        def leaf(ev, verdict, tr, nat, tn) -> None:
            self.end("proxied" if verdict == "accept" else "blocked",
                     trace + [f"{q.name}: input {verdict}"], taint + tn)
        self.ev.explore("input", {}, leaf, rs=self.rulesets[q.netns])

    def route(self, q: QubeInfo, fam: str, d: str, trace: list[str], taint: list[str],
              depth: int) -> None:
        key = "net/ipv4/ip_forward" if fam == "ipv4" else "net/ipv6/conf/all/forwarding"
        if self.plan.ns(q.netns).sysctls.get(key, "0") != "1":
            self.end("blocked", trace + [f"{q.name}: forwarding off"], taint)
            return
        routes = self.routes(q)
        version = 6 if fam == "ipv6" else 4
        devs = sorted({r.dev for r in routes})
        self.narrowed({d: Pred(lambda a: _route_of(routes, a, version) is None)},
                      lambda: self.end("blocked", trace + [f"{q.name}: no route"], taint))
        for dev in devs:
            self.narrowed({d: Pred(lambda a, dv=dev: _route_of(routes, a, version) == dv)},
                          lambda dv=dev: self.forward(q, dv, trace, taint, depth))

    def forward(self, q: QubeInfo, oif: str, trace: list[str], taint: list[str],
                depth: int) -> None:
        rs = self.rulesets[q.netns]

        def fwd(ev, verdict, tr, nat, tn) -> None:
            iif = self.ev.box["iif"].exact
            t = trace + [f"{q.name}: forward {min(iif) if iif else '?'}->{oif} {verdict}"
                         + (f" ({tr[-1]})" if tr else "")]
            if verdict != "accept":
                self.end("blocked", t, taint + tn)
                return

            def post(ev2, v2, tr2, nat2, tn2) -> None:
                if v2 != "accept":
                    self.end("blocked", t + [f"{q.name}: postrouting drop"], taint + tn + tn2)
                    return
                if any("masquerade" in n or "snat" in n for n in nat2):
                    fam = self.family()
                    s = f"saddr{6 if fam == 'ipv6' else 4}"
                    src = q.ipv6 if fam == "ipv6" else q.ipv4
                    self.set_field(s, int(ipaddress.ip_address(src or "::")), lambda:
                                   self.leave(q, oif, t, taint + tn + tn2, depth))
                else:
                    self.leave(q, oif, t, taint + tn + tn2, depth)
            self.ev.explore("postrouting", {}, post, rs=rs)
        u = self.ev.box.get("oif")
        self.ev.box["oif"] = eq_pred([oif])
        try:
            # forwarding takes one off the TTL before the hook: no value carried over
            self.ev.rewrite("ttl", Pred(lambda v: True),
                            lambda: self.ev.explore("forward", {}, fwd, rs=rs))
        finally:
            if u is None:
                self.ev.box.pop("oif", None)
            else:
                self.ev.box["oif"] = u

    def leave(self, q: QubeInfo, oif: str, trace: list[str], taint: list[str],
              depth: int, egress: bool = True) -> None:
        """Out of `oif`: first its egress chains (not for what a fwd or dup sent: the
        kernel skips egress for those), then into the tunnel, the next qube or the ISP."""
        rs = self.rulesets[q.netns]
        if egress and rs.has_hook("egress"):
            def eg(ev: Evaluator, verdict: str, tr: list, nat: list, tn: list[str]) -> None:
                t = trace + [f"{q.name}: egress {oif} {verdict}" + (f" ({tr[-1]})" if tr
                                                                     else "")]
                if verdict == "accept":
                    self.leave(q, oif, trace, taint + tn, depth, egress=False)
                elif verdict.startswith(MOVES):
                    dev = verdict.split(" ", 1)[1]
                    self.set_field("oif", dev, lambda: self.leave(q, dev, t, taint + tn,
                                                                  depth, egress=False))
                else:
                    self.end("blocked", t, taint + tn)
            self.ev.explore("egress", {"oif": eq_pred([oif])}, eg, rs=rs)
            return
        tun = q.tunnel
        if tun and oif == tun.dev:
            self.encapsulate(q, tun, trace, taint, depth)
            return
        if oif != q.upstream_if:
            self.end("elsewhere", trace, taint)  # to another client: the isolation property
            return
        if q.netvm is None:
            self.at_isp(trace + [f"{q.name}: ISP link"], taint)
            return
        nxt = self.plan.qube(q.netvm)
        # into the next namespace: a new input link, no output yet, the mark scrubbed, its
        # own conntrack (no NAT status)
        # own conntrack (no NAT status, a new connection's ct mark where it has one)
        self.ev.rewrite("ctmark", eq_pred([0, None]), lambda: self.fields(
            {"iif": vif(q.qid), "oif": NO_IFACE, "mark": 0, "ct_status": frozenset()},
            lambda: self.hop(nxt, trace, taint, depth + 1)))

    def fields(self, values: dict[str, Any], then: Callable[[], None]) -> None:
        if not values:
            then()
            return
        f, v = next(iter(values.items()))
        rest = {k: x for k, x in values.items() if k != f}
        self.set_field(f, v, lambda: self.fields(rest, then))

    def at_isp(self, trace: list[str], taint: list[str]) -> None:
        """On the uplink only the VPN transport may be seen."""
        ok = [{"family": eq_pred([f"ipv{ipaddress.ip_address(a).version}"]),
               f"daddr{ipaddress.ip_address(a).version}":
                   eq_pred([int(ipaddress.ip_address(a))]),
               "l4proto": eq_pred([{"udp": 17, "tcp": 6}[pr]]), "dport": eq_pred([po])}
              for a, pr, po in self.endpoints]
        w = self.ev.point(ok)
        if w is None:  # every packet of the class is transport
            self.end("transport", trace[:-1] + [trace[-1] + " VPN transport"], taint)
        else:
            self.end("LEAK", trace[:-1] + [trace[-1] + " CLEAR"], taint)

    def encapsulate(self, q: QubeInfo, tun: Any, trace: list[str], taint: list[str],
                    depth: int) -> None:
        """What leaves now is the tunnel's transport, sent by the VPN process: each
        endpoint's packet, walked on its own (the inner class no longer shows)."""
        for ip, proto, port in sorted(self.endpoints):
            key = (q.name, ip, proto, port)
            res = self.transport_seen.get(key)
            if res is None:
                res = self.transport_seen[key] = self.outer(q, tun, ip, proto, port)
            if res == "transport":
                self.end("transport", trace + [f"{q.name}: into {tun.dev}, out as transport "
                                               f"to {ip}:{port}/{proto}"], taint)
                return
        self.end("blocked", trace + [f"{q.name}: into {tun.dev}: no transport passes"], taint)

    def outer(self, q: QubeInfo, tun: Any, ip: str, proto: str, port: int) -> str:
        p = Packet(family="ipv4", oifname=tun.upstream_if, saddr=q.ipv4, daddr=ip,
                   l4proto=proto, dport=port, sport=40000, mark=tun.fwmark, ct_state="new",
                   skuid=0, skgid=0)
        ev = Evaluator(self.rulesets[q.netns], self.ev.domains)
        o = ev.run_hook("output", p)
        if o.verdict != "accept":
            return "blocked"
        sub = Walk(self.plan, self.rulesets, self.endpoints, self.net, ev)
        box = p.box()
        box["iif"] = eq_pred([vif(q.qid)])
        box["oif"] = eq_pred([NO_IFACE])
        box["skuid"] = box["skgid"] = eq_pred([None])
        u = ev.narrow(box)
        try:
            if q.netvm is None:
                sub.at_isp([], [])
            else:
                sub.hop(self.plan.qube(q.netvm), [], [])
        except Done:
            pass
        finally:
            if u is not None:
                ev.restore(u)
        if sub.fail and sub.fail[0] == "FAIL":
            return "LEAK"
        return "transport" if sub.tally.get("transport") else "blocked"


class Done(Exception):
    pass


def chain_evaluator(plan: Plan, compiled: dict[str, Ruleset], endpoints: Any,
                    net: Any, ws: QubeInfo, chain: list[QubeInfo]) -> Evaluator:
    """An evaluator over the domains of every ruleset on `ws`'s path (`chain`: its netvms
    up to the uplink), with the plan's constants and every link of the path named."""
    doms = Domains()
    for c in chain:
        doms.merge(compiled[c.netns].domains)
    constants(doms, plan, chain, endpoints, net)
    for c in chain:
        doms.name("iif", vif(c.qid))
    doms.name("iif", vif(ws.qid))
    return Evaluator(None, doms)


def walk_from(ev: Evaluator, w: Walk, plan: Plan, ws: QubeInfo) -> None:
    """Every packet workstation `ws` can send from its own link (no socket of the netvm's,
    no output interface yet), walked hop by hop with `w` until it ends; a walker's Done
    ends it early. Explosion / Unsupported go to the caller (UNPROVEN)."""
    start = {"iif": eq_pred([vif(ws.qid)]), "oif": eq_pred([NO_IFACE]),
             "skuid": eq_pred([None]), "skgid": eq_pred([None])}
    try:
        u = ev.narrow(start)
        try:
            w.hop(plan.qube(ws.netvm or ""), [], [])
        finally:
            if u is not None:
                ev.restore(u)
    except Done:
        pass


def end_to_end(plan: Plan, rulesets: dict[str, dict[str, Any]],
               endpoints: set[tuple[str, str, int]],
               net: dict[str, dict[str, Any]] | None = None) -> list[Result]:
    out = []
    compiled = {ns: Ruleset(rs) for ns, rs in rulesets.items()}
    for ws in plan.qubes:
        if ws.traits.provides_network:
            continue
        chain = plan.chain(ws.name)[1:]
        if not any(c.tunnel for c in chain):
            continue
        ev = chain_evaluator(plan, compiled, endpoints, net, ws, chain)
        w = Walk(plan, compiled, endpoints, net, ev)
        name = "end to end: only VPN transport on the ISP link"
        try:
            walk_from(ev, w, plan, ws)
        except (Explosion, Unsupported) as e:
            out.append(Result(name, ws.name, "UNPROVEN", f"not understood: {e}"))
            continue
        n = sum(w.tally.values())
        if w.fail:
            status, pkt, trace = w.fail
            out.append(Result(name, ws.name, status, "a class reaches the ISP link in clear"
                              if status == "FAIL" else "a hop was not understood",
                              pkt.describe() if pkt else None, trace, n))
        else:
            out.append(Result(name, ws.name, "PASS", ", ".join(
                f"{v} {k}" for k, v in sorted(w.tally.items())) + f" of {n} classes",
                classes=n))
    return out


def constants(d: Domains, plan: Plan, chain: list[QubeInfo],
               endpoints: set[tuple[str, str, int]], net: dict[str, dict[str, Any]] | None
               ) -> None:
    """Everything the walk itself compares: routes, local addresses, endpoints."""
    def addr(a: str) -> None:
        n = int(ipaddress.ip_address(a))
        v = ipaddress.ip_address(a).version
        d.interval(f"daddr{v}", n, n)
        d.interval(f"saddr{v}", n, n)

    for q in chain:
        routes = net[q.netns]["routes"] if net else [r for r in plan.routes if r.ns == q.netns]
        tun = q.tunnel
        dsts = [r.dst for r in routes] + (list(tun.routes) if tun else [])
        for dst in dsts:
            n = _net(dst)
            d.interval(f"daddr{n.version}", int(n.network_address), int(n.broadcast_address))
        locals_ = net[q.netns]["addrs"] if net else [a.cidr.split("/")[0] for a in plan.addrs
                                                       if a.ns == q.netns]
        for a in locals_:
            addr(a)
        for a in (q.ipv4, q.ipv6):
            if a:
                addr(a)
    d.interval("daddr4", 127 << 24, (128 << 24) - 1)
    for a, _proto, port in endpoints:
        addr(a)
        d.interval("dport", port, port)
