"""The one ruleset netstack adds to the host, and only in --uplink-mode nat: a table of its
own (never touching other tables) that forwards sys-net's veth to the uplink and
masquerades it. Removed whole by `down`."""

from __future__ import annotations

from typing import Any

from netstack.rules.nft import ACCEPT, DROP, MASQUERADE, ct_state, iifname, ip_saddr, oifname


def host_nat_ruleset(table: str, veth: str, dev: str, subnet: str) -> dict[str, Any]:
    addr, plen = subnet.split("/")
    t = {"family": "ip", "table": table}

    def rule(chain: str, *expr: Any, comment: str) -> dict[str, Any]:
        return {"rule": {**t, "chain": chain, "expr": list(expr), "comment": comment}}

    return {"nftables": [
        {"table": {"family": "ip", "name": table}},
        {"chain": {**t, "name": "forward", "type": "filter", "hook": "forward", "prio": 0,
                   "policy": "accept"}},
        {"chain": {**t, "name": "postrouting", "type": "nat", "hook": "postrouting",
                   "prio": 100, "policy": "accept"}},
        rule("forward", iifname(veth), oifname(dev), ACCEPT, comment="sys-net -> uplink"),
        rule("forward", oifname(veth), ct_state("established", "related"), ACCEPT,
             comment="replies to sys-net"),
        rule("forward", iifname(veth), DROP, comment="sys-net elsewhere"),
        rule("forward", oifname(veth), DROP, comment="nothing else into sys-net"),
        rule("postrouting", oifname(dev),
             ip_saddr({"prefix": {"addr": addr, "len": int(plen)}}), MASQUERADE,
             comment="masquerade sys-net"),
    ]}


def host_table_commands(table: str, ruleset: dict[str, Any] | None) -> dict[str, Any]:
    """Replace (ruleset given) or delete (None) our host table in one transaction."""
    tb = {"table": {"family": "ip", "name": table}}
    cmds: list[dict[str, Any]] = [{"add": tb}, {"delete": tb}]
    if ruleset:
        cmds += [{"add": o} for o in ruleset["nftables"]]
    return {"nftables": cmds}
