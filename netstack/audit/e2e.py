"""End to end: no packet class from a workstation reaches sys-net's uplink except as VPN
transport. Each class is walked hop by hop through the rulesets (prerouting with its NAT,
the routing decision from the plan's routes and the tunnel's, forward, postrouting with
masquerade); what enters a tunnel becomes a transport packet that must pass the tunnelling
qube's own output. A class ends blocked (a drop or no route), proxied (delivered to a local
socket: the Tor gateway), or on the ISP link, where it must be VPN transport."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
from typing import Any

from netstack.audit.evaluator import Evaluator, Packet, Ruleset
from netstack.audit.properties import Result
from netstack.model import Plan, QubeInfo, Route
from netstack.names import vif
from netstack.roles import role_for


def _net(dst: str):
    if dst in ("default", "default6"):
        return ipaddress.ip_network("0.0.0.0/0" if dst == "default" else "::/0")
    return ipaddress.ip_network(dst, strict=False)


def _route(routes: list[Route], daddr: str) -> str | None:
    """Longest-prefix match; None when nothing routes it."""
    a = ipaddress.ip_address(daddr)
    best, dev = -1, None
    for r in routes:
        net = _net(r.dst)
        if a.version == net.version and a in net and net.prefixlen > best:
            best, dev = net.prefixlen, r.dev
    return dev


class Evaluators(dict):
    """One evaluator per namespace's ruleset, made on first use and shared by all classes."""

    def __init__(self, rulesets: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.rulesets = rulesets

    def __missing__(self, ns: str) -> Evaluator:
        ev = self[ns] = Evaluator(Ruleset(self.rulesets[ns]))
        return ev


def walk(plan: Plan, rulesets: dict[str, dict[str, Any]], ws: QubeInfo, p: Packet,
         endpoints: set[tuple[str, str, int]],
         net: dict[str, dict[str, Any]] | None = None,
         evs: Evaluators | None = None) -> tuple[str, list[str]]:
    """('blocked' | 'proxied' | 'transport' | 'LEAK' | 'elsewhere', trace) for one class."""
    trace: list[str] = []
    q = plan.qube(ws.netvm or "")
    evs = evs if evs is not None else Evaluators(rulesets)
    p = dataclasses.replace(p, iifname=vif(ws.qid), oifname=None)
    for _ in range(16):
        ev = evs[q.netns]
        tun = role_for(q.kind).tunnel(q)
        pre = ev.run_hook("prerouting", p)
        trace.append(f"{q.name}: prerouting {pre.verdict}"
                     + (f" ({pre.trace[-1]})" if pre.trace else ""))
        if pre.verdict != "accept":
            return ("blocked" if pre.verdict == "drop" else "unknown"), trace
        if net:
            local = set(net[q.netns]["addrs"])
        else:
            local = {a.cidr.split("/")[0] for a in plan.addrs if a.ns == q.netns}
        for n in pre.nat:
            if "redirect" in n:
                p = dataclasses.replace(p, daddr=q.ipv4, ct_status=frozenset({"dnat"}),
                                        dport=n["redirect"].get("port", p.dport))
            elif "dnat" in n:
                p = dataclasses.replace(p, daddr=n["dnat"]["addr"],
                                        dport=n["dnat"].get("port", p.dport),
                                        ct_status=frozenset({"dnat"}))
        if p.daddr in local or p.daddr.startswith("127."):
            inp = ev.run_hook("input", p)
            trace.append(f"{q.name}: input {inp.verdict}")
            return ("proxied" if inp.verdict == "accept" else "blocked"), trace
        sysctls = plan.ns(q.netns).sysctls
        fwd_key = "net/ipv4/ip_forward" if p.family == "ipv4" else "net/ipv6/conf/all/forwarding"
        if sysctls.get(fwd_key, "0") != "1":
            trace.append(f"{q.name}: forwarding off")
            return "blocked", trace
        if net:  # the kernel's routes: the tunnel's are there only while it runs
            routes = list(net[q.netns]["routes"])
        else:
            routes = [r for r in plan.routes if r.ns == q.netns]
            if tun:  # the tunnel's routes, set by its post-start hook
                extra = [Route(q.netns, r, tun.dev) for r in tun.routes]
                extra += [Route(q.netns, f"{e[0]}/32", tun.upstream_if) for e in endpoints]
                replaced = {_net(r.dst) for r in extra}
                routes = [r for r in routes if _net(r.dst) not in replaced] + extra
        oif = _route(routes, p.daddr)
        if oif is None:
            trace.append(f"{q.name}: no route to {p.daddr}")
            return "blocked", trace
        p = dataclasses.replace(p, oifname=oif)
        fwd = ev.run_hook("forward", p)
        trace.append(f"{q.name}: forward {p.iifname}->{oif} {fwd.verdict}"
                     + (f" ({fwd.trace[-1]})" if fwd.trace else ""))
        if fwd.verdict != "accept":
            return ("blocked" if fwd.verdict == "drop" else "unknown"), trace
        post = ev.run_hook("postrouting", p)
        if any("masquerade" in n for n in post.nat):
            p = dataclasses.replace(p, saddr=q.ipv4)
        if tun and oif == tun.dev:
            # encapsulated: what leaves now is the tunnel transport, from the VPN process
            for ip, proto, port in sorted(endpoints):
                t = Packet(family="ipv4", oifname=tun.upstream_if, saddr=q.ipv4,
                           daddr=ip, l4proto=proto, dport=port, mark=tun.fwmark,
                           ct_state="new", skuid=0)
                out = ev.run_hook("output", t)
                trace.append(f"{q.name}: tunnel transport to {ip}:{port}/{proto} "
                             f"output {out.verdict}")
                if out.verdict == "accept":
                    p = dataclasses.replace(t, iifname=None, oifname=None)
                    break
            else:
                return "blocked", trace
            oif = tun.upstream_if
        if q.netvm is None:
            if oif != q.upstream_if:
                return "elsewhere", trace
            ok = (p.daddr, p.l4proto, p.dport) in endpoints
            trace.append(f"{q.name}: ISP link {'VPN transport' if ok else 'CLEAR'}")
            return ("transport" if ok else "LEAK"), trace
        if oif != q.upstream_if:
            return "elsewhere", trace  # to another client: the isolation property's case
        p = dataclasses.replace(p, iifname=vif(q.qid), oifname=None, ct_status=frozenset())
        q = plan.qube(q.netvm)
    return "unknown", trace


def end_to_end(plan: Plan, rulesets: dict[str, dict[str, Any]],
               endpoints: set[tuple[str, str, int]],
               net: dict[str, dict[str, Any]] | None = None) -> list[Result]:
    out = []
    evs = Evaluators(rulesets)
    for ws in plan.qubes:
        if role_for(ws.kind).provides_network:
            continue
        chain = plan.chain(ws.name)[1:]
        if not any(role_for(c.kind).tunnel(c) for c in chain):
            continue
        ups = [c.ipv4 for c in chain]
        daddrs = ["198.51.100.80", "198.51.100.53", "10.139.1.1", "203.0.113.99",
                  *[e[0] for e in endpoints], *ups]
        ports = sorted({53, 80, 443, 9040, *[e[2] for e in endpoints]})
        classes = [Packet(family="ipv4", saddr=s, daddr=d, l4proto=l4, dport=pt,
                          tcp_flags=fl, ct_state=ct)
                   for s, d, l4, pt, fl, ct in itertools.product(
                       (ws.ipv4, ups[0]), daddrs, ("tcp", "udp", "icmp", "gre"), ports,
                       (frozenset({"syn"}), frozenset({"ack"}), frozenset({"fin"})),
                       ("new", "invalid"))
                   if (l4 == "tcp" or fl == frozenset({"syn"}))
                   and (l4 in ("tcp", "udp") or pt == 53)]
        classes += [Packet(family="ipv6", saddr="2001:db8::5", daddr="2001:db8::80",
                           l4proto=l4, ct_state="new") for l4 in ("tcp", "udp")]
        tally: dict[str, int] = {}
        fail = None
        for p in classes:
            res, trace = walk(plan, rulesets, ws, p, endpoints, net, evs)
            tally[res] = tally.get(res, 0) + 1
            if res in ("LEAK", "unknown") and fail is None:
                fail = (res, p, trace)
        name = "end to end: only VPN transport on the ISP link"
        if fail:
            status = "FAIL" if fail[0] == "LEAK" else "UNPROVEN"
            out.append(Result(name, ws.name, status, "a class reaches the ISP link in clear"
                              if status == "FAIL" else "a hop was not understood",
                              fail[1].describe(), fail[2], len(classes)))
        else:
            out.append(Result(name, ws.name, "PASS", ", ".join(
                f"{v} {k}" for k, v in sorted(tally.items())) + f" of {len(classes)} classes",
                classes=len(classes)))
    return out
