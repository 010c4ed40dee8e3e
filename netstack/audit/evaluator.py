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
HAS_IFACE = Pred(lambda x: x != NO_IFACE)
ANY = Pred(lambda x: True)
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
    # issue 30's fields; None: what a packet usually has (ttl 64, dscp/ecn/frag-off 0, a
    # new connection's ct mark 0, unicast to this host, no IPsec, interface group 0). A
    # local IPv4 packet leaves with DF (frag 0x4000) where its socket does path MTU
    # discovery (the kernel's default); the oracle sends frag 0 with it off
    # (docs/field-notes.md)
    ttl: int | None = None
    dscp: int | None = None
    ecn: int | None = None
    frag: int | None = None
    ctmark: int | None = None
    pkttype: str | None = None
    ipsec: bool | None = None
    iifgroup: int | None = None
    oifgroup: int | None = None

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
            "skgid": self.skgid, "length": self.length or 0,
            "ttl": 64 if self.ttl is None else self.ttl, "dscp": self.dscp or 0,
            "ecn": self.ecn or 0, "frag": self.frag or 0,
            "pkttype": self.pkttype or "host", "ipsec": bool(self.ipsec)}
        out = {f: eq_pred([vals[f]]) for f in FIELDS if f in vals}
        # a group or none as the interfaces say (the pairings decide, also where a caller
        # gives the box another interface)
        out["ctmark"] = eq_pred([None if self.ct_state in space.NO_CONNECTION else
                                  self.ctmark or 0])
        out["iifgroup"] = eq_pred([None, self.iifgroup or 0])
        out["oifgroup"] = eq_pred([None, self.oifgroup or 0])
        return out


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
        skuid=point["skuid"], skgid=point["skgid"], length=point["length"] or None,
        # issue 30's fields, where they are not what a packet usually has
        ttl=None if point.get("ttl", 64) == 64 else point["ttl"],
        dscp=point.get("dscp") or None, ecn=point.get("ecn") or None,
        frag=point.get("frag") or None, ctmark=point.get("ctmark") or None,
        pkttype=None if point.get("pkttype", "host") == "host" else point["pkttype"],
        ipsec=point.get("ipsec") or None, iifgroup=point.get("iifgroup") or None,
        oifgroup=point.get("oifgroup") or None)


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


