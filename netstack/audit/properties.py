"""The chain's promises as properties over packet classes, checked on rulesets with the
evaluator. Each returns PASS with the covering reason, FAIL with one concrete
counterexample and its trace, or UNPROVEN when a construct was not understood."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import Evaluator, Outcome, Packet, Ruleset
from netstack.model import Client, Plan, QubeInfo

OUTSIDE4 = ["203.0.113.99", "198.51.100.80", "192.0.2.1", "10.137.0.250", "0.0.0.0",
            "127.0.0.1", "10.139.1.1", "224.0.0.251"]
OUTSIDE6 = ["2001:db8::99", "fe80::99", "fd09:24ef:4179::a89:fa", "::1"]
CT_STATES = ["new", "established", "related", "invalid"]
FLAGS = [frozenset({"syn"}), frozenset({"ack"}), frozenset({"fin"}), frozenset({"rst"}),
         frozenset({"syn", "ack"}), frozenset()]


@dataclass
class QubeView:
    """What the audit knows of one qube: its ruleset (live or generated), its place in the
    chain (from the typed plan) and its interfaces (live when read from the kernel)."""

    qube: QubeInfo
    ruleset: dict[str, Any]
    interfaces: list[str] = field(default_factory=list)
    tunnel: str | None = None

    @property
    def name(self) -> str:
        return self.qube.name

    @property
    def address(self) -> str:
        return self.qube.ipv4

    @property
    def upstream_if(self) -> str:
        return self.qube.upstream_if

    @property
    def clients(self) -> list[Client]:
        return self.qube.clients

    @property
    def own_ll(self) -> str | None:
        from netstack.addressing import qube_ll

        return qube_ll(self.qube.ipv4) if self.qube.ipv6 else None

    @property
    def ipv6(self) -> bool:
        return self.qube.ipv6 is not None


@dataclass
class AuditContext:
    """What the roles' properties may use besides their own qube: every qube's ruleset, the
    endpoints resolved at `up`, and the VPN transport they make."""

    plan: Plan
    rulesets: dict[str, dict[str, Any]]
    resolved: dict[str, dict[str, list[str]]]
    endpoints: set[tuple[str, str, int]]


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


def check(prop: str, q: QubeView, hook: str, packets, bad, reason: str) -> Result:
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


def ifaces(q: QubeView) -> list[str]:
    names = set(q.interfaces) | set(q.qube.interfaces) | {c.vif for c in q.clients}
    if q.tunnel:
        names.add(q.tunnel)
    return sorted(names) + ["other0"]


def constants(q: QubeView, kind: str, hooks: tuple[str, ...] | None = None) -> list[Any]:
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
        r = check("default drop", q, hook, pk, lambda p, o: o.verdict != "drop",
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

    ifs = ifaces(q)
    pk = [Packet(family=f, iifname=i, oifname=o2, saddr=s, daddr=d, l4proto=l4,
                 tcp_flags=fl, ct_state="invalid")
          for f, s, d in (("ipv4", "203.0.113.99", "198.51.100.80"),
                          ("ipv6", "2001:db8::99", "2001:db8::80"))
          for i in ifs for o2 in (ifs[0],) for l4 in ("tcp", "udp")
          for fl in (FLAGS if l4 == "tcp" else FLAGS[:1])]
    for hook in ("prerouting", "output"):
        r = check("INVALID dropped first", q, hook, pk, bad,
                   "ct state invalid is dropped before any accept or NAT")
        if r.status != "PASS":
            return r
    return Result("INVALID dropped first", q.name, "PASS",
                  "ct state invalid is dropped in prerouting and output before any accept or "
                  "NAT", classes=2 * len(pk))


def antispoof(q: QubeView) -> list[Result]:
    out = []
    addrs4 = sorted(set(OUTSIDE4 + constants(q, "addr", ("prerouting",)) + [q.address]
                        + [c.ipv4 for c in q.clients]))
    addrs6 = sorted(set(OUTSIDE6 + [a for c in q.clients for a in (c.ipv6, c.ll) if a]
                        + [a for a in (q.qube.ipv6, q.own_ll) if a]))
    for c in q.clients:
        name, vif, v4 = c.name, c.vif, c.ipv4
        own6 = {a for a in (c.ipv6, c.ll) if a}
        pk = [Packet(family="ipv4", iifname=vif, saddr=s, daddr="198.51.100.80",
                     l4proto=l4, ct_state=ct)
              for s in addrs4 if s != v4 for l4 in ("tcp", "udp", "icmp")
              for ct in ("new", "established")]
        pk += [Packet(family="ipv6", iifname=vif, saddr=s, daddr="2001:db8::80", l4proto=l4,
                      ct_state=ct)
               for s in addrs6 if s not in own6 for l4 in ("tcp", "udp", "icmpv6")
               for ct in ("new", "established")]
        six = (f"only {', '.join(sorted(own6))} (IPv6)" if own6 else "no IPv6")
        out.append(check(f"anti-spoofing {name}", q, "prerouting", pk,
                          lambda p, o: o.verdict != "drop",
                          f"on {vif} only {v4} (IPv4) and {six} pass prerouting; every other "
                          "source is dropped"))
    return out


def no_client_to_client(q: QubeView) -> Result | None:
    if len(q.clients) < 2:
        return None
    pk = [Packet(family=f, iifname=a.vif, oifname=b.vif,
                 saddr=a.ipv4 if f == "ipv4" else "fe80::1",
                 daddr=b.ipv4 if f == "ipv4" else "fe80::2", l4proto=l4, ct_state=ct)
          for a in q.clients for b in q.clients if a != b for f in ("ipv4", "ipv6")
          for l4 in ("tcp", "udp", "icmp") for ct in ("new", "invalid")]
    return check("no path between clients", q, "forward", pk,
                  lambda p, o: o.verdict == "accept",
                  "no connection from one client link to another can be opened (replies need "
                  "one)")


def no_ipv6_egress(q: QubeView) -> Result:
    outs = [q.upstream_if] + ([q.tunnel] if q.tunnel else [])
    pk = [Packet(family="ipv6", iifname=i, oifname=o, saddr="2001:db8::5",
                 daddr="2001:db8::80", l4proto=l4, ct_state=ct)
          for i in ifaces(q) for o in outs for l4 in ("tcp", "udp", "icmpv6")
          for ct in CT_STATES]
    for hook in ("forward", "output"):
        r = check("no IPv6 egress", q, hook, pk, lambda p, o: o.verdict == "accept",
                   "IPv6 is dropped in forward and output")
        if r.status != "PASS":
            return r
    return Result("no IPv6 egress", q.name, "PASS", "IPv6 never leaves through forward or "
                  "output", classes=2 * len(pk))


def socket_owners(q: QubeView) -> list[int | None]:
    """Socket owners an output-hook class may have."""
    return [0]


def for_qube(q: QubeView, ctx: AuditContext) -> list[Result]:
    from netstack.roles import role_for

    return role_for(q.qube.kind).audit(q, ctx)


def all_results(views: list[QubeView], ctx: AuditContext) -> list[Result]:
    return list(itertools.chain.from_iterable(for_qube(q, ctx) for q in views))
