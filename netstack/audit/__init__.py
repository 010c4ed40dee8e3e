"""`netstack audit`: prove the chain's promises from the live nftables rulesets, without
sending a packet; show a counterexample packet and its path through the rules otherwise."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netstack.audit.properties import AuditContext, QubeView, Result, all_results
from netstack.errors import count
from netstack.kernel import Kernel
from netstack.kinds.registry import SPECS
from netstack.model import Plan
from netstack.vpn.info import VpnInfo, all_transport


def views(plan: Plan, rulesets: dict[str, dict[str, Any]],
          net: dict[str, Any] | None = None) -> list[QubeView]:
    """Per qube: the ruleset to audit (live, or generated) and its place in the chain, all
    from the typed plan; interfaces from the kernel when `net` (live facts) is given."""
    out = []
    for q in plan.qubes:
        tun = q.tunnel
        ifaces = list(q.interfaces)
        if net and q.netns in net:
            ifaces = sorted(set(ifaces) | {x for x in net[q.netns]["links"] if x != "lo"})
        out.append(QubeView(q, rulesets[q.netns], ifaces, tun.dev if tun else None))
    return out


def live_rulesets(plan: Plan, k: Any) -> dict[str, dict[str, Any]]:
    """Each qube's ruleset as the kernel has it now, read with the nftables binding."""
    from netstack.pathfacts import list_ruleset

    return {q.netns: list_ruleset(k, q.netns) for q in plan.qubes}


def live_net(plan: Plan, k: Any) -> dict[str, dict[str, Any]]:
    """Links, addresses and routes of each qube as the kernel has them now, for the
    end-to-end walk: it then follows the real routing, tunnel up or down."""
    from netstack.pathfacts import kernel_facts

    out: dict[str, dict[str, Any]] = {}
    for q in plan.qubes:
        links = k.links(q.netns)
        out[q.netns] = {"routes": k.routes(q.netns), "links": sorted(x.name for x in links),
                        "addrs": [a.split("/")[0] for x in links for a in x.addresses],
                        # tc, XDP, link kinds, ip rules: paths beside nftables
                        "paths": {**kernel_facts(k.netlink(q.netns)),
                                  "legacy": k.x_tables(q.netns)}}
    return out


def run(stack: str, k: Kernel, drift: bool = False, replay: bool = False) -> dict[str, Any]:
    from netstack.stack import require, require_root

    if k.real:
        require_root("audit")
    st = require(stack)
    if st.data.status != "up":
        from netstack.errors import StateError

        raise StateError(f"stack {stack!r} is half made (an interrupted `up`); run `netstack "
                         f"--stack {stack} down`, or `up` to repair, before auditing it")
    plan = st.plan
    assert plan is not None
    while (wait := expiry_settle(plan, st.data.started, time.time())) > 0:
        time.sleep(wait)  # a clock event (the kernel's set timeouts), then look again
    live = live_rulesets(plan, k)
    net = live_net(plan, k)
    from netstack.rules import names

    store = names.load(st.dir)
    res, secs = audit(plan, live, st.data.resolved, net,
                      {n: names.addresses(store, n) for n in store}, st.data.started,
                      calls=_call_edges(plan) if plan.invariants else None)
    out: dict[str, Any] = {"stack": stack, "seconds": round(secs, 3),
                           "results": [r.to_json() for r in res]}
    if drift:
        from netstack.audit.drift import semantic_diff, text_diff

        gen = canonical({n.name: n.ruleset for n in plan.namespaces
                         if n.ruleset and n.qube is not None}, k)
        from netstack import health, pathfacts

        want_sets = health.expected_sets(plan, st.data.resolved, store, st.data.started,
                                         time.time())
        d = []
        for q in plan.qubes:
            ns = q.netns
            tun = q.tunnel
            ifaces = list(q.interfaces) + ([tun.dev] if tun else [])
            want_rs = _with_live_sets(gen[ns], live[ns])
            text = text_diff(live[ns], want_rs, q.name)
            sem = semantic_diff(live[ns], want_rs, ifaces) if text else []
            # what netstack did not make, named: set elements (the text diff takes the
            # live sets as they are), tables, and packet paths beside nftables
            named = health.set_problems(want_sets.get(ns, {}), live[ns]) + \
                pathfacts.foreign_objects(live[ns]) + \
                [str(f) for f in pathfacts.kernel_findings(net[ns]["paths"], ifaces)]
            d.append({"qube": q.name, "text": text + [f"! {x}" for x in named],
                      "semantic": sem, "named": named})
        out["drift"] = d
        out["firewall_drift"] = firewall_drift(stack, plan, st.data.config)
    if replay:
        by_qube = {q.name: q.netns for q in plan.qubes}
        replay_failures(out["results"],
                        lambda q: live[by_qube[q]] if q in by_qube else None, k)
    bad = [r for r in out["results"] if r["status"] != "PASS"]
    out["ok"] = not bad and not any(x["text"] for x in out.get("drift", [])) and \
        not any(x["drift"] for x in out.get("firewall_drift", []))
    _record(st.dir, AuditRecord(time.time(), out["ok"], len(bad), len(out["results"])))
    return out