class Choice(Unsupported):
    """A match whose truth the ruleset alone does not decide and the evaluator explores
    both ways, untainted (issue 30): the membership of a set the packet path adds to,
    a `fib` lookup (the namespace's routes), a `socket` lookup. A PASS holds for either
    outcome, so it stays a proof."""


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

    def __init__(self, doc: dict[str, Any], fib_local: Iterable[str] | None = None) -> None:
        """`fib_local`: the addresses of the ruleset's namespace, where the caller knows
        them; `fib daddr type local` is then exact (those, 127.0.0.0/8 and ::1), else it
        is followed both ways."""
        _check_doc(doc)
        self.fib_local: frozenset[str] | None = \
            frozenset(fib_local) if fib_local is not None else None
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
        # sets the packet path adds to or updates (`add @s { ip saddr }`, meters): their
        # membership is whatever earlier packets made it, both ways for every packet
        self.dynamic: set[tuple[str, str, str]] = set()
        for (fam, tbl, _c), rs in self.rules.items():
            for r in rs:
                for x in r.get("expr", []):
                    d = x.get("set") if isinstance(x, dict) else None
                    if isinstance(d, dict) and isinstance(d.get("set"), str):
                        self.dynamic.add((fam, tbl, d["set"].lstrip("@")))
        for k, st_ in self.sets.items():
            if "dynamic" in (st_.get("flags") or []):
                self.dynamic.add(k)
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
        changed = False  # a statement before changed the packet
        for x in exprs:
            if "match" in x:
                if changed:
                    rule.unknown.append("a match after a statement that changes the packet")
                    continue
                try:
                    union = self._match(x["match"], key)
                except Choice as e:
                    rule.stmts.append(("choice", str(e)))
                    continue
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
                    st = self._stmt(x, key)
                    for one in (st[1] if st[0] == "multi" else [st]):
                        rule.stmts.append(one)
                        changed = changed or one[0] in CHANGES
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
            if (key[0], key[1], right[1:]) in self.dynamic:
                raise Choice(f"{right} (a set the packet path adds to): in it or not")
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
                 "mark": "mark", "skuid": "skuid", "skgid": "skgid", "length": "length",
                 "pkttype": "pkttype", "ipsec": "ipsec", "secpath": "ipsec",
                 "iifgroup": "iifgroup", "oifgroup": "oifgroup"}.get(k)
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
                ("ip", "ttl"): ("ttl", v4), ("ip6", "hoplimit"): ("ttl", v6),
                ("ip", "dscp"): ("dscp", v4), ("ip6", "dscp"): ("dscp", v6),
                ("ip", "ecn"): ("ecn", v4), ("ip6", "ecn"): ("ecn", v6),
                ("ip", "frag-off"): ("frag", v4),
            }
            if (proto, fld) in table:
                f, dep = table[(proto, fld)]
                return f, dict(dep), None
            if fld == "version" and proto in ("ip", "ip6"):
                # the header's version nibble: 4 for every IPv4 packet, 6 for IPv6
                return "family", dict(v4 if proto == "ip" else v6), ("version",)
            if proto == "ether" and fld == "type":
                # the frame's ethertype, which the kernel reads from the link-layer header:
                # only a packet that came in on a device has one (a local packet's read
                # breaks the rule); of an IP packet it is ip or ip6
                return "family", {"iif": HAS_IFACE}, ("ethertype",)
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
            if e["ct"].get("dir") is not None:
                raise Unsupported(f"ct {e['ct']['dir']} {k}")
            if k == "state":
                return "ct_state", {}, None
            if k == "status":
                return "ct_status", {}, None
            if k == "mark":
                return "ctmark", {}, None
            raise Unsupported(f"ct {k}")
        if isinstance(e, dict) and "&" in e:
            left, mask = e["&"]
            f, dep, _ = self._selector(left)
            if f in ("tcp_flags", "ct_status"):
                return f, dep, ("mask", space.flag_set(mask, f))
            if f in space.MASKABLE and isinstance(mask, int) and not isinstance(mask, bool):
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
        if f == "family" and transform == ("version",):
            names = {{4: "ipv4", 6: "ipv6"}.get(v, f"version {v}") for v in values}
            hit = Pred(lambda x, s=frozenset(names): x in s)
        elif f == "pkttype":
            kinds = set()
            for v in values:
                v = {"unicast": "host", 0: "host", 1: "broadcast", 2: "multicast"}.get(v, v)
                if v not in space.PKTTYPES:
                    raise Unsupported(f"meta pkttype {v!r}")
                kinds.add(v)
            hit = eq_pred(kinds)
        elif f == "ipsec":
            if not all(isinstance(v, bool) for v in values):
                raise Unsupported(f"meta ipsec {values!r}")
            hit = eq_pred(values)
        elif f == "family":
            names = {{2: "ipv4", 10: "ipv6", "ip": "ipv4", "ip6": "ipv6", 0x0800: "ipv4",
                      0x86DD: "ipv6", "0x0800": "ipv4", "0x86dd": "ipv6"}.get(v, v)
                     for v in values}
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
        elif f in space.MASKABLE and transform and transform[0] == "intmask":
            m = transform[1]
            consts = []
            for v in values:
                lo, hi = space.int_interval(v, f)
                if lo != hi:
                    raise Unsupported(f"a range under a {f} mask")
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
            if hit.exact is not None and f in ("iif", "oif", "family", "pkttype", "ipsec"):
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
            st, ss, cm = b.get("ct_state"), b.get("ct_status"), b.get("ctmark")
            if (st is None or st.test("invalid")) and (ss is None or ss.test(None)) and \
                    (cm is None or cm.test(None)):
                out.append({f: p for f, p in b.items()
                            if f not in ("ct_state", "ct_status", "ctmark")})
        return out

    def _match_boxes(self, m: dict[str, Any], key: tuple[str, str, str]) -> list[Box]:
        left, op, right = m["left"], m["op"], m["right"]
        if isinstance(left, dict) and "fib" in left:
            fib = left["fib"]
            exact = self._fib_local(fib, op, right)
            if exact is not None:
                return exact
            raise Choice(f"fib {' . '.join(map(str, fib.get('flags') or []))} "
                         f"{fib.get('result')} (the namespace's routes): either way")
        if isinstance(left, dict) and "socket" in left:
            raise Choice(f"socket {left['socket'].get('key')} (the host's sockets): "
                         "either way")
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

    def _fib_local(self, fib: dict[str, Any], op: str, right: Any) -> list[Box] | None:
        """`fib daddr type [!=] local` as a match on the destination, where the namespace's
        addresses are given (its local routes: those, 127.0.0.0/8 and ::1); None where
        the lookup stays a choice."""
        if self.fib_local is None or fib.get("result") != "type" or \
                fib.get("flags") != ["daddr"] or op not in ("==", "!="):
            return None
        vals = right.get("set") if isinstance(right, dict) else [right]
        if vals != ["local"]:
            return None
        spans: dict[str, list[tuple[int, int]]] = {
            "daddr4": [(0x7F000000, 0x7FFFFFFF)], "daddr6": [(1, 1)]}
        for a in self.fib_local:
            ip = ipaddress.ip_address(a)
            spans["daddr4" if ip.version == 4 else "daddr6"].append((int(ip), int(ip)))
        out: list[Box] = []
        for f, fam in (("daddr4", FAMILY4), ("daddr6", FAMILY6)):
            for lo, hi in spans[f]:
                self.domains.interval(f, lo, hi)
            inside = Pred(lambda x, s=tuple(spans[f]): x is not None and
                          any(lo <= x <= hi for lo, hi in s))
            out.append({"family": fam, f: inside if op == "==" else
                        Pred(lambda x, t=inside.test: x is not None and not t(x))})
        return out

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
            return self._mangle(x["mangle"]["key"], x["mangle"]["value"])
        if "notrack" in x:
            # untracked from here on, where connection tracking has not looked the packet up
            # yet (after it, the kernel's notrack does nothing)
            return ("notrack",) if self._pre else ("nop",)
        choice = _choice_of(x)
        if choice is not None:
            return ("choice", choice)
        if "tproxy" in x:
            arg = x["tproxy"] or {}
            fam = arg.get("family")
            # the kernel's tproxy breaks the rule for a packet of the other family (`tproxy
            # ip to` in an inet table) or without TCP/UDP, and where no transparent socket
            # takes the packet; otherwise the packet goes on (to that socket, by the policy
            # routing the mark usually chooses: beyond the hook, docs/security.md)
            guard: Box = {"l4proto": eq_pred([6, 17])}
            if fam in ("ip", "ip6"):
                guard["family"] = FAMILY4 if fam == "ip" else FAMILY6
            to = ":".join(str(arg[k]) for k in ("addr", "port") if k in arg)
            return ("multi", [("guard", [guard]), ("choice", f"tproxy to {to}: a socket "
                                                            "takes it or not")])
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
        name = list(x)[0]
        raise Unsupported(f"statement {name}")

    # mangling statements whose new value the evaluator follows, by field
    REWRITABLE = ("ttl", "dscp", "ecn", "frag", "saddr4", "daddr4", "saddr6", "daddr6",
                  "sport", "dport", "pkttype")

    def _mangle(self, k: Any, v: Any) -> tuple[Any, ...]:
        """A `... set ...` statement as what it changes: later rules (and base chains) see
        the packet with the new value (issue 30)."""
        if k == {"meta": {"key": "nftrace"}} or k == {"meta": {"key": "priority"}}:
            return ("nop",)  # nothing the evaluator reads (a `meta priority` match is not
            # modelled, and says so)
        if k == {"meta": {"key": "mark"}} and isinstance(v, int) and not isinstance(v, bool):
            self.domains.interval("mark", v, v)
            return ("setmark", v)
        if k == {"meta": {"key": "mark"}} and v == {"ct": {"key": "mark"}}:
            self.domains.link("mark", "ctmark")
            # no connection: reading ct mark breaks the rule
            return ("stop",) if self._pre else ("copy", "mark", "ctmark")
        if isinstance(k, dict) and k.get("ct", {}).get("key") == "mark" and \
                k["ct"].get("dir") is None:
            if self._pre:
                return ("nop",)  # no connection yet: the kernel sets nothing
            if v == {"meta": {"key": "mark"}}:
                self.domains.link("mark", "ctmark")
                return ("copy", "ctmark", "mark")
            if isinstance(v, int) and not isinstance(v, bool):
                self.domains.interval("ctmark", v, v)
                return ("ctrewrite", v)
            raise Unsupported("ct mark set from an expression")
        if isinstance(k, dict) and "ct" in k and k["ct"].get("key") != "mark":
            # ct zone, label, helper...: the packet's connection may change, but its state
            # is any the audit allows anyway; nothing else the evaluator reads changes
            return ("nop",)
        if isinstance(k, dict) and "tcp option" in k:
            return ("nop",)  # MSS clamping: no field the evaluator reads
        if isinstance(k, dict) and ("payload" in k or k.get("meta", {}).get("key") ==
                                    "pkttype") and isinstance(v, (int, str)) and \
                not isinstance(v, bool):
            f, dep, tr = self._selector(k)
            if f in self.REWRITABLE and tr is None:
                pred = self._value_pred(f, [v], None, "==")  # the constant, registered
                stmts: list[tuple[Any, ...]] = []
                if dep:  # `ip dscp set` in an inet table: only IPv4 packets (nft's
                    stmts.append(("guard", [dep]))  # dependency breaks the rule for others)
                what = _describe_key(k)
                stmts.append(("rewrite", f, pred, f"{what} set {v}"))
                return ("multi", stmts)
        what = " ".join(str(w) for w in (next(iter(k.values()), {}) or {}).values()) \
            if isinstance(k, dict) else ""
        raise Unsupported(f"a mangle statement ({next(iter(k), '?')} {what} set)".replace(
            "  ", " "))


