"""Every path through a qube (issue 24 item 1), without root: netdev ingress/egress chains
explored by the evaluator (bound to their devices, fwd/dup/drop), the paths property on
JSON documents built here, the kernel's other paths (tc, XDP, links, ip rules) named from
facts handed in, and a PASS beside an unmodelled path turned UNPROVEN. Each assertion
fails if the construct were ignored (the audit said PASS for all of them before)."""

from __future__ import annotations

import copy

from netstack.audit import paths
from netstack.audit.evaluator import Evaluator, Packet, Ruleset
from netstack.audit.properties import Result
from tests.unit.test_audit import (
    FW,
    VPN,
    insert_rule,
    make_plan,
    match,
    netdev_table,
    results,
    rulesets,
)

PROP = paths.PROPERTY
DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}


def netdev_doc(hook: str, dev, *exprs, policy: str = "accept") -> dict:
    items = [{"table": {"family": "netdev", "name": "t"}},
             {"chain": {"family": "netdev", "table": "t", "name": "c", "type": "filter",
                        "hook": hook, "prio": 0, "dev": dev, "policy": policy}}]
    items += [{"rule": {"family": "netdev", "table": "t", "chain": "c", "handle": 10 + i,
                        "expr": e}} for i, e in enumerate(exprs)]
    return {"nftables": items}


def leaves(doc: dict, hook: str, p: Packet) -> list[tuple[str, list[str]]]:
    out = []

    def leaf(e, verdict, trace, nat, taint) -> None:
        if e.point() is not None:
            out.append((verdict, [str(s) for s in trace] + taint))
    Evaluator(Ruleset(doc)).explore(hook, p.box(), leaf)
    return sorted(out)


def test_fwd_on_ingress_is_a_leaf_of_its_own_and_ends_the_packet():
    d = netdev_doc("ingress", "vif3", [match(DADDR, "10.137.0.4"), {"fwd": {"dev": "vif4"}}])
    p = Packet(iifname="vif3", saddr="10.137.0.3", daddr="10.137.0.4")
    assert leaves(d, "ingress", p) == [("fwd vif4", ["c #10 -> fwd to vif4"])]
    # another destination: the rule does not match, the chain's policy accepts
    assert leaves(d, "ingress", Packet(iifname="vif3", daddr="10.137.0.9")) == \
        [("accept", ["c -> policy accept"])]


def test_a_device_chain_meets_only_its_devices_packets():
    d = netdev_doc("ingress", ["vif3", "vif5"], [{"drop": None}])
    assert leaves(d, "ingress", Packet(iifname="vif5"))[0][0] == "drop"
    assert leaves(d, "ingress", Packet(iifname="vif4")) == [("accept", [])]
    eg = netdev_doc("egress", "eth0", [{"drop": None}])
    assert leaves(eg, "egress", Packet(oifname="eth0"))[0][0] == "drop"
    assert leaves(eg, "egress", Packet(oifname="vif4")) == [("accept", [])]


def test_dup_copies_and_the_original_goes_on():
    d = netdev_doc("egress", "wg3-main", [{"dup": {"dev": "eth0"}}], [{"drop": None}])
    got = leaves(d, "egress", Packet(oifname="wg3-main"))
    assert [v for v, _ in got] == ["drop", "dup eth0"]


def test_ingress_is_before_conntrack():
    """No packet has a connection at ingress: `ct state established accept` there accepts
    nothing, so an INVALID-looking witness is what a device rule sees."""
    d = netdev_doc("ingress", "vif3", [match({"ct": {"key": "state"}}, ["established"], "in"),
                                       {"fwd": {"dev": "eth0"}}])
    p = Packet(iifname="vif3", ct_state="established")
    assert leaves(d, "ingress", p) == [("accept", ["c -> policy accept"])]


def test_non_ip_frames_and_moves_outside_netdev_are_unproven():
    d = netdev_doc("ingress", "vif3", [match({"meta": {"key": "protocol"}}, "arp"),
                                       {"fwd": {"dev": "vif4"}}])
    got = leaves(d, "ingress", Packet(iifname="vif3"))  # both ways, each tainted
    assert [v for v, _ in got] == ["accept", "fwd vif4"]
    assert all(any("not IP" in t for t in tr) for _, tr in got)
    inet = {"nftables": [{"table": {"family": "inet", "name": "t"}},
                         {"chain": {"family": "inet", "table": "t", "name": "c",
                                    "type": "filter", "hook": "forward", "prio": 0}},
                         {"rule": {"family": "inet", "table": "t", "chain": "c",
                                   "expr": [{"dup": {"dev": "eth0",
                                                     "addr": "192.0.2.1"}}]}}]}
    o = Evaluator(Ruleset(inet)).run_hook("forward", Packet(iifname="vif3", oifname="x"))
    assert o.unknown and "dup" in o.unknown[0]