# An expiring rule's end as the audit's reference sees it (it is gone less than a second
# before its end: clientrules.model_doc) and as the kernel does (its set element, given
# ceil(seconds left) when filled, goes up to a second after): around the end they may
# disagree, which is no fault of the chain. The audit waits that out.
EXPIRY_WINDOW = 1.2


def expiry_settle(plan: Plan, started: float, now: float) -> float:
    """Seconds to wait until no per-qube rule is within EXPIRY_WINDOW of its end (0: none
    is), so the rulesets read and the clock they are judged by agree on every expiry."""
    ends = [end for q in plan.qubes for r in (q.firewall or ())
            if (end := r.deadline(started)) is not None
            and end - EXPIRY_WINDOW <= now < end + EXPIRY_WINDOW]
    return max(ends) + EXPIRY_WINDOW - now if ends else 0.0


def _call_edges(plan: Plan) -> list[tuple[str, str, str, str]]:
    """The call paths the stack's policy allows now (read as the call layer reads it: a
    policy that no longer parses allows nothing)."""
    from netstack import policy
    from netstack.errors import ConfigError

    if not plan.policy:
        return []
    try:
        pol = policy.load(plan.policy)
    except ConfigError:  # every call is denied (calls.verdict): no path; `calls` names it
        return []
    from netstack.calls import facts

    return policy.call_edges(pol, facts(plan))


@dataclass(frozen=True)
class AuditRecord:
    """The last audit's outcome, kept in the stack's directory for `metrics` (and gone
    with the stack: a result is about the rulesets that were audited)."""

    time: float
    ok: bool
    failed: int  # properties not proven (FAIL or UNPROVEN)
    properties: int


LAST = "audit-last.json"


def _record(stack_dir: str, rec: AuditRecord) -> None:
    from netstack import codec

    codec.write(os.path.join(stack_dir, LAST), rec)


def last_result(stack: str) -> dict[str, Any] | None:
    """The last audit of the stack ({"time", "ok", "failed", "properties"}), or None."""
    from netstack import codec
    from netstack.errors import DamagedFile
    from netstack.names import stack_dir

    try:
        rec = codec.read(os.path.join(stack_dir(stack), LAST), AuditRecord)
    except (OSError, DamagedFile):
        return None
    return {"time": rec.time, "ok": rec.ok, "failed": rec.failed,
            "properties": rec.properties}


REPLAYED_HOOKS = ("prerouting", "input", "forward", "output")


