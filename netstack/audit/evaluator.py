"""An evaluator of nftables JSON semantics over regions of the packet space.

The ruleset is compiled once: every match becomes a box (a constraint per field, protocol
dependencies included: `tcp dport 22` is l4proto tcp AND dport 22, `ip saddr != X` never
holds for IPv6), every rule a union of boxes plus its statements. Exploring a hook walks the
base chains in priority order, depth first: at each rule the region splits into the part
that matches (which the rule's statements decide) and the rest, which carries the rule's
box as an exclusion. A branch is followed only while a witness packet exists in it, so every
leaf is a real class of packets with a verdict and a trace. Semantics follow the kernel:
`accept` ends only the current base chain, `drop`/`reject` are final, jump/goto/return,
policies, verdict maps, NAT chains only for a connection's first packet.

A construct the evaluator does not model (a selector or statement whose domain it cannot
cover) is followed both ways and taints the leaves: a property reached through it is
UNPROVEN with the construct named, never PASS.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from netstack.audit import space
from netstack.audit.space import (
    FIELDS,
    L4,
    L4_NAME,
    NO_IFACE,
    PORT_PROTOS,
    Box,
    Domains,
    Exclusions,
    Pred,
    Unsupported,
    eq_pred,
    intersect,
)

HOOK_FAMILIES = {"inet": ("ipv4", "ipv6"), "ip": ("ipv4",), "ip6": ("ipv6",),
                 # a netdev chain sees every frame of its device; of those the evaluator
                 # models IP packets (anything else it reads, `ether type arp`, is UNPROVEN)
                 "netdev": ("ipv4", "ipv6")}
DEVICE_HOOKS = ("ingress", "egress")  # base chains bound to devices (netdev, inet ingress)
# statements that move a packet out of a device past this namespace's inet hooks (fwd) or
# copy it there (dup): leaves of their own, "fwd DEV" / "dup DEV", only where a consumer
# asked for them (Evaluator.moves); anywhere else they stay UNPROVEN
MOVES = ("fwd", "dup")
OFFLOAD_STEP = "flow add"  # a trace step: the flow's later packets take the flowtable
NAT_CORE = {"prerouting": -100, "output": -100, "postrouting": 100, "input": 100}
CONNTRACK_PRIO = -200  # where connection tracking looks packets up (prerouting, output)
NAT_KINDS = ("dnat", "snat", "masquerade", "redirect")


# shared constant predicates (a Pred is immutable; its cache of representatives is keyed
# by domain): made once, not once per match of a 10,000-rule ruleset
FAMILY4, FAMILY6 = eq_pred(["ipv4"]), eq_pred(["ipv6"])
L4_IS = {p: eq_pred([n]) for p, n in L4.items()}


def chain_devices(c: dict[str, Any]) -> list[str]:
    """The devices a base chain of a device hook is bound to (`dev` is a name or a list)."""
    d = c.get("dev")
    if d is None:
        return []
    return [d] if isinstance(d, str) else [x for x in d if isinstance(x, str)]


def _frozen(x: Any) -> Any:
    """A hashable copy of a JSON value (a cache key; json.dumps was 40 % of compiling)."""
    if isinstance(x, bool):  # True == 1 as a key, but not as an nft value
        return ("bool", x)
    if isinstance(x, dict):
        return ("{", *sorted((k, _frozen(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return ("[", *(_frozen(v) for v in x))
    if isinstance(x, (set, frozenset)):
        return frozenset(_frozen(v) for v in x)
    return x


def _is_th(x: Any) -> bool:
    """Whether an expression reads `th` (a raw transport header field)."""
    if isinstance(x, dict):
        pl = x.get("payload")
        if isinstance(pl, dict) and pl.get("protocol") == "th":
            return True
        return any(_is_th(v) for v in x.values())
    if isinstance(x, list):
        return any(_is_th(v) for v in x)
    return False


def _restricts_to_ports(rs: Ruleset, matches: list[dict[str, Any]],
                        key: tuple[str, str, str]) -> bool:
    """Whether these matches together admit only protocols with ports."""
    boxes: list[Box] = [{}]
    for m in matches:
        try:
            union = rs._match_boxes(m, key)
        except Unsupported:
            continue
        boxes = [b for a in boxes for u in union if (b := intersect(a, u)) is not None]
    return all((p := b.get("l4proto")) is not None and p.exact is not None
               and p.exact <= PORT_PROTOS for b in boxes)


def conntrack_families(x: Any, table: tuple[str, ...]) -> set[str]:
    """The families an expression list turns connection tracking on for (the kernel's
    nf_ct_netns_get): a ct expression, masquerade/redirect or `flow add` (a flowtable
    offloads connections: found by the differential generator with flowtables,
    docs/field-notes.md "Flowtables") for the table's families, a dnat/snat for the
    family it names (`dnat ip to` in an inet table: IPv4 only)."""
    out: set[str] = set()
    if isinstance(x, dict):
        if "ct" in x or "masquerade" in x or "redirect" in x or "flow" in x:
            out.update(table)
        for k in ("dnat", "snat"):
            if k in x:
                fam = (x[k] or {}).get("family")
                out.update({"ip": ("ipv4",), "ip6": ("ipv6",)}.get(fam, table))
        for v in x.values():
            out |= conntrack_families(v, table)
    elif isinstance(x, list):
        for v in x:
            out |= conntrack_families(v, table)
    return out
TCP_FLAGS = space.TCP_FLAG_BITS


# --- concrete packets ---------------------------------------------------------------------

@dataclass
class Packet:
    """One concrete packet (a class's witness, a what-if, a replayed counterexample)."""

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
    ct_status: frozenset[str] | None = frozenset()  # None: no connection (invalid)
    mark: int = 0
    skuid: int | None = None
    skgid: int | None = None
    icmp_code: int | None = None
    length: int | None = None

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v not in (None, frozenset())}
        for k in ("tcp_flags", "ct_status"):
            if k in d:
                d[k] = sorted(d[k])
        if self.l4proto not in ("tcp", "udp", "sctp", "udplite", "dccp"):
            d.pop("sport", None)
            d.pop("dport", None)
        if self.l4proto != "tcp":
            d.pop("tcp_flags", None)
        return d

    def box(self) -> Box:
        """This packet as a region of one point."""
        six = self.family == "ipv6"
        l4 = L4.get(self.l4proto, self.l4proto if isinstance(self.l4proto, int) else 253)
        vals: dict[str, Any] = {
            "family": self.family, "iif": self.iifname or NO_IFACE,
            "oif": self.oifname or NO_IFACE,
            "saddr6" if six else "saddr4": int(ipaddress.ip_address(self.saddr)),
            "daddr6" if six else "daddr4": int(ipaddress.ip_address(self.daddr)),
            "saddr4" if six else "saddr6": 0, "daddr4" if six else "daddr6": 0,
            "l4proto": l4, "sport": self.sport or 0, "dport": self.dport or 0,
            "tcp_flags": frozenset(self.tcp_flags), "icmp_type": self.icmp_type or 0,
            "icmp_code": self.icmp_code or 0, "ct_state": self.ct_state,
            "ct_status": None if self.ct_state in space.NO_CONNECTION else
            frozenset(self.ct_status or ()), "mark": self.mark, "skuid": self.skuid,
            "skgid": self.skgid, "length": self.length or 0}
        return {f: eq_pred([vals[f]]) for f in FIELDS}


