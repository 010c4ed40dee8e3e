"""More constructs, one packet at a time, written against the mutation-testing survivors of
the 2026-11-28 sample (docs/benchmarks.md): named verdict maps, `ip length`, comparisons,
bitmask flag tests, escaped interface wildcards, rules with nothing but a counter, rules
without expressions or for undeclared chains, goto loops, what runs before connection
tracking, NAT that only an snat turns on, IPv6 NAT seen by later chains, a packet no
class holds, a fork after a redirect, the order of filter chains at the NAT core's and
conntrack's priorities, and fate's lost routes. Each assertion fails when the handling
it names is changed."""

from __future__ import annotations

import pytest

from netstack.audit.evaluator import Evaluator, Packet, Ruleset, fate

M = lambda key: {"meta": {"key": key}}  # noqa: E731
P = lambda proto, field: {"payload": {"protocol": proto, "field": field}}  # noqa: E731
CT = lambda key: {"ct": {"key": key}}  # noqa: E731
PKT = Packet(iifname="eth0", saddr="192.0.2.7", daddr="192.0.2.1", dport=22)


def m(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def doc(*chains, sets=(), family="inet", extra_rules=()):
    """chains: (name, hook or None, prio, type, policy, [expr, ...])."""
    items = [{"table": {"family": family, "name": "t"}}]
    handle = 10
    rules = []
    for name, hook, prio, typ, policy, exprs in chains:
        c = {"family": family, "table": "t", "name": name}
        if hook:
            c.update(type=typ, hook=hook, prio=prio, policy=policy)
        items.append({"chain": c})
        for e in exprs:
            rules.append({"rule": {"family": family, "table": "t", "chain": name,
                                   "handle": handle, "expr": e}})
            handle += 1
    for s in sets:
        items.append(s)
    return {"nftables": items + rules + list(extra_rules)}


def inp(*exprs, policy="accept"):
    return ("c", "input", 0, "filter", policy, list(exprs))


def run(d, p: Packet = PKT, hook: str = "input"):
    o = Evaluator(Ruleset(d)).run_hook(hook, p)
    return o.verdict, [str(s) for s in o.trace], o.unknown


def test_a_named_verdict_map():
    vm = {"map": {"family": "inet", "table": "t", "name": "vm", "type": "ipv4_addr",
                  "map": "verdict", "elem": [["192.0.2.7", {"drop": None}],
                                             ["192.0.2.8", {"accept": None}]]}}
    d = doc(inp([{"vmap": {"key": P("ip", "saddr"), "data": "@vm"}}], policy="accept"),
            sets=[vm])
    assert run(d)[0] == "drop" and run(d)[2] == []
    assert run(d, Packet(iifname="eth0", saddr="192.0.2.9", daddr="192.0.2.1"))[0] == "accept"


def test_a_verdict_map_element_of_another_shape_is_named():
    d = doc(inp([{"vmap": {"key": P("ip", "saddr"), "data": {"set": ["192.0.2.7"]}}}]))
    v, _, unknown = run(d)
    assert unknown == ["c #10: a verdict map element"]


def test_ip_length_is_understood():
    d = doc(inp([m(P("ip", "length"), 1000, ">"), {"drop": None}]))
    assert run(d, Packet(iifname="eth0", saddr="192.0.2.7", length=1500)) == \
        ("drop", ["c #10 -> drop"], [])
    assert run(d, Packet(iifname="eth0", saddr="192.0.2.7", length=60))[0] == "accept"


def test_comparisons_with_a_set_or_of_unordered_fields_are_named():
    d = doc(inp([m(P("tcp", "dport"), {"set": [22, 80]}, "<"), {"drop": None}]))
    assert "comparison < with a set" in run(d)[2][0]
    d = doc(inp([m(CT("state"), "new", "<"), {"drop": None}]))
    assert run(d)[2] == ["operator <"]


def test_a_flag_test_is_any_of_the_bits():
    d = doc(inp([m(P("tcp", "flags"), "syn", "in"), {"drop": None}]))
    synack = Packet(iifname="eth0", saddr="192.0.2.7", tcp_flags=frozenset({"syn", "ack"}))
    assert run(d, synack)[0] == "drop"
    assert run(d, Packet(iifname="eth0", tcp_flags=frozenset({"ack"})))[0] == "accept"


def test_in_is_membership_for_other_fields():
    d = doc(inp([m(P("tcp", "dport"), {"set": [22, 80]}, "in"), {"drop": None}]))
    assert run(d) == ("drop", ["c #10 -> drop"], [])


def test_meta_protocol_by_ethertype_number():
    d = doc(inp([m(M("protocol"), 0x0800), {"drop": None}]))
    assert run(d)[0] == "drop"
    six = Packet(family="ipv6", iifname="eth0", saddr="2001:db8::7", daddr="2001:db8::1")
    assert run(d, six)[0] == "accept"


def test_an_escaped_star_is_a_literal_interface_name():
    d = doc(inp([m(M("iifname"), "eth\\*"), {"drop": None}]))
    assert run(d, Packet(iifname="eth*"))[0] == "drop"
    assert run(d, Packet(iifname="eth0"))[0] == "accept"


def test_dccp_and_udplite_ports():
    for proto in ("dccp", "udplite"):
        d = doc(inp([m(P(proto, "dport"), 5), {"drop": None}]))
        assert run(d, Packet(iifname="eth0", l4proto=proto, dport=5)) == \
            ("drop", ["c #10 -> drop"], []), proto


def test_a_concatenation_element_of_another_shape_is_named():
    d = doc(inp([m({"concat": [P("ip", "saddr"), P("tcp", "dport")]},
                   {"set": [22, 80]}), {"drop": None}]))
    assert run(d)[2] == ["a concatenation element of another shape"]


def test_a_set_inside_a_concatenation_element():
    el = {"concat": ["192.0.2.7", {"set": [22, 23]}]}
    d = doc(inp([m({"concat": [P("ip", "saddr"), P("tcp", "dport")]}, {"set": [el]}),
                 {"drop": None}]))
    assert run(d)[0] == "drop"
    assert run(d, Packet(iifname="eth0", saddr="192.0.2.7", dport=24))[0] == "accept"


def test_nftrace_and_counters_change_nothing():
    d = doc(inp([{"mangle": {"key": M("nftrace"), "value": 1}}], [{"counter": None}],
                [m(P("tcp", "dport"), 22), {"drop": None}]))
    assert run(d) == ("drop", ["c #12 -> drop"], [])


def test_limit_and_quota_are_either_way():
    """A limit or quota in front of a drop: the packet is dropped or goes on (both ways,
    untainted: the verdict depends on the rate, and says so)."""
    for stmt in ({"limit": {"rate": 1}}, {"quota": {"val": 1}}):
        d = doc(inp([stmt, {"drop": None}]))
        v, _, unknown = run(d)
        assert v == "unknown" and len(unknown) == 1 and "(either way)" in unknown[0], unknown


def test_an_unknown_statement_is_named():
    d = doc(inp([{"xt": {"name": "foo"}}, {"drop": None}]))
    assert run(d)[2] == ["c #10: statement xt"]


def test_a_rule_without_expressions_and_one_for_an_undeclared_chain():
    d = doc(inp(), extra_rules=[
        {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 50}},
        {"rule": {"family": "inet", "table": "t", "chain": "ghost", "handle": 51,
                  "expr": [{"drop": None}]}}])
    rs = Ruleset(d)
    assert run(d)[0] == "accept"
    assert rs.rules_for(("inet", "t", "nope"), True) == []