def test_fwd_around_the_kill_switch_fails_the_kill_switch_and_end_to_end(tmp_path):
    p = make_plan(tmp_path, "configs/vpn.toml")
    rs = copy.deepcopy(rulesets(p))
    netdev_table(rs, VPN, "ingress", "vif4", [{"fwd": {"dev": "eth0"}}])
    res = results(p, rs)
    ks = res[("sys-proxyvm", "kill switch (forward)")]
    assert ks.status == "FAIL" and ks.counterexample["oifname"] == "eth0"
    e2e = res[("work", "end to end: only VPN transport on the ISP link")]
    assert e2e.status == "FAIL" and any("ingress fwd eth0" in t for t in e2e.trace)
    assert res[("sys-proxyvm", PROP)].reason == "ingress: fwd eth0"


def test_dup_to_the_uplink_fails_end_to_end(tmp_path):
    p = make_plan(tmp_path, "configs/vpn.toml")
    rs = copy.deepcopy(rulesets(p))
    netdev_table(rs, VPN, "egress", "wg3-main", [{"dup": {"dev": "eth0"}}])
    res = results(p, rs)
    e2e = res[("work", "end to end: only VPN transport on the ISP link")]
    assert e2e.status == "FAIL" and any("egress wg3-main dup eth0" in t for t in e2e.trace)


def test_a_drop_only_device_chain_is_modelled_not_unproven(tmp_path):
    """Modelled, so it may prove: the kill switch missing in forward is caught, and a
    netdev ingress drop of everything from the client's link makes it hold again."""
    p = make_plan(tmp_path)
    rs = copy.deepcopy(rulesets(p))
    insert_rule(rs, VPN, "forward", [match({"meta": {"key": "iifname"}}, "vif4"),
                                      {"accept": None}])
    assert results(p, rs)[("sys-proxyvm", "kill switch (forward)")].status == "FAIL"
    netdev_table(rs, VPN, "ingress", "vif4", [{"drop": None}])
    res = results(p, rs)
    assert res[("sys-proxyvm", "kill switch (forward)")].status == "PASS"
    assert res[("sys-proxyvm", PROP)].status == "PASS"
    assert "1 device chains modelled" in res[("sys-proxyvm", PROP)].reason


def test_other_families_are_named_and_no_property_of_the_qube_passes(tmp_path):
    p = make_plan(tmp_path, "configs/basic.toml")
    for fam in ("arp", "bridge"):
        rs = copy.deepcopy(rulesets(p))
        rs[FW]["nftables"] += [
            {"table": {"family": fam, "name": "x"}},
            {"chain": {"family": fam, "table": "x", "name": "c", "type": "filter",
                       "hook": "input" if fam == "arp" else "forward", "prio": 0,
                       "policy": "accept"}}]
        res = results(p, rs)
        r = res[("sys-firewall", PROP)]
        assert r.status == "UNPROVEN" and f"table {fam} x" in r.reason
        mine = [v for (q, _), v in res.items() if q == "sys-firewall"]
        assert mine and all(v.status != "PASS" for v in mine)
        assert all(f"table {fam} x" in v.reason for v in mine)
        # another qube's proofs stand
        assert res[("sys-net", "default drop")].status == "PASS"


def test_an_iptables_extension_is_named():
    d = {"nftables": [{"rule": {"family": "ip", "table": "filter", "chain": "FORWARD",
                                "handle": 9, "expr": [{"xt": {"type": "target",
                                                              "name": "TEE"}}]}}]}
    [f] = paths.nft_findings(d)
    assert "statement xt in ip filter FORWARD #9" in str(f) and "iptables" in str(f)


def test_queue_is_named_tproxy_is_modelled():
    d = {"nftables": [{"table": {"family": "inet", "name": "t"}},
                      {"chain": {"family": "inet", "table": "t", "name": "c", "type": "filter",
                                 "hook": "forward", "prio": 0}},
                      {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 4,
                                "expr": [{"queue": {"num": 1}}]}}]}
    [f] = paths.nft_findings(d)
    assert "statement queue in inet t c #4" in str(f) and "user space" in str(f)
    # tproxy gives the packet a socket; the evaluator follows it (both ways), and where
    # the packet goes then is the routes' (a policy routing rule is a finding of its own)
    d["nftables"][2]["rule"]["expr"] = [{"tproxy": {"port": 1234}}]
    assert paths.nft_findings(d) == []


