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
        if f in ("iifgroup", "oifgroup"):  # a group where the interface is known (the
            iface = b[f[:3]].exact  # evaluator's pairings pick it)
            out[f] = 0 if iface and NO_IFACE not in iface else None
            continue
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
    assert fork.verdict == "unknown" and fork.unknown == ["meta cgroup"]


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


def test_a_portless_packet_is_port_zero_and_other_protocols_keep_theirs():
    icmp = point(Packet(l4proto="icmp", icmp_type=8, sport=None, dport=None))
    assert (icmp["sport"], icmp["dport"], icmp["l4proto"]) == (0, 0, 1)
    assert point(Packet(l4proto="esp", sport=None, dport=None))["l4proto"] == 50
    assert point(Packet(l4proto="nosuch", sport=None, dport=None))["l4proto"] == 253
    lite = Packet(l4proto="udplite", sport=5, dport=6).describe()
    assert (lite["sport"], lite["dport"]) == (5, 6) and "tcp_flags" not in lite
    back = packet_of({**point(Packet(l4proto="esp", sport=None, dport=None))})
    assert back.l4proto == "esp" and back.sport is None and back.dport is None
    assert packet_of({**point(Packet(l4proto="udp")), "l4proto": 200}).l4proto == "200"


def test_fate_says_where_a_packet_is_lost():
    from netstack.audit.evaluator import fate

    rs = Ruleset(DOC)
    nowhere = lambda d: None  # noqa: E731
    assert fate(rs, Packet(iifname="lan0", daddr="203.0.113.1"), nowhere, set()) == \
        [("prerouting", "accept"), ("route", "lost")]
    assert fate(rs, Packet(daddr="203.0.113.1", skuid=5, skgid=5), nowhere, set()) == \
        [("route", "lost")]
    # an input interface never leaks into the prerouting packet's output interface
    assert fate(rs, Packet(iifname="lan0", oifname="wan0", saddr="192.0.2.7",
                           daddr="192.0.2.1", dport=22), nowhere, {"192.0.2.1"}) == \
        [("prerouting", "accept"), ("input", "accept")]
    out = fate(rs, Packet(daddr="203.0.113.1", skuid=1000, skgid=0), lambda d: "wan0", set())
    assert out == [("output", "drop")]
    out = fate(rs, Packet(daddr="203.0.113.1", skuid=1, skgid=0), lambda d: "wan0", set())
    assert out == [("output", "accept"), ("postrouting", "accept")]
