"""The packet space the audit reasons over: one field per selector the evaluator supports,
and for each field a finite set of representative values, one per equivalence class of
every predicate the ruleset (or a property) can ask about it.

Why the representatives are complete (docs/security.md says it for users): every
supported match compares ONE field with constants (after its protocol dependencies, which
are themselves field constraints). For an ordered field (ports, addresses, marks, uids,
lengths, types) each constant, range or prefix is an interval [lo, hi]; the truth of all of
them is constant between consecutive cut points {lo, hi + 1}, so the domain minimum plus
every cut point hits every class. Interface names: a class is the exact constant a name
equals, or else the longest wildcard prefix it starts with: each constant, each prefix +
"~" and one unmatched name. Flag fields (TCP flags, ct status): every combination of
the bits any rule mentions. Masked marks: every pattern of the masked bits, each exact
constant, and a value equal to none. ct state and the family are small enumerations;
socket owners (skuid, skgid) add "no socket". A packet's class is a tuple of per-field
classes, and a rule's verdict depends only on that tuple, so exploring the product of the
representatives (which the evaluator does lazily, region by region) covers every packet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

FIELDS = ("family", "iif", "oif", "saddr4", "daddr4", "saddr6", "daddr6", "l4proto", "sport",
          "dport", "tcp_flags", "icmp_type", "icmp_code", "ct_state", "ct_status", "mark",
          "skuid", "skgid", "length",
          # issue 30: the header fields and packet state real rulesets read (ttl is ip ttl
          # or ip6 hoplimit, dscp and ecn of either family, frag ip frag-off with its flag
          # bits), the connection's mark, the link-layer packet type, whether the packet
          # came through IPsec, and the interface groups
          "ttl", "dscp", "ecn", "frag", "ctmark", "pkttype", "ipsec", "iifgroup", "oifgroup")
ORDERED = {"saddr4": 2**32 - 1, "daddr4": 2**32 - 1, "saddr6": 2**128 - 1,
           "daddr6": 2**128 - 1, "sport": 65535, "dport": 65535, "icmp_type": 255,
           "icmp_code": 255, "l4proto": 255, "length": 65535, "mark": 2**32 - 1,
           "skuid": 2**32 - 2, "skgid": 2**32 - 2, "ttl": 255, "dscp": 63, "ecn": 3,
           "frag": 65535, "ctmark": 2**32 - 1, "iifgroup": 2**32 - 1, "oifgroup": 2**32 - 1}
# ordered fields that may be absent (None): no socket (skuid, skgid), no connection (ct
# mark: reading it breaks the rule), no device (the group of an interface not known yet)
NULLABLE = ("skuid", "skgid", "ctmark", "iifgroup", "oifgroup")
# fields compared under a bit mask (`meta mark & 0xff == 1`, `ip frag-off & 0x1fff != 0`)
MASKABLE = ("mark", "ctmark", "frag")
PKTTYPES = ("host", "broadcast", "multicast", "other")
NAMES = ("iif", "oif")
FLAGS = ("tcp_flags", "ct_status")
CT_STATES = ("new", "established", "related", "invalid", "untracked")
NO_CONNECTION = ("invalid", "untracked")  # packets without a conntrack entry
NO_IFACE = ""  # what meta iifname/oifname read where the interface is not known yet

L4 = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
      "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132, "udplite": 136, "dccp": 33}
# the other names nft takes for IP protocols (/etc/protocols, as `nft -j` lists them:
# `ip protocol ospf`, `meta l4proto vrrp`)
L4_MORE = {"hopopt": 0, "ggp": 3, "ipencap": 4, "st": 5, "egp": 8, "igp": 9, "pup": 12,
           "hmp": 20, "xns-idp": 22, "rdp": 27, "iso-tp4": 29, "xtp": 36, "ddp": 37,
           "idpr-cmtp": 38, "ipv6": 41, "ipv6-route": 43, "ipv6-frag": 44, "idrp": 45,
           "rsvp": 46, "skip": 57, "ipv6-nonxt": 59, "ipv6-opts": 60, "rspf": 73, "vmtp": 81,
           "eigrp": 88, "ospf": 89, "ax.25": 93, "ipip": 94, "etherip": 97, "encap": 98,
           "pim": 103, "ipcomp": 108, "vrrp": 112, "l2tp": 115, "isis": 124, "fc": 133,
           "mobility-header": 135, "mpls-in-ip": 137, "manet": 138, "hip": 139,
           "shim6": 140, "wesp": 141, "rohc": 142, "ethernet": 143}
L4_NAME = {v: k for k, v in {**L4_MORE, **L4}.items() if k != "ipv6-icmp"}
L4 = {**L4, **L4_MORE}
DSCP = {"cs0": 0, "cs1": 8, "cs2": 16, "cs3": 24, "cs4": 32, "cs5": 40, "cs6": 48, "cs7": 56,
        "af11": 10, "af12": 12, "af13": 14, "af21": 18, "af22": 20, "af23": 22, "af31": 26,
        "af32": 28, "af33": 30, "af41": 34, "af42": 36, "af43": 38, "ef": 46, "va": 44,
        "le": 1, "lephb": 1}
ECN = {"not-ect": 0, "ect1": 1, "ect0": 2, "ce": 3}
PORT_PROTOS = frozenset({6, 17, 33, 132, 136})
ICMP_TYPES = {"echo-reply": 0, "destination-unreachable": 3, "source-quench": 4,
              "redirect": 5, "echo-request": 8, "router-advertisement": 9,
              "router-solicitation": 10, "time-exceeded": 11, "parameter-problem": 12,
              "timestamp-request": 13, "timestamp-reply": 14, "info-request": 15,
              "info-reply": 16, "address-mask-request": 17, "address-mask-reply": 18}
ICMP6_TYPES = {"destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3,
               "parameter-problem": 4, "echo-request": 128, "echo-reply": 129,
               "mld-listener-query": 130, "mld-listener-report": 131,
               "mld-listener-done": 132, "mld-listener-reduction": 132,
               "nd-router-solicit": 133, "nd-router-advert": 134, "nd-neighbor-solicit": 135,
               "nd-neighbor-advert": 136, "nd-redirect": 137, "router-renumbering": 138,
               "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142,
               "mld2-listener-report": 143}
ICMP_CODES = {"net-unreachable": 0, "host-unreachable": 1, "prot-unreachable": 2,
              "port-unreachable": 3, "frag-needed": 4, "net-prohibited": 9,
              "host-prohibited": 10, "admin-prohibited": 13}
ICMP6_CODES = {"no-route": 0, "admin-prohibited": 1, "addr-unreachable": 3,
               "port-unreachable": 4, "policy-fail": 5, "reject-route": 6}
TCP_FLAG_BITS = ("fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr")  # bit 0 first
CT_STATUS_BITS = ("expected", "seen-reply", "assured", "confirmed", "snat", "dnat", "dying")

Box = dict[str, "Pred"]


class Unsupported(Exception):
    """A construct whose whole domain the evaluator cannot cover (named in UNPROVEN)."""


@dataclass(frozen=True, eq=False)
class Pred:
    """A constraint on one field: `test` is the exact semantics (on any value, also a
    concrete packet's), `values` the representatives it admits (None: compute from the
    domain), `exact` an explicit finite value set (equality constants: indexable)."""

    test: Callable[[Any], bool]
    exact: frozenset | None = None
    what: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def reps(self, domain: tuple) -> frozenset:
        # keyed by the domain's identity, and the domain kept with the answer: an id is
        # reused once its object is gone, and a stale class set would be a wrong proof
        hit = self._cache.get(id(domain))
        if hit is not None and hit[0] is domain:
            return hit[1]
        r = frozenset(v for v in domain if self.test(v))
        self._cache[id(domain)] = (domain, r)
        return r


def eq_pred(values: Iterable[Any], what: str = "") -> Pred:
    s = frozenset(values)
    return Pred(s.__contains__, s, what)


def and_pred(a: Pred, b: Pred) -> Pred:
    if a.exact is not None:
        return eq_pred((v for v in a.exact if b.test(v)), a.what)
    if b.exact is not None:
        return eq_pred((v for v in b.exact if a.test(v)), b.what)
    return Pred(lambda v: a.test(v) and b.test(v), None, f"{a.what} & {b.what}")


def intersect(a: Box, b: Box) -> Box | None:
    """a ∧ b, or None when a field's constraints cannot both hold on any listed value."""
    out = dict(a)
    for f, p in b.items():
        q = out.get(f)
        r = p if q is None else and_pred(q, p)
        if r.exact is not None and not r.exact:
            return None
        out[f] = r
    return out


