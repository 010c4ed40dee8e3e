"""A qube cut off with `attach QUBE none` (no netvm, no link upstream): the audit proves
it for what it is and leaktest refuses it in one line, never a traceback (no root: the
recording fake and generated rulesets)."""

from __future__ import annotations

import pytest

from netstack import audit as audit_mod
from netstack.attach import attach
from netstack.audit import audit
from tests.unit.test_attach import dirs  # noqa: F401 - the fixture
from tests.unit.test_disposable import plan_of, up


def cut(cfg="configs/basic.toml", qube="work"):
    fk, st = up(cfg)
    attach("main", qube, "none", kernel=fk)
    return fk, plan_of()


@pytest.mark.parametrize("cfg,qube", [("configs/basic.toml", "work"),
                                      ("configs/tor-over-vpn.toml", "anon-whonix")])
def test_generated_rulesets_with_a_cut_off_qube_audit_clean(cfg, qube):
    fk, p = cut(cfg, qube)
    rs = {n.name: n.ruleset for n in p.namespaces if n.ruleset}
    res, _ = audit(p, rs, None)
    mine = {r.property: r for r in res if r.qube == qube}
    assert mine["cut off: no link"].status == "PASS"
    assert "reaches nothing" in mine["cut off: no link"].reason
    assert mine["default drop"].status == "PASS"
    # nothing about it anywhere fails (the fake resolves no VPN endpoint: that set is
    # empty in the generated rulesets whatever the attach did)
    bad = [(r.qube, r.property, r.status, r.reason) for r in res if r.status != "PASS"
           and r.property != "VPN endpoints exactly as resolved"]
    assert not bad


def test_a_link_left_in_a_cut_off_qube_fails_the_audit():
    fk, p = cut()
    rs = {n.name: n.ruleset for n in p.namespaces if n.ruleset}
    net = {q.netns: {"links": ["lo"], "routes": [], "addrs": [], "paths": None}
           for q in p.qubes}
    net[p.qube("work").netns]["links"] = ["eth0", "lo"]
    views = audit_mod.views(p, rs, net)
    from netstack.audit.properties import cut_off

    r = cut_off(next(v for v in views if v.name == "work"))[0]
    assert r.status == "FAIL" and "eth0" in r.reason


def test_leaktest_of_a_cut_off_qube_is_one_line():
    from netstack.errors import UsageError
    from netstack.leaktest import battery

    fk, _ = cut()
    with pytest.raises(UsageError, match="'work' has no netvm .*attach work NETVM"):
        battery.context("main", "work", fk)
    assert UsageError.exit_code == 2
    # without --qube the battery picks a qube that has a netvm
    assert battery.context("main", None, fk).ws.name == "personal"


def test_a_cut_off_qube_has_no_upstream_link_and_says_why():
    _, p = cut()
    q = p.qube("work")
    assert q.cut_off and q.interfaces == []
    with pytest.raises(ValueError, match="cut off"):
        _ = q.upstream_if
    assert not p.qube("sys-net").cut_off and not p.qube("personal").cut_off


def test_leaktest_rules_of_a_cut_off_qube_says_it_has_no_netvm():
    from netstack import firewall_live
    from netstack.errors import UsageError
    from netstack.leaktest import rulecases

    fk, _ = up("configs/basic.toml")
    firewall_live.change("main", "work", "add", ["action=accept", "specialtarget=dns"],
                         kernel=fk)
    attach("main", "work", "none", kernel=fk)
    with pytest.raises(UsageError, match="'work' has no netvm .*enforced nowhere"):
        rulecases.run("main", "work", kernel=fk)
