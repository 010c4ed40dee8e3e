"""The disagreements between the evaluator and the kernel found so far (and the kernel
behaviours written down on purpose), each with the fate the kernel gave: the evaluator
must predict exactly that. No root needed; tests/integration/test_differential.py checks
that the kernel still says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netstack.audit.evaluator import Ruleset, fate
from tests import nftgen

CASES = Path(__file__).parent.parent / "differential_cases"
NAMES = sorted(p.stem for p in CASES.glob("*.json"))


def test_there_are_cases():
    assert len(NAMES) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_evaluator_predicts_the_recorded_kernel_fate(name):
    case = json.loads((CASES / f"{name}.json").read_text())
    got = fate(Ruleset(case["ruleset"]), nftgen.packet_from(case["packet"]), nftgen.route,
               nftgen.LOCAL, nftgen.primary)
    assert [list(x) for x in got] == case["kernel"], case["why"]


def test_th_ports_without_a_port_protocol_are_unproven():
    """`th sport` reads an ICMPv6 packet's type and code (the kernel dropped this one: 0x8000
    is outside 80-180): without a match that restricts the rule to TCP/UDP the evaluator
    cannot know the bytes, so the verdict is unknown, never a guess."""
    rs = {"nftables": [
        {"table": {"family": "ip6", "name": "t"}},
        {"chain": {"family": "ip6", "table": "t", "name": "b", "type": "filter",
                   "hook": "prerouting", "prio": -300, "policy": "accept"}},
        {"rule": {"family": "ip6", "table": "t", "chain": "b", "expr": [
            {"match": {"op": "!=", "left": {"payload": {"protocol": "th", "field": "sport"}},
                       "right": {"range": [80, 180]}}}, {"drop": None}]}}]}
    p = nftgen.packet_from({"family": "ipv6", "iifname": "lan0", "saddr": "2001:db8:100::10",
                            "daddr": "2001:db8:2::2", "l4proto": "ipv6-icmp",
                            "icmp_type": 128})
    got = fate(Ruleset(rs), p, nftgen.route, nftgen.LOCAL, nftgen.primary)
    assert got == [("prerouting", "unknown")]
    # restricted to TCP and UDP first, the same match is exact
    rs["nftables"][2]["rule"]["expr"].insert(0, nftgen.L4_PORTS)
    tcp = nftgen.packet_from({"family": "ipv6", "iifname": "lan0", "saddr": "2001:db8:100::10",
                              "daddr": "2001:db8:2::2", "l4proto": "tcp", "sport": 8080,
                              "dport": 22, "tcp_flags": ["syn"]})
    assert fate(Ruleset(rs), tcp, nftgen.route, nftgen.LOCAL, nftgen.primary) == \
        [("prerouting", "drop")]
