"""`audit --ruleset FILE --matrix [--port tcp/22]`: a service matrix (issue 30 item 5), the
way fffuu shows an iptables firewall (Diekmann et al., "Verified iptables Firewall
Analysis", IFIP Networking 2016): the address space split into classes the ruleset treats
alike, and which class can open a connection to which, per service, as a table and as a
graph (Graphviz DOT; SVG where `dot` is installed).

How, with the evaluator's own classes (audit/space.py):
1. Elementary intervals: every address constant of the ruleset cuts the space (the
   evaluator's domain of source and destination addresses together).
2. Interval classes: two intervals are alike when every source predicate and every
   destination predicate of the compiled rules holds on both or on neither; a member
   of a class stands for all of it (a rule's verdict depends only on the classes).
3. The matrix: the path (input or forward) explored once per protocol for a new
   connection to the services (a TCP SYN, mark 0, any interface but lo, before NAT here);
   each class of the exploration says, for every (source class, destination class,
   input and output interface) it admits, accept or not, and whether a construct not
   modelled was on the way.
4. Classes with the same row and column (what happens on which interfaces) are merged
   (fffuu's partition); the names are the intervals, as CIDR blocks.
A destination is the one the filter sees: after a DNAT here (a port forward shows as
reaching the inside address), on the service as sent.

An edge is `yes` (every such packet is accepted), `some` (one is, with no construct
not modelled on its way: on the interfaces it names, `via`), `maybe` (accepted
only on ways through a construct not modelled), or absent: no such packet is accepted.
Absent is a proof as `deny` is (audit/expect.py): the evaluator follows a construct it
does not model both ways, so every way a packet could be accepted is among its classes.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import Evaluator, Step
from netstack.audit.expect import has_forward_chain
from netstack.audit.onefile import view
from netstack.audit.properties import explore_path
from netstack.audit.space import L4, L4_NAME, NO_IFACE, PORT_PROTOS, Box, Domains, Pred, eq_pred
from netstack.errors import UsageError

EDGE = ("yes", "some", "maybe")  # strongest first
MAX_SERVICES = 24  # without --port: the ruleset's services beyond these are named, not
# drawn (each takes its share of the time bound: 24 on the router fixture, about 1 s)


@dataclass(frozen=True)
class Service:
    proto: int
    port: int | None  # None: the protocol has no ports (icmp) or any port

    def __str__(self) -> str:
        name = L4_NAME.get(self.proto, str(self.proto))
        return name if self.port is None else f"{name}/{self.port}"


def parse_port(text: str) -> Service:
    proto, _, port = text.partition("/")
    if proto not in L4 or proto == "ipv6-icmp":
        raise UsageError(f"--port {text}: unknown protocol {proto!r}; write it like tcp/22, "
                         "udp/53 or icmp")
    p = L4[proto]
    if not port:
        return Service(p, None)
    if p not in PORT_PROTOS:
        raise UsageError(f"--port {text}: {proto} has no ports; write {proto} alone")
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--port {text}: {port!r} is not a port 0-65535; write it like "
                         f"{proto}/22")
    return Service(p, int(port))


@dataclass
class Node:
    name: str
    family: str
    spans: list[tuple[int, int]]
    rep: int

    def cidrs(self, most: int = 6) -> list[str]:
        """Its CIDR blocks, or `all but` the blocks of the rest where that is shorter (the
        class of every address no rule names)."""
        ip = ipaddress.IPv4Address if self.family == "ipv4" else ipaddress.IPv6Address
        top = 2**32 - 1 if self.family == "ipv4" else 2**128 - 1

        def blocks(spans: list[tuple[int, int]]) -> list[str]:
            return [str(n) for lo, hi in spans
                    for n in ipaddress.summarize_address_range(ip(lo), ip(hi))]
        out = blocks(self.spans)
        rest, at = [], 0
        for lo, hi in self.spans:
            if lo > at:
                rest.append((at, lo - 1))
            at = hi + 1
        if at <= top:
            rest.append((at, top))
        other = blocks(rest)
        size = sum(hi - lo + 1 for lo, hi in self.spans)
        if rest and len(other) < len(out) and size > top // 2:  # most of the space
            out = ["all but"] + other
        return out if len(out) <= most else out[:most] + [f"(+{len(out) - most} more)"]


@dataclass
class Matrix:
    service: Service
    hook: str
    family: str
    nodes: list[Node]
    edges: dict[tuple[int, int], str]  # (source node, destination node) -> EDGE
    unknown: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # per pair: what happened on which (input, output) interface, and for `some` edges
    # the interface pairs on which it is accepted ("*": an interface the ruleset names not)
    detail: dict[tuple[int, int], frozenset] = field(default_factory=dict, repr=False)
    via: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"service": str(self.service), "hook": self.hook, "family": self.family,
                "classes": [{"name": n.name, "ranges": n.cidrs(10**6)} for n in self.nodes],
                "edges": [{"from": self.nodes[i].name, "to": self.nodes[j].name, "reach": e,
                           **({"via": self.via[(i, j)]} if (i, j) in self.via else {})}
                          for (i, j), e in sorted(self.edges.items())],
                "not_modelled": self.unknown, "seconds": round(self.seconds, 3)}


def services(doc: dict[str, Any], ev: Evaluator) -> list[Service]:
    """The services the ruleset names: a destination port (or ICMP) with its protocol in
    one box of a rule or a verdict map's element."""
    seen: set[Service] = set()
    for rules in ev.rs.compiled.values():
        for r in rules:
            for b in _boxes(r):
                proto, port = b.get("l4proto"), b.get("dport")
                if proto is None or proto.exact is None:
                    continue
                for p in proto.exact:
                    if p in PORT_PROTOS and port is not None:
                        for v in (port.exact or ev.dom["dport"]):
                            if port.test(v) and v:
                                seen.add(Service(p, v))
                    elif p in (1, 58):
                        seen.add(Service(p, None))
    return sorted(seen, key=lambda s: (s.proto, s.port or 0))


