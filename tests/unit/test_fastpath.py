"""The forwarding fast path (issue 16): where the kernel has flowtables, sys-net and
sys-firewall put established flows on one; the plan without them is unchanged; the
flowtable is loaded once its devices exist; the audit models `flow add` exactly (a flow
put on the fast path before the ruleset accepted it is caught)."""

from __future__ import annotations

import copy
import dataclasses

from netstack import fastpath, plan
from netstack.audit import audit
from netstack.hostcaps import HostCaps
from netstack.kinds.registry import SPECS
from netstack.reconcile import AddVeth, LinkUp, LoadRules, diff
from tests.unit.test_audit import make_plan, rulesets
from tests.unit.test_rules import rules_of

LAB = plan.UplinkSpec("lab")


def with_caps(tmp_path, caps: HostCaps, cfg="configs/vpn.toml"):
    p = make_plan(tmp_path, cfg)  # writes config.toml with a literal VPN endpoint
    inputs = plan.load_inputs(str(tmp_path / "config.toml"), "main", LAB, SPECS)
    return plan.build(dataclasses.replace(inputs, caps=caps), "main", LAB), p


def flowtables(rs):
    return [i["flowtable"] for i in rs["nftables"] if "flowtable" in i]


def test_flowtable_only_where_forwarding_is_plain(tmp_path):
    fast, slow = with_caps(tmp_path, HostCaps(flowtable=True))
    by = {q.name: q.netns for q in fast.qubes}
    assert flowtables(fast.ns(by["sys-net"]).ruleset) == [
        {"family": "inet", "table": "netstack", "name": "fastpath", "hook": "ingress",
         "prio": 0, "dev": ["uplink", "vif2"]}]
    assert flowtables(fast.ns(by["sys-firewall"]).ruleset)[0]["dev"] == ["eth0", "vif3"]
    for q in ("sys-proxyvm", "work"):  # a kill switch or an endpoint: never
        assert not flowtables(fast.ns(by[q]).ruleset)
    fwd = rules_of(fast.ns(by["sys-firewall"]).ruleset, "forward")
    i = next(n for n, r in enumerate(fwd) if r.get("comment", "").startswith("established"))
    assert fwd[i]["expr"][0] == {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                           "right": "established"}}
    assert fwd[i + 1]["comment"] == "replies"  # right before the accept it relies on
    # without flowtables (this machine) the plan is exactly the old one
    assert all(not fastpath.has_offload(n.ruleset) for n in slow.namespaces)
    stripped = {n.name: fastpath.without_offload(n.ruleset) for n in fast.namespaces
                if n.ruleset}
    assert stripped == {n.name: n.ruleset for n in slow.namespaces if n.ruleset}


def test_flowtable_loaded_once_its_devices_exist(tmp_path):
    fast, _ = with_caps(tmp_path, HostCaps(flowtable=True))
    steps = diff(None, fast)
    fw = next(q.netns for q in fast.qubes if q.name == "sys-firewall")
    loads = [(n, s) for n, s in enumerate(steps) if isinstance(s, LoadRules) and s.ns == fw]
    assert len(loads) == 2
    (first_i, first), (full_i, full) = loads
    assert first.fresh and not fastpath.has_offload(first.ruleset)
    assert not full.fresh and full.ruleset == fast.ns(fw).ruleset
    last_veth = max(n for n, s in enumerate(steps) if isinstance(s, AddVeth))
    first_up = min(n for n, s in enumerate(steps) if isinstance(s, LinkUp))
    assert last_veth < full_i < first_up  # devices made, nothing up yet


def test_fast_path_chain_audits_clean(tmp_path):
    fast, _ = with_caps(tmp_path, HostCaps(flowtable=True),
                        "tests/configs/tor-two-workstations.toml")
    res, _ = audit(fast, rulesets(fast), None)
    bad = {(r.qube, r.property): r.status for r in res if r.status != "PASS"}
    assert not bad and len(res) >= 16


def test_audit_catches_a_flow_offloaded_before_it_was_accepted(tmp_path):
    """The `flow add` moved to the top and made to take new flows: a new connection from
    one client to another gets on the fast path before the isolation rule drops it, so
    its later packets would pass. The audit says so."""
    fast, _ = with_caps(tmp_path, HostCaps(flowtable=True), "configs/basic.toml")
    rs = rulesets(fast)
    fw = next(q.netns for q in fast.qubes if q.name == "sys-firewall")
    broken = copy.deepcopy(rs[fw])
    items = broken["nftables"]
    off = next(i for i in items if "rule" in i and
               any("flow" in x for x in i["rule"]["expr"]))
    items.remove(off)
    off["rule"]["expr"] = off["rule"]["expr"][1:]  # any ct state
    first = next(n for n, i in enumerate(items) if "rule" in i and i["rule"]["chain"] ==
                 "forward")
    items.insert(first, off)
    res, _ = audit(fast, {**rs, fw: broken}, None)
    bad = [r for r in res if r.status != "PASS"]
    assert bad, "a flow offloaded before the rules judged it went unnoticed"
    assert {(r.qube, r.property) for r in bad} >= {("sys-firewall", "no path between clients")}
    assert any("flow add" in str(line) for r in bad for line in (r.trace or []))
