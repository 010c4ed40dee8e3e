"""The audit property of a qube with its own rules (Qubes' qvm-firewall list): "reaches
exactly what its rules allow", checked in its netvm whatever the netvm's kind.

The list's meaning is written here a second time, independently of the generator
(rules/qubefw.py): as a plain reference ruleset, one base chain of literal matches in
list order ending in a drop (names as the addresses they resolved to, expired rules left
out). The evaluator explores the netvm's live ruleset and, inside each class of packets,
the reference; a packet both judge differently is the counterexample:

- its rules drop it, yet it gets through the netvm (prerouting, its NAT, then forward or
  input: what a Tor gateway takes in is what it carries);
- its rules accept it, yet the list's own chain drops it (a drop by the netvm's kind,
  before or after the list, such as INVALID, IPv6 off or Tor's TCP-only, is that kind's
  business and has its own properties).

Only new connections from the client's own addresses are judged (replies, spoofed
sources and the link's own neighbour discovery are not destinations)."""

from __future__ import annotations

import ipaddress
from typing import Any

from netstack.audit.evaluator import Evaluator, Ruleset
from netstack.audit.space import NO_IFACE

MODEL_TABLE = "model"


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    if net.num_addresses == 1:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _m(left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def model_doc(rules: tuple[Any, ...], names: dict[str, list[str]], dns: tuple[str, ...],
              started: float, now: float | None) -> dict[str, Any]:
    """The list as a reference ruleset. now=None: nothing runs yet (a generated ruleset),
    so rules whose sets are filled at run time (names, expiry) match nothing."""
    out: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": MODEL_TABLE}},
        {"chain": {"family": "inet", "table": MODEL_TABLE, "name": "list", "type": "filter",
                   "hook": "prerouting", "prio": -150, "policy": "accept"}}]

    def rule(*exprs: Any, comment: str) -> None:
        out.append({"rule": {"family": "inet", "table": MODEL_TABLE, "chain": "list",
                             "expr": list(exprs), "comment": comment}})
    for i, r in enumerate(rules):
        verdict = {"accept": None} if r.action == "accept" else {"drop": None}
        note = f"rule {i + 1}: {r.describe()}"
        end = r.deadline(started)
        if end is not None and (now is None or end - now < 1):
            continue  # ended (or no clock yet)
        if r.specialtarget == "dns":
            for proto in ("udp", "tcp"):
                rule(_m({"payload": {"protocol": "ip", "field": "daddr"}},
                        {"set": sorted(dns)}),
                     _m({"payload": {"protocol": proto, "field": "dport"}}, 53), verdict,
                     comment=note)
            continue
        if r.host_is_name:
            if now is None:
                continue
            nets = [ipaddress.ip_network(a) for a in names.get(r.dsthost, [])]
        elif r.dsthost is not None:
            nets = [ipaddress.ip_network(r.dsthost, strict=False)]
        else:
            nets = []
        if r.dsthost is not None and not nets:
            continue  # a name that did not resolve: matches nothing
        fams = sorted({n.version for n in nets}) or [4, 6]
        for v in fams:
            exprs: list[Any] = []
            mine = [n for n in nets if n.version == v]
            if mine:
                exprs.append(_m({"payload": {"protocol": "ip" if v == 4 else "ip6",
                                             "field": "daddr"}},
                                {"set": [_prefix(n) for n in mine]}))
            else:
                exprs.append(_m({"meta": {"key": "nfproto"}}, "ipv4" if v == 4 else "ipv6"))
            if r.proto in ("tcp", "udp"):
                exprs.append(_m({"meta": {"key": "l4proto"}}, r.proto))
                if r.dstports:
                    lo, hi = r.dstports
                    exprs.append(_m({"payload": {"protocol": r.proto, "field": "dport"}},
                                    lo if lo == hi else {"range": [lo, hi]}))
            elif r.proto == "icmp":
                icmp = "icmp" if v == 4 else "icmpv6"
                exprs.append(_m({"meta": {"key": "l4proto"}},
                                "icmp" if v == 4 else "ipv6-icmp"))
                if r.icmptype is not None:
                    exprs.append(_m({"payload": {"protocol": icmp, "field": "type"}},
                                    r.icmptype))
            rule(*exprs, verdict, comment=note)
    rule({"drop": None}, comment="nothing matched")
    return {"nftables": out}