def packet_of(point: dict[str, Any]) -> Packet:
    """A witness (field -> value) as a Packet."""
    six = point["family"] == "ipv6"
    ip = ipaddress.IPv6Address if six else ipaddress.IPv4Address
    l4 = point["l4proto"]
    ports = l4 in PORT_PROTOS
    return Packet(
        family=point["family"], iifname=point["iif"] or None, oifname=point["oif"] or None,
        saddr=str(ip(point["saddr6" if six else "saddr4"])),
        daddr=str(ip(point["daddr6" if six else "daddr4"])),
        l4proto=L4_NAME.get(l4, str(l4)) if isinstance(l4, int) else l4,
        sport=point["sport"] if ports else None, dport=point["dport"] if ports else None,
        tcp_flags=point["tcp_flags"], icmp_type=point["icmp_type"] if l4 in (1, 58) else None,
        icmp_code=point["icmp_code"] if l4 in (1, 58) else None,
        ct_state=point["ct_state"], ct_status=point["ct_status"], mark=point["mark"],
        skuid=point["skuid"], skgid=point["skgid"], length=point["length"] or None)


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


# --- the ruleset --------------------------------------------------------------------------

@dataclass
class Rule:
    table: str
    chain: str
    handle: int | None
    comment: str | None
    boxes: list[Box] | None  # union; None: the match could not be compiled
    stmts: list[tuple[Any, ...]]
    unknown: list[str] = field(default_factory=list)  # constructs not modelled

    def step(self, action: str) -> Step:
        return Step(self.table, self.chain, self.handle, self.comment, action)

    @property
    def terminal(self) -> bool:
        """Its first effective statement is a verdict ending the whole hook (drop)."""
        for s in self.stmts:
            if s[0] == "nop":
                continue
            return s[0] == "verdict" and s[1] in ("drop", "reject")
        return False


class Malformed(Unsupported):
    """A document that is not nftables JSON the way libnftables-json(5) writes it (a value
    of another type, a key missing): the audit refuses it in one line (UNPROVEN), never
    with a traceback (issue 30 item 3; tests/unit/test_audit_fuzz.py)."""


# what reading a malformed document raises in the compiler (a str where a dict was, a
# missing key, a list where a hashable was, an address that does not parse)
MALFORMED = (TypeError, KeyError, AttributeError, ValueError, IndexError)


def _check_doc(doc: Any) -> None:
    """The shape of what the evaluator reads outside the compiler (chains are sorted by
    priority, keyed by names, bound to devices): anything else is Malformed up front."""
    def bad(what: str) -> Malformed:
        return Malformed(f"a malformed ruleset document: {what}")
    if not isinstance(doc, dict) or not isinstance(doc.get("nftables", []), list):
        raise bad('no "nftables" list')
    for item in doc.get("nftables", []):
        if not isinstance(item, dict):
            raise bad(f"an item {json.dumps(item)[:40]}")
        for kind in ("chain", "rule", "set", "map"):
            if kind not in item:
                continue
            o = item[kind]
            names = ("family", "table", "chain" if kind == "rule" else "name")
            if not isinstance(o, dict) or not all(isinstance(o.get(k), str) for k in names):
                raise bad(f"a {kind} without {'/'.join(names)} as strings")
            if kind == "chain":
                for k in ("hook", "type", "policy"):
                    if k in o and not isinstance(o[k], str):
                        raise bad(f"chain {o['name']}: {k} {o[k]!r}")
                if "prio" in o and (not isinstance(o["prio"], int) or
                                    isinstance(o["prio"], bool)):
                    raise bad(f"chain {o['name']}: prio {o['prio']!r}")
                if o.get("policy", "accept") not in ("accept", "drop"):
                    raise bad(f"chain {o['name']}: policy {o['policy']!r}")
            if kind == "rule":
                if not isinstance(o.get("expr", []), list) or \
                        not all(isinstance(x, dict) and x for x in o.get("expr", [])):
                    raise bad(f"a rule of {o['chain']} whose expr is not a list of objects")
                if o.get("handle") is not None and not isinstance(o["handle"], int):
                    raise bad(f"a rule of {o['chain']} with handle {o['handle']!r}")
                if o.get("comment") is not None and not isinstance(o["comment"], str):
                    raise bad(f"a rule of {o['chain']} with comment {o['comment']!r}")
            if kind in ("set", "map") and not isinstance(o.get("elem", []), list):
                raise bad(f"{kind} {o['name']}: elem is not a list")


def _index_rules(rules: list[Rule]) -> tuple[str | None, dict[Any, list[int]], list[int]]:
    """(field, value -> rules pinned to it, rules not pinned) for a long chain: of the
    fields at least half its rules pin to a few exact values in every box, the one with
    the most distinct values. Rules with a construct not
    understood are never pinned (they must be met, to taint what they may touch)."""
    best, best_n = None, 1
    for f in space.FIELDS:  # most distinct values among fields most rules pin
        pins = [v for r in rules if (v := _pinned(r, f)) is not None]
        n = len(frozenset().union(*pins)) if 2 * len(pins) >= len(rules) else 0
        if n > best_n:
            best, best_n = f, n
    by_val: dict[Any, list[int]] = {}
    wild: list[int] = []
    for i, r in enumerate(rules):
        vals = _pinned(r, best) if best else None
        if vals is None:
            wild.append(i)
            continue
        for v in vals:
            by_val.setdefault(v, []).append(i)
    return best, by_val, wild


def _pinned(r: Rule, f: str) -> frozenset | None:
    """The values of field f rule r can match, if every box pins them (a few exact ones)."""
    if r.unknown or not r.boxes:
        return None
    out: set = set()
    for b in r.boxes:
        p = b.get(f)
        if p is None or p.exact is None or len(p.exact) > space.SMALL:
            return None
        out |= p.exact
    return frozenset(out)


