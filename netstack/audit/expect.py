"""`audit --ruleset FILE --expect EXPECT.toml`: the properties a ruleset's owner states
(issue 30 item 4), each proven or refuted on the ruleset by the evaluator, with a
counterexample packet and its trace.

    [interfaces]              # roles: a name for one interface or several
    wan = "eth0"
    lan = ["eth1", "eth2"]

    [host]
    forwarding = true         # default: whether the ruleset has a forward chain

    [[allow]]                 # every new connection from `from` to `to` is accepted
    to = "tcp/22"
    from = ["192.0.2.0/24"]
    only = true               # ... and from nowhere else

    [[deny]]                  # no new connection from `from` to `to` is accepted
    from = "wan"
    to = "tcp/5432"

    [[reach]]                 # `from` can open some connection to each of `to`
    from = "iif guest"
    to = ["udp/53", "tcp/443 wan"]
    only = true               # ... and to nothing else

An endpoint is a string of words (a list: any of them): an address, prefix or range
(`192.0.2.0/24`, `10.0.0.1-10.0.0.9`), an interface role of [interfaces] or `iif NAME` /
`oif NAME` (a role or an interface name, `eth*` for a prefix), `host` (this host: in `to`
the packet is delivered to it, in `from` it sends it), and in `to` a service (`tcp/22`,
`udp/1000-2000`, `tcp`, `icmp/echo-request`, `any`).

What the statements mean, so that a PASS is a proof (docs/security.md says it for users):
- A packet is one that opens a connection: conntrack state new (and untracked where the
  ruleset has a notrack statement) with no status bits yet, mark 0 when it arrives; for
  `allow` and `reach` a TCP packet is a SYN. Its fields are those it was sent with (before
  any NAT here); every field the statement does not fix is free over all its classes.
- Sources arrive on any interface but `lo` unless `from` names one (a packet on lo is
  this host's own).
- Paths: `to` naming `host` is the input path; naming an interface (a role, `oif`) is the
  forward path (output when `from` is `host`). Otherwise `deny` and the `only` of `reach`
  cover input and, when the host forwards, forward; `allow` means this host's service
  (input), and `reach` is proven by one accepted packet on either path.
- `allow`: no packet of `from` x `to` is dropped; its `only`: no packet to `to` from
  outside `from` is accepted. `deny`: no packet of `from` x `to` is accepted. `reach`: one
  packet of `from` to each item of `to` is accepted (the proof is that packet, and its
  trace); its `only`: no packet from `from` to anything outside `to` is accepted.
A statement any part of which rests on a construct the evaluator does not model is
UNPROVEN (the construct named), never PROVEN.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import Packet, Step
from netstack.audit.properties import (
    QubeView,
    Result,
    check,
)
from netstack.audit.space import (
    ICMP6_TYPES,
    ICMP_TYPES,
    NO_IFACE,
    ORDERED,
    PORT_PROTOS,
    Box,
    Domains,
    Pred,
    eq_pred,
    intersect,
)
from netstack.errors import UsageError

KINDS = ("allow", "deny", "reach")
STATEMENT_KEYS = {"from", "to", "only", "name", "family"}
TOP_KEYS = {"interfaces", "host", *KINDS}
HOST_KEYS = {"forwarding"}
PATHS = ("input", "forward", "output")
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}\*?|[A-Za-z0-9_.@-]{0,14}\*")
_ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
SERVICE_PROTOS = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136,
                  "icmp": 1, "icmpv6": 58, "esp": 50, "ah": 51, "gre": 47}
WORDS_HELP = ("an address or prefix (192.0.2.0/24), a role of [interfaces], `iif NAME`/"
              "`oif NAME`, `host`, or in `to` a service (tcp/22, udp/1000-2000, icmp)")


class ExpectError(UsageError):
    """A problem in the EXPECT file: one line naming the file, the statement, the field and
    the fix (exit 2, as any bad input)."""


# --- the file -------------------------------------------------------------------------------

@dataclass(frozen=True)
class End:
    """One item of `from` or `to`: the words it was written with and what they fix."""

    text: str
    ifaces: tuple[str, ...] | None = None  # iif (from) / oif (to) names, role resolved
    host: bool = False
    addr: tuple[int, int, int] | None = None  # (version, lo, hi)
    proto: int | None = None
    ports: tuple[int, int] | None = None  # dport, or icmp type for icmp/icmpv6

    @property
    def family(self) -> str | None:
        if self.addr is not None:
            return f"ipv{self.addr[0]}"
        return {1: "ipv4", 58: "ipv6"}.get(self.proto or 0)


@dataclass(frozen=True)
class Statement:
    kind: str  # allow | deny | reach
    index: int  # 1-based among statements of its kind
    froms: tuple[End, ...]
    tos: tuple[End, ...]
    only: bool = False
    name: str = ""
    family: str | None = None

    @property
    def where(self) -> str:
        return f"[[{self.kind}]] #{self.index}"

    def describe(self) -> str:
        f = ", ".join(e.text for e in self.froms) or "anywhere"
        t = ", ".join(e.text for e in self.tos) or "anything"
        s = f"{self.kind} from {f} to {t}" + (" (only)" if self.only else "")
        return f"{self.name}: {s}" if self.name else s


@dataclass
class Expect:
    path: str
    roles: dict[str, tuple[str, ...]]
    statements: list[Statement]
    forwarding: bool | None = None  # None: from the ruleset (a forward chain or not)
    notes: list[str] = field(default_factory=list)


def load(path: str) -> Expect:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ExpectError(f"--expect {path}: cannot read it ({e.strerror})") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ExpectError(f"--expect {path}: not TOML ({e}); see `netstack audit --help` "
                          "for the format") from None
    ex = parse(doc, path)
    # the statements in the file's order (TOML keeps each kind's array, not how they
    # interleave): by the order of their headers
    heads = re.findall(r"(?m)^\s*\[\[\s*(allow|deny|reach)\s*\]\]", raw.decode("utf-8"))
    at: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for n, k in enumerate(heads):
        seen[k] = seen.get(k, 0) + 1
        at[(k, seen[k])] = n
    ex.statements.sort(key=lambda s: at.get((s.kind, s.index), 10**6))
    return ex


def _err(path: str, where: str, problem: str, fix: str) -> ExpectError:
    return ExpectError(f"{path}: {where}: {problem} (fix: {fix})")


def parse(doc: dict[str, Any], path: str = "EXPECT") -> Expect:
    """The statements of a parsed TOML document, validated (ExpectError: one line)."""
    for k in doc:
        if k not in TOP_KEYS:
            raise _err(path, k, "unknown table", f"use {', '.join(sorted(TOP_KEYS))}"
                       + _near(k, TOP_KEYS))
    roles: dict[str, tuple[str, ...]] = {}
    ifs = doc.get("interfaces", {})
    if not isinstance(ifs, dict):
        raise _err(path, "interfaces", "not a table", '[interfaces] then lines like '
                   'wan = "eth0"')
    for role, v in ifs.items():
        where = f"[interfaces] {role}"
        if not _ROLE.fullmatch(role) or role in ("host", "any", "iif", "oif"):
            raise _err(path, where, "not a usable role name", "letters, digits, - and _, "
                       "starting with a letter; not host, any, iif or oif")
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, list) or not names or \
                not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
            raise _err(path, where, f"{v!r} is not an interface name or a list of them",
                       f'{role} = "eth0" or {role} = ["eth1", "eth2"] (at most 15 '
                       "characters, `eth*` for a prefix)")
        roles[role] = tuple(names)
    host = doc.get("host", {})
    if not isinstance(host, dict):
        raise _err(path, "host", "not a table", "[host] then forwarding = true or false")
    for k in host:
        if k not in HOST_KEYS:
            raise _err(path, f"[host] {k}", "unknown key", "use forwarding = true|false")
    fwd = host.get("forwarding")
    if fwd is not None and not isinstance(fwd, bool):
        raise _err(path, "[host] forwarding", f"{fwd!r} is not true or false",
                   "forwarding = true (this host routes) or false")
    out: list[Statement] = []
    for kind in KINDS:
        items = doc.get(kind, [])
        if not isinstance(items, list):
            raise _err(path, kind, "written as a table", f"write [[{kind}]] (an array of "
                       "tables), once per statement")
        for i, st in enumerate(items, 1):
            out.append(_statement(path, kind, i, st, roles))
    if not out:
        raise _err(path, "statements", "none", "add [[allow]], [[deny]] or [[reach]] "
                   "tables (see `netstack audit --help`)")
    return Expect(path, roles, out, fwd)


def _near(word: str, choices: set[str] | dict[str, Any]) -> str:
    import difflib

    m = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _statement(path: str, kind: str, i: int, st: Any, roles: dict[str, tuple[str, ...]]
               ) -> Statement:
    where = f"[[{kind}]] #{i}"
    if not isinstance(st, dict):
        raise _err(path, where, "not a table", f"[[{kind}]] followed by from = ... to = ...")
    for k in st:
        if k not in STATEMENT_KEYS:
            raise _err(path, f"{where} {k}", "unknown key",
                       f"use {', '.join(sorted(STATEMENT_KEYS))}" + _near(k, STATEMENT_KEYS))
    only = st.get("only", False)
    if not isinstance(only, bool):
        raise _err(path, f"{where} only", f"{only!r} is not true or false", "only = true")
    if only and kind == "deny":
        raise _err(path, f"{where} only", "a deny has no `only`", "remove it, or state what "
                   "is allowed in an [[allow]] with only = true")
    name = st.get("name", "")
    if not isinstance(name, str):
        raise _err(path, f"{where} name", "not a string", 'name = "ssh from the office"')
    fam = st.get("family")
    if fam is not None and fam not in ("ipv4", "ipv6"):
        raise _err(path, f"{where} family", f"{fam!r}", 'family = "ipv4" or "ipv6" (or '
                   "leave it out for both)")
    need = {"allow": "to", "reach": "from", "deny": None}[kind]
    ends: dict[str, tuple[End, ...]] = {}
    for side in ("from", "to"):
        v = st.get(side)
        if v is None:
            if side == need or (kind == "reach" and side == "to" and not only):
                raise _err(path, f"{where} {side}", "missing",
                           f'{side} = "tcp/22"' if side == "to" else f'{side} = "wan"')
            ends[side] = ()
            continue
        vals = [v] if isinstance(v, str) else v
        if not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
            raise _err(path, f"{where} {side}", f"{v!r} is not a string or a list of them",
                       f'{side} = "..." or {side} = ["...", "..."]')
        if not vals:
            raise _err(path, f"{where} {side}", "an empty list", f"name at least one, or "
                       f"leave {side} out (anywhere)")
        ends[side] = tuple(_end(path, f"{where} {side}[{j}]" if len(vals) > 1 else
                                f"{where} {side}", side, x, roles) for j, x in enumerate(vals))
    for e in ends["from"]:
        for t in ends["to"]:
            if e.host and t.host:
                raise _err(path, where, "from host to host", "this host's packets to itself "
                           "go over lo; name another source or destination")
            if e.family and t.family and e.family != t.family:
                raise _err(path, where, f"{e.text!r} and {t.text!r} are of different "
                           "families", "use two statements, one per family")
    for e in ends["from"] + ends["to"]:
        if fam and e.family and e.family != fam:
            raise _err(path, f"{where} family", f"{e.text!r} is {e.family}",
                       f'family = "{e.family}", or leave family out')
    return Statement(kind, i, ends["from"], ends["to"], only, name, fam)


def _end(path: str, where: str, side: str, text: str,
         roles: dict[str, tuple[str, ...]]) -> End:
    words = text.split()
    if not words:
        raise _err(path, where, "empty", WORDS_HELP)
    kw: dict[str, Any] = {}

    def once(k: str, v: Any, w: str) -> None:
        if k in kw:
            raise _err(path, where, f"{w!r}: a second {k.replace('ifaces', 'interface')} in "
                       "one item", "one per item; give a list for several, e.g. "
                       f'{side} = ["192.0.2.0/24", "198.51.100.0/24"]')
        kw[k] = v
    own = "iif" if side == "from" else "oif"
    j = 0
    while j < len(words):
        w = words[j]
        if w in ("iif", "oif"):
            if w != own:
                raise _err(path, where, f"{w!r} in {side}", f"{own} in {side} (a packet "
                           f"{'comes in' if side == 'from' else 'goes out'} by it)")
            if j + 1 >= len(words):
                raise _err(path, where, f"{w!r} without a name", f"{w} eth0, or {w} ROLE")
            n = words[j + 1]
            names = roles.get(n, (n,))
            if not all(_NAME.fullmatch(x) for x in names):
                raise _err(path, where, f"{n!r} is not an interface name", "at most 15 "
                           "letters, digits, . _ - @, `eth*` for a prefix")
            once("ifaces", names, w)
            j += 2
            continue
        j += 1
        if w == "any":
            continue
        if w == "host":
            once("host", True, w)
            continue
        if w in roles:
            once("ifaces", roles[w], w)
            continue
        addr = _address(w)
        if addr is not None:
            once("addr", addr, w)
            continue
        svc = _service(path, where, w)
        if svc is not None:
            if side == "from":
                raise _err(path, where, f"{w!r}: a service in `from`", "services name "
                           "where a packet goes: put it in `to`")
            once("proto", svc[0], w)
            if svc[1] is not None:
                kw["ports"] = svc[1]
            continue
        hint = (f"{w!r} is not a role ([interfaces] has {', '.join(sorted(roles))})"
                if roles else f"{w!r} is not a role (no [interfaces] table)")
        raise _err(path, where, f"{hint}, an address or a service",
                   f'write "{own} {w}" for an interface, or add {w} = "IFNAME" under '
                   "[interfaces]" + _near(w, roles) if _NAME.fullmatch(w) else WORDS_HELP)
    if kw.get("host") and "ifaces" in kw:
        raise _err(path, where, "host and an interface together", "host is this host "
                   "itself: name one of them")
    e = End(text, **kw)
    if e.addr and e.proto in (1, 58) and e.family != {1: "ipv4", 58: "ipv6"}[e.proto]:
        raise _err(path, where, f"{text!r} mixes families", "icmp goes with IPv4 "
                   "addresses, icmpv6 with IPv6 ones")
    return e


def _address(w: str) -> tuple[int, int, int] | None:
    try:
        if "-" in w and not w.startswith("-"):
            a, b = (ipaddress.ip_address(x) for x in w.split("-", 1))
            if a.version != b.version or int(a) > int(b):
                return None
            return a.version, int(a), int(b)
        if "/" in w:
            n = ipaddress.ip_network(w, strict=False)
            return n.version, int(n.network_address), int(n.broadcast_address)
        a = ipaddress.ip_address(w)
        return a.version, int(a), int(a)
    except ValueError:
        return None


def _service(path: str, where: str, w: str) -> tuple[int, tuple[int, int] | None] | None:
    proto, _, port = w.partition("/")
    if proto not in SERVICE_PROTOS:
        if "/" in w:
            raise _err(path, where, f"{w!r}: unknown protocol {proto!r}",
                       f"one of {', '.join(SERVICE_PROTOS)}, e.g. tcp/22")
        return None
    p = SERVICE_PROTOS[proto]
    if not port:
        return p, None
    if p in (1, 58):
        names = ICMP_TYPES if p == 1 else ICMP6_TYPES
        if port in names:
            return p, (names[port], names[port])
        if port.isdigit() and int(port) <= 255:
            return p, (int(port), int(port))
        raise _err(path, where, f"{w!r}: unknown {proto} type", f"{proto}/echo-request or "
                   "a number 0-255")
    if p not in PORT_PROTOS:
        raise _err(path, where, f"{w!r}: {proto} has no ports", f"write {proto} alone")
    lo, _, hi = port.partition("-")
    if not lo.isdigit() or (hi and not hi.isdigit()) or int(lo) > 65535 or \
            int(hi or lo) > 65535 or int(lo) > int(hi or lo):
        raise _err(path, where, f"{w!r}: not a port or range 0-65535",
                   f"{proto}/22 or {proto}/1000-2000")
    return p, (int(lo), int(hi or lo))


# --- proofs ---------------------------------------------------------------------------------

@dataclass
class Verdict:
    """One statement's answer."""

    statement: Statement
    status: str  # PROVEN | REFUTED | UNPROVEN
    reason: str
    hook: str | None = None  # where the packet below was decided
    verdict: str | None = None  # what the evaluator says happens to it there
    packet: dict[str, Any] | None = None  # the counterexample (REFUTED) or the witness
    trace: list[str] = field(default_factory=list)
    classes: int = 0
    replay: dict[str, Any] | None = None
    example: bool = False  # the packet only illustrates (a refuted reach, an UNPROVEN)

    @property
    def role(self) -> str:
        """What the packet is to the answer: the witness of a proof, the counterexample of
        a refutation, or an example (a packet no accept was found for; an undecided one)."""
        if self.status == "PROVEN":
            return "witness"
        return "example" if self.example or self.status == "UNPROVEN" else "counterexample"

    def to_json(self) -> dict[str, Any]:
        s = self.statement
        return {"statement": s.describe(), "kind": s.kind, "index": s.index,
                "status": self.status, "reason": self.reason, "hook": self.hook,
                "verdict": self.verdict, "packet": self.packet, "role": self.role,
                "trace": self.trace, "classes": self.classes,
                **({"replay": self.replay} if self.replay is not None else {})}


