"""`netstack audit`: prove the chain's promises from the live nftables rulesets, without
sending a packet; show a counterexample packet and its path through the rules otherwise."""

from __future__ import annotations

import time
from typing import Any

from netstack.audit.properties import AuditContext, QubeView, Result, all_results
from netstack.model import Plan
from netstack.roles import role_for
from netstack.vpn.info import VpnInfo, all_transport


def views(plan: Plan, rulesets: dict[str, dict[str, Any]],
          net: dict[str, Any] | None = None) -> list[QubeView]:
    """Per qube: the ruleset to audit (live, or generated) and its place in the chain, all
    from the typed plan; interfaces from the kernel when `net` (live facts) is given."""
    out = []
    for q in plan.qubes:
        tun = role_for(q.kind).tunnel(q)
        ifaces = list(q.interfaces)
        if net and q.netns in net:
            ifaces = sorted(set(ifaces) | {x for x in net[q.netns]["links"] if x != "lo"})
        out.append(QubeView(q, rulesets[q.netns], ifaces, tun.dev if tun else None))
    return out


def live_rulesets(plan: Plan, k: Any) -> dict[str, dict[str, Any]]:
    """Each qube's ruleset as the kernel has it now, read with the nftables binding."""
    return {q.netns: k.nft_list(q.netns) for q in plan.qubes}


def live_net(plan: Plan, k: Any) -> dict[str, dict[str, Any]]:
    """Links, addresses and routes of each qube as the kernel has them now, for the
    end-to-end walk: it then follows the real routing, tunnel up or down."""
    out: dict[str, dict[str, Any]] = {}
    for q in plan.qubes:
        links = k.links(q.netns)
        out[q.netns] = {"routes": k.routes(q.netns), "links": sorted(x.name for x in links),
                        "addrs": [a.split("/")[0] for x in links for a in x.addresses]}
    return out


def run(stack: str, drift: bool = False, replay: bool = False) -> dict[str, Any]:
    from netstack.kernel import RealKernel
    from netstack.stack import require, require_root

    require_root("audit")
    st = require(stack)
    if st.data.status != "up":
        from netstack.errors import StateError

        raise StateError(f"stack {stack!r} is half made (an interrupted `up`); run `netstack "
                         f"--stack {stack} down`, or `up` to repair, before auditing it")
    plan = st.plan
    assert plan is not None
    k = RealKernel()
    try:
        live = live_rulesets(plan, k)
        net = live_net(plan, k)
    finally:
        k.close()
    from netstack.rules import names

    store = names.load(st.dir)
    res, secs = audit(plan, live, st.data.resolved, net,
                      {n: names.addresses(store, n) for n in store}, st.data.started)
    out: dict[str, Any] = {"stack": stack, "seconds": round(secs, 3),
                           "results": [r.to_json() for r in res]}
    if drift:
        from netstack.audit.drift import semantic_diff, text_diff

        gen = canonical({n.name: n.ruleset for n in plan.namespaces
                         if n.ruleset and n.qube is not None})
        d = []
        for q in plan.qubes:
            ns = q.netns
            tun = role_for(q.kind).tunnel(q)
            ifaces = list(q.interfaces) + ([tun.dev] if tun else [])
            want_rs = _with_live_sets(gen[ns], live[ns])
            text = text_diff(live[ns], want_rs, q.name)
            sem = semantic_diff(live[ns], want_rs, ifaces) if text else []
            d.append({"qube": q.name, "text": text, "semantic": sem})
        out["drift"] = d
    if replay:
        from netstack.audit.replay import replay as do_replay

        by_qube = {q.name: q.netns for q in plan.qubes}
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

    from netstack.kernel import RealKernel
    from netstack.rules.nft import commands

    scratch = f"nsaudit-{os.getpid()}"
    k = RealKernel()
    k.netns_create(scratch)
    try:
        out = {}
        for ns, rs in rulesets.items():
            k.nft(scratch, commands(rs))
            out[ns] = k.nft_list(scratch)
        return out
    finally:
        k.netns_delete(scratch)
        k.close()


def _with_live_sets(gen: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Named sets are filled at run time (resolved VPN endpoints): compare rules, not the
    resolution (the endpoint-set property checks that separately)."""
    sets = {i["set"]["name"]: i["set"] for i in live.get("nftables", []) if "set" in i}
    items = []
    for i in gen["nftables"]:
        if "set" in i and i["set"]["name"] in sets:
            s = dict(i["set"])
            if "elem" in sets[i["set"]["name"]]:
                s["elem"] = sets[i["set"]["name"]]["elem"]
            items.append({"set": s})
        else:
            items.append(i)
    return {"nftables": items}


def audit(plan: Plan, rulesets: dict[str, dict[str, Any]],
          resolved: dict[str, dict[str, list[str]]] | None,
          net: dict[str, dict[str, Any]] | None = None,
          rule_names: dict[str, dict[str, list[str]]] | None = None,
          started: float | None = None) -> tuple[list[Result], float]:
    """net: live links/addresses/routes per namespace (None: the plan's, for generated
    rulesets). rule_names, started: the run-time data of per-qube rules of a live stack
    (None: generated rulesets, whose run-time sets are still empty)."""
    from netstack.audit.e2e import end_to_end

    t0 = time.perf_counter()
    eps = all_transport(plan.infos(VpnInfo), resolved)
    ctx = AuditContext(plan, rulesets, resolved or {}, eps, rule_names or {},
                       started or 0.0, None if started is None else time.time())
    res = all_results(views(plan, rulesets, net), ctx)
    res += end_to_end(plan, rulesets, eps, net)
    return res, time.perf_counter() - t0