class Ruleset:
    """Index of a `nft -j list ruleset` document (or our generator's), compiled into boxes."""

    def __init__(self, doc: dict[str, Any]) -> None:
        _check_doc(doc)
        try:
            self._read(doc)
        except MALFORMED as e:
            raise Malformed(f"a malformed ruleset document ({type(e).__name__}: {e})") \
                from None

    def _read(self, doc: dict[str, Any]) -> None:
        self._devs: set[str] = set()
        self.chains: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.rules: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self.sets: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.order: dict[tuple[str, str, str], int] = {}
        for item in doc.get("nftables", []):
            if "chain" in item:
                c = item["chain"]
                key = (c["family"], c["table"], c["name"])
                self.chains[key] = c
                self.order[key] = len(self.order)
                for dev in chain_devices(c):
                    self._devs.add(dev)
                self.rules.setdefault(key, [])
            elif "rule" in item:
                r = item["rule"]
                self.rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
            elif "set" in item or "map" in item:
                s = item.get("set") or item.get("map")
                self.sets[(s["family"], s["table"], s["name"])] = s
        self.conntrack: set[str] = set()  # families whose packets get a connection
        for (fam, _t, _c), rs in self.rules.items():
            fams = HOOK_FAMILIES.get(fam, ())
            for r in rs:
                if self.conntrack.issuperset(fams):
                    break  # nothing more to learn from this chain
                self.conntrack |= conntrack_families(r.get("expr", []), fams)
        # `th` is rare: look for it in the rules only if the document has it at all
        self._any_th = '"protocol": "th"' in json.dumps(list(self.rules.values()))
        self.domains = Domains()
        for dev in sorted(self._devs):  # a device chain's packets are a class of their own
            self.domains.name("iif", dev)
            self.domains.name("oif", dev)
        self._preds: dict[str, Pred] = {}
        self._pre = False  # compiling for a chain that runs before connection tracking
        self.compiled: dict[tuple[str, str, str], list[Rule]] = {
            k: [self._compile(k, r) for r in rs] for k, rs in self.rules.items()}
        self._compiled_pre: dict[tuple[str, str, str], list[Rule]] = {}
        self._index: dict[tuple[tuple[str, str, str], bool], Any] = {}

    def rules_for(self, key: tuple[str, str, str], pre: bool) -> list[Rule]:
        """A chain's compiled rules; `pre`: as seen before connection tracking, where no
        packet has a connection yet (ct state is invalid, every other ct key breaks)."""
        if not pre:
            return self.compiled.get(key, [])
        got = self._compiled_pre.get(key)
        if got is None:
            self._pre = True
            try:
                got = self._compiled_pre[key] = [self._compile(key, r)
                                                 for r in self.rules.get(key, [])]
            except MALFORMED as e:
                raise Malformed(f"a malformed rule ({type(e).__name__}: {e})") from None
            finally:
                self._pre = False
        return got

    INDEX_FROM = 48  # chains this long are walked through an index (below: every rule)

    def candidates(self, key: tuple[str, str, str], pre: bool, box: Box,
                   start: int) -> Iterable[int]:
        """The indices (from `start`, in order) of the chain's rules that may meet the
        region `box`. A long chain (a thousand per-qube rules) is indexed on the field most
        of its rules pin to a few exact values: a rule whose every box pins it to values
        the region does not have cannot match, and is not looked at (linear, not
        quadratic, when a region is explored against a long chain)."""
        rules = self.rules_for(key, pre)
        if len(rules) - start < self.INDEX_FROM:
            return range(start, len(rules))
        idx = self._index.get((key, pre))
        if idx is None:
            idx = self._index[(key, pre)] = _index_rules(rules)
        f, by_val, wild = idx
        p = box.get(f) if f else None
        if p is None or p.exact is None or len(p.exact) > space.SMALL:
            return range(start, len(rules))
        cand = set(wild)
        for v in p.exact:
            cand.update(by_val.get(v, ()))
        return sorted(i for i in cand if i >= start)

    def before_conntrack(self, c: dict[str, Any], family: str) -> bool:
        """A base chain that runs before connection tracking looks a packet up (priority
        under -200 at prerouting and output; every ingress chain: the device hands the
        frame over before the IP stack, so no packet has a connection yet)."""
        if c.get("hook") == "ingress":
            return True
        return c.get("hook") in ("prerouting", "output") and c.get("type") != "nat" and \
            c.get("prio", 0) < CONNTRACK_PRIO and family in self.conntrack

    def has_hook(self, hook: str) -> bool:
        """Whether any base chain of the document hangs on `hook` (the device hooks are
        explored only then: most rulesets have none)."""
        return any(c.get("hook") == hook for k, c in self.chains.items()
                   if k[0] in HOOK_FAMILIES)

    def base_chains(self, hook: str, family: str) -> list[tuple[tuple[str, str, str], dict]]:
        """The base chains a packet of `family` meets at `hook`, in the kernel's order:
        by priority, and among equal priorities the chain registered LAST first (the
        kernel inserts a new hook before older ones of its priority; registration follows
        the document). NAT chains do not run at their own priority: the NAT core runs at
        its fixed one (dstnat -100, srcnat 100) and calls them in their order, and only
        where connection tracking is on for the family (something in the ruleset uses
        it: a ct expression or a NAT statement; otherwise NAT chains never run)."""
        out = []
        for k, c in self.chains.items():
            if c.get("hook") != hook or family not in HOOK_FAMILIES.get(k[0], ()):
                continue
            if c.get("type") == "nat" and family not in self.conntrack:
                continue
            out.append((k, c))

        def key(kc: tuple[tuple[str, str, str], dict]) -> tuple[int, int, int, int]:
            k, c = kc
            if c.get("type") == "nat" and hook in NAT_CORE:
                return (NAT_CORE[hook], 1, c.get("prio", 0), -self.order[k])
            return (c.get("prio", 0), 0, 0, -self.order[k])
        return sorted(out, key=key)

    def order_unknown(self, hook: str, family: str) -> str | None:
        """A filter chain at exactly the NAT core's (or connection tracking's) priority
        runs before or after it depending on which was registered first, which a listing
        does not tell."""
        chains = self.base_chains(hook, family)
        for k, c in chains:
            if c.get("type") == "nat":
                continue
            if hook in NAT_CORE and c.get("prio", 0) == NAT_CORE[hook] and \
                    any(x.get("type") == "nat" for _, x in chains):
                return (f"{k[1]} {k[2]} at priority {NAT_CORE[hook]}: before or after NAT "
                        "(registration order)")
            if hook in ("prerouting", "output") and c.get("prio", 0) == CONNTRACK_PRIO and \
                    family in self.conntrack:
                return (f"{k[1]} {k[2]} at priority {CONNTRACK_PRIO}: before or after "
                        "connection tracking (registration order)")
        return None

    # --- compiling ----------------------------------------------------------------------
    _device_table = False  # compiling a netdev table's rule (frames of any ethertype)

    def _compile(self, key: tuple[str, str, str], r: dict[str, Any]) -> Rule:
        rule = Rule(key[1], key[2], r.get("handle"), r.get("comment"), [{}], [])
        self._device_table = key[0] == "netdev"
        exprs = r.get("expr", [])
        # `th sport/dport` reads the first bytes of ANY transport header (ICMP's type and
        # code, its checksum...): exact only where the rule's other matches restrict the
        # packet to protocols with ports
        ths = [x for x in exprs if _is_th(x)] if self._any_th else []
        self._ports_only = bool(ths) and _restricts_to_ports(
            self, [x["match"] for x in exprs if "match" in x and x not in ths], key)
        for x in exprs:
            if "match" in x:
                try:
                    union = self._match(x["match"], key)
                except Unsupported as e:
                    rule.unknown.append(str(e))
                    continue
                except MALFORMED as e:  # followed both ways, as any match not modelled
                    rule.unknown.append(f"a malformed match ({type(e).__name__}: {e})")
                    continue
                rule.boxes = [b for a in (rule.boxes or []) for u in union
                              if (b := intersect(a, u)) is not None]
            else:
                try:
                    rule.stmts.append(self._stmt(x, key))
                except Malformed:
                    raise
                except MALFORMED as e:  # what it would do is unknown: refuse the document
                    raise Malformed(f"a malformed statement ({type(e).__name__}: {e})") \
                        from None
                except Unsupported as e:
                    rule.stmts.append(("maybe", str(e)))
        return rule

    def _elements(self, right: Any, key: tuple[str, str, str]) -> list[Any]:
        if isinstance(right, str) and right.startswith("@"):
            s = self.sets.get((key[0], key[1], right[1:]))
            if s is None:
                raise Unsupported(f"set {right} (not in the ruleset)")
            # a dynamic or timed set: its elements as listed now (the audit of a live
            # ruleset is a statement about this moment)
            elems = s.get("elem", [])
        elif isinstance(right, dict) and "set" in right:
            elems = right["set"]
        elif isinstance(right, list):
            return [right]  # a flag list is one value
        else:
            return [right]
        return [x["elem"]["val"] if isinstance(x, dict) and "elem" in x else x for x in elems]

    def _selector(self, e: Any) -> tuple[str, Box, Any]:
        """(field, dependency box, transform) of a left-hand side."""
        if isinstance(e, dict) and "meta" in e:
            k = e["meta"]["key"]
            f = {"iifname": "iif", "iif": "iif", "oifname": "oif", "oif": "oif",
                 "nfproto": "family", "l4proto": "l4proto",
                 "protocol": "family",  # the ethertype: ip or ip6 for every IP packet
                 "mark": "mark", "skuid": "skuid", "skgid": "skgid", "length": "length"}.get(k)
            if f is None:
                raise Unsupported(f"meta {k}")
            return f, {}, None
        if isinstance(e, dict) and "payload" in e:
            pl = e["payload"]
            proto, fld = pl.get("protocol"), pl.get("field")
            if proto is None:
                raise Unsupported("raw payload")
            v4, v6 = {"family": FAMILY4}, {"family": FAMILY6}
            table = {
                ("ip", "saddr"): ("saddr4", v4), ("ip", "daddr"): ("daddr4", v4),
                ("ip", "protocol"): ("l4proto", v4), ("ip", "length"): ("length", v4),
                ("ip6", "saddr"): ("saddr6", v6), ("ip6", "daddr"): ("daddr6", v6),
                ("ip6", "nexthdr"): ("l4proto", v6),
            }
            if (proto, fld) in table:
                f, dep = table[(proto, fld)]
                return f, dict(dep), None
            if proto == "th" and fld in ("sport", "dport"):
                if not getattr(self, "_ports_only", False):
                    raise Unsupported(f"th {fld} without a match on TCP/UDP first (on other "
                                      "protocols it reads other header bytes)")
                return fld, {"l4proto": eq_pred(PORT_PROTOS)}, None
            if fld in ("sport", "dport") and proto in ("tcp", "udp", "sctp", "dccp",
                                                       "udplite"):
                return fld, {"l4proto": L4_IS[proto]}, None
            if proto == "tcp" and fld == "flags":
                return "tcp_flags", {"l4proto": L4_IS["tcp"]}, None
            if proto in ("icmp", "icmpv6") and fld in ("type", "code"):
                dep = dict(v4 if proto == "icmp" else v6)
                dep["l4proto"] = eq_pred([1 if proto == "icmp" else 58])
                return f"icmp_{fld}", dep, ("family", "ipv4" if proto == "icmp" else "ipv6")
            raise Unsupported(f"payload {proto} {fld}")
        if isinstance(e, dict) and "ct" in e:
            k = e["ct"]["key"]
            if k == "state":
                return "ct_state", {}, None
            if k == "status":
                return "ct_status", {}, None
            raise Unsupported(f"ct {k}")
        if isinstance(e, dict) and "&" in e:
            left, mask = e["&"]
            f, dep, _ = self._selector(left)
            if f in ("tcp_flags", "ct_status"):
                return f, dep, ("mask", space.flag_set(mask, f))
            if f == "mark" and isinstance(mask, int):
                return f, dep, ("intmask", mask)
            raise Unsupported(f"bitwise & on {f}")
        name = list(e)[0] if isinstance(e, dict) else repr(e)
        raise Unsupported(f"expression {name}")

    def _value_pred(self, f: str, values: list[Any], transform: Any, op: str) -> Pred:
        """The predicate `f op values` (any of the values; op == / != / in / comparisons),
        registering the constants with the domains. Shared by equal matches."""

        key = (f, _frozen(values), _frozen(transform), op,
               self._device_table and f == "family")
        p = self._preds.get(key)
        if p is None:
            p = self._preds[key] = self._value_pred_new(f, values, transform, op)
        return p

    def _value_pred_new(self, f: str, values: list[Any], transform: Any, op: str) -> Pred:
        d = self.domains
        if f == "family":
            names = {{2: "ipv4", 10: "ipv6", "ip": "ipv4", "ip6": "ipv6", 0x0800: "ipv4",
                      0x86DD: "ipv6"}.get(v, v) for v in values}
            if self._device_table and not names <= {"ipv4", "ipv6"}:
                # a netdev chain sees ARP, VLAN, any ethertype: outside the IP classes
                raise Unsupported(f"a frame that is not IP ({', '.join(map(str, values))})")
            hit = Pred(lambda x, s=frozenset(names): x in s)
        elif f in ("iif", "oif"):
            exact, wild = set(), []
            for v in values:
                if not isinstance(v, str):
                    raise Unsupported(f"{f} value {v!r}")
                d.name(f, v)
                if v.endswith("*") and not v.endswith("\\*"):
                    wild.append(v[:-1])
                else:
                    exact.add(v.replace("\\*", "*"))
            if wild:
                hit = Pred(lambda x, e=frozenset(exact), w=tuple(wild):
                           x in e or (x != NO_IFACE and x.startswith(w)))
            else:
                hit = eq_pred(exact)
        elif f == "ct_state":
            states = set()
            for v in values:
                for s in (v if isinstance(v, list) else [v]):
                    if s not in space.CT_STATES:
                        raise Unsupported(f"ct state {s!r}")
                    states.add(s)
            if op == "in" or op == "==":
                return eq_pred(states)
            hit = eq_pred(states)
        elif f in ("tcp_flags", "ct_status"):
            flags = [space.flag_set(v, f) for v in values]
            for fl in flags:
                d.flags(f, fl)
            mask = transform[1] if transform and transform[0] == "mask" else None
            if mask is not None:
                d.flags(f, mask)
            # None: a packet without a connection (invalid, untracked), where any ct key
            # but the state breaks the rule: neither `==` nor `!=` matches
            if op == "in":  # bitmask test: any of the bits set
                bits = frozenset().union(*flags)
                return Pred(lambda x, b=bits, m=mask: x is not None and
                            bool((x & m if m else x) & b))
            hit = Pred(lambda x, fs=tuple(flags), m=mask: x is not None and
                       (x & m if m is not None else x) in fs)
        elif f == "mark" and transform and transform[0] == "intmask":
            m = transform[1]
            consts = []
            for v in values:
                lo, hi = space.int_interval(v, f)
                if lo != hi:
                    raise Unsupported("a range under a mark mask")
                d.mask(f, m, lo)
                consts.append(lo)
            hit = Pred(lambda x, m=m, c=frozenset(consts): x is not None and (x & m) in c)
        elif f in space.ORDERED:
            fam = transform[1] if transform and transform[0] == "family" else None
            spans = []
            for v in values:
                if f.endswith(("addr4", "addr6")):
                    lo, hi = space.addr_interval(v, f.endswith("6"))
                else:
                    lo, hi = space.int_interval(v, f, fam)
                spans.append((lo, hi))
            if op in ("<", "<=", ">", ">="):
                if len(spans) != 1 or spans[0][0] != spans[0][1]:
                    raise Unsupported(f"comparison {op} with a set")
                c = spans[0][0]
                lo, hi = {"<": (0, c - 1), "<=": (0, c), ">": (c + 1, space.ORDERED[f]),
                          ">=": (c, space.ORDERED[f])}[op]
                d.interval(f, lo, hi)
                return Pred(lambda x, lo=lo, hi=hi: x is not None and lo <= x <= hi)
            for lo, hi in spans:
                d.interval(f, lo, hi)
            if all(lo == hi for lo, hi in spans):
                hit = eq_pred(lo for lo, _ in spans)
            else:
                hit = Pred(lambda x, s=tuple(spans): x is not None and
                           any(lo <= x <= hi for lo, hi in s))
        else:
            raise Unsupported(f"{f} comparison")
        if op in ("==", "in"):
            return hit
        if op == "!=":
            if hit.exact is not None and f in ("iif", "oif", "family"):
                ex = hit.exact
                return Pred(lambda x, e=ex: x not in e)
            # no socket: `meta skuid != 0` does not match either (the expression breaks)
            return Pred(lambda x, h=hit: x is not None and not h.test(x))
        raise Unsupported(f"operator {op}")

    def _match(self, m: dict[str, Any], key: tuple[str, str, str]) -> list[Box]:
        boxes = self._match_boxes(m, key)
        if not self._pre:
            return boxes
        out = []  # before conntrack every packet is one without a connection
        for b in boxes:
            st, ss = b.get("ct_state"), b.get("ct_status")
            if (st is None or st.test("invalid")) and (ss is None or ss.test(None)):
                out.append({f: p for f, p in b.items() if f not in ("ct_state", "ct_status")})
        return out

    def _match_boxes(self, m: dict[str, Any], key: tuple[str, str, str]) -> list[Box]:
        left, op, right = m["left"], m["op"], m["right"]
        elems = self._elements(right, key)
        if isinstance(left, dict) and "concat" in left:
            sels = [self._selector(x) for x in left["concat"]]
            if op not in ("==", "in"):
                raise Unsupported(f"concatenation with {op}")
            out = []
            for el in elems:
                parts = el.get("concat") if isinstance(el, dict) else None
                if parts is None or len(parts) != len(sels):
                    raise Unsupported("a concatenation element of another shape")
                b: Box | None = {}
                for (f, dep, tr), v in zip(sels, parts, strict=True):
                    vals = self._elements(v, key) if isinstance(v, dict) and "set" in v \
                        else [v]
                    b = intersect(b, {**dep, f: self._value_pred(f, vals, tr, "==")}) \
                        if b is not None else None
                if b is not None:
                    out.append(b)
            return out
        f, dep, tr = self._selector(left)
        if f == "ct_state" and isinstance(right, list):
            elems = [right]
        return [{**dep, f: and_dep(dep.get(f), self._value_pred(f, elems, tr, op))}]

    def _stmt(self, x: dict[str, Any], key: tuple[str, str, str]) -> tuple[Any, ...]:
        if "accept" in x:
            return ("verdict", "accept")
        if "drop" in x:
            return ("verdict", "drop")
        if "reject" in x:
            return ("verdict", "reject")
        if "return" in x:
            return ("return",)
        if "continue" in x:
            return ("nop",)
        if "jump" in x or "goto" in x:
            kind = "jump" if "jump" in x else "goto"
            return (kind, x[kind]["target"])
        if "counter" in x or "log" in x:
            return ("nop",)
        if "flow" in x and x["flow"].get("op") == "add":
            return ("offload", x["flow"].get("flowtable", "?"))
        for nk in NAT_KINDS:
            if nk in x:
                return ("nat", {nk: x[nk]})
        if "mangle" in x:
            k, v = x["mangle"]["key"], x["mangle"]["value"]
            if k == {"meta": {"key": "nftrace"}}:
                return ("nop",)
            if k == {"meta": {"key": "mark"}} and isinstance(v, int):
                self.domains.interval("mark", v, v)
                return ("setmark", v)
            if isinstance(k, dict) and ("tcp option" in k or k == {"ct": {"key": "mark"}}):
                # MSS clamping, a connection's mark: no field the evaluator reads changes
                # (a rule that reads them is itself not modelled, and says so)
                return ("nop",)
            what = " ".join(str(w) for w in (next(iter(k.values()), {}) or {}).values()) \
                if isinstance(k, dict) else ""
            raise Unsupported(f"a mangle statement ({next(iter(k), '?')} {what} set)".replace(
                "  ", " "))
        if "vmap" in x:
            f_key = x["vmap"]["key"]
            entries = []
            for el in self._elements(x["vmap"]["data"], key):
                if not isinstance(el, list) or len(el) != 2:
                    raise Unsupported("a verdict map element")
                k, verdict = el
                boxes = self._match({"left": f_key, "op": "==",
                                     "right": k if isinstance(f_key, dict) and "concat"
                                     not in f_key else {"set": [k]}}, key)
                entries.append((boxes, self._stmt(verdict, key)))
            return ("vmap", entries)
        for mv in MOVES:
            if mv in x:
                arg = x[mv] or {}
                if key[0] != "netdev":
                    raise Unsupported(f"statement {mv} in a {key[0]} table (a copy or move "
                                      "the evaluator does not follow there)")
                # netdev: `fwd to DEV`, `fwd ip to ADDR device DEV` (the address only picks
                # the neighbour: the packet still leaves by DEV); `dup to DEV`, which nft
                # 1.0.6's JSON lists as {"dup": {"addr": DEV}}
                dev = arg.get("dev")
                if dev is None and mv == "dup":
                    dev = arg.get("addr")
                if not isinstance(dev, str):
                    raise Unsupported(f"statement {mv} to {json.dumps(arg)} (a device from an "
                                      "expression)")
                self.domains.name("oif", dev)
                return ("move", mv, dev)
        if "limit" in x or "quota" in x:
            raise Unsupported("limit/quota: may match")
        name = list(x)[0]
        raise Unsupported(f"statement {name}")