# --- values -------------------------------------------------------------------------

def addr_interval(v: Any, six: bool) -> tuple[int, int]:
    """An address, prefix or range as an integer interval."""
    if isinstance(v, dict) and "prefix" in v:
        net = ipaddress.ip_network(f"{v['prefix']['addr']}/{v['prefix']['len']}", strict=False)
        _check_family(net.version, six)
        return int(net.network_address), int(net.broadcast_address)
    if isinstance(v, dict) and "range" in v:
        lo, hi = (ipaddress.ip_address(x) for x in v["range"])
        _check_family(lo.version, six)
        return int(lo), int(hi)
    if isinstance(v, str):
        a = ipaddress.ip_address(v)
        _check_family(a.version, six)
        return int(a), int(a)
    raise Unsupported(f"address value {v!r}")


def _check_family(version: int, six: bool) -> None:
    if (version == 6) != six:
        raise Unsupported("an address of the other family")


def int_interval(v: Any, f: str, family: str | None = None) -> tuple[int, int]:
    if isinstance(v, bool):
        raise Unsupported(f"{f} value {v!r}")
    if isinstance(v, int):
        return v, v
    if isinstance(v, dict) and "range" in v:
        lo, hi = (int_interval(x, f, family)[0] for x in v["range"])
        return lo, hi
    if isinstance(v, str):
        if f == "l4proto" and v in L4:
            return L4[v], L4[v]
        if f == "icmp_type":
            table = ICMP6_TYPES if family == "ipv6" else ICMP_TYPES
            if v in table:
                return table[v], table[v]
        if f == "icmp_code":
            table = ICMP6_CODES if family == "ipv6" else ICMP_CODES
            if v in table:
                return table[v], table[v]
        if f == "dscp" and v in DSCP:
            return DSCP[v], DSCP[v]
        if f == "ecn" and v in ECN:
            return ECN[v], ECN[v]
        if f in ("iifgroup", "oifgroup") and v == "default":
            return 0, 0
        if v.isdigit():
            return int(v), int(v)
        if v.startswith("0x"):
            try:
                return int(v, 16), int(v, 16)
            except ValueError:
                pass
        if f in ("skuid", "skgid"):
            import grp
            import pwd

            try:
                n = (pwd.getpwnam(v).pw_uid if f == "skuid" else grp.getgrnam(v).gr_gid)
            except KeyError:
                raise Unsupported(f"{f} {v!r}: no such user or group here") from None
            return n, n
    raise Unsupported(f"{f} value {v!r}")