def _boxes(r: Any) -> list[Box]:
    out = list(r.boxes or [])
    for s in r.stmts:
        if s[0] == "vmap":
            for boxes, _ in s[1]:
                out += [{**a, **b} for a in (r.boxes or [{}]) for b in boxes]
    return out


def _preds(ev: Evaluator, f: str) -> list[Pred]:
    out: dict[int, Pred] = {}
    for rules in ev.rs.compiled.values():
        for r in rules:
            for b in _boxes(r):
                p = b.get(f)
                if p is not None:
                    out[id(p)] = p
    return list(out.values())


def nodes(ev: Evaluator, family: str) -> list[Node]:
    """Step 2: the address classes of one family before merging."""
    six = "6" if family == "ipv6" else "4"
    top = 2**128 - 1 if six == "6" else 2**32 - 1
    cuts = sorted(set(ev.dom[f"saddr{six}"]) | set(ev.dom[f"daddr{six}"]))
    src, dst = _preds(ev, f"saddr{six}"), _preds(ev, f"daddr{six}")
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, lo in enumerate(cuts):
        hi = cuts[i + 1] - 1 if i + 1 < len(cuts) else top
        sig = (tuple(p.test(lo) for p in src), tuple(p.test(lo) for p in dst))
        groups.setdefault(sig, []).append((lo, hi))
    out = []
    for spans in groups.values():
        rep = next((lo for lo, _ in spans if lo), spans[0][1])
        out.append(Node("", family, spans, rep))
    return out


def _new_flow(svc: Service) -> Box:
    b: Box = {"ct_state": eq_pred(["new"]), "mark": eq_pred([0]),
              "ct_status": eq_pred([frozenset()]), "l4proto": eq_pred([svc.proto]),
              "tcp_flags": eq_pred([frozenset({"syn"})]),
              "iif": Pred(lambda x: x not in ("lo", NO_IFACE))}
    if svc.port is not None:
        b["dport"] = eq_pred([svc.port])
    return b


def matrix(q: Any, svc: Service, hook: str, family: str) -> Matrix:
    """One service's matrix on one path and family."""
    return matrices_of(q, [svc], hook, family)[0]


