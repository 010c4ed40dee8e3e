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


def live_rulesets(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each qube's ruleset as the kernel has it now, read with the nftables binding."""
    from netstack.apply import list_ruleset

    return {q["netns"]: list_ruleset(q["netns"]) for q in plan["qubes"]}


def run(stack: str, drift: bool = False, replay: bool = False) -> dict[str, Any]:
    from netstack.errors import StateError
    from netstack.state import State

    st = State.load(stack)
    if st is None or not st.data.get("plan"):
        raise StateError(f"stack {stack!r} is not up; start it with `netstack --stack {stack} "
                         "up --lab`")
    plan = st.data["plan"]
    live = live_rulesets(plan)
    from netstack.audit.live import read as read_net

    net = read_net([q["netns"] for q in plan["qubes"]])
    res, secs = audit(plan, live, st.data.get("vpn_resolved"), net)
    out: dict[str, Any] = {"stack": stack, "seconds": round(secs, 3),
                           "results": [r.to_json() for r in res]}
    want = endpoints_from(plan, st.data.get("vpn_resolved"))
    out["results"] += [r.to_json() for r in _endpoint_set_results(plan, live, want)]
    if drift:
        from netstack.audit.drift import semantic_diff, text_diff

        gen = canonical({n["name"]: n["ruleset"] for n in plan["namespaces"]
                         if n["ruleset"] and n["owner"].startswith("qube:")})
        d = []
        for q in plan["qubes"]:
            ns = q["netns"]
            ifaces = list(q["interfaces"]) + [v["dev"] for v in plan.get("vpns", [])
                                               if v["qube"] == q["name"]]
            want_rs = _with_live_sets(gen[ns], live[ns])
            text = text_diff(live[ns], want_rs, q["name"])
            sem = semantic_diff(live[ns], want_rs, ifaces) if text else []
            d.append({"qube": q["name"], "text": text, "semantic": sem})
        out["drift"] = d
    if replay:
        from netstack.audit.replay import replay as do_replay

        by_qube = {q["name"]: q["netns"] for q in plan["qubes"]}
        for r in out["results"]:
            if r["status"] == "FAIL" and r["counterexample"] and r["qube"] in by_qube \
                    and ": " in r["reason"]:
                hook, predicted = r["reason"].split(": ", 1)
                if hook in ("prerouting", "input", "forward", "output"):
                    rp = do_replay(live[by_qube[r["qube"]]], hook, r["counterexample"])
                    rp["confirmed"] = rp.get("kernel_verdict") == predicted
                    r["replay"] = rp
    bad = [r for r in out["results"] if r["status"] != "PASS"]
    out["ok"] = not bad and not any(x["text"] for x in out.get("drift", []))
    return out


def canonical(rulesets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The generated rulesets as the kernel would print them (nft drops implied matches and
    merges others): load each into a scratch namespace and read it back."""
    import os

    from netstack import netns
    from netstack.apply import list_ruleset, load_ruleset

    scratch = f"nsaudit-{os.getpid()}"
    netns.create(scratch)
    try:
        out = {}
        for ns, rs in rulesets.items():
            load_ruleset(scratch, rs)
            out[ns] = list_ruleset(scratch)
        return out
    finally:
        netns.delete(scratch)


def _with_live_sets(gen: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Named sets are filled at run time (resolved VPN endpoints): compare rules, not the
    resolution (the endpoint-set property checks that separately)."""
    sets = {i["set"]["name"]: i for i in live.get("nftables", []) if "set" in i}
    items = []
    for i in gen["nftables"]:
        if "set" in i and i["set"]["name"] in sets:
            items.append({"set": {**i["set"], **({"elem": sets[i["set"]["name"]]["set"]["elem"]}
                                                if "elem" in sets[i["set"]["name"]]["set"]
                                                else {})}})
        else:
            items.append(i)
    return {"nftables": items}


def _endpoint_set_results(plan: dict[str, Any], live: dict[str, dict[str, Any]],
                          want: set[tuple[str, str, int]]) -> list[Result]:
    """The kill switch admits exactly the endpoints resolved at `up`, nothing more."""
    out = []
    for v in plan.get("vpns", []):
        s = next((i["set"] for i in live[v["netns"]].get("nftables", [])
                  if "set" in i and i["set"]["name"] == "vpn_endpoints"), None)
        got = set()
        for e in (s or {}).get("elem", []):
            c = e.get("concat") if isinstance(e, dict) else None
            if c:
                got.add((c[0], c[1], c[2]))
        extra = got - want
        status = "PASS" if s is not None and not extra and got else "FAIL"
        out.append(Result("VPN endpoints exactly as resolved", v["qube"], status,
                          f"set vpn_endpoints = {sorted(got)}; resolved {sorted(want)}",
                          {"unexpected": sorted(extra)} if extra else None))
    return out


def audit(plan: dict[str, Any], rulesets: dict[str, dict[str, Any]],
          resolved: dict[str, Any] | None, net: dict[str, dict[str, Any]] | None = None
          ) -> tuple[list[Result], float]:
    """net: live links/addresses/routes per namespace (None: the plan's, for generated
    rulesets)."""
    from netstack.audit.e2e import end_to_end

    t0 = time.perf_counter()
    eps = endpoints_from(plan, resolved)
    res = all_results(views(plan, rulesets), eps)
    res += end_to_end(plan, rulesets, eps, net)
    return res, time.perf_counter() - t0