def flag_set(v: Any, f: str) -> frozenset[str]:
    """The bits a flag value names: a name, a list of names, an OR of them (`fin|ack`,
    listed as {"|": [...]}) or a number (`tcp flags == 0x11`)."""
    names = TCP_FLAG_BITS if f == "tcp_flags" else CT_STATUS_BITS
    items = v if isinstance(v, list) else [v]
    out: set[str] = set()
    for x in items:
        if isinstance(x, dict) and set(x) == {"|"} and isinstance(x["|"], list):
            out |= flag_set(x["|"], f)
            continue
        if isinstance(x, int) and not isinstance(x, bool) and f == "tcp_flags" and \
                0 <= x < 256:
            out |= {n for i, n in enumerate(names) if x >> i & 1}
            continue
        if not isinstance(x, str) or x not in names:
            raise Unsupported(f"{f} value {x!r}")
        out.add(x)
    return frozenset(out)


# --- domains ------------------------------------------------------------------------

class Domains:
    """Constants per field, collected from rulesets and properties; `build` turns them into
    the representative values (see the module docstring for why they are complete)."""

    def __init__(self) -> None:
        self.cuts: dict[str, set[int]] = {f: set() for f in ORDERED}
        self.names: dict[str, set[str]] = {f: set() for f in NAMES}
        self.prefixes: dict[str, set[str]] = {f: set() for f in NAMES}
        self.bits: dict[str, set[str]] = {f: set() for f in FLAGS}
        self.masks: dict[str, set[tuple[int, int]]] = {f: set() for f in MASKABLE}
        # fields copied into each other (`meta mark set ct mark`): their classes must be
        # the same, so that a copied representative is a representative of the target
        self.links: set[tuple[str, str]] = set()
        self._built: dict[str, tuple] | None = None

    def interval(self, f: str, lo: int, hi: int) -> None:
        self.cuts[f].update((lo, hi + 1))
        self._built = None

    def name(self, f: str, n: str) -> None:
        if n.endswith("*") and not n.endswith("\\*"):
            self.prefixes[f].add(n[:-1])
        else:
            self.names[f].add(n.replace("\\*", "*"))
        self._built = None

    def flags(self, f: str, bits: Iterable[str]) -> None:
        self.bits[f].update(bits)
        self._built = None

    def mask(self, f: str, m: int, c: int) -> None:
        self.masks[f].add((m, c))
        self._built = None

    def link(self, a: str, b: str) -> None:
        self.links.add((a, b))
        self._built = None

    def merge(self, other: Domains) -> None:
        for f in ORDERED:
            self.cuts[f] |= other.cuts[f]
        for f in NAMES:
            self.names[f] |= other.names[f]
            self.prefixes[f] |= other.prefixes[f]
        for f in FLAGS:
            self.bits[f] |= other.bits[f]
        for f in MASKABLE:
            self.masks[f] |= other.masks[f]
        self.links |= other.links
        self._built = None

    def build(self) -> dict[str, tuple]:
        if self._built is not None:
            return self._built
        d: dict[str, tuple] = {"family": ("ipv4", "ipv6"), "ct_state": CT_STATES,
                               "pkttype": PKTTYPES, "ipsec": (False, True)}
        cuts = {f: set(c) for f, c in self.cuts.items()}
        masks = {f: set(m) for f, m in self.masks.items()}
        for a, b in self.links:  # a copy's two fields share their classes
            cuts[a] = cuts[b] = cuts[a] | cuts[b]
            if a in masks and b in masks:
                masks[a] = masks[b] = masks[a] | masks[b]
        for f, top in ORDERED.items():
            d[f] = tuple(sorted({0} | {c for c in cuts[f] if 0 <= c <= top}))
        d["l4proto"] = tuple(sorted(set(d["l4proto"]) | {1, 6, 17, 58, 253}))
        d["ttl"] = tuple(sorted(set(d["ttl"]) | {64}))  # a readable witness's class
        for f in MASKABLE:
            if masks[f]:
                d[f] = self._mask_reps(f, d[f], masks[f])
        for f in NULLABLE:
            d[f] = (None, *d[f])
        for f in NAMES:
            names = self.names[f] | {NO_IFACE}
            names |= {p + "~" for p in self.prefixes[f]}  # "~": in no name of ours
            other = next(n for n in (f"other{i}" for i in range(100))
                         if n not in names and not n.startswith(tuple(self.prefixes[f])))
            d[f] = tuple(sorted(names | {other}))
        for f in FLAGS:
            bits = sorted(self.bits[f])
            if len(bits) > 10:
                raise Unsupported(f"{f}: more than 10 distinct bits")
            d[f] = tuple(frozenset(b for i, b in enumerate(bits) if n >> i & 1)
                         for n in range(1 << len(bits)))
        d["ct_status"] = (None, *d["ct_status"])  # no connection at all
        self._built = d
        return d

    @staticmethod
    def _mask_reps(f: str, plain: tuple, masks: set[tuple[int, int]]) -> tuple:
        """Representatives of a field read under masks: `x & m == c` depends on each bit
        some constant c sets, and, of the other masked bits, only on whether any bit of
        each group of bits the same masks cover is set (`ip frag-off & 0x1fff != 0`: one
        group of 13 bits, one bit for it). Every pattern of those bits (one bit standing
        for each group), and each also with a bit no mask covers (equal to no constant)."""
        width = ORDERED[f].bit_length()
        union = 0
        for m, _ in masks:
            union |= m
        tracked = 0
        for _, c in masks:
            tracked |= c
        groups: dict[frozenset, int] = {}
        for i in range(width):
            if union >> i & 1 and not tracked >> i & 1:
                sig = frozenset(m for m, _ in masks if m >> i & 1)
                groups.setdefault(sig, i)  # the lowest bit stands for its group
        bits = [i for i in range(width) if tracked >> i & 1] + sorted(groups.values())
        if len(bits) > 12:
            raise Unsupported(f"{f} masks over more than 12 distinct bits")
        free = next((i for i in range(width - 1, -1, -1) if not union >> i & 1), None)
        reps = set(plain)
        for n in range(1 << len(bits)):
            pattern = sum(1 << b for i, b in enumerate(bits) if n >> i & 1)
            reps.add(pattern)
            if free is not None:  # the same masked bits, equal to no exact constant
                reps.add(pattern | 1 << free)
        return tuple(sorted(reps))


