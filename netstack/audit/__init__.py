"""`netstack audit`: prove the chain's promises from the live nftables rulesets, without
sending a packet; show a counterexample packet and its path through the rules otherwise."""

from __future__ import annotations

import time
from typing import Any

from netstack.audit.properties import QubeView, Result, all_results


def views(plan: dict[str, Any], rulesets: dict[str, dict[str, Any]]) -> list[QubeView]:
    """Per qube: the ruleset to audit (live, or generated) and its place in the chain, all
    read from the recorded plan."""
    vpns = {v["qube"]: v for v in plan.get("vpns", [])}
    tors = {t["qube"]: t for t in plan.get("tors", [])}
    out = []
    for q in plan["qubes"]:
        clients = [(c["name"], f"vif{c['qid']}", c["ipv4"], c.get("ipv6"))
                   for c in plan["qubes"] if c["netvm"] == q["name"]]
        v = vpns.get(q["name"])
        t = tors.get(q["name"])
        out.append(QubeView(
            q["name"], q["kind"], q["netns"], rulesets[q["netns"]], q["ipv4"],
            q["interfaces"][0], clients, tunnel=v["dev"] if v else None,
            fwmark=v["fwmark"] if v else None, tor_uid=t["uid"] if t else None,
            interfaces=list(q["interfaces"])))
    return out


def endpoints_from(plan: dict[str, Any], resolved: dict[str, Any] | None
                   ) -> set[tuple[str, str, int]]:
    """The VPN transport the kill switch should admit: the plan's endpoints as resolved at
    `up` (the audit checks the live set against this, not the other way round)."""
    out = set()
    for v in plan.get("vpns", []):
        for e in v["endpoints"]:
            for ip in (resolved or {}).get(v["qube"], {}).get(e["host"], [e["host"]]):
                out.add((ip, e["proto"], e["port"]))
    return out


def audit(plan: dict[str, Any], rulesets: dict[str, dict[str, Any]],
          resolved: dict[str, Any] | None) -> tuple[list[Result], float]:
    t0 = time.perf_counter()
    res = all_results(views(plan, rulesets), endpoints_from(plan, resolved))
    return res, time.perf_counter() - t0
