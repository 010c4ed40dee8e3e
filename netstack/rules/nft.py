"""A tiny typed layer over libnftables JSON: expressions, rules, chains and one table.

A Ruleset renders to the same shape `nft -j list ruleset` prints (table, chain and rule
objects), so the generator's output, the golden files and the live ruleset read back by
the audit are one format. `commands()` turns it into one atomic transaction that replaces
the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TABLE = "netstack"
FAMILY = "inet"

Expr = dict[str, Any]


def meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def payload(protocol: str, fld: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": fld}}


def ct(key: str) -> Expr:
    return {"ct": {"key": key}}


def match(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def anon_set(items: list[Any]) -> Any:
    """One element stays a plain value: nft prints it that way, golden files stay readable."""
    return items[0] if len(items) == 1 else {"set": list(items)}


def iifname(*names: str) -> Expr:
    return match(meta("iifname"), anon_set(list(names)))


def oifname(*names: str) -> Expr:
    return match(meta("oifname"), anon_set(list(names)))


def nfproto(proto: str) -> Expr:
    return match(meta("nfproto"), proto)


def l4proto(*protos: str) -> Expr:
    return match(meta("l4proto"), anon_set(list(protos)))


def ct_state(*states: str) -> Expr:
    return match(ct("state"), list(states) if len(states) > 1 else states[0], "in")


def ip_saddr(addr: Any, op: str = "==", six: bool = False) -> Expr:
    return match(payload("ip6" if six else "ip", "saddr"), addr, op)


def ip_daddr(addr: Any, op: str = "==", six: bool = False) -> Expr:
    return match(payload("ip6" if six else "ip", "daddr"), addr, op)


def th_dport(port: Any) -> Expr:
    """Transport-header destination port, for TCP and UDP alike (needs an l4proto match)."""
    return match(payload("th", "dport"), port)


COUNTER: Expr = {"counter": None}
ACCEPT: Expr = {"accept": None}
DROP: Expr = {"drop": None}
RETURN: Expr = {"return": None}
MASQUERADE: Expr = {"masquerade": None}


def jump(chain: str) -> Expr:
    return {"jump": {"target": chain}}


def dnat4(addr: str, port: int | None = None) -> Expr:
    d: dict[str, Any] = {"family": "ip", "addr": addr}
    if port is not None:
        d["port"] = port
    return {"dnat": d}


def redirect(port: int) -> Expr:
    return {"redirect": {"port": port}}


@dataclass
class Chain:
    name: str
    type: str | None = None  # filter / nat; None for a regular chain
    hook: str | None = None
    prio: int | None = None
    policy: str | None = None
    rules: list[tuple[list[Expr], str | None]] = field(default_factory=list)

    def add(self, *exprs: Expr, comment: str | None = None) -> Chain:
        self.rules.append((list(exprs), comment))
        return self


# Chain layout shared by every qube. Priorities: prerouting filter at -150 (mangle) runs
# after conntrack (-200) so `ct state invalid` is known, and before DNAT (-100).
BASE_CHAINS = [
    ("prerouting", "filter", "prerouting", -150, "accept"),
    ("nat_prerouting", "nat", "prerouting", -100, "accept"),
    ("input", "filter", "input", 0, "drop"),
    ("forward", "filter", "forward", 0, "drop"),
    ("output", "filter", "output", 0, "drop"),
    ("nat_output", "nat", "output", -100, "accept"),
    ("nat_postrouting", "nat", "postrouting", 100, "accept"),
]


@dataclass
class NamedSet:
    """A named set: data that may change at run time (e.g. resolved VPN endpoints) while
    the rules that use it stay fixed."""

    name: str
    type: list[str] | str
    elem: list[Any] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # interval, timeout
    map: str | None = None  # a map's data type (its elements are [key, value])


def set_commands(name: str, elems: list[Any], kind: str = "set") -> list[dict[str, Any]]:
    """Replace a named set's (or map's) elements (flush + add), as part of a
    transaction."""
    s = {"family": FAMILY, "table": TABLE, "name": name}
    cmds: list[dict[str, Any]] = [{"flush": {kind: s}}]
    if elems:
        cmds.append({"add": {"element": {**s, "elem": list(elems)}}})
    return cmds


def concat(*parts: Any) -> Expr:
    return {"concat": list(parts)}


def in_set(left: Any, name: str) -> Expr:
    return match(left, f"@{name}")


class Ruleset:
    """One `inet netstack` table with the shared base chains, in a fixed order."""

    def __init__(self) -> None:
        self.chains: dict[str, Chain] = {
            name: Chain(name, t, h, p, pol) for name, t, h, p, pol in BASE_CHAINS
        }
        self.sets: dict[str, NamedSet] = {}
        self.flowtables: dict[str, list[str]] = {}  # name -> devices (fastpath.py)

    def add_set(self, s: NamedSet) -> NamedSet:
        self.sets[s.name] = s
        return s

    def __getitem__(self, name: str) -> Chain:
        return self.chains[name]

    def chain(self, name: str) -> Chain:
        """A regular (non-base) chain, made on first use."""
        return self.chains.setdefault(name, Chain(name))

    def to_json(self) -> dict[str, Any]:
        """`nft -j list ruleset` shape, without handles. Empty nat chains are left out."""
        items: list[dict[str, Any]] = [{"table": {"family": FAMILY, "name": TABLE}}]
        for s in self.sets.values():
            sd: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": s.name,
                                  "type": s.type}
            if s.map:
                sd["map"] = s.map
            if s.flags:
                sd["flags"] = list(s.flags)
            if s.elem:
                sd["elem"] = list(s.elem)
            items.append({"map" if s.map else "set": sd})
        for name, devs in self.flowtables.items():
            items.append({"flowtable": {"family": FAMILY, "table": TABLE, "name": name,
                                        "hook": "ingress", "prio": 0, "dev": list(devs)}})
        rules: list[dict[str, Any]] = []
        for c in self.chains.values():
            if c.type == "nat" and not c.rules:
                continue
            ch: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": c.name}
            if c.hook:
                ch.update(type=c.type, hook=c.hook, prio=c.prio, policy=c.policy)
            items.append({"chain": ch})
            for exprs, comment in c.rules:
                r: dict[str, Any] = {"family": FAMILY, "table": TABLE, "chain": c.name,
                                     "expr": exprs}
                if comment:
                    r["comment"] = comment
                rules.append({"rule": r})
        return {"nftables": items + rules}


def accept_all(masquerade_to: str | None = None) -> Ruleset:
    """No filtering at all (a lab router; or a protection removed on purpose by a test),
    optionally masquerading what leaves through one interface."""
    rs = Ruleset()
    for c in ("input", "forward", "output"):
        rs[c].policy = "accept"
    if masquerade_to:
        rs["nat_postrouting"].add(oifname(masquerade_to), MASQUERADE)
    return rs


def commands(ruleset_json: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
    """One transaction that atomically replaces our table (add + delete + add, the usual
    idiom: works whether or not the table exists, and nothing is ever half-loaded).
    `fresh`: the namespace was just made and has no table; skipping the delete avoids a
    deferred table destruction that costs ~10 ms of kernel time per namespace."""
    table = {"table": {"family": FAMILY, "name": TABLE}}
    cmds: list[dict[str, Any]] = [] if fresh else [{"add": table}, {"delete": table}]
    cmds += [{"add": obj} for obj in ruleset_json["nftables"]]
    return {"nftables": cmds}

# IPv6 neighbour discovery: what every link needs (rules/common.py, rules/qubefw.py)
ND_TYPES = ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit",
            "nd-neighbor-advert"]
