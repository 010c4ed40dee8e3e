"""The audit property "reaches exactly what its rules allow" (netstack/audit/clientrules.py)
on generated and hand-broken rulesets (no root): it passes the generated chain in every
netvm kind, and names a counterexample for each way the chain can betray the list."""

from __future__ import annotations

import copy

import pytest

from netstack.audit import audit
from netstack.kinds.registry import SPECS
from netstack.model import UplinkSpec
from netstack.plan import build
from tests.unit.test_reconcile import ROOT

FW = (ROOT / "tests/configs/firewall-rules.toml").read_text()
PROP = "work reaches exactly what its rules allow"


def plan_of(text: str, tmp=None):
    import tempfile
    from pathlib import Path

    from netstack.plan import load_inputs

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "c.toml"
        cfg.write_text(text)
        lab = UplinkSpec("lab")
        return build(load_inputs(str(cfg), "main", lab, SPECS, overlay={}), "main", lab)


def rulesets(p):
    return {n.name: copy.deepcopy(n.ruleset) for n in p.namespaces if n.ruleset}


def result(p, rs, names=None, started=None, prop=PROP):
    res, _ = audit(p, rs, None, None, names, started)
    (r,) = [r for r in res if r.property == prop]
    return r


def rules_of(rs, chain):
    return [i for i in rs["nftables"] if "rule" in i and i["rule"]["chain"] == chain]


def test_the_generated_chain_passes_in_every_netvm_kind():
    p = plan_of(FW)
    assert result(p, rulesets(p)).status == "PASS"
    tor = (ROOT / "configs/tor-over-vpn.toml").read_text().replace(
        'kind = "app"', 'kind = "app"\nfirewall = [{action = "accept", specialtarget = '
        '"dns"}, {action = "drop", dsthost = "198.51.100.0/24", proto = "tcp", dstports = '
        '"8000-9000"}, {action = "accept", proto = "tcp"}]', 1)
    tp = plan_of(tor)
    r = result(tp, rulesets(tp), prop="anon-whonix reaches exactly what its rules allow")
    assert r.status == "PASS" and r.qube == "sys-whonix", r
    vpn = (ROOT / "configs/vpn.toml").read_text().replace(
        'label = "blue"', 'label = "blue"\nfirewall = [{action = "accept", dsthost = '
        '"192.0.2.0/25", proto = "udp", dstports = 53}]', 1)
    vp = plan_of(vpn)
    assert result(vp, rulesets(vp)).status == "PASS"


def test_a_missing_jump_is_a_destination_its_rules_drop_that_passes():
    p = plan_of(FW)
    rs = rulesets(p)
    fw = rs["nst-main-sys-firewall"]
    fw["nftables"] = [i for i in fw["nftables"] if not ("rule" in i and i["rule"].get(
        "comment") == "work's firewall rules")]
    r = result(p, rs)
    assert r.status == "FAIL" and "its rules drop it" in r.reason, r
    assert r.counterexample["saddr"] == "10.137.0.4"


def test_rules_in_the_wrong_order_are_caught():
    text = (ROOT / "configs/basic.toml").read_text().replace(
        'label = "blue"', 'label = "blue"\nfirewall = [{action = "drop", dsthost = '
        '"198.51.100.80", proto = "tcp"}, {action = "accept", dsthost = "198.51.100.0/24"}]',
        1)
    p = plan_of(text)
    rs = rulesets(p)
    assert result(p, rs).status == "PASS"
    fw = rs["nst-main-sys-firewall"]["nftables"]
    chain = rules_of({"nftables": fw}, "fw-work")
    i1 = fw.index(next(r for r in chain if "rule 1:" in (r["rule"].get("comment") or "")))
    i2 = fw.index(next(r for r in chain if "rule 2:" in (r["rule"].get("comment") or "")))
    fw[i1], fw[i2] = fw[i2], fw[i1]  # the /24 accept now comes first
    r = result(p, rs)
    assert r.status == "FAIL" and "its rules drop it (rule 1" in r.reason, r
    assert r.counterexample["daddr"] == "198.51.100.80"
    assert r.counterexample["l4proto"] == "tcp"


def test_an_accept_turned_drop_is_the_reverse_counterexample():
    p = plan_of(FW)
    rs = rulesets(p)
    for i in rules_of(rs["nst-main-sys-firewall"], "fw-work"):
        if "rule 3:" in (i["rule"].get("comment") or ""):
            i["rule"]["expr"][-1] = {"drop": None}
    r = result(p, rs)
    assert r.status == "FAIL" and "its rules accept it" in r.reason, r


