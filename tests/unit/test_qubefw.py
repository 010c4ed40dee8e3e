"""Qubes' firewall rules from the config: every field validated with a one-line error
naming the rule and the field, and the netvm's chain they become (no root)."""

from __future__ import annotations

import pytest

from netstack.config import parse
from netstack.errors import ConfigError
from netstack.rules.qubefw import FwRule
from netstack.rules.qubefw import parse as parse_rules
from tests.unit.test_config import ROOT

BASIC = (ROOT / "configs/basic.toml").read_text()


@pytest.mark.parametrize(("rule", "words"), [
    ('"x"', "rule 1: must be a table"),
    ('{action = "allow"}', "rule 1 'action': 'allow' is not an action"),
    ('{action = "accept", port = 80}', "rule 1: unknown key 'port'"),
    ('{action = "accept", dsthost = "not a host!"}', "is neither an address"),
    ('{action = "accept", proto = "gre"}', "'gre' is not a protocol"),
    ('{action = "accept", dstports = 80}', "ports need a protocol with ports"),
    ('{action = "accept", proto = "tcp", dstports = "90-80"}', "outside 1-65535 or backwards"),
    ('{action = "accept", proto = "tcp", dstports = "http"}', "'http' is not a port"),
    ('{action = "accept", icmptype = 8}', 'needs proto = "icmp"'),
    ('{action = "accept", proto = "icmp", icmptype = 300}', "300 is not 0-255"),
    ('{action = "accept", specialtarget = "ntp"}', "'ntp' is not a target"),
    ('{action = "accept", specialtarget = "dns", proto = "udp"}', "stands alone"),
    ('{action = "accept", expire = "3600"}', "'3600' is not an expiry"),
    ('{action = "accept", comment = "a\\"b"}', "one line of text"),
])
def test_each_field_is_checked_with_one_line(rule, words):
    text = BASIC.replace('label = "blue"', f'label = "blue"\nfirewall = [{rule}]')
    with pytest.raises(ConfigError) as e:
        parse(text)
    msg = str(e.value)
    assert "qube 'work' field 'firewall'" in msg and words in msg and "\n" not in msg


def test_only_a_firewall_qube_enforces_rules_for_now():
    text = (ROOT / "configs/tor-over-vpn.toml").read_text().replace(
        'kind = "app"', 'kind = "app"\nfirewall = [{action = "accept"}]', 1)
    with pytest.raises(ConfigError, match="does not enforce per-qube rules yet"):
        parse(text)


def test_rules_are_typed_and_normalised():
    rules = parse_rules("work", [
        {"action": "accept", "dsthost": "198.51.100.7/24", "proto": "tcp",
         "dstports": "80-443"},
        {"action": "drop", "dsthost": "Web.Lab.Test", "proto": "udp", "dstports": 53,
         "expire": "+60", "comment": "no"},
        {"action": "accept", "dsthost": "2001:db8::1/128"}])
    assert rules[0] == FwRule("accept", "198.51.100.0/24", "tcp", (80, 443))
    assert rules[1].dsthost == "web.lab.test" and rules[1].host_is_name
    assert rules[1].expire == 60 and rules[1].family() is None
    assert rules[2].dsthost == "2001:db8::1" and rules[2].family() == "ipv6"
    assert rules[1].describe() == ("action=drop dsthost=web.lab.test proto=udp dstports=53 "
                                   "expire=+60 comment=no")


def test_the_netvm_chain_ends_in_a_drop_and_comes_after_the_qube_address_drop():
    from netstack.model import UplinkSpec
    from netstack.plan import build

    text = (ROOT / "tests/configs/firewall-rules.toml").read_text()
    p = build(parse(text), "main", UplinkSpec("lab"))
    rs = p.ns("nst-main-sys-firewall").ruleset["nftables"]
    fwd = [i["rule"] for i in rs if "rule" in i and i["rule"]["chain"] == "forward"]
    comments = [r.get("comment") for r in fwd]
    assert comments.index("no qube addresses") < comments.index("work's firewall rules") \
        < comments.index("clients -> upstream only")
    chain = [i["rule"] for i in rs if "rule" in i and i["rule"]["chain"] == "fw-work"]
    assert chain[-1]["expr"] == [{"counter": None}, {"drop": None}]
    sets = {i["set"]["name"]: i["set"] for i in rs if "set" in i}
    assert "elem" not in sets["fw4_4"]  # a hostname: empty until resolved at `up`
    assert sets["fw4_5"]["flags"] == ["interval", "timeout"]
    assert sets["fw4_5"]["elem"] == [{"elem": {"val": "203.0.113.10", "timeout": 6}}]
    personal = [r for r in fwd if "personal" in (r.get("comment") or "")]
    assert personal == []  # no list: the plain behaviour


def test_the_audit_follows_a_clients_chain(tmp_path):
    """The generated chain audits clean (the client-to-client and qube-address drops come
    before any accept of its rules)."""
    from netstack.audit import audit
    from netstack.model import UplinkSpec
    from netstack.plan import build

    p = build(parse((ROOT / "tests/configs/firewall-rules.toml").read_text()), "main",
              UplinkSpec("lab"))
    res, _ = audit(p, {n.name: n.ruleset for n in p.namespaces if n.ruleset}, None)
    assert res and all(r.status == "PASS" for r in res), [r for r in res
                                                          if r.status != "PASS"]