def domains(ex: Expect) -> Domains:
    """The statements' own constants: their classes must exist in the evaluator's space (a
    prefix the ruleset never names would otherwise fall inside a wider class and be
    proven vacuously)."""
    d = Domains()
    for role in ex.roles.values():
        for n in role:
            d.name("iif", n)
            d.name("oif", n)
    d.flags("tcp_flags", {"syn"})
    for s in ex.statements:
        for side, e in [("s", x) for x in s.froms] + [("d", x) for x in s.tos]:
            for n in e.ifaces or ():
                d.name("iif" if side == "s" else "oif", n)
            if e.addr:
                v, lo, hi = e.addr
                d.interval(f"{side}addr{v}", lo, hi)
            if e.proto is not None:
                d.interval("l4proto", e.proto, e.proto)
            if e.ports:
                d.interval("icmp_type" if e.proto in (1, 58) else "dport", *e.ports)
    return d


def _iface_pred(names: tuple[str, ...]) -> Pred:
    exact = frozenset(n for n in names if not n.endswith("*"))
    wild = tuple(n[:-1] for n in names if n.endswith("*"))
    if not wild:
        return eq_pred(exact)
    return Pred(lambda x, e=exact, w=wild: x in e or (x != NO_IFACE and x.startswith(w)))


def _span(lo: int, hi: int, f: str) -> Pred:
    if lo == hi:
        return eq_pred([lo])
    if lo == 0 and hi == ORDERED[f]:
        return Pred(lambda x: True)
    return Pred(lambda x, a=lo, b=hi: x is not None and a <= x <= b)