@pytest.mark.parametrize("fill", [False, True])
def test_resolved_names_and_expiry_are_checked_against_the_live_sets(fill):
    """A live stack: vpn.lab.test resolved to 203.0.113.10 and rule 5 (expire=+6) has time
    left. Sets filled as the names and clock say: PASS; left empty: its rules accept
    what the chain drops."""
    import time

    from netstack.rules import qubefw

    p = plan_of(FW)
    rs = rulesets(p)
    started = time.time()
    names = {"vpn.lab.test": ["203.0.113.10"]}
    if fill:
        cmds = qubefw.fill_commands(p, "sys-firewall", names, started, time.time())
        sets = {i["set"]["name"]: i["set"] for i in rs["nst-main-sys-firewall"]["nftables"]
                if "set" in i}
        for c in cmds:
            if "element" in c.get("add", {}):
                el = c["add"]["element"]
                sets[el["name"]].setdefault("elem", []).extend(el["elem"])
    r = result(p, rs, {"sys-firewall": names}, started)
    if fill:
        assert r.status == "PASS", r
    else:
        assert r.status == "FAIL" and "its rules accept it" in r.reason, r
        assert r.counterexample["daddr"] == "203.0.113.10"


def test_an_ended_rule_still_in_its_set_passes_what_its_rules_now_drop():
    import time

    p = plan_of(FW)
    rs = rulesets(p)
    for i in rs["nst-main-sys-firewall"]["nftables"]:
        if "set" in i and i["set"]["name"].startswith("fw4_5_"):
            i["set"]["elem"] = [{"elem": {"val": "203.0.113.10", "timeout": 6}}]
    r = result(p, rs, {"sys-firewall": {}}, time.time() - 60)  # up a minute ago: ended
    assert r.status == "FAIL" and "its rules drop it" in r.reason, r
    assert r.counterexample["dport"] == 22


def test_behind_tor_a_missing_list_is_reported_as_the_packet_the_client_sent():
    """Without its jump, a SYN its rules drop is redirected to TransPort and taken in: the
    counterexample is the SYN as sent (its real destination), not the redirected one."""
    tor = (ROOT / "configs/tor-over-vpn.toml").read_text().replace(
        'kind = "app"', 'kind = "app"\nfirewall = [{action = "accept", specialtarget = '
        '"dns"}, {action = "accept", dsthost = "198.51.100.0/24", proto = "tcp"}]', 1)
    tp = plan_of(tor)
    rs = rulesets(tp)
    prop = "anon-whonix reaches exactly what its rules allow"
    assert result(tp, rs, prop=prop).status == "PASS"
    gw = rs["nst-main-sys-whonix"]
    gw["nftables"] = [i for i in gw["nftables"] if not ("rule" in i and i["rule"].get(
        "comment") == "anon-whonix's firewall rules")]
    r = result(tp, rs, prop=prop)
    assert r.status == "FAIL" and "(input)" in r.reason, r
    ce = r.counterexample
    assert ce["l4proto"] == "tcp" and not ce["daddr"].startswith(("10.", "198.51.100.")), ce
    assert any("TCP SYN -> TransPort" in t or "redirect" in t for t in r.trace), r.trace


def test_the_lean_view_collapses_only_lists_followed_by_plain_verdicts():
    from netstack.audit.properties import collapse_lists

    p = plan_of(FW)
    rs = rulesets(p)["nst-main-sys-firewall"]
    lean = collapse_lists(rs)
    jumps = [i["rule"] for i in lean["nftables"] if "rule" in i and i["rule"].get(
        "comment") == "work's firewall rules"]
    assert jumps and {"accept": None} in jumps[0]["expr"]
    marked = copy.deepcopy(rs)
    marked["nftables"].append({"rule": {"family": "inet", "table": "netstack",
                                        "chain": "prerouting", "expr": [
                                            {"mangle": {"key": {"meta": {"key": "mark"}},
                                                        "value": 1}}]}})
    assert collapse_lists(marked) == marked  # a later rule changes packets: no collapse


def test_with_lists_in_place_a_forward_policy_accept_still_fails_default_drop():
    p = plan_of(FW)
    rs = rulesets(p)
    for i in rs["nst-main-sys-firewall"]["nftables"]:
        if "rule" in i and i["rule"]["chain"] == "forward" and \
                i["rule"].get("comment") == "clients -> upstream only":
            i["rule"]["expr"] = i["rule"]["expr"][:-1] + [{"counter": None}]
    for i in rs["nst-main-sys-firewall"]["nftables"]:
        if "chain" in i and i["chain"]["name"] == "forward":
            i["chain"]["policy"] = "accept"
    res, _ = audit(p, rs, None)
    (r,) = [r for r in res if r.property == "default drop" and r.qube == "sys-firewall"]
    assert r.status == "FAIL", r