def test_a_goto_loop_is_not_followed_forever():
    d = doc(inp([{"goto": {"target": "a"}}]), ("a", None, 0, "", "", [[{"goto": {
        "target": "b"}}]]), ("b", None, 0, "", "", [[{"goto": {"target": "a"}}]]))
    v, tr, unknown = run(d)
    assert v == "drop" and unknown == ["jump depth over 16"] and len(tr) == 17


def pre_ct(*exprs):
    """A prerouting filter chain before connection tracking, and a rule that turns it on."""
    return doc(("raw", "prerouting", -300, "filter", "accept", list(exprs)),
               inp([m(CT("state"), "established"), {"accept": None}]))


def test_before_conntrack_every_packet_is_invalid():
    d = pre_ct([m(CT("state"), "invalid"), {"drop": None}])
    assert run(d, hook="prerouting")[0] == "drop"
    d = pre_ct([m(CT("state"), "new"), {"drop": None}])
    assert run(d, hook="prerouting")[0] == "accept"


def snat_only(*more):
    """A postrouting NAT chain whose only NAT is an snat of IPv4 (and nothing else of
    conntrack in the ruleset), then a later postrouting filter chain."""
    return doc(("nat", "postrouting", 100, "nat", "accept",
                [[{"snat": {"family": "ip", "addr": "198.51.100.1", "port": 5000}}],
                 [{"counter": None}]]),
               ("late", "postrouting", 200, "filter", "accept", list(more)))