# statements that change the packet (a match after one in the same rule reads the new value)
CHANGES = ("setmark", "rewrite", "ctrewrite", "copy", "notrack")


def _describe_key(k: dict[str, Any]) -> str:
    if "payload" in k:
        return f"{k['payload'].get('protocol')} {k['payload'].get('field')}"
    if "meta" in k:
        return f"meta {k['meta'].get('key')}"
    return next(iter(k), "?")


def _choice_of(x: dict[str, Any]) -> str | None:
    """The statements whose outcome is not the ruleset's to say (rate limits, quotas,
    meters, connection counts, adding to a set that may be full): each either lets the
    rule go on or stops it, and the evaluator follows both (issue 30)."""
    def rate(a: dict[str, Any]) -> str:
        over = "over " if a.get("inv") else ""
        unit = f" {a['rate_unit']}" if a.get("rate_unit") not in (None, "packets") else ""
        return f"{over}{a.get('rate')}{unit}/{a.get('per')}"
    if "limit" in x:
        return f"limit rate {rate(x['limit'] or {})}: within or not"
    if "quota" in x:
        a = x["quota"] or {}
        return (f"quota {'over ' if a.get('inv') else ''}{a.get('val')} "
                f"{a.get('val_unit', 'bytes')}: used up or not")
    if "ct count" in x:
        a = x["ct count"] or {}
        return f"ct count {'over ' if a.get('inv') else ''}{a.get('val')}: reached or not"
    if "meter" in x:
        return f"meter {(x['meter'] or {}).get('name', '?')}: within or not"
    d = x.get("set")
    if isinstance(d, dict) and "op" in d:
        return f"{d.get('op')} {d.get('set')}: taken (or within its limit) or not"
    return None


