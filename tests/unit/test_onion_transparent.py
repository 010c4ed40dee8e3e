"""Onion services by name on the transparent path (issue 24 item 5): a workstation's lookup of
NAME.onion is answered by Tor's DNSPort with an address of its automap range 10.192.0.0/10,
so the gateway must redirect a SYN to that range to TransPort although the rest of 10/8 (the
qubes' own addresses, the virtual DNS) stays excluded. The audit's evaluator runs packets
through the generated ruleset, and the Tor properties fail a ruleset that forwards or drops
the range instead. No root."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from netstack.audit.evaluator import Evaluator, Packet, Ruleset
from netstack.kinds.tor import NOT_VIA_TOR, via_tor
from netstack.leaktest.catalogue import Target, cases
from netstack.tor.gateway import VIRTUAL_NET, torrc
from tests.unit.test_audit import (
    GW,
    IIF,
    drop_rules,
    insert_rule,
    make_plan,
    match,
    results,
    rulesets,
)

DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
AUTOMAP = {"prefix": {"addr": "10.192.0.0", "len": 10}}
NAT = "only new SYNs are redirected"


def in_automap(addr: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(VIRTUAL_NET)


def syn(daddr: str, flags: frozenset[str] = frozenset({"syn"})) -> Packet:
    """A new TCP packet of anon-whonix (10.137.0.5, on the gateway's vif5) to port 80."""
    return Packet(iifname="vif5", saddr="10.137.0.5", daddr=daddr, dport=80, tcp_flags=flags)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return make_plan(tmp_path_factory.mktemp("onion"))


def gateway(rs: dict) -> Evaluator:
    return Evaluator(Ruleset(rs[GW]))


def test_torrc_maps_onion_names_into_the_redirected_range(plan):
    rc = torrc(plan.qube("sys-whonix").info).splitlines()
    assert f"VirtualAddrNetworkIPv4 {VIRTUAL_NET}" in rc and VIRTUAL_NET == "10.192.0.0/10"
    assert "AutomapHostsOnResolve 1" in rc
    # the default AutomapHostsSuffixes (.onion, .exit): other names resolve at an exit
    assert not [x for x in rc if x.startswith("AutomapHostsSuffixes")]


def test_a_syn_to_an_automapped_address_is_redirected_to_transport(plan):
    ev = gateway(rulesets(plan))
    o = ev.run_hook("prerouting", syn("10.192.0.5"))
    assert o.verdict == "accept" and not o.unknown
    assert o.nat == [{"redirect": {"port": 9040}}]
    assert any("automapped" in str(s) for s in o.trace), o.trace
    top = ev.run_hook("prerouting", syn("10.255.255.254"))  # the range's last address
    assert top.nat == [{"redirect": {"port": 9040}}]
    # the outside as before, by the general rule
    o = ev.run_hook("prerouting", syn("198.51.100.80"))
    assert o.nat == [{"redirect": {"port": 9040}}] and "TCP SYN -> TransPort" in str(o.trace)


@pytest.mark.parametrize("daddr", ["10.137.0.4", "10.137.0.6", "10.137.0.9", "10.139.1.1",
                                   "10.139.7.7", "10.191.255.255", "10.0.0.1"])
def test_the_rest_of_10_8_is_never_redirected(plan, daddr):
    """The gateway's own address, a sibling, any qube, the virtual DNS, just below the
    range: a SYN there never reaches TransPort (a TestingTorNetwork exit would connect to
    it)."""
    o = gateway(rulesets(plan)).run_hook("prerouting", syn(daddr))
    assert not o.unknown and not o.nat, (daddr, o)


def test_only_a_bare_syn_to_the_range_is_redirected(plan):
    ev = gateway(rulesets(plan))
    for flags in ({"syn", "ack"}, {"ack"}, {"syn", "fin"}, {"rst"}):
        o = ev.run_hook("prerouting", syn("10.192.0.5", frozenset(flags)))
        assert not o.nat, (flags, o)


def test_via_tor_is_the_outside_and_the_automap_range():
    n = lambda a: int(ipaddress.ip_address(a))  # noqa: E731
    assert via_tor(n("10.192.0.0")) and via_tor(n("10.255.255.255"))
    assert via_tor(n("198.51.100.80")) and via_tor(n("8.8.8.8"))
    assert not via_tor(n("10.191.255.255")) and not via_tor(n("10.137.0.4"))
    assert not via_tor(n("10.139.1.1")) and not via_tor(n("127.0.0.1"))
    assert "10.0.0.0/8" in NOT_VIA_TOR  # the exception is explicit, not a cut-up list


def test_the_audit_proves_the_nat_property_over_the_range(plan):
    res = results(plan, rulesets(plan))
    r = res[("sys-whonix", NAT)]
    assert r.status == "PASS" and "10.192.0.0/10" in r.reason, r
    r = res[("sys-whonix", "only TransPort, DNSPort and the SOCKS ports from clients")]
    assert r.status == "PASS" and "10.192.0.0/10" in r.reason


def _without_automap_rule(rs: dict) -> None:
    drop_rules(rs, GW, lambda r: "automapped" in str(r.get("comment")))


def test_anti_a_gateway_without_the_automap_redirect_fails(plan):
    """Yesterday's ruleset: 10/8 excluded whole, the onion's SYN falls to the drop."""
    rs = copy.deepcopy(rulesets(plan))
    _without_automap_rule(rs)
    assert not gateway(rs).run_hook("prerouting", syn("10.192.0.5")).nat
    r = results(plan, rs)[("sys-whonix", NAT)]
    assert r.status == "FAIL" and r.counterexample["tcp_flags"] == ["syn"], r
    assert in_automap(r.counterexample["daddr"]), r.counterexample


def test_anti_a_gateway_that_drops_the_range_first_fails(plan):
    """A drop of the range in prerouting, before the NAT (a well-meant "no 10/8" rule)."""
    rs = copy.deepcopy(rulesets(plan))
    insert_rule(rs, GW, "prerouting", [match(IIF, "vif5"), match(DADDR, AUTOMAP), {"drop": None}],
                 "no automap", first=False)
    items = rs[GW]["nftables"]  # before the chain's final accepts: right after anti-spoofing
    rule = items.pop()
    idx = next(k for k, i in enumerate(items) if "rule" in i and i["rule"]["chain"] ==
               "prerouting" and i["rule"].get("comment") == "antispoof anon-whonix")
    items.insert(idx + 1, rule)
    assert gateway(rs).run_hook("prerouting", syn("10.192.0.5")).verdict == "drop"
    r = results(plan, rs)[("sys-whonix", NAT)]
    assert r.status == "FAIL" and r.counterexample["tcp_flags"] == ["syn"], r
    assert any("no automap" in t for t in r.trace), r.trace


def test_anti_a_gateway_that_forwards_the_range_fails(plan):
    """The range forwarded with its real destination instead of redirected."""
    rs = copy.deepcopy(rulesets(plan))
    _without_automap_rule(rs)
    insert_rule(rs, GW, "forward", [match(IIF, "vif5"), match(DADDR, AUTOMAP), {"accept": None}],
                 "automap forwarded")
    res = results(plan, rs)
    assert res[("sys-whonix", NAT)].status == "FAIL"
    fwd = res[("sys-whonix", "Tor gateway forwards nothing")]
    assert fwd.status == "FAIL" and in_automap(fwd.counterexample["daddr"])
    assert any("automap forwarded" in t for t in fwd.trace), fwd.trace


def test_anti_a_gateway_that_redirects_all_of_10_8_fails(plan):
    """The opposite mistake: the exclusion gone, a SYN to a qube (or the gateway's own
    address) would go into Tor, and a TestingTorNetwork exit would connect to it."""
    rs = copy.deepcopy(rulesets(plan))
    for i in rs[GW]["nftables"]:
        r = i.get("rule")
        if r and r.get("comment") == "TCP SYN -> TransPort":
            r["expr"] = [e for e in r["expr"] if not ("match" in e and e["match"]["op"] == "!=")]
    assert gateway(rs).run_hook("prerouting", syn("10.137.0.6")).nat
    r = results(plan, rs)[("sys-whonix", NAT)]
    assert r.status == "FAIL", r


def test_anti_tcp_only_to_the_range_is_not_enough(plan):
    """A redirect of all TCP (not only SYNs) to the range fails as the general one does."""
    rs = copy.deepcopy(rulesets(plan))
    for i in rs[GW]["nftables"]:
        r = i.get("rule")
        if r and "automapped" in str(r.get("comment")):
            r["expr"] = [e for e in r["expr"] if "&" not in str(e)]
    assert gateway(rs).run_hook("prerouting", syn("10.192.0.5", frozenset({"ack"}))).nat
    r = results(plan, rs)[("sys-whonix", NAT)]
    assert r.status == "FAIL" and r.counterexample.get("tcp_flags", []) != ["syn"], r
    assert any("automapped" in t for t in r.trace)


def test_leaktest_sends_to_an_automapped_address():
    t = Target("10.137.0.5", "10.137.0.4", ("10.137.0.3",), ("10.137.0.6",),
               "198.51.100.80", "198.51.100.53", "web.lab.test",
               gateway6="fd09:24ef:4179::a89:4")
    c = next(c for c in cases(t) if c.name == "tcp-syn-automap")
    (pkt,) = c.packets
    assert pkt["dst"].startswith("10.192.") and pkt["proto"] == "tcp" and pkt["flags"] == "S"
    assert "tor" not in c.legit  # behind Tor its marker never leaves the workstation's link
    assert c.legit == frozenset({"vpn", "plain"})


def test_a_rule_list_may_accept_the_automap_range(tmp_path):
    """A workstation with its own list opens onions by name only if the list accepts the
    automap range: the gateway carries it, so the accept is not refused as a local range
    (the rest of 10/8 still is), and the audit proves the list as written."""
    from netstack.errors import ConfigError
    from tests.unit.test_config import ROOT

    base = (ROOT / "tests/configs/tor-two-workstations.toml").read_text()

    def with_rules(rules: str) -> str:
        c = tmp_path / "fw.toml"
        c.write_text(base.replace('label = "purple"', f'label = "purple"\nfirewall = [{rules}]'))
        return str(c)

    dns = '{action = "accept", specialtarget = "dns"}'
    p = make_plan(tmp_path, with_rules(f'{dns}, {{action = "accept", dsthost = "10.192.0.0/10",'
                                       ' proto = "tcp", dstports = "80-443"}'))
    res = results(p, rulesets(p))
    bad = {k: (r.status, r.counterexample) for k, r in res.items() if r.status != "PASS"}
    assert not bad and ("sys-whonix", "anon-whonix2 reaches exactly what its rules allow") \
        in res
    ev = gateway(rulesets(p))
    two = Packet(iifname="vif6", saddr="10.137.0.6", daddr="10.192.0.5", dport=80)
    assert ev.run_hook("prerouting", two).nat == [{"redirect": {"port": 9040}}]
    out = Packet(iifname="vif6", saddr="10.137.0.6", daddr="198.51.100.80", dport=80)
    assert ev.run_hook("prerouting", out).verdict == "drop"  # not in its list
    for net in ("10.0.0.0/8", "10.137.0.0/16", "10.128.0.0/9"):
        with pytest.raises(ConfigError, match="local range"):
            make_plan(tmp_path, with_rules(f'{{action = "accept", dsthost = "{net}"}}'))
