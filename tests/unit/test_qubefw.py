"""Qubes' firewall rules from the config: every field validated with a one-line error
naming the rule and the field, and the netvm's chain they become (no root)."""

from __future__ import annotations

import pytest

from netstack.config import parse
from netstack.errors import ConfigError
from netstack.kinds.registry import SPECS
from netstack.rules.qubefw import FwRule, rule_note
from netstack.rules.qubefw import parse as parse_rules
from tests.unit.test_config import ROOT
from tests.unit.test_rule_names import short

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
        parse(text, SPECS)
    msg = str(e.value)
    assert "qube 'work' field 'firewall'" in msg and words in msg and "\n" not in msg


def test_every_netvm_kind_enforces_and_tor_refuses_what_it_cannot_carry():
    base = (ROOT / "configs/tor-over-vpn.toml").read_text()

    def with_rules(rules: str):
        return parse(base.replace('kind = "app"', f'kind = "app"\nfirewall = [{rules}]', 1), SPECS)

    topo = with_rules('{action = "accept", proto = "tcp", dstports = 443}, '
                      '{action = "drop", proto = "udp"}, {action = "accept", '
                      'specialtarget = "dns"}')
    assert topo["anon-whonix"].netvm == "sys-whonix"
    for rule, why in (('{action = "accept", proto = "udp"}', "Tor carries only TCP"),
                      ('{action = "accept", proto = "icmp"}', "Tor carries only TCP"),
                      ('{action = "accept", dsthost = "192.168.1.0/24"}', "local range"),
                      ('{action = "accept", dsthost = "2001:db8::1"}', "IPv4 only")):
        with pytest.raises(ConfigError, match=f"rule 1.*cannot be enforced by 'sys-whonix'.*"
                           f"{why}"):
            with_rules(rule)


def test_rules_are_typed_and_normalised():
    rules = parse_rules("work", [
        {"action": "accept", "dsthost": "198.51.100.0/24", "proto": "tcp",
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


def test_the_netvm_chain_ends_in_a_drop_and_is_met_before_any_nat():
    from netstack.model import UplinkSpec
    from netstack.plan import build

    text = (ROOT / "tests/configs/firewall-rules.toml").read_text()
    p = build(parse(text, SPECS), "main", UplinkSpec("lab"))
    rs = p.ns("nst-main-sys-firewall").ruleset["nftables"]
    pre = [i["rule"] for i in rs if "rule" in i and i["rule"]["chain"] == "prerouting"]
    comments = [r.get("comment") for r in pre]
    # after anti-spoofing, before any NAT (prerouting filter runs at -150): the destination
    # the qube asked for, only for new connections
    assert comments.index("antispoof work") < comments.index("work's firewall rules")
    jump = pre[comments.index("work's firewall rules")]["expr"]
    assert {"jump": {"target": "fw-work"}} in jump and any(
        "ct" in str(e) and "new" in str(e) for e in jump)
    fwd = [i["rule"] for i in rs if "rule" in i and i["rule"]["chain"] == "forward"]
    chain = [i["rule"] for i in rs if "rule" in i and i["rule"]["chain"] == "fw-work"]
    assert chain[-1]["expr"] == [{"counter": None}, {"drop": None}]
    sets = {short(i["set"]["name"]): i["set"] for i in rs if "set" in i}
    assert "elem" not in sets["fw4_4"]  # a hostname: empty until resolved at `up`
    assert sets["fw4_5"]["flags"] == ["interval", "timeout"]
    assert "elem" not in sets["fw4_5"]  # expiring: filled with the time left at run time
    personal = [r for r in pre + fwd if "personal's firewall" in (r.get("comment") or "")]
    assert personal == []  # no list: the plain behaviour


def test_the_audit_follows_a_clients_chain(tmp_path):
    """The generated chain audits clean (the client-to-client and qube-address drops come
    before any accept of its rules)."""
    from netstack.audit import audit
    from netstack.model import UplinkSpec
    from netstack.plan import build

    p = build(parse((ROOT / "tests/configs/firewall-rules.toml").read_text(), SPECS), "main",
              UplinkSpec("lab"))
    res, _ = audit(p, {n.name: n.ruleset for n in p.namespaces if n.ruleset}, None)
    assert res and all(r.status == "PASS" for r in res), [r for r in res
                                                          if r.status != "PASS"]


@pytest.mark.parametrize("raw", [
    {"action": "accept", "dsthost": "192.0.2.7", "proto": "tcp", "dstports": 443},
    {"action": "drop", "dsthost": "198.51.100.0/24", "proto": "udp", "dstports": "8000-8080"},
    {"action": "accept", "proto": "icmp", "icmptype": 8, "comment": "ping"},
    {"action": "accept", "specialtarget": "dns"},
    {"action": "accept", "dsthost": "example.org", "expire": "+60"},
    {"action": "drop", "dsthost": "2001:db8::/32", "expire": 1767225600},
])
def test_a_typed_rule_gives_its_table_back(raw):
    """The list is typed from the config to the kernel; `netstack firewall` edits it as
    config tables again (the overlay) with FwRule.to_raw, which must lose nothing."""
    from netstack.rules.qubefw import parse as parse_rules

    (rule,) = parse_rules("q", [raw])
    assert parse_rules("q", [rule.to_raw()]) == (rule,)
    assert rule.to_raw() == raw


@pytest.mark.parametrize("comment,shown", [
    ("web", "comment=web"),
    ("web only", 'comment="web only"'),
    ("x dsthost=1.2.3.4", 'comment="x dsthost=1.2.3.4"'),
    ("a=b", 'comment="a=b"'),
    ("cost $5 `now`", 'comment="cost \\$5 \\`now\\`"'),
    ("it's", 'comment="it\'s"'),
    ("", 'comment=""'),
])
def test_a_comment_is_shown_so_it_cannot_pass_for_a_condition_and_pastes_back(comment,
                                                                             shown):
    """`firewall list` shows a comment with spaces or `=` quoted (an unquoted
    `comment=x dsthost=1.2.3.4` read as a rule restricted to 1.2.3.4 that accepts
    everything), and `firewall add` takes the shown words back: through a shell (which
    removes the quotes) and as one word with its quotes."""
    import subprocess

    from netstack.rules.qubefw import rule_from_words

    r = parse_rules("work", [{"action": "accept", "comment": comment}])[0]
    line = r.describe()
    assert line == f"action=accept {shown}"
    pasted = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True,
                            text=True, check=True).stdout.split("\0")[:-1]
    assert parse_rules("work", [rule_from_words(pasted)])[0] == r
    assert parse_rules("work", [rule_from_words(line.split(" ", 1))])[0] == r
    note = rule_note("work", 1, r)
    assert '"' not in note  # nft's text listing would not escape it


def test_a_rule_without_an_action_says_so():
    with pytest.raises(ConfigError, match="'action': missing .*accept"):
        parse_rules("work", [{"dsthost": "192.0.2.7"}])
    with pytest.raises(ConfigError, match="'action': 'allow' is not an action"):
        parse_rules("work", [{"action": "allow"}])
