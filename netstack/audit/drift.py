"""Drift: the live rulesets against what netstack would generate from the config. A
normalised text diff (handles, counters, element order ignored) and a semantic diff (packet
classes whose verdict changed, with an example)."""

from __future__ import annotations

import difflib
import itertools
import json
from typing import Any

from netstack.audit.evaluator import Evaluator, Packet, Ruleset

HOOKS = ("prerouting", "input", "forward", "output")


def normalise(doc: dict[str, Any]) -> list[str]:
    """One canonical JSON line per table/chain/set/rule; handles and counters dropped,
    set elements sorted, rules kept in order within their chain."""
    out = []
    for item in doc.get("nftables", []):
        if "metainfo" in item:
            continue
        (kind, body), = item.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "rule":
            body["expr"] = [{"counter": None} if "counter" in e else e for e in body["expr"]]
        if kind in ("set", "map") and "elem" in body:
            body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        out.append(f"{kind} {json.dumps(body, sort_keys=True)}")
    return out


def text_diff(live: dict[str, Any], want: dict[str, Any], name: str) -> list[str]:
    return list(difflib.unified_diff(normalise(want), normalise(live), f"{name} (generated)",
                                     f"{name} (live)", lineterm="", n=1))


def _ports(*docs: dict[str, Any]) -> list[int]:
    """Every port a rule of either ruleset compares a dport against (one class each)."""
    found: set[int] = {53, 80}

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            m = x.get("match")
            if m and isinstance(m.get("left"), dict) and \
                    m["left"].get("payload", {}).get("field") == "dport":
                r = m["right"]
                vals = r.get("set", []) if isinstance(r, dict) else [r]
                found.update(v for v in vals if isinstance(v, int))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    for d in docs:
        walk(d)
    return sorted(found)[:64]


def classes(ifaces: list[str], ports: list[int] | None = None) -> list[Packet]:
    addrs = ["203.0.113.99", "198.51.100.80", "10.137.0.250", "10.139.1.1"]
    out = []
    for fam, i, o, l4, ct, port in itertools.product(
            ("ipv4", "ipv6"), ifaces + ["other0"], ifaces + ["other0"],
            ("tcp", "udp", "icmp"), ("new", "established", "invalid"),
            ports or (53, 80, 9040, 51820)):
        for d in (addrs if fam == "ipv4" else ["2001:db8::80"]):
            out.append(Packet(family=fam, iifname=i, oifname=o, l4proto=l4, ct_state=ct,
                              dport=port, saddr="203.0.113.98" if fam == "ipv4"
                              else "2001:db8::5", daddr=d))
    return out


def semantic_diff(live: dict[str, Any], want: dict[str, Any], ifaces: list[str],
                  limit: int = 5) -> list[dict[str, Any]]:
    a, b = Evaluator(Ruleset(want)), Evaluator(Ruleset(live))
    out = []
    for p in classes(ifaces, _ports(live, want)):
        for hook in HOOKS:
            va, vb = a.run_hook(hook, p).verdict, b.run_hook(hook, p).verdict
            if va != vb:
                out.append({"hook": hook, "generated": va, "live": vb,
                            "example": p.describe()})
                if len(out) >= limit:
                    return out
    return out