def end_box(e: End, side: str) -> Box:
    """The packets an item admits, on its side (source or destination)."""
    b: Box = {}
    if e.ifaces:
        b["iif" if side == "from" else "oif"] = _iface_pred(e.ifaces)
    if e.addr:
        v, lo, hi = e.addr
        f = f"{'s' if side == 'from' else 'd'}addr{v}"
        b[f] = _span(lo, hi, f)
        b["family"] = eq_pred([f"ipv{v}"])
    if e.proto is not None:
        b["l4proto"] = eq_pred([e.proto])
        if e.proto in (1, 58):
            b["family"] = eq_pred(["ipv4" if e.proto == 1 else "ipv6"])
    if e.ports:
        f = "icmp_type" if e.proto in (1, 58) else "dport"
        b[f] = _span(*e.ports, f)
    return b


@dataclass
class Context:
    """The ruleset's view and what the statements assume of the host."""

    q: QubeView
    forwarding: bool
    untracked: bool  # the ruleset has notrack: untracked packets open flows too

    def new_flow(self, positive: bool) -> Box:
        states = ["new"] + (["untracked"] if self.untracked and not positive else [])
        b: Box = {"ct_state": eq_pred(states),
                  "ct_status": Pred(lambda s: s is None or s == frozenset())}
        if positive:
            b["tcp_flags"] = eq_pred([frozenset({"syn"})])
        return b