def test_an_snat_alone_turns_on_nat_and_later_chains_see_its_port():
    d = snat_only([m(P("tcp", "sport"), 5000), {"drop": None}])
    o = Evaluator(Ruleset(d)).run_hook("postrouting", PKT)
    assert o.nat == [{"snat": {"family": "ip", "addr": "198.51.100.1", "port": 5000}}]
    assert o.verdict == "drop" and [str(s) for s in o.trace][-1] == "late #12 -> drop"


def test_ipv6_dnat_is_seen_by_later_chains():
    d = doc(("nat", "prerouting", -100, "nat", "accept",
             [[{"dnat": {"family": "ip6", "addr": "2001:db8::99"}}]]),
            ("f", "prerouting", 0, "filter", "accept",
             [[m(P("ip6", "daddr"), "2001:db8::99"), {"drop": None}]]))
    six = Packet(family="ipv6", iifname="eth0", saddr="2001:db8::7", daddr="2001:db8::1")
    assert run(d, six, "prerouting")[0] == "drop"


def test_a_packet_no_class_holds_has_no_path():
    # an owner without a group: no socket is like that
    o = Evaluator(Ruleset(doc(inp()))).run_hook("output", Packet(oifname="eth0", skuid=1000))
    assert (o.verdict, o.unknown) == ("drop", ["no path"])


def test_a_redirect_to_anywhere_forks_later_chains():
    d = doc(("nat", "prerouting", -100, "nat", "accept", [[{"redirect": None}]]),
            ("f", "prerouting", 0, "filter", "accept",
             [[m(P("ip", "daddr"), "192.0.2.1"), {"drop": None}]]))
    v, _, unknown = run(d, hook="prerouting")
    assert (v, unknown) == ("unknown", ["forked"])


def test_the_order_at_the_nat_core_and_conntrack_priority_is_unknown():
    d = doc(("nat", "prerouting", -100, "nat", "accept", [[{"redirect": None}]]),
            ("f", "prerouting", -100, "filter", "accept", []))
    rs = Ruleset(d)
    assert rs.order_unknown("prerouting", "ipv4") == \
        "t f at priority -100: before or after NAT (registration order)"
    d = doc(("f", "output", -200, "filter", "accept", []),
            inp([m(CT("state"), "new"), {"accept": None}]))
    rs = Ruleset(d)
    assert rs.order_unknown("output", "ipv4") == \
        "t f at priority -200: before or after connection tracking (registration order)"
    assert rs.order_unknown("input", "ipv4") is None
    d = doc(("f", "input", -200, "filter", "accept", []),
            inp([m(CT("state"), "new"), {"accept": None}]))
    assert Ruleset(d).order_unknown("input", "ipv4") is None  # conntrack is not at input
    o = Evaluator(Ruleset(doc(("f", "output", -200, "filter", "accept", []),
                              inp([m(CT("state"), "new"), {"accept": None}]))
                          )).run_hook("output", Packet(oifname="eth0"))
    assert o.unknown == [
        "t f at priority -200: before or after connection tracking (registration order)"]


def test_a_set_mark_is_seen_by_the_next_rule():
    d = doc(inp([m(M("mark"), 1), {"mangle": {"key": M("mark"), "value": 2}}],
                [m(M("mark"), 2), {"drop": None}]))
    assert run(d, Packet(iifname="eth0", mark=1))[0] == "drop"
    assert run(d, Packet(iifname="eth0", mark=3))[0] == "accept"


@pytest.mark.parametrize("where", ["forward", "output", "output-after-nat"])
def test_fate_says_route_lost(where):
    if where == "forward":
        got = fate(Ruleset(doc(inp())), PKT, lambda a: None, set())
        assert got == [("prerouting", "accept"), ("route", "lost")]
    elif where == "output":
        got = fate(Ruleset(doc(inp())), Packet(daddr="192.0.2.1"), lambda a: None, set())
        assert got == [("route", "lost")]
    else:
        d = doc(("nat", "output", -100, "nat", "accept",
                 [[{"dnat": {"family": "ip", "addr": "198.51.100.9"}}]]))
        got = fate(Ruleset(d), Packet(daddr="192.0.2.1"),
                   lambda a: "eth0" if a == "192.0.2.1" else None, set())
        assert got == [("output", "accept"), ("route", "lost")]


def test_fate_without_primary_addresses_still_redirects():
    d = doc(("nat", "prerouting", -100, "nat", "accept", [[{"redirect": None}]]))
    got = fate(Ruleset(d), PKT, lambda a: "eth1", set(), primary=None)
    assert got[0] == ("prerouting", "accept")