def matrices_of(q: Any, svcs: list[Service], hook: str, family: str) -> list[Matrix]:
    """The matrices of services of ONE protocol, from one exploration (the destination port
    free over the services' ports): each class of packets the evaluator reaches says, for
    each service, source class and destination class it admits, what happens to them."""
    t0 = time.perf_counter()
    ev = q.evaluator()
    six = "6" if family == "ipv6" else "4"
    proto = svcs[0].proto
    assert all(x.proto == proto for x in svcs)
    if proto in (1, 58) and family != ("ipv4" if proto == 1 else "ipv6"):
        return [Matrix(x, hook, family, [], {}) for x in svcs]
    ns = nodes(ev, family)
    reps = [n.rep for n in ns]
    seen: list[dict[tuple[int, int], set[str]]] = [{} for _ in svcs]
    unknown: list[set[str]] = [set() for _ in svcs]
    spans = sorted((lo, hi, k) for k, n in enumerate(ns) for lo, hi in n.spans)
    los = [lo for lo, _, _ in spans]

    def node_of(v: int) -> int:
        import bisect

        return spans[bisect.bisect_right(los, v) - 1][2]
    start = {**_new_flow(svcs[0]), "family": eq_pred([family])}
    ports = [x.port for x in svcs]
    if ports[0] is not None:
        start["dport"] = eq_pred(ports)
    sf, df = f"saddr{six}", f"daddr{six}"

    def cands(p: Pred | None) -> list[tuple[int, int]]:
        if p is not None and p.exact is not None:  # one address (a NAT's): its class
            return [(node_of(v), v) for v in p.exact]
        return [(j, r) for j, r in enumerate(reps) if p is None or p.test(r)]

    def pairs(e: Evaluator, kinds: list[tuple[str, str, str]], ks: list[int]) -> None:
        """The (source class, destination class) pairs of the region, recorded with each
        of `kinds` (what happened, on which interfaces) for each service in ks (the region
        is the same for all of them)."""
        dsts = cands(e.box.get(df))
        srcs = cands(e.box.get(sf))

        def need(i: int, j: int) -> bool:
            return any(kd not in seen[k].get((i, j), ()) for k in ks for kd in kinds)

        def mark(i: int, j: int) -> None:
            for k in ks:
                seen[k].setdefault((i, j), set()).update(kinds)
        # a field no exclusion of the region speaks of is free within the box: every class
        # the box admits is in the region once one point is (no witness per class)
        rel = e.excl.relevant(e.box, e.dom)
        free_s = not any(sf in b for b in rel)
        free_d = not any(df in b for b in rel)
        if free_s and free_d:
            if e.point() is not None:
                for i, _ in srcs:
                    for j, _ in dsts:
                        mark(i, j)
            return
        if free_s:  # the destination decides: one witness per destination class
            for j, r in dsts:
                if not any(need(i, j) for i, _ in srcs):
                    continue
                u = e.narrow({df: eq_pred([r])})
                if u is None:
                    continue
                try:
                    if e.point() is not None:
                        for i, _ in srcs:
                            mark(i, j)
                finally:
                    e.restore(u)
            return
        for i, s in srcs:
            todo = [(j, r) for j, r in dsts if need(i, j)]
            if not todo:
                continue
            u = e.narrow({sf: eq_pred([s])})
            if u is None:
                continue
            try:
                if e.point() is None:
                    continue
                if free_d:
                    for j, _ in todo:
                        mark(i, j)
                    continue
                for j, r in todo:
                    u2 = e.narrow({df: eq_pred([r])})
                    if u2 is None:
                        continue
                    try:
                        if e.point() is not None:
                            mark(i, j)
                    finally:
                        e.restore(u2)
            finally:
                e.restore(u)

    iifs = [v for v in ev.dom["iif"] if v not in ("lo", NO_IFACE)]
    oifs = [NO_IFACE] if hook == "input" else [v for v in ev.dom["oif"]
                                               if v not in ("lo", NO_IFACE)]

    def leaf(e: Evaluator, verdict: str, trace: list[Step], nat: list,
             taint: list[str]) -> None:
        base = ("taint-" if taint else "") + ("accept" if verdict == "accept" else "drop")
        pi, po = e.box.get("iif"), e.box.get("oif")
        combos = [(a, b) for a in iifs if pi is None or pi.test(a)
                  for b in oifs if po is None or po.test(b)]
        if not any("iif" in b or "oif" in b for b in e.excl.relevant(e.box, e.dom)):
            # no exclusion speaks of the interfaces: every pair the box admits is alike
            by_port(e, taint, [(base, a, b) for a, b in combos])
            return
        for a, b in combos:
            u = e.narrow({"iif": eq_pred([a]), "oif": eq_pred([b])})
            if u is None:
                continue
            try:
                if e.point() is not None:
                    by_port(e, taint, [(base, a, b)])
            finally:
                e.restore(u)

    def by_port(e: Evaluator, taint: list[str], kinds: list[tuple[str, str, str]]) -> None:
        dp = e.box.get("dport")
        ks = [k for k, port in enumerate(ports) if port is None or dp is None or dp.test(port)]
        if len(ports) > 1 and not any("dport" in b
                                      for b in e.excl.relevant(e.box, e.dom)):
            # no exclusion speaks of the port: every port the box admits is in the region
            # alike (one pass for all of them)
            for k in ks:
                unknown[k].update(taint)
            pairs(e, kinds, ks)
            return
        for k in ks:
            if len(ports) > 1:
                u = e.narrow({"dport": eq_pred([ports[k]])})
                if u is None:
                    continue
                try:
                    if e.point() is not None:
                        unknown[k].update(taint)
                        pairs(e, kinds, [k])
                finally:
                    e.restore(u)
            else:
                unknown[k].update(taint)
                pairs(e, kinds, [k])
    explore_path(q, hook, start, leaf)
    out = []
    for k, x in enumerate(svcs):
        edges, via = {}, {}
        for key, got in seen[k].items():
            acc = sorted({(a, b) for kd, a, b in got if kd == "accept"})
            if acc:
                edges[key] = "yes" if all(kd == "accept" for kd, _, _ in got) else "some"
                if edges[key] == "some":
                    via[key] = _ifaces(acc, iifs, oifs, hook)
            elif any(kd == "taint-accept" for kd, _, _ in got):
                edges[key] = "maybe"
        m = Matrix(x, hook, family, [Node("", n.family, list(n.spans), n.rep) for n in ns],
                   edges, sorted(unknown[k]),
                   detail={key: frozenset(got) for key, got in seen[k].items()}, via=via)
        _merge(m)
        out.append(m)
    spent = time.perf_counter() - t0
    for m in out:
        m.seconds = spent / len(out)
    return out