# --- regions: a box minus the boxes excluded on the way there ---------------------------

SMALL = 64


_LAYOUTS: dict[int, tuple[Box, list[tuple[str, frozenset]], list[str]]] = {}


def _layout(b: Box) -> tuple[list[tuple[str, frozenset]], list[str]]:
    """The fields box b pins to a few exact values (and those), and the others: the same
    boxes (a rule's) are pushed and popped thousands of times in a walk."""
    hit = _LAYOUTS.get(id(b))
    if hit is not None and hit[0] is b:
        return hit[1], hit[2]
    pinned: list[tuple[str, frozenset]] = []
    wild: list[str] = []
    for f in FIELDS:
        p = b.get(f)
        if p is not None and p.exact is not None and len(p.exact) <= SMALL:
            pinned.append((f, p.exact))
        else:
            wild.append(f)
    if len(_LAYOUTS) > 200_000:
        _LAYOUTS.clear()
    _LAYOUTS[id(b)] = (b, pinned, wild)
    return pinned, wild


class Exclusions:
    """The boxes a path has excluded (rules it did not match), with an index from a field's
    exact values to the boxes constraining that field to them, so that only the boxes that
    can intersect a region are looked at (a 10,000-rule chain stays linear)."""

    def __init__(self) -> None:
        self.orig: list[Box] = []  # as pushed (what the index is made of)
        self.boxes: list[Box | None] = []  # as in force (projected, or None: set aside)
        self.by_val: dict[str, dict[Any, list[int]]] = {f: {} for f in FIELDS}
        self.wild: dict[str, list[int]] = {f: [] for f in FIELDS}
        self.loose: list[int] = []  # projected boxes: the index no longer describes them

    def push(self, b: Box) -> None:
        i = len(self.boxes)
        self.boxes.append(b)
        self.orig.append(b)
        pinned, wild = _layout(b)
        for f, vals in pinned:
            by = self.by_val[f]
            for v in vals:
                by.setdefault(v, []).append(i)
        for f in wild:
            self.wild[f].append(i)

    def pop(self) -> None:
        self.boxes.pop()
        b = self.orig.pop()
        pinned, wild = _layout(b)
        for f, vals in pinned:
            by = self.by_val[f]
            for v in vals:
                lst = by[v]
                lst.pop()
                if not lst:
                    del by[v]
        for f in wild:
            self.wild[f].pop()

    def deactivate(self, f: str, current: Pred | None = None,
                   domain: tuple = ()) -> list[tuple[int, Box | None]]:
        """Field f is about to be rewritten (a mark set, a NAT, the next hop's interface):
        project the excluded boxes that constrain it. Where every value f has now meets the
        box's constraint on f, the box keeps its other constraints (an antispoof rule's
        `iif X, saddr != A` still says saddr = A once the iif changes); otherwise it is set
        aside (an over-approximation: more packets, never fewer). Returns the undo token."""
        vals = (current.exact if current is not None and current.exact is not None else
                current.reps(domain) if current is not None else domain)
        undo: list[tuple[int, Box | None]] = []
        for i, b in enumerate(self.boxes):
            if b is None or f not in b:
                continue
            undo.append((i, b))
            p = b[f]
            if vals and all(p.test(v) for v in vals):
                rest = {g: q for g, q in b.items() if g != f}
                self.boxes[i] = rest if rest else b  # the region cannot escape it: keep it
                self.loose.append(i)
            else:
                self.boxes[i] = None
        return undo

    def reactivate(self, undo: list[tuple[int, Box | None]]) -> None:
        for i, b in reversed(undo):
            if self.boxes[i] is not None and self.boxes[i] is not b:
                self.loose.remove(i)
            self.boxes[i] = b

    def relevant(self, box: Box, domain: dict[str, tuple]) -> list[Box]:
        """The active excluded boxes that may intersect `box`."""
        best_f, best_n = None, len(self.boxes) + 1
        for f, p in box.items():
            vals = p.exact
            if vals is None or len(vals) > 8:
                continue
            n = len(self.wild[f]) + sum(len(self.by_val[f].get(v, ())) for v in vals)
            if n < best_n:
                best_f, best_n = f, n
        if best_f is None:
            ids: Iterable[int] = range(len(self.boxes))
        else:
            cand = list(self.wild[best_f])
            for v in box[best_f].exact or ():
                cand += self.by_val[best_f].get(v, [])
            ids = sorted(set(cand) | set(self.loose))
        out = []
        for i in ids:
            b = self.boxes[i]
            if b is not None and _may_meet(box, b, domain):
                out.append(b)
        return out