FACTS = {"links": [{"name": "lo", "kind": None, "xdp": False, "master": None},
                   {"name": "eth0", "kind": "veth", "xdp": False, "master": None},
                   {"name": "vif3", "kind": "veth", "xdp": False, "master": None}],
         "filters": [], "rules": []}


def test_the_kernels_other_paths_are_each_named():
    assert paths.kernel_findings(FACTS, ["eth0", "vif3"]) == []
    f = copy.deepcopy(FACTS)
    f["links"][2]["xdp"] = True
    f["links"].append({"name": "br9", "kind": "bridge", "xdp": False, "master": None})
    f["links"][1]["master"] = "br9"
    f["filters"].append({"link": "vif3", "where": "ingress", "kind": "u32",
                         "actions": ["mirred"]})
    f["rules"].append({"family": 4, "priority": 100, "table": 100})
    f["legacy"] = ["ip filter"]
    got = [str(x) for x in paths.kernel_findings(f, ["eth0", "vif3"])]
    assert any(s.startswith("XDP program attached to link vif3") for s in got)
    assert any(s.startswith("link br9 (bridge) not made by netstack") for s in got)
    assert any(s.startswith("link eth0 enslaved to br9") for s in got)
    assert any(s.startswith("tc filter u32 with action mirred on ingress of link vif3")
               for s in got)
    assert any(s.startswith("ip rule (IPv4) priority 100 to table 100") for s in got)
    assert any(s.startswith("x_tables table ip filter (iptables-legacy)") for s in got)
    assert len(got) == 6


def test_a_planned_link_of_a_kind_netstack_never_makes_is_named():
    f = copy.deepcopy(FACTS)
    f["links"][2]["kind"] = "macvlan"
    [x] = paths.kernel_findings(f, ["eth0", "vif3"])
    assert "vif3 is a macvlan" in str(x)


def test_a_pass_beside_an_unmodelled_path_is_unproven():
    ok = Result("default drop", "sys-firewall", "PASS", "fine")
    e2e = Result("end to end: only VPN transport on the ISP link", "work", "PASS", "fine")
    other = Result("default drop", "sys-net", "PASS", "fine")
    bad = {"sys-firewall": Result(PROP, "sys-firewall", "UNPROVEN", "not modelled: tc x")}
    got = paths.unproven_beside([ok, e2e, other], bad,
                                {"work": ["sys-proxyvm", "sys-firewall", "sys-net"]})
    assert [r.status for r in got] == ["UNPROVEN", "UNPROVEN", "PASS"]
    assert "tc x" in got[0].reason and "sys-firewall" in got[1].reason


def test_foreign_objects_name_table_chain_hook_and_device():
    d = netdev_doc("ingress", "vif3", [{"fwd": {"dev": "vif4"}}])
    assert paths.foreign_objects(d) == [
        "table netdev t not made by netstack: chains c (ingress on vif3)"]


def test_the_json_shapes_nft_lists_for_moves():
    """nft 1.0.6 lists netdev `dup to DEV` as {"dup": {"addr": DEV}} and `fwd ip to ADDR
    device DEV` with the address beside the device: both leave by DEV."""
    d = netdev_doc("egress", "wg3-main", [{"dup": {"addr": "eth0"}}])
    assert [v for v, _ in leaves(d, "egress", Packet(oifname="wg3-main"))] == \
        ["accept", "dup eth0"]
    d = netdev_doc("ingress", "vif3", [{"fwd": {"dev": "vif4", "family": "ip",
                                                "addr": "10.137.0.4"}}])
    assert leaves(d, "ingress", Packet(iifname="vif3"))[0][0] == "fwd vif4"


def test_a_device_chain_without_its_devices_proves_nothing():
    """A listing without the chain's devices (nft 1.0.6's JSON): the chain runs for
    every packet, tainted, so a drop there cannot make a property PASS."""
    d = netdev_doc("ingress", "vif3", [{"drop": None}])
    del d["nftables"][1]["chain"]["dev"]
    got = leaves(d, "ingress", Packet(iifname="vif9"))
    assert got and all(v == "drop" and any("devices the listing does not name" in t
                                           for t in tr) for v, tr in got)


def test_a_scripts_device_names_are_made_for_it_to_load():
    from netstack.audit.rulesetfile import interfaces

    text = ('table netdev t { chain c { type filter hook ingress devices = { "lan0", wan0 } '
            'priority 0; ip daddr 10.137.0.4 fwd ip to 10.137.0.4 device "vif4"\n'
            'dup to "vif5"\n fwd to eth1\n } }\n'
            'table netdev u { chain e { type filter hook egress device "wg0" priority 0; } }')
    assert interfaces(text) == {"lan0", "wan0", "vif4", "vif5", "eth1", "wg0"}