def paths(s: Statement, f: End | None, t: End | None, ctx: Context, positive: bool
          ) -> list[str]:
    """The hooks a packet from f to t is judged at (see the module docstring)."""
    if f is not None and f.host:
        return ["output"]
    if t is not None and t.host:
        return ["input"]
    if t is not None and t.ifaces:
        return ["forward"] if ctx.forwarding else []
    if positive and s.kind == "allow":
        return ["input"]
    return ["input"] + (["forward"] if ctx.forwarding else [])


def region(s: Statement, f: End | None, t: End | None, hook: str, ctx: Context,
           positive: bool) -> Box | None:
    b: Box = dict(ctx.new_flow(positive))
    if s.family:
        b["family"] = eq_pred([s.family])
    if hook != "output":
        b["mark"] = eq_pred([0])
        if f is None or not f.ifaces:  # from the network: any interface but lo
            b["iif"] = Pred(lambda x: x not in ("lo", NO_IFACE))
    for e, side in ((f, "from"), (t, "to")):
        if e is not None:
            got = intersect(b, end_box(e, side))
            if got is None:
                return None
            b = got
    return b


def _result_to_verdict(s: Statement, r: Result, status_map: dict[str, str], reason: str
                       ) -> Verdict:
    hook, _, verdict = (r.reason.partition(": ") if r.status == "FAIL" else ("", "", ""))
    return Verdict(s, status_map[r.status], reason if r.status == "PASS" else r.reason,
                   hook or None, verdict or None, r.counterexample, list(r.trace),
                   r.classes)


