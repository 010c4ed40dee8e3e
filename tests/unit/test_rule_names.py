"""Run-time sets of per-qube rules: expiry read off the clock (relative to `up`, or a Unix
time), hostnames asked through the chain's resolver for the client and asked again when
their TTL runs out (no root: the recording fake kernel)."""

from __future__ import annotations

import time

import pytest

from netstack import firewall_live, sandbox
from netstack.errors import ConfigError
from netstack.kinds.registry import SPECS
from netstack.rules import names, qubefw
from tests.unit.test_disposable import plan_of, up
from tests.unit.test_reconcile import ROOT


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr("netstack.names.RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(sandbox, "HOME_ROOT", str(tmp_path / "lib"))


def short(name: str) -> str:
    """A rule set's name without the digest of its rule (qubefw.set_name)."""
    import re

    return re.sub(r"_[0-9a-f]{6}(?=(_6)?$)", "", name)


def elements(cmds, set_name):
    return [e for c in cmds if "element" in c.get("add", {})
            and short(c["add"]["element"]["name"]) == set_name
            for e in c["add"]["element"]["elem"]]


def test_expire_takes_seconds_from_up_or_a_unix_time():
    rel, at = qubefw.parse("w", [{"action": "accept", "expire": "+60"},
                                 {"action": "accept", "expire": "1767225600"}])
    assert (rel.expire, rel.expire_at, at.expire, at.expire_at) == (60, None, None, 1767225600)
    assert rel.deadline(1000.0) == 1060.0 and at.deadline(1000.0) == 1767225600.0
    assert at.describe() == "action=accept expire=1767225600"
    for bad in ("+0", "60", "12345", "tomorrow", True, 99):
        with pytest.raises(ConfigError, match="'expire'.*Unix time"):
            qubefw.parse("w", [{"action": "accept", "expire": bad}])
    # `firewall add expire=+N` keeps the time it ends, so no reload restarts its clock
    assert qubefw.absolute_expiry({"expire": "+30"}, 1000.4) == {"expire": "1030"}
    assert qubefw.absolute_expiry({"expire": "1767225600"}, 0) == {"expire": "1767225600"}


def test_fill_gives_each_expiring_rule_the_time_it_has_left_and_ended_ones_nothing():
    from netstack.model import UplinkSpec
    from netstack.plan import build

    text = (ROOT / "tests/configs/firewall-rules.toml").read_text()
    p = build(qubefw_config(text), "main", UplinkSpec("lab"))
    started = 1000.0
    cmds = qubefw.fill_commands(p, "sys-firewall", {"vpn.lab.test": ["203.0.113.10"]},
                                started, 1002.0)
    assert elements(cmds, "fw4_5") == [{"elem": {"val": "203.0.113.10", "timeout": 8}}]
    assert elements(cmds, "fw4_4") == ["203.0.113.10"]
    assert elements(cmds, "fw4_7") == []  # nosuch.lab.test: no answer, matches nothing
    flushed = {short(c["flush"]["set"]["name"]) for c in cmds if "flush" in c}
    assert {"fw4_4", "fw4_5", "fw4_7"} <= flushed
    later = qubefw.fill_commands(p, "sys-firewall", {}, started, 1010.5)
    assert elements(later, "fw4_5") == [] and "fw4_5" in {
        short(c["flush"]["set"]["name"]) for c in later if "flush" in c}


def qubefw_config(text):
    from netstack.config import parse

    return parse(text, SPECS)


def test_dns_with_expiry_lives_in_a_set_of_the_virtual_dns():
    from netstack.model import UplinkSpec
    from netstack.plan import build

    text = (ROOT / "configs/basic.toml").read_text().replace(
        'label = "blue"', 'label = "blue"\nfirewall = [{action = "accept", specialtarget = '
        '"dns", expire = "+30"}]', 1)
    p = build(qubefw_config(text), "main", UplinkSpec("lab"))
    qid = p.qube("work").qid
    cmds = qubefw.fill_commands(p, "sys-firewall", {}, 0.0, 10.0)
    assert elements(cmds, f"fw{qid}_1") == [{"elem": {"val": "10.139.1.1", "timeout": 20}},
                                            {"elem": {"val": "10.139.1.2", "timeout": 20}}]


def test_allows_follows_resolved_names_and_the_clock():
    rules = qubefw.parse("w", [{"action": "accept", "dsthost": "web.lab.test"},
                               {"action": "accept", "dsthost": "192.0.2.7",
                                "expire": "+10"}])
    dns = ("10.139.1.1",)
    assert qubefw.allows(rules, "198.51.100.80", "tcp", 80, None, dns,
                         {"web.lab.test": ["198.51.100.80"]})
    assert not qubefw.allows(rules, "198.51.100.80", "tcp", 80, None, dns, {})
    assert qubefw.allows(rules, "192.0.2.7", "udp", 1, None, dns, {}, 100.0, 105.0)
    assert not qubefw.allows(rules, "192.0.2.7", "udp", 1, None, dns, {}, 100.0, 110.0)


def test_names_are_asked_through_the_clients_resolver_and_again_after_their_ttl():
    fk, st = up("tests/configs/firewall-rules.toml")
    lookups = [e for e in fk.events if e[0] == "lookup"]
    fw = plan_of().qube("sys-firewall").netns
    # asked from sys-firewall at the virtual DNS (carried onwards as the client's DNS is)
    assert {e[1:] for e in lookups} == {(fw, "10.139.1.1", 53, "vpn.lab.test"),
                                        (fw, "10.139.1.1", 53, "nosuch.lab.test")}
    store = names.load(st.dir)["sys-firewall"]
    assert store["vpn.lab.test"].addrs == ["203.0.113.10"] and store["vpn.lab.test"].ttl == 60
    assert store["nosuch.lab.test"].addrs == []
    t0 = store["vpn.lab.test"].at
    n = len(fk.events)
    # within the TTL only the unresolved name is retried (after RETRY); nothing reloads
    names.refresh(st.dir, plan_of(), st.data.started, fk, now=t0 + names.RETRY + 0.1,
                  only_due=True)
    assert [e[4] for e in fk.events[n:] if e[0] == "lookup"] == ["nosuch.lab.test"]
    assert not [e for e in fk.events[n:] if e[0] == "nft"]
    # the answer changed when the TTL ran out: the set is refilled
    fk.answers["vpn.lab.test"] = ["203.0.113.11"]
    n = len(fk.events)
    names.refresh(st.dir, plan_of(), st.data.started, fk, now=t0 + 61, only_due=True)
    loads = [e for e in fk.events[n:] if e[0] == "nft" and e[1] == fw]
    assert loads and "203.0.113.11" in str(loads[0])
    assert names.load(st.dir)["sys-firewall"]["vpn.lab.test"].addrs == ["203.0.113.11"]
    lines = names.status_lines({"client_rules": {"names": {
        h: a.to_json() for h, a in names.load(st.dir)["sys-firewall"].items()}}})
    assert any("nosuch.lab.test does not resolve" in x for x in lines)
    assert any("vpn.lab.test -> 203.0.113.11 (TTL 60 s" in x for x in lines)


def test_behind_a_tor_gateway_names_are_asked_at_its_dnsport():
    fk, st = up("configs/tor-over-vpn.toml")
    firewall_live.change("main", "anon-whonix", "add",
                         ["action=accept", "dsthost=web.lab.test", "proto=tcp"], kernel=fk)
    tor = plan_of().qube("sys-whonix")
    from netstack.tor.gateway import DNS_PORT

    assert ("lookup", tor.netns, tor.ipv4, DNS_PORT, "web.lab.test") in fk.events


def test_a_firewall_add_with_relative_expiry_keeps_its_end_across_reloads():
    fk, st = up("configs/basic.toml")
    before = time.time()
    firewall_live.change("main", "work", "add", ["action=accept", "dsthost=192.0.2.7",
                                                 "expire=+100"], kernel=fk)
    (kept,) = qubefw.load_overlay("main")["work"]
    assert before + 100 <= int(kept["expire"]) + 1 <= time.time() + 101