# --- the properties on hand-made rulesets ----------------------------------------------

def test_a_search_over_budget_is_unproven_with_nothing_made_up(tmp_path, monkeypatch):
    from tests.unit.test_audit import make_plan, results, rulesets

    p = make_plan(tmp_path, "configs/basic.toml")
    monkeypatch.setattr(Evaluator, "budget", 3)
    res = results(p, rulesets(p))
    assert res
    for (qube, prop), r in res.items():
        assert (r.property, r.qube) == (prop, qube)
        if r.status == "PASS":
            continue  # a property that explores no chain at all
        assert r.status == "UNPROVEN" and r.reason == "not understood: more than 3 paths"
        assert r.counterexample is None and r.trace == [] and isinstance(r.classes, int)
    assert sum(r.status == "UNPROVEN" for r in res.values()) >= 5


def test_nat_in_prerouting_is_followed_into_input_and_forward(tmp_path):
    """A redirect for every family (the qube has no IPv6 address: an IPv6 packet is
    redirected to none of its own), a dnat with a port and one without: default drop holds
    (every accept is explicit), and a forward accept by policy is found behind the dnat."""
    from netstack.audit.properties import QubeView, default_drop
    from tests.unit.test_audit import make_plan

    q = make_plan(tmp_path, "configs/basic.toml").qube("sys-firewall")
    nat = ("nat", "prerouting", -100, "nat", "accept", [
        [m(P("tcp", "dport"), 80), {"redirect": {"port": 8080}}],
        [m(P("tcp", "dport"), 443), {"dnat": {"family": "ip", "addr": "192.0.2.5",
                                              "port": 8443}}],
        [m(P("tcp", "dport"), 25), {"dnat": {"family": "ip", "addr": "192.0.2.6"}}]])
    fwd = [[m(P("ip", "daddr"), "192.0.2.5"), m(P("tcp", "dport"), 8443), {"accept": None}],
           [m(P("ip", "daddr"), "192.0.2.6"), m(P("tcp", "dport"), 25), {"accept": None}]]
    good = doc(nat, ("in", "input", 0, "filter", "drop",
                     [[m(P("tcp", "dport"), 8080), {"accept": None}]]),
               ("fw", "forward", 0, "filter", "drop", fwd),
               ("out", "output", 0, "filter", "drop", []))
    r = default_drop(QubeView(q, good))
    assert r.status == "PASS", r
    bad = doc(nat, ("in", "input", 0, "filter", "drop",
                    [[m(P("tcp", "dport"), 8080), {"accept": None}]]),
              ("fw", "forward", 0, "filter", "accept", []),
              ("out", "output", 0, "filter", "drop", []))
    r = default_drop(QubeView(q, bad))
    assert r.status == "FAIL" and r.reason == "forward: accept"
    assert r.trace[-1] == "sys-firewall -> forward -> fw -> policy accept"


def test_an_input_counterexample_is_addressed_to_the_qube(tmp_path):
    from netstack.audit.properties import QubeView, default_drop
    from tests.unit.test_audit import make_plan

    q = make_plan(tmp_path, "configs/basic.toml").qube("sys-firewall")
    d = doc(("in", "input", 0, "filter", "accept", []),
            ("fw", "forward", 0, "filter", "drop", []),
            ("out", "output", 0, "filter", "drop", []))
    r = default_drop(QubeView(q, d))
    assert r.status == "FAIL" and r.reason == "input: accept"
    assert r.counterexample["daddr"] == q.ipv4
    assert r.counterexample["saddr"] in {c.ipv4 for c in q.clients} | {q.ipv4}


def test_unproven_names_the_first_three_constructs(tmp_path):
    from netstack.audit.properties import QubeView, default_drop
    from tests.unit.test_audit import make_plan

    q = make_plan(tmp_path, "configs/basic.toml").qube("sys-firewall")
    d = doc(("in", "input", 0, "filter", "accept",
             [[{"xt": {"name": f"x{i}"}}] for i in range(4)]),
            ("fw", "forward", 0, "filter", "drop", []),
            ("out", "output", 0, "filter", "drop", []))
    r = default_drop(QubeView(q, d))
    assert r.status == "UNPROVEN"
    assert r.reason == ("not understood: in #10: statement xt; in #11: statement xt; "
                        "in #12: statement xt")