def _may_meet(a: Box, b: Box, domain: dict[str, tuple]) -> bool:
    for f, p in b.items():
        q = a.get(f)
        if q is None:
            continue
        if q.exact is not None and (p.exact is None or len(q.exact) <= len(p.exact)):
            hit = any(p.test(v) for v in q.exact)
        elif p.exact is not None:
            hit = any(q.test(v) for v in p.exact)
        else:
            hit = any(p.test(v) for v in q.reps(domain[f]))
        if not hit:
            return False
    return True


def _class_of(reps: tuple, v: int) -> Any:
    """The representative of the class an ordered value falls in."""
    import bisect

    i = bisect.bisect_right(reps, v) - 1
    return reps[i] if i >= 0 else None


_DEFAULT_CANDS: dict[tuple[int, int, str], tuple[tuple, Any, tuple]] = {}


def _cands(f: str, p: Pred | None, reps: tuple, prefer: dict[str, list[Any]] | None
           ) -> tuple:
    """The values of field f a witness tries, in order (readable ones first). Cached: on
    the predicate (immutable) or, for an unconstrained field, per domain (a witness search
    runs thousands of times on one domain; recomputing this was a fifth of its time)."""
    key = (id(reps), id(prefer), f)
    if p is None:
        hit = _DEFAULT_CANDS.get(key)
        if hit is not None and hit[0] is reps and hit[1] is prefer:
            return hit[2]
    else:
        hit = p._cache.get(("w", key))
        if hit is not None and hit[0] is reps and hit[1] is prefer:
            return hit[2]
    if p is None:
        c = reps
    elif p.exact is not None:
        c = tuple(sorted(p.exact, key=_order))
    else:
        c = tuple(v for v in reps if p.test(v))
    if f in ORDERED and f not in NULLABLE and len(c) > 1:
        if c[0] == 0 and f not in PLAIN_ZERO:
            c = c[1:] + (0,)  # a readable counterexample: 0 only when nothing else will do
        liked = [_class_of(reps, v) for v in (prefer or {}).get(f, []) + PREFER.get(f, [])]
        first = [r for r in dict.fromkeys(liked) if r is not None and r in set(c)]
        if first:
            c = tuple(first) + tuple(v for v in c if v not in set(first))
    if p is None:
        if len(_DEFAULT_CANDS) > 4096:
            _DEFAULT_CANDS.clear()
        _DEFAULT_CANDS[key] = (reps, prefer, c)
    else:
        p._cache[("w", key)] = (reps, prefer, c)
    return c