def replay_failures(results: list[dict[str, Any]],
                    ruleset_of: Callable[[str], dict[str, Any] | None], k: Kernel) -> None:
    """--replay: each FAIL's counterexample sent into the kernel with its ruleset loaded
    (scratch namespaces, audit/replay.py); `replay` is added to the result: the kernel's
    verdict and whether it confirms the evaluator's, or why it was not replayed."""
    for r in results:
        if r["status"] != "FAIL" or not r.get("counterexample") or ": " not in r["reason"]:
            continue
        rs = ruleset_of(r["qube"])
        if rs is None:
            continue
        hook, predicted = r["reason"].split(": ", 1)
        r["replay"] = replay_one(rs, hook, predicted, r["counterexample"], k)


def replay_one(rs: dict[str, Any], hook: str, predicted: str, packet: dict[str, Any],
               k: Kernel) -> dict[str, Any]:
    """One packet the evaluator judged (`predicted` at `hook`) sent into the kernel with
    the ruleset loaded: the kernel's verdict and whether it confirms, or why it was not
    replayed (also `audit --expect --replay`: counterexamples and witnesses)."""
    from netstack.audit.replay import replay as do_replay

    if hook not in REPLAYED_HOOKS:
        return {"replayable": False, "why": f"a counterexample at {hook}: the "
                f"replay sends packets through {', '.join(REPLAYED_HOOKS)}"}
    try:
        rp = do_replay(rs, hook, packet, k)
    except Exception as e:  # noqa: BLE001 - one counterexample not replayed, said so
        rp = {"replayable": False, "why": f"the scratch namespaces could not send it "
              f"({type(e).__name__}: {e})"}
    if rp.get("replayable"):
        rp["confirmed"] = rp.get("kernel_verdict") == predicted
    return rp