def _check(s: Statement, ctx: Context, hook: str, start: Box, judge: Any) -> Result:
    return check(s.describe(), ctx.q, hook, start, judge, "")


def _none_accepted(s: Statement, ctx: Context, pairs: list[tuple[End | None, End | None]],
                   allowed: Any = None, as_positive: bool = False
                   ) -> tuple[Result | None, int, list[str]]:
    """Every packet of the pairs' regions is not accepted (allowed(hook): boxes of packets
    that may be), on the paths of a negative statement (or of the positive one it is the
    `only` of). (worst non-PASS result or None, classes, hooks looked at)."""
    classes: int = 0
    hooks: list[str] = []
    worst: Result | None = None
    for f, t in pairs:
        for hook in paths(s, f, t, ctx, positive=as_positive):
            start = region(s, f, t, hook, ctx, positive=False)
            if start is None:
                continue
            ok = allowed(hook) if allowed else []
            r = _check(s, ctx, hook, start,
                       lambda v, tr, nat, ok=ok: ok if v == "accept" else None)
            classes += r.classes
            hooks.append(hook)
            if r.status == "FAIL":
                return r, classes, hooks
            if r.status != "PASS" and worst is None:
                worst = r
    return worst, classes, hooks


def prove(s: Statement, ctx: Context) -> Verdict:
    froms: list[End | None] = list(s.froms) or [None]
    tos: list[End | None] = list(s.tos) or [None]
    if s.kind == "deny":
        r, n, hooks = _none_accepted(s, ctx, [(f, t) for f in froms for t in tos])
        if r is None:
            return Verdict(s, "PROVEN", f"no new connection is accepted "
                           f"({_hooks(hooks, ctx)})", classes=n)
        v = _result_to_verdict(s, r, {"FAIL": "REFUTED", "UNPROVEN": "UNPROVEN"}, "")
        v.classes = n
        return v
    if s.kind == "allow":
        return _allow(s, ctx, froms, tos)
    return _reach(s, ctx, froms, tos)