def witness(box: Box, excl: list[Box], domain: dict[str, tuple],
            budget: int = 20000, prefer: dict[str, list[Any]] | None = None
            ) -> dict[str, Any] | None | bool:
    """A point of `box` in no box of `excl`: a dict field -> value, None when there is
    none, True when the search ran out of budget (treat as "may be")."""
    steps = [0]
    cand: dict[str, tuple] = {}
    for f in FIELDS:
        c = _cands(f, box.get(f), domain[f], prefer)
        if not c:
            return None
        cand[f] = c
    sets: dict[str, frozenset] = {}

    def meets(f: str, p: Pred) -> bool:
        if p.exact is not None:
            if f not in sets:
                sets[f] = frozenset(cand[f])
            return not p.exact.isdisjoint(sets[f])
        return any(p.test(v) for v in cand[f])

    live = [b for b in excl if all(meets(f, p) for f, p in b.items())]

    def search(assigned: dict[str, Any], pending: list[Box]) -> dict[str, Any] | None | bool:
        steps[0] += 1
        if steps[0] > budget:
            return True
        if not pending:
            return {**{f: cand[f][0] for f in FIELDS if f not in assigned}, **assigned}
        counts: dict[str, int] = {}
        for b in pending:
            for f in b:
                if f not in assigned:
                    counts[f] = counts.get(f, 0) + 1
        if not counts:
            return None  # some excluded box holds on every remaining choice
        f = max(counts, key=lambda x: (counts[x], -len(cand[x])))
        mentioned = [b[f] for b in pending if f in b]
        free = next((v for v in cand[f][:SMALL] if not any(p.test(v) for p in mentioned)),
                    None)
        if free is not None:  # a value no pending box admits escapes all of them at once
            order: Iterable[Any] = (free,)
        else:
            order = sorted(cand[f], key=lambda v: sum(1 for p in mentioned if p.test(v)))
        for v in order:
            rest = []
            for b in pending:
                p = b.get(f)
                if p is not None and not p.test(v):
                    continue  # this choice escapes the box
                if p is not None and all(g == f or g in assigned for g in b):
                    rest = None  # every field of the box holds: excluded
                    break
                rest.append(b)
            if rest is None:
                continue
            r = search({**assigned, f: v}, rest)
            if r is not None:
                return r
        return None

    return search({}, live)


