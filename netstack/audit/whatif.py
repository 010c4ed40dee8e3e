"""What-if for one packet on any ruleset: `audit --ruleset FILE --packet 'iifname=lan0 ip
saddr=192.0.2.7 tcp dport=22'`. The packet is written the way nft writes matches (a word
like `ip`, `tcp`, `ct` or `meta` qualifies the key after it); its path follows from its
interfaces: an input interface alone is a packet to this host (input), both are forwarded,
an output interface alone is locally generated (output). The evaluator gives the verdict per
hook with the rules that decided (chain, handle, comment); `--replay` sends the same packet
through the kernel in scratch namespaces and reads its fate from nftrace."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from netstack.audit.evaluator import Packet, Ruleset, fate
from netstack.audit.space import (
    CT_STATES,
    DSCP,
    ICMP6_TYPES,
    ICMP_TYPES,
    L4,
    PKTTYPES,
    TCP_FLAG_BITS,
)
from netstack.errors import UsageError
from netstack.kernel import Kernel

PATHS = ("input", "forward", "output")
KEYS = ("iifname", "oifname", "ip saddr", "ip daddr", "ip6 saddr", "ip6 daddr",
        "tcp sport", "tcp dport", "tcp flags", "udp sport", "udp dport", "icmp type",
        "icmpv6 type", "meta l4proto", "ct state", "ct status", "meta mark", "meta skuid",
        "meta skgid", "meta length", "hook", "ip ttl", "ip6 hoplimit", "ip dscp", "ip6 dscp",
        "ct mark", "meta pkttype")
ALIASES = {"iif": "iifname", "oif": "oifname", "saddr": "ip saddr", "daddr": "ip daddr",
           "sport": "tcp sport", "dport": "tcp dport", "flags": "tcp flags",
           "l4proto": "meta l4proto", "mark": "meta mark", "skuid": "meta skuid",
           "skgid": "meta skgid", "length": "meta length", "state": "ct state",
           "status": "ct status", "path": "hook", "ttl": "ip ttl", "hoplimit": "ip6 hoplimit",
           "dscp": "ip dscp", "pkttype": "meta pkttype"}
QUALIFIERS = ("ip", "ip6", "tcp", "udp", "icmp", "icmpv6", "ct", "meta")


@dataclass
class Hook:
    hook: str
    verdict: str
    trace: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


@dataclass
class WhatIf:
    packet: dict[str, Any]
    path: str
    hooks: list[Hook]
    verdict: str  # accept | drop | unknown | lost (no route)
    kernel: list[tuple[str, str]] | None = None

    @property
    def confirmed(self) -> bool | None:
        if self.kernel is None or self.verdict == "unknown":
            return None  # nothing to confirm where the evaluator could not decide
        return [(h.hook, h.verdict) for h in self.hooks] == [tuple(x) for x in self.kernel]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["confirmed"] = self.confirmed
        return d


def _int(key: str, v: str, hi: int) -> int:
    try:
        n = int(v, 0)
    except ValueError:
        raise UsageError(f"--packet {key}={v}: not a number") from None
    if not 0 <= n <= hi:
        raise UsageError(f"--packet {key}={v}: out of range 0-{hi}")
    return n


def parse(spec: str) -> tuple[Packet, str]:
    """The packet and its path (input, forward or output)."""
    vals: dict[str, str] = {}
    qual = ""
    for word in spec.split():
        if "=" not in word:
            if word not in QUALIFIERS:
                raise UsageError(f"--packet: {word!r} is neither key=value nor one of "
                                 f"{', '.join(QUALIFIERS)}")
            qual = word
            continue
        k, v = word.split("=", 1)
        key = f"{qual} {k}".strip()
        key = ALIASES.get(key, key) if key not in KEYS else key
        if key not in KEYS:
            raise UsageError(f"--packet: unknown key {key!r}; use {', '.join(KEYS)}")
        if not v:
            raise UsageError(f"--packet {key}=: give a value")
        vals[key] = v
        qual = ""
    if qual:
        raise UsageError(f"--packet: {qual!r} at the end qualifies nothing")
    return _packet(vals)


def _packet(v: dict[str, str]) -> tuple[Packet, str]:
    iif, oif = v.get("iifname"), v.get("oifname")
    path = v.get("hook") or ("forward" if iif and oif else "input" if iif else "output")
    if path not in PATHS:
        raise UsageError(f"--packet hook={path}: use one of {', '.join(PATHS)}")
    if path in ("input", "forward") and not iif:
        raise UsageError(f"--packet: a packet on the {path} path needs iifname=")
    if path in ("forward", "output") and not oif:
        raise UsageError(f"--packet: a packet on the {path} path needs oifname= (where it "
                         "is routed)")
    if path == "input" and oif:
        raise UsageError("--packet: a packet to this host (input) has no oifname")
    six = any(k.startswith("ip6 ") or k == "icmpv6 type" for k in v)
    addrs: dict[str, str] = {}
    for k in ("ip saddr", "ip daddr", "ip6 saddr", "ip6 daddr"):
        if k in v:
            try:
                a = ipaddress.ip_address(v[k])
            except ValueError:
                raise UsageError(f"--packet {k}={v[k]}: not an address") from None
            if (a.version == 6) != k.startswith("ip6"):
                raise UsageError(f"--packet {k}={v[k]}: use "
                                 f"{'ip6' if a.version == 6 else 'ip'} {k.split()[1]}=")
            six = six or a.version == 6
            addrs[k.split()[1]] = str(a)
    fam = "ipv6" if six else "ipv4"
    ports = [k for k in ("tcp sport", "tcp dport", "udp sport", "udp dport", "tcp flags")
             if k in v]
    l4 = v.get("meta l4proto") or ("icmp" if "icmp type" in v else "ipv6-icmp"
                                   if "icmpv6 type" in v else
                                   ports[0].split()[0] if ports else "tcp")
    if l4 == "icmpv6":
        l4 = "ipv6-icmp"
    if l4 not in L4:
        raise UsageError(f"--packet l4proto={l4}: use one of {', '.join(sorted(L4))}")
    if len({k.split()[0] for k in ports}) > 1 or (ports and ports[0].split()[0] != l4):
        raise UsageError("--packet: ports and flags of one transport protocol only")
    kw: dict[str, Any] = {"family": fam, "iifname": iif, "oifname": oif, "l4proto": l4}
    if l4 in ("tcp", "udp"):
        kw["sport"] = _int("sport", v.get(f"{l4} sport", "40000"), 65535)
        kw["dport"] = _int("dport", v.get(f"{l4} dport", "80"), 65535)
    else:
        kw["sport"] = kw["dport"] = None
    if l4 == "tcp":
        flags = frozenset(f for f in v.get("tcp flags", "syn").split(",") if f)
        bad = flags - set(TCP_FLAG_BITS)
        if bad:
            raise UsageError(f"--packet tcp flags={','.join(sorted(bad))}: use "
                             f"{', '.join(TCP_FLAG_BITS)}")
        kw["tcp_flags"] = flags
    else:
        kw["tcp_flags"] = frozenset()
    if l4 in ("icmp", "ipv6-icmp"):
        names = ICMP6_TYPES if six else ICMP_TYPES
        t = v.get("icmpv6 type" if six else "icmp type", "echo-request")
        kw["icmp_type"] = names[t] if t in names else _int("icmp type", t, 255)
    state = v.get("ct state", "new")
    if state not in CT_STATES:
        raise UsageError(f"--packet ct state={state}: use one of {', '.join(CT_STATES)}")
    kw["ct_state"] = state
    if "ct status" in v:
        kw["ct_status"] = frozenset(v["ct status"].split(","))
    for k, f, hi in (("meta mark", "mark", 2**32 - 1), ("meta skuid", "skuid", 2**32 - 1),
                     ("meta skgid", "skgid", 2**32 - 1), ("meta length", "length", 65535)):
        if k in v:
            kw[f] = _int(k, v[k], hi)
    for k, f, hi in (("ip ttl", "ttl", 255), ("ip6 hoplimit", "ttl", 255),
                     ("ct mark", "ctmark", 2**32 - 1)):
        if k in v:
            kw[f] = _int(k, v[k], hi)
    for k in ("ip dscp", "ip6 dscp"):  # a number or a name (cs1, ef, af41...)
        if k in v:
            kw["dscp"] = DSCP[v[k]] if v[k] in DSCP else _int(k, v[k], 63)
    if "meta pkttype" in v:
        if v["meta pkttype"] not in PKTTYPES:
            raise UsageError(f"--packet meta pkttype={v['meta pkttype']}: use one of "
                             f"{', '.join(PKTTYPES)}")
        kw["pkttype"] = v["meta pkttype"]
    if path != "output" and ("meta skuid" in v or "meta skgid" in v):
        raise UsageError("--packet: only a locally generated packet (output) has a socket "
                         "owner")
    if path == "output":  # a socket: its owner and group go together
        kw.setdefault("skuid", 0)
        kw.setdefault("skgid", 0)
    prim = primary_of([iif, oif])
    kw["saddr"] = addrs.get("saddr") or (prim(oif or "", fam) if path == "output" else
                                         "2001:db8:99::7" if six else "198.51.100.7")
    kw["daddr"] = addrs.get("daddr") or (prim(iif or "", fam) if path == "input" else
                                         "2001:db8:99::10" if six else "203.0.113.10")
    return Packet(**kw), path


def primary_of(ifaces: list[str | None]) -> Any:
    """The addresses the replay's scratch lab gives this packet's interfaces (the n-th
    named link gets 192.0.2.(16n+1) and 2001:db8:(n+1)::1), so the evaluator writes the
    same addresses for redirect and masquerade as the kernel will."""
    names = [i for i in dict.fromkeys(ifaces) if i]

    def primary(iface: str, family: str) -> str | None:
        if iface == "lo":
            return "::1" if family == "ipv6" else "127.0.0.1"
        if iface not in names:
            return None
        n = names.index(iface)
        return f"2001:db8:{n + 1}::1" if family == "ipv6" else \
            str(ipaddress.ip_address("192.0.2.0") + 16 * n + 1)
    return primary


def judge(doc: dict[str, Any], p: Packet, path: str) -> WhatIf:
    rs = Ruleset(doc)
    prim = primary_of([p.iifname, p.oifname])
    # this host's addresses: the input packet's destination, and what a redirect writes
    local = {a for a in ({p.daddr} if path == "input" else set()) |
             {prim(p.iifname or "", p.family), "127.0.0.1", "::1"} if a}
    traces: list[tuple[str, list, list[str]]] = []
    got = fate(rs, p, lambda d: "lo" if d in local else p.oifname, local, prim, traces)
    by_hook = {h: (t, u) for h, t, u in traces}
    hooks = [Hook(h, v, [str(s) for s in by_hook.get(h, ([], []))[0]],
                  by_hook.get(h, ([], []))[1]) for h, v in got]
    last = got[-1][1] if got else "drop"
    verdict = "lost" if last == "lost" else last
    return WhatIf(p.describe(), path, hooks, verdict)


def replay(doc: dict[str, Any], w: WhatIf, p: Packet, k: Kernel) -> WhatIf:
    """The same packet through the kernel (scratch namespaces, removed afterwards)."""
    from netstack.audit.oracle import KernelLab

    lab = KernelLab([i for i in dict.fromkeys([p.iifname, p.oifname]) if i], k)
    try:
        if w.path == "input":
            lab.make_local(p.daddr, p.iifname or "")
        else:
            lab.route(p.daddr, p.oifname or "")
        if w.path == "output" and p.saddr not in lab.local:  # a socket bound to it
            lab.make_local(p.saddr, "")
        lab.load(doc)
        w.kernel = [tuple(x) for x in lab.fate(p)]  # type: ignore[misc]
    finally:
        lab.close()
    return w