def _hooks(hooks: list[str], ctx: Context) -> str:
    seen = sorted(set(hooks), key=PATHS.index)
    txt = "judged at " + ", ".join(seen) if seen else "no path"
    if "forward" not in seen and not ctx.forwarding:
        txt += "; the host does not forward"
    return txt


def _allow(s: Statement, ctx: Context, froms: list[End | None], tos: list[End | None]
           ) -> Verdict:
    n = 0
    worst: Verdict | None = None
    hooks: list[str] = []
    for f in froms:
        for t in tos:
            ps = paths(s, f, t, ctx, positive=True)
            if not ps:
                return Verdict(s, "REFUTED", f"from {f.text if f else 'anywhere'} to "
                               f"{t.text if t else 'anything'}: the host does not forward "
                               "([host] forwarding = false), so nothing goes out of "
                               "another interface", classes=n)
            for hook in ps:
                start = region(s, f, t, hook, ctx, positive=True)
                if start is None:
                    continue
                r = _check(s, ctx, hook, start,
                           lambda v, tr, nat: [] if v != "accept" else None)
                n += r.classes
                hooks.append(hook)
                if r.status == "FAIL":
                    v = _result_to_verdict(s, r, {"FAIL": "REFUTED"}, "")
                    v.reason = f"{r.reason}: a new connection it allows is not accepted"
                    v.classes = n
                    return v
                if r.status != "PASS" and worst is None:
                    worst = _result_to_verdict(s, r, {"UNPROVEN": "UNPROVEN"}, "")
    if s.only:
        def others(hook: str) -> list[Box]:
            out = []
            for f in froms:
                if f is None:
                    return [{}]
                out.append(end_box(f, "from"))
            return out
        # the same service, from anywhere (any interface but lo)
        r, m, hk = _none_accepted(s, ctx, [(None, t) for t in tos], others, as_positive=True)
        n += m
        hooks += hk
        refuted = _refuted_by(s, r, n, "a source outside `from` gets in")
        if refuted is not None:
            return refuted
        if r is not None and worst is None:
            worst = _result_to_verdict(s, r, {"UNPROVEN": "UNPROVEN"}, "")
    if worst is not None:
        worst.classes = n
        return worst
    return Verdict(s, "PROVEN", "every new connection it allows is accepted"
                   + (", from nowhere else" if s.only else "") + f" ({_hooks(hooks, ctx)})",
                   classes=n)