def _inert(stmts: list[tuple[Any, ...]]) -> bool:
    """Statements that change nothing the evaluator follows (counters, logs, mangling of
    fields it does not read, limits with nothing after them): whether they run or stop,
    the packet goes on to the next rule in the same modelled state."""
    return all(s[0] in ("nop", "maybe") for s in stmts)


def _soft(stmts: list[tuple[Any, ...]]) -> bool:
    """Statements after which the packet always goes on to the next rule, changing at
    most its mark: inert ones and `meta mark set`."""
    return all(s[0] in ("nop", "maybe", "setmark") for s in stmts)


def and_dep(a: Pred | None, b: Pred) -> Pred:
    return b if a is None else space.and_pred(a, b)


# --- exploring ----------------------------------------------------------------------------

Leaf = Callable[["Evaluator", str, list[Step], list[dict[str, Any]], list[str]], None]


PAIRINGS: tuple[Box, ...] = (
    {"skuid": eq_pred([None]), "skgid": Pred(lambda g: g is not None)},
    {"skgid": eq_pred([None]), "skuid": Pred(lambda u: u is not None)},
    {"ct_state": eq_pred(space.NO_CONNECTION), "ct_status": Pred(lambda s: s is not None)},
    {"ct_state": eq_pred(s for s in space.CT_STATES if s not in space.NO_CONNECTION),
     "ct_status": eq_pred([None])},
)


