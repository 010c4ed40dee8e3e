"""What `status` compares (issue 24 item 2), without root: each rule of our table by its
digest, every named set against what netstack last set (the kill switch's endpoint sets
from the current server's transport, the generated sets), tables it did not make. Each
tampering is named in one line, so status can say DEGRADED and which element or rule."""

from __future__ import annotations

import copy
import time

from netstack import health
from tests.unit.test_audit import VPN, insert_rule, make_plan, match, netdev_table, rulesets


def _widen(doc):
    for i in doc["nftables"]:
        s = i.get("set")
        if s and s["name"] == "vpn_endpoints":
            s["elem"] = s["elem"] + [{"concat": ["198.51.100.53", "udp", 53]}]


def test_a_widened_endpoint_set_is_named_by_its_element(tmp_path):
    p = make_plan(tmp_path, "configs/tor-over-vpn.toml")
    want = health.expected_sets(p, {}, {}, 0.0, time.time())
    assert want[VPN]["vpn_endpoints"] == {"203.0.113.10 . udp . 51820"}
    doc = copy.deepcopy(rulesets(p)[VPN])
    assert health.set_problems(want[VPN], doc) == []
    _widen(doc)
    assert health.set_problems(want[VPN], doc) == [
        "set vpn_endpoints holds 198.51.100.53 . udp . 53, which netstack did not set"]
    # the rule digest cannot see it (elements change at run time): the set check must
    assert health.ruleset_digest(doc) == health.ruleset_digest(rulesets(p)[VPN])


def test_an_emptied_endpoint_set_and_a_set_not_ours_are_named(tmp_path):
    p = make_plan(tmp_path, "configs/vpn.toml")
    want = health.expected_sets(p, {}, {}, 0.0, time.time())[VPN]
    doc = copy.deepcopy(rulesets(p)[VPN])
    for i in doc["nftables"]:
        if i.get("set", {}).get("name") == "vpn_endpoints":
            i["set"].pop("elem")
    doc["nftables"].append({"set": {"family": "inet", "table": "netstack", "name": "x",
                                    "type": "ipv4_addr"}})
    assert health.set_problems(want, doc) == [
        "set vpn_endpoints lacks 203.0.113.10 . udp . 51820, which netstack set",
        "set x not made by netstack"]


def test_each_changed_rule_and_chain_is_named(tmp_path):
    p = make_plan(tmp_path, "configs/vpn.toml")
    base = rulesets(p)[VPN]
    want = health.rule_digests(base)
    assert health.rule_problems(want, base) == []
    doc = copy.deepcopy({VPN: base})
    insert_rule(doc, VPN, "forward", [match({"meta": {"key": "iifname"}}, "vif4"),
                                       {"accept": None}], "oops")
    got = health.rule_problems(want, doc[VPN])
    assert got == ['chain forward: rule #? "oops" not made by netstack']
    changed = copy.deepcopy(base)
    r = next(i["rule"] for i in changed["nftables"] if "rule" in i
             and i["rule"]["chain"] == "output")
    r["expr"][-1] = {"accept": None} if "drop" in r["expr"][-1] else {"drop": None}
    r["handle"] = 7
    [line] = health.rule_problems(want, changed)
    assert line.startswith("chain output: rule #7") and line.endswith("changed")
    gone = copy.deepcopy(base)
    gone["nftables"] = [i for i in gone["nftables"] if i.get("chain", {}).get("name")
                        != "nat_output" and i.get("rule", {}).get("chain") != "nat_output"]
    assert health.rule_problems(want, gone) == ["chain nat_output is gone"]


def test_counters_and_handles_are_not_changes(tmp_path):
    p = make_plan(tmp_path, "configs/vpn.toml")
    base = rulesets(p)[VPN]
    doc = copy.deepcopy(base)
    for i in doc["nftables"]:
        if "rule" in i:
            i["rule"]["handle"] = 999
            i["rule"]["expr"] = [{"counter": {"packets": 5, "bytes": 9}} if "counter" in e
                                 else e for e in i["rule"]["expr"]]
    assert health.rule_problems(health.rule_digests(base), doc) == []


def test_a_table_not_ours_is_named_with_its_chains(tmp_path):
    from netstack import pathfacts

    p = make_plan(tmp_path, "configs/vpn.toml")
    doc = copy.deepcopy(rulesets(p))
    netdev_table(doc, VPN, "ingress", "vif4", [{"fwd": {"dev": "eth0"}}])
    assert pathfacts.foreign_objects(doc[VPN]) == [
        "table netdev evil not made by netstack: chains ingress (ingress on vif4)"]
    assert pathfacts.foreign_objects(rulesets(p)[VPN]) == []


def test_an_expiring_rules_element_is_netstacks_for_a_second_past_its_end(tmp_path):
    """The kernel's element of an `expire="+10"` rule was given ceil(seconds left), so it
    may outlive the rule's end by up to a second: `status` must not call it foreign then
    (seen in a full run: DEGRADED as the rule ended), and must after that."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    p = make_plan(tmp_path, str(root / "tests" / "configs" / "firewall-rules.toml"))
    ns = p.qube("sys-firewall").netns

    def holds(now: float) -> bool:
        return any("203.0.113.10" in e for name, els in
                   health.expected_sets(p, {}, {}, 100.0, now)[ns].items()
                   if name.startswith("fw4_") for e in els)
    assert holds(104.0)        # in force
    assert holds(110.5)        # ended, but the kernel's element may still be there
    assert not holds(111.5)    # past the grace: an element now would be foreign