def _refuted_by(s: Statement, r: Any, n: int, why: str) -> Verdict | None:
    """The `only` half of a statement: a FAIL of "nothing outside is accepted" is the
    packet that refutes it (None: no such packet was found)."""
    if r is None or r.status != "FAIL":
        return None
    v = _result_to_verdict(s, r, {"FAIL": "REFUTED"}, "")
    v.reason = f"{r.reason}: {why}"
    v.classes = n
    return v


def _reach(s: Statement, ctx: Context, froms: list[End | None], tos: list[End | None]
           ) -> Verdict:
    n = 0
    first: Verdict | None = None
    unproven: Verdict | None = None
    for t in (tos if s.tos else []):
        # one accepted packet from any `from` item to t proves it: a FAIL of "none is
        # accepted" is exactly that packet, untainted
        r, m, hooks = _none_accepted(s, ctx, [(f, t) for f in froms])
        n += m
        if r is not None and r.status == "FAIL":
            if first is None:
                first = _result_to_verdict(s, r, {"FAIL": "PROVEN"}, "")
                first.reason = f"e.g. to {t.text if t else 'anything'}: {r.reason}"
            continue
        if r is None:  # proven: nothing from `from` to t is accepted
            v = Verdict(s, "REFUTED", f"to {t.text if t else 'anything'}: no new "
                        f"connection from {', '.join(e.text for e in s.froms) or 'anywhere'}"
                        f" is accepted ({_hooks(hooks, ctx)})", classes=n)
            v.hook, v.verdict, v.packet, v.trace = _example_drop(s, ctx, froms[0], t)
            v.example = True
            return v
        if unproven is None:
            unproven = _result_to_verdict(s, r, {"UNPROVEN": "UNPROVEN"}, "")
    if s.only:
        def inside(hook: str) -> list[Box]:
            return [end_box(t, "to") for t in s.tos if _covers(t, hook)]
        r, m, hooks = _none_accepted(s, ctx, [(f, None) for f in froms], inside)
        n += m
        refuted = _refuted_by(s, r, n, "it reaches something outside `to`")
        if refuted is not None:
            return refuted
        if r is not None and unproven is None:
            unproven = _result_to_verdict(s, r, {"UNPROVEN": "UNPROVEN"}, "")
    if unproven is not None:
        unproven.classes = n
        return unproven
    if first is None:  # `only` with no `to`: reaches nothing
        return Verdict(s, "PROVEN", "no new connection from it is accepted", classes=n)
    first.classes = n
    if s.only:
        first.reason += "; nothing outside `to` is reached"
    return first


