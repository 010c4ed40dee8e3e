"""The chain's promises as properties over packet classes, checked on rulesets with the
evaluator. Each returns PASS with the covering reason, FAIL with one concrete
counterexample and its trace, or UNPROVEN when a construct was not understood."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import Evaluator, Outcome, Packet, Ruleset

OUTSIDE4 = ["203.0.113.99", "198.51.100.80", "192.0.2.1", "10.137.0.250", "0.0.0.0",
            "127.0.0.1", "10.139.1.1", "224.0.0.251"]
OUTSIDE6 = ["2001:db8::99", "fe80::99", "fd09:24ef:4179::a89:fa", "::1"]
CT_STATES = ["new", "established", "related", "invalid"]
FLAGS = [frozenset({"syn"}), frozenset({"ack"}), frozenset({"fin"}), frozenset({"rst"}),
         frozenset({"syn", "ack"}), frozenset()]


@dataclass
class QubeView:
    """What the audit knows of one qube: its live ruleset and its place in the chain."""

    name: str
    kind: str
    netns: str
    ruleset: dict[str, Any]
    address: str
    upstream_if: str
    clients: list[tuple[str, str, str, str | None]]  # name, vif, ipv4, ipv6
    tunnel: str | None = None
    fwmark: int | None = None
    tor_uid: int | None = None
    trans_port: int = 9040
    dns_port: int = 5400
    interfaces: list[str] = field(default_factory=list)


@dataclass
class Result:
    property: str
    qube: str
    status: str  # PASS | FAIL | UNPROVEN
    reason: str
    counterexample: dict[str, Any] | None = None
    trace: list[str] = field(default_factory=list)
    classes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check(prop: str, q: QubeView, hook: str, packets, bad, reason: str) -> Result:
    """Evaluate every packet at `hook`; bad(packet, outcome) says it breaks the property."""
    ev = Evaluator(Ruleset(q.ruleset))
    n = 0
    unproven = None
    for p in packets:
        n += 1
        if hook == "forward":
            # only classes that can get here: not dropped in prerouting, not redirected or
            # DNATed to a local socket (those meet input instead)
            pre = ev.run_hook("prerouting", p)
            if pre.verdict == "drop" or any("redirect" in x for x in pre.nat):
                continue
        o = ev.run_hook(hook, p)
        if o.verdict == "unknown":
            unproven = unproven or (p, o)
            continue
        if bad(p, o):
            return Result(prop, q.name, "FAIL", f"{hook}: {o.verdict}", p.describe(),
                          [f"{q.name} -> {hook} -> {s}" for s in o.trace], n)
    if unproven:
        p, o = unproven
        return Result(prop, q.name, "UNPROVEN", "not understood: " + "; ".join(o.unknown[:3]),
                      p.describe(), [f"{q.name} -> {hook} -> {s}" for s in o.trace], n)
    return Result(prop, q.name, "PASS", reason, classes=n)


def _ifaces(q: QubeView) -> list[str]:
    names = set(q.interfaces) | {q.upstream_if} | {c[1] for c in q.clients}
    if q.tunnel:
        names.add(q.tunnel)
    return sorted(names) + ["other0"]


def _constants(q: QubeView, kind: str, hooks: tuple[str, ...] | None = None) -> list[Any]:
    """Every address or port the ruleset compares against (one class each); with `hooks`,
    only in the chains a packet at those hooks can reach (base chains of the hook and every
    regular chain), which keeps the classes of a 10,000-rule ruleset few."""
    out: set[Any] = set()
    if hooks is not None:
        base = {c["chain"]["name"]: c["chain"].get("hook") for c in q.ruleset["nftables"]
                if "chain" in c}
        items = [i for i in q.ruleset["nftables"] if "set" in i or (
            "rule" in i and (base.get(i["rule"]["chain"]) in hooks
                             or base.get(i["rule"]["chain"]) is None))]
        doc: Any = {"nftables": items}
    else:
        doc = q.ruleset

    def walk(x: Any, key: str | None = None) -> None:
        if isinstance(x, dict):
            if "prefix" in x and kind == "addr":
                out.add(x["prefix"]["addr"])
            for k, v in x.items():
                walk(v, k)
        elif isinstance(x, list):
            for v in x:
                walk(v, key)
        elif _is_const(x, kind, key):
            out.add(x)
    walk(doc)
    return sorted(out, key=str)


def _is_const(x: Any, kind: str, key: str | None) -> bool:
    if kind == "addr":
        return isinstance(x, str) and x.count(".") == 3 and x.replace(".", "").isdigit()
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x < 65536 and key != "len"


def default_drop(q: QubeView) -> Result:
    pk = [Packet(iifname="other0", oifname="other0", saddr="203.0.113.99",
                 daddr="203.0.113.98", l4proto=l4, ct_state="new", dport=44444)
          for l4 in ("tcp", "udp", "icmp", "gre")]
    for hook in ("input", "forward", "output"):
        r = _check("default drop", q, hook, pk, lambda p, o: o.verdict != "drop",
                   "unmatched traffic meets a drop policy")
        if r.status != "PASS":
            return r
    return Result("default drop", q.name, "PASS",
                  "input, forward and output drop whatever no rule accepts", classes=12)


def invalid_first(q: QubeView) -> Result:
    def bad(p: Packet, o: Outcome) -> bool:
        if o.verdict != "drop":
            return True
        return any(s.action in ("accept",) or s.action in ("dnat", "redirect", "masquerade")
                   for s in o.trace[:-1])

    ifs = _ifaces(q)
    pk = [Packet(family=f, iifname=i, oifname=o2, saddr=s, daddr=d, l4proto=l4,
                 tcp_flags=fl, ct_state="invalid")
          for f, s, d in (("ipv4", "203.0.113.99", "198.51.100.80"),
                          ("ipv6", "2001:db8::99", "2001:db8::80"))
          for i in ifs for o2 in (ifs[0],) for l4 in ("tcp", "udp")
          for fl in (FLAGS if l4 == "tcp" else FLAGS[:1])]
    for hook in ("prerouting", "output"):
        r = _check("INVALID dropped first", q, hook, pk, bad,
                   "ct state invalid is dropped before any accept or NAT")
        if r.status != "PASS":
            return r
    return Result("INVALID dropped first", q.name, "PASS",
                  "ct state invalid is dropped in prerouting and output before any accept or "
                  "NAT", classes=2 * len(pk))


def antispoof(q: QubeView) -> list[Result]:
    out = []
    addrs4 = sorted(set(OUTSIDE4 + _constants(q, "addr", ("prerouting",)) + [q.address]
                        + [c[2] for c in q.clients]))
    for name, vif, v4, v6 in q.clients:
        pk = [Packet(family="ipv4", iifname=vif, saddr=s, daddr="198.51.100.80",
                     l4proto=l4, ct_state=ct)
              for s in addrs4 if s != v4 for l4 in ("tcp", "udp", "icmp")
              for ct in ("new", "established")]
        pk += [Packet(family="ipv6", iifname=vif, saddr=s, daddr="2001:db8::80", l4proto=l4,
                      ct_state=ct)
               for s in OUTSIDE6 if s != v6 for l4 in ("tcp", "udp")
               for ct in ("new", "established")]
        out.append(_check(f"anti-spoofing {name}", q, "prerouting", pk,
                          lambda p, o: o.verdict != "drop",
                          f"on {vif} only {v4} (IPv4) passes prerouting; other IPv4 and all "
                          "IPv6 sources are dropped"))
    return out


def no_client_to_client(q: QubeView) -> Result | None:
    if len(q.clients) < 2:
        return None
    pk = [Packet(family=f, iifname=a[1], oifname=b[1], saddr=a[2] if f == "ipv4" else "fe80::1",
                 daddr=b[2] if f == "ipv4" else "fe80::2", l4proto=l4, ct_state=ct)
          for a in q.clients for b in q.clients if a != b for f in ("ipv4", "ipv6")
          for l4 in ("tcp", "udp", "icmp") for ct in ("new", "invalid")]
    return _check("no path between clients", q, "forward", pk,
                  lambda p, o: o.verdict == "accept",
                  "no connection from one client link to another can be opened (replies need "
                  "one)")


def no_ipv6_egress(q: QubeView) -> Result:
    outs = [q.upstream_if] + ([q.tunnel] if q.tunnel else [])
    pk = [Packet(family="ipv6", iifname=i, oifname=o, saddr="2001:db8::5",
                 daddr="2001:db8::80", l4proto=l4, ct_state=ct)
          for i in _ifaces(q) for o in outs for l4 in ("tcp", "udp", "icmpv6")
          for ct in CT_STATES]
    for hook in ("forward", "output"):
        r = _check("no IPv6 egress", q, hook, pk, lambda p, o: o.verdict == "accept",
                   "IPv6 is dropped in forward and output")
        if r.status != "PASS":
            return r
    return Result("no IPv6 egress", q.name, "PASS", "IPv6 never leaves through forward or "
                  "output", classes=2 * len(pk))


def kill_switch(q: QubeView, endpoints: set[tuple[str, str, int]]) -> list[Result]:
    assert q.tunnel and q.fwmark is not None
    fwd = [Packet(iifname=c[1], oifname=o, saddr=c[2], daddr=d, l4proto=l4, ct_state=ct)
           for c in q.clients for o in _ifaces(q) if o != q.tunnel
           for d in ["198.51.100.80"] + [e[0] for e in endpoints]
           for l4 in ("tcp", "udp", "icmp") for ct in CT_STATES]
    r1 = _check("kill switch (forward)", q, "forward", fwd, lambda p, o: o.verdict == "accept",
                f"client traffic is forwarded only into {q.tunnel}")
    daddrs = sorted(set(OUTSIDE4 + [e[0] for e in endpoints]
                        + _constants(q, "addr", ("output",))))
    ports = sorted(set([e[2] for e in endpoints] + [53, 443, 40000]))
    out = [Packet(oifname=q.upstream_if, saddr=q.address, daddr=d, l4proto=l4, dport=pt,
                  mark=m, ct_state=ct, skuid=0)
           for d in daddrs for l4 in ("tcp", "udp", "icmp") for pt in ports
           for m in (0, q.fwmark) for ct in ("new", "established")]

    def bad_out(p: Packet, o: Outcome) -> bool:
        ok = p.mark == q.fwmark and (p.daddr, p.l4proto, p.dport) in endpoints
        return o.verdict == "accept" and not ok
    r2 = _check("kill switch (own output)", q, "output", out, bad_out,
                f"to {q.upstream_if} only the tunnel transport leaves (fwmark {q.fwmark:#x} to "
                + ", ".join(f"{a}:{po}/{pr}" for a, pr, po in sorted(endpoints)) + ")")
    return [r1, r2]


def tor_gateway(q: QubeView) -> list[Result]:
    assert q.tor_uid is not None
    fwd = [Packet(iifname=c[1], oifname=o, saddr=c[2], daddr=d, l4proto=l4, ct_state=ct,
                  tcp_flags=fl)
           for c in q.clients for o in _ifaces(q) for d in ("198.51.100.80", "10.137.0.1")
           for l4 in ("tcp", "udp", "icmp", "gre") for ct in CT_STATES
           for fl in (FLAGS if l4 == "tcp" else FLAGS[:1])]
    r1 = _check("Tor gateway forwards nothing", q, "forward", fwd,
                lambda p, o: o.verdict == "accept", "nothing from clients is ever forwarded")
    ports = sorted(set(_constants(q, "port", ("input", "prerouting"))
                       + [22, 53, 9050, 9051, q.trans_port, q.dns_port]))
    inp = [Packet(iifname=c[1], saddr=c[2], daddr=q.address, l4proto=l4, dport=pt,
                  ct_state="new", ct_status=st)
           for c in q.clients for l4 in ("tcp", "udp", "icmp") for pt in ports
           for st in (frozenset(), frozenset({"dnat"}))]

    def bad_in(p: Packet, o: Outcome) -> bool:
        ok = "dnat" in p.ct_status and ((p.l4proto, p.dport) in
                                         (("tcp", q.trans_port), ("udp", q.dns_port)))
        return o.verdict == "accept" and not ok
    r2 = _check("only TransPort and DNSPort from clients", q, "input", inp, bad_in,
                f"clients reach only redirected TCP to {q.trans_port} and DNS to {q.dns_port}")
    ctl = [p for p in inp if p.dport in (9050, 9051)]
    r3 = _check("control port unreachable", q, "input", ctl,
                lambda p, o: o.verdict == "accept",
                "no TCP port 9050/9051 from clients (the control port is a unix socket)")
    outp = [Packet(oifname=q.upstream_if, saddr=q.address, daddr=d, l4proto=l4, dport=443,
                   ct_state=ct, skuid=u)
            for d in ("203.0.113.41", "198.51.100.80") for l4 in ("tcp", "udp")
            for ct in ("new", "established") for u in (0, 1000, q.tor_uid, None)]
    r4 = _check("gateway output only from tor", q, "output", outp,
                lambda p, o: o.verdict == "accept" and p.skuid != q.tor_uid,
                f"to {q.upstream_if} only processes of uid {q.tor_uid} (tor) send")
    syn = [Packet(iifname=c[1], saddr=c[2], daddr="198.51.100.80", l4proto="tcp", dport=80,
                  ct_state="new", tcp_flags=fl) for c in q.clients for fl in FLAGS]
    ev = Evaluator(Ruleset(q.ruleset))

    def redirected(p: Packet) -> bool:
        o = ev.run_hook("prerouting", p)
        return any(s.action == "redirect" for s in o.trace)
    wrong = [p for p in syn if redirected(p) != (p.tcp_flags == frozenset({"syn"}))]
    r5 = Result("only new SYNs are redirected", q.name, "PASS" if not wrong else "FAIL",
                "a TCP packet is redirected to TransPort only if it is a bare SYN",
                wrong[0].describe() if wrong else None, classes=len(syn))
    return [r1, r2, r3, r4, r5]


def for_qube(q: QubeView, endpoints: set[tuple[str, str, int]]) -> list[Result]:
    res = [default_drop(q), invalid_first(q), no_ipv6_egress(q)]
    if q.kind != "app":
        res += antispoof(q)
        r = no_client_to_client(q)
        if r:
            res.append(r)
    if q.kind == "vpn":
        res += kill_switch(q, endpoints)
    if q.kind == "tor":
        res += tor_gateway(q)
    return res


def all_results(views: list[QubeView], endpoints: set[tuple[str, str, int]]) -> list[Result]:
    return list(itertools.chain.from_iterable(for_qube(q, endpoints) for q in views))