def test_the_gateway_admits_neighbour_discovery_not_all_icmpv6(tmp_path):
    """With IPv6 on, what clients may reach on the Tor gateway besides Trans/DNSPort is
    neighbour discovery only: an accept of every ICMPv6 packet fails the property."""
    import copy

    from tests.unit.test_audit import GW, make_plan, results, rulesets
    from tests.unit.test_config import ROOT

    src = tmp_path / "c.toml"
    src.write_text("[stack]\nipv6 = true\n\n"
                   + (ROOT / "tests/configs/tor-two-workstations.toml").read_text())
    p = make_plan(tmp_path, str(src))
    rs = copy.deepcopy(rulesets(p))
    items = rs[GW]["nftables"]  # first in the gateway's input chain
    at = next(k for k, i in enumerate(items) if "rule" in i and i["rule"]["chain"] == "input")
    items.insert(at, {"rule": {"family": "inet", "table": "netstack", "chain": "input",
                               "expr": [m(M("nfproto"), "ipv6"), m(M("l4proto"), "ipv6-icmp"),
                                        {"accept": None}]}})
    r = results(p, rs)[("sys-whonix", "only TransPort, DNSPort and the SOCKS ports from clients")]
    assert r.status == "FAIL" and r.counterexample["l4proto"] == "icmpv6"
    assert r.counterexample["family"] == "ipv6"
    assert r.counterexample["icmp_type"] not in (133, 134, 135, 136)


def test_continue_changes_nothing_and_a_concatenation_may_use_in():
    d = doc(inp([{"continue": None}], [m(P("tcp", "dport"), 22), {"drop": None}]))
    assert run(d) == ("drop", ["c #11 -> drop"], [])
    el = {"concat": ["192.0.2.7", 22]}
    d = doc(inp([m({"concat": [P("ip", "saddr"), P("tcp", "dport")]}, {"set": [el]}, "in"),
                 {"drop": None}]))
    assert run(d) == ("drop", ["c #10 -> drop"], [])


def _nat_view(tmp_path, chains, local_any=False):
    from netstack.audit.properties import QubeView
    from tests.unit.test_audit import make_plan

    q = make_plan(tmp_path, "configs/basic.toml").qube("sys-firewall")
    return QubeView(q, doc(*chains), local_any=local_any)


def test_a_redirect_goes_to_the_qubes_own_address(tmp_path):
    from netstack.audit import properties as p

    own = "10.137.0.2"
    v = _nat_view(tmp_path, [
        ("nat", "prerouting", -100, "nat", "accept",
         [[m(P("tcp", "dport"), 80), {"redirect": {"port": 8080}}]]),
        ("in", "input", 0, "filter", "accept",
         [[m(P("ip", "daddr"), own), m(P("tcp", "dport"), 8080), {"drop": None}]])])
    assert v.qube.ipv4 == own
    start = {"l4proto": p.one_of("l4proto", "tcp"), "dport": p.one_of("dport", 80),
             "family": p.one_of("family", "ipv4"), "ct_state": p.one_of("ct_state", "new")}
    r = p.check("redirected", v, "input", start, p.accepted, "ok")
    assert r.status == "PASS", r


def test_a_dnat_in_a_file_ruleset_goes_to_its_address(tmp_path):
    from netstack.audit import properties as p

    v = _nat_view(tmp_path, [
        ("nat", "prerouting", -100, "nat", "accept",
         [[m(P("tcp", "dport"), 443), {"dnat": {"family": "ip", "addr": "192.0.2.5"}}]]),
        ("fw", "forward", 0, "filter", "accept",
         [[m(P("ip", "daddr"), "192.0.2.5"), {"drop": None}]])], local_any=True)
    start = {"l4proto": p.one_of("l4proto", "tcp"), "dport": p.one_of("dport", 443),
             "family": p.one_of("family", "ipv4"), "ct_state": p.one_of("ct_state", "new")}
    r = p.check("dnatted", v, "forward", start, p.accepted, "ok")
    assert r.status == "PASS", r


def test_prerouting_reads_an_empty_output_interface_name():
    """Before routing the kernel's oifname is "" (no device yet): a rule that says so
    matches, and the INVALID property sees it drop."""
    from netstack.audit.properties import QubeView, invalid_first

    class Q:  # the least of a qube the property looks at
        name, ipv4, ipv6, gateway, clients, interfaces = "q", "10.137.0.9", None, None, [], []
        upstream_if = "eth0"
    d = doc(("pre", "prerouting", -150, "filter", "accept",
             [[m(M("oifname"), ""), m(CT("state"), "invalid"), {"drop": None}]]),
            ("out", "output", -150, "filter", "accept",
             [[m(CT("state"), "invalid"), {"drop": None}]]))
    r = invalid_first(QubeView(Q(), d, local_any=True))
    assert r.status == "PASS", r