class Explosion(Exception):
    """More classes than the budget: the property is UNPROVEN, not PASS."""


class Evaluator:
    """The region being explored (a box and the boxes excluded on the way) and the walk
    through one ruleset's chains. Several rulesets (the hops of a chain) may be explored
    in turn on the same region: `explore(..., rs=...)`."""

    budget = 2_000_000

    def __init__(self, ruleset: Ruleset | None = None, domains: Domains | None = None) -> None:
        self.rs = ruleset or Ruleset({"nftables": []})
        self.domains = Domains()
        self.domains.merge(self.rs.domains)
        if domains is not None:
            self.domains.merge(domains)
        self.box: Box = {}
        self.excl = Exclusions()
        self._dom: dict[str, tuple] | None = None
        self.steps = 0
        # the leaf of the device hook being explored: a fwd or dup is a leaf of its own
        self._leaf: Leaf | None = None
        self._hook_leaf: Leaf | None = None  # the leaf of the hook explored (flow add)

    @property
    def dom(self) -> dict[str, tuple]:
        if self._dom is None:
            self._dom = self.domains.build()
        return self._dom

    def add(self, extra: Domains) -> None:
        self.domains.merge(extra)
        self._dom = None

    # --- the region -----------------------------------------------------------------
    def narrow(self, b: Box) -> list[tuple[str, Pred | None]] | None:
        """box ∧ b in place; the undo list, or None (nothing changed) when it is empty."""
        undo: list[tuple[str, Pred | None]] = []
        for f, p in b.items():
            q = self.box.get(f)
            r = p if q is None else space.and_pred(q, p)
            if r.exact is not None and not r.exact:
                self.restore(undo)
                return None
            undo.append((f, q))
            self.box[f] = r
        return undo

    def rewrite(self, f: str, p: Pred, then: Callable[[], None]) -> None:
        """Field f takes the values of p from here on (NAT, a mark set, the next hop):
        constraints on its old value are projected away (see Exclusions.deactivate)."""
        old = self.box.get(f)
        parked = self.excl.deactivate(f, old, self.dom[f])
        self.box[f] = p
        try:
            then()
        finally:
            if old is None:
                self.box.pop(f, None)
            else:
                self.box[f] = old
            self.excl.reactivate(parked)

    def restore(self, undo: list[tuple[str, Pred | None]]) -> None:
        for f, q in reversed(undo):
            if q is None:
                self.box.pop(f, None)
            else:
                self.box[f] = q

    prefer: dict[str, list[Any]] | None = None  # readable witnesses (see space.humanize)

    def point(self, extra: list[Box] = ()) -> dict[str, Any] | None | bool:  # type: ignore
        """A packet of the current region (and outside `extra`), None if there is none,
        True when the search gave up (assume one may exist)."""
        ex = self.excl.relevant(self.box, self.dom) + list(extra)
        return space.witness(self.box, ex, self.dom, prefer=self.prefer)

    # --- hooks and chains -----------------------------------------------------------
    def explore(self, hook: str, start: Box, leaf: Leaf, rs: Ruleset | None = None) -> None:
        """Every class of packets of `start` at `hook`: leaf(self, verdict, trace, nat,
        taint) with the region current (use self.point() for a witness). `rs`: explore
        another ruleset on the same region (its constants must be in the domains)."""
        if rs is not None and rs is not self.rs:
            saved, self.rs = self.rs, rs
            try:
                self.explore(hook, start, leaf)
            finally:
                self.rs = saved
            return
        undo = self.narrow(start)
        if undo is None:
            return
        outer_leaf, self._leaf = self._leaf, (leaf if hook in DEVICE_HOOKS else None)
        outer_hook_leaf, self._hook_leaf = self._hook_leaf, leaf
        # a packet has a socket (an owner AND a group) or none: never one without the other;
        # it has a connection (and a status) unless it is invalid or untracked
        for b in PAIRINGS:
            self.excl.push(b)
        try:
            fams = [f for f in ("ipv4", "ipv6") if self.box.get("family") is None
                    or self.box["family"].test(f)]
            for fam in fams:
                u2 = self.narrow({"family": eq_pred([fam])})
                if u2 is None:
                    continue
                try:
                    if self.point() is not None:
                        odd = self.rs.order_unknown(hook, fam)
                        self._base(self.rs.base_chains(hook, fam), 0, [], [],
                                   [odd] if odd else [], leaf)
                finally:
                    self.restore(u2)
        finally:
            self._leaf = outer_leaf
            self._hook_leaf = outer_hook_leaf
            for _ in PAIRINGS:
                self.excl.pop()
            self.restore(undo)

    def _base(self, chains: list, i: int, trace: list[Step], nat: list, taint: list[str],
              leaf: Leaf) -> None:
        if i == len(chains):
            leaf(self, "accept", trace, nat, taint)
            return
        key, c = chains[i]
        devs = chain_devices(c) if c.get("hook") in DEVICE_HOOKS else []
        if devs and not c.get("_bound"):
            # a device chain meets only the packets of its devices (iif at ingress, oif at
            # egress): the region splits, and the rest goes on to the next chain
            f = "iif" if c.get("hook") == "ingress" else "oif"
            for b, then in (({f: eq_pred(devs)}, lambda: self._base(
                    chains[:i] + [(key, {**c, "_bound": True})] + chains[i + 1:], i, trace,
                    nat, taint, leaf)),
                    ({f: Pred(lambda x, s=frozenset(devs): x not in s)},
                     lambda: self._base(chains, i + 1, trace, nat, taint, leaf))):
                u = self.narrow(b)
                if u is None:
                    continue
                try:
                    if self.point() is not None:
                        then()
                finally:
                    self.restore(u)
            return
        if c.get("hook") in DEVICE_HOOKS and not devs and not c.get("_bound"):
            # the listing does not say which devices (nft 1.0.6's JSON leaves them out):
            # run it for every packet, and say nothing it decides is proven
            taint = taint + [f"{key[0]} {key[1]} {key[2]}: a device chain whose devices "
                             "the listing does not name"]
            chains = chains[:i] + [(key, {**c, "_bound": True})] + chains[i + 1:]
            self._base(chains, i, trace, nat, taint, leaf)
            return
        if c.get("type") == "nat":  # only a connection's first packet meets NAT chains
            u = self.narrow({"ct_state": eq_pred(["new"])})
            if u is not None:
                try:
                    if self.point() is not None:
                        self._run_base(chains, i, key, c, trace, nat, taint, leaf)
                finally:
                    self.restore(u)
            u = self.narrow({"ct_state": eq_pred([s for s in space.CT_STATES if s != "new"])})
            if u is not None:
                try:
                    if self.point() is not None:
                        self._base(chains, i + 1, trace, nat, taint, leaf)
                finally:
                    self.restore(u)
            return
        self._run_base(chains, i, key, c, trace, nat, taint, leaf)

    pre_ct = False  # running a chain that comes before connection tracking

    def _run_base(self, chains, i, key, c, trace, nat, taint, leaf) -> None:
        fam = "ipv4" if self.box["family"].test("ipv4") else "ipv6"
        outer = self.pre_ct

        def done(verdict: str, tr: list[Step], nt: list, tn: list[str]) -> None:
            self.pre_ct = outer
            try:
                self._done_base(chains, i, key, c, nat, leaf, verdict, tr, nt, tn)
            finally:
                self.pre_ct = pre
        pre = self.rs.before_conntrack(c, fam)
        self.pre_ct = pre
        try:
            self._chain(key, 0, trace, nat, taint, done, 0)
        finally:
            self.pre_ct = outer

    def _done_base(self, chains, i, key, c, nat, leaf, verdict, tr, nt, tn) -> None:
        """A base chain ended: its policy, then the next base chain (after NAT)."""
        if verdict in ("return", "none"):
            pol = c.get("policy", "accept")
            what = f"policy {pol}" if c.get("type") != "nat" else f"nat policy {pol}"
            tr = tr + [Step(key[1], key[2], None, None, what)]
            verdict = pol
        if verdict == "accept":
            rest = chains
            if c.get("type") == "nat" and len(nt) > len(nat):  # the connection is bound:
                rest = chains[:i + 1] + [x for x in chains[i + 1:]  # no more NAT chains
                                         if x[1].get("type") != "nat"]
            self.nat_then(nt[len(nat):], lambda: self._base(rest, i + 1, tr, nt, tn, leaf))
        else:
            leaf(self, "drop", tr, nt, tn)

    local_addr: Callable[[str], str | None] | None = None  # redirect/masquerade targets

    def nat_then(self, nats: list[dict[str, Any]], then: Callable[[], None]) -> None:
        """Later base chains of the same hook see what NAT made of the packet: the new
        destination (or source) and the connection's dnat (snat) status."""
        if not nats:
            then()
            return
        kind, arg = next(iter(nats[0].items()))
        arg = arg or {}
        rest = lambda: self.nat_then(nats[1:], then)  # noqa: E731
        fam = "ipv6" if not self.box["family"].test("ipv4") else "ipv4"
        six = "6" if fam == "ipv6" else "4"
        if kind in ("dnat", "redirect"):
            f, pf, bit = f"daddr{six}", "dport", "dnat"
        else:
            f, pf, bit = f"saddr{six}", "sport", "snat"
        addr = arg.get("addr") if kind in ("dnat", "snat") else \
            (self.local_addr(fam) if self.local_addr else None)
        port = arg.get("port")
        any_ = Pred(lambda v: True)

        def status() -> None:
            old = self.box.get("ct_status")
            vals = old.exact if old is not None and old.exact is not None else \
                self.dom["ct_status"]
            self.rewrite("ct_status", eq_pred(frozenset(v) | {bit} for v in vals
                                              if v is not None),
                         (lambda: self.rewrite(pf, eq_pred([port]), rest))
                         if isinstance(port, int) else rest)
        try:
            val = eq_pred([int(ipaddress.ip_address(addr))]) if isinstance(addr, str) else any_
        except ValueError:
            val = any_  # a map or a range: the new address is not one value
        self.rewrite(f, val, status)

    def _chain(self, key: tuple[str, str, str], start: int, trace: list[Step], nat: list,
               taint: list[str], k: Callable, depth: int) -> None:
        if depth > 16:
            k("drop", trace, nat, taint + ["jump depth over 16"])
            return
        self.steps += 1
        if self.steps > self.budget:
            raise Explosion(f"more than {self.budget} paths")
        rules = self.rs.rules_for(key, self.pre_ct)
        pushed = 0
        try:
            for i in self.rs.candidates(key, self.pre_ct, self.box, start):
                r = rules[i]
                if not r.unknown and all(s[0] == "nop" for s in r.stmts):
                    continue  # counter, log: no effect on any verdict
                tn = taint + r.unknown if r.unknown else taint
                terminal = r.terminal
                for b in r.boxes or []:
                    u = self.narrow(b)
                    if u is None:
                        # disjoint from the region: "not b" is implied by the box (and a
                        # rewrite of the disjoint field would set the exclusion aside)
                        continue
                    try:
                        # a plain verdict is a leaf: whoever uses it asks for a witness;
                        # anything that explores further must not start from nothing
                        if r.unknown and _soft(r.stmts):
                            # matched or not, the packet goes on to the next rule: one
                            # branch (tainted) stands for both (see _soft)
                            if self.point() is not None:
                                self._either(r, key, i, trace, nat, tn, k, depth)
                        elif terminal or self.point() is not None:
                            self._stmts(r, 0, key, i, trace, nat, tn, k, depth)
                    finally:
                        self.restore(u)
                    if not r.unknown or _soft(r.stmts):
                        self.excl.push(b)
                        pushed += 1
                if r.boxes == [{}] and not r.unknown:
                    return  # matches everything: nothing gets past it
                if r.unknown and not _soft(r.stmts):
                    # inside its known matches the unknown one may be false: the rest goes
                    # on from there tainted; outside them the rule cannot match at all.
                    # (A rule whose statements are inert took that same way above.)
                    for b in r.boxes or []:
                        u = self.narrow(b)
                        if u is not None:
                            try:
                                if self.point() is not None:
                                    self._chain(key, i + 1, trace, nat, tn, k, depth)
                            finally:
                                self.restore(u)
                        self.excl.push(b)
                        pushed += 1
            if self.point() is not None:
                k("none", trace, nat, taint)
        finally:
            for _ in range(pushed):
                self.excl.pop()

    def _either(self, r: Rule, key, i: int, trace, nat, taint, k, depth) -> None:
        """The rest of the chain after a rule that may match or not (a match the evaluator
        does not model) and whose statements only taint or set the mark: ONE tainted
        branch in which the mark is its old value or any value the rule sets. Exploring
        matched and not matched apart doubled the paths per such rule (`ip dscp X meta
        mark set Y` x 12 = 4096 ways through the rest; docs/field-notes.md). Sound: the
        branch is tainted (a PASS never rests on it) and admits every packet either
        branch did (the mark over-approximated, the exclusions on it projected)."""
        tn = taint + [f"{r.chain} #{r.handle}: {x[1]}" for x in r.stmts if x[0] == "maybe"]
        marks = frozenset(x[1] for x in r.stmts if x[0] == "setmark")

        def go() -> None:
            self._chain(key, i + 1, trace, nat, tn, k, depth)
        if not marks:
            go()
            return
        old = self.box.get("mark")
        self.rewrite("mark", Pred(lambda v, o=old, s=marks: v in s or o is None or o.test(v)),
                     go)

    def _stmts(self, r: Rule, j: int, key, i: int, trace, nat, taint, k, depth) -> None:
        """Carry out rule r's statements from the j-th on; i is the rule's index."""
        def next_rule(verdict: str, tr, nt, tn) -> None:
            self._chain(key, i + 1, tr, nt, tn, k, depth)
        while j < len(r.stmts):
            s = r.stmts[j]
            kind = s[0]
            if kind == "nop":
                j += 1
                continue
            if kind == "verdict":
                v = "drop" if s[1] == "reject" else s[1]
                k(v, trace + [r.step(s[1])], nat, taint)
                return
            if kind == "offload":
                # this packet goes on through the rules; its flow's later packets skip
                # every hook on the flowtable, the later base chains of this one too: for
                # them, accept, as the hook's end (fastpath.py keeps this rule to flows
                # the ruleset has already accepted, so nothing new opens). Checked against
                # the kernel by tests/integration/test_differential.py with flowtables.
                step = r.step(f"{OFFLOAD_STEP} {s[1]}")
                if self._hook_leaf is not None:
                    self._hook_leaf(self, "accept", trace + [step], nat, taint)
                else:
                    k("accept", trace + [step], nat, taint)
                j += 1
                continue
            if kind == "return":
                k("return", trace + [r.step("return")], nat, taint)
                return
            if kind == "move":
                _, mv, dev = s
                step = r.step(f"{mv} to {dev}")
                if self._leaf is None:  # nobody follows the copy: not proven either way
                    self._stmts(r, j + 1, key, i, trace, nat,
                                taint + [f"{r.chain} #{r.handle}: {mv} to {dev}"], k, depth)
                    return
                self._leaf(self, f"{mv} {dev}", trace + [step], nat, taint)
                if mv == "fwd":  # stolen: out of dev, no later chain or hook sees it
                    return
                j += 1  # dup: the original goes on
                continue
            if kind == "nat":
                (nk, arg), = s[1].items()
                want = (arg or {}).get("family")
                if want and want != ("ip" if self.box["family"].test("ipv4") else "ip6"):
                    j += 1  # `dnat ip to` in an inet table does nothing to IPv6 packets
                    continue
                k("accept", trace + [r.step(nk)], nat + [s[1]], taint)
                return
            if kind in ("jump", "goto"):
                target = (key[0], key[1], s[1])
                tr = trace + [r.step(f"{kind} {s[1]}")]
                if kind == "jump":
                    def back(v, t2, n2, tn2, j=j) -> None:
                        if v in ("return", "none"):
                            self._stmts_after_jump(r, j + 1, key, i, t2, n2, tn2, k, depth)
                        else:
                            k(v, t2, n2, tn2)
                    self._chain(target, 0, tr, nat, taint, back, depth + 1)
                else:
                    def gone(v, t2, n2, tn2) -> None:
                        k("return" if v in ("return", "none") else v, t2, n2, tn2)
                    self._chain(target, 0, tr, nat, taint, gone, depth + 1)
                return
            if kind == "setmark":
                u = self.box.get("mark")
                parked = self.excl.deactivate("mark", u, self.dom["mark"])
                self.box["mark"] = eq_pred([s[1]])
                try:
                    self._stmts(r, j + 1, key, i, trace + [r.step(f"mark set {s[1]:#x}")],
                                nat, taint, k, depth)
                finally:
                    if u is None:
                        self.box.pop("mark", None)
                    else:
                        self.box["mark"] = u
                    self.excl.reactivate(parked)
                return
            if kind == "vmap":
                pushed = 0
                try:
                    for boxes, verdict in s[1]:
                        for b in boxes:
                            u = self.narrow(b)
                            if u is not None:
                                try:
                                    if self.point() is not None:
                                        vr = Rule(r.table, r.chain, r.handle, r.comment, [{}],
                                                  [verdict])
                                        self._stmts(vr, 0, key, i, trace, nat, taint, k,
                                                    depth)
                                finally:
                                    self.restore(u)
                            self.excl.push(b)
                            pushed += 1
                    if self.point() is not None:  # no element: the rule does nothing more
                        self._stmts_after_jump(r, j + 1, key, i, trace, nat, taint, k, depth)
                finally:
                    for _ in range(pushed):
                        self.excl.pop()
                return
            if kind == "maybe":  # the statement may stop the rule or not: both, tainted
                tn = taint + [f"{r.chain} #{r.handle}: {s[1]}"]
                if _inert(r.stmts[j + 1:]):
                    # nothing after it the evaluator follows: stopped or not, the packet
                    # goes on to the next rule in the same state, so the two branches are
                    # one (following both doubled the paths per rule: 2^n for n dscp or
                    # priority rules, docs/field-notes.md); the taint stays
                    tn += [f"{r.chain} #{r.handle}: {x[1]}" for x in r.stmts[j + 1:]
                           if x[0] == "maybe"]
                    next_rule("none", trace, nat, tn)
                    return
                self._stmts(r, j + 1, key, i, trace, nat, tn, k, depth)
                next_rule("none", trace, nat, tn)
                return
            raise AssertionError(kind)
        next_rule("none", trace, nat, taint)  # a rule without a verdict: on to the next

    def _stmts_after_jump(self, r, j, key, i, trace, nat, taint, k, depth) -> None:
        if j < len(r.stmts):
            self._stmts(r, j, key, i, trace, nat, taint, k, depth)
        else:
            self._chain(key, i + 1, trace, nat, taint, k, depth)

    # --- one concrete packet ----------------------------------------------------------
    def run_hook(self, hook: str, p: Packet) -> Outcome:
        """The verdict of one packet at `hook` (all base chains, in priority order)."""
        leaves: list[Outcome] = []

        def leaf(ev, verdict, trace, nat, taint) -> None:
            if ev.point() is not None:
                leaves.append(Outcome(verdict, list(trace), list(nat), list(taint)))
        self.explore(hook, p.box(), leaf)
        if not leaves:
            return Outcome("drop", [], [], ["no path"])
        if len({o.verdict for o in leaves}) > 1 or any(o.unknown for o in leaves):
            unknown = sorted({u for o in leaves for u in o.unknown}) or ["forked"]
            if len({o.verdict for o in leaves}) > 1:
                return Outcome("unknown", leaves[0].trace, leaves[0].nat, unknown)
            return Outcome(leaves[0].verdict, leaves[0].trace, leaves[0].nat, unknown)
        return leaves[0]