def _ifaces(acc: list[tuple[str, str]], iifs: list[str], oifs: list[str],
            hook: str) -> list[str]:
    """The interface pairs a `some` edge is accepted on, in words: `*` for an interface
    the ruleset does not name (the class of every other name), `any` where every output
    (input) interface is."""
    def w(n: str) -> str:
        return "*" if n.startswith("other") else n[:-1] + "*" if n.endswith("~") else n
    if hook == "input":
        return sorted({f"in {w(a)}" for a, _ in acc})
    got = set(acc)
    out = set()
    for a, b in acc:
        if all((a, o) in got for o in oifs):
            out.add(f"{w(a)}>any")
        elif all((i, b) in got for i in iifs):
            out.add(f"any>{w(b)}")
        else:
            out.add(f"{w(a)}>{w(b)}")
    return sorted(out)


def _merge(m: Matrix) -> None:
    """Merge classes with the same row and column until none are left (fffuu's
    partition of the address space for one service)."""
    n = len(m.nodes)
    groups = [[i] for i in range(n)]
    while True:
        def val(a: list[int], b: list[int]) -> Any:
            return m.detail.get((a[0], b[0]), frozenset())
        sig: dict[tuple, list[int]] = {}
        for gi, g in enumerate(groups):
            row = tuple(val(g, h) for h in groups)
            col = tuple(val(h, g) for h in groups)
            sig.setdefault((row, col, val(g, g)), []).append(gi)
        if len(sig) == len(groups):
            break
        groups = [sorted(i for gi in gis for i in groups[gi]) for gis in sig.values()]
    merged = []
    for g in groups:
        spans = sorted(s for i in g for s in m.nodes[i].spans)
        joined: list[tuple[int, int]] = []
        for lo, hi in spans:
            if joined and joined[-1][1] + 1 == lo:
                joined[-1] = (joined[-1][0], hi)
            else:
                joined.append((lo, hi))
        merged.append((g, Node("", m.family, joined, m.nodes[g[0]].rep)))
    merged.sort(key=lambda x: x[1].spans[0][0])
    index = {}
    for k, (g, node) in enumerate(merged):
        node.name = f"{'A' if m.family == 'ipv4' else 'B'}{k + 1}"
        for i in g:
            index[i] = k
    def first(i: int, j: int) -> bool:
        return i == merged[index[i]][0][0] and j == merged[index[j]][0][0]
    m.edges = {(index[i], index[j]): e for (i, j), e in m.edges.items() if first(i, j)}
    m.via = {(index[i], index[j]): e for (i, j), e in m.via.items() if first(i, j)}
    m.detail = {(index[i], index[j]): e for (i, j), e in m.detail.items() if first(i, j)}
    m.nodes = [node for _, node in merged]


