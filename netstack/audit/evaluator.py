"""An evaluator of nftables JSON semantics for concrete packets that stand for classes.

The audit picks one representative per equivalence class (every constant the ruleset
compares a field against, plus values that match none), so evaluating representatives
covers every class. Semantics follow the kernel: base chains of a hook run in priority
order, `accept` ends only the current base chain, `drop`/`reject` are final, jump/goto/
return, policies; NAT chains see only packets that open a connection. Dependencies the
JSON hides are restored: a `tcp dport` match needs l4proto tcp, `icmp` needs IPv4, an `ip`
match never matches IPv6 (both `==` and `!=` fail). A construct we do not understand makes
the rule "maybe match": both branches are followed, and if they disagree the verdict is
UNKNOWN, never a pass.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

HOOK_FAMILIES = {"inet": ("ipv4", "ipv6"), "ip": ("ipv4",), "ip6": ("ipv6",)}
L4_NUM = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "icmpv6": 58, "sctp": 132}
TCP_FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr")


class Unknown(Exception):
    """A construct the evaluator does not understand."""


@dataclass
class Packet:
    family: str = "ipv4"
    iifname: str | None = None
    oifname: str | None = None
    saddr: str = "0.0.0.0"
    daddr: str = "0.0.0.0"
    l4proto: str = "tcp"
    sport: int | None = 40000
    dport: int | None = 80
    tcp_flags: frozenset[str] = frozenset({"syn"})
    icmp_type: int | None = None
    ct_state: str = "new"
    ct_status: frozenset[str] = frozenset()
    mark: int = 0
    skuid: int | None = None

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v not in (None, frozenset())}
        for k in ("tcp_flags", "ct_status"):
            if k in d:
                d[k] = sorted(d[k])
        if self.l4proto not in ("tcp", "udp"):
            d.pop("sport", None)
            d.pop("dport", None)
        if self.l4proto != "tcp":
            d.pop("tcp_flags", None)
        return d


@dataclass
class Step:
    table: str
    chain: str
    handle: int | None
    comment: str | None
    action: str

    def __str__(self) -> str:
        c = f" \"{self.comment}\"" if self.comment else ""
        h = f" #{self.handle}" if self.handle is not None else ""
        return f"{self.chain}{h}{c} -> {self.action}"


@dataclass
class Outcome:
    verdict: str  # accept | drop | unknown
    trace: list[Step] = field(default_factory=list)
    nat: list[dict[str, Any]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


class Ruleset:
    """Index of a `nft -j list ruleset` document (or our generator's)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.chains: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.rules: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self.sets: dict[tuple[str, str, str], dict[str, Any]] = {}
        for item in doc.get("nftables", []):
            if "chain" in item:
                c = item["chain"]
                self.chains[(c["family"], c["table"], c["name"])] = c
                self.rules.setdefault((c["family"], c["table"], c["name"]), [])
            elif "rule" in item:
                r = item["rule"]
                self.rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
            elif "set" in item or "map" in item:
                s = item.get("set") or item.get("map")
                self.sets[(s["family"], s["table"], s["name"])] = s

    def base_chains(self, hook: str, family: str) -> list[tuple[tuple[str, str, str], dict]]:
        out = [(k, c) for k, c in self.chains.items()
               if c.get("hook") == hook and family in HOOK_FAMILIES.get(k[0], ())]
        return sorted(out, key=lambda kc: kc[1].get("prio", 0))


# --- values -----------------------------------------------------------------------------

def _addr_in(value: str, spec: Any) -> bool:
    try:
        a = ipaddress.ip_address(value)
    except ValueError:
        return False
    if isinstance(spec, dict) and "prefix" in spec:
        net = ipaddress.ip_network(f"{spec['prefix']['addr']}/{spec['prefix']['len']}",
                                   strict=False)
        return a.version == net.version and a in net
    if isinstance(spec, dict) and "range" in spec:
        lo, hi = (ipaddress.ip_address(x) for x in spec["range"])
        return a.version == lo.version and lo <= a <= hi
    try:
        b = ipaddress.ip_address(spec)
    except (ValueError, TypeError):
        return False
    return a == b


def _scalar_eq(value: Any, spec: Any) -> bool:
    """One value against one set element / right-hand side."""
    if isinstance(spec, dict) and "concat" in spec:
        if not isinstance(value, tuple) or len(value) != len(spec["concat"]):
            return False
        return all(_scalar_eq(v, s) for v, s in zip(value, spec["concat"], strict=True))
    if isinstance(value, str) and _looks_ip(value):
        return _addr_in(value, spec)
    if isinstance(spec, dict) and "range" in spec:
        lo, hi = spec["range"]
        return isinstance(value, int) and lo <= value <= hi
    if isinstance(spec, str) and spec.endswith("*") and isinstance(value, str):
        return value.startswith(spec[:-1])  # interface-name wildcard
    if isinstance(value, str) and isinstance(spec, int):
        return L4_NUM.get(value) == spec
    if isinstance(value, int) and isinstance(spec, str) and spec in L4_NUM:
        return L4_NUM[spec] == value
    return value == spec


def _looks_ip(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return False


class Evaluator:
    def __init__(self, ruleset: Ruleset, max_forks: int = 64) -> None:
        self.rs = ruleset
        self.max_forks = max_forks

    # --- left-hand sides ---------------------------------------------------------------
    def _left(self, e: Any, p: Packet) -> Any:
        """The packet's value for an expression, or None when the header is absent (the
        match then fails whatever the operator: nft's implicit dependency)."""
        if isinstance(e, dict) and "meta" in e:
            k = e["meta"]["key"]
            if k in ("iifname", "iif"):
                return p.iifname
            if k in ("oifname", "oif"):
                return p.oifname
            if k == "nfproto":
                return p.family
            if k in ("l4proto", "protocol"):
                return p.l4proto
            if k == "mark":
                return p.mark
            if k == "skuid":
                return p.skuid
            if k == "skgid":
                return None
            raise Unknown(f"meta {k}")
        if isinstance(e, dict) and "payload" in e:
            proto, fld = e["payload"].get("protocol"), e["payload"].get("field")
            if proto == "ip":
                if p.family != "ipv4":
                    return None
                return {"saddr": p.saddr, "daddr": p.daddr, "protocol": p.l4proto}.get(fld)
            if proto == "ip6":
                if p.family != "ipv6":
                    return None
                return {"saddr": p.saddr, "daddr": p.daddr, "nexthdr": p.l4proto}.get(fld)
            if proto in ("tcp", "udp", "th"):
                if proto == "th" and p.l4proto not in ("tcp", "udp", "sctp"):
                    return None
                if proto in ("tcp", "udp") and p.l4proto != proto:
                    return None
                if fld == "sport":
                    return p.sport
                if fld == "dport":
                    return p.dport
                if fld == "flags" and proto == "tcp":
                    return p.tcp_flags
                raise Unknown(f"{proto} {fld}")
            if proto == "icmp":
                if p.family != "ipv4" or p.l4proto != "icmp":
                    return None
                if fld == "type":
                    return p.icmp_type
                raise Unknown(f"icmp {fld}")
            if proto == "icmpv6":
                if p.family != "ipv6" or p.l4proto != "icmpv6":
                    return None
                if fld == "type":
                    return p.icmp_type
                raise Unknown(f"icmpv6 {fld}")
            raise Unknown(f"payload {proto} {fld}")
        if isinstance(e, dict) and "ct" in e:
            k = e["ct"]["key"]
            if k == "state":
                return p.ct_state
            if k == "status":
                return p.ct_status
            raise Unknown(f"ct {k}")
        if isinstance(e, dict) and "concat" in e:
            vals = tuple(self._left(x, p) for x in e["concat"])
            return None if any(v is None for v in vals) else vals
        if isinstance(e, dict) and "&" in e:
            left, mask = e["&"]
            v = self._left(left, p)
            if v is None:
                return None
            if isinstance(v, frozenset):
                mask_set = set(mask) if isinstance(mask, list) else {mask}
                return frozenset(v & mask_set)
            raise Unknown("bitwise on a non-flag value")
        if isinstance(e, dict) and "fib" in e:
            raise Unknown("fib")
        raise Unknown(f"expression {list(e)[0] if isinstance(e, dict) else e!r}")

    def _elements(self, right: Any, table: tuple[str, str]) -> list[Any] | None:
        if isinstance(right, str) and right.startswith("@"):
            s = self.rs.sets.get((table[0], table[1], right[1:]))
            if s is None:
                raise Unknown(f"set {right}")
            elems = s.get("elem", [])
            return [x["elem"]["val"] if isinstance(x, dict) and "elem" in x else x
                    for x in elems]
        if isinstance(right, dict) and "set" in right:
            return [x["elem"]["val"] if isinstance(x, dict) and "elem" in x else x
                    for x in right["set"]]
        return None

    def _match(self, m: dict[str, Any], p: Packet, table: tuple[str, str]) -> bool:
        op, right = m["op"], m["right"]
        v = self._left(m["left"], p)
        if v is None:
            return False
        if isinstance(v, frozenset):  # flags: ct state/status, tcp flags
            want = set(right) if isinstance(right, list) else \
                {right} if isinstance(right, str) else None
            if want is None:
                elems = self._elements(right, table)
                if elems is None:
                    raise Unknown("flag comparison")
                want = set(elems)
            if op == "in":
                return bool(v & want)
            if op == "==":
                return set(v) == want
            if op == "!=":
                return set(v) != want
            raise Unknown(f"flag op {op}")
        if m["left"] == {"ct": {"key": "state"}}:
            states = set(right) if isinstance(right, list) else {right}
            hit = v in states
            return hit if op in ("==", "in") else not hit
        elems = self._elements(right, table)
        if elems is not None:
            hit = any(_scalar_eq(v, s) for s in elems)
        elif isinstance(right, list):
            hit = any(_scalar_eq(v, s) for s in right)
        else:
            if op in ("<", ">", "<=", ">="):
                if not isinstance(v, int) or not isinstance(right, int):
                    raise Unknown(f"comparison {op}")
                return {"<": v < right, ">": v > right, "<=": v <= right,
                        ">=": v >= right}[op]
            hit = _scalar_eq(v, right)
        if op in ("==", "in"):
            return hit
        if op == "!=":
            return not hit
        raise Unknown(f"operator {op}")

    # --- chains ------------------------------------------------------------------------
    def run_hook(self, hook: str, p: Packet) -> Outcome:
        """All base chains of `hook` for this packet, in priority order."""
        trace: list[Step] = []
        nat: list[dict[str, Any]] = []
        unknown: list[str] = []
        for (fam, table, name), c in self.rs.base_chains(hook, p.family):
            if c.get("type") == "nat" and p.ct_state != "new":
                continue
            outs = self._chain(fam, table, name, p, 0)
            verdicts = {o.verdict for o in outs}
            o = outs[0]
            for x in outs:
                unknown += x.unknown
            if len(verdicts) > 1:
                return Outcome("unknown", trace + o.trace, nat, unknown or ["forked"])
            v = o.verdict
            trace += o.trace
            nat += o.nat
            if v == "none":
                v = c.get("policy", "accept")
                trace.append(Step(table, name, None, None, f"policy {v}"))
            if v == "drop":
                return Outcome("drop", trace, nat, unknown)
            if v == "unknown":
                return Outcome("unknown", trace, nat, unknown)
        return Outcome("accept", trace, nat, unknown)

    def _chain(self, fam: str, table: str, name: str, p: Packet, depth: int,
               start: int = 0) -> list[Outcome]:
        """Possible outcomes of one chain: verdict accept/drop/return/none, with trace."""
        if depth > 16:
            return [Outcome("unknown", [], [], ["jump depth"])]
        rules = self.rs.rules.get((fam, table, name), [])
        for i in range(start, len(rules)):
            r = rules[i]
            try:
                matched = all(self._match(x["match"], p, (fam, table))
                              for x in r["expr"] if "match" in x)
                if matched and any(k in x for x in r["expr"] for k in ("limit", "quota",
                                                                       "numgen")):
                    raise Unknown("limit/quota/numgen: may match")
            except Unknown as u:
                # maybe-match: follow both branches
                no = self._chain(fam, table, name, p, depth, i + 1)
                yes = self._apply(fam, table, name, r, p, depth, i, rules) or \
                    self._chain(fam, table, name, p, depth, i + 1)
                for o in yes + no:
                    o.unknown.append(f"{name} #{r.get('handle')}: {u}")
                return yes + no
            if not matched:
                continue
            res = self._apply(fam, table, name, r, p, depth, i, rules)
            if res is not None:
                return res
        return [Outcome("none")]

    def _apply(self, fam, table, name, r, p, depth, i, rules) -> list[Outcome] | None:
        step = lambda a: Step(table, name, r.get("handle"), r.get("comment"), a)  # noqa: E731
        nat: list[dict[str, Any]] = []
        for x in r["expr"]:
            if "match" in x or "counter" in x or "log" in x:
                continue
            if "accept" in x:
                return [Outcome("accept", [step("accept")], nat)]
            if "drop" in x or "reject" in x:
                return [Outcome("drop", [step("drop" if "drop" in x else "reject")], nat)]
            if "return" in x:
                return [Outcome("none", [step("return")], nat)]
            if "continue" in x:
                continue
            if "jump" in x or "goto" in x:
                kind = "jump" if "jump" in x else "goto"
                target = x[kind]["target"]
                sub = self._chain(fam, table, target, p, depth + 1)
                out = []
                for o in sub:
                    o.trace.insert(0, step(f"{kind} {target}"))
                    if o.verdict == "none" and kind == "jump":
                        rest = self._chain(fam, table, name, p, depth, i + 1)
                        for ro in rest:
                            out.append(Outcome(ro.verdict, o.trace + ro.trace, o.nat + ro.nat,
                                               o.unknown + ro.unknown))
                    else:  # goto: returning from it returns from this chain too
                        out.append(o)
                return out
            if "vmap" in x:
                key = self._left(x["vmap"]["key"], p)
                data = x["vmap"]["data"]
                elems = self._elements(data, (fam, table)) or []
                for el in elems:
                    k, verdict = el if isinstance(el, list) else (el, None)
                    if key is not None and _scalar_eq(key, k):
                        return self._apply(fam, table, name, {**r, "expr": [verdict]}, p,
                                           depth, i, rules)
                continue  # no element matched: the rule does nothing
            for nk in ("dnat", "snat", "masquerade", "redirect"):
                if nk in x:
                    nat.append({nk: x[nk]})
                    return [Outcome("accept", [step(nk)], nat)]
            if "limit" in x or "quota" in x or "numgen" in x:
                continue  # the maybe-match fork happened in _chain
            if "mangle" in x or "meta" in x or "ct" in x:
                continue  # a set statement (mark, nftrace): no verdict
            raise Unknown(f"statement {list(x)[0]}")
        return None