def firewall_drift(stack: str, plan: Plan, config: str | None) -> list[dict[str, Any]]:
    """Per-qube rule lists: where each list in force comes from, and where the kept
    overlay (firewall.json) or the config no longer says what is enforced. drift: the
    enforced list is not what `netstack firewall` kept (the file was edited or lost), or
    not what the config says for a qube `netstack firewall` never changed."""
    from netstack import config as cfg
    from netstack.errors import NetstackError
    from netstack.rules import qubefw

    try:
        kept = qubefw.load_overlay(stack)
    except NetstackError as e:
        return [{"qube": "-", "drift": True, "source": "overlay", "why": str(e)}]
    out = []
    plain, problem = None, _config_problem(stack, config)
    if problem is None:
        try:
            plain = cfg.load(str(config), SPECS, {})
        except (NetstackError, OSError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            problem = (f"config {config} no longer loads ({why}): the lists cannot be "
                       f"compared; fix it, or `netstack --stack {stack} down` and `up` with "
                       "the config you want")
    if problem:  # a comparison that cannot run has failed: never a quiet PASS
        out.append({"qube": "-", "drift": True, "source": "config", "why": problem})
    for q in plan.qubes:
        if q.settings.get("disposable"):
            continue
        now = q.firewall
        configured = next((c.firewall for c in plain.qubes
                           if c.name == q.name), None) if plain is not None else None
        n = "no list" if now is None else count(len(now), "rule")
        if q.name in kept:
            try:
                bad = qubefw.parse(q.name, kept[q.name]) != now
            except NetstackError:  # a kept list that no longer validates is drift too
                bad = True
            verb = "are" if now is not None and len(now) != 1 else "is"
            why = (f"firewall.json keeps {count(len(kept[q.name]), 'rule')} but {n} {verb} "
                   "enforced: `netstack firewall " + q.name + " reset` (or add them again)") \
                if bad \
                else (f"{n} from `netstack firewall` (the config has "
                      f"{'none' if configured is None else len(configured)}; "
                      f"`netstack firewall {q.name} reset` returns to it)")
            out.append({"qube": q.name, "drift": bad, "source": "netstack firewall",
                        "why": why})
        elif plain is not None and (now is not None or configured is not None):
            bad = now != configured
            says = "no list" if configured is None else count(len(configured), "rule")
            why = (f"the config now says {says}, {n} enforced: `netstack down` and `up` to "
                   "apply it") if bad else f"{n} from the config"
            out.append({"qube": q.name, "drift": bad, "source": "config", "why": why})
    return out


def _config_problem(stack: str, config: str | None) -> str | None:
    """Why the recorded config path cannot be what `up` read, or None. A relative path
    (recorded by an older netstack) names a file relative to wherever `up` ran: read from
    here it could be another file, or none."""
    import os

    fix = f"`netstack --stack {stack} down` and `up` again (the path is then kept absolute)"
    if not config:
        return f"stack {stack!r} records no config to compare with; fix: {fix}"
    if not os.path.isabs(config):
        return (f"config path {config!r} was recorded relative to the directory `up` ran in, "
                f"unknown here; fix: {fix}")
    return None


def canonical(rulesets: dict[str, dict[str, Any]], k: Kernel) -> dict[str, dict[str, Any]]:
    """The generated rulesets as the kernel would print them (nft drops implied matches and
    merges others): load each into a scratch namespace and read it back."""
    import os

    from netstack.rules.nft import commands

    scratch = f"nsaudit-{os.getpid()}"
    k.netns_create(scratch)
    try:
        out = {}
        for ns, rs in rulesets.items():
            k.nft(scratch, commands(rs))
            out[ns] = k.nft_list(scratch)
        return out
    finally:
        k.netns_delete(scratch)


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
          started: float | None = None,
          calls: list[tuple[str, str, str, str]] | None = None) -> tuple[list[Result], float]:
    """net: live links/addresses/routes per namespace (None: the plan's, for generated
    rulesets). rule_names, started: the run-time data of per-qube rules of a live stack
    (None: generated rulesets, whose run-time sets are still empty). calls: the call paths
    the policy allows (policy.call_edges), judged against the user's invariants."""
    from netstack.audit.e2e import end_to_end
    from netstack.audit.paths import paths_result, unproven_beside

    t0 = time.perf_counter()
    eps = all_transport(plan.infos(VpnInfo), resolved)
    ctx = AuditContext(plan, rulesets, resolved or {}, eps, rule_names or {},
                       started or 0.0, None if started is None else time.time(), SPECS)
    vs = views(plan, rulesets, net)
    res = all_results(vs, ctx)
    res += end_to_end(plan, rulesets, eps, net)
    paths = {v.name: paths_result(v, (net or {}).get(v.qube.netns, {}).get("paths")
                                  if net else None) for v in vs}
    chains = {q.name: [c.name for c in plan.chain(q.name)[1:]] for q in plan.qubes}
    res = unproven_beside(res, paths, chains) + list(paths.values())
    if plan.invariants:  # the user's [[invariant]]s, on the same rulesets (issue 28)
        from netstack.audit.invariants import prove

        res += prove(plan, rulesets, eps, net, res)
        if calls is not None:
            res += calls_results(plan, calls)
    return res, time.perf_counter() - t0


def calls_results(plan: Plan, calls: list[tuple[str, str, str, str]]) -> list[Result]:
    """The call layer as a way out (issue 28 item 4): data a qube under `reach`/`never`
    may hand by a call to a qube whose way out is another breaks the invariant; FAIL names
    the policy line. One result per invariant and qube it selects."""
    from netstack.invariants import CallEdge, judge_calls, selects

    verdicts = judge_calls(plan, [CallEdge(*c) for c in calls])
    out = []
    for inv in plan.invariants:
        if inv.reach is None and not inv.never:
            continue
        for q in plan.qubes:
            if not selects(inv.qubes, q):
                continue
            mine = [v for v in verdicts if v.invariant == inv and v.qube == q.name]
            bad = [v for v in mine if not v.ok]
            name = f"{inv.title}: calls"
            if bad:
                out.append(Result(name, q.name, "FAIL", f"{q.name} {bad[0].reason}"))
            else:
                out.append(Result(name, q.name, "PASS",
                                  f"no call the policy allows takes {q.name}'s data to "
                                  f"another way out ({len(mine)} call path"
                                  f"{'s' if len(mine) != 1 else ''} checked)"))
    return out