NAT_KINDS = ("dnat", "redirect")


def without_nat(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The ruleset with each prerouting NAT statement replaced by `accept` (the rule's
    matches still narrow the packets it takes; nothing is rewritten, so the packet stays
    the one the client sent), and marker -> the NAT statement it stood for."""
    items, nats = [], {}
    for i in doc.get("nftables", []):
        r = i.get("rule")
        if r and any(k in x for x in r.get("expr", []) for k in NAT_KINDS):
            marker = f"nat#{len(nats)}"
            exprs = []
            for x in r["expr"]:
                kind = next((k for k in NAT_KINDS if k in x), None)
                if kind:
                    nats[marker] = {kind: x[kind]}
                    exprs.append({"accept": None})
                else:
                    exprs.append(x)
            i = {"rule": {**r, "expr": exprs, "comment": marker}}
        items.append(i)
    return {"nftables": items}, nats


def _compiled(pair: tuple[dict[str, Any], dict[str, Any]]) -> tuple[Ruleset, dict[str, Any]]:
    return Ruleset(pair[0]), pair[1]


def reaches_exactly(q: Any, client: Any, rules: tuple[Any, ...], names: dict[str, list[str]],
                    started: float, now: float | None) -> Any:
    """The property for one client of netvm view `q` (see the module's docstring)."""
    from netstack.addressing import VIRTUAL_DNS
    from netstack.audit import properties as p
    from netstack.audit import space
    from netstack.audit.properties import Result, apply_nat, local_destinations
    from netstack.rules.qubefw import chain_name

    name = f"{client.name} reaches exactly what its rules allow"
    chain = chain_name(client.name)
    model = Ruleset(model_doc(rules, names, VIRTUAL_DNS, started, now))
    ev = q.evaluator()
    live = ev.rs
    nonat, nats = q.cached("without NAT", lambda: _compiled(without_nat(q.ruleset)))
    ev.add(model.domains)
    ev.prefer = q.prefer("prerouting")
    found: list[tuple[str, Any, list[str]]] = []
    classes = [0]

    class Stop(Exception):
        pass

    def report(w: Any, why: str, trace: list[str]) -> None:
        if isinstance(w, dict):
            found.append((why, w, trace))
            raise Stop
        if w is not None and not found:  # the witness search gave up: may be
            found.append((why, None, trace))

    def passes(e: Evaluator, nat: list, trace: list[str], why: str) -> None:
        """Its rules drop this class: it must not get through the netvm after prerouting.
        A packet that does is reported as the client sent it (before any NAT)."""
        pre_box, pre_ex = dict(e.box), e.excl.relevant(e.box, e.dom)
        rewritten = {"daddr4", "daddr6", "dport", "ct_status", "oif", "oifgroup", "ttl"}

        def original(w: dict[str, Any]) -> Any:
            pinned = {f: space.eq_pred([v]) for f, v in w.items() if f not in rewritten}
            b = space.intersect(pre_box, pinned)
            return None if b is None else space.witness(b, pre_ex, e.dom, prefer=e.prefer)

        def after() -> None:
            fam = "ipv6" if not e.box["family"].test("ipv4") else "ipv4"
            ((f, mine),) = local_destinations(q, fam).items()
            for hook, where in (("input", mine), ("forward", p.Pred(
                    lambda a, t=mine.test: not t(a)))):
                u = e.narrow({f: where})
                if u is None:
                    continue
                try:
                    oif = p.one_of("oif", NO_IFACE) if hook == "input" else \
                        p.none_of("oif", NO_IFACE)

                    def leaf(e2: Evaluator, verdict: str, tr: list, nt: list,
                             tn: list[str], hook: str = hook) -> None:
                        classes[0] += 1
                        if verdict != "accept":
                            return
                        w = e2.point()
                        if tn:
                            report(True if w is not None else None, "not understood: "
                                   + "; ".join(tn[:2]), trace)
                            return
                        report(original(w) if isinstance(w, dict) else w,
                               f"its rules drop it ({why}), {q.name} lets it through "
                               f"({hook})", trace + [str(x) for x in tr])
                    e.rewrite("oif", oif, lambda h=hook, lf=leaf: e.explore(h, {}, lf,
                                                                            rs=live))
                finally:
                    e.restore(u)
        apply_nat(e, q, list(nat), after)

    def pre(e: Evaluator, verdict: str, trace: list, _nat: list, taint: list[str]) -> None:
        classes[0] += 1
        if taint:
            report(e.point() and True, "not understood: " + "; ".join(taint[:2]),
                   [str(x) for x in trace])
            return
        in_list = [x for x in trace if x.chain == chain]
        by_list = bool(in_list) and in_list[-1].action in ("drop", "reject")
        if verdict != "accept" and not by_list:
            return  # dropped by the netvm's kind: neither way of betraying the list
        listed = [str(x) for x in trace if not (x.comment or "").startswith("nat#")]
        nat = [nats[x.comment] for x in trace if x.comment in nats]
        listed += [f"{x.chain} (NAT) -> {next(iter(nats[x.comment]))}" for x in trace
                   if x.comment in nats]

        def judge(e2: Evaluator, mverdict: str, mtrace: list, _n: list, mt: list) -> None:
            if mt:  # the reference is plain nftables: not understood is a bug of ours
                report(True, f"the list's reference is not understood: {mt[0]}", listed)
                return
            rule = mtrace[-1].comment if mtrace else "?"
            if mverdict == "accept":
                if verdict != "accept" and by_list:
                    report(e2.point(), f"its rules accept it ({rule}), {chain} in {q.name} "
                           "drops it", listed)
            elif verdict == "accept":
                passes(e2, nat, listed, rule)
        e.explore("prerouting", {}, judge, rs=model)

    starts = []
    for fam, own in (("ipv4", [client.ipv4]), ("ipv6", [a for a in (client.ipv6, client.ll)
                                                          if a])):
        if not own:
            continue
        sf = f"saddr{4 if fam == 'ipv4' else 6}"
        s = {**p.not_sockets("prerouting"), "iif": p.one_of("iif", client.vif),
             "family": p.one_of("family", fam), "ct_state": p.one_of("ct_state", "new"),
             sf: p.one_of(sf, *own)}
        if fam == "ipv4":
            starts.append(s)
        else:  # the link's neighbour discovery is not a destination
            starts.append({**s, "l4proto": p.none_of("l4proto", "icmpv6")})
            starts.append({**s, "l4proto": p.one_of("l4proto", "icmpv6"),
                           "icmp_type": p.none_of("icmp_type", *p.ND_TYPES6)})
    from netstack.audit.evaluator import Explosion, packet_of

    try:
        for st in starts:
            ev.explore("prerouting", st, pre, rs=nonat)
    except Stop:
        pass
    except (Explosion, space.Unsupported) as e:
        return Result(name, q.name, "UNPROVEN", f"not understood: {e}", None, [], classes[0])
    hard = [f for f in found if f[1] is not None]
    if hard:
        why, w, trace = hard[0]
        pt = space.humanize(w, ev.dom, q.prefer("prerouting"))
        return Result(name, q.name, "FAIL", why, packet_of(pt).describe(),
                      [f"{q.name} -> {x}" for x in trace], classes[0])
    if found:
        return Result(name, q.name, "UNPROVEN", found[0][0], None, found[0][2], classes[0])
    n = len(rules)
    return Result(name, q.name, "PASS", f"in {q.name}, {client.name}'s new connections pass "
                  f"exactly where its {n} rule{'s' if n != 1 else ''} accept (first match, "
                  "names as resolved, expiry as of now)", classes=classes[0])


def for_netvm(q: Any, ctx: Any) -> list[Any]:
    """The property for every client of the netvm view `q` that has a list."""

    out = []
    names = (ctx.rule_names or {}).get(q.name, {})
    for c in q.clients:
        rules = ctx.plan.qube(c.name).firewall
        if rules is None:
            continue
        out.append(reaches_exactly(q, c, rules, names, ctx.started, ctx.now))
    return out
