"""The user's invariants proven on rulesets (netstack/audit/invariants.py), no root: on the
generated rulesets of configs/invariants.toml each holds, with the ways its packets end;
broken on purpose (a rule a hand could add) each FAILs with a counterexample: the Tor
gateway's output opened to any process (anon-whonix's packets end in a qube whose output
is no longer only tor), and the VPN qube forwarding its client past the tunnel
(a packet of work on the ISP link in clear)."""

from __future__ import annotations

import copy
import dataclasses

from tests.unit.test_audit import (
    IIF,
    OIF,
    insert_rule,
    make_plan,
    match,
    results,
    rulesets,
)

CFG = "configs/invariants.toml"
GW, VPN = "nst-main-sys-whonix", "nst-main-sys-proxyvm"
ANON = "invariant 1 (anon only through Tor): reach only tor; netvm in @kind:tor"
WORK = "invariant 2 (work never in clear): never clearnet"


def test_each_invariant_holds_on_the_generated_rulesets(tmp_path):
    p = make_plan(tmp_path, CFG)
    res = results(p, rulesets(p))
    anon, work = res[("anon-whonix", ANON)], res[("work", WORK)]
    assert anon.status == "PASS" and "into sys-whonix (tor)" in anon.reason, anon.reason
    assert "clearnet" not in anon.reason and "vpn)" not in anon.reason and anon.classes >= 3
    assert work.status == "PASS" and "transport (vpn)" in work.reason, work.reason
    assert "LEAK" not in work.reason


def test_a_gateway_output_open_to_any_process_fails_reach_tor(tmp_path):
    p = make_plan(tmp_path, CFG)
    rs = copy.deepcopy(rulesets(p))
    insert_rule(rs, GW, "output", [{"accept": None}])  # any process may send, not only tor
    r = results(p, rs)[("anon-whonix", ANON)]
    assert r.status == "FAIL", r.reason
    assert "end in sys-whonix, whose own properties do not hold" in r.reason
    assert "'gateway output only from tor' FAIL" in r.reason
    assert r.counterexample  # the gateway's packet that leaves not from tor


def test_a_vpn_bypass_fails_never_clearnet_with_the_packet(tmp_path):
    p = make_plan(tmp_path, CFG)
    rs = copy.deepcopy(rulesets(p))
    vif = f"vif{p.qube('work').qid}"
    insert_rule(rs, VPN, "forward", [match(IIF, vif), match(OIF, "eth0"), {"accept": None}])
    insert_rule(rs, VPN, "nat_postrouting", [match(OIF, "eth0"), {"masquerade": None}])
    r = results(p, rs)[("work", WORK)]
    assert r.status == "FAIL", r.reason
    assert "way out: clearnet" in r.reason and r.counterexample
    assert any(f"sys-proxyvm: forward {vif}->eth0 accept" in t for t in r.trace)
    assert any("ISP link CLEAR" in t for t in r.trace)


def test_a_plan_that_breaks_one_fails_without_a_walk(tmp_path):
    p = make_plan(tmp_path, CFG)
    rs = rulesets(p)
    p.qubes = [dataclasses.replace(q, netvm="sys-firewall") if q.name == "work" else q
               for q in p.qubes]
    r = results(p, rs)[("work", WORK)]
    assert r.status == "FAIL" and r.reason.startswith("the plan breaks it: reaches the "
                                                      "outside by clearnet")
