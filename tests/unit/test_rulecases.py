"""Cases derived from a rule list (netstack/leaktest/rulecases.py), no root: each rule's
targets among the lab's hosts with the outcome the whole list predicts (first match),
unlisted targets expected dropped, behind Tor only TCP and DNS."""

from __future__ import annotations

from netstack.leaktest.rulecases import derive
from netstack.rules import qubefw

HOSTS = ["198.51.100.53", "198.51.100.80", "203.0.113.10"]


def rules(*raw):
    return qubefw.parse("w", list(raw))


def test_each_rule_is_probed_with_the_lists_own_verdict():
    rs = rules({"action": "accept", "specialtarget": "dns"},
               {"action": "drop", "dsthost": "198.51.100.80", "proto": "tcp",
                "dstports": 8080},
               {"action": "accept", "dsthost": "198.51.100.0/24", "proto": "tcp",
                "dstports": "8000-9000"},
               {"action": "accept", "dsthost": "vpn.lab.test", "proto": "udp",
                "dstports": 51820},
               {"action": "accept", "proto": "icmp", "icmptype": 0})
    cs = {c.name: c for c in derive(rs, {"vpn.lab.test": ["203.0.113.10"]}, HOSTS, 0, 1,
                                    tor=False)}
    assert cs["rule 1-dns"].expect and cs["rule 1-dns"].dst == "10.139.1.1"
    assert not cs["rule 2-tcp-198.51.100.80"].expect
    assert cs["rule 2-tcp-198.51.100.80"].dport == 8080
    # rule 3's first port on the web host is 8000 (not shadowed by rule 2's 8080)
    assert cs["rule 3-tcp-198.51.100.80"].expect and cs["rule 3-tcp-198.51.100.80"].dport \
        == 8000
    assert cs["rule 4-udp-203.0.113.10"].expect
    assert not any(n.startswith("rule 5") for n in cs)  # echo replies are not probed
    unlisted = [c for c in cs.values() if c.name.startswith("unlisted-")]
    assert {c.dst for c in unlisted} == set(HOSTS) and not any(c.expect for c in unlisted)


def test_a_shadowed_accept_expects_the_earlier_drop():
    rs = rules({"action": "drop", "dsthost": "198.51.100.0/24"},
               {"action": "accept", "dsthost": "198.51.100.80", "proto": "tcp"})
    (c,) = [c for c in derive(rs, {}, HOSTS, 0, 1, tor=False)
            if (c.proto, c.dst, c.dport) == ("tcp", "198.51.100.80", 80)]
    assert not c.expect  # probed once, with the verdict of the first match


def test_ended_rules_and_unresolved_names_give_no_reachable_case():
    rs = rules({"action": "accept", "dsthost": "203.0.113.10", "expire": "+5"},
               {"action": "accept", "dsthost": "nosuch.lab.test"})
    cs = derive(rs, {}, HOSTS, 0.0, 100.0, tor=False)
    assert not any(c.expect for c in cs)
    assert any(c.dst == "203.0.113.10" and not c.expect for c in cs)


def test_behind_tor_only_tcp_and_dns_are_probed():
    rs = rules({"action": "accept", "specialtarget": "dns"},
               {"action": "drop", "proto": "udp"},
               {"action": "accept", "dsthost": "198.51.100.80", "proto": "tcp"})
    cs = derive(rs, {}, HOSTS, 0, 1, tor=True)
    assert {c.proto for c in cs} == {"dns", "tcp"}
