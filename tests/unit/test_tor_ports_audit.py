"""The audit knows the gateway's SOCKS and control ports (no root): reachable only from its
workstations; a rule that opens them upstream, or opens another port to workstations, is a
counterexample."""

from __future__ import annotations

import copy

from netstack.audit import audit
from tests.unit.test_audit_clientrules import plan_of, rulesets
from tests.unit.test_reconcile import ROOT

TOR = (ROOT / "tests/configs/tor-two-workstations.toml").read_text()


def results(p, rs):
    res, _ = audit(p, rs, None)
    return {(r.qube, r.property): r for r in res}


def insert(rs, ns, expr):
    items = rs[ns]["nftables"]
    at = next(i for i, x in enumerate(items) if "rule" in x and x["rule"]["chain"] == "input")
    items.insert(at, {"rule": {"family": "inet", "table": "netstack", "chain": "input",
                               "expr": expr}})


def m(left, right):
    return {"match": {"op": "==", "left": left, "right": right}}


def test_socks_opened_upstream_and_another_port_for_workstations_are_caught():
    p = plan_of(TOR)
    base = rulesets(p)
    ok = results(p, base)
    ns = p.qube("sys-whonix").netns
    for prop in ("SOCKS and control ports only from workstations",
                 "only TransPort, DNSPort and the SOCKS ports from clients",
                 "control port only through the filter"):
        assert ok[("sys-whonix", prop)].status == "PASS", ok[("sys-whonix", prop)]
    rs = copy.deepcopy(base)
    insert(rs, ns, [m({"meta": {"key": "iifname"}}, "eth0"),
                    m({"payload": {"protocol": "tcp", "field": "dport"}}, 9050),
                    {"accept": None}])
    r = results(p, rs)[("sys-whonix", "SOCKS and control ports only from workstations")]
    assert r.status == "FAIL" and r.counterexample["iifname"] == "eth0", r
    rs = copy.deepcopy(base)
    insert(rs, ns, [m({"meta": {"key": "iifname"}}, "vif5"),
                    m({"payload": {"protocol": "tcp", "field": "dport"}}, 9150),
                    {"accept": None}])
    r = results(p, rs)[("sys-whonix",
                        "only TransPort, DNSPort and the SOCKS ports from clients")]
    assert r.status == "FAIL" and r.counterexample["dport"] == 9150, r