def named_services(doc: dict[str, Any], name: str) -> list[Service]:
    """Every service the ruleset names (matrices draws the first MAX_SERVICES)."""
    return services(doc, view(doc, name).evaluator())


def matrices(doc: dict[str, Any], name: str, port: Service | None) -> list[Matrix]:
    """A matrix per service (the one given, or each the ruleset names), path (input;
    forward where the ruleset has a forward chain) and family."""
    q = view(doc, name)
    ev = q.evaluator()
    svcs = [port] if port is not None else services(doc, ev)[:MAX_SERVICES]
    extra = Domains()
    extra.flags("tcp_flags", {"syn"})
    for s in svcs:
        extra.interval("l4proto", s.proto, s.proto)
        if s.port is not None:
            extra.interval("dport", s.port, s.port)
    ev.add(extra)
    hooks = ["input"] + (["forward"] if has_forward_chain(doc) else [])
    by_proto: dict[int, list[Service]] = {}
    for s in svcs:
        by_proto.setdefault(s.proto, []).append(s)
    got: dict[tuple[Service, str, str], Matrix] = {}
    for group in by_proto.values():
        for hook in hooks:
            for fam in ("ipv4", "ipv6"):
                for m in matrices_of(q, group, hook, fam):
                    got[(m.service, hook, fam)] = m
    return [m for s in svcs for hook in hooks for fam in ("ipv4", "ipv6")
            if (m := got[(s, hook, fam)]).nodes]


def table(ms: list[Matrix]) -> str:
    lines = []
    for m in ms:
        lines.append(f"== {m.service} {m.hook} ({m.family}): {len(m.nodes)} class"
                     f"{'es' if len(m.nodes) != 1 else ''} ==")
        for n in m.nodes:
            lines.append(f"  {n.name:<4} {', '.join(n.cidrs()).replace('all but,', 'all but')}")
        reach = []
        for (i, j), e in sorted(m.edges.items()):
            via = f": {_short(m.via[(i, j)])}" if (i, j) in m.via else ""
            reach.append(f"{m.nodes[i].name} -> {m.nodes[j].name}"
                         + ("" if e == "yes" else f" ({e}{via})"))
        lines.append("  reaches: " + (", ".join(reach) if reach else "nothing"))
        if m.unknown and "maybe" in m.edges.values():
            lines.append("  maybe: through " + "; ".join(m.unknown[:3]))
    return "\n".join(lines)


def _short(via: list[str], most: int = 4) -> str:
    return ", ".join(via[:most]) + (f" +{len(via) - most}" if len(via) > most else "")


def dot(ms: list[Matrix]) -> str:
    """Graphviz: one cluster per service, path and family; a node per class (its CIDR
    blocks), an edge per reach (dashed: some packets; dotted: not modelled)."""
    out = ["digraph services {", "  rankdir=LR; node [shape=box, fontsize=10];"]
    for k, m in enumerate(ms):
        out.append(f'  subgraph cluster_{k} {{ label="{m.service} {m.hook} {m.family}";')
        for n in m.nodes:
            label = "\\n".join([n.name, *n.cidrs(4)])
            out.append(f'    m{k}_{n.name} [label="{label}"];')
        for (i, j), e in sorted(m.edges.items()):
            style = {"yes": "solid", "some": "dashed", "maybe": "dotted"}[e]
            label = f' label="{_short(m.via[(i, j)], 2)}"' if (i, j) in m.via else ""
            out.append(f"    m{k}_{m.nodes[i].name} -> m{k}_{m.nodes[j].name} "
                       f"[style={style}{label} fontsize=8];")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