# fields where 0 is what a packet usually has (a counterexample keeps it where it can)
PLAIN_ZERO = ("dscp", "ecn", "frag")

PREFER: dict[str, list[Any]] = {
    "sport": [40000], "dport": [80, 443], "length": [100], "icmp_type": [8, 128],
    "l4proto": [6, 17], "ttl": [64], "dscp": [0],
    "saddr4": [int(ipaddress.ip_address(a)) for a in ("192.0.2.7", "203.0.113.7")],
    "daddr4": [int(ipaddress.ip_address(a)) for a in ("198.51.100.80", "203.0.113.99")],
    "saddr6": [int(ipaddress.ip_address("2001:db8::7"))],
    "daddr6": [int(ipaddress.ip_address("2001:db8::80"))],
}


def humanize(point: dict[str, Any], domain: dict[str, tuple],
             prefer: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """The same class, with readable values: within a field's class (all values from its
    representative up to the next one), a preferred value is as good a witness."""
    out = dict(point)
    for f in ORDERED:
        r = point.get(f)
        if not isinstance(r, int) or f in (*NULLABLE, *MASKABLE, "l4proto"):
            continue
        reps = domain[f]
        i = reps.index(r) if r in reps else None
        if i is None:
            continue  # a concrete packet's own value
        hi = reps[i + 1] - 1 if i + 1 < len(reps) else ORDERED[f]
        for v in (prefer or {}).get(f, []) + PREFER.get(f, []):
            if r <= v <= hi:
                out[f] = v
                break
    return out


def _order(v: Any) -> tuple:
    return (v is None, str(type(v)), v if not isinstance(v, frozenset) else sorted(v))