def _inert(stmts: list[tuple[Any, ...]]) -> bool:
    """Statements that change nothing the evaluator follows (counters, logs, mangling of
    fields it does not read, limits with nothing after them): whether they run or stop,
    the packet goes on to the next rule in the same modelled state."""
    return all(s[0] in ("nop", "maybe", "choice") for s in stmts)


def _soft(stmts: list[tuple[Any, ...]]) -> bool:
    """Statements after which the packet always goes on to the next rule, changing at
    most its mark: inert ones and `meta mark set`."""
    return all(s[0] in ("nop", "maybe", "setmark", "choice") for s in stmts)


def and_dep(a: Pred | None, b: Pred) -> Pred:
    return b if a is None else space.and_pred(a, b)


# --- exploring ----------------------------------------------------------------------------

Leaf = Callable[["Evaluator", str, list[Step], list[dict[str, Any]], list[str]], None]


CONNECTED = eq_pred(s for s in space.CT_STATES if s not in space.NO_CONNECTION)
COMPANION = {"iif": "iifgroup", "oif": "oifgroup"}  # a field whose value goes with another's
CHOSE = ("(went on)", "(stopped the rule)")  # the trace steps of a choice's two ways
NOT_NONE = Pred(lambda x: x is not None)
PAIRINGS: tuple[Box, ...] = (
    {"skuid": eq_pred([None]), "skgid": NOT_NONE},
    {"skgid": eq_pred([None]), "skuid": NOT_NONE},
    {"ct_state": eq_pred(space.NO_CONNECTION), "ct_status": NOT_NONE},
    {"ct_state": CONNECTED, "ct_status": eq_pred([None])},
    # a ct mark exactly where there is a connection; a group exactly where a device
    {"ct_state": eq_pred(space.NO_CONNECTION), "ctmark": NOT_NONE},
    {"ct_state": CONNECTED, "ctmark": eq_pred([None])},
    {"iif": eq_pred([NO_IFACE]), "iifgroup": NOT_NONE},
    {"iif": HAS_IFACE, "iifgroup": eq_pred([None])},
    {"oif": eq_pred([NO_IFACE]), "oifgroup": NOT_NONE},
    {"oif": HAS_IFACE, "oifgroup": eq_pred([None])},
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
        constraints on its old value are projected away (see Exclusions.deactivate). A new
        interface has a group of its own: the old one's is released with it (a projected
        pairing would otherwise tie the new interface to the old group)."""
        g = COMPANION.get(f)
        if g is not None:
            self._rewrite(g, ANY, lambda: self._rewrite(f, p, then))
            return
        self._rewrite(f, p, then)

    def _rewrite(self, f: str, p: Pred, then: Callable[[], None]) -> None:
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
                if not r.unknown and all(s[0] in ("nop", "choice") for s in r.stmts):
                    continue  # counter, log, a limit with nothing after: no effect
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
            if kind == "choice":  # both outcomes, untainted: a PASS holds for either
                if _inert(r.stmts[j + 1:]):
                    # nothing after it the evaluator follows: either way the packet goes on
                    # to the next rule in the same state (one way, not two: no 2^n)
                    tn = taint + [f"{r.chain} #{r.handle}: {x[1]}" for x in r.stmts[j + 1:]
                                  if x[0] == "maybe"]
                    next_rule("none", trace, nat, tn)
                    return
                what = s[1].split(":", 1)[0]
                self._stmts(r, j + 1, key, i, trace + [r.step(f"{what} (went on)")], nat,
                            taint, k, depth)
                if self.point() is not None:
                    next_rule("none", trace + [r.step(f"{what} (stopped the rule)")], nat,
                              taint)
                return
            if kind == "stop":  # the rule breaks here (a read that fails)
                next_rule("none", trace, nat, taint)
                return
            if kind == "guard":  # a dependency of the statements after: outside it the
                pushed = 0       # rule stops
                try:
                    for b in s[1]:
                        u = self.narrow(b)
                        if u is not None:
                            try:
                                if self.point() is not None:
                                    self._stmts(r, j + 1, key, i, trace, nat, taint, k, depth)
                            finally:
                                self.restore(u)
                        self.excl.push(b)
                        pushed += 1
                    if self.point() is not None:
                        next_rule("none", trace, nat, taint)
                finally:
                    for _ in range(pushed):
                        self.excl.pop()
                return
            if kind == "rewrite":
                _, f, pred, label = s
                tr = trace + [r.step(label)]
                self.rewrite(f, pred, lambda j=j, tr=tr: self._stmts(
                    r, j + 1, key, i, tr, nat, taint, k, depth))
                return
            if kind == "notrack":
                self._notrack(r, j, key, i, trace, nat, taint, k, depth)
                return
            if kind == "ctrewrite":
                self._with_connection(r, j, key, i, trace, nat, taint, k, depth,
                                      lambda go, v=s[1]: self.rewrite("ctmark", eq_pred([v]),
                                                                      go),
                                      f"ct mark set {s[1]:#x}", broken=False)
                return
            if kind == "copy":
                _, dst, src = s
                label = f"{'ct mark' if dst == 'ctmark' else 'meta mark'} set " \
                        f"{'ct mark' if src == 'ctmark' else 'meta mark'}"
                over = taint + [f"{r.chain} #{r.handle}: {label} over more than "
                                f"{self.COPY_FORKS} classes (over-approximated)"]

                tr_c = trace + [r.step(label)]

                def tainted(j=j, tr=tr_c, tn=over) -> None:
                    self._stmts(r, j + 1, key, i, tr, nat, tn, k, depth)
                self._with_connection(r, j, key, i, trace, nat, taint, k, depth,
                                      lambda go, d=dst, c=src, t=tainted:
                                      self._copy(d, c, go, t), label, broken=src == "ctmark")
                return
            raise AssertionError(kind)
        next_rule("none", trace, nat, taint)  # a rule without a verdict: on to the next

    def _with_connection(self, r, j, key, i, trace, nat, taint, k, depth,
                         change: Callable[[Callable[[], None]], None], label: str,
                         broken: bool) -> None:
        """A statement on the packet's connection: packets with one get `change`; for those
        without (invalid, untracked) the kernel does nothing (a ct set) or the rule breaks
        (`broken`: a ct read)."""
        def go_on() -> None:
            self._stmts(r, j + 1, key, i, trace + [r.step(label)], nat, taint, k, depth)
        u = self.narrow({"ct_state": CONNECTED})
        if u is not None:
            try:
                if self.point() is not None:
                    change(go_on)
            finally:
                self.restore(u)
        u = self.narrow({"ct_state": eq_pred(space.NO_CONNECTION)})
        if u is not None:
            try:
                if self.point() is not None:
                    if broken:
                        self._chain(key, i + 1, trace, nat, taint, k, depth)
                    else:
                        self._stmts(r, j + 1, key, i, trace, nat, taint, k, depth)
            finally:
                self.restore(u)

    COPY_FORKS = 64  # more classes of a copy's source: over-approximated, tainted

    def _copy(self, dst: str, src: str, then: Callable[[], None],
              tainted: Callable[[], None]) -> None:
        """dst takes src's value: one way per class of src in the region (the two fields
        share their classes, Domains.link), so the copy is exact. Past COPY_FORKS classes
        (marks under wide masks) dst takes any value src may have, on a tainted way: no
        PASS rests on it, and the walk stays bounded."""
        p = self.box.get(src)
        vals = [v for v in (p.exact if p is not None and p.exact is not None else
                            p.reps(self.dom[src]) if p is not None else self.dom[src])
                if v is not None]
        if len(vals) > self.COPY_FORKS:
            self.rewrite(dst, p if p is not None else NOT_NONE, tainted)
            return
        for v in sorted(vals):
            u = self.narrow({src: eq_pred([v])})
            if u is None:
                continue
            try:
                if self.point() is not None:
                    self.rewrite(dst, eq_pred([v]), then)
            finally:
                self.restore(u)

    def _notrack(self, r, j, key, i, trace, nat, taint, k, depth) -> None:
        """`notrack` before connection tracking: the packet stays untracked (ct state
        untracked, no status, no ct mark) for every later chain; a packet looped back on
        lo keeps the connection its output made (the kernel's notrack skips it)."""
        def go(tr: list[Step]) -> None:
            self._stmts(r, j + 1, key, i, tr, nat, taint, k, depth)
        u = self.narrow({"iif": eq_pred(["lo"])})
        if u is not None:
            try:
                if self.point() is not None:
                    go(trace)
            finally:
                self.restore(u)
        u = self.narrow({"iif": Pred(lambda x: x != "lo")})
        if u is None:
            return
        try:
            if self.point() is None:
                return
            tr = trace + [r.step("notrack")]
            self.rewrite("ct_state", eq_pred(["untracked"]), lambda: self.rewrite(
                "ct_status", eq_pred([None]), lambda: self.rewrite(
                    "ctmark", eq_pred([None]), lambda: go(tr))))
        finally:
            self.restore(u)

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
            # what it depends on: the constructs not modelled, else the choices taken
            # differently on the ways (a limit, a fib or socket lookup...)
            chose = {f"{st.chain} #{st.handle}: {st.action.rsplit(' (', 1)[0]} (either way)"
                     for o in leaves for st in o.trace if st.action.endswith(CHOSE)}
            unknown = sorted({u for o in leaves for u in o.unknown}) or sorted(chose) or \
                ["forked"]
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
    test_differential.py checks that against the kernel's flowtables). Where the verdict
    depends on a choice (a limit, a fib lookup...) the hook's verdict is "unknown"; fates()
    gives each way."""
    return _fates(rs, p, route, local, primary, traces, offloads, False)[0]


def fates(rs: Ruleset, p: Packet, route: Callable[[str], str | None], local: set[str],
          primary: Callable[[str, str], str | None] | None = None) -> list[list[tuple[str, str]]]:
    """Every fate the packet may have: one per way through the choices the evaluator
    explores both ways (a limit within its rate or not, a set that holds the packet or
    not...). The kernel's fate must be one of them (tests/integration/test_differential.py)."""
    out: list[list[tuple[str, str]]] = []
    for f in _fates(rs, p, route, local, primary, None, None, True):
        if f not in out:
            out.append(f)
    return out


def _fates(rs: Ruleset, p: Packet, route: Callable[[str], str | None], local: set[str],
           primary: Callable[[str, str], str | None] | None,
           traces: list[tuple[str, list[Step], list[str]]] | None,
           offloads: list[tuple[str, str, str]] | None,
           branch: bool) -> list[list[tuple[str, str]]]:
    ev = Evaluator(rs)
    results: list[list[tuple[str, str]]] = []

    def run(hook: str, pk: Packet, nat_iface: str | None) -> list[tuple[str, Packet]]:
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
            return [("drop", pk)]
        if branch:
            ways: list[tuple[str, Packet]] = []
            for v, a in got:
                if (v, a) not in ways:
                    ways.append((v, a))
            return ways
        verdicts = {v for v, _ in got}
        return [((got[0][0] if len(verdicts) == 1 else "unknown"), got[0][1])]

    def post(out: list[tuple[str, str]], pk: Packet) -> None:
        for v, _ in run("postrouting", pk, pk.oifname):
            results.append(out + [("postrouting", v)])

    def forward(out: list[tuple[str, str]], pk: Packet) -> None:
        oif = route(pk.daddr)
        ttl = 64 if pk.ttl is None else pk.ttl
        if oif is None or ttl <= 1:  # no route; or the TTL (hop limit) runs out: the
            results.append(out + [("route", "lost")])  # kernel drops it before forward
            return
        # forwarding takes one off the TTL before the forward hook (ip_forward)
        for v, pk2 in run("forward", dataclasses.replace(pk, oifname=oif, ttl=ttl - 1), None):
            o = out + [("forward", v)]
            if v != "accept":
                results.append(o)
                continue
            post(o, pk2)

    out: list[tuple[str, str]] = []
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
            return [out]
        verdict = ends[0] if len(ends) == 1 else "unknown"
        out.append(("ingress", verdict))
        if verdict != "accept":
            return [out]
    if p.iifname:
        for v, pk in run("prerouting", dataclasses.replace(p, oifname=None), p.iifname):
            o = out + [("prerouting", v)]
            if v != "accept":
                results.append(o)
                continue
            if pk.daddr in local:
                for v2, _ in run("input", pk, None):
                    results.append(o + [("input", v2)])
                continue
            forward(o, pk)
        return results
    oif = route(p.daddr)
    if oif is None:
        return [[("route", "lost")]]
    for v, pk in run("output", dataclasses.replace(p, oifname=oif), "lo"):
        o = [("output", v)]
        if v != "accept":
            results.append(o)
            continue
        if pk.daddr != p.daddr:  # NAT in output: the kernel routes the packet again
            oif2 = route(pk.daddr)
            if oif2 is None:
                results.append(o + [("route", "lost")])
                continue
            pk = dataclasses.replace(pk, oifname=oif2)
        post(o, pk)
    return results