def _covers(t: End, hook: str) -> bool:
    """Whether a `to` item speaks of packets at this hook (host: delivered here; an
    interface: sent out of it; else either)."""
    if t.host:
        return hook == "input"
    if t.ifaces:
        return hook in ("forward", "output")
    return True


def _example_drop(s: Statement, ctx: Context, f: End | None, t: End | None
                  ) -> tuple[str | None, str | None, dict[str, Any] | None, list[str]]:
    """A packet that shows a refuted reach: one of the region, dropped, with its trace."""
    for hook in paths(s, f, t, ctx, positive=False):
        start = region(s, f, t, hook, ctx, positive=True) or \
            region(s, f, t, hook, ctx, positive=False)
        if start is None:
            continue
        r = _check(s, ctx, hook, start, lambda v, tr, nat: [] if v != "accept" else None)
        if r.status == "FAIL":
            h, _, v = r.reason.partition(": ")
            return h, v, r.counterexample, list(r.trace)
    return None, None, None, []


class _View(QubeView):
    """The file's view, with witnesses a replay can send: a source from the documentation
    ranges, not this host's own address (a packet from it is a martian the kernel drops)."""

    def prefer(self, hook: str) -> dict[str, list[Any]]:
        own = int(ipaddress.ip_address(self.address))
        out: dict[str, list[Any]] = {
            "saddr4": [int(ipaddress.ip_address(a)) for a in
                       ("203.0.113.7", "198.51.100.7", "192.0.2.77", "10.0.0.7")]}
        if hook == "input":
            out["daddr4"] = [own]
        return out


def has_forward_chain(doc: dict[str, Any]) -> bool:
    return any(c.get("hook") == "forward" for i in doc.get("nftables", [])
               if isinstance(i, dict) and isinstance(c := i.get("chain"), dict))


def run(doc: dict[str, Any], name: str, ex: Expect) -> tuple[list[Verdict], list[str]]:
    """Every statement's verdict, and the assumptions said to the user."""
    from netstack.audit.onefile import view

    v = view(doc, name)
    q = _View(v.qube, doc, list(v.interfaces), local_any=True)
    for s in ex.statements:  # the roles' interfaces are interfaces of this host
        for e in s.froms + s.tos:
            for n in e.ifaces or ():
                if not n.endswith("*") and n not in q.interfaces:
                    q.interfaces.append(n)
    fwd = ex.forwarding if ex.forwarding is not None else has_forward_chain(doc)
    notes = [("forwarding on" if fwd else "forwarding off") +
             (" ([host] forwarding)" if ex.forwarding is not None else
              " (the ruleset has a forward chain)" if fwd else
              " (the ruleset has no forward chain; say [host] forwarding = true if this "
              "host routes)"),
             "packets as sent, before NAT here; sources on any interface but lo unless named"]
    ctx = Context(q, fwd, '"notrack"' in _dump(doc))
    try:
        q.evaluator().add(domains(ex))
    except Exception as e:  # noqa: BLE001 (a ruleset from anywhere: UNPROVEN, said why)
        why = f"the evaluator cannot read this ruleset ({type(e).__name__}: {e})"
        return [Verdict(s, "UNPROVEN", why) for s in ex.statements], notes
    out = []
    for s in ex.statements:
        try:
            out.append(prove(s, ctx))
        except Exception as e:  # noqa: BLE001
            out.append(Verdict(s, "UNPROVEN", f"the evaluator failed here "
                               f"({type(e).__name__}: {e})"))
    return out, notes


def _dump(doc: dict[str, Any]) -> str:
    import json

    return json.dumps(doc)


def exit_code(verdicts: list[Verdict]) -> int:
    """0: every statement proven; 1: one refuted or not proven."""
    return 0 if all(v.status == "PROVEN" for v in verdicts) else 1


__all__ = ["End", "Expect", "ExpectError", "Packet", "Statement", "Step", "Verdict", "load",
           "parse", "prove", "run"]
