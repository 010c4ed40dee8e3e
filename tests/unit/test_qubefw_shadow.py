"""Rules that can never match (rules/qubefw.shadowed): an earlier rule that never expires
and matches every connection a later one would. Shown by `plan`, `up`, `firewall add` and
`firewall list`; never a false alarm for a rule that can still act."""

from __future__ import annotations

import pytest

from netstack.rules.qubefw import parse, shadowed

DNS = ("10.139.1.1", "10.139.1.2")


def dead(*rules: dict) -> list[tuple[int, int]]:
    return shadowed(parse("work", list(rules)), DNS)


@pytest.mark.parametrize("first,later", [
    ({"action": "drop"}, {"action": "accept", "dsthost": "192.0.2.7"}),
    ({"action": "drop"}, {"action": "accept", "specialtarget": "dns"}),
    ({"action": "drop"}, {"action": "accept", "dsthost": "example.org"}),
    ({"action": "drop", "dsthost": "0.0.0.0/0"}, {"action": "accept", "dsthost": "example.org"}),
    ({"action": "drop", "proto": "tcp", "dstports": "1-1024"},
     {"action": "accept", "proto": "tcp", "dstports": 443, "dsthost": "192.0.2.0/24"}),
    ({"action": "accept", "dsthost": "192.0.2.0/24"},
     {"action": "drop", "dsthost": "192.0.2.128/25", "proto": "udp"}),
    ({"action": "accept", "proto": "icmp"}, {"action": "drop", "proto": "icmp", "icmptype": 8}),
    ({"action": "accept", "specialtarget": "dns"}, {"action": "drop", "specialtarget": "dns"}),
    ({"action": "accept", "dsthost": "10.139.1.0/24"}, {"action": "drop", "specialtarget": "dns"}),
    ({"action": "accept", "dsthost": "2001:db8::/32"},
     {"action": "drop", "dsthost": "2001:db8::1"}),
])
def test_a_later_rule_inside_an_earlier_one_never_matches(first, later):
    assert dead(first, later) == [(2, 1)]


@pytest.mark.parametrize("first,later", [
    ({"action": "drop", "expire": "+60"}, {"action": "accept"}),  # it ends: then the later acts
    ({"action": "drop", "proto": "tcp"}, {"action": "accept", "proto": "udp"}),
    ({"action": "drop", "proto": "tcp", "dstports": 443}, {"action": "accept", "proto": "tcp"}),
    ({"action": "drop", "proto": "tcp", "dstports": "1-100"},
     {"action": "accept", "proto": "tcp", "dstports": "90-110"}),
    ({"action": "drop", "dsthost": "192.0.2.0/25"},
     {"action": "accept", "dsthost": "192.0.2.0/24"}),
    ({"action": "drop", "dsthost": "192.0.2.0/24"}, {"action": "accept", "dsthost": "2001:db8::1"}),
    ({"action": "drop", "dsthost": "192.0.2.0/24"}, {"action": "accept"}),
    ({"action": "drop", "dsthost": "example.org"}, {"action": "accept", "dsthost": "example.org"}),
    ({"action": "drop", "proto": "icmp", "icmptype": 8}, {"action": "accept", "proto": "icmp"}),
    ({"action": "drop", "proto": "udp"}, {"action": "accept", "specialtarget": "dns"}),
    ({"action": "drop", "dsthost": "10.139.1.1"}, {"action": "accept", "specialtarget": "dns"}),
    ({"action": "drop", "specialtarget": "dns"}, {"action": "accept", "dsthost": "10.139.1.1"}),
])
def test_a_rule_that_can_still_act_is_not_named(first, later):
    assert dead(first, later) == []


def test_the_first_covering_rule_is_named_and_no_list_is_quiet():
    assert dead({"action": "accept", "dsthost": "192.0.2.0/24"}, {"action": "drop"},
                {"action": "accept", "dsthost": "192.0.2.7"}) == [(3, 1)]
    assert shadowed(None, DNS) == [] and shadowed((), DNS) == []
