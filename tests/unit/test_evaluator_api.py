"""The evaluator's one-packet API that drift, the end-to-end walk and the what-if stand on:
a packet as a point of the space and back, run_hook's verdict, trace, NAT and unknowns."""

from __future__ import annotations

from netstack.audit.evaluator import Evaluator, Packet, Ruleset, packet_of
from netstack.audit.space import FIELDS, NO_IFACE
from tests.unit.test_whatif import DOC, chain, m, rule


def point(p: Packet) -> dict:
    b = p.box()
    assert set(b) == set(FIELDS)
    out = {}
    for f, pred in b.items():
        assert pred.exact is not None and len(pred.exact) == 1, f
        out[f] = next(iter(pred.exact))
    return out


def test_a_packet_is_one_point_and_comes_back():
    p = Packet(family="ipv6", iifname="lan0", saddr="2001:db8::7", daddr="2001:db8::1",
               l4proto="tcp", sport=1234, dport=22, tcp_flags=frozenset({"syn", "ack"}),
               ct_state="established", ct_status=frozenset({"seen-reply"}), mark=7,
               length=80)
    pt = point(p)
    assert pt["family"] == "ipv6" and pt["iif"] == "lan0" and pt["oif"] == NO_IFACE
    assert pt["saddr6"] == 0x20010DB8000000000000000000000007 and pt["saddr4"] == 0
    assert pt["daddr6"] == 0x20010DB8000000000000000000000001 and pt["daddr4"] == 0
    assert (pt["l4proto"], pt["sport"], pt["dport"]) == (6, 1234, 22)
    assert pt["tcp_flags"] == {"syn", "ack"} and pt["ct_status"] == {"seen-reply"}
    assert (pt["mark"], pt["length"], pt["skuid"], pt["skgid"]) == (7, 80, None, None)
    assert (pt["icmp_type"], pt["icmp_code"]) == (0, 0)
    assert packet_of(pt) == p
    assert p.describe() == {"family": "ipv6", "iifname": "lan0", "saddr": "2001:db8::7",
                            "daddr": "2001:db8::1", "l4proto": "tcp", "sport": 1234,
                            "dport": 22, "tcp_flags": ["ack", "syn"],
                            "ct_state": "established", "ct_status": ["seen-reply"],
                            "mark": 7, "length": 80}


def test_describe_keeps_only_what_the_protocol_has():
    icmp = Packet(l4proto="icmp", icmp_type=8, saddr="192.0.2.7", daddr="192.0.2.1",
                  oifname="eth0", skuid=0, skgid=0)
    assert icmp.describe() == {"family": "ipv4", "oifname": "eth0", "saddr": "192.0.2.7",
                               "daddr": "192.0.2.1", "l4proto": "icmp", "icmp_type": 8,
                               "ct_state": "new", "mark": 0, "skuid": 0, "skgid": 0}
    udp = Packet(l4proto="udp", dport=53)
    assert "tcp_flags" not in udp.describe() and udp.describe()["dport"] == 53
    inv = point(Packet(ct_state="invalid", l4proto="udp", icmp_type=None))
    assert inv["ct_status"] is None and inv["ct_state"] == "invalid"


def test_run_hook_gives_the_verdict_the_trace_and_the_unknown():
    ev = Evaluator(Ruleset(DOC))
    ok = ev.run_hook("input", Packet(iifname="lan0", saddr="192.0.2.7", daddr="192.0.2.1",
                                     dport=22))
    assert ok.verdict == "accept" and not ok.unknown and ok.nat == []
    assert [str(s) for s in ok.trace] == ['input #5 "ssh from the admin box" -> accept']
    no = ev.run_hook("input", Packet(iifname="lan0", saddr="192.0.2.8", daddr="192.0.2.1",
                                     dport=22))
    assert no.verdict == "drop" and [str(s) for s in no.trace] == ["input -> policy drop"]
    fork = ev.run_hook("forward", Packet(iifname="lan0", oifname="wan0"))
    assert fork.verdict == "unknown" and fork.unknown == ["forward #6: limit/quota: may match"]


def test_run_hook_reports_nat():
    doc = {"nftables": [
        {"table": {"family": "inet", "name": "t"}},
        {"chain": {**chain("pre", "prerouting", "accept")["chain"], "type": "nat",
                   "prio": -100}},
        rule("pre", 3, m({"payload": {"protocol": "tcp", "field": "dport"}}, 80),
             {"dnat": {"family": "ip", "addr": "198.51.100.5"}}),
    ]}
    o = Evaluator(Ruleset(doc)).run_hook("prerouting", Packet(iifname="lan0",
                                                              daddr="203.0.113.1"))
    assert o.verdict == "accept" and o.nat == [{"dnat": {"family": "ip",
                                                         "addr": "198.51.100.5"}}]
    assert [str(s) for s in o.trace][0] == "pre #3 -> dnat"