def fate(rs: Ruleset, p: Packet, route: Callable[[str], str | None], local: set[str],
         primary: Callable[[str, str], str | None] | None = None,
         traces: list[tuple[str, list[Step], list[str]]] | None = None,
         offloads: list[tuple[str, str, str]] | None = None) -> list[tuple[str, str]]:
    """What the evaluator says happens to one packet, hook by hook, as the oracle reports
    the kernel's: incoming (p.iifname set) through prerouting, then input (to a `local`
    address) or forward to the interface `route` gives, then postrouting; locally generated
    through output and postrouting. primary(iface, family): the address redirect (incoming
    interface, "lo" on output) and masquerade (outgoing interface) write. `traces` (if
    given) gets, per hook, the rules that decided and the constructs not modelled.
    `offloads` (if given) gets (hook, table, flowtable) of each `flow add` the packet
    reached: what it does to the flow's later packets (tests/integration/
    test_differential.py checks that against the kernel's flowtables)."""
    ev = Evaluator(rs)
    out: list[tuple[str, str]] = []

    def run(hook: str, pk: Packet, nat_iface: str | None) -> tuple[str, Packet]:
        got: list[tuple[str, Packet]] = []
        ev.local_addr = (lambda fam: primary(nat_iface, fam)) \
            if primary and nat_iface else None

        steps: list[tuple[list[Step], list[str]]] = []

        def leaf(e: Evaluator, verdict: str, trace: list, nat: list, taint: list) -> None:
            w = e.point()
            if w is None:
                return
            flow = next((t for t in trace if t.action.startswith(OFFLOAD_STEP)), None)
            if flow is not None:  # the flow's later packets, not this one: it goes on
                if offloads is not None:
                    offloads.append((hook, flow.table, flow.action.split("@", 1)[-1]))
                return
            after = packet_of(w) if isinstance(w, dict) else pk
            got.append(("unknown" if taint else verdict, after))
            steps.append((list(trace), list(taint)))
        ev.explore(hook, pk.box(), leaf)
        if traces is not None:
            traces.append((hook, steps[0][0] if steps else [],
                           sorted({t for _, tn in steps for t in tn})))
        if not got:
            return "drop", pk
        verdicts = {v for v, _ in got}
        return (got[0][0] if len(verdicts) == 1 else "unknown"), got[0][1]

    pk = p
    if p.iifname and rs.has_hook("ingress"):
        # the device's ingress chains first: a fwd ends the packet's way here, a dup's
        # copy leaves by its device while the original goes on
        got: list[tuple[str, str]] = []

        def ing(e: Evaluator, verdict: str, trace: list, nat: list, taint: list) -> None:
            if e.point() is not None:
                got.append(("unknown" if taint else verdict, ""))
        ev.explore("ingress", dataclasses.replace(p, oifname=None).box(), ing)
        moved = [v for v, _ in got if v.startswith(MOVES)]
        ends = sorted({v for v, _ in got if not v.startswith(MOVES)})
        out += [("ingress", v) for v in moved]
        if any(v.startswith("fwd") for v in moved):
            return out
        verdict = ends[0] if len(ends) == 1 else "unknown"
        out.append(("ingress", verdict))
        if verdict != "accept":
            return out
    if p.iifname:
        v, pk = run("prerouting", dataclasses.replace(p, oifname=None), p.iifname)
        out.append(("prerouting", v))
        if v != "accept":
            return out
        if pk.daddr in local:
            v, _ = run("input", pk, None)
            out.append(("input", v))
            return out
        oif = route(pk.daddr)
        if oif is None:
            return out + [("route", "lost")]
        v, pk = run("forward", dataclasses.replace(pk, oifname=oif), None)
        out.append(("forward", v))
        if v != "accept":
            return out
    else:
        oif = route(p.daddr)
        if oif is None:
            return [("route", "lost")]
        v, pk = run("output", dataclasses.replace(p, oifname=oif), "lo")
        out.append(("output", v))
        if v != "accept":
            return out
        if pk.daddr != p.daddr:  # NAT in output: the kernel routes the packet again
            oif = route(pk.daddr)
            if oif is None:
                return out + [("route", "lost")]
            pk = dataclasses.replace(pk, oifname=oif)
    v, _ = run("postrouting", pk, pk.oifname)
    out.append(("postrouting", v))
    return out
