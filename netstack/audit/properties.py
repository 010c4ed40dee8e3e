"""The chain's promises as properties over regions of the packet space, checked on
rulesets with the evaluator. A property names the hook, the packets it is about (a box:
some fields fixed, every other field free over all its classes) and, per verdict, the
packets allowed to get it. PASS: no class anywhere breaks it; FAIL: one concrete
counterexample and its trace; UNPROVEN: only classes reached through a construct the
evaluator does not model (named) could break it."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import MOVES, Evaluator, Explosion, Ruleset, Step, packet_of
from netstack.audit.space import (
    CT_STATES,
    FIELDS,
    L4,
    NO_IFACE,
    Box,
    Domains,
    Pred,
    Unsupported,
    eq_pred,
    humanize,
)
from netstack.model import Client, Plan, QubeInfo

OUTSIDE4 = ["203.0.113.99", "198.51.100.80", "192.0.2.1", "10.137.0.250", "0.0.0.0",
            "127.0.0.1", "10.139.1.1", "224.0.0.251"]
OUTSIDE6 = ["2001:db8::99", "fe80::99", "fd09:24ef:4179::a89:fa", "::1"]
NEW_FLOWS = ["new", "untracked"]  # what opens a connection (or is never tracked)


# --- boxes in the properties' own words ------------------------------------------------------

def _val(f: str, v: Any) -> Any:
    if f in ("saddr4", "daddr4", "saddr6", "daddr6") and isinstance(v, str):
        return int(ipaddress.ip_address(v))
    if f == "l4proto" and isinstance(v, str):
        return L4[v]
    if f in ("tcp_flags", "ct_status") and v is not None and not isinstance(v, frozenset):
        return frozenset(v)
    return v


def one_of(f: str, *values: Any) -> Pred:
    return eq_pred(_val(f, v) for v in values)


def none_of(f: str, *values: Any) -> Pred:
    vals = frozenset(_val(f, v) for v in values)
    return Pred(lambda x, s=vals: x not in s)


def box(**fields: Pred) -> Box:
    return dict(fields)


def addr_field(addr: str, which: str) -> str:
    return f"{which}{ipaddress.ip_address(addr).version}"


# --- views and results ----------------------------------------------------------------------

@dataclass
class QubeView:
    """What the audit knows of one qube: its ruleset (live or generated), its place in the
    chain (from the typed plan) and its interfaces (live when read from the kernel)."""

    qube: QubeInfo
    ruleset: dict[str, Any]
    interfaces: list[str] = field(default_factory=list)
    tunnel: str | None = None
    # a ruleset from a file: the host's addresses are unknown, so any destination may be
    # local (input) or not (forward), and a redirect may go to any of them
    local_any: bool = False
    _ev: Evaluator | None = field(default=None, repr=False)
    _lean: Ruleset | None = field(default=None, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

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

    def prefer(self, hook: str) -> dict[str, list[Any]]:
        """Readable witnesses: this qube's clients as sources, itself as the destination of
        input (a counterexample replays in the kernel as it reads)."""
        srcs = [int(ipaddress.ip_address(c.ipv4)) for c in self.clients]
        out: dict[str, list[Any]] = {"saddr4": srcs + [int(ipaddress.ip_address(self.address))]}
        if hook == "input":
            out["daddr4"] = [int(ipaddress.ip_address(self.address))]
        if self.qube.ipv6:
            out["saddr6"] = [int(ipaddress.ip_address(c.ipv6)) for c in self.clients if c.ipv6]
            if hook == "input":
                out["daddr6"] = [int(ipaddress.ip_address(self.qube.ipv6))]
        return out

    def cached(self, what: str, make: Callable[[], Any]) -> Any:
        """Something derived from this view's ruleset, made once (every client's property
        in a netvm shares it)."""
        if what not in self._cache:
            self._cache[what] = make()
        return self._cache[what]

    def lean(self) -> Ruleset:
        """The ruleset as the hooks after prerouting see it, over-approximated: a jump from
        a prerouting base chain into a chain of plain verdicts (a qube's rule list), with
        nothing but plain verdicts after it, becomes `accept`, so the list's thousand
        classes are one. A superset of the packets reach input and forward, unchanged, so
        a property about what passes there stays sound (it may only get stricter)."""
        if self._lean is None:
            self._lean = Ruleset(collapse_lists(self.ruleset))
        return self._lean

    def evaluator(self) -> Evaluator:
        """One evaluator per view: the ruleset compiled once, its domains holding every
        constant of the ruleset and of this qube's place in the chain."""
        if self._ev is None:
            self._ev = Evaluator(Ruleset(self.ruleset), self.domains())
        return self._ev

    def domains(self) -> Domains:
        d = Domains()
        for n in set(ifaces(self)) | {self.tunnel or ""} - {""}:
            d.name("iif", n)
            d.name("oif", n)
        addrs = [self.address, *(c.ipv4 for c in self.clients), *OUTSIDE4, *OUTSIDE6,
                 *(a for c in self.clients for a in (c.ipv6, c.ll) if a),
                 *(a for a in (self.qube.ipv6, self.own_ll) if a)]
        for a in addrs:
            n = int(ipaddress.ip_address(a))
            for w in ("s", "d"):
                d.interval(addr_field(a, w + "addr"), n, n)
        # the ranges the properties themselves speak of (their classes must exist)
        for net in ("224.0.0.0/4", "255.255.255.255/32", "ff00::/8", "fe80::/10",
                    "ff02::/16"):
            n = ipaddress.ip_network(net)
            d.interval(f"daddr{n.version}", int(n.network_address), int(n.broadcast_address))
        for t in ND_TYPES6:
            d.interval("icmp_type", t, t)
        return d


@dataclass
class AuditContext:
    """What the roles' properties may use besides their own qube: every qube's ruleset, the
    endpoints resolved at `up`, and the VPN transport they make."""

    plan: Plan
    rulesets: dict[str, dict[str, Any]]
    resolved: dict[str, dict[str, list[str]]]
    endpoints: set[tuple[str, str, int]]
    # per-qube rules' run-time data (rules/names.py): netvm -> hostname -> addresses, the
    # stack's `up` time ("+N" expiry) and now (None: generated rulesets, nothing filled yet)
    rule_names: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    started: float = 0.0
    now: float | None = None
    # kind -> its spec, whose `audit` names the qube's properties (handed in by the entry)
    kinds: Mapping[str, Any] = field(default_factory=dict)


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


class _Stop(Exception):
    pass


Judge = Callable[[str, list[Step], list[dict[str, Any]]], list[Box] | None]


def check(prop: str, q: QubeView, hook: str, start: Box, judge: Judge, reason: str,
          extra: Domains | None = None) -> Result:
    """Explore `start` at `hook`. judge(verdict, trace, nat) for each class: None if every
    packet of the class is fine, else the boxes of its packets that are allowed ([]: none
    is): a packet of the class outside them is a counterexample."""
    ev = q.evaluator()
    if extra is not None:
        ev.add(extra)
    from netstack.audit.space import intersect

    starts = []
    for fam in ("ipv4", "ipv6"):  # an address field of the other family means nothing
        s = intersect(not_sockets(hook), {**start, "family": one_of("family", fam)}) \
            if "family" not in start else intersect(
                intersect(not_sockets(hook), start) or {}, {"family": one_of("family", fam)})
        if s is not None and hook == "input":
            s = intersect(s, local_destinations(q, fam))
        if s is not None:
            starts.append(s)
    found: dict[str, Any] = {}
    classes = [0]
    ev.prefer = q.prefer(hook)

    def leaf(e: Evaluator, verdict: str, trace: list[Step], nat: list, taint: list[str]) -> None:
        classes[0] += 1
        allowed = judge(verdict, trace, nat)
        if allowed is None:
            return
        w = e.point(allowed)
        if w is None:
            return
        if taint or w is True:
            if "unproven" not in found:
                found["unproven"] = (w, verdict, list(trace), list(taint) or
                                     ["the witness search ran out of budget"])
            return
        found["fail"] = (humanize(w, e.dom, q.prefer(hook)), verdict, list(trace))
        raise _Stop

    try:
        for s in starts:
            lf = _egress(q, leaf) if hook in ("forward", "output") else leaf
            if hook in ("forward", "input"):
                _after_prerouting(ev, q, hook, s, lf)
            else:
                ev.explore(hook, s, lf)
    except _Stop:
        pass
    except (Explosion, Unsupported) as e:
        return Result(prop, q.name, "UNPROVEN", f"not understood: {e}", None, [], classes[0])
    where = lambda t: [f"{q.name} -> {hook} -> {s}" for s in t]  # noqa: E731
    if "fail" in found:
        w, verdict, trace = found["fail"]
        return Result(prop, q.name, "FAIL", f"{hook}: {verdict}", packet_of(w).describe(),
                      where(trace), classes[0])
    if "unproven" in found:
        w, verdict, trace, taint = found["unproven"]
        return Result(prop, q.name, "UNPROVEN", "not understood: " + "; ".join(taint[:3]),
                      packet_of(w).describe() if isinstance(w, dict) else None, where(trace),
                      classes[0])
    return Result(prop, q.name, "PASS", reason, classes=classes[0])


def explore_path(q: QubeView, hook: str, start: Box,
                 leaf: Callable[[Evaluator, str, list[Step], list, list[str]], None]) -> None:
    """Every class of `start` on the path to `hook` as `check` walks it (prerouting and its
    NAT before input and forward, the device chains, each family apart), handed to
    leaf(evaluator, verdict, trace, nat, taint) with the class's region current: for a
    consumer that wants every class, not the first counterexample (audit/matrix.py)."""
    from netstack.audit.space import intersect

    ev = q.evaluator()
    for fam in ("ipv4", "ipv6"):
        s = intersect(not_sockets(hook), start)
        s = intersect(s, {"family": one_of("family", fam)}) if s is not None else None
        if s is not None and hook == "input":
            s = intersect(s, local_destinations(q, fam))
        if s is None:
            continue
        lf = _egress(q, leaf) if hook in ("forward", "output") else leaf
        if hook in ("forward", "input"):
            _after_prerouting(ev, q, hook, s, lf)
        else:
            ev.explore(hook, s, lf)


ND_TYPES6 = (133, 134, 135, 136)


def link_nd(q: QubeView, egress: bool = True) -> list[Box]:
    """IPv6 neighbour discovery (with IPv6 on): received, it stays in the qube; sent, only
    to the link's peers and link-scope addresses, so it is never routed onwards."""
    if not q.ipv6:
        return []
    if not egress:
        return [box(family=one_of("family", "ipv6"), l4proto=one_of("l4proto", "icmpv6"),
                    icmp_type=one_of("icmp_type", *ND_TYPES6))]
    peers = [int(ipaddress.ip_address(a)) for a in (q.qube.gateway and _gw6(q), q.qube.ipv6,
                                                   *(c.ipv6 for c in q.clients)) if a]
    scoped = Pred(lambda a, p=frozenset(peers): a in p or (a >> 118) == 0x3FA
                  or (a >> 112) == 0xFF02)
    return [box(family=one_of("family", "ipv6"), l4proto=one_of("l4proto", "icmpv6"),
                icmp_type=one_of("icmp_type", *ND_TYPES6), daddr6=scoped)]


def _gw6(q: QubeView) -> str | None:
    from netstack.addressing import qube_ipv6

    return qube_ipv6(q.qube.gateway) if q.qube.gateway and q.ipv6 else None


def local_destinations(q: QubeView, family: str) -> Box:
    """The input hook only sees packets routed to this qube: its own addresses, broadcast
    and multicast (after any NAT of prerouting; loopback only from lo)."""
    if q.local_any:
        return {f"daddr{4 if family == 'ipv4' else 6}": Pred(lambda a: True)}
    if family == "ipv4":
        own4 = frozenset({int(ipaddress.ip_address(q.address))})
        return box(daddr4=Pred(lambda a, o=own4: a in o or a >> 28 == 0xE
                               or a == 0xFFFFFFFF))
    own6 = frozenset(int(ipaddress.ip_address(a)) for a in (q.qube.ipv6, q.own_ll) if a)
    return box(daddr6=Pred(lambda a, o=own6: a in o or a >> 120 == 0xFF))


def collapse_lists(doc: dict[str, Any]) -> dict[str, Any]:
    """See QubeView.lean."""
    items = doc.get("nftables", [])
    rules = [i["rule"] for i in items if "rule" in i]
    by_chain: dict[tuple, list] = {}
    for r in rules:
        by_chain.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
    base = {(c["family"], c["table"], c["name"]) for i in items if "chain" in i
            for c in [i["chain"]] if c.get("hook") == "prerouting" and c.get("type") != "nat"}

    def plain(r: dict[str, Any], verdicts: tuple[str, ...]) -> bool:
        stmts = [x for x in r.get("expr", []) if "match" not in x and "counter" not in x]
        return len(stmts) == 1 and next(iter(stmts[0])) in verdicts
    def list_jump(r: dict[str, Any], key: tuple) -> bool:
        x = r.get("expr", [])
        target = next((s["jump"]["target"] for s in x if "jump" in s), None)
        sub_rules = by_chain.get((key[0], key[1], target), []) if target else []
        return bool(sub_rules) and all(plain(s, ("accept", "drop", "return"))
                                       for s in sub_rules)
    swap: set[int] = set()
    for key in base:  # from the end: after a swapped jump only verdicts (or more of them)
        for r in reversed(by_chain.get(key, [])):
            if list_jump(r, key):
                swap.add(id(r))
            elif not plain(r, ("accept", "drop")):
                break
    if not swap:
        return doc
    out = []
    for i in items:
        r = i.get("rule")
        if r is not None and id(r) in swap:
            i = {"rule": {**r, "expr": [({"accept": None} if "jump" in x else x)
                                        for x in r["expr"]]}}
        out.append(i)
    return {"nftables": out}


def _after_prerouting(ev: Evaluator, q: QubeView, hook: str, start: Box, leaf: Any) -> None:
    """Only what prerouting lets through, with its NAT applied, meets input or forward: a
    class it drops (INVALID, spoofed) never gets there, a redirect goes to input. Before
    prerouting, the device's ingress chains (netdev, inet ingress): a drop ends the packet,
    `fwd to DEV` sends it out of DEV past every hook here (forwarded, for the properties:
    accepted out of DEV), `dup to DEV` does so with a copy while the original goes on."""
    pre_start = {f: p for f, p in start.items() if f != "oif"}
    pre_start["oif"] = one_of("oif", NO_IFACE)
    later_oif = start.get("oif", one_of("oif", NO_IFACE))

    def prerouting(e: Evaluator, first: list[Step], taint0: list[str], region: Box) -> None:
        def pre(e: Evaluator, verdict: str, trace: list[Step], nat: list,
                taint: list[str]) -> None:
            if verdict != "accept":
                return
            apply_nat(e, q, list(nat), lambda: _then(e, q, hook, later_oif, first + trace,
                                                     taint0 + taint, leaf))
        e.explore("prerouting", region, pre, rs=q.lean())

    if not ev.rs.has_hook("ingress"):
        prerouting(ev, [], [], pre_start)
        return

    def ingress(e: Evaluator, verdict: str, trace: list[Step], nat: list,
                taint: list[str]) -> None:
        if verdict == "accept":
            prerouting(e, trace, taint, {})
        elif verdict.startswith(MOVES) and hook == "forward":
            moved_out(e, verdict, trace, taint, later_oif, leaf)
    ev.explore("ingress", pre_start, ingress)


def moved_out(e: Evaluator, verdict: str, trace: list[Step], taint: list[str], oif: Pred,
              leaf: Any) -> None:
    """A packet a device hook sent (fwd) or copied (dup) out of a device: for a property
    about what leaves, accepted out of that device."""
    dev = verdict.split(" ", 1)[1]

    def out() -> None:
        u = e.narrow({"oif": oif})
        if u is None:
            return
        try:
            if e.point() is not None:
                leaf(e, "accept", trace, [], taint)
        finally:
            e.restore(u)
    e.rewrite("oif", one_of("oif", dev), out)


def _egress(q: QubeView, leaf: Any) -> Any:
    """The leaf of a forward or output exploration followed by the egress chains of the
    packet's device (netdev egress runs after postrouting): a drop ends it, a fwd or dup
    sends it (or a copy) out of another device. Postrouting NAT in between is not
    followed: egress chains after a masquerade or snat are UNPROVEN."""
    ev = q.evaluator()
    if not ev.rs.has_hook("egress"):
        return leaf
    nat_after = any(c.get("hook") == "postrouting" and c.get("type") == "nat"
                    for c in ev.rs.chains.values())

    def first(e: Evaluator, verdict: str, trace: list[Step], nat: list,
              taint: list[str]) -> None:
        if verdict != "accept":
            leaf(e, verdict, trace, nat, taint)
            return
        oif = e.box.get("oif", Pred(lambda v: True))

        def eg(e2: Evaluator, v2: str, tr2: list[Step], nat2: list, tn2: list[str]) -> None:
            tn = taint + tn2 + (["netdev egress after postrouting NAT (the rewritten "
                                 "packet is not followed)"] if nat_after and tr2 else [])
            if v2.startswith(MOVES):
                moved_out(e2, v2, trace + tr2, tn, Pred(lambda v: True), leaf)
            else:
                leaf(e2, v2, trace + tr2, nat, tn)
        e.explore("egress", {"oif": oif}, eg)
    return first


def apply_nat(e: Evaluator, q: QubeView, nat: list, then: Callable[[], None]) -> None:
    if not nat:
        then()
        return
    kind, arg = next(iter(nat[0].items()))
    rest = nat[1:]
    fam = "ipv6" if not e.box["family"].test("ipv4") else "ipv4"
    d = f"daddr{6 if fam == 'ipv6' else 4}"
    if kind not in ("redirect", "dnat"):
        apply_nat(e, q, rest, then)
        return
    addr = (q.qube.ipv6 if fam == "ipv6" else q.address) if kind == "redirect" \
        else (arg or {}).get("addr")
    port = (arg or {}).get("port")
    try:  # in the domains: own address, or a rule's constant
        to = eq_pred([int(ipaddress.ip_address(addr))]) if not q.local_any or \
            kind == "dnat" else local_destinations(q, fam)[d]
    except (TypeError, ValueError):  # no address of ours in that family, a map, a range
        to = local_destinations(q, fam)[d] if kind == "redirect" else Pred(lambda v: True)

    def status() -> None:
        old = e.box.get("ct_status")
        vals = old.exact if old is not None and old.exact is not None else e.dom["ct_status"]
        with_dnat = eq_pred(frozenset(v) | {"dnat"} for v in vals if v is not None)
        e.rewrite("ct_status", with_dnat, (lambda: e.rewrite(
            "dport", one_of("dport", port), lambda: apply_nat(e, q, rest, then)))
            if port else lambda: apply_nat(e, q, rest, then))
    e.rewrite(d, to, status)


def _then(e: Evaluator, q: QubeView, hook: str, oif: Pred, trace: list[Step],
          taint: list[str], leaf: Any) -> None:
    fam = "ipv6" if not e.box["family"].test("ipv4") else "ipv4"
    local = local_destinations(q, fam)
    (f, p), = local.items()
    where = p if hook == "input" or q.local_any else Pred(lambda a, t=p.test: not t(a))
    u = e.narrow({f: where})
    if u is None:
        return
    try:
        if e.point() is None:
            return

        def relay(ev: Evaluator, verdict: str, tr: list[Step], nat: list,
                  tn: list[str]) -> None:
            leaf(ev, verdict, trace + tr, nat, taint + tn)
        go = lambda: e.rewrite("oif", oif, lambda: e.explore(hook, {}, relay))  # noqa: E731
        if hook == "forward":  # forwarding takes one off the TTL (hop limit) before the
            e.rewrite("ttl", Pred(lambda v: True), go)  # hook: any value, as for a start
        else:
            go()
    finally:
        e.restore(u)


def accepted(verdict: str, trace: list[Step], nat: list) -> list[Box] | None:
    """Judge: no packet may be accepted."""
    return [] if verdict == "accept" else None


def dropped_or_allowed(allowed: list[Box]) -> Judge:
    return lambda verdict, trace, nat: allowed if verdict == "accept" else None


def ifaces(q: QubeView) -> list[str]:
    names = set(q.interfaces) | set(q.qube.interfaces) | {c.vif for c in q.clients}
    if q.tunnel:
        names.add(q.tunnel)
    return sorted(names)


def not_sockets(hook: str) -> Box:
    """What a hook's packets can be: only locally generated ones have a socket (and so an
    owner) and no input interface; only forwarded and outgoing ones an output interface."""
    some = none_of("iif", NO_IFACE)
    if hook == "output":
        return {"iif": one_of("iif", NO_IFACE), "oif": some}
    pinned = {"skuid": one_of("skuid", None), "skgid": one_of("skgid", None), "iif": some}
    if hook in ("prerouting", "input"):
        pinned["oif"] = one_of("oif", NO_IFACE)
    else:
        pinned["oif"] = some
    return pinned


# --- the shared properties ----------------------------------------------------------------

def all_of(prop: str, q: QubeView, parts: list[tuple[str, Box, Judge]],
           reason: str) -> Result:
    """A property made of several checks (hooks, pairs of clients): every part runs, so an
    UNPROVEN part never hides a FAIL in a later one; FAIL first, then UNPROVEN, else PASS."""
    results = [check(prop, q, hook, start, judge, "") for hook, start, judge in parts]
    total = sum(r.classes for r in results)
    worst = next((r for r in results if r.status == "FAIL"), None) or \
        next((r for r in results if r.status != "PASS"), None)
    if worst is not None:
        return worst
    return Result(prop, q.name, "PASS", reason, classes=total)


def default_drop(q: QubeView) -> Result:
    """No class of packets gets through input, forward or output without a rule accepting
    it: whatever the rules do not accept explicitly meets a drop."""
    def judge(verdict: str, trace: list[Step], nat: list) -> list[Box] | None:
        # a flowtable's `flow add` accepts its flow's later packets: a rule, explicitly
        if verdict == "accept" and not any(s.action == "accept" or
                                           s.action.startswith("flow add") for s in trace):
            return []
        return None
    return all_of("default drop", q, [(h, not_sockets(h), judge)
                                      for h in ("input", "forward", "output")],
                  "input, forward and output drop whatever no rule accepts")


def invalid_first(q: QubeView) -> Result:
    """Packets in conntrack state INVALID are dropped before any accept or NAT."""
    def judge(verdict: str, trace: list[Step], nat: list) -> list[Box] | None:
        before = trace[:-1] if verdict == "drop" else trace
        if verdict != "drop" or any(s.action in ("accept", "dnat", "snat", "masquerade",
                                                 "redirect") for s in before):
            return []
        return None
    return all_of("INVALID dropped first", q,
                  [(h, {**not_sockets(h), "ct_state": one_of("ct_state", "invalid")}, judge)
                   for h in ("prerouting", "output")],
                  "ct state invalid is dropped in prerouting and output before any accept or "
                  "NAT")


def antispoof(q: QubeView) -> list[Result]:
    out = []
    for c in q.clients:
        own6 = [a for a in (c.ipv6, c.ll) if a]
        six = f"only {', '.join(sorted(own6))} (IPv6)" if own6 else "no IPv6"
        judge = lambda v, t, n: [] if v != "drop" else None  # noqa: E731
        start4 = {**not_sockets("prerouting"), "iif": one_of("iif", c.vif),
                  "family": one_of("family", "ipv4"), "saddr4": none_of("saddr4", c.ipv4)}
        start6 = {**not_sockets("prerouting"), "iif": one_of("iif", c.vif),
                  "family": one_of("family", "ipv6"), "saddr6": none_of("saddr6", *own6)}
        name = f"anti-spoofing {c.name}"
        r = check(name, q, "prerouting", start4, judge, "")
        if r.status == "PASS":
            r2 = check(name, q, "prerouting", start6, judge, "")
            r2.classes += r.classes
            r = r2
        if r.status == "PASS":
            r.reason = (f"on {c.vif} only {c.ipv4} (IPv4) and {six} pass prerouting; every "
                        "other source is dropped")
        out.append(r)
    return out


def no_client_to_client(q: QubeView) -> Result | None:
    if len(q.clients) < 2:
        return None
    return all_of("no path between clients", q,
                  [("forward", {**not_sockets("forward"), "iif": one_of("iif", a.vif),
                                "oif": one_of("oif", b.vif),
                                "ct_state": one_of("ct_state", *NEW_FLOWS, "invalid")},
                    accepted) for a, b in itertools.permutations(q.clients, 2)],
                  "no connection from one client link to another can be opened (replies need "
                  "one)")


def no_ipv6_egress(q: QubeView) -> Result:
    outs = [q.upstream_if] + ([q.tunnel] if q.tunnel else [])
    return all_of("no IPv6 egress", q,
                  [(h, {**not_sockets(h), "family": one_of("family", "ipv6"),
                        "oif": one_of("oif", *outs)}, accepted) for h in ("forward", "output")],
                  "IPv6 never leaves through forward or output")


def constants(q: QubeView, f: str) -> list[Any]:
    """The representatives of a field in this view (every class of it)."""
    return list(q.evaluator().dom[f])


__all__ = ["CT_STATES", "FIELDS", "AuditContext", "QubeView", "Result", "accepted", "antispoof",
           "box", "check", "default_drop", "dropped_or_allowed", "invalid_first", "ifaces",
           "cut_off", "no_client_to_client", "no_ipv6_egress", "none_of", "not_sockets",
           "one_of"]


def for_qube(q: QubeView, ctx: AuditContext) -> list[Result]:
    if q.qube.cut_off:
        return cut_off(q)
    return ctx.kinds[q.qube.kind].audit(q, ctx)


def cut_off(q: QubeView) -> list[Result]:
    """A qube cut off (`attach QUBE none`): it has no netvm, so it reaches nothing and its
    kind's promises about a netvm mean nothing. What is left to prove: its own rules
    still drop by default and INVALID first, and no link leaves its namespace (the live
    links when the audit reads the kernel; the plan's otherwise)."""
    links = sorted(x for x in q.interfaces if x != "lo")
    if links:
        link = Result("cut off: no link", q.name, "FAIL",
                      f"cut off (no netvm), yet its namespace has the link(s) "
                      f"{', '.join(links)}: it may reach what they lead to")
    else:
        link = Result("cut off: no link", q.name, "PASS",
                      "cut off (attach none): no link leaves its namespace, so it reaches "
                      "nothing; its netvm's promises do not apply until it is attached")
    return [link, default_drop(q), invalid_first(q)]


def all_results(views: list[QubeView], ctx: AuditContext) -> list[Result]:
    return list(itertools.chain.from_iterable(for_qube(q, ctx) for q in views))
